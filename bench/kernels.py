"""Kernel benchmarks at the bench config's shapes: grouped GEMM (experts), MLA attention, FP8 GEMM, dense GEMM,
the block-scaled FP8 Pallas kernels (dsv3_jax/kernels/fp8_gemm.py) against BF16 at the same shapes, the Hopper BF16
grouped GEMMs (bf16_gemm_mgpu.py: fwd, Dgrad, Wgrad) against tokamax and XLA ragged_dot, and MLA
decode attention over the latent cache (XLA einsums vs the Pallas/Triton flash-decoding kernel).

    python bench/kernels.py [--json OUT.json] [--quick] [--only fp8] [--only mla_decode] [--only bf16_mgpu]

Prints a table (TFLOP/s of useful work, median of --iters runs after a warm-up) and, with --json, writes the
numbers. On CPU it runs tiny shapes only to check that the script works (--quick is implied; the FP8 Pallas
kernels run in interpret mode there, one iteration). FP8 rows carry ``rel_err``: ‖kernel − exact emulation‖ /
‖emulation‖ (``fp8.chunked_dot``; Hopper's FP8 MMA keeps fewer accumulator bits within a 128-K chunk).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax
import jax.numpy as jnp

from dsv3_jax import fp8
from dsv3_jax.attention import causal_mask, latent_attention
from dsv3_jax.kernels import (
    block_scaled_grouped_matmul,
    block_scaled_kgrouped_matmul,
    block_scaled_matmul,
    causal_attention,
    grouped_matmul,
)
from dsv3_jax.kernels._backend import IMPORT_ERRORS, on_gpu, tokamax
from dsv3_jax.kernels.mla_decode import latent_decode_attention


def bench(fn, *args, iters: int = 20, batch: int = 10) -> float:
    """Seconds per call of ``fn(*args)`` (jitted by the caller): the median over ``iters`` rounds of ``batch``
    back-to-back calls (one sync per round, so host dispatch overlaps the GPU work) after one warm-up call."""
    jax.block_until_ready(fn(*args))
    batch = 1 if jax.default_backend() == "cpu" else batch
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        out = [fn(*args) for _ in range(batch)]
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t) / batch)
    return statistics.median(times)


def grouped_gemm_rows(quick: bool, iters: int) -> list[dict]:
    tokens, d, f, E, K = (8192, 2048, 1024, 64, 6) if not quick else (256, 64, 32, 8, 2)
    M = tokens * K
    key = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(key[0], (M, d), jnp.bfloat16)
    w = (jax.random.normal(key[1], (E, d, f), jnp.float32) * 0.02).astype(jnp.bfloat16)
    sizes = jnp.full((E,), M // E, jnp.int32)  # balanced routing
    flops = 2 * M * d * f
    rows = []
    impls = ["xla"] + (["tokamax"] if tokamax() is not None else [])
    for impl in impls:
        fwd = jax.jit(lambda a, b, s, impl=impl: grouped_matmul(a, b, s, impl))
        t = bench(fwd, x, w, sizes, iters=iters)
        rows.append(dict(op="grouped GEMM fwd", shape=f"[{M},{d}]x[{E},{d},{f}]", impl=impl, ms=t * 1e3,
                         tflops=flops / t / 1e12))
        fb = jax.jit(jax.grad(lambda a, b, s, impl=impl: grouped_matmul(a, b, s, impl).astype(jnp.float32)
                              .sum(), argnums=(0, 1)))
        t = bench(fb, x, w, sizes, iters=iters)
        rows.append(dict(op="grouped GEMM fwd+bwd", shape=f"[{M},{d}]x[{E},{d},{f}]", impl=impl, ms=t * 1e3,
                         tflops=3 * flops / t / 1e12))
    return rows


def attention_rows(quick: bool, iters: int) -> list[dict]:
    B, T, H, dqk, dv = (2, 4096, 16, 192, 128) if not quick else (1, 128, 2, 24, 16)
    key = jax.random.split(jax.random.key(1), 3)
    q = jax.random.normal(key[0], (B, T, H, dqk), jnp.bfloat16)
    k = jax.random.normal(key[1], (B, T, H, dqk), jnp.bfloat16)
    v = jax.random.normal(key[2], (B, T, H, dv), jnp.bfloat16)
    scale = dqk ** -0.5
    flops = 2 * B * H * T * T * (dqk + dv) / 2  # causal: half the score matrix
    rows = []
    impls = ["xla"] + (["tokamax"] if tokamax() is not None else [])
    for impl in impls:
        fwd = jax.jit(lambda q, k, v, impl=impl: causal_attention(q, k, v, scale, impl))
        try:
            t = bench(fwd, q, k, v, iters=iters)
            rows.append(dict(op="MLA attention fwd", shape=f"B{B} T{T} H{H} qk{dqk} v{dv}", impl=impl,
                             ms=t * 1e3, tflops=flops / t / 1e12))
            fb = jax.jit(jax.grad(lambda q, k, v, impl=impl: causal_attention(q, k, v, scale, impl)
                                  .astype(jnp.float32).sum(), argnums=(0, 1, 2)))
            t = bench(fb, q, k, v, iters=iters)
            rows.append(dict(op="MLA attention fwd+bwd", shape=f"B{B} T{T} H{H} qk{dqk} v{dv}", impl=impl,
                             ms=t * 1e3, tflops=3.5 * flops / t / 1e12))
        except Exception as e:  # report, keep going
            rows.append(dict(op="MLA attention", shape="", impl=impl, ms=float("nan"), tflops=float("nan"),
                             error=f"{type(e).__name__}: {str(e)[:200]}"))
    return rows


def dense_rows(quick: bool, iters: int) -> list[dict]:
    n = 8192 if not quick else 128
    key = jax.random.split(jax.random.key(2), 2)
    a = jax.random.normal(key[0], (n, n), jnp.bfloat16)
    b = jax.random.normal(key[1], (n, n), jnp.bfloat16)
    t = bench(jax.jit(lambda a, b: a @ b), a, b, iters=iters)
    rows = [dict(op="dense GEMM bf16", shape=f"{n}^3", impl="xla", ms=t * 1e3, tflops=2 * n ** 3 / t / 1e12)]
    # FP8 per-tensor scaled (XLA rewrites to cuBLASLt FP8 on Hopper).
    f8 = jnp.float8_e4m3fn

    def fp8_mm(a, b):
        sa = jnp.max(jnp.abs(a)).astype(jnp.float32) / 448
        sb = jnp.max(jnp.abs(b)).astype(jnp.float32) / 448
        qa = (a.astype(jnp.float32) / sa).astype(f8)
        qb = (b.astype(jnp.float32) / sb).astype(f8)
        y = jax.lax.dot_general(qa, qb, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        return (y * (sa * sb)).astype(jnp.bfloat16)

    try:
        t = bench(jax.jit(fp8_mm), a, b, iters=iters)
        rows.append(dict(op="FP8 GEMM (per-tensor, incl. quantise)", shape=f"{n}^3", impl="xla", ms=t * 1e3,
                         tflops=2 * n ** 3 / t / 1e12))
    except Exception as e:
        rows.append(dict(op="FP8 GEMM", shape=f"{n}^3", impl="xla", ms=float("nan"), tflops=float("nan"),
                         error=str(e)[:200]))
    return rows


def _row(op: str, shape: str, impl: str, t: float, flops: float, **extra) -> dict:
    return {"op": op, "shape": shape, "impl": impl, "ms": t * 1e3, "tflops": flops / t / 1e12, **extra}


def _error_row(op: str, shape: str, impl: str, e: Exception) -> dict:
    return {"op": op, "shape": shape, "impl": impl, "ms": float("nan"), "tflops": float("nan"),
            "error": f"{type(e).__name__}: {str(e)[:300]}"}


def _rel_err(got: jax.Array, ref: jax.Array) -> float:
    got, ref = got.astype(jnp.float32), ref.astype(jnp.float32)
    return float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref))


def _with_gemm_mode(mode: str, fn, *args) -> jax.Array:
    """Trace and run ``fn`` with ``DSV3_FP8_GEMM=mode`` (read at trace time), restoring the variable after."""
    old = os.environ.get("DSV3_FP8_GEMM")
    os.environ["DSV3_FP8_GEMM"] = mode
    try:
        return jax.block_until_ready(fn(*args))
    finally:
        if old is None:
            del os.environ["DSV3_FP8_GEMM"]
        else:
            os.environ["DSV3_FP8_GEMM"] = old


def fp8_block_scaled_rows(quick: bool, iters: int) -> list[dict]:
    """Block-scaled FP8 Pallas kernels (operands pre-quantised: kernel time only) vs BF16 at the same shapes:
    dense [T, d]·[d, n] (o_proj 2048², dense-MLP up 2048×10944: N not a multiple of 128), the routed experts
    [T·k, d]·[E, d, f] and their Wgrad [T·k, d]ᵀ·[T·k, f] per expert; then fp8_matmul fwd+bwd (quantisers
    included) under DSV3_FP8_GEMM=pallas / dequant vs a BF16 matmul fwd+bwd."""
    interpret = not on_gpu()
    iters = 1 if interpret else iters
    T, d, f, E, k = (8192, 2048, 1024, 64, 6) if not quick else (256, 256, 128, 4, 2)
    dense_n = (2048, 10944) if not quick else (256, 200)
    keys = iter(jax.random.split(jax.random.key(3), 16))
    kern = {"interpret": interpret}
    rows = []

    def quant(shape, block, scale=1.0):
        return fp8.quantize(jax.random.normal(next(keys), shape, jnp.float32) * scale, block)

    for n in dense_n:
        shape, flops = f"[{T},{d}]x[{d},{n}]", 2 * T * d * n
        xq, wq = quant((T, d), fp8.TILE), quant((d, n), fp8.WEIGHT, 0.02)
        sw = fp8._cols(wq.scale, n)
        try:
            args = (xq.q, xq.scale, wq.q, sw)
            err = _rel_err(block_scaled_matmul(*args, jnp.float32, **kern),
                           _with_gemm_mode("emulate", fp8.chunked_dot, *args))
            fn = jax.jit(lambda a, sa, b, sb: block_scaled_matmul(a, sa, b, sb, jnp.bfloat16, **kern))
            t = bench(fn, xq.q, xq.scale, wq.q, sw, iters=iters)
            rows.append(_row("FP8 block-scaled GEMM", shape, "pallas", t, flops, rel_err=err))
        except Exception as e:
            rows.append(_error_row("FP8 block-scaled GEMM", shape, "pallas", e))
        a, b = fp8.dequantize(xq, fp8.TILE, jnp.bfloat16), fp8.dequantize(wq, fp8.WEIGHT, jnp.bfloat16)
        t = bench(jax.jit(lambda a, b: a @ b), a, b, iters=iters)
        rows.append(_row("GEMM bf16 (same shape)", shape, "xla", t, flops))

    M = T * k
    sizes = jnp.full((E,), M // E, jnp.int32)  # balanced routing
    xq, wq = quant((M, d), fp8.TILE), quant((E, d, f), fp8.WEIGHT, 0.02)
    sw = fp8._cols(wq.scale, f)
    shape, flops = f"[{M},{d}]x[{E},{d},{f}]", 2 * M * d * f
    try:
        args = (xq.q, xq.scale, wq.q, sw, sizes)
        err = _rel_err(block_scaled_grouped_matmul(*args, jnp.float32, **kern),
                       _with_gemm_mode("emulate", fp8.grouped_chunked_dot, *args))
        fn = jax.jit(lambda a, sa, b, sb, s: block_scaled_grouped_matmul(a, sa, b, sb, s, jnp.bfloat16, **kern))
        t = bench(fn, xq.q, xq.scale, wq.q, sw, sizes, iters=iters)
        rows.append(_row("FP8 block-scaled grouped GEMM", shape, "pallas", t, flops, rel_err=err))
    except Exception as e:
        rows.append(_error_row("FP8 block-scaled grouped GEMM", shape, "pallas", e))
    a, b = fp8.dequantize(xq, fp8.TILE, jnp.bfloat16), fp8.dequantize(wq, fp8.WEIGHT, jnp.bfloat16)
    impl = "tokamax" if tokamax() is not None else "xla"
    t = bench(jax.jit(lambda a, b, s: grouped_matmul(a, b, s, impl)), a, b, sizes, iters=iters)
    rows.append(_row("grouped GEMM bf16 (same shape)", shape, impl, t, flops))

    xc, gc = quant((M, d), fp8.COL_TILE), quant((M, f), fp8.COL_TILE)
    shape = f"[{M},{d}]T.[{M},{f}] /{E}"
    try:
        fn = jax.jit(lambda a, sa, b, sb, s: block_scaled_kgrouped_matmul(a, sa, b, sb, s, **kern))
        t = bench(fn, xc.q, xc.scale, gc.q, gc.scale, sizes, iters=iters)
        rows.append(_row("FP8 block-scaled expert Wgrad", shape, "pallas", t, flops))
    except Exception as e:
        rows.append(_error_row("FP8 block-scaled expert Wgrad", shape, "pallas", e))

    n = dense_n[0]
    x = jax.random.normal(next(keys), (T, d), jnp.bfloat16)
    w = jax.random.normal(next(keys), (d, n), jnp.float32) * 0.02
    shape, flops = f"[{T},{d}]x[{d},{n}]", 3 * 2 * T * d * n
    for mode in ("pallas", "dequant"):
        fb = jax.jit(jax.grad(lambda x, w: fp8.fp8_matmul(x, w).astype(jnp.float32).sum(), argnums=(0, 1)))
        try:
            t = _with_gemm_mode(mode, lambda fb=fb: bench(fb, x, w, iters=iters))  # traced under the mode
            rows.append(_row("fp8_matmul fwd+bwd (incl. quantise)", shape, mode, t, flops))
        except Exception as e:
            rows.append(_error_row("fp8_matmul fwd+bwd (incl. quantise)", shape, mode, e))
    fb = jax.jit(jax.grad(lambda x, w: (x @ w.astype(jnp.bfloat16)).astype(jnp.float32).sum(), argnums=(0, 1)))
    t = bench(fb, x, w, iters=iters)
    rows.append(_row("matmul bf16 fwd+bwd", shape, "xla", t, flops))
    return rows


def fp8_sweep_rows(quick: bool, iters: int) -> list[dict]:
    """Tile configurations of the dense block-scaled FP8 kernel at [8192, 2048]·[2048, 2048] (o_proj), B as
    [K, N] and K-major [N, K] (``b_nk``), against BF16: which one to make the default."""
    interpret = not on_gpu()
    iters = 1 if interpret else iters
    T, d, n = (8192, 2048, 2048) if not quick else (256, 256, 256)
    keys = iter(jax.random.split(jax.random.key(5), 4))
    xq = fp8.quantize(jax.random.normal(next(keys), (T, d), jnp.float32), fp8.TILE)
    wq = fp8.quantize(jax.random.normal(next(keys), (d, n), jnp.float32) * 0.02, fp8.WEIGHT)
    sw = fp8._cols(wq.scale, n)
    ref = _with_gemm_mode("emulate", fp8.chunked_dot, xq.q, xq.scale, wq.q, sw)
    wt = jnp.asarray(wq.q.T)  # [N, K] materialised, outside the timing
    shape, flops = f"[{T},{d}]x[{d},{n}]", 2 * T * d * n
    configs = [(128, 128, 8, 3), (128, 128, 4, 3), (128, 128, 4, 4), (128, 256, 8, 3), (128, 256, 8, 4),
               (256, 128, 8, 3), (64, 128, 4, 4), (128, 64, 4, 4), (64, 256, 8, 3)]
    if quick:
        configs = configs[:2]
    rows = []
    for b_nk in (False, True):
        for bm, bn, w, st in configs:
            impl = f"pallas {bm}x{bn} w{w} s{st}" + (" B[N,K]" if b_nk else "")
            kw = {"interpret": interpret, "block_m": bm, "block_n": bn, "num_warps": w, "num_stages": st, "b_nk": b_nk}
            b = wt if b_nk else wq.q
            try:
                err = _rel_err(block_scaled_matmul(xq.q, xq.scale, b, sw, jnp.float32, **kw), ref)
                fn = jax.jit(lambda a, sa, b, sb, kw=kw: block_scaled_matmul(a, sa, b, sb, jnp.bfloat16, **kw))
                t = bench(fn, xq.q, xq.scale, b, sw, iters=iters)
                rows.append(_row("FP8 block-scaled GEMM (sweep)", shape, impl, t, flops, rel_err=err))
            except Exception as e:
                rows.append(_error_row("FP8 block-scaled GEMM (sweep)", shape, impl, e))
    a, b = fp8.dequantize(xq, fp8.TILE, jnp.bfloat16), fp8.dequantize(wq, fp8.WEIGHT, jnp.bfloat16)
    t = bench(jax.jit(lambda a, b: a @ b), a, b, iters=iters)
    rows.append(_row("GEMM bf16 (same shape)", shape, "xla", t, flops))
    return rows


def fp8_mgpu_rows(quick: bool, iters: int) -> list[dict]:
    """The Mosaic-GPU (WGMMA) block-scaled FP8 GEMMs against BF16 at the bench shapes: dense (o_proj, dense-MLP
    up, a wide-K one) in its variants, the routed experts' grouped GEMM with 128-aligned groups, and their
    k-grouped Wgrad, each next to the BF16 kernel the model runs there (XLA dot, tokamax ragged dot)."""
    from dsv3_jax.kernels import fp8_gemm_mgpu as mg

    interpret = not on_gpu()
    iters = 1 if interpret else iters
    shapes = [(8192, 2048, 2048), (8192, 2048, 10944), (8192, 7168, 2048)] if not quick else [(256, 256, 256)]
    keys = iter(jax.random.split(jax.random.key(6), 2 * len(shapes) + 8))
    rows = []

    def timed(op, shape, impl, flops, fn, args, ref=None):
        try:
            err = {} if ref is None else {"rel_err": _rel_err(fn(*args).astype(jnp.float32), ref)}
            rows.append(_row(op, shape, impl, bench(jax.jit(fn), *args, iters=iters), flops, **err))
        except Exception as e:
            import traceback
            traceback.print_exc()
            rows.append(_error_row(op, shape, impl, e))

    for M, K, N in shapes:
        shape, flops = f"[{M},{K}]x[{K},{N}]", 2 * M * K * N
        xq = fp8.quantize(jax.random.normal(next(keys), (M, K), jnp.float32), fp8.TILE)
        wq = fp8.quantize(jax.random.normal(next(keys), (K, N), jnp.float32) * 0.02, fp8.WEIGHT)
        sw = fp8._cols(wq.scale, N)
        bt = jnp.asarray(wq.q.T)
        ref = _with_gemm_mode("emulate", fp8.chunked_dot, xq.q, xq.scale, wq.q, sw)
        variants = [(False, False, 4), (True, False, 4), (True, True, 4), (True, False, 3)]
        for b_block, overlap, steps in (variants if not quick else variants[-1:]):
            impl = f"mgpu s{steps}" + (" bblock" if b_block else "") + (" overlap" if overlap else "")
            kw = {"max_concurrent_steps": steps, "b_block": b_block, "overlap": overlap, "interpret": interpret}
            timed("FP8 block-scaled GEMM", shape, impl, flops,
                  functools.partial(mg.block_scaled_matmul_nk, out_dtype=jnp.bfloat16, **kw),
                  (xq.q, xq.scale, bt, sw), ref)
        a, b = fp8.dequantize(xq, fp8.TILE, jnp.bfloat16), fp8.dequantize(wq, fp8.WEIGHT, jnp.bfloat16)
        timed("GEMM bf16 (same shape)", shape, "xla", flops, lambda a, b: a @ b, (a, b))

    # Routed experts, balanced and 128-aligned: [T·k, d]·[E, d, f] and the Wgrad [T·k, d]ᵀ·[T·k, f] per expert.
    T, d, f, E, k = (8192, 2048, 1024, 64, 6) if not quick else (256, 256, 128, 4, 2)
    M = T * k
    sizes = jnp.full((E,), M // E, jnp.int32)
    xq, wq = fp8.quantize(jax.random.normal(next(keys), (M, d)), fp8.TILE), fp8.quantize(
        jax.random.normal(next(keys), (E, d, f)) * 0.02, fp8.WEIGHT)
    sw = fp8._cols(wq.scale, f)
    shape, flops = f"[{M},{d}]x[{E},{d},{f}]", 2 * M * d * f
    ref = _with_gemm_mode("emulate", fp8.grouped_chunked_dot, xq.q, xq.scale, wq.q, sw, sizes)
    for steps in (4, 3):
        timed("FP8 grouped GEMM (128-aligned groups)", shape, f"mgpu s{steps} bblock", flops,
              functools.partial(mg.block_scaled_grouped_matmul_nk, out_dtype=jnp.bfloat16, b_block=True,
                                max_concurrent_steps=steps, interpret=interpret),
              (xq.q, xq.scale, jnp.asarray(wq.q.transpose(0, 2, 1)), sw, sizes), ref)
    a, b = fp8.dequantize(xq, fp8.TILE, jnp.bfloat16), fp8.dequantize(wq, fp8.WEIGHT, jnp.bfloat16)
    impl = "tokamax" if tokamax() is not None else "xla"
    timed("grouped GEMM bf16 (same shape)", shape, impl, flops, lambda a, b, s: grouped_matmul(a, b, s, impl),
          (a, b, sizes))

    xc = fp8.quantize(jax.random.normal(next(keys), (M, d)), fp8.COL_TILE)
    gc = fp8.quantize(jax.random.normal(next(keys), (M, f)), fp8.COL_TILE)
    shape = f"[{M},{d}]T.[{M},{f}] /{E}"
    dn = jax.lax.RaggedDotDimensionNumbers(dot_dimension_numbers=(([0], [0]), ([], [])),
                                           lhs_ragged_dimensions=[0], rhs_group_dimensions=[])
    ref = jax.lax.ragged_dot_general(fp8.dequantize(xc, fp8.COL_TILE), fp8.dequantize(gc, fp8.COL_TILE), sizes, dn,
                                     precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
    timed("FP8 expert Wgrad (k-grouped, aligned)", shape, "mgpu s4", flops,
          functools.partial(mg.block_scaled_kgrouped_matmul_nk, interpret=interpret),
          (jnp.asarray(xc.q.T), xc.scale.T, jnp.asarray(gc.q.T), gc.scale, sizes), ref)
    xd, gd = fp8.dequantize(xc, fp8.COL_TILE, jnp.bfloat16), fp8.dequantize(gc, fp8.COL_TILE, jnp.bfloat16)

    def wgrad_bf16(x, g, s):
        return jax.vjp(lambda w: grouped_matmul(x, w, s, impl), jnp.zeros((E, d, f), jnp.bfloat16))[1](g)[0]

    timed("expert Wgrad bf16 (same shape)", shape, impl, flops, wgrad_bf16, (xd, gd, sizes))
    return rows


def mla_decode_rows(quick: bool, iters: int) -> list[dict]:
    """One decode step's attention over a full latent cache (T = 1, every slot visible) at the bench config's
    head shapes (H 16, kv_lora 512, rope 64; bf16): the absorbed path's XLA einsums (scores, f32 softmax,
    values) vs :func:`latent_decode_attention` at a few block sizes. Memory-bound: GB/s counts the cache bytes
    read once; ``err`` is the kernel's largest difference from the XLA result."""
    H, C, R = (16, 512, 64) if not quick else (4, 32, 16)
    shapes = [(B, S) for S in (1024, 4096) for B in (1, 32, 64)] if not quick else [(2, 40)]
    dtype = jnp.bfloat16 if not quick else jnp.float32  # XLA:CPU lacks some bf16 → f32 dots
    variants = ({"pallas bs64": {"block_s": 64}, "pallas bs32": {"block_s": 32},
                 "pallas bs128 1stage": {"block_s": 128, "num_stages": 1},
                 "pallas bs64 no-split": {"block_s": 64, "num_splits": 1}} if not quick
                else {"pallas bs16": {"block_s": 16}})
    interpret = not on_gpu()
    scale = (128 + 64) ** -0.5
    rows = []
    for B, S in shapes:
        key = jax.random.split(jax.random.key(3), 4)
        q_lat = jax.random.normal(key[0], (B, 1, H, C), dtype)
        q_rope = jax.random.normal(key[1], (B, 1, H, R), dtype)
        c_kv = jax.random.normal(key[2], (B, S, C), dtype)
        k_rope = jax.random.normal(key[3], (B, S, R), dtype)
        pos = jnp.full((B, 1), S - 1, jnp.int32)
        shape = f"B{B} S{S} H{H} c{C} r{R}"
        flops = 2 * B * H * S * (2 * C + R)
        gb = B * S * (C + R) * jnp.dtype(dtype).itemsize / 1e9

        def xla(ql, qr, c, kr, pos):
            slots = jnp.broadcast_to(jnp.arange(c.shape[1]), c.shape[:2])
            return latent_attention(ql, qr, c, kr, causal_mask(pos, slots), scale, ql.dtype)

        fns = {"xla": jax.jit(xla)}
        for name, v in variants.items():
            fns[name] = jax.jit(lambda ql, qr, c, kr, pos, v=v: latent_decode_attention(
                ql, qr, c, kr, pos, scale, interpret=interpret, **v))
        want = None
        for impl, fn in fns.items():
            try:
                out = fn(q_lat, q_rope, c_kv, k_rope, pos)
                if want is None:
                    want = out.astype(jnp.float32)
                err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - want)))
                t = bench(fn, q_lat, q_rope, c_kv, k_rope, pos, iters=iters)
                rows.append({"op": "MLA decode attention (latent)", "shape": shape, "impl": impl, "ms": t * 1e3,
                             "tflops": flops / t / 1e12, "gbps": gb / t, "err": err})
            except Exception as e:
                rows.append({"op": "MLA decode attention (latent)", "shape": shape, "impl": impl, "ms": float("nan"),
                             "tflops": float("nan"), "error": f"{type(e).__name__}: {str(e)[:300]}"})
    return rows


def fp8_quant_rows(quick: bool, iters: int) -> list[dict]:
    """Online quantisation of one activation into both tile forms (1×128 rows; 128×1 columns stored transposed,
    as the Wgrad kernels read them): XLA (two ``fp8.quantize`` + transpose) vs the fused Pallas kernel
    (dsv3_jax/kernels/fp8_quant.py). GB/s counts one read of x and the writes of both FP8 forms and scales."""
    from dsv3_jax.kernels import fp8_quant

    shapes = [(57344, 2048), (57344, 1024), (8192, 2048), (8192, 3072)] if not quick else [(256, 256)]
    rows = []
    for M, K in shapes:
        x = jax.random.normal(jax.random.key(M + K), (M, K), jnp.bfloat16)
        nbytes = M * K * (2 + 1 + 1) + 4 * (M * K // 128) * 2

        def xla(x):
            r, c = fp8.quantize(x, fp8.TILE), fp8.quantize(x, fp8.COL_TILE)
            return r.q, r.scale, c.q.T, c.scale

        fused = {f"pallas fused w{w}": jax.jit(functools.partial(fp8_quant.quantize_rows_and_cols, num_warps=w,
                                                                  interpret=not on_gpu())) for w in (2, 4, 8)}
        ref = jax.jit(xla)(x)
        for impl, fn in (("xla", jax.jit(xla)), *fused.items()):
            try:
                t = bench(fn, x, iters=iters)
                got = fn(x)
                err = max(float(jnp.mean(jnp.asarray(a, jnp.float32) != jnp.asarray(b, jnp.float32)))
                          for a, b in zip((got[0], got[2]), (ref[0], ref[2])))
                rows.append(dict(op="FP8 quantise rows+cols", shape=f"[{M},{K}] bf16", impl=impl, ms=t * 1e3,
                                 tflops=0.0, gbps=nbytes / t / 1e9, err=err))
            except Exception as e:  # keep the table going
                rows.append(_error_row("FP8 quantise rows+cols", f"[{M},{K}] bf16", impl, e))
    G, K, N = (64, 2048, 1024) if not quick else (2, 256, 128)
    w = jax.random.normal(jax.random.key(7), (G, K, N), jnp.float32)
    nbytes = G * K * N * (4 + 1 + 1)

    def xla_w(w):
        r = fp8.quantize(w, fp8.WEIGHT)
        return r.q, r.q.transpose(0, 2, 1), r.scale

    fused_w = {f"pallas fused w{nw}": jax.jit(functools.partial(fp8_quant.quantize_weight_blocks, num_warps=nw,
                                                                 interpret=not on_gpu())) for nw in (4, 8)}
    for impl, fn in (("xla", jax.jit(xla_w)), *fused_w.items()):
        try:
            t = bench(fn, w, iters=iters)
            rows.append(dict(op="FP8 quantise weight, both layouts", shape=f"[{G},{K},{N}] f32", impl=impl,
                             ms=t * 1e3, tflops=0.0, gbps=nbytes / t / 1e9,
                             err=float(jnp.mean(jnp.asarray(fn(w)[1], jnp.float32)
                                                != jnp.asarray(xla_w(w)[1], jnp.float32)))))
        except Exception as e:
            rows.append(_error_row("FP8 quantise weight, both layouts", f"[{G},{K},{N}] f32", impl, e))
    return rows


def bf16_mgpu_rows(quick: bool, iters: int) -> list[dict]:
    """The Hopper BF16 grouped GEMMs (dsv3_jax/kernels/bf16_gemm_mgpu.py) at the bench config's routed-expert
    shapes — gate/up [T·k, d]·[E, d, f] and down [T·k, f]·[E, f, d] on 128-aligned groups inside the static
    padded bound — forward, Dgrad and k-grouped Wgrad in their tile variants, next to tokamax ``ragged_dot`` and
    XLA's (forward, and their pullbacks for one operand: the same Dgrad / Wgrad work), then forward+backward
    through ``grouped_matmul`` (impl mgpu's custom VJP vs tokamax's). TFLOP/s count the routed rows only (not
    the padding). ``rel_err``: ‖kernel − XLA ragged_dot (FP32 out)‖ / ‖XLA‖."""
    from dsv3_jax.kernels import bf16_gemm_mgpu as bg

    interpret = not on_gpu()
    iters = 1 if interpret else iters
    T, d, f, E, k = (8192, 2048, 1024, 64, 6) if not quick else (128, 128, 128, 4, 2)
    C = T * k
    P = -(-(C + 127 * E) // 128) * 128  # moe.aligned_layout's static bound
    sizes = jnp.full((E,), C // E, jnp.int32)  # balanced routing: 768 rows per expert, already 128-aligned
    assert (C // E) % 128 == 0 or quick
    if quick:
        sizes = jnp.array([128, 0, 64 * 2, 0][:E], jnp.int32)
        C = int(sizes.sum())
    dn = jax.lax.RaggedDotDimensionNumbers(dot_dimension_numbers=(([0], [0]), ([], [])),
                                           lhs_ragged_dimensions=[0], rhs_group_dimensions=[])
    keys = iter(jax.random.split(jax.random.key(9), 16))
    impls = ["tokamax"] if tokamax() is not None else []
    rows = []

    def timed(op, shape, impl, flops, fn, args, ref=None, n_iters=iters):
        try:
            err = {} if ref is None else {"rel_err": _rel_err(jnp.asarray(fn(*args), jnp.float32), ref)}
            rows.append(_row(op, shape, impl, bench(jax.jit(fn), *args, iters=n_iters), flops, **err))
        except Exception as e:  # report, keep the table going
            import traceback
            traceback.print_exc()
            rows.append(_error_row(op, shape, impl, e))

    variants = [(128, 4), (128, 3), (64, 4)] if not quick else [(64, 2)]
    for name, K, N in (("gate/up", d, f), ("down", f, d)):
        x = jax.random.normal(next(keys), (P, K), jnp.bfloat16).at[C:].set(0)
        w = (jax.random.normal(next(keys), (E, K, N), jnp.float32) * 0.02).astype(jnp.bfloat16)
        dy = jax.random.normal(next(keys), (P, N), jnp.bfloat16).at[C:].set(0)
        flops = 2 * C * K * N
        fshape, gshape = f"[{P},{K}]x[{E},{K},{N}]", f"[{P},{K}]T.[{P},{N}] /{E}"
        xla_iters = max(1, min(iters, 2))  # XLA's ragged_dot runs at a few TFLOP/s here: few rounds
        ref_y = jax.jit(lambda a, b: jax.lax.ragged_dot(a, b, sizes, preferred_element_type=jnp.float32))(x, w)
        ref_dx = jax.jit(lambda g, b: jax.lax.ragged_dot(g, b.transpose(0, 2, 1), sizes,
                                                         preferred_element_type=jnp.float32))(dy, w)
        ref_dw = jax.jit(lambda a, g: jax.lax.ragged_dot_general(a, g, sizes, dn,
                                                                 preferred_element_type=jnp.float32))(x, dy)
        for tn, steps in variants:
            impl = f"mgpu n{2 * tn} s{steps}"
            kw = dict(tile_n=tn, max_concurrent_steps=steps, interpret=interpret)
            timed(f"BF16 grouped fwd {name}", fshape, impl, flops,
                  lambda a, b, kw=kw: bg.grouped_matmul(a, b, sizes, **kw), (x, w), ref_y)
            timed(f"BF16 grouped dgrad {name}", f"[{P},{N}]x[{E},{K},{N}]T", impl, flops,
                  lambda g, b, kw=kw: bg.grouped_matmul(g, b, sizes, transpose_b=True, **kw), (dy, w), ref_dx)
            timed(f"BF16 grouped wgrad {name}", gshape, impl, flops,
                  lambda a, g, kw=kw: bg.kgrouped_matmul(a, g, sizes, **kw), (x, dy), ref_dw)
        for impl in impls + ["xla"]:
            n_it = xla_iters if impl == "xla" else iters
            gm = functools.partial(grouped_matmul, impl=impl)
            timed(f"BF16 grouped fwd {name}", fshape, impl, flops, lambda a, b, gm=gm: gm(a, b, sizes), (x, w),
                  ref_y, n_it)
            timed(f"BF16 grouped dgrad {name}", f"[{P},{N}]x[{E},{K},{N}]T", impl, flops,
                  lambda g, a, b, gm=gm: jax.vjp(lambda a_: gm(a_, b, sizes), a)[1](g)[0], (dy, x, w), None, n_it)
            timed(f"BF16 grouped wgrad {name}", gshape, impl, flops,
                  lambda g, a, b, gm=gm: jax.vjp(lambda b_: gm(a, b_, sizes), b)[1](g)[0], (dy, x, w), None, n_it)
        for impl in ["mgpu"] + impls:
            def fb(a, b, g, impl=impl):
                y, pull = jax.vjp(lambda a_, b_: grouped_matmul(a_, b_, sizes, impl, aligned=True), a, b)
                return y, *pull(g)
            timed(f"BF16 grouped fwd+dgrad+wgrad {name}", fshape, impl, 3 * flops, fb, (x, w, dy))
    return rows


SECTIONS = {"dense": dense_rows, "grouped": grouped_gemm_rows, "attention": attention_rows,
            "fp8": fp8_block_scaled_rows, "fp8_sweep": fp8_sweep_rows, "fp8_mgpu": fp8_mgpu_rows,
            "fp8_quant": fp8_quant_rows, "mla_decode": mla_decode_rows, "bf16_mgpu": bf16_mgpu_rows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write results here")
    ap.add_argument("--quick", action="store_true", help="tiny shapes (CPU smoke test)")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--only", action="append", choices=sorted(SECTIONS), help="run these sections (repeatable)")
    a = ap.parse_args(argv)
    quick = a.quick or not on_gpu()
    rows = [r for name in (a.only or SECTIONS) for r in SECTIONS[name](quick, a.iters)]
    dev = jax.devices()[0]
    print(f"\ndevice: {dev.device_kind} ({jax.default_backend()}), jax {jax.__version__}, tokamax "
          f"{'yes' if tokamax() is not None else 'no ' + '; '.join(IMPORT_ERRORS)}")
    print(f"{'op':40s} {'impl':20s} {'shape':34s} {'ms':>9s} {'TFLOP/s':>8s}")
    for r in rows:
        print(f"{r['op']:40s} {r['impl']:20s} {r['shape']:34s} {r['ms']:9.3f} {r['tflops']:8.1f}"
              + (f"  rel_err {r['rel_err']:.1e}" if "rel_err" in r else "")
              + (f"  {r['gbps']:7.1f} GB/s  err {r['err']:.2e}" if "gbps" in r else "")
              + (f"  ERROR {r['error']}" if "error" in r else ""))
    if a.json:
        Path(a.json).write_text(json.dumps({"device": dev.device_kind, "jax": jax.__version__, "rows": rows},
                                           indent=1))
    return 0



if __name__ == "__main__":
    sys.exit(main())
