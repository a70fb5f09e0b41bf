"""Params-only Orbax checkpoints: a directory with ``config.yaml`` and ``variables/`` (params + router).

Written by ``python -m dsv3_jax.convert``; read by serving, notebooks and the logit checker. Writes go to a
temporary directory that is renamed when complete, so an interrupted write leaves nothing half-written.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from dsv3_jax.config import Config, ModelConfig, load_config, save_config


def save_variables(out_dir: str | Path, variables: dict, model_cfg: ModelConfig, overwrite: bool = False) -> Path:
    """Save variables {'params', 'router'} and the config (as a full Config with this model) to ``out_dir``."""
    out = Path(out_dir).absolute()
    if out.exists():
        if not overwrite:
            raise FileExistsError(f"{out} exists; pass overwrite=True (--force) or choose a new directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        save_config(Config(model=model_cfg), tmp / "config.yaml")
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(tmp / "variables", variables)
            ckptr.wait_until_finished()
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_variables(ckpt_dir: str | Path, dtype: str | None = None) -> tuple[dict, Config]:
    """Restore (variables, Config) from a directory written by :func:`save_variables`.

    ``dtype`` casts the floating params on restore (router biases stay float32).
    """
    d = Path(ckpt_dir).absolute()
    if not (d / "config.yaml").exists() or not (d / "variables").exists():
        raise FileNotFoundError(f"{d}: not a dsv3-jax params checkpoint (expects config.yaml and variables/)")
    cfg = load_config(d / "config.yaml")
    with ocp.StandardCheckpointer() as ckptr:
        variables = ckptr.restore(d / "variables")
    if dtype is not None:
        variables = {k: (v if k == "router" else jax.tree.map(lambda a: a.astype(dtype), v))
                     for k, v in variables.items()}
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, param_dtype=dtype))
    return variables, cfg
