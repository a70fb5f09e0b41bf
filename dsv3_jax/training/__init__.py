"""Training: losses, optimiser + schedules, the jitted train step, Orbax checkpoints, metrics, the loop.

    from dsv3_jax.training import train, restore_params
    result = train(cfg, make_train_iter, make_eval_iter)      # what train.py runs
    variables, cfg = restore_params("runs/tiny")             # {'params', 'router'} for serving / notebooks
"""

from dsv3_jax.training.checkpoint import Checkpointer, restore_params
from dsv3_jax.training.loop import Diverged, RunResult, train
from dsv3_jax.training.step import TrainState, eval_loss, init_state, train_step

__all__ = ["Checkpointer", "Diverged", "RunResult", "TrainState", "eval_loss", "init_state", "restore_params",
           "train", "train_step"]
