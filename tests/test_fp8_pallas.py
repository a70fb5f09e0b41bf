"""The block-scaled FP8 Pallas kernels (dsv3_jax/kernels/fp8_gemm.py) against the exact references of fp8.py,
in Pallas interpret mode on CPU: the dense GEMM, the grouped (expert) GEMM, the k-grouped expert Wgrad, and the
``DSV3_FP8_GEMM=pallas`` training path (forward and gradients equal to ``emulate``).

Both sides promote every 128 of K and form the same FP32 partials, so they agree to FP32 rounding (in practice
bit for bit on CPU); only the k-grouped Wgrad's reference (one FP32 ragged dot of dequantised operands) sums in
another order.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax import fp8
from dsv3_jax.kernels.fp8_gemm import (
    block_scaled_grouped_matmul,
    block_scaled_kgrouped_matmul,
    block_scaled_matmul,
    tile_map,
)


@pytest.fixture(autouse=True)
def _emulate(monkeypatch):
    """References run the exact emulation, whatever the environment says (tests opt in to pallas themselves)."""
    monkeypatch.setenv("DSV3_FP8_GEMM", "emulate")


def _randn(shape, seed) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _operands(M: int, K: int, N: int, seed: int, G: int | None = None, pow2: bool = False):
    """x [M, K] in 1×128 tiles and w [K, N] (or [G, K, N]) in 128×128 blocks, scales expanded to columns."""
    xq = fp8.quantize(_randn((M, K), seed), fp8.TILE, pow2)
    wq = fp8.quantize(_randn((K, N) if G is None else (G, K, N), seed + 1) * 0.05, fp8.WEIGHT, pow2)
    return xq.q, xq.scale, wq.q, fp8._cols(wq.scale, N)


def _close(got, ref, atol_rel: float = 1e-6) -> None:
    ref = np.asarray(ref, np.float32)
    np.testing.assert_allclose(np.asarray(got, np.float32), ref, rtol=0, atol=atol_rel * np.abs(ref).max())


@pytest.mark.parametrize("M,K,N", [(128, 256, 128), (70, 384, 200), (130, 256, 257), (5, 300, 64)])
def test_dense_kernel_equals_chunked_dot(M, K, N):
    """Aligned shapes; M, N edges (zero-padded to the 128 blocks); K = 384 (3 chunks) and ragged K = 300."""
    a, sa, b, sb = _operands(M, K, N, seed=M + K + N, pow2=M == 130)
    ref = fp8.chunked_dot(a, sa, b, sb)
    got = block_scaled_matmul(a, sa, b, sb, jnp.float32, interpret=True)
    assert got.shape == (M, N) and got.dtype == jnp.float32
    _close(got, ref)


def test_dense_kernel_k_major_b():
    """``b_nk``: B given as [N, K] (K-major, the layout FP8 tensor cores read), with M/N edges."""
    a, sa, b, sb = _operands(70, 384, 200, seed=11)
    ref = fp8.chunked_dot(a, sa, b, sb)
    _close(block_scaled_matmul(a, sa, b.T, sb, jnp.float32, interpret=True, b_nk=True), ref)


def test_dense_kernel_per_column_scales_small_blocks_bf16_out():
    """Wgrad's operands: 128-token tiles, so b's scales differ per column (not per 128×128 block); blocks smaller
    than 128 (several per scale block) and the default BF16 output."""
    x, g = _randn((200, 72), 4), _randn((200, 136), 5)
    xc, gc = fp8.quantize(x, fp8.COL_TILE), fp8.quantize(g, fp8.COL_TILE)
    ref = fp8.chunked_dot(xc.q.T, xc.scale.T, gc.q, gc.scale)
    got = block_scaled_matmul(xc.q.T, xc.scale.T, gc.q, gc.scale, interpret=True, block_m=32, block_n=64)
    assert got.dtype == jnp.bfloat16
    _close(got, ref.astype(jnp.bfloat16))


def test_tile_map_never_straddles_groups():
    sizes = jnp.asarray([0, 130, 0, 128, 30, 0], jnp.int32)
    g, first, end = (np.asarray(v) for v in tile_map(sizes, 300, 128))
    assert len(g) == 3 + 6 - 1
    used = first < end
    assert g[used].tolist() == [1, 1, 3, 4] and first[used].tolist() == [0, 128, 130, 258]
    assert end[used].tolist() == [130, 130, 258, 288]


@pytest.mark.parametrize("sizes,M,K,block_m", [
    ([100, 0, 150, 40], 300, 300, 128),  # an empty expert; 10 rows past the sum; ragged K
    ([0, 130, 0, 128, 30, 0], 300, 256, 128),  # empty first and last; a group of exactly 128; tiles cross 128s
    ([0, 0, 64], 64, 384, 16),  # everything in the last group, in 4 small tiles
    ([0, 0], 40, 128, 128)])  # no rows routed: all zero
def test_grouped_kernel_equals_grouped_chunked_dot(sizes, M, K, block_m):
    G, N = len(sizes), 200
    a, sa, b, sb = _operands(M, K, N, seed=G + M, G=G)
    sizes = jnp.asarray(sizes, jnp.int32)
    ref = fp8.grouped_chunked_dot(a, sa, b, sb, sizes)
    got = block_scaled_grouped_matmul(a, sa, b, sb, sizes, jnp.float32, interpret=True, block_m=block_m)
    assert got.shape == (M, N)
    if float(jnp.abs(ref).max()) == 0.0:
        assert float(jnp.abs(got).max()) == 0.0
    else:
        _close(got, ref)
    np.testing.assert_array_equal(np.asarray(got[int(sizes.sum()):]), 0.0)


def test_kgrouped_kernel_equals_ragged_wgrad_reference():
    """Expert Wgrad: per group xᵀ·dy over its rows; 128-token chunks straddle groups (rows 100, 250 cut them)."""
    sizes = jnp.asarray([100, 0, 150, 40], jnp.int32)
    x, g = _randn((300, 260), 8), _randn((300, 200), 9)
    xc, gc = fp8.quantize(x, fp8.COL_TILE), fp8.quantize(g, fp8.COL_TILE)
    dn = jax.lax.RaggedDotDimensionNumbers(dot_dimension_numbers=(([0], [0]), ([], [])),
                                           lhs_ragged_dimensions=[0], rhs_group_dimensions=[])
    ref = jax.lax.ragged_dot_general(fp8.dequantize(xc, fp8.COL_TILE), fp8.dequantize(gc, fp8.COL_TILE), sizes, dn,
                                     precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
    got = block_scaled_kgrouped_matmul(xc.q, xc.scale, gc.q, gc.scale, sizes, interpret=True)
    assert got.shape == (4, 260, 200)
    _close(got, ref, 1e-5)  # ref sums all of a group's rows at once; the kernel chunk by chunk
    assert float(jnp.abs(got[1]).max()) == 0.0


def test_gemm_mode_env(monkeypatch):
    monkeypatch.setenv("DSV3_FP8_GEMM", "auto")
    assert fp8.gemm_mode() == "emulate" and not fp8.dequant_gemm()  # this is a CPU backend
    monkeypatch.setenv("DSV3_FP8_GEMM", "pallas")
    assert fp8.gemm_mode() == "pallas" and not fp8.dequant_gemm()
    monkeypatch.setenv("DSV3_FP8_GEMM", "triton")
    with pytest.raises(ValueError, match="pallas"):
        fp8.gemm_mode()


def test_pallas_mode_equals_emulate_forward_and_grads(monkeypatch, pow2=True):
    """All FP8 GEMMs of a Linear and of the experts (Fprop, Dgrad, Wgrad) through the kernels, via the env var.
    (UE8M0 scales here; the kernels take any float32 scales, as the tests above do.)"""
    sizes = jnp.asarray([100, 0, 150, 40], jnp.int32)
    x, g = _randn((300, 260), 21), _randn((300, 200), 22)
    w, wg = _randn((260, 200), 23) * 0.05, _randn((4, 260, 200), 24) * 0.05

    def run(mode):
        monkeypatch.setenv("DSV3_FP8_GEMM", mode)
        lin = lambda a, b: jnp.sum(fp8.fp8_matmul(a, b, pow2) * g)
        grp = lambda a, b: jnp.sum(fp8.fp8_grouped_matmul(a, b, sizes, pow2) * g)
        both = lambda x, w, wg: (fp8.fp8_matmul(x, w, pow2), *jax.grad(lin, (0, 1))(x, w),
                                 fp8.fp8_grouped_matmul(x, wg, sizes, pow2), *jax.grad(grp, (0, 1))(x, wg))
        return jax.jit(both)(x, w, wg)  # a fresh function per mode: traced (and the mode read) once each

    ref, got = run("emulate"), run("pallas")
    for i, (a, b) in enumerate(zip(got, ref, strict=True)):
        _close(a, b, 1e-5 if i == 5 else 1e-6)  # [5]: expert Wgrad, whose reference sums in another order
