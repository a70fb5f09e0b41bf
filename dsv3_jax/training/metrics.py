"""Run visibility: FLOPs/MFU, the stderr progress line, metrics.jsonl + expert_load.jsonl + TensorBoard events.

``run_dir/metrics.jsonl``: one JSON object per logged step (keys in :data:`LOGGED`, plus eval_loss/eval_ppl
on eval steps). Values are those of the logged step itself, except ``loss_avg`` (mean loss since the previous
record) and ``tokens_per_s`` (over the steps since the previous record; the first record of a process includes
compilation). ``run_dir/expert_load.jsonl``: per
logged step the expert loads relative to the mean, [L_moe][E] (the plot's heat map). TensorBoard events go
to ``run_dir/events`` when tensorboardX is installed.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import jax

from dsv3_jax.config import ModelConfig

log = logging.getLogger(__name__)

LOGGED = ("step", "tokens_seen", "loss", "loss_avg", "ce", "mtp_loss", "balance_loss", "grad_norm", "lr",
          "tokens_per_s", "mfu", "maxvio", "mtp_maxvio", "moe_dropped", "indexer_kl", "topk_mass")

# Dense BF16 peak FLOP/s per device (no sparsity). REFERENCE §10 for H100/H800.
PEAK_FLOPS = (
    ("H100", 989e12), ("H800", 989e12), ("H200", 989e12), ("H20", 148e12), ("GH200", 989e12),
    ("B200", 2250e12), ("B100", 1750e12), ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12),
    ("TPU v6", 918e12), ("TPU v5p", 459e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12), ("TPU v4", 275e12),
)


def flops_per_token(m: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), the PaLM-style count used for MFU.

    ``6·N + 3·L·n_h·T·(d_qk + d_v)`` where
    - N = activated non-embedding parameters per token incl. lm_head: the main model's active params minus
      the embedding table (a gather, not a matmul), plus each MTP module's active params and one more head
      matmul per MTP depth (the shared head runs once per depth);
    - attention (QKᵀ and AV; 2 FLOPs per MAC, ×3 for backward) is ``6·n_h·T·(d_qk + d_v)`` per token per
      layer for full attention, halved for causal masking; L counts the main layers and the MTP blocks.
    """
    pc = m.param_counts()
    D = m.num_nextn_predict_layers
    head = m.vocab_size * m.hidden_size  # head matmul params (the embedding table when tied)
    n = pc["active"] - pc["embedding"] - pc["head"] + head * (1 + D) + pc["mtp_active"]
    layers = m.num_hidden_layers + D
    attn = 3 * layers * m.num_attention_heads * seq_len * (m.qk_head_dim + m.v_head_dim)
    return 6.0 * n + attn


def peak_flops_per_device(override: float = 0.0) -> float | None:
    """Peak FLOP/s of one local device (``override`` if > 0); None on CPU or an unknown device (no MFU)."""
    if override > 0:
        return override
    dev = jax.devices()[0]
    if dev.platform == "cpu":
        return None
    kind = dev.device_kind
    for name, peak in PEAK_FLOPS:
        if name.lower() in kind.lower():
            return peak
    return None


def mfu(tokens_per_s: float, fpt: float, peak_per_device: float | None, num_devices: int) -> float | None:
    """Model FLOPs utilisation: achieved training FLOP/s over the devices' peak (None when unknown)."""
    if peak_per_device is None or not math.isfinite(tokens_per_s):
        return None
    return tokens_per_s * fpt / (peak_per_device * num_devices)


def _fmt_time(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(s)
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{sec:02d}s"


def _fmt_num(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.1f}{unit}"
    return f"{x:.0f}"


class Progress:
    """A tqdm-like progress line on stderr: step, loss (the caller passes a recent mean), tokens/s, ETA.

    On a terminal the line is redrawn every step; otherwise (logs, pipes) one line is printed per ``every``
    steps. ETA uses the mean step time since the first step (which pays for compilation).
    """

    def __init__(self, total: int, start: int = 0, every: int = 10, stream: TextIO | None = None,
                 enabled: bool = True) -> None:
        self.total, self.start, self.every, self.enabled = total, start, max(1, every), enabled
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._t_first: float | None = None
        self._n_timed = 0

    def update(self, step: int, loss: float, tokens_per_s: float, dropped: float = 0.0) -> None:
        """``dropped``: expert-parallel routed copies dropped for capacity since the last printed line (shown
        only when > 0)."""
        if not self.enabled:  # a multi-process run's other processes
            return
        now = time.perf_counter()
        if self._t_first is None:
            self._t_first = now  # steps after this one are timed (the first includes compilation)
        else:
            self._n_timed += 1
        per_step = (now - self._t_first) / self._n_timed if self._n_timed else math.inf
        eta = (self.total - step) * per_step
        line = (f"step {step}/{self.total} | loss {loss:.4f} | {_fmt_num(tokens_per_s)} tok/s | "
                + (f"MoE dropped {_fmt_num(dropped)} copies | " if dropped > 0 else "") + f"ETA {_fmt_time(eta)}")
        if self.tty:
            self.stream.write("\r" + line.ljust(79))
            if step >= self.total:
                self.stream.write("\n")
        elif step % self.every == 0 or step >= self.total:
            self.stream.write(line + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        """A log message that does not garble the progress line."""
        if not self.enabled:
            return
        self.stream.write(("\n" if self.tty else "") + text + "\n")
        self.stream.flush()


def _jsonable(v: Any) -> Any:
    if hasattr(v, "tolist"):
        v = v.tolist()
    if isinstance(v, float) and not math.isfinite(v):
        return None  # JSON has no NaN/inf; the divergence check reports those
    if isinstance(v, list):
        return [_jsonable(x) for x in v]
    return v


def _truncate_jsonl(path: Path, max_step: int) -> None:
    """Drop records after ``max_step`` (a resumed run re-logs the steps after its checkpoint)."""
    if not path.exists():
        return
    kept = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= max_step]
    path.write_text("".join(ln + "\n" for ln in kept))


class MetricsWriter:
    """Appends to metrics.jsonl / expert_load.jsonl and writes TensorBoard scalars (if tensorboardX exists).

    ``resume_step``: records after it (from an interrupted run) are dropped so the files read as one run.
    """

    def __init__(self, run_dir: str | Path, resume_step: int = 0) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.load_path = self.run_dir / "expert_load.jsonl"
        for p in (self.metrics_path, self.load_path):
            _truncate_jsonl(p, resume_step)
        self._tb = None
        try:
            from tensorboardX import SummaryWriter
        except Exception as e:  # TensorBoard is optional; a broken install (e.g. its torch import) must not stop a run
            if not isinstance(e, ImportError):
                log.warning("TensorBoard events disabled: importing tensorboardX failed (%s: %s)", type(e).__name__, e)
            SummaryWriter = None
        if SummaryWriter is not None:
            self._tb = SummaryWriter(str(self.run_dir / "events"), purge_step=resume_step + 1 if resume_step else None)

    def write(self, record: dict[str, Any], expert_load: Any = None) -> None:
        record = {k: _jsonable(v) for k, v in record.items()}
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        step = record["step"]
        if expert_load is not None:
            with self.load_path.open("a") as f:
                f.write(json.dumps({"step": step, "load": [[round(x, 4) for x in row]
                                                            for row in _jsonable(expert_load)]}) + "\n")
        if self._tb is not None:
            for k, v in record.items():
                if k == "step" or v is None:
                    continue
                if isinstance(v, list):
                    for i, x in enumerate(v):
                        if x is not None:
                            self._tb.add_scalar(f"{k}/{i}", x, step)
                else:
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
