"""Block-scaled FP8 GEMM for Hopper as a Pallas Mosaic-GPU kernel (WGMMA E4M3, TMA, warp specialisation).

The same math as :func:`dsv3_jax.fp8.chunked_dot` and the Triton kernel of :mod:`.fp8_gemm` (DeepGEMM's): every
128-wide chunk ``c`` of K is multiplied on the FP8 tensor cores into a fresh FP32 partial, the partial is scaled by
``a_scale[:, c] ⊗ b_scale[c, :]`` and promoted into a second FP32 accumulator held in registers (N_C = 128).

Operands (B is K-major: Hopper's FP8 WGMMA reads both operands K-major from shared memory)::

    a_q   [M, K] E4M3     a_scale_t [K/128, M] f32   (a_scale transposed: one contiguous row per K chunk)
    bt_q  [N, K] E4M3     b_scale   [K/128, N] f32   (one per K chunk per column: 128×128 weight blocks expanded)
    out   [M, N] out_dtype

Layout of the work: a persistent grid of one CTA per SM walks the [M/128, N/128] output tiles; per CTA a memory
warpgroup streams 128-K slabs of A, Bᵀ and both scale rows through shared memory with TMA
(``emit_pipeline_warp_specialized``), and two compute warpgroups each own 64 rows × 128 columns: WGMMA into a
fresh FP32 accumulator, wait, scale, add into the register accumulator. Three layouts share the kernel (see
``_kernel``): dense, grouped (MoE experts on row groups padded to 128) and k-grouped (the experts' Wgrad).
M, N and K must be multiples of 128 (the wrappers pad the others; grouped rows must come aligned). Hopper
(sm_90) only; off the GPU the same kernels run in Mosaic GPU's interpreter (``interpret=True``, the CPU tests).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

BLOCK = 128
TILE_M = 64  # rows per compute warpgroup; the CTA tile is 2 × 64 = 128 rows
TILE_N = 128


def _mgpu():
    from jax.experimental.pallas import mosaic_gpu as plgpu  # GPU-only backend: imported on use

    return plgpu


def _interpret_params():
    return _mgpu().InterpretGPUParams()  # Mosaic GPU's CPU interpreter (the tests)


def _transposed(ref):
    """Bᵀ view of a K-major [N, K] shared-memory tile for WGMMA. ``ref.transpose`` exists from jax 0.11.2 (the
    GPU image) on; ``plgpu.transpose_ref``, its predecessor, was removed in jax 0.12.1."""
    return ref.transpose((1, 0))


def _num_sms() -> int:
    return jax.devices()[0].core_count


def _kernel(*refs, out_dtype, max_concurrent_steps: int, b_block: bool, overlap: bool, mode: str):
    """One kernel, three layouts (``mode``), all over [M/128, N/128] output tiles and 128-K pipeline steps:

    dense     a [M, K], bt [N, K], sa [Kb, M], sb [Kb, N] → out [M, N]
    grouped   gid [M/128] (group of each 128-row tile, -1 past the last group), a [M, K], bt [G, N, K],
              sa [Kb, M], sb [G, Kb, N] → out [M, N]; rows of a tile all belong to its group (groups padded to
              128 rows); tiles with gid -1 are stored as zeros without running the pipeline
    kgrouped  gid [Kb + 1] (group of each K chunk, -1 for none, then a -1 sentinel), a [M, K], bt [N, K],
              sa [Kb, M], sb [Kb, N] → out [G, M, N]; each group's K chunks are contiguous; an output tile is
              stored when its group's last chunk is done (groups with no chunk are never written)
    """
    plgpu = _mgpu()
    if mode == "dense":
        a_gmem, bt_gmem, sa_gmem, sb_gmem, out_gmem = refs
        gid_gmem = None
    else:
        gid_gmem, a_gmem, bt_gmem, sa_gmem, sb_gmem, out_gmem = refs
    m, k = a_gmem.shape
    n = bt_gmem.shape[-2]
    cta_m, tile_n = 2 * TILE_M, TILE_N
    m_iters, n_iters, k_iters = m // cta_m, n // tile_n, k // BLOCK
    # More pipeline slots than K steps never fill: the pipeline would wait for steps that do not exist.
    max_concurrent_steps = max(1, min(max_concurrent_steps, k_iters))
    row = plgpu.Layout.WGMMA.reduce(1)
    col = plgpu.Layout.WGMMA.reduce(0)
    swz = plgpu.find_swizzle(BLOCK * 8)  # 128 E4M3 = 128 bytes
    in_tf = (plgpu.TilingTransform((8, swz)), plgpu.SwizzleTransform(swz))
    out_bits = jnp.dtype(out_dtype).itemsize * 8
    out_swz = plgpu.find_swizzle(tile_n * out_bits)
    out_tf = (plgpu.TilingTransform((8, out_swz * 8 // out_bits)), plgpu.SwizzleTransform(out_swz))
    shape = (TILE_M, tile_n)
    overlap = overlap and mode != "kgrouped"

    def get_pipeline(body, compute_context):
        return plgpu.emit_pipeline_warp_specialized(
            body,
            grid=(k_iters,),
            memory_registers=40,
            in_specs=[
                plgpu.BlockSpec((cta_m, BLOCK), lambda kk: (0, kk), transforms=in_tf, memory_space=plgpu.SMEM),
                plgpu.BlockSpec((tile_n, BLOCK), lambda kk: (0, kk), transforms=in_tf, memory_space=plgpu.SMEM),
                plgpu.BlockSpec((1, cta_m), lambda kk: (kk, 0), memory_space=plgpu.SMEM),
                plgpu.BlockSpec((1, tile_n), lambda kk: (kk, 0), memory_space=plgpu.SMEM),
            ],
            wg_axis="wg",
            num_compute_wgs=2,
            max_concurrent_steps=max_concurrent_steps,
            compute_context=compute_context,
        )

    ignore = lambda *_, **__: None
    bt0, sb0 = (bt_gmem.at[0], sb_gmem.at[0]) if mode == "grouped" else (bt_gmem, sb_gmem)

    @functools.partial(
        pl.run_scoped,
        pipeline_allocs=get_pipeline(ignore, ignore).get_allocations(a_gmem, bt0, sa_gmem, sb0),
        out_smem=plgpu.SMEM((2, TILE_M, tile_n), out_dtype, transforms=out_tf),
        collective_axes="wg",
    )
    def _scope(pipeline_allocs, out_smem):
        wg = lax.axis_index("wg")

        @plgpu.nd_loop((m_iters * n_iters,), collective_axes="cluster_grid")
        def _mn_loop(loop_info):
            (lin,) = loop_info.index
            mi, ni = lin // n_iters, lin % n_iters
            m_sl, n_sl = pl.ds(mi * cta_m, cta_m), pl.ds(ni * tile_n, tile_n)
            wg_rows = pl.ds(wg * TILE_M, TILE_M)

            def promote(acc, part, sa, sb):
                """acc + part · (sa ⊗ sb): the chunk's partial scaled into the FP32 accumulator."""
                if b_block:  # one B scale per 128×128 block: a scalar for this tile and chunk
                    return acc + part * lax.broadcast_in_dim(sa * sb, shape, [0])
                return acc + part * (lax.broadcast_in_dim(sa, shape, [0]) * lax.broadcast_in_dim(sb, shape, [1]))

            def load_scales(sa_smem, sb_smem):
                sa = plgpu.load(sa_smem.at[0, wg_rows], layout=row)  # [64]
                sb = sb_smem[0, 0] if b_block else plgpu.load(sb_smem.at[0], layout=col)  # [] or [128]
                return sa, sb

            def store(acc, dst):
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                out_smem.at[wg][...] = acc.astype(out_dtype)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(out_smem.at[wg], dst.at[wg_rows])

            def compute_context(eval_pipeline):
                zeros = plgpu.layout_cast(jnp.zeros(shape, jnp.float32), plgpu.Layout.WGMMA)
                if overlap:
                    sa0 = plgpu.layout_cast(jnp.zeros((TILE_M,), jnp.float32), row)
                    sb0 = (jnp.zeros((), jnp.float32) if b_block
                           else plgpu.layout_cast(jnp.zeros((tile_n,), jnp.float32), col))
                    acc, prev, sa, sb = eval_pipeline((zeros, zeros, sa0, sb0))
                    acc = promote(acc, prev, sa, sb)  # the last chunk
                else:
                    acc = eval_pipeline(zeros)
                if mode != "kgrouped":  # kgrouped stores inside the pipeline, at each group's last chunk
                    store(acc, out_gmem.at[m_sl, n_sl])

            def body(idx, a_smem, bt_smem, sa_smem, sb_smem, carry):
                b_t = _transposed(bt_smem)
                if overlap:  # promote the previous chunk while this chunk's MMA runs
                    acc, prev, sa_p, sb_p = carry

                    def mma_overlapped(part_ref):  # a fresh zeroed FP32 partial for this K chunk
                        plgpu.wgmma(part_ref, a_smem.at[wg_rows], b_t)
                        acc2 = promote(acc, prev, sa_p, sb_p)
                        return acc2, part_ref[...]  # waits for the MMA

                    sa, sb = load_scales(sa_smem, sb_smem)
                    acc, part = pl.run_scoped(mma_overlapped, plgpu.ACC(shape, jnp.float32))
                    return acc, part, sa, sb

                def mma(part_ref):
                    plgpu.wgmma(part_ref, a_smem.at[wg_rows], b_t)
                    return part_ref[...]

                sa, sb = load_scales(sa_smem, sb_smem)
                part = pl.run_scoped(mma, plgpu.ACC(shape, jnp.float32))
                acc = promote(carry, part, sa, sb)
                if mode == "kgrouped":
                    (c,) = idx
                    g, nxt = gid_gmem[c], gid_gmem[c + 1]
                    last = (g >= 0) & (g != nxt)
                    pl.when(last)(lambda: store(acc, out_gmem.at[jnp.maximum(g, 0), m_sl, n_sl]))
                    acc = acc * jnp.where(last, 0.0, 1.0).astype(jnp.float32)  # a new group starts from zero
                return acc

            def run_pipeline(bt_tile, sb_tile):
                get_pipeline(body, compute_context)(a_gmem.at[m_sl, :], bt_tile, sa_gmem.at[:, m_sl], sb_tile,
                                                    allocations=pipeline_allocs)

            if mode == "grouped":  # tiles past the last group (the static bound's padding): zeros, no MMA
                g = gid_gmem[mi]
                gc = jnp.maximum(g, 0)
                pl.when(g >= 0)(lambda: run_pipeline(bt_gmem.at[gc, n_sl, :], sb_gmem.at[gc, :, n_sl]))

                @pl.when((g < 0) & (wg < 2))
                def _zeros():
                    store(plgpu.layout_cast(jnp.zeros(shape, jnp.float32), plgpu.Layout.WGMMA),
                          out_gmem.at[m_sl, n_sl])
            else:
                run_pipeline(bt_gmem.at[n_sl, :], sb_gmem.at[:, n_sl])

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def _pad2(x: jax.Array, r: int, c: int) -> jax.Array:
    if x.shape[-2:] == (r, c):
        return x
    return jnp.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, r - x.shape[-2]), (0, c - x.shape[-1])])


def _up(x: int, b: int) -> int:
    return -(-x // b) * b


def _call(mode: str, args: tuple, out_shape: tuple[int, ...], out_dtype, steps: int, b_block: bool, overlap: bool,
          interpret: bool) -> jax.Array:
    plgpu = _mgpu()
    f = plgpu.kernel(
        functools.partial(_kernel, out_dtype=jnp.dtype(out_dtype), max_concurrent_steps=steps, b_block=b_block,
                          overlap=overlap, mode=mode),
        out_type=jax.ShapeDtypeStruct(out_shape, out_dtype),
        grid=(2 if interpret else _num_sms(),),
        grid_names=("cluster_grid",),
        cluster=(1,),
        cluster_names=("cluster",),
        num_threads=3,
        thread_name="wg",
        **({"interpret": _interpret_params()} if interpret else {}),
    )
    return f(*args)


_STATIC = ("out_dtype", "max_concurrent_steps", "b_block", "overlap", "interpret")


@functools.partial(jax.jit, static_argnames=_STATIC)
def block_scaled_matmul_nk(a_q: jax.Array, a_scale: jax.Array, bt_q: jax.Array, b_scale: jax.Array,
                           out_dtype: jnp.dtype = jnp.bfloat16, *, max_concurrent_steps: int = 4,
                           b_block: bool = False, overlap: bool = False, interpret: bool = False) -> jax.Array:
    """FP8 GEMM with FP32 promotion every 128 of K on Hopper → ``out_dtype`` [M, N].

    a_q [M, K] E4M3 with a_scale f32 [M, ceil(K/128)]; bt_q [N, K] E4M3 (B K-major) with b_scale f32
    [ceil(K/128), N]. ``y = Σ_c (a_q[:, c] · bt_q[:, c]ᵀ) · a_scale[:, c] ⊗ b_scale[c]`` (= ``fp8.chunked_dot``
    with ``b_q = bt_q.T``). Shapes that are not multiples of 128 are zero-padded (values and scales).
    ``b_block``: b_scale is constant over each 128-column block (a weight's 128×128 blocks), read once per
    chunk. ``overlap``: promote chunk c-1 while chunk c's MMA runs (more registers).
    """
    M, K = a_q.shape
    N = bt_q.shape[0]
    Kb = -(-K // BLOCK)
    if bt_q.shape[1] != K or a_scale.shape != (M, Kb) or b_scale.shape != (Kb, N):
        raise ValueError(f"block-scaled FP8 GEMM (Mosaic GPU): a_q {a_q.shape}, a_scale {a_scale.shape}, bt_q "
                         f"{bt_q.shape}, b_scale {b_scale.shape}; expected a_scale {(M, Kb)}, b_scale {(Kb, N)}")
    Mp, Np, Kp = _up(M, 2 * TILE_M), _up(N, TILE_N), Kb * BLOCK
    args = (_pad2(a_q, Mp, Kp), _pad2(bt_q, Np, Kp), _pad2(a_scale.astype(jnp.float32).T, Kb, Mp),
            _pad2(b_scale.astype(jnp.float32), Kb, Np))
    out = _call("dense", args, (Mp, Np), out_dtype, max_concurrent_steps, b_block, overlap, interpret)
    return out[:M, :N] if (Mp, Np) != (M, N) else out


def group_of_slabs(group_sizes: jax.Array, rows: int, slab: int) -> jax.Array:
    """Group of each ``slab``-row slab of ``rows`` grouped rows [rows/slab], -1 past the last group (every group
    size a multiple of ``slab``). Also the BF16 kernels' tile table (:mod:`.bf16_gemm_mgpu`)."""
    ends = jnp.cumsum(group_sizes.astype(jnp.int32))
    t = jnp.arange(rows // slab, dtype=jnp.int32) * slab
    g = jnp.searchsorted(ends, t, side="right", method="compare_all").astype(jnp.int32)  # see fp8.group_ids
    return jnp.where(t < ends[-1], g, -1)


def aligned_tiles(group_sizes: jax.Array, rows: int) -> tuple[jax.Array, jax.Array]:
    """For rows grouped contiguously in groups whose sizes are multiples of 128 (:func:`dsv3_jax.moe` pads them):
    (group of each 128-row tile [rows/128], -1 past the last group; the same with a trailing -1, [rows/128 + 1])."""
    g = group_of_slabs(group_sizes, rows, BLOCK)
    return g, jnp.concatenate([g, jnp.full((1,), -1, jnp.int32)])


@functools.partial(jax.jit, static_argnames=_STATIC)
def block_scaled_grouped_matmul_nk(a_q: jax.Array, a_scale: jax.Array, bt_q: jax.Array, b_scale: jax.Array,
                                   group_sizes: jax.Array, out_dtype: jnp.dtype = jnp.bfloat16, *,
                                   max_concurrent_steps: int = 4, b_block: bool = False, overlap: bool = False,
                                   interpret: bool = False) -> jax.Array:
    """MoE expert GEMM in FP8 on Hopper, rows in 128-aligned groups → ``out_dtype`` [M, N].

    a_q [M, K] (M a multiple of 128) with rows grouped contiguously by ``group_sizes`` [G], every size a
    multiple of 128 (128-row tiles past the sum come out zero without being computed);
    a_scale [M, ceil(K/128)]; bt_q [G, N, K] (each expert's weight K-major); b_scale [G, ceil(K/128), N].
    """
    M, K = a_q.shape
    G, N, _ = bt_q.shape
    Kb = -(-K // BLOCK)
    if M % (2 * TILE_M) or bt_q.shape[2] != K or a_scale.shape != (M, Kb) or b_scale.shape != (G, Kb, N):
        raise ValueError(f"grouped FP8 GEMM (Mosaic GPU): a_q {a_q.shape} (rows a multiple of 128), a_scale "
                         f"{a_scale.shape}, bt_q {bt_q.shape}, b_scale {b_scale.shape}")
    Np, Kp = _up(N, TILE_N), Kb * BLOCK
    gid = aligned_tiles(group_sizes, M)[0]  # -1 past the last group: those tiles are written as zeros
    args = (gid, _pad2(a_q, M, Kp), _pad2(bt_q, Np, Kp), _pad2(a_scale.astype(jnp.float32).T, Kb, M),
            _pad2(b_scale.astype(jnp.float32), Kb, Np))
    out = _call("grouped", args, (M, Np), out_dtype, max_concurrent_steps, b_block, overlap, interpret)
    return out[:, :N] if Np != N else out


@functools.partial(jax.jit, static_argnames=("out_dtype", "max_concurrent_steps", "interpret"))
def block_scaled_kgrouped_matmul_nk(a_q: jax.Array, a_scale: jax.Array, bt_q: jax.Array, b_scale: jax.Array,
                                    group_sizes: jax.Array, out_dtype: jnp.dtype = jnp.float32, *,
                                    max_concurrent_steps: int = 4, interpret: bool = False) -> jax.Array:
    """MoE expert Wgrad in FP8 on Hopper: per group g, ``a[:, rows_g] · bt[:, rows_g]ᵀ`` → [G, M, N].

    Contraction over tokens: a_q [M, T] (e.g. xᵀ, channels × tokens) with a_scale [M, T/128]; bt_q [N, T]
    (dyᵀ) with b_scale [T/128, N]; tokens grouped contiguously by ``group_sizes`` [G], every size a multiple of
    128 (so 128-token scale tiles never straddle groups: DeepGEMM's k-grouped layout). Empty groups → 0.
    """
    M, T = a_q.shape
    N = bt_q.shape[0]
    Tb = T // BLOCK
    if T % BLOCK or bt_q.shape[1] != T or a_scale.shape != (M, Tb) or b_scale.shape != (Tb, N):
        raise ValueError(f"k-grouped FP8 GEMM (Mosaic GPU): a_q {a_q.shape} (tokens a multiple of 128), a_scale "
                         f"{a_scale.shape}, bt_q {bt_q.shape}, b_scale {b_scale.shape}")
    G = group_sizes.shape[0]
    Mp, Np = _up(M, 2 * TILE_M), _up(N, TILE_N)
    gid = aligned_tiles(group_sizes, T)[1]
    args = (gid, _pad2(a_q, Mp, T), _pad2(bt_q, Np, T), _pad2(a_scale.astype(jnp.float32).T, Tb, Mp),
            _pad2(b_scale.astype(jnp.float32), Tb, Np))
    out = _call("kgrouped", args, (G, Mp, Np), out_dtype, max_concurrent_steps, False, False, interpret)
    out = jnp.where((group_sizes > 0)[:, None, None], out, 0)  # groups without tokens were never written
    return out[:, :M, :N] if (Mp, Np) != (M, N) else out
