"""FP8 (E4M3) fine-grained scaling (REFERENCE §8): the checkpoint format, and the training recipe's numerics.

NumPy, for checkpoints: weights carry one float32 scale per 128×128 block, stored as ``weight_scale_inv`` (the
multiplier that dequantises): ``W = W_fp8[block] · scale_inv[block]``, grid ``[ceil(out/128), ceil(in/128)]``
with partial edge blocks (:func:`quantize_blocks`, :func:`dequantize_blocks`).

JAX, for the model: online quantisers for any tile shape (:func:`quantize`), the DeepGEMM-style GEMM with FP32
promotion every 128 of K (:func:`chunked_dot`), and the Linear / expert GEMMs whose forward *and* backward
run in FP8 (:func:`fp8_dot`, :func:`fp8_grouped_matmul`, both ``jax.custom_vjp``). These are exact CPU
references; fast GPU kernels plug in behind the same functions (:func:`gemm_mode`: ``DSV3_FP8_GEMM=pallas``
runs the block-scaled Pallas/Triton kernels of :mod:`dsv3_jax.kernels.fp8_gemm`; ``mgpu``, the default on Hopper,
the WGMMA kernels of :mod:`dsv3_jax.kernels.fp8_gemm_mgpu` fed by the fused quantisers of
:mod:`dsv3_jax.kernels.fp8_quant`: :func:`quantize_both`, :func:`quantize_weight`).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import os
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from dsv3_jax import tokens
from dsv3_jax.kernels import fp8_gemm_mgpu as mgpu
from dsv3_jax.kernels import fp8_quant, grouped_matmul
from dsv3_jax.kernels._backend import on_gpu
from dsv3_jax.kernels.fp8_gemm import block_scaled_grouped_matmul, block_scaled_kgrouped_matmul, block_scaled_matmul

E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
E4M3_MAX = float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)  # 448
BLOCK = 128


def block_grid(shape: tuple[int, int], block: int = BLOCK) -> tuple[int, int]:
    """Scale-grid shape for a [rows, cols] weight: ceil on both dims (edge blocks are partial)."""
    return math.ceil(shape[0] / block), math.ceil(shape[1] / block)


def expand_blocks(scale: np.ndarray, shape: tuple[int, int], block: int = BLOCK) -> np.ndarray:
    """Broadcast a block grid [ceil(r/b), ceil(c/b)] to a full [r, c] array (edge blocks cropped)."""
    return np.repeat(np.repeat(scale, block, axis=0), block, axis=1)[: shape[0], : shape[1]]


def dequantize_blocks(w_fp8: np.ndarray, scale_inv: np.ndarray, block: int = BLOCK,
                      dtype: np.dtype = np.float32) -> np.ndarray:
    """float8 [r, c] and float32 scale_inv [ceil(r/b), ceil(c/b)] → ``dtype`` [r, c]."""
    if w_fp8.ndim != 2:
        raise ValueError(f"FP8 block dequantisation expects a 2-D weight, got shape {w_fp8.shape}")
    want = block_grid(w_fp8.shape, block)
    if tuple(scale_inv.shape) != want:
        raise ValueError(f"weight_scale_inv has shape {tuple(scale_inv.shape)}; a {w_fp8.shape} weight with "
                         f"{block}×{block} blocks needs {want} (ceil on both dims)")
    out = w_fp8.astype(np.float32) * expand_blocks(scale_inv.astype(np.float32), w_fp8.shape, block)
    return out.astype(dtype)


def quantize_blocks(w: np.ndarray, block: int = BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """[r, c] → (float8_e4m3fn [r, c], scale_inv float32 grid) with ``scale = amax(block) / 448``."""
    w = np.asarray(w, np.float32)
    gr, gc = block_grid(w.shape, block)
    padded = np.zeros((gr * block, gc * block), np.float32)
    padded[: w.shape[0], : w.shape[1]] = w  # zero padding: edge blocks' amax over the real values only
    amax = np.abs(padded.reshape(gr, block, gc, block)).max(axis=(1, 3))
    scale = np.where(amax > 0, amax / E4M3_MAX, 1.0).astype(np.float32)
    q = (w / expand_blocks(scale, w.shape, block)).astype(E4M3)
    return q, scale


# ----------------------------------------------------------------------------------------------------------
# JAX: the training recipe's online quantisers and FP8 GEMMs (REFERENCE §8, TR §3.3)
# ----------------------------------------------------------------------------------------------------------
# Tiles and blocks are over the last two dims [R, C] of an array:
#   TILE     (1, 128): activations and output grads, per row (token) per 128 channels of the contraction dim;
#   COL_TILE (128, 1): the same along the token dim — the operands of Wgrad, which contracts tokens;
#   WEIGHT   (128, 128): weights, as the checkpoint stores them (one grid serves W and Wᵀ).
# The GEMMs emulate DeepGEMM: FP8 products of one 128-wide K chunk are summed, the partial sum is multiplied by
# the chunk's two scales and promoted into an FP32 accumulator (N_C = 128). Within a chunk we sum in full FP32;
# Hopper's tensor cores keep ~14 bits there, the GPU kernel's concern, not this reference.

TILE = (1, BLOCK)
COL_TILE = (BLOCK, 1)
WEIGHT = (BLOCK, BLOCK)
AMAX_FLOOR = fp8_quant.AMAX_FLOOR  # the official kernels' floor: an all-zero tile still gets a finite scale
E4M3_JNP = jnp.float8_e4m3fn  # tests swap in float32 to check the plumbing with a lossless cast


class Quantized(NamedTuple):
    """E4M3 values ``q`` [..., R, C] and float32 ``scale`` [..., ceil(R/br), ceil(C/bc)]; ``x ≈ q · scale``.

    ``scale`` is the dequantising multiplier (the checkpoint's ``weight_scale_inv``) of each [br, bc] block.
    """

    q: jax.Array
    scale: jax.Array

    @property
    def shape(self) -> tuple[int, ...]:
        return self.q.shape


def fp8_scale(amax: jax.Array, pow2: bool = False) -> jax.Array:
    """``max(amax, 1e-4) · (1/448)`` (:func:`fp8_quant.linear_scale`, shared with the fused kernels so both give
    the same bits); ``pow2`` rounds up to a power of two (UE8M0 scales, V3.1+ kernels)."""
    s = fp8_quant.linear_scale(amax)
    if pow2:
        m, e = jnp.frexp(s)  # s = m · 2^e with m in [0.5, 1): exact, unlike ceil(log2(s))
        s = jnp.ldexp(jnp.ones_like(s), jnp.where(m == 0.5, e - 1, e))
    return s


def _pad_last2(x: jax.Array, rows: int, cols: int) -> jax.Array:
    R, C = x.shape[-2:]
    return jnp.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, rows - R), (0, cols - C)])


def expand_scale(scale: jax.Array, block: tuple[int, int], shape: tuple[int, int]) -> jax.Array:
    """Block grid [..., Rb, Cb] → per element [..., R, C] (edge blocks cropped)."""
    s = jnp.repeat(jnp.repeat(scale, block[0], axis=-2), block[1], axis=-1)
    return s[..., : shape[0], : shape[1]]


def quantize(x: jax.Array, block: tuple[int, int] = TILE, pow2: bool = False) -> Quantized:
    """Quantise the last two dims [R, C] of ``x`` to E4M3 with one online scale per ``block`` (:func:`fp8_scale`).

    R and C need not be multiples of the block: edges are zero-padded for the amax and cropped after.
    """
    if x.ndim < 2:
        raise ValueError(f"fp8.quantize needs at least 2 dims [..., R, C], got shape {x.shape}")
    R, C = x.shape[-2:]
    br, bc = block
    Rb, Cb = -(-R // br), -(-C // bc)
    xp = _pad_last2(x.astype(jnp.float32), Rb * br, Cb * bc)
    blocks = xp.reshape(*x.shape[:-2], Rb, br, Cb, bc)
    scale = fp8_scale(jnp.abs(blocks).max(axis=(-3, -1)), pow2)  # [..., Rb, Cb]
    # amax / (amax / 448) can round a hair above 448, and E4M3 has no inf: clip before the cast (NaN otherwise).
    q = jnp.clip(blocks / scale[..., :, None, :, None], -E4M3_MAX, E4M3_MAX).astype(E4M3_JNP)
    return Quantized(q.reshape(xp.shape)[..., :R, :C], scale)


def dequantize(x: Quantized, block: tuple[int, int] = TILE, dtype: jnp.dtype = jnp.float32) -> jax.Array:
    """``q · scale`` per block → ``dtype`` [..., R, C]."""
    s = expand_scale(x.scale, block, x.q.shape[-2:])
    return (x.q.astype(jnp.float32) * s).astype(dtype)


def quantize_both(x: jax.Array, pow2: bool = False) -> tuple[Quantized, Quantized]:
    """An activation or gradient x [M, K] in the two forms its GEMMs read (M tokens, K channels):

    rows: 1×128 tiles along K (Fprop, Dgrad) — ``Quantized(q [M, K], scale [M, ceil(K/128)])``;
    cols: 128×1 tiles along M (Wgrad), stored transposed (K-major, as the Hopper kernels read it) —
    ``Quantized(q [K, M] = the quantised xᵀ, scale [ceil(M/128), K])``.

    Under ``mgpu`` (and linear scales, both dims multiples of 128) one fused kernel reads x once and writes
    both (:mod:`dsv3_jax.kernels.fp8_quant`); otherwise two :func:`quantize` calls. Same values either way.
    """
    if gemm_mode() == "mgpu" and not pow2 and fp8_quant.supported(x):
        q, s, qt, st = fp8_quant.quantize_rows_and_cols(x, E4M3_JNP, interpret=not on_gpu())
        return Quantized(q, s.T), Quantized(qt, st)
    rows, cols = quantize(x, TILE, pow2), quantize(x, COL_TILE, pow2)
    return rows, Quantized(jnp.swapaxes(cols.q, -1, -2), cols.scale)


def quantize_weight(w: jax.Array, pow2: bool = False) -> tuple[Quantized, jax.Array]:
    """A weight w [..., K, N] in 128×128 blocks, in both layouts its GEMMs read: (``Quantized(q [..., K, N],
    scale [..., K/128, N/128])`` (Dgrad), qt [..., N, K] = qᵀ (Fprop, K-major)).

    Under ``mgpu`` (linear scales, K and N multiples of 128) one fused kernel reads the FP32 master weight once
    and writes both (:func:`dsv3_jax.kernels.fp8_quant.quantize_weight_blocks`); otherwise :func:`quantize` and
    a transpose. Same values either way. ``DSV3_FP8_WEIGHT_KERNEL=0`` keeps XLA here (for A/B timing: inside the
    layer scan the kernel costs a copy of each weight slice, and still wins; BENCHMARKS.md).
    """
    q, qt, scale = _weight_blocks(w, pow2, transposed_only=False)
    return Quantized(q, scale), qt


def _weight_blocks(w: jax.Array, pow2: bool, transposed_only: bool) -> tuple[jax.Array | None, jax.Array, jax.Array]:
    """w [..., K, N] → (q [..., K, N] or None if ``transposed_only``, qt [..., N, K], scale [..., K/128, N/128])."""
    lead = w.shape[:-2]
    w3 = w.reshape(-1, *w.shape[-2:])
    if (os.environ.get("DSV3_FP8_WEIGHT_KERNEL", "1") == "1" and gemm_mode() == "mgpu" and not pow2
            and fp8_quant.supported(w3, 3)):
        *q, qt, scale = fp8_quant.quantize_weight_blocks(w3, E4M3_JNP, transposed_only=transposed_only,
                                                         interpret=not on_gpu())
        q = q[0].reshape(w.shape) if q else None
    else:
        wq = quantize(w3, WEIGHT, pow2)
        q, qt, scale = (None if transposed_only else wq.q.reshape(w.shape)), jnp.swapaxes(wq.q, -1, -2), wq.scale
    return q, qt.reshape(*lead, *qt.shape[1:]), scale.reshape(*lead, *scale.shape[1:])


class Prequantized(NamedTuple):
    """A master weight with its E4M3 blocks computed ahead, once per train step outside the layer scan
    (:func:`prequantize_experts`): ``w`` [..., K, N] (FP32; its gradient flows through the FP8 GEMMs as usual),
    ``q_t`` [..., N, K] (the Fprop layout, = ``quantize_weight(w)[1]``), ``scale`` [..., K/128, N/128].

    ``w`` comes first: Flax's apply-time shape check compares a param's first leaf with its declared shape."""

    w: jax.Array
    q_t: jax.Array
    scale: jax.Array

    @property
    def shape(self) -> tuple[int, ...]:
        return self.w.shape


EXPERT_WEIGHTS = ("gate_proj", "up_proj", "down_proj")  # MoE's routed-expert params, [..., E, in, out]


def expert_leaf(path, w) -> bool:
    """Whether a params-tree leaf is a routed-expert weight (stacked [L, E, in, out] or [E, in, out])."""
    key = getattr(path[-1], "key", None)
    return key in EXPERT_WEIGHTS and getattr(w, "ndim", 0) >= 3  # a dense MLP's are {"kernel": ...} dicts


def prequantize_experts(params, pow2: bool = False) -> dict:
    """{tree path: Quantized(q_t, scale)} for every routed-expert weight of ``params`` (stacked [L, E, K, N] or
    [E, K, N]), gradient-free. Done once per train step outside the layer scan, so the FP8 GEMMs read ready E4M3
    weights: inside the scan each layer would quantise its slice twice (forward and rematerialised forward),
    and a Pallas quantiser there costs a copy of the FP32 slice first (BENCHMARKS.md). Costs one byte per
    expert parameter while the step runs."""
    out = {}
    for path, w in jax.tree_util.tree_leaves_with_path(params):
        if expert_leaf(path, w):
            # gradient-free (and the Pallas kernel has no JVP to trace)
            _, qt, scale = _weight_blocks(jax.lax.stop_gradient(w), pow2, transposed_only=True)
            out[path] = Quantized(qt, scale)
    return out


def with_prequantized(params, pre: dict):
    """``params`` with each leaf that :func:`prequantize_experts` covered replaced by a :class:`Prequantized`."""
    return jax.tree_util.tree_map_with_path(lambda p, w: Prequantized(w, *pre[p]) if p in pre else w, params)


def _untransposed(cols_t: Quantized) -> Quantized:
    """:func:`quantize_both`'s transposed column form → the plain ``quantize(x, COL_TILE)`` form."""
    return Quantized(jnp.swapaxes(cols_t.q, -1, -2), cols_t.scale)


GEMM_MODES = ("auto", "emulate", "dequant", "pallas", "mgpu")


def gemm_mode() -> str:
    """How the FP8 GEMMs run, from ``DSV3_FP8_GEMM`` (read at every call, nothing cached; default ``auto``):

    ``emulate`` the exact per-chunk reference (XLA); ``dequant`` see :func:`dequant_gemm`; ``pallas`` the
    block-scaled Pallas/Triton kernels of :mod:`dsv3_jax.kernels.fp8_gemm`; ``mgpu`` the Hopper WGMMA kernels
    of :mod:`dsv3_jax.kernels.fp8_gemm_mgpu` (the fast path: FP8 tensor cores, TMA; expert GEMMs need the
    128-aligned groups :func:`dsv3_jax.moe.dispatch_ragged` builds in this mode, other grouped calls fall back
    to ``dequant``). ``pallas`` and ``mgpu`` have the math of ``emulate`` and run in interpret mode off-GPU (for
    the tests). ``auto`` is ``mgpu`` on a Hopper GPU, ``dequant`` on other GPUs, ``emulate`` elsewhere.
    """
    mode = os.environ.get("DSV3_FP8_GEMM", "auto")
    if mode not in GEMM_MODES:
        raise ValueError(f"DSV3_FP8_GEMM={mode!r}: expected one of {', '.join(GEMM_MODES)}")
    if mode == "auto":
        return ("mgpu" if _hopper() else "dequant") if on_gpu() else "emulate"
    return mode


@functools.cache
def _hopper() -> bool:
    return getattr(jax.devices()[0], "compute_capability", "") == "9.0"


def aligned_groups() -> bool:
    """Whether MoE dispatch should pad each expert's rows to a multiple of 128 for the FP8 GEMMs (``mgpu``)."""
    return gemm_mode() == "mgpu"


def _pallas_gemm() -> bool:
    return gemm_mode() == "pallas"


def dequant_gemm() -> bool:
    """Whether the FP8 GEMMs run as "dequantise the FP8 tiles to BF16, one BF16 tensor-core GEMM with FP32
    accumulation" (``DSV3_FP8_GEMM=dequant``; the default on non-Hopper GPUs, see :func:`gemm_mode`).

    Same quantisation error as the recipe (the dominant one); the sum runs in FP32 over all of K at once
    (at least as accurate as promotion every 128), and a non-power-of-two scale adds one BF16 rounding of each
    dequantised operand (2⁻⁹ relative, next to E4M3's 2⁻⁴). BF16 GEMM speed plus the quantisation passes.
    """
    return gemm_mode() == "dequant"


def _dequant_operands(a_q, a_scale, b_q, b_scale):
    """(a [M, K], b [..., K, N]) in BF16 from FP8 tiles: a per row per K chunk, b per K chunk per column."""
    K = a_q.shape[1]
    a = a_q.astype(jnp.float32) * jnp.repeat(a_scale, BLOCK, axis=-1)[:, :K]
    b = b_q.astype(jnp.float32) * jnp.repeat(b_scale, BLOCK, axis=-2)[..., :K, :]
    return a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)


def chunked_dot(a_q: jax.Array, a_scale: jax.Array, b_q: jax.Array, b_scale: jax.Array,
                b_block: bool = False, out_dtype: jnp.dtype = jnp.float32, stored_b: bool = False) -> jax.Array:
    """FP8 GEMM with FP32 promotion every 128 of K (the DeepGEMM math). → float32 [M, N].

    a_q [M, K] with a_scale [M, ceil(K/128)] (one per row per K chunk); b_q [K, N] with b_scale
    [ceil(K/128), N] (one per K chunk per column). ``y = Σ_c (a_q[:, c] · b_q[c, :]) · a_scale[:, c] ⊗ b_scale[c]``,
    summed chunk after chunk in FP32. Fprop, Dgrad and Wgrad are all this shape (see :func:`fp8_matmul`).
    ``b_block``: b_scale is constant over 128-column blocks (a weight's 128×128 blocks; a kernel hint).
    ``out_dtype``: what the FP32 result is rounded to (the ``mgpu`` kernel writes it directly). ``stored_b``:
    b is a served FP8 checkpoint's weight (decode-sized calls): ``mgpu`` would transpose the whole weight to
    K-major on every call, so these run as ``dequant``.
    """
    M, K = a_q.shape
    N = b_q.shape[1]
    Kb = -(-K // BLOCK)
    assert a_scale.shape == (M, Kb) and b_scale.shape == (Kb, N), (a_scale.shape, b_scale.shape, M, K, N)
    if gemm_mode() == "mgpu" and not stored_b:  # B K-major: b_q.T (XLA folds it into the producer, or cancels)
        return mgpu.block_scaled_matmul_nk(a_q, a_scale, b_q.T, b_scale, out_dtype, b_block=b_block,
                                           interpret=not on_gpu())
    return _chunked_dot_f32(a_q, a_scale, b_q, b_scale).astype(out_dtype)


def _chunked_dot_f32(a_q: jax.Array, a_scale: jax.Array, b_q: jax.Array, b_scale: jax.Array) -> jax.Array:
    M, K = a_q.shape
    N = b_q.shape[1]
    Kb = -(-K // BLOCK)
    if _pallas_gemm():
        return block_scaled_matmul(a_q, a_scale, b_q, b_scale, jnp.float32, interpret=not on_gpu())
    if gemm_mode() in ("dequant", "mgpu"):  # mgpu here: a served weight (see chunked_dot)
        a, b = _dequant_operands(a_q, a_scale, b_q, b_scale)
        return jnp.dot(a, b, preferred_element_type=jnp.float32)
    a = _pad_last2(a_q.astype(jnp.float32), M, Kb * BLOCK).reshape(M, Kb, BLOCK).transpose(1, 0, 2)
    b = jnp.pad(b_q.astype(jnp.float32), ((0, Kb * BLOCK - K), (0, 0))).reshape(Kb, BLOCK, N)

    def step(acc, chunk):
        a_c, b_c, sa, sb = chunk  # [M, 128], [128, N], [M], [N]
        part = jnp.dot(a_c, b_c, precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
        return acc + part * (sa[:, None] * sb[None, :]), None

    return _over_chunks(step, jnp.zeros((M, N), jnp.float32), (a, b, a_scale.T, b_scale))


def _over_chunks(step, acc: jax.Array, chunks: tuple[jax.Array, ...]) -> jax.Array:
    """Fold ``step`` over the leading (K-chunk) axis in order: a scan (memory [M, N]), or one call for one chunk."""
    if chunks[0].shape[0] == 1:
        return step(acc, tuple(c[0] for c in chunks))[0]
    return jax.lax.scan(step, acc, chunks)[0]


def group_ids(group_sizes: jax.Array, rows: int) -> jax.Array:
    """Group of each of ``rows`` contiguous rows [rows] int32 (rows past the sum get the last group)."""
    # compare_all: one fused compare against the G group ends; the default binary search runs as a loop of tiny
    # kernels on a GPU (~log2 G launches and state copies per call, several calls per MoE layer and pass)
    ids = jnp.searchsorted(jnp.cumsum(group_sizes), jnp.arange(rows), side="right", method="compare_all")
    return jnp.minimum(ids, group_sizes.shape[0] - 1).astype(jnp.int32)


def grouped_chunked_dot(a_q: jax.Array, a_scale: jax.Array, b_q: jax.Array, b_scale: jax.Array,
                        group_sizes: jax.Array, aligned: bool = False, out_dtype: jnp.dtype = jnp.float32
                        ) -> jax.Array:
    """:func:`chunked_dot` with one right operand per contiguous row group (MoE experts). → float32 [M, N].

    a_q [M, K], a_scale [M, ceil(K/128)]; b_q [G, K, N], b_scale [G, ceil(K/128), N] (128×128 weight blocks
    expanded to columns); group_sizes [G]. Rows past ``sum(group_sizes)`` come out zero. ``aligned``: every
    group size and M are multiples of 128 and rows past the sum are zero (the ``mgpu`` kernel's layout).
    """
    M, K = a_q.shape
    G, _, N = b_q.shape
    Kb = -(-K // BLOCK)
    assert a_scale.shape == (M, Kb) and b_scale.shape == (G, Kb, N), (a_scale.shape, b_scale.shape)
    mode = gemm_mode()
    if mode == "mgpu" and aligned:
        return mgpu.block_scaled_grouped_matmul_nk(a_q, a_scale, b_q.transpose(0, 2, 1), b_scale, group_sizes,
                                                   out_dtype, b_block=True, interpret=not on_gpu())
    return _grouped_chunked_dot_f32(a_q, a_scale, b_q, b_scale, group_sizes, mode).astype(out_dtype)


def _grouped_chunked_dot_f32(a_q, a_scale, b_q, b_scale, group_sizes, mode):
    M, K = a_q.shape
    G, _, N = b_q.shape
    Kb = -(-K // BLOCK)
    if mode == "pallas":
        return block_scaled_grouped_matmul(a_q, a_scale, b_q, b_scale, group_sizes, jnp.float32,
                                           interpret=not on_gpu())
    if mode in ("dequant", "mgpu"):  # mgpu without aligned groups: dequant
        a, b = _dequant_operands(a_q, a_scale, b_q, b_scale)
        y = grouped_matmul(a, b, group_sizes.astype(jnp.int32)).astype(jnp.float32)  # BF16 out, as BF16 runs
        return jnp.where((jnp.arange(M) < jnp.sum(group_sizes))[:, None], y, 0.0)
    a = _pad_last2(a_q.astype(jnp.float32), M, Kb * BLOCK).reshape(M, Kb, BLOCK).transpose(1, 0, 2)
    b = jnp.pad(b_q.astype(jnp.float32), ((0, 0), (0, Kb * BLOCK - K), (0, 0)))
    b = b.reshape(G, Kb, BLOCK, N).transpose(1, 0, 2, 3)  # [Kb, G, 128, N]
    gid = group_ids(group_sizes, M)
    sizes = group_sizes.astype(jnp.int32)

    def step(acc, chunk):
        a_c, b_c, sa, sb = chunk  # [M, 128], [G, 128, N], [M], [G, N]
        part = jax.lax.ragged_dot(a_c, b_c, sizes, precision=jax.lax.Precision.HIGHEST,
                                  preferred_element_type=jnp.float32)
        return acc + part * (sa[:, None] * jnp.take(sb, gid, axis=0)), None

    return _over_chunks(step, jnp.zeros((M, N), jnp.float32), (a, b, a_scale.T, b_scale.transpose(1, 0, 2)))


def _cols(scale: jax.Array, n: int) -> jax.Array:
    """Weight block scales [..., Kb, Nb] → per K chunk per column [..., Kb, n]."""
    return jnp.repeat(scale, BLOCK, axis=-1)[..., :n]


class _Spec(NamedTuple):
    """Static (hashable) settings of one FP8 GEMM: scale format and the dtypes to hand back."""

    pow2: bool
    out_dtype: jnp.dtype
    x_dtype: jnp.dtype
    w_dtype: jnp.dtype
    aligned: bool = False  # grouped: 128-aligned groups (see grouped_chunked_dot)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _fp8_matmul(x: jax.Array, w: jax.Array, spec: _Spec) -> jax.Array:
    return _fp8_matmul_fwd(x, w, spec)[0]


def _fp8_matmul_fwd(x, w, spec):
    N = w.shape[1]
    (xq, x_cols_t), (wq, wq_t) = quantize_both(x, spec.pow2), quantize_weight(w, spec.pow2)
    y = chunked_dot(xq.q, xq.scale, wq_t.T, _cols(wq.scale, N), True, spec.out_dtype)  # Fprop: x tiles along K
    # Wgrad is the only backward use of x, and it contracts tokens: cache x quantised along tokens, in FP8,
    # instead of x itself (REFERENCE §8: activations saved for backward in FP8).
    return y, (x_cols_t, wq)


def _fp8_matmul_bwd(spec, res, dy):
    x_cols_t, wq = res
    K = wq.q.shape[0]
    # Dgrad dx [M, K] = dy [M, N] · Wᵀ: contracts N → dy in 1×128 tiles along N; W's 128×128 blocks, transposed.
    # Wgrad dW [K, N] = xᵀ · dy: contracts tokens M → both operands in tiles of 128 tokens (per channel).
    dy_row, dy_cols_t = quantize_both(dy, spec.pow2)
    dx = chunked_dot(dy_row.q, dy_row.scale, wq.q.T, _cols(wq.scale.T, K), True, spec.x_dtype)
    dw = chunked_dot(x_cols_t.q, x_cols_t.scale.T, dy_cols_t.q.T, dy_cols_t.scale, out_dtype=spec.w_dtype)
    return dx, dw


_fp8_matmul.defvjp(_fp8_matmul_fwd, _fp8_matmul_bwd)


# A parallel strategy (sharding/partition.py) may run the token-parallel FP8 GEMMs per device: the Hopper kernels
# are Pallas calls with no SPMD rule, so under a mesh XLA would gather their operands onto every device.
_TOKEN_MAP: contextvars.ContextVar[Callable | None] = contextvars.ContextVar("fp8_token_map", default=None)


@contextlib.contextmanager
def token_map_override(fn: Callable | None):
    """While active, :func:`fp8_matmul` on the Hopper kernels runs as ``fn(f, x, w)``: ``f(x, w)`` on each device's
    rows of x [M, K] (tokens) with the whole w — e.g. a ``shard_map`` over the batch axes."""
    token = _TOKEN_MAP.set(fn)
    try:
        yield
    finally:
        _TOKEN_MAP.reset(token)


def fp8_matmul(x: jax.Array, w: jax.Array, pow2: bool = False, out_dtype: jnp.dtype | None = None) -> jax.Array:
    """x [M, K] · w [K, N] → [M, N] (``out_dtype``, default x's) with all three GEMMs in FP8 (TR §3.3).

    Fprop ``x·W``: x per 1×128 tile along K, W per 128×128 block. Dgrad ``dy·Wᵀ``: dy per 1×128 tile along N,
    the same W blocks. Wgrad ``xᵀ·dy``: x and dy per 128×1 tile along tokens. FP32 accumulation, promoted every
    128 of K. Gradients come back in x's and w's dtypes (w may be the FP32 master weight: quantised directly).
    """
    spec = _Spec(pow2, jnp.dtype(out_dtype or x.dtype), jnp.dtype(x.dtype), jnp.dtype(w.dtype))
    token_map = _TOKEN_MAP.get()
    if token_map is not None and gemm_mode() == "mgpu":
        return token_map(lambda x, w: _fp8_matmul(x, w, spec), x, w)
    return _fp8_matmul(x, w, spec)


def _flatten(x: jax.Array, w_shape: tuple[int, ...], in_dims: int) -> tuple[jax.Array, int, int]:
    K = math.prod(w_shape[:in_dims])
    return x.reshape(-1, K), K, math.prod(w_shape[in_dims:])


def fp8_dot(x: jax.Array, w: jax.Array | Quantized, in_dims: int = 1, pow2: bool = False,
            out_dtype: jnp.dtype | None = None) -> jax.Array:
    """A Linear in FP8: x [..., *in] · w [*in, *out] → [..., *out] (the last ``in_dims`` dims of x contracted).

    ``w`` a float array: quantised online, differentiable (:func:`fp8_matmul`). ``w`` a :class:`Quantized`
    (serving an FP8 checkpoint: ``q`` [*in, *out], ``scale`` [ceil(K/128), ceil(N/128)] over the flattened
    [K, N]): its blocks are used as they are, with x tile-quantised online (W8A8, forward only).
    """
    lead, out_shape = x.shape[: x.ndim - in_dims], w.shape[in_dims:]
    x2, K, N = _flatten(x, w.shape, in_dims)
    if len(lead) == 2 and not isinstance(w, Quantized):  # [B, T] tokens: rows in the parallel layout's order
        y = fp8_matmul(tokens.flatten(x.reshape(*lead, K)), w.reshape(K, N), pow2, out_dtype)
        return tokens.unflatten(y, *lead).reshape(*lead, *out_shape)
    if isinstance(w, Quantized):
        xq = quantize(x2, TILE, pow2)
        y = chunked_dot(xq.q, xq.scale, w.q.reshape(K, N), _cols(w.scale, N), True, out_dtype or x.dtype,
                        stored_b=True)
    else:
        y = fp8_matmul(x2, w.reshape(K, N), pow2, out_dtype)
    return y.reshape(*lead, *out_shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _fp8_grouped(x: jax.Array, w: jax.Array, group_sizes: jax.Array, spec: _Spec) -> jax.Array:
    return _fp8_grouped_fwd(x, w, group_sizes, spec)[0]


def _fp8_grouped_fwd(x, w, group_sizes, spec):
    wq, wq_t = quantize_weight(w, spec.pow2)  # blocks per expert
    return _grouped_fprop(x, wq_t, wq.scale, group_sizes, spec, wq)


def _grouped_fprop(x, wq_t, w_scale, group_sizes, spec, wq=None):
    """Fprop on the weight's E4M3 blocks (q_t [G, N, K], scale [G, Kb, Nb]) → (y, residuals for Dgrad/Wgrad)."""
    N = wq_t.shape[1]
    xq, x_cols_t = quantize_both(x, spec.pow2)
    y = grouped_chunked_dot(xq.q, xq.scale, jnp.swapaxes(wq_t, 1, 2), _cols(w_scale, N), group_sizes,
                            spec.aligned, spec.out_dtype)
    wq = Quantized(jnp.swapaxes(wq_t, 1, 2), w_scale) if wq is None else wq  # Dgrad reads W [G, K, N]
    return y, (x_cols_t, wq, group_sizes)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _fp8_grouped_pre(x, w, wq_t, w_scale, group_sizes, spec):
    return _grouped_fprop(x, wq_t, w_scale, group_sizes, spec)[0]


def _fp8_grouped_pre_fwd(x, w, wq_t, w_scale, group_sizes, spec):
    return _grouped_fprop(x, wq_t, w_scale, group_sizes, spec)  # w itself is not read: only its gradient is made


def _fp8_grouped_pre_bwd(spec, res, dy):
    dx, dw, _ = _fp8_grouped_bwd(spec, res, dy)
    G, K, N = res[1].q.shape
    return dx, dw, jnp.zeros((G, N, K), res[1].q.dtype), jnp.zeros_like(res[1].scale), None  # q_t, scale: none


_fp8_grouped_pre.defvjp(_fp8_grouped_pre_fwd, _fp8_grouped_pre_bwd)


def _fp8_grouped_bwd(spec, res, dy):
    x_cols_t, wq, group_sizes = res
    K = wq.q.shape[1]
    dy_row, dy_cols_t = quantize_both(dy, spec.pow2)
    wt = Quantized(wq.q.transpose(0, 2, 1), wq.scale.transpose(0, 2, 1))  # [G, N, K], blocks [G, Nb, Kb]
    dx = grouped_chunked_dot(dy_row.q, dy_row.scale, wt.q, _cols(wt.scale, K), group_sizes, spec.aligned,
                             spec.x_dtype)
    # Wgrad per expert contracts that expert's tokens. Token tiles are 128 rows of the sorted batch (a tile may
    # straddle two experts; DeepGEMM's k-grouped kernel pads groups to 128 instead). Reference math: the
    # dequantised operands, contracted in FP32 — equal to per-chunk promotion up to FP32 rounding.
    mode = gemm_mode()
    if mode == "mgpu" and spec.aligned:  # token tiles never straddle experts: DeepGEMM's k-grouped layout
        dw = mgpu.block_scaled_kgrouped_matmul_nk(x_cols_t.q, x_cols_t.scale.T, dy_cols_t.q, dy_cols_t.scale,
                                                  group_sizes, interpret=not on_gpu())
        return dx.astype(spec.x_dtype), dw.astype(spec.w_dtype), None
    x_col, dy_col = _untransposed(x_cols_t), _untransposed(dy_cols_t)
    if mode == "pallas":  # the k-grouped FP8 kernel: same chunks, promotion per 128 tokens
        dw = block_scaled_kgrouped_matmul(x_col.q, x_col.scale, dy_col.q, dy_col.scale, group_sizes,
                                          interpret=not on_gpu())
        return dx.astype(spec.x_dtype), dw.astype(spec.w_dtype), None
    if mode in ("dequant", "mgpu"):  # the grouped kernel's own Wgrad path, on the dequantised BF16 operands
        xd, dyd = dequantize(x_col, COL_TILE, jnp.bfloat16), dequantize(dy_col, COL_TILE, jnp.bfloat16)
        _, pull = jax.vjp(lambda w: grouped_matmul(xd, w, group_sizes.astype(jnp.int32)),
                          jnp.zeros(wq.q.shape, jnp.bfloat16))
        return dx.astype(spec.x_dtype), pull(dyd)[0].astype(spec.w_dtype), None
    dn = jax.lax.RaggedDotDimensionNumbers(dot_dimension_numbers=(([0], [0]), ([], [])),
                                           lhs_ragged_dimensions=[0], rhs_group_dimensions=[])
    dw = jax.lax.ragged_dot_general(dequantize(x_col, COL_TILE), dequantize(dy_col, COL_TILE),
                                    group_sizes.astype(jnp.int32), dn, precision=jax.lax.Precision.HIGHEST,
                                    preferred_element_type=jnp.float32)  # [G, K, N]
    return dx.astype(spec.x_dtype), dw.astype(spec.w_dtype), None


_fp8_grouped.defvjp(_fp8_grouped_fwd, _fp8_grouped_bwd)


def fp8_grouped_matmul(x: jax.Array, w: jax.Array | Quantized | Prequantized, group_sizes: jax.Array,
                       pow2: bool = False, out_dtype: jnp.dtype | None = None, aligned: bool = False) -> jax.Array:
    """MoE experts in FP8: rows x [M, K] grouped contiguously by ``group_sizes`` [G], w [G, K, N] → [M, N].

    Rows per 1×128 tile, each expert's weight per 128×128 block; FP32 promotion every 128 of K. A float ``w``
    is differentiable (Dgrad and Wgrad in FP8 as in :func:`fp8_matmul`); a :class:`Quantized` ``w`` (``q``
    [G, K, N], ``scale`` [G, Kb, Nb]) is served as stored, forward only. ``aligned``: M and every group size are
    multiples of 128 and rows past the sum are zero (lets ``mgpu`` run its grouped kernels). A :class:`Prequantized`
    ``w`` uses its ready E4M3 blocks (same values as quantising ``w.w`` here) and returns ``w.w``'s gradient.
    """
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    if isinstance(w, Prequantized):  # E4M3 blocks made ahead; gradients still reach the master weight w.w
        spec = _Spec(pow2, out_dtype, jnp.dtype(x.dtype), jnp.dtype(w.w.dtype), aligned)
        return _fp8_grouped_pre(x, w.w, w.q_t, w.scale, group_sizes, spec)
    if isinstance(w, Quantized):
        xq = quantize(x, TILE, pow2)
        # served weights: never the mgpu kernels (they would transpose every expert's weight per call)
        return grouped_chunked_dot(xq.q, xq.scale, w.q, _cols(w.scale, w.q.shape[2]), group_sizes, False,
                                   out_dtype)
    return _fp8_grouped(x, w, group_sizes, _Spec(pow2, out_dtype, jnp.dtype(x.dtype), jnp.dtype(w.dtype), aligned))
