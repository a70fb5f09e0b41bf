"""FP8 GEMM paths against each other on the bench config's MoE and Linear shapes (one layer's worth): forward
and gradients of ``moe.dispatch_ragged`` and ``fp8.fp8_matmul`` under DSV3_FP8_GEMM=mgpu / dequant / pallas, each
against ``emulate`` (the exact per-chunk reference), with the same 128-aligned expert layout.

    python bench/fp8_paths.py [--tokens 4096] [--modes mgpu,dequant]     # prints max relative differences
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp

from dsv3_jax import moe
from dsv3_jax.moe import Routing


def rel(a: jax.Array, b: jax.Array) -> float:
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--ffn", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--topk", type=int, default=6)
    ap.add_argument("--modes", default="mgpu,dequant")
    a = ap.parse_args(argv)
    N, d, F, E, K = a.tokens, a.dim, a.ffn, a.experts, a.topk
    k = jax.random.split(jax.random.key(0), 8)
    x = jax.random.normal(k[0], (N, d), jnp.bfloat16)
    logits = jax.random.normal(k[1], (N, E))
    experts = jax.lax.top_k(logits, K)[1].astype(jnp.int32)
    r = Routing(experts, jax.random.uniform(k[2], (N, K)), None)
    ws = [jax.random.normal(k[3 + i], s) * 0.02 for i, s in enumerate([(E, d, F), (E, d, F), (E, F, d)])]
    w = jax.random.normal(k[6], (d, d)) * 0.02

    def moe_fn(x, ws):
        return moe.dispatch_ragged(x, r, *ws, "auto", False, align=128)

    def lin_fn(x, w):
        from dsv3_jax import fp8
        return fp8.fp8_matmul(x, w)

    def exact_moe(x, ws):
        return moe.dispatch_ragged(x.astype(jnp.float32), r, *ws, "xla", None, align=0)

    def exact_lin(x, w):
        return x.astype(jnp.float32) @ w

    def run(mode, fns=(moe_fn, lin_fn)):
        os.environ["DSV3_FP8_GEMM"] = mode  # read at trace time: fresh functions, so nothing is reused from a cache
        out = {}
        for name, fn, args in zip(("moe", "linear"), fns, ((x, ws), (x, w))):
            f = jax.jit(lambda *p, fn=fn: fn(*p))
            g = jax.jit(jax.grad(lambda *p, fn=fn: (fn(*p).astype(jnp.float32) ** 2).sum(), argnums=(0, 1)))
            out[name] = (f(*args), g(*args))
        return out

    exact = run("emulate", (exact_moe, exact_lin))
    ref = run("emulate")
    for name in ("moe", "linear"):
        (y0, g0), (y1, g1) = exact[name], ref[name]
        print(f"RESULT emulate  {name:7s} rel diff vs FP32 (the FP8 error itself): out {rel(y1, y0):.2e}  grads "
              + " ".join(f"{rel(u, v):.2e}" for u, v in zip(jax.tree.leaves(g1), jax.tree.leaves(g0))))
    print(f"device {jax.devices()[0].device_kind}; tokens {N}, d {d}, F {F}, E {E}, top-{K}")
    for mode in a.modes.split(","):
        got = run(mode)
        for name in ("moe", "linear"):
            (y0, g0), (y1, g1) = ref[name], got[name]
            gr = [rel(u, v) for u, v in zip(jax.tree.leaves(g1), jax.tree.leaves(g0))]
            ye, ge = exact[name]
            gx = [rel(u, v) for u, v in zip(jax.tree.leaves(g1), jax.tree.leaves(ge))]
            print(f"RESULT {mode:8s} {name:7s} rel diff vs emulate: out {rel(y1, y0):.2e}  grads "
                  + " ".join(f"{e:.2e}" for e in gr) + f"; vs FP32: out {rel(y1, ye):.2e}  grads "
                  + " ".join(f"{e:.2e}" for e in gx))
    return 0


if __name__ == "__main__":
    sys.exit(main())
