"""BF16 grouped GEMMs for Hopper as Pallas Mosaic-GPU kernels (WGMMA, TMA, warp specialisation): the MoE experts'
forward, input-grad (Dgrad) and k-grouped weight-grad (Wgrad) on the 128-row aligned expert layout.

The FP8 kernels of :mod:`.fp8_gemm_mgpu` are the template (persistent grid of one CTA per SM over output tiles, a
memory warpgroup streaming K slabs through shared memory with TMA, two compute warpgroups); BF16 has no scales, so
each compute warpgroup simply accumulates into its WGMMA accumulator. BF16 WGMMA reads either operand transposed
from shared memory (FP8's cannot), so no operand is ever transposed in HBM::

    grouped   y[r]  = a[r] · b[g(r)]        a [M, K]           b [G, K, N]  (fwd: x · W_g, the stored layout)
    grouped   dx[r] = dy[r] · b[g(r)]ᵀ      a [M, N']          b [G, K', N'] read as Bᵀ (Dgrad on the same W)
    kgrouped  dW_g  = Σ_{r ∈ g} a[r]ᵀ b[r]  a [T, K] read as Aᵀ b [T, N]        (Wgrad: xᵀ·dy per expert)

Rows (tokens) come grouped contiguously in groups whose sizes are multiples of 128 (:func:`dsv3_jax.moe.
aligned_layout`): a 128-row CTA tile (grouped) or a 64-token K slab (kgrouped) never straddles two experts.
CTA tile 128 rows × 2·tile_n columns (each compute warpgroup owns 128 × tile_n), K slab 64 (one 128-byte swizzle
row of BF16). Hopper (sm_90) only; off the GPU the same kernels run in Mosaic GPU's interpreter (the CPU tests).
Tiling (tile_n, tile_k, pipeline depth, the Wgrad's group chunks) is explicit in each wrapper; bench/
bf16_wgrad_sweep.py times every variant at the bench shapes.

Not here: the MoE dispatch gather fused into the forward's prologue (issue 20 item 2). Pallas Mosaic GPU (jax 0.11.2
and 0.12.1) has no Hopper path to gather rows into a WGMMA operand tile: an array-indexed TMA lowers to
``tile::gather4`` (Blackwell only); there is no per-thread ``cp.async``; a one-row TMA into the tiled (8, 64) +
swizzled tile WGMMA reads is refused (row slices must be multiples of the 8-row tile); one-row TMAs do lower into an
untiled swizzled [16, 8, 64] buffer or a (1, 64)-tiled one, but WGMMA accepts neither (layout inference fails on
the reshape to [128, 64] and on the (1, 64) tiling). What remains is a re-layout pass through registers per tile;
bench/mgpu_row_gather_probe.py measures the one-row TMA gather that would feed it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from dsv3_jax.kernels.fp8_gemm_mgpu import _interpret_params, _mgpu, _num_sms, _up, group_of_slabs

ROWS = 128  # CTA rows = the aligned layout's group granularity
TILE_K = 64  # BF16 K slab: 64 × 2 bytes = one 128-byte swizzle row
EPI = 64  # epilogue tile (rows and columns): output staged through shared memory in 64×64 pieces


def _kernel(*refs, out_dtype, tile_n: int, steps: int, mode: str, a_t: bool, b_t: bool, acc_in_place: bool,
            tile_k: int = TILE_K, per_chunk: bool = False):
    """One kernel for the three layouts (see the module docstring), over [M/128, N/(2·tile_n)] output tiles and
    ``tile_k``-deep K steps (64: one 128-byte swizzle row of BF16; 128: two, half the pipeline steps).

    grouped   gid [M/128] (group of each 128-row tile, -1 past the last group), a [M, K], b [G, K, N]
              (``b_t``: [G, N, K]) → out [M, N]; tiles with gid -1 are stored as zeros without an MMA.
    kgrouped  gid [T/64 + 1] (group of each 64-token slab, -1 for none, then a -1 sentinel), a [T, M]
              (``a_t``), b [T, N] → out [G, M, N]; each group's slabs are contiguous; a tile is stored when
              its group's last slab is done (groups with no slab are never written: the wrapper zeroes them).
              ``acc_in_place``: each slab's MMA accumulates into the carried registers (``pl.run_state``), else
              into a fresh accumulator added to them (jax < 0.12's interpreter cannot run the former).
              ``per_chunk`` (refs gid, chunks [2, C], a, b, out): the work items are [C, M/128, N/cta_n] — chunk c
              (a run of whole groups) pipelines only its own slabs ``chunks[0, c] + [0, chunks[1, c])`` (a
              dynamic-length pipeline, as jax's transposed_ragged_dot_mgpu), so the output tiles of every
              group run in parallel across the SMs and slabs past the last group (or past a group's live rows)
              are never read or multiplied. Without it the items are [M/128, N/cta_n], each over all T/tile_k
              slabs (64 or 128 items at the bench shapes: half the SMs idle).
    """
    plgpu = _mgpu()
    if per_chunk:
        gid_gmem, chunks_gmem, zero_gmem, a_gmem, b_gmem, out_gmem = refs
    else:
        gid_gmem, a_gmem, b_gmem, out_gmem = refs
    if mode == "grouped":
        m, k = a_gmem.shape
        n = b_gmem.shape[-2] if b_t else b_gmem.shape[-1]
    else:
        k, m = a_gmem.shape
        n = b_gmem.shape[-1]
    cta_n = 2 * tile_n
    m_iters, n_iters, k_iters = m // ROWS, n // cta_n, k // tile_k
    steps = max(1, min(steps, k_iters))  # slots beyond the K steps would never fill
    swz = plgpu.find_swizzle(min(tile_k, TILE_K) * 16)
    tf = (plgpu.TilingTransform((8, swz // 2)), plgpu.SwizzleTransform(swz))
    out_bits = jnp.dtype(out_dtype).itemsize * 8
    out_swz = plgpu.find_swizzle(EPI * out_bits)
    out_tf = (plgpu.TilingTransform((8, out_swz * 8 // out_bits)), plgpu.SwizzleTransform(out_swz))
    shape = (ROWS, tile_n)
    a_block = (tile_k, ROWS) if a_t else (ROWS, tile_k)
    b_block = (cta_n, tile_k) if b_t else (tile_k, cta_n)

    def get_pipeline(body, compute_context, grid=(k_iters,), k0=0):
        """The warp-specialised pipeline over ``grid`` K steps starting at step ``k0`` (traced for per_chunk)."""
        a_map = (lambda kk: (k0 + kk, 0)) if a_t else (lambda kk: (0, k0 + kk))
        b_map = (lambda kk: (0, k0 + kk)) if b_t else (lambda kk: (k0 + kk, 0))
        return plgpu.emit_pipeline_warp_specialized(
            body,
            grid=grid,
            memory_registers=40,
            in_specs=[plgpu.BlockSpec(a_block, a_map, transforms=tf, memory_space=plgpu.SMEM),
                      plgpu.BlockSpec(b_block, b_map, transforms=tf, memory_space=plgpu.SMEM)],
            wg_axis="wg",
            num_compute_wgs=2,
            max_concurrent_steps=steps,
            compute_context=compute_context,
        )

    ignore = lambda *_, **__: None
    b0 = b_gmem.at[0] if mode == "grouped" else b_gmem

    @functools.partial(
        pl.run_scoped,
        pipeline_allocs=get_pipeline(ignore, ignore).get_allocations(a_gmem, b0),
        out_smem=plgpu.SMEM((2, 2, EPI, EPI), out_dtype, transforms=out_tf),
        collective_axes="wg",
    )
    def _scope(pipeline_allocs, out_smem):
        wg = lax.axis_index("wg")

        n_work = m_iters * n_iters * (chunks_gmem.shape[1] if per_chunk else 1)
        # per_chunk: then one item per group, which stores zeros over the group's whole output if zero_gmem names
        # it (a group without live slabs is never stored by the work items)
        n_items = n_work + (zero_gmem.shape[0] if per_chunk else 0)

        def store(acc, dst):
            """acc [128, tile_n] f32 (registers) → dst (this CTA's [128, 2·tile_n] output tile), in 64×64
            pieces through two shared-memory slots per warpgroup."""
            acc = acc.astype(out_dtype)
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            for i in range(ROWS // EPI):
                for j in range(tile_n // EPI):
                    slot = (i * (tile_n // EPI) + j) % 2
                    plgpu.wait_smem_to_gmem(1, wait_read_only=True)
                    out_smem[wg, slot] = acc[i * EPI:(i + 1) * EPI, j * EPI:(j + 1) * EPI]
                    plgpu.commit_smem()
                    plgpu.copy_smem_to_gmem(
                        out_smem.at[wg, slot],
                        dst.at[pl.ds(i * EPI, EPI), pl.ds(wg * tile_n + j * EPI, EPI)])

        def _item(lin):
            chunk, mn = lin // (m_iters * n_iters), lin % (m_iters * n_iters)  # chunk-major: a group's slabs
            mi, ni = mn // n_iters, mn % n_iters  # are read by consecutive items (L2)
            m_sl, n_sl = pl.ds(mi * ROWS, ROWS), pl.ds(ni * cta_n, cta_n)
            wg_cols = pl.ds(wg * tile_n, tile_n)

            def operands(a_smem, b_smem):
                a = a_smem.transpose((1, 0)) if a_t else a_smem
                b = b_smem.at[wg_cols].transpose((1, 0)) if b_t else b_smem.at[:, wg_cols]
                return a, b

            if mode == "grouped":
                def compute_context(eval_pipeline):
                    @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC(shape, jnp.float32))
                    def _acc(acc_ref):
                        eval_pipeline(acc_ref)
                        store(acc_ref[...], out_gmem.at[m_sl, n_sl])

                def body(_, a_smem, b_smem, acc_ref):
                    plgpu.wgmma(acc_ref, *operands(a_smem, b_smem))
                    plgpu.wgmma_wait(0)
                    return acc_ref

                g = gid_gmem[mi]
                gc = jnp.maximum(g, 0)
                b_tile = b_gmem.at[gc, n_sl, :] if b_t else b_gmem.at[gc, :, n_sl]

                @pl.when(g >= 0)
                def _run():
                    get_pipeline(body, compute_context)(a_gmem.at[m_sl, :], b_tile, allocations=pipeline_allocs)

                @pl.when((g < 0) & (wg < 2))
                def _zeros():  # tiles past the last group (the static bound's padding): zeros, no MMA
                    store(plgpu.layout_cast(jnp.zeros(shape, jnp.float32), plgpu.Layout.WGMMA),
                          out_gmem.at[m_sl, n_sl])
            else:
                def compute_context(eval_pipeline):
                    eval_pipeline(plgpu.layout_cast(jnp.zeros(shape, jnp.float32), plgpu.Layout.WGMMA))

                if per_chunk:
                    k0, n_steps = chunks_gmem[0, chunk], chunks_gmem[1, chunk]
                else:
                    k0, n_steps = 0, k_iters

                def body(idx, a_smem, b_smem, acc):
                    a, b = operands(a_smem, b_smem)

                    if acc_in_place:  # the MMA accumulates into the carried registers
                        def mma(acc_ref):
                            plgpu.wgmma(acc_ref, a, b)

                        acc = pl.run_state(mma)(plgpu.ACC.init(acc))
                    else:  # into a fresh zeroed accumulator, added after (as the FP8 kernel promotes)
                        def mma_part(part_ref):
                            plgpu.wgmma(part_ref, a, b)
                            return part_ref[...]

                        acc = acc + pl.run_scoped(mma_part, plgpu.ACC(shape, jnp.float32))
                    (kk,) = idx
                    c = k0 + kk
                    g, nxt = gid_gmem[c], gid_gmem[c + 1]
                    last = (g >= 0) & ((g != nxt) | (kk == n_steps - 1))  # a group's last (live) slab
                    pl.when(last)(lambda: store(acc, out_gmem.at[jnp.maximum(g, 0), m_sl, n_sl]))
                    return acc * jnp.where(last, 0.0, 1.0).astype(jnp.float32)  # a new group starts from zero

                if per_chunk:
                    @pl.when(n_steps > 0)
                    def _run_chunk():
                        get_pipeline(body, compute_context, (n_steps,), k0)(
                            a_gmem.at[:, m_sl], b_gmem.at[:, n_sl], allocations=pipeline_allocs)
                else:
                    get_pipeline(body, compute_context)(a_gmem.at[:, m_sl], b_gmem.at[:, n_sl],
                                                        allocations=pipeline_allocs)

        @plgpu.nd_loop((n_items,), collective_axes="cluster_grid")
        def _mn_loop(loop_info):
            (lin,) = loop_info.index
            if per_chunk:
                @pl.when(lin < n_work)
                def _work():
                    _item(lin)

                @pl.when((lin >= n_work) & (wg < 2))
                def _zero_group():
                    g = zero_gmem[jnp.maximum(lin - n_work, 0)]

                    @pl.when(g >= 0)
                    def _store_zeros():
                        zeros = plgpu.layout_cast(jnp.zeros((ROWS, tile_n), jnp.float32), plgpu.Layout.WGMMA)

                        @pl.loop(0, m_iters * n_iters)
                        def _tile(t):
                            store(zeros, out_gmem.at[g, pl.ds((t // n_iters) * ROWS, ROWS),
                                                     pl.ds((t % n_iters) * cta_n, cta_n)])
            else:
                _item(lin)

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def _call(mode: str, args: tuple, out_shape: tuple[int, ...], out_dtype, tile_n: int, steps: int, a_t: bool,
          b_t: bool, interpret: bool, acc_in_place: bool | None = None, tile_k: int = TILE_K,
          per_chunk: bool = False) -> jax.Array:
    plgpu = _mgpu()
    if acc_in_place is None:
        acc_in_place = not interpret or _interpreter_runs_acc_init()
    f = plgpu.kernel(
        functools.partial(_kernel, out_dtype=jnp.dtype(out_dtype), tile_n=tile_n, steps=steps, mode=mode, a_t=a_t,
                          b_t=b_t, acc_in_place=acc_in_place, tile_k=tile_k, per_chunk=per_chunk),
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


def _interpreter_runs_acc_init() -> bool:
    """Whether Mosaic GPU's interpreter runs ``pl.run_state`` on a ``plgpu.ACC.init`` accumulator inside the
    warp-specialised pipeline (jax 0.12 does; 0.11.2 fails with an unlowerable effect). The GPU runs it on both."""
    return tuple(int(v) for v in jax.__version__.split(".")[:2]) >= (0, 12)


def _pad_last(x: jax.Array, n: int, axis: int) -> jax.Array:
    if x.shape[axis] == n:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, n - x.shape[axis])
    return jnp.pad(x, pad)


def _check_tiles(tile_n: int, tile_k: int, steps: int) -> None:
    if tile_n not in (64, 128) or tile_k not in (64, 128) or steps < 1:
        raise ValueError(f"BF16 Mosaic GPU GEMM tiles: tile_n {tile_n} (64 or 128 columns per warpgroup), tile_k "
                         f"{tile_k} (64 or 128), max_concurrent_steps {steps} (≥ 1)")


_STATIC = ("out_dtype", "transpose_b", "tile_n", "tile_k", "max_concurrent_steps", "interpret")


@functools.partial(jax.jit, static_argnames=_STATIC)
def grouped_matmul(a: jax.Array, b: jax.Array, group_sizes: jax.Array, out_dtype=None, *, transpose_b: bool = False,
                   tile_n: int = 128, tile_k: int = TILE_K, max_concurrent_steps: int = 3, interpret: bool = False
                   ) -> jax.Array:
    """MoE expert GEMM in BF16 on 128-aligned groups: ``a[r] · b[g(r)]`` ([M, K] × [G, K, N] → [M, N]), or with
    ``transpose_b`` ``a[r] · b[g(r)]ᵀ`` (b [G, N, K]: the Dgrad reading the forward's weight as stored).

    M a multiple of 128, rows grouped contiguously by ``group_sizes`` [G], every size a multiple of 128; tiles
    past the sum come out zero without being computed. K a multiple of ``tile_k`` (64 or 128 per pipeline
    step); N is zero-padded to 2·tile_n. f32 accumulation, ``out_dtype`` (default a's) out.
    """
    _check_tiles(tile_n, tile_k, max_concurrent_steps)
    M, K = a.shape
    G = b.shape[0]
    N = b.shape[1] if transpose_b else b.shape[2]
    Kb = b.shape[2] if transpose_b else b.shape[1]
    if M % ROWS or K % tile_k or Kb != K or a.dtype != b.dtype or group_sizes.shape != (G,):
        raise ValueError(f"grouped BF16 GEMM (Mosaic GPU): a {a.shape} {a.dtype} (rows a multiple of {ROWS}, K of "
                         f"{tile_k}), b {b.shape} {b.dtype} (transpose_b={transpose_b}), group_sizes "
                         f"{group_sizes.shape}")
    out_dtype = jnp.dtype(out_dtype or a.dtype)
    Np = _up(N, 2 * tile_n)
    b = _pad_last(b, Np, 1 if transpose_b else 2)
    gid = group_of_slabs(group_sizes, M, ROWS)
    out = _call("grouped", (gid, a, b), (M, Np), out_dtype, tile_n, max_concurrent_steps, False, transpose_b,
                interpret, tile_k=tile_k)
    return out[:, :N] if Np != N else out


def chunk_table(group_sizes: jax.Array, live_sizes: jax.Array | None, groups_per_item: int, slab: int
                ) -> jax.Array:
    """The k-grouped kernel's work chunks [2, ceil(G / groups_per_item)]: (first slab, number of slabs) of each run
    of ``groups_per_item`` consecutive groups, the slabs being ``slab`` tokens of the rows grouped by
    ``group_sizes`` [G] (multiples of ``slab``). ``live_sizes`` [G] (≤ group_sizes; the rows before a group's
    zero padding): a chunk ends at its last group's last live slab, so that group's trailing all-zero slabs are
    skipped (the other groups of a chunk are read whole: their slabs are contiguous)."""
    G = group_sizes.shape[0]
    sizes = group_sizes.astype(jnp.int32)
    ends = jnp.cumsum(sizes)
    starts = ends - sizes
    first = jnp.arange(0, G, groups_per_item, dtype=jnp.int32)
    last = jnp.minimum(first + groups_per_item, G) - 1
    rows = sizes if live_sizes is None else jnp.minimum(live_sizes.astype(jnp.int32), sizes)
    lo = starts[first] // slab
    hi = -(-(starts[last] + rows[last]) // slab)
    return jnp.stack([lo, jnp.maximum(hi - lo, 0)]).astype(jnp.int32)


_KSTATIC = ("out_dtype", "tile_n", "tile_k", "max_concurrent_steps", "groups_per_item", "interpret", "acc_in_place")


@functools.partial(jax.jit, static_argnames=_KSTATIC)
def kgrouped_matmul(a: jax.Array, b: jax.Array, group_sizes: jax.Array, out_dtype=None, *, tile_n: int = 128,
                    tile_k: int = TILE_K, max_concurrent_steps: int = 3, groups_per_item: int = 0,
                    live_sizes: jax.Array | None = None, interpret: bool = False, acc_in_place: bool | None = None
                    ) -> jax.Array:
    """MoE expert Wgrad in BF16: per group g, ``a[rows_g]ᵀ · b[rows_g]`` ([T, M] × [T, N] → [G, M, N]).

    a (x) and b (dy) token-major as the forward produced them (read transposed by the MMA, never copied);
    tokens grouped contiguously by ``group_sizes`` [G], every size a multiple of ``tile_k`` (64 or 128 tokens per
    pipeline step; the aligned layout's 128 is both); T a multiple of ``tile_k``. M is zero-padded to 128, N to
    2·tile_n. Groups without tokens → 0. ``acc_in_place`` None: in place where the backend runs it (see
    :func:`_kernel`).

    ``groups_per_item`` ≥ 1: each CTA work item is one output tile of a run of that many groups, over only their
    slabs (:func:`chunk_table`; ``live_sizes`` [G] trims each run's last group to its live rows — rows past them
    must be zero, as the aligned layout's padding is); 0: each item is one output tile over all T tokens (every
    group in turn; the first kernel's schedule, kept for the sweep).
    """
    _check_tiles(tile_n, tile_k, max_concurrent_steps)
    T, M = a.shape
    N = b.shape[1]
    G = group_sizes.shape[0]
    if T % tile_k or b.shape[0] != T or a.dtype != b.dtype or groups_per_item < 0:
        raise ValueError(f"k-grouped BF16 GEMM (Mosaic GPU): a {a.shape} {a.dtype}, b {b.shape} {b.dtype} (same "
                         f"tokens, a multiple of {tile_k}), groups_per_item {groups_per_item} (≥ 0)")
    if live_sizes is not None and (groups_per_item == 0 or live_sizes.shape != (G,)):
        raise ValueError(f"live_sizes {live_sizes.shape} needs groups_per_item ≥ 1 and one size per group ({G})")
    out_dtype = jnp.dtype(out_dtype or a.dtype)
    Mp, Np = _up(M, ROWS), _up(N, 2 * tile_n)
    gid = jnp.concatenate([group_of_slabs(group_sizes, T, tile_k), jnp.full((1,), -1, jnp.int32)])
    written = group_sizes > 0 if live_sizes is None else (group_sizes > 0) & (live_sizes > 0)
    extra = ()
    if groups_per_item:  # the kernel stores the zeros of the groups no work item writes (no pass over out after)
        extra = (chunk_table(group_sizes, live_sizes, groups_per_item, tile_k),
                 jnp.where(written, -1, jnp.arange(G, dtype=jnp.int32)))
    out = _call("kgrouped", (gid, *extra, _pad_last(a, Mp, 1), _pad_last(b, Np, 1)), (G, Mp, Np), out_dtype,
                tile_n, max_concurrent_steps, True, False, interpret, acc_in_place, tile_k=tile_k,
                per_chunk=groups_per_item > 0)
    if not groups_per_item:  # the all-tokens schedule never writes a group without tokens
        out = jnp.where(written[:, None, None], out, 0)
    return out[:, :M, :N] if (Mp, Np) != (M, N) else out
