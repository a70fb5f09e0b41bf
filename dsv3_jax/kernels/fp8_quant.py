"""Fused FP8 (E4M3) quantisation of an activation or gradient for the three GEMMs of a Linear (Pallas, Triton).

Every FP8 GEMM operand of the training recipe is quantised online (REFERENCE §8): Fprop and Dgrad read an
activation (or output gradient) in 1×128 tiles along its channels, Wgrad reads the same tensor in 128×1 tiles
along its tokens, stored K-major (channels × tokens) for the Hopper kernels. XLA builds these as separate amax
reductions, divisions and transposes (several passes over the tensor); this kernel reads each 128×128 block
once and writes both forms::

    x      [M, K]  bf16/f32 (M tokens, K channels; both multiples of 128)
    → q    [M, K]  E4M3   s   [K/128, M] f32   rows:  x[m, c·128:(c+1)·128] ≈ q · s[c, m]
      qt   [K, M]  E4M3   st  [M/128, K] f32   cols:  x[t·128:(t+1)·128, k] ≈ qt[k, ...]ᵀ · st[t, k]

Weights (:func:`quantize_weight_blocks`) get one scale per 128×128 block and come back in both layouts the GEMMs
read: ``w [..., K, N]`` as stored (Dgrad contracts N) and ``wᵀ [..., N, K]`` (Fprop contracts K), again from one
read of the FP32 master weight.

Scales are ``max(amax, 1e-4) · (1/448)`` (:func:`linear_scale`) and values are clipped to ±448 before the cast,
as :func:`dsv3_jax.fp8.quantize` does (that function is the reference the tests hold this kernel to). Off the GPU
the kernel runs in Pallas' interpreter.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

BLOCK = 128
E4M3_MAX = 448.0
AMAX_FLOOR = 1e-4
# The scale is amax × (1/448) with the reciprocal rounded to float32 once, here: a single rounded multiply gives
# the same bits under every compiler. ``amax / 448`` does not: XLA rewrites a division by a constant into a
# multiply by its reciprocal in some fusions and not in others (jax 0.11 and 0.12 differ in which), so two paths
# that both wrote ``/ 448`` disagreed in the last bit of the scale.
INV_E4M3_MAX = np.float32(1.0 / E4M3_MAX)


def linear_scale(amax: jax.Array) -> jax.Array:
    """The dequantising scale of a tile or block: ``max(amax, 1e-4) · (1/448)`` in float32."""
    return jnp.maximum(amax.astype(jnp.float32), AMAX_FLOOR) * INV_E4M3_MAX


def _quant(x: jax.Array, amax: jax.Array, out_dtype) -> tuple[jax.Array, jax.Array]:
    s = linear_scale(amax)
    return jnp.clip(x / s, -E4M3_MAX, E4M3_MAX).astype(out_dtype), s


def _kernel(x_ref, q_ref, s_ref, qt_ref, st_ref):
    x = x_ref[...].astype(jnp.float32)  # [128 tokens, 128 channels]
    a = jnp.abs(x)
    q, s = _quant(x, jnp.max(a, axis=1, keepdims=True), q_ref.dtype)  # per token over 128 channels
    q_ref[...] = q
    s_ref[...] = s.reshape(1, BLOCK)
    xt = x.T  # [128 channels, 128 tokens]
    qt, st = _quant(xt, jnp.max(jnp.abs(xt), axis=1, keepdims=True), qt_ref.dtype)  # per channel over tokens
    qt_ref[...] = qt
    st_ref[...] = st.reshape(1, BLOCK)


def supported(x: jax.Array, ndim: int = 2) -> bool:
    """Shapes and dtypes the kernels take: an ``ndim``-D bf16/f32 array whose last two dims are multiples of 128."""
    return (x.ndim == ndim and x.shape[-2] % BLOCK == 0 and x.shape[-1] % BLOCK == 0
            and x.dtype in (jnp.bfloat16, jnp.float32))


@functools.partial(jax.jit, static_argnames=("q_dtype", "num_warps", "interpret"))
def quantize_rows_and_cols(x: jax.Array, q_dtype=jnp.float8_e4m3fn, *, num_warps: int = 4,
                           interpret: bool = False) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """x [M, K] → (q [M, K], s [K/128, M], qt [K, M], st [M/128, K]): see the module docstring."""
    if not supported(x):
        raise ValueError(f"fused FP8 quantisation needs a 2-D bf16/f32 array with both dims multiples of "
                         f"{BLOCK}, got {x.dtype} {x.shape}")
    M, K = x.shape
    Mb, Kb = M // BLOCK, K // BLOCK
    blk = (BLOCK, BLOCK)
    return pl.pallas_call(
        _kernel,
        grid=(Mb, Kb),
        in_specs=[pl.BlockSpec(blk, lambda i, j: (i, j))],
        out_specs=[
            pl.BlockSpec(blk, lambda i, j: (i, j)),
            pl.BlockSpec((1, BLOCK), lambda i, j: (j, i)),
            pl.BlockSpec(blk, lambda i, j: (j, i)),
            pl.BlockSpec((1, BLOCK), lambda i, j: (i, j)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((M, K), q_dtype),
            jax.ShapeDtypeStruct((Kb, M), jnp.float32),
            jax.ShapeDtypeStruct((K, M), q_dtype),
            jax.ShapeDtypeStruct((Mb, K), jnp.float32),
        ],
        interpret=interpret,
        compiler_params=None if interpret else plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        name="fp8_quantize_rows_and_cols",
    )(x)


def _weight_kernel(w_ref, *out_refs):
    *q_ref, qt_ref, s_ref = out_refs  # q_ref: [] when only the transposed layout is asked for
    w = w_ref[...].astype(jnp.float32)  # one [128, 128] block
    amax = jnp.max(jnp.max(jnp.abs(w), axis=1, keepdims=True), axis=0, keepdims=True)  # [1, 1]
    q, s = _quant(w, amax, qt_ref.dtype)
    if q_ref:
        q_ref[0][...] = q
    qt_ref[...] = jnp.clip(w.T / s, -E4M3_MAX, E4M3_MAX).astype(qt_ref.dtype)
    s_ref[...] = s


@functools.partial(jax.jit, static_argnames=("q_dtype", "transposed_only", "num_warps", "interpret"))
def quantize_weight_blocks(w: jax.Array, q_dtype=jnp.float8_e4m3fn, *, transposed_only: bool = False,
                           num_warps: int = 4, interpret: bool = False) -> tuple[jax.Array, ...]:
    """w [G, K, N] (f32/bf16, K and N multiples of 128) → (q [G, K, N], qt [G, N, K], scale [G, K/128, N/128]):
    128×128 blocks, ``w ≈ q · scale[block]`` and ``wᵀ ≈ qt · scaleᵀ[block]``. ``transposed_only``: (qt, scale)."""
    if not supported(w, 3):
        raise ValueError(f"fused FP8 weight quantisation needs a [G, K, N] bf16/f32 array with K and N multiples "
                         f"of {BLOCK}, got {w.dtype} {w.shape}")
    G, K, N = w.shape
    Kb, Nb = K // BLOCK, N // BLOCK
    blk = (None, BLOCK, BLOCK)
    return pl.pallas_call(
        _weight_kernel,
        grid=(G, Kb, Nb),
        in_specs=[pl.BlockSpec(blk, lambda g, i, j: (g, i, j))],
        out_specs=[
            *([] if transposed_only else [pl.BlockSpec(blk, lambda g, i, j: (g, i, j))]),
            pl.BlockSpec(blk, lambda g, i, j: (g, j, i)),
            pl.BlockSpec((None, 1, 1), lambda g, i, j: (g, i, j)),
        ],
        out_shape=[
            *([] if transposed_only else [jax.ShapeDtypeStruct((G, K, N), q_dtype)]),
            jax.ShapeDtypeStruct((G, N, K), q_dtype),
            jax.ShapeDtypeStruct((G, Kb, Nb), jnp.float32),
        ],
        interpret=interpret,
        compiler_params=None if interpret else plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        name="fp8_quantize_weight_blocks",
    )(w)
