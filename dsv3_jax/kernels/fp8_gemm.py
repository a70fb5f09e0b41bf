"""Block-scaled FP8 GEMMs (DeepGEMM-style, REFERENCE §8) as Pallas kernels on the Triton backend.

Same math as :func:`dsv3_jax.fp8.chunked_dot` / :func:`~dsv3_jax.fp8.grouped_chunked_dot`: for every 128-wide
chunk ``c`` of K the FP8 tile product is accumulated in a fresh FP32 partial, multiplied by the chunk's scales
(``a_scale[:, c] ⊗ b_scale[c, :]``) and added into the FP32 accumulator (promotion every 128 of K, N_C = 128).

Operand conventions (those of ``fp8.chunked_dot``)::

    a_q     [M, K]      E4M3 (any float dtype works)   a_scale [M, ceil(K/128)]   one per row per K chunk
    b_q     [K, N]      E4M3                           b_scale [ceil(K/128), N]   one per K chunk per column
    grouped: b_q [G, K, N], b_scale [G, ceil(K/128), N], rows of a grouped contiguously by group_sizes [G]

A 128×128 weight block scale is passed expanded to columns (``fp8._cols``); Wgrad's 128×1 token tiles need the
per-column form anyway.

Edges: K is zero-padded to a multiple of 128 in the wrapper (as ``chunked_dot`` does: padded K elements are zero
values under the last chunk's scale). In the dense kernel M and N are zero-padded (values *and* scales) to the
block sizes and the output cropped; nothing is padded when the shapes are already multiples (the benchmark
shapes). The grouped kernel masks rows instead (group boundaries are data-dependent).

Interpret mode (CPU tests): the FP8 tiles are upcast to float32 inside the kernel before the dot — exact, every
E4M3 value is a float32 and so is every product — so the tile dot is an FP32 dot like the reference's. On GPU the
E4M3 tiles go to ``tt.dot`` as they are (FP8 tensor cores, sm_89+) with FP32 accumulation.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

BLOCK = 128  # the promotion interval along K (and the K tile of every kernel step)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _compiler_params(interpret: bool, num_warps: int, num_stages: int) -> plgpu.CompilerParams | None:
    return None if interpret else plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _pad2(x: jax.Array, rows: int, cols: int) -> jax.Array:
    """Zero-pad the last two dims of ``x`` up to [rows, cols] (no-op, no copy, when already there)."""
    R, C = x.shape[-2:]
    if (R, C) == (rows, cols):
        return x
    return jnp.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, rows - R), (0, cols - C)])


def _check(a_q: jax.Array, a_scale: jax.Array, b_q: jax.Array, b_scale: jax.Array, grouped: bool) -> None:
    M, K = a_q.shape
    Kb = _cdiv(K, BLOCK)
    if grouped:
        G, Kw, N = b_q.shape
        want_b = (G, Kb, N)
    else:
        (Kw, N), want_b = b_q.shape, (Kb, b_q.shape[1])
    if Kw != K or a_scale.shape != (M, Kb) or b_scale.shape != want_b:
        raise ValueError(f"block-scaled FP8 GEMM: a_q {a_q.shape}, a_scale {a_scale.shape}, b_q {b_q.shape}, "
                         f"b_scale {b_scale.shape}; expected a_scale {(M, Kb)} and b_scale {want_b}")


def _chunk_dot(a: jax.Array, b: jax.Array, interpret: bool) -> jax.Array:
    """One K chunk: [bm, 128] · [128, bn] → float32 [bm, bn], a fresh partial (FP32 accumulation)."""
    if interpret:  # exact: E4M3 ⊂ float32; keeps the CPU dot a plain FP32 dot
        a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return plgpu.dot(a, b, precision=lax.Precision.HIGHEST)


# ----------------------------------------------------------------------------------------------------------
# Dense: [M, K] × [K, N]
# ----------------------------------------------------------------------------------------------------------


def _dense_kernel(a_ref, as_ref, b_ref, bs_ref, o_ref, *, n_chunks: int, interpret: bool, b_nk: bool):
    """One [bm, bn] output tile. a_ref [bm, Kp], as_ref [Kb, bm] (a_scale transposed), b_ref [Kp, bn]
    ([bn, Kp] when ``b_nk``), bs_ref [Kb, bn], o_ref [bm, bn]."""
    bm, bn = o_ref.shape

    def step(c, acc):
        ks = pl.ds(pl.multiple_of(c * BLOCK, BLOCK), BLOCK)
        if b_nk:  # K-major B, the layout Hopper's FP8 MMA reads from shared memory
            b = b_ref[:, ks]
            if interpret:
                a, b = a_ref[:, ks].astype(jnp.float32), b.astype(jnp.float32)
            else:
                a = a_ref[:, ks]
            part = plgpu.dot(a, b, trans_b=True, precision=lax.Precision.HIGHEST)
        else:
            part = _chunk_dot(a_ref[:, ks], b_ref[ks, :], interpret)
        sa, sb = as_ref[c, :], bs_ref[c, :]  # [bm], [bn]
        return acc + part * (sa[:, None] * sb[None, :])  # promote the chunk into the FP32 accumulator

    acc = lax.fori_loop(0, n_chunks, step, jnp.zeros((bm, bn), jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("out_dtype", "interpret", "block_m", "block_n", "num_warps",
                                             "num_stages", "b_nk"))
def block_scaled_matmul(a_q: jax.Array, a_scale: jax.Array, b_q: jax.Array, b_scale: jax.Array,
                        out_dtype: jnp.dtype = jnp.bfloat16, *, interpret: bool = False, block_m: int = 128,
                        block_n: int = 128, num_warps: int = 8, num_stages: int = 3,
                        b_nk: bool = False) -> jax.Array:
    """FP8 GEMM with FP32 promotion every 128 of K → ``out_dtype`` [M, N] (= ``fp8.chunked_dot``).

    a_q [M, K], a_scale float32 [M, ceil(K/128)]; b_q [K, N], b_scale float32 [ceil(K/128), N]. Grid
    (ceil(M/block_m), ceil(N/block_n)); each program loops over the K chunks. ``block_m`` and ``block_n`` must be
    powers of two (Triton). ``interpret=True`` runs the kernel with Pallas' interpreter (CPU). ``b_nk``: b_q is
    given K-major, [N, K] (the layout Hopper's FP8 tensor cores read).
    """
    _check(a_q, a_scale, b_q.T if b_nk else b_q, b_scale, grouped=False)
    M, K = a_q.shape
    N = b_q.shape[0] if b_nk else b_q.shape[1]
    Kb = _cdiv(K, BLOCK)
    Mp, Np, Kp = _cdiv(M, block_m) * block_m, _cdiv(N, block_n) * block_n, Kb * BLOCK
    a = _pad2(a_q, Mp, Kp)
    b = _pad2(b_q, Np, Kp) if b_nk else _pad2(b_q, Kp, Np)
    sa = _pad2(a_scale.astype(jnp.float32).T, Kb, Mp)  # [Kb, Mp]: one contiguous row per chunk
    sb = _pad2(b_scale.astype(jnp.float32), Kb, Np)
    out = pl.pallas_call(
        functools.partial(_dense_kernel, n_chunks=Kb, interpret=interpret, b_nk=b_nk),
        out_shape=jax.ShapeDtypeStruct((Mp, Np), out_dtype),
        grid=(Mp // block_m, Np // block_n),
        in_specs=[pl.BlockSpec((block_m, Kp), lambda i, j: (i, 0)),
                  pl.BlockSpec((Kb, block_m), lambda i, j: (0, i)),
                  (pl.BlockSpec((block_n, Kp), lambda i, j: (j, 0)) if b_nk
                   else pl.BlockSpec((Kp, block_n), lambda i, j: (0, j))),
                  pl.BlockSpec((Kb, block_n), lambda i, j: (0, j))],
        out_specs=pl.BlockSpec((block_m, block_n), lambda i, j: (i, j)),
        compiler_params=_compiler_params(interpret, num_warps, num_stages),
        interpret=interpret,
        name="fp8_block_scaled_matmul",
    )(a, sa, b, sb)
    return out[:M, :N] if (Mp, Np) != (M, N) else out


# ----------------------------------------------------------------------------------------------------------
# Grouped (MoE experts): rows of A in contiguous groups, one right operand per group
# ----------------------------------------------------------------------------------------------------------


def tile_map(group_sizes: jax.Array, rows: int, block_m: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Row tiles that never straddle a group: (group [T], first row [T], end row [T]) int32, T static.

    Group g's rows ``[start_g, start_g + size_g)`` are cut into ceil(size_g / block_m) tiles of ``block_m`` rows
    starting at ``start_g`` (not at a multiple of block_m: the kernel masks rows past ``end``). Empty groups get
    no tile. ``T = ceil(rows / block_m) + G - 1`` bounds Σ ceil(size_g / block_m); unused tiles get
    ``first = end = 0`` (the kernel skips them).
    """
    G = group_sizes.shape[0]
    T = _cdiv(rows, block_m) + G - 1
    sizes = group_sizes.astype(jnp.int32)
    raw_ends = jnp.cumsum(sizes)
    starts, ends = jnp.minimum(raw_ends - sizes, rows), jnp.minimum(raw_ends, rows)
    n_tiles = (ends - starts + block_m - 1) // block_m
    tile_end = jnp.cumsum(n_tiles)
    t = jnp.arange(T, dtype=jnp.int32)
    g = jnp.minimum(jnp.searchsorted(tile_end, t, side="right", method="compare_all"), G - 1).astype(jnp.int32)
    first = starts[g] + (t - (tile_end[g] - n_tiles[g])) * block_m
    used = t < tile_end[-1]
    return g, jnp.where(used, first, 0), jnp.where(used, ends[g], 0)


def _grouped_kernel(g_ref, first_ref, end_ref, a_ref, as_ref, b_ref, bs_ref, z_ref, o_ref, *, n_chunks: int,
                    block_m: int, interpret: bool):
    """Row tile ``t`` of group g_ref[t] × output columns tile j. a_ref [Mr, Kp] (all rows), as_ref [Kb, Mr],
    b_ref [G, Kp, bn], bs_ref [G, Kb, bn], z_ref/o_ref [Mr, bn] (aliased; rows of no tile stay zero)."""
    del z_ref  # the zero-initialised buffer o_ref aliases
    t = pl.program_id(0)
    g, first, end = g_ref[t], first_ref[t], end_ref[t]
    bn = o_ref.shape[1]

    @pl.when(first < end)
    def _():
        rows = pl.ds(first, block_m)
        valid = first + jnp.arange(block_m) < end  # [bm]: rows of this group (the tile may run past it)
        a_mask = jnp.broadcast_to(valid[:, None], (block_m, BLOCK))

        def step(c, acc):
            ks = pl.ds(pl.multiple_of(c * BLOCK, BLOCK), BLOCK)
            a = plgpu.load(a_ref.at[rows, ks], mask=a_mask)  # masked rows: never stored (rows are independent)
            part = _chunk_dot(a, b_ref[g, ks, :], interpret)
            sa = plgpu.load(as_ref.at[c, rows], mask=valid)
            sb = bs_ref[g, c, :]
            return acc + part * (sa[:, None] * sb[None, :])

        acc = lax.fori_loop(0, n_chunks, step, jnp.zeros((block_m, bn), jnp.float32))
        plgpu.store(o_ref.at[rows, :], acc.astype(o_ref.dtype), mask=jnp.broadcast_to(valid[:, None], acc.shape))


@functools.partial(jax.jit, static_argnames=("out_dtype", "interpret", "block_m", "block_n", "num_warps",
                                             "num_stages"))
def block_scaled_grouped_matmul(a_q: jax.Array, a_scale: jax.Array, b_q: jax.Array, b_scale: jax.Array,
                                group_sizes: jax.Array, out_dtype: jnp.dtype = jnp.bfloat16, *,
                                interpret: bool = False, block_m: int = 128, block_n: int = 128,
                                num_warps: int = 8, num_stages: int = 3) -> jax.Array:
    """MoE expert GEMM in FP8 → ``out_dtype`` [M, N] (= ``fp8.grouped_chunked_dot``).

    a_q [M, K] with rows grouped contiguously by ``group_sizes`` [G] (sorted by expert), a_scale [M, ceil(K/128)];
    b_q [G, K, N], b_scale [G, ceil(K/128), N]. Rows past ``sum(group_sizes)`` come out zero.

    Grid (T, ceil(N/block_n)) with T = ceil(M/block_m) + G - 1 row tiles from :func:`tile_map`: each tile lies in
    one group, starts anywhere and masks its rows past the group's end (loads and stores), so A is read in place,
    without a gather or per-group padding. Spare tiles exit at once. N is zero-padded to block_n (values and
    scales) when it is not a multiple. In interpret mode A, its scales and the output get block_m extra zero rows
    (the interpreter clamps an out-of-range row window instead of masking it; Triton masks).
    """
    _check(a_q, a_scale, b_q, b_scale, grouped=True)
    M, K = a_q.shape
    G, _, N = b_q.shape
    Kb = _cdiv(K, BLOCK)
    Np, Kp = _cdiv(N, block_n) * block_n, Kb * BLOCK
    Mr = M + block_m if interpret else M
    a = _pad2(a_q, Mr, Kp)
    sa = _pad2(a_scale.astype(jnp.float32).T, Kb, Mr)
    b = _pad2(b_q, Kp, Np)
    sb = _pad2(b_scale.astype(jnp.float32), Kb, Np)
    g, first, end = tile_map(group_sizes, M, block_m)
    T = g.shape[0]
    whole = lambda shape: pl.BlockSpec(shape, lambda t, j: (0,) * len(shape))
    out = pl.pallas_call(
        functools.partial(_grouped_kernel, n_chunks=Kb, block_m=block_m, interpret=interpret),
        out_shape=jax.ShapeDtypeStruct((Mr, Np), out_dtype),
        grid=(T, Np // block_n),
        in_specs=[whole((T,)), whole((T,)), whole((T,)),
                  whole((Mr, Kp)), whole((Kb, Mr)),
                  pl.BlockSpec((G, Kp, block_n), lambda t, j: (0, 0, j)),
                  pl.BlockSpec((G, Kb, block_n), lambda t, j: (0, 0, j)),
                  pl.BlockSpec((Mr, block_n), lambda t, j: (0, j))],
        out_specs=pl.BlockSpec((Mr, block_n), lambda t, j: (0, j)),
        input_output_aliases={7: 0},
        compiler_params=_compiler_params(interpret, num_warps, num_stages),
        interpret=interpret,
        name="fp8_block_scaled_grouped_matmul",
    )(g, first, end, a, sa, b, sb, jnp.zeros((Mr, Np), out_dtype))
    return out[:M, :N] if (Mr, Np) != (M, N) else out


# ----------------------------------------------------------------------------------------------------------
# K-grouped (MoE expert Wgrad): contract each group's rows, one [K, N] output per group
# ----------------------------------------------------------------------------------------------------------


def _kgrouped_kernel(start_ref, end_ref, a_ref, as_ref, b_ref, bs_ref, o_ref, *, interpret: bool):
    """Group g × [bk, bn] output tile. a_ref [Mp, bk], as_ref [Mb, bk], b_ref [Mp, bn], bs_ref [Mb, bn],
    o_ref [bk, bn]. Loops over the 128-row chunks that meet the group; rows of other groups are masked to 0."""
    g = pl.program_id(0)
    start, end = start_ref[g], end_ref[g]
    bn = o_ref.shape[1]
    c0 = start // BLOCK
    c1 = jnp.where(end > start, (end + BLOCK - 1) // BLOCK, c0)

    def step(c, acc):
        rows = pl.ds(pl.multiple_of(c * BLOCK, BLOCK), BLOCK)
        r = c * BLOCK + jnp.arange(BLOCK)
        valid = jnp.broadcast_to(((r >= start) & (r < end))[:, None], (BLOCK, bn))
        b = plgpu.load(b_ref.at[rows, :], mask=valid, other=jnp.zeros((), b_ref.dtype))  # one masked operand
        a = a_ref[rows, :]
        if interpret:
            a, b = a.astype(jnp.float32), b.astype(jnp.float32)
        part = plgpu.dot(a, b, trans_a=True, precision=lax.Precision.HIGHEST)  # [bk, bn]
        sa, sb = as_ref[c, :], bs_ref[c, :]
        return acc + part * (sa[:, None] * sb[None, :])

    acc = lax.fori_loop(c0, c1, step, jnp.zeros(o_ref.shape, jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("out_dtype", "interpret", "block_k", "block_n", "num_warps",
                                             "num_stages"))
def block_scaled_kgrouped_matmul(a_q: jax.Array, a_scale: jax.Array, b_q: jax.Array, b_scale: jax.Array,
                                 group_sizes: jax.Array, out_dtype: jnp.dtype = jnp.float32, *,
                                 interpret: bool = False, block_k: int = 128, block_n: int = 128,
                                 num_warps: int = 8, num_stages: int = 3) -> jax.Array:
    """Per-group ``aᵀ·b`` over each group's rows, FP8 with promotion every 128 rows → ``out_dtype`` [G, K, N].

    The MoE expert Wgrad ``dW[g] = x[rows_g]ᵀ · dy[rows_g]``: a_q [M, K] with a_scale float32 [ceil(M/128), K]
    and b_q [M, N] with b_scale [ceil(M/128), N] (both in 128×1 token tiles, ``fp8.COL_TILE``); rows grouped
    contiguously by ``group_sizes`` [G]; rows past the sum belong to no group. The 128-row chunks are cut from
    the whole sorted batch, so a chunk may straddle two groups: each group takes its own rows of it (rows of
    other groups masked to zero in b) under the chunk's scales — ``ragged_dot_general`` of the dequantised
    operands up to FP32 rounding (DeepGEMM's k-grouped kernel pads groups to 128 instead). Empty groups → 0.

    Grid (G, ceil(K/block_k), ceil(N/block_n)); M, K, N zero-padded (values and scales) to the tiles when needed.
    """
    M, K = a_q.shape
    N = b_q.shape[1]
    Mb = _cdiv(M, BLOCK)
    if b_q.shape[0] != M or a_scale.shape != (Mb, K) or b_scale.shape != (Mb, N):
        raise ValueError(f"k-grouped FP8 GEMM: a_q {a_q.shape}, a_scale {a_scale.shape}, b_q {b_q.shape}, "
                         f"b_scale {b_scale.shape}; expected scales {(Mb, K)} and {(Mb, N)}")
    G = group_sizes.shape[0]
    Mp, Kp, Np = Mb * BLOCK, _cdiv(K, block_k) * block_k, _cdiv(N, block_n) * block_n
    a, b = _pad2(a_q, Mp, Kp), _pad2(b_q, Mp, Np)
    sa, sb = _pad2(a_scale.astype(jnp.float32), Mb, Kp), _pad2(b_scale.astype(jnp.float32), Mb, Np)
    sizes = group_sizes.astype(jnp.int32)
    ends = jnp.minimum(jnp.cumsum(sizes), M)
    starts = jnp.minimum(ends, jnp.cumsum(sizes) - sizes)
    out = pl.pallas_call(
        functools.partial(_kgrouped_kernel, interpret=interpret),
        out_shape=jax.ShapeDtypeStruct((G, Kp, Np), out_dtype),
        grid=(G, Kp // block_k, Np // block_n),
        in_specs=[pl.BlockSpec((G,), lambda g, i, j: (0,)), pl.BlockSpec((G,), lambda g, i, j: (0,)),
                  pl.BlockSpec((Mp, block_k), lambda g, i, j: (0, i)),
                  pl.BlockSpec((Mb, block_k), lambda g, i, j: (0, i)),
                  pl.BlockSpec((Mp, block_n), lambda g, i, j: (0, j)),
                  pl.BlockSpec((Mb, block_n), lambda g, i, j: (0, j))],
        out_specs=pl.BlockSpec((None, block_k, block_n), lambda g, i, j: (g, i, j)),
        compiler_params=_compiler_params(interpret, num_warps, num_stages),
        interpret=interpret,
        name="fp8_block_scaled_kgrouped_matmul",
    )(starts, ends, a, sa, b, sb)
    return out[:, :K, :N] if (Kp, Np) != (K, N) else out
