"""The Hopper BF16 grouped GEMMs (dsv3_jax/kernels/bf16_gemm_mgpu.py, Pallas Mosaic GPU) against XLA's
``ragged_dot`` in Mosaic-GPU interpret mode on CPU: forward, the Dgrad that reads the weight transposed in shared
memory, the k-grouped Wgrad (both accumulation forms; its per-chunk schedules and live-row trimming), the ``mgpu``
custom VJP of ``grouped_matmul`` (tilings from the environment), and MoE's
dispatch on it end to end, on 128-aligned groups with an empty group and trailing padding.

Tolerances: kernel and XLA both multiply exact BF16 products and accumulate in FP32, in different orders, so FP32
results agree to a few FP32 ulps of the largest partial sum (1e-5 relative to the output's max); BF16 results are
that FP32 value rounded once, so an order difference can flip one rounding: ≤ 1 BF16 ulp (2⁻⁸ relative).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax import moe
from dsv3_jax.config import ModelConfig
from dsv3_jax.kernels import bf16_gemm_mgpu as bg
from dsv3_jax.kernels.grouped_matmul import grouped_matmul, kernel_tiling

SIZES = (128, 0, 256)  # an empty group; 3 of 4 row tiles used, the last is the static bound's padding
ROWS = 512
BF16_ULP = 2.0 ** -8


def _randn(shape, seed, dtype=jnp.bfloat16) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


def _rows(K: int, seed: int) -> jax.Array:
    """[ROWS, K] BF16 rows for SIZES, zero past their sum (the padding an aligned layout leaves)."""
    return _randn((ROWS, K), seed).at[sum(SIZES):].set(0)


def _close(got, ref, rel: float) -> None:
    ref = np.asarray(ref, np.float32)
    np.testing.assert_allclose(np.asarray(got, np.float32), ref, rtol=0, atol=rel * np.abs(ref).max())


_WGRAD_DN = jax.lax.RaggedDotDimensionNumbers(dot_dimension_numbers=(([0], [0]), ([], [])),
                                              lhs_ragged_dimensions=[0], rhs_group_dimensions=[])


@pytest.mark.parametrize("transpose_b", [False, True])
def test_grouped_kernel_equals_ragged_dot(transpose_b):
    """Forward (b [G, K, N] as stored) and the Dgrad form (b [G, N, K] read transposed); N = 96 is zero-padded."""
    sizes = jnp.array(SIZES, jnp.int32)
    a, w = _rows(128, 1), _randn((3, 128, 96), 2)
    ref = jax.lax.ragged_dot(a, w, sizes, preferred_element_type=jnp.float32)
    b = jnp.swapaxes(w, 1, 2) if transpose_b else w
    got = bg.grouped_matmul(a, b, sizes, jnp.float32, transpose_b=transpose_b, tile_n=64, interpret=True)
    assert got.shape == (ROWS, 96) and got.dtype == jnp.float32
    _close(got, ref, 1e-5)
    assert not np.asarray(got[sum(SIZES):]).any()  # padding tiles are written as zeros


@pytest.mark.parametrize("acc_in_place", [True, False])
def test_kgrouped_kernel_equals_ragged_dot_general(acc_in_place):
    """Wgrad per expert over its tokens; the empty group comes out zero; M = 64 and N = 96 are zero-padded."""
    if acc_in_place and not bg._interpreter_runs_acc_init():
        pytest.skip("this jax's Mosaic GPU interpreter cannot run pl.run_state accumulators (the GPU can)")
    sizes = jnp.array(SIZES, jnp.int32)
    x, dy = _rows(64, 3), _rows(96, 4)
    ref = jax.lax.ragged_dot_general(x, dy, sizes, _WGRAD_DN, preferred_element_type=jnp.float32)
    got = bg.kgrouped_matmul(x, dy, sizes, jnp.float32, tile_n=64, interpret=True, acc_in_place=acc_in_place)
    assert got.shape == (3, 64, 96)
    _close(got, ref, 1e-5)
    assert not np.asarray(got[1]).any()


@pytest.mark.parametrize("tile_n,tile_k,steps,groups_per_item", [(64, 128, 3, 2), (128, 64, 4, 3)])
def test_kgrouped_schedules_equal_ragged_dot_general(tile_n, tile_k, steps, groups_per_item):
    """The Wgrad's per-chunk schedules (bf16_gemm_mgpu.chunk_table: a dynamic-length pipeline over two or all three
    groups' slabs; one group each: the live-rows test) at 64- and 128-token steps, against XLA; the empty group
    comes out zero."""
    sizes = jnp.array(SIZES, jnp.int32)
    x, dy = _rows(64, 3), _rows(96, 4)
    ref = jax.lax.ragged_dot_general(x, dy, sizes, _WGRAD_DN, preferred_element_type=jnp.float32)
    got = bg.kgrouped_matmul(x, dy, sizes, jnp.float32, tile_n=tile_n, tile_k=tile_k, max_concurrent_steps=steps,
                             groups_per_item=groups_per_item, interpret=True)
    assert got.shape == (3, 64, 96)
    _close(got, ref, 1e-5)
    assert not np.asarray(got[1]).any()


def test_kgrouped_live_sizes_skip_trailing_slabs():
    """With ``live_sizes`` (60, 0, 100) the 64-token slabs wholly past a group's live rows are never read: rows
    there hold garbage (NaN), and the result equals XLA on the live rows alone (rows between the live count and
    its slab's end are zero, as the aligned layout's padding is)."""
    sizes, live = jnp.array(SIZES, jnp.int32), jnp.array([60, 0, 100], jnp.int32)
    r = np.arange(ROWS)
    is_live = (r < 60) | ((r >= 128) & (r < 228))
    skipped = ((r >= 64) & (r < 128)) | (r >= 256)  # whole slabs past the live rows
    x, dy = _rows(64, 3), _rows(96, 4)
    x, dy = (jnp.where(is_live[:, None], t, jnp.where(skipped[:, None], jnp.nan, 0)).astype(t.dtype) for t in (x, dy))
    ref = jax.lax.ragged_dot_general(jnp.where(is_live[:, None], x, 0), jnp.where(is_live[:, None], dy, 0), sizes,
                                     _WGRAD_DN, preferred_element_type=jnp.float32)
    got = bg.kgrouped_matmul(x, dy, sizes, jnp.float32, tile_n=64, live_sizes=live, groups_per_item=1,
                             interpret=True)
    _close(got, ref, 1e-5)


def test_chunk_table():
    """(first slab, slabs) per run of groups: sizes (128, 0, 256, 128) in 64-token slabs."""
    sizes = jnp.array([128, 0, 256, 128], jnp.int32)
    np.testing.assert_array_equal(bg.chunk_table(sizes, None, 1, 64), [[0, 2, 2, 6], [2, 0, 4, 2]])
    np.testing.assert_array_equal(bg.chunk_table(sizes, None, 3, 128), [[0, 3], [3, 1]])
    live = jnp.array([100, 0, 130, 1], jnp.int32)
    np.testing.assert_array_equal(bg.chunk_table(sizes, live, 1, 64), [[0, 2, 2, 6], [2, 0, 3, 1]])
    np.testing.assert_array_equal(bg.chunk_table(sizes, live, 2, 64), [[0, 2], [2, 5]])  # group 2 read whole


def test_forward_128_deep_steps_equals_ragged_dot():
    """The forward at 128-deep K steps (tile_k 128: two swizzle rows per pipeline step)."""
    sizes = jnp.array(SIZES, jnp.int32)
    a, w = _rows(256, 1), _randn((3, 256, 128), 2)
    ref = jax.lax.ragged_dot(a, w, sizes, preferred_element_type=jnp.float32)
    _close(bg.grouped_matmul(a, w, sizes, jnp.float32, tile_n=64, tile_k=128, interpret=True), ref, 1e-5)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="multiple of 128"):
        bg.grouped_matmul(jnp.zeros((100, 64), jnp.bfloat16), jnp.zeros((1, 64, 64), jnp.bfloat16),
                          jnp.array([100]), interpret=True)
    with pytest.raises(ValueError, match="tile_k 96"):
        bg.kgrouped_matmul(jnp.zeros((128, 64), jnp.bfloat16), jnp.zeros((128, 64), jnp.bfloat16),
                           jnp.array([128]), tile_k=96, interpret=True)
    with pytest.raises(ValueError, match="live_sizes"):
        bg.kgrouped_matmul(jnp.zeros((128, 64), jnp.bfloat16), jnp.zeros((128, 64), jnp.bfloat16),
                           jnp.array([128]), live_sizes=jnp.array([100]), interpret=True)


def test_kernel_tiling_from_env(monkeypatch):
    monkeypatch.delenv("DSV3_BF16_WGRAD", raising=False)
    monkeypatch.delenv("DSV3_BF16_FWD", raising=False)
    monkeypatch.delenv("DSV3_BF16_DGRAD", raising=False)
    # the H100 sweep's winners (bench/results/2026-12-07-s7/bf16_sweep.log)
    assert kernel_tiling("wgrad", 1024) == {"tile_n": 128, "tile_k": 128, "max_concurrent_steps": 2,
                                            "groups_per_item": 4}
    assert kernel_tiling("dgrad", 1024, 2048) == {"tile_n": 128, "tile_k": 128, "max_concurrent_steps": 2}
    assert kernel_tiling("dgrad", 1024, 64)["tile_k"] == 64  # a contraction shorter than the deep step
    assert kernel_tiling("fwd", 1024) == {"tile_n": 128, "tile_k": 64, "max_concurrent_steps": 3}
    monkeypatch.setenv("DSV3_BF16_WGRAD", "tile_n=64, steps=4,gpi=1,tile_k=64")
    assert kernel_tiling("wgrad", 1024) == {"tile_n": 64, "tile_k": 64, "max_concurrent_steps": 4,
                                            "groups_per_item": 1}
    monkeypatch.setenv("DSV3_BF16_FWD", "gpi=1")  # the forward has no group chunks
    with pytest.raises(ValueError, match="DSV3_BF16_FWD"):
        kernel_tiling("fwd", 1024)


def test_mgpu_custom_vjp_equals_xla(monkeypatch):
    """grouped_matmul(impl='mgpu', aligned) forward and both gradients against impl='xla' (XLA's ragged_dot and its
    transposes) in BF16: FP32 accumulation rounded once to BF16 on both sides → ≤ 1 BF16 ulp of the max. The
    Dgrad and Wgrad take tilings from the environment (128-deep steps; the per-group Wgrad schedule, given the live
    rows: x is zero past them): the kernels' defaults are tested above and in the MoE test below."""
    monkeypatch.setenv("DSV3_BF16_DGRAD", "tile_k=128")
    monkeypatch.setenv("DSV3_BF16_WGRAD", "gpi=1,steps=2")
    sizes, live = jnp.array(SIZES, jnp.int32), jnp.array([128, 0, 192], jnp.int32)  # live: the Wgrad skips a slab
    x, w, ct = _rows(64, 5).at[320:].set(0), _randn((3, 64, 128), 6, jnp.float32) * 0.1, _rows(128, 7)

    def f(impl):
        def loss(x, w):
            y = grouped_matmul(x, w, sizes, impl, aligned=True, live_sizes=live)
            return jnp.sum(y.astype(jnp.float32) * ct.astype(jnp.float32)), y
        (_, y), (dx, dw) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(x, w)
        return y, dx, dw

    got, ref = f("mgpu"), f("xla")
    for g, r in zip(got, ref):
        assert g.dtype == r.dtype and g.shape == r.shape
    assert got[2].dtype == jnp.float32  # the master weight's gradient, through the cast
    used = sum(SIZES)
    _close(got[0][:used], ref[0][:used], BF16_ULP)
    _close(got[1][:used], ref[1][:used], BF16_ULP)
    _close(got[2], ref[2], BF16_ULP)


@pytest.mark.slow
def test_moe_dispatch_on_mgpu_equals_xla():
    """dispatch_ragged with the BF16 Hopper kernels (experts padded to 128 rows) against the unpadded XLA path:
    the output and the gradients of x and of the three expert weights."""
    cfg = ModelConfig(n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1)
    N, d, F, E = 64, 64, 128, 4
    x = _randn((N, d), 8)
    logits = _randn((N, E), 9, jnp.float32)
    r = moe.route(logits, None, cfg)
    ws = [_randn(s, 10 + i, jnp.float32) * 0.1 for i, s in enumerate([(E, d, F), (E, d, F), (E, F, d)])]

    def run(impl, align):
        def loss(x, *ws):
            y = moe.dispatch_ragged(x, r, *ws, impl=impl, align=align)
            return jnp.sum(y.astype(jnp.float32) ** 2), y
        (_, y), g = jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(x, *ws)
        return (y, *g)

    got, ref = run("mgpu", 128), run("xla", 0)
    # Two BF16 GEMMs, a BF16 SwiGLU between them and the combine: each BF16 rounding may flip (≤ 1 ulp) and
    # propagate; 4 ulps of the max bounds the chain (the gradients go through it twice).
    for g, r_ in zip(got, ref):
        _close(g, r_, 4 * BF16_ULP)
