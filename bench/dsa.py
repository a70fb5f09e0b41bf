"""Dense MLA against DeepSeek-V3.2 sparse attention (DSA) on the same weights, one attention layer at the bench
config's widths (configs/bench_1gpu.yaml: d 2048, 16 heads, kv_lora 512, rope 64) plus the V3.2 indexer (64 heads ×
128, top-2048), batch 1, at 8K / 32K / 64K / 128K context.

    python bench/dsa.py [--json OUT.json] [--lengths 8192,32768,65536,131072] [--quick]

Rows per length: forward ms and forward+backward ms of dense MLA (the fused causal kernel) and of DSA (indexer
scoring + blocked top-k + gathered latent attention), and the indexer's own forward ms (its share of the DSA time).
The dense warm-up variant is not timed (it is dense MLA plus the indexer). On CPU, --quick runs tiny lengths only
to check that the script works.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsv3_jax.attention import MLA, mla_inputs
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
        return topk_blocked(ix, ix.k, pos, pos, self.cfg.index_topk)[0]


def _time(fn, *args, iters: int) -> float:
    jax.block_until_ready(fn(*args))  # compile + warm-up
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(ts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json")
    ap.add_argument("--lengths", default="8192,32768,65536,131072")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args(argv)
    base = load_config(ROOT / "configs" / "bench_1gpu.yaml").model
    cfg = dataclasses.replace(base, index_topk=2048, index_n_heads=64, index_head_dim=128, remat="none")
    lengths = [int(x) for x in a.lengths.split(",")]
    if a.quick or not on_gpu():
        cfg = dataclasses.replace(cfg, index_topk=16, hidden_size=256, num_attention_heads=2, q_lora_rank=64,
                                  kv_lora_rank=64, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16,
                                  index_n_heads=4, index_head_dim=32)
        lengths, a.iters = [64, 256], 1
    rows = []
    for T in lengths:
        x = jax.random.normal(jax.random.key(0), (1, T, cfg.hidden_size), jnp.bfloat16)
        pos = jnp.arange(T, dtype=jnp.int32)[None]
        dsa = DSA(cfg)
        v = jax.jit(lambda x: dsa.init(jax.random.key(1), x[:, :8], pos[:, :8]))(x)
        v_mla = {"params": {k: w for k, w in v["params"].items() if k != "indexer"}}
        mla = MLA(cfg)

        def fwd_mla(v, x):
            return mla.apply(v, x, pos)[0]

        def fwd_dsa(v, x):
            return dsa.apply(v, x, pos)[0]

        def grad_of(f):
            return jax.jit(jax.grad(lambda v, x: f(v, x).astype(jnp.float32).sum(), argnums=(0, 1)))

        def indexer_only(v, x):
            return IndexerSelect(cfg).apply(v, x, pos)

        row = {"T": T,
               "mla_fwd_ms": _time(jax.jit(fwd_mla), v_mla, x, iters=a.iters),
               "dsa_fwd_ms": _time(jax.jit(fwd_dsa), v, x, iters=a.iters),
               "indexer_fwd_ms": _time(jax.jit(indexer_only), v, x, iters=a.iters),
               "mla_fwd_bwd_ms": _time(grad_of(fwd_mla), v_mla, x, iters=a.iters),
               "dsa_fwd_bwd_ms": _time(grad_of(fwd_dsa), v, x, iters=a.iters)}
        row["indexer_share_of_dsa_fwd"] = row["indexer_fwd_ms"] / row["dsa_fwd_ms"]
        rows.append(row)
        print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps({"device": jax.devices()[0].device_kind, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
