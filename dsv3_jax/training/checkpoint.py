"""Checkpoints with Orbax: async, atomic, keep-last-N; full train state + data iterator position + config.

Layout of ``run_dir/checkpoints/<step>/`` (one Orbax ``CheckpointManager`` step, ``step`` = steps done):

    variables/   {'params', 'router'}            — all that serving/notebooks need (:func:`restore_params`)
    opt/         {'opt_state', 'rng'}
    meta/        JSON {'step', 'tokens_seen', 'data': data iterator state, 'checksums'}   (exact Python ints; a
                 multi-process run stores 'data_by_process': every process's iterator state, in process order)
    config/      JSON of the resolved :class:`Config`

Integrity: ``meta['checksums']`` holds a checksum per array of ``variables`` and ``opt`` (``checksum.py``),
computed from the arrays being saved; restore recomputes them and refuses a step whose data changed on disk
(or whose files are truncated or unreadable), naming the step, the item and the arrays or the error.
:meth:`Checkpointer.restore` then falls back to the newest intact step and moves the damaged ones aside to
``<directory>.damaged/<step>`` (kept for inspection, out of the manager's sight, so the run re-saves those
steps). Resuming from the older step replays the same batches, so the run still ends bit-identical.

Atomicity comes from Orbax: a step is written to ``<step>.orbax-checkpoint-tmp-*`` and renamed into place only
once every item is complete (on object stores a commit marker plays the rename's part). A crash or ``kill -9``
mid-save leaves a tmp dir that the manager never lists (and deletes on the next start), so restore always finds
the previous complete step.

Multi-process: every process calls ``save``/``restore`` (Orbax writes each array shard from the process that
holds it, and the primary process writes metadata and commits); ``run_dir`` must be on a filesystem all hosts
share.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from dsv3_jax import checksum
from dsv3_jax.config import Config, ConfigError, from_dict, to_dict
from dsv3_jax.params_io import restore_target
from dsv3_jax.training.step import TrainState

_ITEMS = ("variables", "opt", "meta", "config")
log = logging.getLogger(__name__)


class CheckpointDamaged(ValueError):
    """A checkpoint step whose arrays do not match their saved checksums, or whose files cannot be read."""


class CheckpointSaveError(RuntimeError):
    """Writing a checkpoint failed (disk full, permissions, ...); the message names the newest complete step."""


def _verify(where: Path, item: str, tree: Any, meta: dict[str, Any]) -> None:
    """Raise :class:`CheckpointDamaged` if ``tree`` (restored item ``item``) differs from the saved checksums."""
    expected = (meta.get("checksums") or {}).get(item)
    if expected is None:  # saved before checksums existed: nothing to compare with
        return
    bad = checksum.mismatches(tree, expected)
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise CheckpointDamaged(f"checkpoint {where}: the data in {where / item} does not match its checksums "
                                f"(array{'s' if len(bad) > 1 else ''} {shown}): the files were changed after "
                                f"the save")


def _describe(where: Path, e: Exception) -> str:
    if isinstance(e, CheckpointDamaged):
        return str(e)
    text = " ".join(str(e).split())
    return f"checkpoint {where} cannot be read ({type(e).__name__}: {text[:600]}): a file is missing, truncated or corrupt"


def _as_restore_target(tree: Any) -> Any:
    """Arrays / ShapeDtypeStructs → ShapeDtypeStructs with a sharding Orbax can restore onto."""
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def one(x):
        sharding = getattr(x, "sharding", None) or default
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    return jax.tree.map(one, tree)


class Checkpointer:
    """Save/restore :class:`TrainState` + data iterator state under ``directory``.

    ``save`` returns right after the arrays are copied off the device buffers (async mode), so the next train
    step may donate them; ``wait`` blocks until the write is finalised.
    """

    def __init__(self, directory: str | Path, keep: int = 3, async_save: bool = True) -> None:
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,  # remove tmp dirs left by a crash mid-save
        )
        self._mgr = ocp.CheckpointManager(self.directory, options=options, item_names=_ITEMS)

    def latest_step(self) -> int | None:
        return self._mgr.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._mgr.all_steps())

    def save(self, state: TrainState, data_state: dict[str, Any] | None, cfg: Config) -> bool:
        """Start saving ``state`` at step ``state.step``; False if that step is already saved."""
        from sharding.distributed import allgather_json

        step = int(state.step)
        if step in self._mgr.all_steps():
            return False
        meta = {"step": step, "tokens_seen": int(state.tokens_seen), "data": data_state,
                "checksums": {"variables": checksum.checksums({"params": state.params, "router": state.router}),
                              "opt": checksum.checksums({"opt_state": state.opt_state, "rng": state.rng})}}
        if jax.process_count() > 1:  # only the primary process writes JSON items: gather every position
            meta = dict(meta, data=None, data_by_process=allgather_json(data_state))
        args = ocp.args.Composite(
            variables=ocp.args.StandardSave({"params": state.params, "router": state.router}),
            opt=ocp.args.StandardSave({"opt_state": state.opt_state, "rng": state.rng}),
            meta=ocp.args.JsonSave(meta),
            config=ocp.args.JsonSave(to_dict(cfg)),
        )
        try:
            return self._mgr.save(step, args=args, force=True)
        except Exception as e:
            raise self._save_failed(e, step) from e

    def _save_failed(self, e: Exception, step: int | None = None) -> CheckpointSaveError:
        try:
            with contextlib.suppress(Exception):  # an earlier save may still be finishing
                self._mgr.wait_until_finished()
            self._mgr.reload()
            last = self._mgr.latest_step()
        except Exception:  # noqa: BLE001 — the summary must not fail too
            last = None
        intact = f"{self.directory}/{last}" if last is not None else "none"
        what = f"step {step}" if step is not None else "a checkpoint"
        return CheckpointSaveError(f"saving {what} to {self.directory} failed ({type(e).__name__}: "
                                   f"{' '.join(str(e).split())[:300]}); the newest complete checkpoint is {intact}")

    def restore(self, template: TrainState, step: int | None = None,
                on_damaged: Callable[[str], None] | None = None) -> tuple[TrainState, dict[str, Any] | None]:
        """Restore onto the structure (and shardings) of ``template``; latest intact step by default.

        A damaged step (checksum mismatch, unreadable file) raises :class:`CheckpointDamaged` when ``step`` is
        given; by default the newest intact step is restored instead, each damaged newer step is reported to
        ``on_damaged`` (default: the log) and moved to ``<directory>.damaged/``. No intact step: the error lists
        every step's damage.
        """
        if step is not None:
            return self._restore_step(template, step)
        steps = sorted(self._mgr.all_steps(), reverse=True)
        if not steps:
            raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
        damaged: list[tuple[int, str]] = []
        for s in steps:
            try:
                out = self._restore_step(template, s)
            except CheckpointDamaged as e:
                damaged.append((s, str(e)))
                (on_damaged or log.warning)(f"{damaged[-1][1]}; trying the previous checkpoint")
                continue
            if damaged:
                self._set_aside([d for d, _ in damaged])
                (on_damaged or log.warning)(
                    f"resuming from the newest intact checkpoint {self.directory / str(s)}; damaged step(s) "
                    f"{', '.join(str(d) for d, _ in damaged)} moved to {self._aside_dir()}")
            return out
        raise CheckpointDamaged(f"no intact checkpoint in {self.directory}: " + "; ".join(m for _, m in damaged))

    def _aside_dir(self) -> Path:
        return self.directory.with_name(self.directory.name + ".damaged")

    def _set_aside(self, steps: list[int]) -> None:
        """Move damaged steps out of the manager's directory (kept for inspection; the run saves them anew)."""
        if jax.process_index() == 0:
            for s in steps:
                dest = self._aside_dir() / str(s)
                if dest.exists():
                    dest = dest.with_name(f"{s}-{time.strftime('%Y%m%d-%H%M%S')}")
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(str(self.directory / str(s)), str(dest))
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("dsv3_checkpoint_set_aside")
        self._mgr.reload()

    def _restore_step(self, template: TrainState, step: int) -> tuple[TrainState, dict[str, Any] | None]:
        if step not in self._mgr.all_steps():
            raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory}; have {self.all_steps()}")
        args = ocp.args.Composite(
            variables=ocp.args.StandardRestore(_as_restore_target({"params": template.params,
                                                                   "router": template.router})),
            opt=ocp.args.StandardRestore(_as_restore_target({"opt_state": template.opt_state,
                                                             "rng": template.rng})),
            meta=ocp.args.JsonRestore(),
        )
        try:
            r = self._mgr.restore(step, args=args)
        except Exception as e:
            raise CheckpointDamaged(_describe(self.directory / str(step), e)) from e
        meta = r.meta
        _verify(self.directory / str(step), "variables", r.variables, meta)
        _verify(self.directory / str(step), "opt", r.opt, meta)
        state = TrainState(r.variables["params"], r.variables["router"], r.opt["opt_state"],
                           np.int64(meta["step"]), np.int64(meta["tokens_seen"]), r.opt["rng"])
        per_process = meta.get("data_by_process")
        if per_process is None and jax.process_count() == 1:
            return state, meta.get("data")
        have = 1 if per_process is None else len(per_process)
        if have != jax.process_count():
            raise ConfigError(f"{self.directory}/{step} holds the data positions of {have} process(es) but this run "
                              f"has {jax.process_count()}; resume with {have} process(es) (any devices per process) "
                              f"or start a new run_dir")
        return state, per_process[jax.process_index()]

    def saved_config(self, step: int | None = None) -> dict[str, Any]:
        """The config dict stored with ``step`` (latest by default)."""
        step = self._mgr.latest_step() if step is None else step
        return self._mgr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config

    def check_compatible(self, cfg: Config) -> None:
        """Raise ConfigError if the latest checkpoint's model differs from ``cfg.model`` (it cannot be restored)."""
        step = self._mgr.latest_step()
        if step is None:
            return
        try:
            saved = self.saved_config(step).get("model", {})
        except Exception:  # noqa: BLE001 — unreadable: restore reports the damage and falls back
            return
        now = to_dict(cfg)["model"]
        diff = [f"model.{k}: saved {saved.get(k)!r}, now {v!r}" for k, v in now.items() if saved.get(k) != v]
        if diff:
            raise ConfigError(f"{self.directory}/{step} holds a different model ({'; '.join(diff)}). Resume with "
                              f"the saved model config or start a new run_dir.")

    def wait(self) -> None:
        """Block until the last save is on disk; :class:`CheckpointSaveError` if writing it failed."""
        try:
            self._mgr.wait_until_finished()
        except Exception as e:
            raise self._save_failed(e) from e

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._mgr.close()


def find_checkpoint_dir(path: str | Path) -> Path:
    """``path`` itself if it holds checkpoint steps, else ``path/checkpoints`` (a run dir)."""
    p = Path(path).expanduser().absolute()
    if (p / "checkpoints").is_dir():
        p = p / "checkpoints"
    if not p.is_dir():
        raise FileNotFoundError(f"checkpoint directory {str(p)!r} does not exist")
    return p


def restore_params(ckpt_dir: str | Path, step: int | None = None) -> tuple[dict[str, Any], Config]:
    """``({'params', 'router'}, Config)`` from a run dir or its ``checkpoints/`` dir (latest step by default).

    Reads only the ``variables``, ``meta`` and ``config`` items (no optimiser state) and verifies the variables'
    checksums: a damaged step raises :class:`CheckpointDamaged` if ``step`` was given, else the newest intact step
    is loaded (with a warning naming the damaged ones). Arrays land on the default device.
    """
    directory = find_checkpoint_dir(ckpt_dir)
    # No max_to_keep and no saves: this manager never deletes anything (read_only=True only adds log noise).
    mgr = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False), item_names=_ITEMS)
    try:
        have = sorted(mgr.all_steps(), reverse=True)
        if not have:
            raise FileNotFoundError(f"no complete checkpoint in {directory}")
        if step is not None and step not in have:
            raise FileNotFoundError(f"no checkpoint for step {step} in {directory}; have {sorted(have)}")
        damaged = []
        for s in [step] if step is not None else have:
            where = directory / str(s)
            try:
                with ocp.StandardCheckpointer() as ckptr:  # shapes/dtypes only: restore on this machine's devices
                    target = restore_target(ckptr.metadata(where / "variables").item_metadata.tree)
                r = mgr.restore(s, args=ocp.args.Composite(variables=ocp.args.StandardRestore(target),
                                                           meta=ocp.args.JsonRestore(),
                                                           config=ocp.args.JsonRestore()))
                _verify(where, "variables", r.variables, r.meta)
            except Exception as e:  # noqa: BLE001 — any read failure is damage to report
                damaged.append(_describe(where, e))
                if step is not None:
                    raise CheckpointDamaged(damaged[-1]) from None
                log.warning("%s; trying the previous checkpoint", damaged[-1])
                continue
            step = s
            break
        else:
            raise CheckpointDamaged(f"no intact checkpoint in {directory}: " + "; ".join(damaged))
    finally:
        mgr.close()
    try:
        cfg = from_dict(Config, r.config)
    except ConfigError as e:
        raise ConfigError(f"config saved with checkpoint {directory / str(step)} does not load: {e}") from None
    return {"params": r.variables["params"], "router": r.variables["router"]}, cfg
