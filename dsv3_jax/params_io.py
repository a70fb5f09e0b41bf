"""Params-only Orbax checkpoints: a directory with ``config.yaml`` and ``variables/`` (params + router).

Written by ``python -m dsv3_jax.convert``; read by serving, notebooks and the logit checker. Writes go to a
temporary directory that is renamed when complete, so an interrupted write leaves nothing half-written.
``checksums.json`` holds a checksum per array (``checksum.py``); loading verifies every array it restores in its
saved dtype, so damaged files raise :class:`DamagedCheckpoint` naming them instead of loading silently.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from dsv3_jax import checksum
from dsv3_jax.config import Config, ModelConfig, load_config, save_config


class DamagedCheckpoint(ValueError):
    """A params checkpoint whose arrays do not match ``checksums.json`` or whose files cannot be read."""


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
        (tmp / "checksums.json").write_text(json.dumps(checksum.checksums(variables), indent=0))
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
    try:
        with ocp.StandardCheckpointer() as ckptr:
            meta = ckptr.metadata(d / "variables").item_metadata.tree
            target = restore_target(meta, dtype)
            variables = ckptr.restore(d / "variables", target)
    except Exception as e:
        text = " ".join(str(e).split())[:600]
        raise DamagedCheckpoint(f"params checkpoint {d} cannot be read ({type(e).__name__}: {text}): a file in "
                                f"{d / 'variables'} is missing, truncated or corrupt") from e
    if (d / "checksums.json").exists():  # verify the arrays restored in their saved dtype (casts change bits)
        def dtypes(tree: dict) -> dict:
            return {checksum.key(p): x.dtype for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}

        saved, restored = dtypes(meta), dtypes(variables)
        same = {k for k, dt in saved.items() if restored.get(k) == dt}
        bad = checksum.mismatches(variables, json.loads((d / "checksums.json").read_text()), only=same)
        if bad:
            raise DamagedCheckpoint(f"params checkpoint {d}: the data in {d / 'variables'} does not match "
                                    f"checksums.json (arrays {', '.join(bad[:5])}"
                                    f"{f' and {len(bad) - 5} more' if len(bad) > 5 else ''})")
    if dtype is not None:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, param_dtype=dtype))
    return variables, cfg


def restore_target(meta: dict, dtype: str | None = None, sharding: jax.sharding.Sharding | None = None) -> dict:
    """Abstract restore target {'params', 'router'} from a saved tree's Orbax metadata, placed on ``sharding``
    (default: this process's first device) instead of the devices it was saved from — a checkpoint written on
    8 GPUs or on a CPU restores on any machine. ``dtype`` casts floating params while reading (not the router)."""
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def leaf(path, m):
        dt = m.dtype
        if dtype is not None and path[0].key != "router" and jnp.issubdtype(dt, jnp.floating):
            dt = jnp.dtype(dtype)
        return jax.ShapeDtypeStruct(tuple(m.shape), dt, sharding=sharding)

    return jax.tree_util.tree_map_with_path(leaf, meta)
