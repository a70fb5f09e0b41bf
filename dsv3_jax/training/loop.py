"""The training loop: resume, step, log, evaluate, checkpoint, stop cleanly.

Data comes in through the data module's contract only: ``make_train_iter(batch_size)`` returns an iterator of
``{"tokens": int32 [batch_size, seq_len + 1]}`` with JSON-serialisable ``get_state()`` / ``set_state()``;
``make_eval_iter(batch_size)`` the same for held-out data (or None: no evaluation). Both are built with the
micro-batch size; a step draws as many micro-batches as the batch ramp asks for.

Multi-process runs (``sharding/distributed.py``): each process's iterators are built with its share of the
micro-batch and called as ``make_train_iter(batch_size, shard_index=i, shard_count=n)`` (likewise for eval):
they must yield shard ``i`` of ``n`` of the data. Only process 0 writes config.yaml, metrics and events; every
process takes part in checkpointing (each saves and restores its own data position).

Restarting with the same config resumes from the latest complete checkpoint (params, router, optimiser,
counters, rng and the data position), and the losses that follow are bit-identical to an uninterrupted run.
SIGTERM/SIGINT finish the current step, save and return; a non-finite loss or gradient norm raises
:class:`Diverged` without saving the bad state. A damaged latest checkpoint (checksum mismatch, truncated file)
is reported and the newest intact one is resumed instead (``checkpoint.py``). One process writes a run dir at a
time (``runlock.py``): a second one raises :class:`RunDirLocked` naming the holder.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Self

import jax
import numpy as np

from dsv3_jax.config import Config, ConfigError, save_config
from dsv3_jax.training import metrics as metrics_lib
from dsv3_jax.training.checkpoint import Checkpointer
from dsv3_jax.training.runlock import RunDirLock
from dsv3_jax.training.schedule import Schedule
from dsv3_jax.training.step import eval_loss, init_state, train_step


class DataIterator(Protocol):
    def __next__(self) -> dict[str, np.ndarray]: ...
    def get_state(self) -> dict[str, Any]: ...
    def set_state(self, state: dict[str, Any]) -> None: ...


class Diverged(RuntimeError):
    """Loss or gradient norm became NaN/Inf; the message names the step and the last good checkpoint."""


@dataclass
class RunResult:
    step: int
    tokens_seen: int
    stopped_by: str | None  # None (finished), "SIGTERM", "SIGINT" or "another process" (its signal)
    last_record: dict[str, Any] | None


class _StopOnSignal:
    """SIGTERM/SIGINT set a flag the loop checks after each step (a second SIGINT interrupts at once)."""

    def __init__(self) -> None:
        self.signal: str | None = None
        self._old: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


def _next_batch(it: Iterator, n: int, mb: int, seq_len: int) -> np.ndarray | dict[str, np.ndarray]:
    """n micro-batches stacked: int32 [n, mb, seq_len + 1] — a dict of such arrays when the data gives more
    than ``tokens`` (chat rows: loss_mask, positions, segment_ids)."""
    batches = []
    for _ in range(n):
        b = {k: np.asarray(v) for k, v in next(it).items()}
        for k, v in b.items():
            if v.shape != (mb, seq_len + 1):
                raise ValueError(f"data iterator gave {k} of shape {v.shape}; expected [{mb}, {seq_len + 1}] "
                                 f"(micro-batch size, data.seq_len + 1)")
        batches.append(b)
    out = {k: np.stack([b[k] for b in batches]).astype(np.int32) for k in batches[0]}
    return out["tokens"] if len(out) == 1 else out


def _as_eval_batch(b: dict) -> np.ndarray | dict[str, np.ndarray]:
    """tokens [B, T+1], or every field when the data gives more (chat rows)."""
    return np.asarray(b["tokens"]) if len(b) == 1 else {k: np.asarray(v) for k, v in b.items()}


def build_mesh(cfg: Config):
    """The run's device mesh, or None for a single device (mesh axes all 1)."""
    from sharding.mesh import make_mesh, mesh_shape

    sizes = mesh_shape(cfg.mesh, jax.device_count())
    if jax.process_count() > 1 and math.prod(sizes.values()) != jax.device_count():
        raise ConfigError(f"{jax.process_count()} processes: the mesh must span all {jax.device_count()} devices, "
                          f"but mesh {sizes} uses {math.prod(sizes.values())} (e.g. set mesh.data=-1)")
    if math.prod(sizes.values()) == 1:
        return None
    mesh = make_mesh(cfg.mesh)
    per_step = Schedule(cfg).micro_batch_size
    split = math.prod(sizes[a] for a in ("data", "fsdp", "expert"))
    if per_step % split:
        raise ConfigError(f"micro-batch of {per_step} sequences cannot be split over data×fsdp×expert = {split} "
                          f"devices; choose train.global_batch_size / train.micro_batch_size divisible by {split}")
    return mesh


def train(cfg: Config, make_train_iter: Callable[[int], DataIterator],
          make_eval_iter: Callable[[int], Iterator] | None = None) -> RunResult:
    """Train ``cfg`` to ``train.steps`` steps or ``train.tokens`` tokens, whichever comes first, in ``cfg.run_dir``
    (resuming if it holds a checkpoint). LR, batch size, λ and γ come from :class:`Schedule`.

    Raises :class:`Diverged` on a non-finite loss/grad norm, ConfigError if the run dir's checkpoint holds a
    different model or another process is training in it (``RunDirLocked``), ``CheckpointDamaged`` if no
    checkpoint in it is intact.
    """
    with RunDirLock(cfg.run_dir, jax.process_index()):
        return _train(cfg, make_train_iter, make_eval_iter)


def _train(cfg: Config, make_train_iter: Callable[[int], DataIterator],
           make_eval_iter: Callable[[int], Iterator] | None) -> RunResult:
    from sharding.distributed import any_process, batch_shard, is_main_process

    t = cfg.train
    main = is_main_process()
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if main:
        save_config(cfg, run_dir / "config.yaml")
    sched = Schedule(cfg)
    mb, seq_len = sched.micro_batch_size, cfg.data.seq_len

    progress = metrics_lib.Progress(sched.total_steps, every=t.log_every, enabled=main)
    mesh = build_mesh(cfg)
    if cfg.mesh.node_limited_routing:  # ConfigError if router groups straddle nodes of the expert axis
        from sharding.expert import check_node_limited

        progress.message(check_node_limited(cfg.model, mesh, cfg.mesh.expert_shards_per_node))
    # This process's rows of every micro-batch; its iterators yield only those (all rows on one process).
    shard_index, shard_count = batch_shard(mesh) if mesh is not None else (0, 1)
    local_mb = mb // shard_count
    shard = {} if shard_count == 1 else {"shard_index": shard_index, "shard_count": shard_count}
    it = make_train_iter(local_mb, **shard)
    ckpt = Checkpointer(run_dir / "checkpoints", keep=t.keep_checkpoints, async_save=t.async_checkpoint)
    try:
        ckpt.check_compatible(cfg)  # before any compile: a clear ConfigError instead of an Orbax shape error
    except Exception:
        ckpt.close()
        raise
    if mesh is not None:
        from sharding.pipeline import schedule_summary

        msg = f"mesh {dict(mesh.shape)}"
        if (S := mesh.shape["pipeline"]) > 1:
            m = cfg.mesh
            msg += "; " + schedule_summary(S, m.pipeline_microbatches, m.pipeline_schedule, m.pipeline_virtual_stages)
        progress.message(msg)
    state = init_state(cfg, mesh=mesh)
    if ckpt.latest_step() is not None:  # restores onto this run's mesh, whatever mesh saved it
        state, data_state = ckpt.restore(state, on_damaged=progress.message)
        if data_state is not None:
            it.set_state(data_state)
        progress.message(f"resumed from {ckpt.directory}/{int(state.step)} ({int(state.tokens_seen)} tokens)")
    elif t.init_from:  # fine-tuning: the source's weights, this run's fresh optimizer and step 0
        from dsv3_jax.training.init_from import initialize_from, inspect_source

        src = inspect_source(t.init_from)
        state = initialize_from(state, src, cfg.model)
        progress.message(f"initialised from {src.kind} checkpoint {src.path}")
    writer = metrics_lib.MetricsWriter(run_dir, resume_step=int(state.step)) if main else None
    fpt = metrics_lib.flops_per_token(cfg.model, seq_len)
    peak = metrics_lib.peak_flops_per_device(t.peak_flops)
    eval_batches: list[np.ndarray] | None = None

    interval_tokens, interval_losses, interval_start = 0, [], time.perf_counter()
    interval_dropped = [0.0]  # expert-parallel copies dropped for capacity since the last log line
    record: dict[str, Any] | None = None

    def settle(step: int, m: dict) -> tuple[float, float]:
        """Read one dispatched step's metrics (waits for that step only): Diverged if not finite; returns
        (loss averaged over the log interval, tokens/s over it)."""
        nonlocal interval_tokens
        if not bool(m["finite"]):
            m = jax.device_get(m)
            last = ckpt.latest_step()
            raise Diverged(
                f"step {step}: loss={float(m['loss'])} grad_norm={float(m['grad_norm'])} is not "
                f"finite; stopped without saving this state. Last good checkpoint: "
                f"{f'{ckpt.directory}/{last}' if last is not None else 'none'}. Try a lower train.lr "
                f"(now {t.lr}) or more train.warmup_steps (now {t.warmup_steps}).")
        interval_tokens += int(m["tokens"])
        interval_losses.append(float(m["loss"]))
        interval_dropped[0] += float(m["moe_dropped"])
        elapsed = time.perf_counter() - interval_start
        loss_avg = sum(interval_losses) / len(interval_losses)  # smoother than one small batch
        progress.update(step, loss_avg, interval_tokens / elapsed if elapsed > 0 else math.nan,
                        dropped=interval_dropped[0])
        return loss_avg, interval_tokens / elapsed if elapsed > 0 else math.nan

    # No host sync per step: a step's metrics are read after the next step is queued, so the device never
    # idles on Python. Steps that log, evaluate or checkpoint are read at once (a bad state is never saved).
    pending: tuple[int, dict] | None = None
    try:
        with _StopOnSignal() as stop:
            while not sched.done(int(state.step), int(state.tokens_seen)) and not any_process(stop.signal is not None):
                n = sched.num_micro_batches(int(state.tokens_seen))
                batch = _next_batch(it, n, local_mb, seq_len)
                state, m = train_step(state, batch, cfg, mesh)
                step = int(state.step)  # host counter: no sync
                last = sched.done(step, int(state.tokens_seen))
                if pending is not None:
                    settle(*pending)
                pending = (step, m)
                eval_due = make_eval_iter is not None and t.eval_every > 0 and step % t.eval_every == 0
                ckpt_due = t.checkpoint_every > 0 and step % t.checkpoint_every == 0
                if not (eval_due or ckpt_due or step % t.log_every == 0 or last):
                    continue
                loss_avg, tokens_per_s = settle(*pending)
                pending = None

                evaluated = {}
                if eval_due:
                    if eval_batches is None:  # the same held-out batches every time: comparable numbers
                        eval_it = make_eval_iter(local_mb, **shard)
                        eval_batches = [_as_eval_batch(next(eval_it)) for _ in range(t.eval_batches)]
                    el = eval_loss(state, eval_batches, cfg, mesh)
                    evaluated = {"eval_loss": el, "eval_ppl": math.exp(min(el, 700.0))}
                    progress.message(f"step {step}: eval_loss {el:.4f} (ppl {evaluated['eval_ppl']:.2f})")

                if step % t.log_every == 0 or evaluated or last:
                    m = jax.device_get(m)
                    record = {k: m[k] for k in ("loss", "ce", "mtp_loss", "balance_loss", "grad_norm", "lr",
                                                "maxvio", "mtp_maxvio", "moe_dropped")}
                    if cfg.model.uses_dsa:  # V3.2: the indexer's KL and the attention mass its top-k keeps
                        record["indexer_kl"] = m["indexer_kl"]
                        if cfg.model.index_attention == "dense":  # needs every key's attention weight
                            record["topk_mass"] = m["topk_mass"]
                    record.update(step=step, loss_avg=loss_avg, tokens_seen=int(state.tokens_seen),
                                  tokens_per_s=tokens_per_s,
                                  mfu=metrics_lib.mfu(tokens_per_s, fpt, peak, jax.device_count()),
                                  micro_batches=n, **evaluated)
                    if writer is not None:
                        writer.write(record, expert_load=m["expert_load"])
                    interval_tokens, interval_losses, interval_start = 0, [], time.perf_counter()
                    interval_dropped[0] = 0.0

                if ckpt_due:
                    ckpt.save(state, it.get_state(), cfg)
            if pending is not None:  # stopped by a signal between log steps: check it before saving it
                settle(*pending)
                pending = None
            # Finished, or a signal arrived: make sure the last completed step is on disk.
            if int(state.step) > 0:
                ckpt.save(state, it.get_state(), cfg)
            # Stopped early: by a signal to this process, or (multi-process) to another one.
            stopped_by = stop.signal or ("another process" if not sched.done(int(state.step), int(state.tokens_seen))
                                         else None)
            if stopped_by is not None:
                progress.message(f"{stopped_by}: saved step {int(state.step)} to {ckpt.directory}; exiting")
    finally:
        ckpt.close()  # waits for in-flight async saves (the previous good checkpoint stays complete)
        if writer is not None:
            writer.close()
    return RunResult(int(state.step), int(state.tokens_seen), stopped_by, record)


__all__ = ["DataIterator", "Diverged", "RunResult", "train"]
