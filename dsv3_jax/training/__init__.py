"""Training: losses, optimiser, the schedule, the jitted train step, Orbax checkpoints, metrics, the loop.

    from dsv3_jax.training import train, restore_params
    result = train(cfg, make_train_iter, make_eval_iter)      # what train.py runs
    variables, cfg = restore_params("runs/tiny")             # {'params', 'router'} for serving / notebooks

The names below are imported on first use, so ``python -m dsv3_jax.training.schedule`` (the recipe printer)
starts without JAX or Orbax.
"""

import importlib
from typing import Any

_EXPORTS = {"Checkpointer": "checkpoint", "restore_params": "checkpoint", "Diverged": "loop", "RunResult": "loop",
            "train": "loop", "TrainState": "step", "eval_loss": "step", "init_state": "step", "train_step": "step",
            "Schedule": "schedule"}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)


__all__ = ["Checkpointer", "Diverged", "RunResult", "Schedule", "TrainState", "eval_loss", "init_state",
           "restore_params", "train", "train_step"]
