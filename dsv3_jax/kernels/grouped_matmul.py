"""Grouped (ragged) matmul for MoE experts: rows sorted by group, one weight matrix per group.

``lhs [M, k]`` rows are grouped contiguously by ``group_sizes [G]``; ``rhs [G, k, n]`` → ``[M, n]``. Rows past
``sum(group_sizes)`` are unspecified (callers mask them). Implementations (``impl``):

- ``tokamax``: tokamax's Mosaic-GPU ``ragged_dot`` (jax.lax.ragged_dot is ~7 TFLOP/s on H100, ../shared/GPU.md);
- ``xla``: ``jax.lax.ragged_dot``;
- ``mgpu``: this project's Hopper BF16 kernels (:mod:`.bf16_gemm_mgpu`: forward, Dgrad and k-grouped Wgrad under
  one custom VJP; tiling by :func:`kernel_tiling`), only on rows in 128-aligned groups (``aligned``,
  :func:`dsv3_jax.moe.aligned_layout`);
  unaligned calls take ``auto``. Off the GPU they run in Mosaic GPU's interpreter (slow: tests only);
- ``auto``: ``mgpu`` on a GPU when the rows are aligned (unless ``DSV3_BF16_GEMM=tokamax``), else tokamax on a GPU
  with tokamax installed, else xla. Measured at the bench config (13 layers, H200, sixth session): the BF16 step
  254 ms with ``mgpu`` against 336 ms with tokamax, and 65.2 against 71.7 GiB at peak (BENCHMARKS.md).

All are differentiable.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp

from dsv3_jax.kernels import bf16_gemm_mgpu
from dsv3_jax.kernels._backend import on_gpu, tokamax

IMPLS = ("auto", "xla", "tokamax", "mgpu")
MODES = ("mgpu", "tokamax")


def bf16_gemm_mode() -> str:
    """``DSV3_BF16_GEMM`` (read at every call; default ``mgpu``): ``mgpu`` lets ``impl='auto'`` take the Hopper
    BF16 kernels on a GPU (for rows the MoE dispatch lays out 128-aligned); ``tokamax`` keeps tokamax / XLA."""
    mode = os.environ.get("DSV3_BF16_GEMM", "mgpu").strip().lower() or "mgpu"
    if mode not in MODES:
        raise ValueError(f"DSV3_BF16_GEMM={mode!r}: expected one of {MODES}")
    return mode


def wants_aligned_rows(impl: str) -> bool:
    """Whether ``impl`` would run the ``mgpu`` kernels, so MoE dispatch should pad experts to 128 rows."""
    return impl == "mgpu" or (impl == "auto" and on_gpu() and bf16_gemm_mode() == "mgpu")


def _tile_n(n: int) -> int:
    """Columns per compute warpgroup: 128 (the fast tile); 64 for narrow outputs (N ≤ 128: the tests)."""
    return 128 if n > 128 else 64


# kernel keyword of each DSV3_BF16_{FWD,DGRAD,WGRAD} key (bench/bf16_wgrad_sweep.py names its variants the same way)
_TILING_KEYS = {"tile_n": "tile_n", "tile_k": "tile_k", "steps": "max_concurrent_steps", "gpi": "groups_per_item"}


def kernel_tiling(op: str, n: int, k: int | None = None) -> dict[str, int]:
    """Tiling keywords of the ``mgpu`` kernel for ``op`` (fwd, dgrad or wgrad) with N = ``n`` output columns:
    defaults (the winners of ``bash bench/gpu_bf16_sweep.sh`` on an H100, bench/results/2026-12-07-s7: forward
    tile_n by :func:`_tile_n`, 64-deep K steps, 3 in flight; Dgrad 128-deep K steps, 2 in flight; Wgrad 128 × 256
    tiles, 128-deep K steps, 2 in flight, one work item per tile of a run of 4 experts), each overridable from ``DSV3_BF16_<OP>`` = comma-separated ``key=value``
    with keys tile_n, tile_k, steps and (wgrad) gpi, e.g. ``DSV3_BF16_WGRAD=tile_n=64,steps=4,gpi=1`` — read at trace time, so a sweep's winner can be tried in
    the training step (bench/train.py) before it becomes the default."""
    kw = {"tile_n": _tile_n(n), "tile_k": bf16_gemm_mgpu.TILE_K, "max_concurrent_steps": 3}
    if op == "dgrad" and (k is None or k % 128 == 0):  # H100 sweep: 0.933 ms for both shapes against
        kw.update(tile_k=128, max_concurrent_steps=2)  # 0.96-0.99 at 64-deep steps (k: the contraction, = N)
    if op == "wgrad":  # H100 sweep: 306-307 TFLOP/s against 235-244 for the all-tokens schedule (gpi=0), whose
        # items are only the output tiles (64-128 on 132 SMs); per-expert-run items fill the machine
        kw.update(tile_k=128, max_concurrent_steps=2, groups_per_item=4)
    var = f"DSV3_BF16_{op.upper()}"
    for item in filter(None, os.environ.get(var, "").replace(" ", "").split(",")):
        key, _, value = item.partition("=")
        if _TILING_KEYS.get(key) not in kw or not value.isdigit():
            raise ValueError(f"{var}={os.environ[var]!r}: expected key=value items with keys "
                             f"{[k for k, v in _TILING_KEYS.items() if v in kw]} and integer values")
        kw[_TILING_KEYS[key]] = int(value)
    return kw


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _mgpu_grouped(x: jax.Array, w: jax.Array, group_sizes: jax.Array, live_sizes: jax.Array | None, interpret: bool
                  ) -> jax.Array:
    """x [M, K] (aligned groups) × w [G, K, N] (x's dtype) → [M, N] on the Hopper BF16 kernels. ``live_sizes`` [G]
    (rows before each group's zero padding, or None): lets a per-group Wgrad schedule skip the padding's slabs."""
    return bf16_gemm_mgpu.grouped_matmul(x, w, group_sizes, interpret=interpret, **kernel_tiling("fwd", w.shape[2]))


def _mgpu_grouped_fwd(x, w, group_sizes, live_sizes, interpret):
    return _mgpu_grouped(x, w, group_sizes, live_sizes, interpret), (x, w, group_sizes, live_sizes)


def _mgpu_grouped_bwd(interpret, res, dy):
    x, w, group_sizes, live_sizes = res
    dy = dy.astype(x.dtype)
    # Dgrad: dy [M, N] · w[g]ᵀ, w read as stored ([G, K, N] is the transposed operand's [G, out, contraction])
    dx = bf16_gemm_mgpu.grouped_matmul(dy, w, group_sizes, transpose_b=True, interpret=interpret,
                                       **kernel_tiling("dgrad", w.shape[1], w.shape[2]))
    # Wgrad: per expert x[rows]ᵀ · dy[rows], both token-major as they are
    tiling = kernel_tiling("wgrad", w.shape[2])
    live = live_sizes if tiling["groups_per_item"] else None  # the all-tokens schedule reads every slab
    dw = bf16_gemm_mgpu.kgrouped_matmul(x, dy, group_sizes, w.dtype, live_sizes=live, interpret=interpret, **tiling)
    return dx, dw, None, None


_mgpu_grouped.defvjp(_mgpu_grouped_fwd, _mgpu_grouped_bwd)


def grouped_matmul(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, impl: str = "auto",
                   aligned: bool = False, live_sizes: jax.Array | None = None) -> jax.Array:
    """[M, k] × [G, k, n] with contiguous row groups → [M, n] in lhs.dtype (f32 accumulation).

    ``aligned``: M and every group size are multiples of 128 and rows past the sum are zero (what
    :func:`dsv3_jax.moe.aligned_layout` makes): only then can ``mgpu`` run. ``live_sizes`` [G] (``mgpu`` only;
    rows of each group before its zero padding, e.g. the unpadded expert loads): the Wgrad's per-group schedule
    (``DSV3_BF16_WGRAD=...,gpi=N``) then skips each chunk's trailing all-zero slabs; the other impls ignore it.
    """
    if impl not in IMPLS:
        raise ValueError(f"grouped_matmul impl={impl!r}: expected one of {IMPLS}")
    rhs = rhs.astype(lhs.dtype)
    group_sizes = group_sizes.astype(jnp.int32)
    if aligned and wants_aligned_rows(impl):
        live = None if live_sizes is None else live_sizes.astype(jnp.int32)
        return _mgpu_grouped(lhs, rhs, group_sizes, live, not on_gpu())
    tk = tokamax() if impl in ("auto", "tokamax", "mgpu") else None
    if impl == "tokamax" and tk is None:
        raise RuntimeError("grouped_matmul impl='tokamax' needs a GPU and the tokamax package (pip install .[gpu])")
    if tk is not None:
        return tk.ragged_dot(lhs, rhs, group_sizes, preferred_element_type=lhs.dtype)
    out = jax.lax.ragged_dot(lhs, rhs, group_sizes, preferred_element_type=jnp.float32)
    return out.astype(lhs.dtype)
