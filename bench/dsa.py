"""Dense MLA against DeepSeek-V3.2 sparse attention (DSA) on the same weights, one attention layer at the bench
config's widths (configs/bench_1gpu.yaml: d 2048, 16 heads, kv_lora 512, rope 64) plus the V3.2 indexer (64 heads ×
128, top-2048), batch 1, at 8K / 32K / 64K / 128K context.

    python bench/dsa.py [--lengths 8192,32768,65536,131072] [--iters 3] [--dsa-impl auto] [--index-impl auto]
                        [--json OUT.json] [--md OUT.md] [--quick]

Per length: prefill (forward) and training (forward + backward) tokens/s of dense MLA (the fused causal kernel) and
of DSA (indexer scoring + blocked top-k + gathered latent attention: ``model.dsa_attention_impl``, the Pallas
kernel on a GPU by default; the indexer's scores ``model.dsa_index_impl``, the fused BF16 Pallas kernel on a GPU by
default), the indexer's forward (scores + top-k) as a share of the DSA forward, and decode
tokens/s: one absorbed decode step at the last position over a full latent cache (+ the indexer key cache for
DSA). A measurement that runs out of device memory (or fails otherwise) is reported in its cell ("OOM") and the
run goes on. The markdown table goes to stdout, to ``--md`` and, when ``$OUT`` is set, to ``$OUT/dsa.md``.
The dense warm-up variant is not timed (it is dense MLA plus the indexer). On CPU (or with --quick) tiny widths
and lengths check that the script works.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsv3_jax.attention import MLA, LatentCache, mla_inputs
from dsv3_jax.config import load_config
from dsv3_jax.dsa import DSA, Indexer, topk_blocked
from dsv3_jax.kernels._backend import on_gpu

ROOT = Path(__file__).resolve().parent.parent


class IndexerSelect(nn.Module):
    """The indexer's part of a DSA layer (with MLA's q latent it reads): x → top-k idx. DSA's parameter names."""

    cfg: Any

    @nn.compact
    def __call__(self, x, pos):
        inp = mla_inputs(self.cfg, x, pos)
        ix = Indexer(self.cfg, name="indexer")(x, inp.cq, inp.cos, inp.sin)
        return topk_blocked(ix, ix.k, pos, pos, self.cfg.index_topk, impl=self.cfg.dsa_index_impl,
                            dtype=jnp.dtype(self.cfg.dtype))[0]


def _time(fn, *args, iters: int) -> float:
    """Median wall ms of ``fn(*args)`` after a compile + warm-up call."""
    jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(ts)


def _guarded(fn, *args, iters: int) -> float | str:
    """:func:`_time`, or "OOM" / the error's first line when the measurement fails (the run goes on)."""
    try:
        return _time(fn, *args, iters=iters)
    except Exception as e:  # noqa: BLE001 — a failed cell must not end the table
        msg = str(e)
        if "RESOURCE_EXHAUSTED" in msg or "out of memory" in msg.lower():
            return "OOM"
        return f"error: {type(e).__name__}: {msg.splitlines()[0][:80] if msg else ''}"


def bench_length(cfg, T: int, iters: int) -> dict:
    """One row: ms of every measurement at context T (floats, or "OOM"/"error: ..." strings)."""
    x = jax.random.normal(jax.random.key(0), (1, T, cfg.hidden_size), jnp.bfloat16)
    pos = jnp.arange(T, dtype=jnp.int32)[None]
    dsa, mla = DSA(cfg), MLA(cfg)
    v = jax.jit(lambda x: dsa.init(jax.random.key(1), x[:, :8], pos[:, :8]))(x)
    v_mla = {"params": {k: w for k, w in v["params"].items() if k != "indexer"}}  # the same weights

    def fwd_mla(v, x):
        return mla.apply(v, x, pos)[0]

    def fwd_dsa(v, x):
        return dsa.apply(v, x, pos)[0]

    def grad_of(f):
        return jax.jit(jax.grad(lambda v, x: f(v, x).astype(jnp.float32).sum(), argnums=(0, 1)))

    def indexer_only(v, x):
        return IndexerSelect(cfg).apply(v, x, pos)

    # Decode: one token at position T - 1 over a cache whose T - 1 earlier slots hold random latents / keys.
    kc = jax.random.split(jax.random.key(2), 3)
    full = LatentCache.init(cfg, 1, T, "bfloat16")
    full = LatentCache(*(jax.random.normal(k, a.shape, a.dtype) for k, a in zip(kc, full, strict=True)))
    x1, p1 = x[:, -1:], jnp.full((1, 1), T - 1, jnp.int32)

    def dec_mla(v, x1, c):
        return mla.apply(v, x1, p1, LatentCache(c.c_kv, c.k_rope), absorbed=True)[0]

    def dec_dsa(v, x1, c):
        return dsa.apply(v, x1, p1, c, absorbed=True)[0]

    row: dict[str, Any] = {"T": T}
    row["mla_fwd_ms"] = _guarded(jax.jit(fwd_mla), v_mla, x, iters=iters)
    row["dsa_fwd_ms"] = _guarded(jax.jit(fwd_dsa), v, x, iters=iters)
    row["indexer_fwd_ms"] = _guarded(jax.jit(indexer_only), v, x, iters=iters)
    row["mla_fwd_bwd_ms"] = _guarded(grad_of(fwd_mla), v_mla, x, iters=iters)
    row["dsa_fwd_bwd_ms"] = _guarded(grad_of(fwd_dsa), v, x, iters=iters)
    row["mla_decode_ms"] = _guarded(jax.jit(dec_mla), v_mla, x1, full, iters=iters)
    row["dsa_decode_ms"] = _guarded(jax.jit(dec_dsa), v, x1, full, iters=iters)
    if isinstance(row["indexer_fwd_ms"], float) and isinstance(row["dsa_fwd_ms"], float):
        row["indexer_share_of_dsa_fwd"] = row["indexer_fwd_ms"] / row["dsa_fwd_ms"]
    return row


def _tps(tokens: int, ms: float | str) -> str:
    return f"{tokens / ms * 1e3:,.0f}" if isinstance(ms, float) else ms


def _ms(ms: float | str) -> str:
    return f"{ms:,.1f}" if isinstance(ms, float) else ms


def markdown(rows: list[dict], device: str, impl: str) -> str:
    """The table for BENCHMARKS.md: tokens/s (and ms) per length, MLA vs DSA."""
    header = ("| T | prefill MLA | prefill DSA | indexer share of DSA fwd | training MLA (fwd+bwd) | training DSA "
              "(fwd+bwd) | decode MLA | decode DSA |")
    out = [f"device: {device}; DSA impls: {impl}; batch 1, one layer; tokens/s (ms)", "", header,
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        T = r["T"]
        share = f"{r['indexer_share_of_dsa_fwd']:.0%}" if "indexer_share_of_dsa_fwd" in r else "–"
        cells = [f"{T:,}"]
        for key in ("mla_fwd_ms", "dsa_fwd_ms"):
            cells.append(f"{_tps(T, r[key])} ({_ms(r[key])} ms)" if isinstance(r[key], float) else r[key])
        cells.append(share)
        for key in ("mla_fwd_bwd_ms", "dsa_fwd_bwd_ms", "mla_decode_ms", "dsa_decode_ms"):
            n = 1 if "decode" in key else T
            cells.append(f"{_tps(n, r[key])} ({_ms(r[key])} ms)" if isinstance(r[key], float) else r[key])
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json")
    ap.add_argument("--md", help="also write the markdown table here")
    ap.add_argument("--lengths", default="8192,32768,65536,131072")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--dsa-impl", default="auto", choices=("auto", "xla", "pallas"),
                    help="model.dsa_attention_impl: the gathered sparse attention")
    ap.add_argument("--index-impl", default="auto", choices=("auto", "xla", "pallas"),
                    help="model.dsa_index_impl: the indexer's scoring")
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args(argv)
    base = load_config(ROOT / "configs" / "bench_1gpu.yaml").model
    cfg = dataclasses.replace(base, index_topk=2048, index_n_heads=64, index_head_dim=128, remat="none",
                              dsa_attention_impl=a.dsa_impl, dsa_index_impl=a.index_impl)
    lengths = [int(x) for x in a.lengths.split(",")]
    if a.quick or not on_gpu():
        cfg = dataclasses.replace(cfg, index_topk=16, hidden_size=256, num_attention_heads=2, q_lora_rank=64,
                                  kv_lora_rank=64, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16,
                                  index_n_heads=4, index_head_dim=32)
        lengths, a.iters = [64, 256], 1
    device = jax.devices()[0].device_kind
    rows = []
    for T in lengths:
        row = bench_length(cfg, T, a.iters)
        rows.append(row)
        print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    table = markdown(rows, device, f"attention {a.dsa_impl}, indexer {a.index_impl}")
    print(table)
    for path in [a.md, os.environ.get("OUT") and str(Path(os.environ["OUT"]) / "dsa.md")]:
        if path:
            Path(path).write_text(table)
    if a.json:
        Path(a.json).write_text(json.dumps({"device": device, "dsa_impl": a.dsa_impl, "index_impl": a.index_impl,
                                                 "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
