"""Fused MLA decode attention over the latent cache: a flash-decoding Pallas kernel (Triton backend).

After ``w_uk`` is absorbed into the query (:func:`dsv3_jax.attention.absorbed_attention`), every head of a row
attends over the same cache — latent c_kv [B, S, C] and shared rope key k_rope [B, S, R] — so the kernel
flattens a row's T decode positions × H heads into M = T·H query rows and processes a block of ``block_h`` of
them per program: each cache tile is read from HBM once for all those rows, for the scores and again (from
registers/SMEM, not HBM) as the values. The grid is (B, M blocks, S splits); each program runs an online
softmax in float32 over its split of the cache, in blocks of ``block_s`` slots, and stops at the largest
position its rows can see (slots past it are never read). The splits' partial results (unnormalised output,
running max, running sum) are merged by a few XLA ops.

Mask (as :func:`dsv3_jax.attention.causal_mask` over cache slots): slot s is visible to query t of row b iff
s ≤ positions[b, t] (and s < S). Every query must see slot 0 (positions ≥ 0); a query with a negative position
gets zeros (the XLA path would give a uniform average — a case the engine never produces).

Off the GPU the same kernel runs in Pallas interpret mode (``interpret=True``): slow, for tests only.
On the GPU (Triton) the tiles need power-of-two sizes: C, R, ``block_h`` and ``block_s`` (and ≥ 16 for the dots).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

NEG_INF = -1e30  # the finite "minus infinity" of dsv3_jax.attention: masked slots
TARGET_PROGRAMS = 264  # ~2 waves on a 132-SM H100: the automatic split count aims for at least this many programs


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def latent_tile_init(bh: int, C: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The online softmax's start: accumulator [bh, C] f32 zeros, running max −inf, running sum 0 ([bh] f32)."""
    return jnp.zeros((bh, C), jnp.float32), jnp.full((bh,), NEG_INF, jnp.float32), jnp.zeros((bh,), jnp.float32)


def latent_tile_step(carry, q, qr, c, kr, visible, scale: float, cast):
    """One online-softmax step of latent attention over a tile of cache rows (inside a Pallas/Triton kernel).

    carry (acc [bh, C] f32, running max [bh], running sum [bh]); q [bh, C], qr [bh, R] (already cast), c [bt, C]
    and kr [bt, R] the tile's latent rows (also the values), visible [bh, bt] bool → the updated carry.
    Probabilities are cast to c's dtype for the value dot; ``cast`` maps dot operands (interpret mode: f32).
    """
    acc, m_prev, l_prev = carry
    s = plgpu.dot(q, cast(c), trans_b=True) + plgpu.dot(qr, cast(kr), trans_b=True)  # [bh, bt] f32
    s = jnp.where(visible, s * scale, NEG_INF)
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1))
    alpha = jnp.exp(m_prev - m_new)
    p = jnp.exp(s - m_new[:, None])
    l_new = alpha * l_prev + jnp.sum(p, axis=1)
    acc = alpha[:, None] * acc + plgpu.dot(cast(p.astype(c.dtype)), cast(c))  # [bh, C] f32
    return acc, m_new, l_new


def _kernel(q_ref, qr_ref, pos_ref, c_ref, kr_ref, o_ref, m_ref, l_ref, *, scale: float, block_s: int,
            split_len: int, seq_len: int, dot_dtype: jnp.dtype | None):
    """One (row b, query block i, split j) program.

    q_ref [bh, C], qr_ref [bh, R], pos_ref [bh] int32, c_ref [S, C], kr_ref [S, R] (row b's whole cache)
    → o_ref [bh, C] f32 (unnormalised), m_ref [bh] f32 (running max), l_ref [bh] f32 (running sum).
    ``dot_dtype``: operands of the dots cast to it first (interpret mode on CPU: XLA:CPU has no bf16 × bf16 → f32
    dot inside the loop; bf16 products are exact in f32, so the results are the same).
    """
    cast = (lambda x: x.astype(dot_dtype)) if dot_dtype is not None else (lambda x: x)
    bh, C = q_ref.shape
    j = pl.program_id(2)
    q = cast(q_ref[...])
    qr = cast(qr_ref[...])
    pos = pos_ref[...]
    lo = j * split_len
    # Slots this split has to read: [lo, hi); nothing past the furthest position of the block's queries.
    hi = jnp.minimum(jnp.minimum(lo + split_len, seq_len), jnp.max(pos) + 1)
    n_blocks = jnp.maximum(pl.cdiv(hi - lo, block_s), 0)
    offs = jnp.arange(block_s, dtype=jnp.int32)

    def body(k, carry):
        acc, m_prev, l_prev = carry
        start = lo + k * block_s
        slots = start + offs  # [bs]
        inside = slots < seq_len
        c = plgpu.load(c_ref.at[pl.ds(start, block_s), :], mask=inside[:, None], other=0.0)  # [bs, C]
        kr = plgpu.load(kr_ref.at[pl.ds(start, block_s), :], mask=inside[:, None], other=0.0)  # [bs, R]
        visible = (slots[None, :] <= pos[:, None]) & inside[None, :]
        return latent_tile_step((acc, m_prev, l_prev), q, qr, c, kr, visible, scale, cast)

    acc, m, l = jax.lax.fori_loop(0, n_blocks, body, latent_tile_init(bh, C))
    o_ref[...] = acc
    m_ref[...] = m
    l_ref[...] = l


def auto_splits(batch: int, m_blocks: int, seq_len: int, block_s: int) -> int:
    """S splits per (row, query block): enough programs for ~2 waves of an H100, each split ≥ one block."""
    return max(1, min(pl.cdiv(seq_len, block_s), pl.cdiv(TARGET_PROGRAMS, batch * m_blocks)))


@functools.partial(jax.jit, static_argnames=("scale", "block_s", "block_h", "num_splits", "num_warps",
                                             "num_stages", "interpret"))
def latent_decode_attention(q_lat: jax.Array, q_rope: jax.Array, c_kv: jax.Array, k_rope: jax.Array,
                            positions: jax.Array, scale: float, *, block_s: int = 64, block_h: int | None = None,
                            num_splits: int | None = None, num_warps: int | None = None, num_stages: int = 2,
                            interpret: bool = False) -> jax.Array:
    """Softmax(scale · (q_lat·c_kvᵀ + q_rope·k_ropeᵀ), masked) · c_kv per head, in one pass over the cache.

    q_lat [B,T,H,C] (the query with w_uk absorbed), q_rope [B,T,H,R], c_kv [B,S,C], k_rope [B,S,R],
    positions [B,T] int (slot s visible to query t iff s ≤ positions[b, t]) → o_lat [B,T,H,C] in q_lat's dtype
    (scores, softmax and the accumulation in float32; probabilities cast to c_kv's dtype for the value dot, as
    the XLA path does).

    block_s: cache slots per loop step. block_h: query rows (T·H flattened) per program; default the next power
    of two ≥ T·H, at least 16 (Triton's smallest dot) and at most 64. num_splits: S splits per row (flash
    decoding); default :func:`auto_splits`. num_warps / num_stages: Triton launch parameters (num_warps default 4
    for ≤ 16 query rows per program, else 8: the [block_h, C] f32 accumulator lives in registers; each stage
    buffers a [block_s, C + R] cache tile in shared memory).
    """
    B, T, H, C = q_lat.shape
    S, R = c_kv.shape[1], k_rope.shape[-1]
    if q_rope.shape != (B, T, H, R) or c_kv.shape != (B, S, C) or k_rope.shape != (B, S, R):
        raise ValueError(f"shapes: q_lat {q_lat.shape}, q_rope {q_rope.shape}, c_kv {c_kv.shape}, "
                         f"k_rope {k_rope.shape}")
    if positions.shape != (B, T):
        raise ValueError(f"positions {positions.shape}: expected {(B, T)}")
    M = T * H
    bh = block_h or min(64, max(16, _next_pow2(M)))
    if not interpret:
        bad = {k: v for k, v in {"C": C, "R": R, "block_h": bh, "block_s": block_s}.items() if not _is_pow2(v)}
        if bad:
            raise ValueError(f"the Triton kernel needs power-of-two tile sizes, got {bad}")
    m_blocks = pl.cdiv(M, bh)
    Mp = m_blocks * bh
    splits = num_splits or auto_splits(B, m_blocks, S, block_s)
    split_len = pl.cdiv(pl.cdiv(S, splits), block_s) * block_s  # a whole number of blocks per split
    splits = pl.cdiv(S, split_len)  # no empty trailing splits

    # Queries as [B, M, ·] rows (m = t·H + h), padded to whole blocks; a padded row sees slot 0 only.
    q = q_lat.reshape(B, M, C)
    qr = q_rope.astype(q_lat.dtype).reshape(B, M, R)
    pos = jnp.repeat(positions.astype(jnp.int32), H, axis=1)  # [B, M]
    if Mp != M:
        q = jnp.pad(q, ((0, 0), (0, Mp - M), (0, 0)))
        qr = jnp.pad(qr, ((0, 0), (0, Mp - M), (0, 0)))
        pos = jnp.pad(pos, ((0, 0), (0, Mp - M)))

    dot_dtype = jnp.float32 if interpret and jax.default_backend() == "cpu" else None
    kernel = functools.partial(_kernel, scale=float(scale), block_s=block_s, split_len=split_len, seq_len=S,
                               dot_dtype=dot_dtype)
    o, m, l = pl.pallas_call(
        kernel,
        grid=(B, m_blocks, splits),
        in_specs=[
            pl.BlockSpec((None, bh, C), lambda b, i, j: (b, i, 0)),
            pl.BlockSpec((None, bh, R), lambda b, i, j: (b, i, 0)),
            pl.BlockSpec((None, bh), lambda b, i, j: (b, i)),
            pl.BlockSpec((None, S, C), lambda b, i, j: (b, 0, 0)),  # the row's whole cache; the kernel slices it
            pl.BlockSpec((None, S, R), lambda b, i, j: (b, 0, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, bh, C), lambda b, i, j: (b, j, i, 0)),
            pl.BlockSpec((None, None, bh), lambda b, i, j: (b, j, i)),
            pl.BlockSpec((None, None, bh), lambda b, i, j: (b, j, i)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((B, splits, Mp, C), jnp.float32),
            jax.ShapeDtypeStruct((B, splits, Mp), jnp.float32),
            jax.ShapeDtypeStruct((B, splits, Mp), jnp.float32),
        ],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps or (4 if bh <= 16 else 8), num_stages=num_stages),
        interpret=interpret,
        name="mla_latent_decode",
    )(q, qr, pos, c_kv, k_rope.astype(c_kv.dtype))

    # Merge the splits: rescale each to the global max; splits that saw nothing have l = 0 and weigh 0.
    m_all = jnp.max(m, axis=1, keepdims=True)  # [B, 1, Mp]
    w = jnp.exp(m - m_all)  # [B, splits, Mp]
    l_all = jnp.sum(w * l, axis=1)  # [B, Mp]
    o = jnp.sum(w[..., None] * o, axis=1)  # [B, Mp, C]
    o = jnp.where(l_all[..., None] > 0, o / jnp.where(l_all > 0, l_all, 1.0)[..., None], 0.0)
    return o[:, :M].reshape(B, T, H, C).astype(q_lat.dtype)

