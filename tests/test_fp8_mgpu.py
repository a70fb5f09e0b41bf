"""The Hopper FP8 GEMMs (dsv3_jax/kernels/fp8_gemm_mgpu.py, Pallas Mosaic GPU) against the exact references of
fp8.py, in Mosaic-GPU interpret mode on CPU: the dense GEMM (both scale forms, the overlapped promotion, edges,
a single K step), the grouped expert GEMM and the k-grouped expert Wgrad on 128-aligned groups (with an empty
group and trailing padding), MoE's aligned layout, and the ``DSV3_FP8_GEMM=mgpu`` training path end to end.

Kernel and reference form the same FP32 partials per 128-K chunk, so they agree to FP32 rounding on CPU (on the
H100 the FP8 MMA's own accumulator differs by ~1e-4 relative: bench/kernels.py --only fp8_mgpu).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax import fp8, moe
from dsv3_jax.kernels import fp8_gemm_mgpu as mg
from dsv3_jax.kernels import fp8_quant


@pytest.fixture(autouse=True)
def _emulate(monkeypatch):
    """References run the exact emulation whatever the environment says (tests opt in to mgpu themselves)."""
    monkeypatch.setenv("DSV3_FP8_GEMM", "emulate")


def _randn(shape, seed) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _close(got, ref, atol_rel: float = 1e-6) -> None:
    ref = np.asarray(ref, np.float32)
    np.testing.assert_allclose(np.asarray(got, np.float32), ref, rtol=0, atol=atol_rel * np.abs(ref).max())


@pytest.mark.parametrize("M,K,N,b_block,overlap", [(256, 384, 128, True, False), (200, 300, 136, False, True),
                                                    (128, 100, 256, True, True)])
def test_dense_kernel_equals_chunked_dot(M, K, N, b_block, overlap):
    """Per-block and per-column B scales, plain and overlapped promotion; M, N, K edges zero-padded (K = 100 is a
    single pipeline step, fewer than the pipeline's slots)."""
    xq = fp8.quantize(_randn((M, K), 1), fp8.TILE)
    wq = fp8.quantize(_randn((K, N), 2) * 0.05, fp8.WEIGHT)
    sw = fp8._cols(wq.scale, N)
    if not b_block:  # per-column scales that really differ within a 128-column block
        sw = sw * (1 + jnp.arange(N, dtype=jnp.float32) / N)[None, :]
    ref = fp8.chunked_dot(xq.q, xq.scale, wq.q, sw)
    got = mg.block_scaled_matmul_nk(xq.q, xq.scale, wq.q.T, sw, jnp.float32, b_block=b_block, overlap=overlap,
                                    interpret=True)
    assert got.shape == (M, N) and got.dtype == jnp.float32
    _close(got, ref)


def _aligned_rows(sizes, rows: int, K: int, seed: int) -> jax.Array:
    """[rows, K] random rows for the groups, zero past their sum (the padding an aligned layout leaves)."""
    used = int(np.sum(sizes))
    return _randn((rows, K), seed).at[used:].set(0)


def test_grouped_kernel_on_aligned_groups():
    sizes = jnp.array([128, 0, 256, 128], jnp.int32)  # an empty expert; 128 zero rows past the groups
    G, M, K, N = 4, 640, 256, 256
    xq = fp8.quantize(_aligned_rows(sizes, M, K, 3), fp8.TILE)
    wq = fp8.quantize(_randn((G, K, N), 4) * 0.05, fp8.WEIGHT)
    sw = fp8._cols(wq.scale, N)
    ref = fp8.grouped_chunked_dot(xq.q, xq.scale, wq.q, sw, sizes)
    got = mg.block_scaled_grouped_matmul_nk(xq.q, xq.scale, wq.q.transpose(0, 2, 1), sw, sizes, jnp.float32,
                                            b_block=True, interpret=True)
    _close(got, ref)
    assert not np.any(np.asarray(got[512:]))
    # the tile past the groups is not computed at all: garbage there still comes out zero
    junk = xq.q.at[512:].set(jnp.asarray(7.0, xq.q.dtype))
    got2 = mg.block_scaled_grouped_matmul_nk(junk, xq.scale, wq.q.transpose(0, 2, 1), sw, sizes, jnp.float32,
                                             b_block=True, interpret=True)
    np.testing.assert_array_equal(np.asarray(got2), np.asarray(got))


def test_kgrouped_wgrad_on_aligned_groups():
    """Per expert xᵀ·dy over its own 128-token tiles; the empty expert's gradient is zero (never written)."""
    sizes = jnp.array([256, 0, 128], jnp.int32)
    T, K, N = 512, 256, 128
    xc = fp8.quantize(_aligned_rows(sizes, T, K, 5), fp8.COL_TILE)
    dc = fp8.quantize(_aligned_rows(sizes, T, N, 6), fp8.COL_TILE)
    dn = jax.lax.RaggedDotDimensionNumbers(dot_dimension_numbers=(([0], [0]), ([], [])),
                                           lhs_ragged_dimensions=[0], rhs_group_dimensions=[])
    ref = jax.lax.ragged_dot_general(fp8.dequantize(xc, fp8.COL_TILE), fp8.dequantize(dc, fp8.COL_TILE), sizes,
                                     dn, precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
    got = mg.block_scaled_kgrouped_matmul_nk(xc.q.T, xc.scale.T, dc.q.T, dc.scale, sizes, interpret=True)
    assert got.shape == (3, K, N)
    _close(got, ref)
    assert not np.any(np.asarray(got[1]))


def test_aligned_layout_round_trips_and_never_straddles():
    rng = np.random.default_rng(7)
    E, C = 5, 300
    experts = jnp.asarray(rng.integers(0, E - 1, size=(C // 3, 3)), jnp.int32)  # expert E-1 gets no row
    order, inverse, sizes = moe.sort_by_expert(experts, E)
    src, pos, psizes = moe.aligned_layout(order, inverse, sizes)
    P = src.shape[0]
    assert P % 128 == 0 and P >= int(psizes.sum()) and np.all(np.asarray(psizes) % 128 == 0)
    assert np.all(np.asarray(psizes) >= np.asarray(sizes)) and int(psizes[-1]) == 0
    rows = jnp.arange(C, dtype=jnp.float32)[:, None] + 1
    padded = moe.permute_rows(rows, src, pos)
    np.testing.assert_array_equal(moe.permute_rows(padded, pos, src), rows)  # every copy comes back
    assert int((padded > 0).sum()) == C  # and sits in exactly one padded row
    # the copies in each padded group are that expert's copies, in the sorted order
    flat, bounds = experts.reshape(-1), np.concatenate([[0], np.cumsum(psizes)])
    for e in range(E):
        got = np.asarray(padded[bounds[e]: bounds[e + 1], 0])
        np.testing.assert_array_equal(np.asarray(flat)[got[got > 0].astype(int) - 1], e)


def _moe_case(N=40, d=256, F=128, E=4, K=2):
    k = jax.random.split(jax.random.key(0), 6)
    x = jax.random.normal(k[0], (N, d))
    experts = jax.vmap(lambda kk: jax.random.choice(kk, E, (K,), replace=False))(jax.random.split(k[1], N))
    r = moe.Routing(experts.astype(jnp.int32), jax.random.uniform(k[2], (N, K)), None)
    ws = [jax.random.normal(k[3 + i], s) * 0.1 for i, s in enumerate([(E, d, F), (E, d, F), (E, F, d)])]
    return x, r, ws


def _value_and_grads(fn, x, ws):
    y = jax.jit(fn)(x, ws)
    g = jax.jit(jax.grad(lambda x, ws: (fn(x, ws) ** 2).sum(), argnums=(0, 1)))(x, ws)
    return y, jax.tree.leaves(g)


def test_aligned_dispatch_equals_unaligned():
    """Padding experts to 128 rows changes nothing in high precision (padding rows are zero both ways)."""
    x, r, ws = _moe_case()
    y0, g0 = _value_and_grads(lambda x, ws: moe.dispatch_ragged(x, r, *ws, "xla", None, align=0), x, ws)
    y1, g1 = _value_and_grads(lambda x, ws: moe.dispatch_ragged(x, r, *ws, "xla", None, align=128), x, ws)
    _close(y1, y0, 1e-6)
    for a, b in zip(g1, g0):
        _close(a, b, 1e-5)


def test_mgpu_training_path_equals_emulate(monkeypatch):
    """``DSV3_FP8_GEMM=mgpu``: MoE experts on the aligned layout (grouped Fprop/Dgrad, k-grouped Wgrad), also with
    their weights quantised ahead as the train step does, and a Linear (dense Fprop/Dgrad/Wgrad) give the
    emulation's values and gradients (same layout, same tiles)."""
    x, r, ws = _moe_case()
    w = jax.random.normal(jax.random.key(9), (256, 256)) * 0.05

    def moe_fn(x, ws):
        return moe.dispatch_ragged(x, r, *ws, "xla", False, align=128)

    def lin_fn(x, w):
        return fp8.fp8_matmul(x, w)

    def moe_pre_fn(x, ws):  # the train step's way: expert blocks quantised ahead (the fused weight kernel here)
        params = dict(zip(fp8.EXPERT_WEIGHTS, ws))
        pre = fp8.with_prequantized(params, fp8.prequantize_experts(params))
        assert all(isinstance(w, fp8.Prequantized) for w in pre.values())
        return moe_fn(x, [pre[k] for k in fp8.EXPERT_WEIGHTS])

    ref = [_value_and_grads(moe_fn, x, ws), _value_and_grads(lin_fn, x, w)]
    monkeypatch.setenv("DSV3_FP8_GEMM", "mgpu")
    assert fp8.gemm_mode() == "mgpu" and fp8.aligned_groups()
    got = [_value_and_grads(lambda x, ws: moe_fn(x, ws), x, ws), _value_and_grads(lambda x, w: lin_fn(x, w), x, w)]
    got.append(_value_and_grads(moe_pre_fn, x, ws))
    ref.append(ref[0])
    for (y1, g1), (y0, g0) in zip(got, ref, strict=True):
        _close(y1, y0, 1e-5)
        for a, b in zip(g1, g0):
            _close(a, b, 1e-4)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_fused_quantize_equals_quantize(dtype):
    """The fused kernel (one read, both tile forms, the column form transposed) gives fp8.quantize's values and
    scales bit for bit: rows of wildly different magnitude, an all-zero block (the 1e-4 amax floor), values that
    round to ±448."""
    x = _randn((256, 384), 0) * jnp.exp(2 * _randn((256, 1), 1))
    x = x.at[:128, 128:256].set(0).at[5, 7].set(-3e4).astype(dtype)
    q, s, qt, st = fp8_quant.quantize_rows_and_cols(x, interpret=True)
    rows, cols = fp8.quantize(x, fp8.TILE), fp8.quantize(x, fp8.COL_TILE)
    f32 = lambda a: np.asarray(jnp.asarray(a).astype(jnp.float32))
    assert q.dtype == qt.dtype == jnp.float8_e4m3fn and s.shape == (3, 256) and st.shape == (2, 384)
    np.testing.assert_array_equal(f32(q), f32(rows.q))
    np.testing.assert_array_equal(f32(s.T), f32(rows.scale))
    np.testing.assert_array_equal(f32(qt.T), f32(cols.q))
    np.testing.assert_array_equal(f32(st), f32(cols.scale))
    assert np.abs(f32(q)).max() == 448 and (f32(s.T)[:128, 1] == np.float32(1e-4) * np.float32(1 / 448)).all()


def test_fused_weight_quantize_equals_quantize():
    """The fused weight kernel: fp8.quantize's 128×128 blocks bit for bit, plus the same values transposed."""
    w = _randn((3, 256, 384), 4) * jnp.exp(_randn((3, 256, 1), 5))
    w = w.at[1, :128, 128:256].set(0)
    q, qt, scale = fp8_quant.quantize_weight_blocks(w, interpret=True)
    ref = fp8.quantize(w, fp8.WEIGHT)
    f32 = lambda a: np.asarray(jnp.asarray(a).astype(jnp.float32))
    assert scale.shape == ref.scale.shape == (3, 2, 3)
    np.testing.assert_array_equal(f32(q), f32(ref.q))
    np.testing.assert_array_equal(f32(qt), f32(ref.q).transpose(0, 2, 1))
    np.testing.assert_array_equal(f32(scale), f32(ref.scale))
    with pytest.raises(ValueError, match="multiples of 128"):
        fp8_quant.quantize_weight_blocks(jnp.zeros((2, 128, 576)), interpret=True)


def test_quantize_both_kernel_and_fallback_agree(monkeypatch):
    """fp8.quantize_both and fp8.quantize_weight under mgpu (the kernels where dims are multiples of 128, XLA
    otherwise) = under emulate."""
    for shape in [(256, 128), (200, 136)]:
        x = _randn(shape, 3).astype(jnp.bfloat16)
        ref = fp8.quantize_both(x), fp8.quantize_weight(x.astype(jnp.float32))
        monkeypatch.setenv("DSV3_FP8_GEMM", "mgpu")
        got = fp8.quantize_both(x), fp8.quantize_weight(x.astype(jnp.float32))
        monkeypatch.setenv("DSV3_FP8_GEMM", "emulate")
        assert got[0][1].q.shape == got[1][1].shape == (shape[1], shape[0])  # column form / Fprop weight: transposed
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
            np.testing.assert_array_equal(np.asarray(a.astype(jnp.float32)), np.asarray(b.astype(jnp.float32)))
    with pytest.raises(ValueError, match="multiples of 128"):
        fp8_quant.quantize_rows_and_cols(jnp.zeros((200, 128)), interpret=True)


def test_gemm_mode_auto_off_gpu(monkeypatch):
    monkeypatch.setenv("DSV3_FP8_GEMM", "auto")
    assert fp8.gemm_mode() == "emulate" and not fp8.aligned_groups()
    monkeypatch.setenv("DSV3_FP8_GEMM", "mgpu")  # decode-sized batches stay unpadded even in mgpu mode
    x, r, ws = _moe_case(N=8)
    ref = moe.dispatch_ragged(x, r, *ws, "xla", False, align=0)
    np.testing.assert_array_equal(moe.dispatch_ragged(x, r, *ws, "xla", False), ref)
    monkeypatch.setenv("DSV3_FP8_GEMM", "wgmma")
    with pytest.raises(ValueError, match="mgpu"):
        fp8.gemm_mode()


def test_served_fp8_weights_skip_the_mgpu_kernels(monkeypatch):
    """A served checkpoint's E4M3 weights would be transposed to K-major on every decode call: in mgpu mode they
    run the dequant path instead (same result as dequant), and MoE dispatch does not pad them."""
    x = _randn((8, 256), 10)
    w = fp8.quantize(_randn((256, 128), 11) * 0.05, fp8.WEIGHT)
    monkeypatch.setenv("DSV3_FP8_GEMM", "dequant")
    ref = fp8.fp8_dot(x, w)

    def boom(*a, **k):
        raise AssertionError("mgpu kernel called for a served weight")

    monkeypatch.setattr(mg, "block_scaled_matmul_nk", boom)
    monkeypatch.setattr(mg, "block_scaled_grouped_matmul_nk", boom)
    monkeypatch.setenv("DSV3_FP8_GEMM", "mgpu")
    np.testing.assert_array_equal(fp8.fp8_dot(x, w), ref)
    monkeypatch.setattr(moe, "ALIGN_MIN_ROWS_PER_EXPERT", 0)
    xm, r, ws = _moe_case(N=16)
    qs = [fp8.quantize(w_, fp8.WEIGHT) for w_ in ws]
    moe.dispatch_ragged(xm, r, *qs, "xla", False)  # would call the grouped kernel if it padded


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")
def test_fp8_linear_on_a_mesh_runs_the_kernels_per_device(monkeypatch):
    """Under a mesh (dp2 × ep4) the FP8 Linear's kernels run inside shard_map on each device's 128 token rows
    (the Pallas calls have no SPMD rule: otherwise XLA gathers their operands onto every device), and give one
    device's numbers: forward and Dgrad are row-local (1×128 tiles, the same weight blocks), bit for bit; each
    device's 128 rows are exactly one global 128-token Wgrad tile, so Wgrad differs only by summing the 8 tiles'
    FP32 partials across devices instead of in one kernel's accumulator (reassociation, ≤ a few ulp).

    The GEMM kernel itself is stood in for by its XLA twin (``fp8._chunked_dot_f32``, the math the kernel tests
    hold it to) in both runs: Mosaic GPU's CPU interpreter keeps one shared-memory model per process and fails
    when 8 simulated devices run kernels at once ("Barrier remains allocated"). The fused quantisers (Pallas'
    generic interpreter) do run per device here."""
    from dsv3_jax.config import MeshConfig
    from sharding.mesh import make_mesh
    from sharding.partition import parallel_context

    monkeypatch.setenv("DSV3_FP8_GEMM", "mgpu")
    seen = []

    def twin(a_q, a_scale, bt_q, b_scale, out_dtype, **_):
        seen.append(a_q.shape[0])
        return fp8._chunked_dot_f32(a_q, a_scale, bt_q.T, b_scale).astype(out_dtype)

    monkeypatch.setattr(mg, "block_scaled_matmul_nk", twin)
    x, w = _randn((1024, 128), 40).astype(jnp.bfloat16), _randn((128, 256), 41) * 0.05
    f = jax.jit(jax.value_and_grad(lambda x, w: jnp.sum(fp8.fp8_matmul(x, w).astype(jnp.float32) ** 2), (0, 1)))
    ref_loss, (ref_dx, ref_dw) = f(x, w)
    assert seen and set(seen) == {1024, 128}  # one device: Fprop and Dgrad on 1024 rows (Wgrad's M is K = 128)
    seen.clear()
    mesh = make_mesh(MeshConfig(data=2, expert=4))
    with parallel_context(mesh):
        loss, (dx, dw) = jax.jit(jax.value_and_grad(
            lambda x, w: jnp.sum(fp8.fp8_matmul(x, w).astype(jnp.float32) ** 2), (0, 1)))(x, w)
    assert seen and set(seen) <= {128}  # Fprop and Dgrad on per-device rows (Wgrad's M is the K dim: 128 too)
    np.testing.assert_array_equal(np.asarray(dx.astype(jnp.float32)), np.asarray(ref_dx.astype(jnp.float32)))
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
    _close(dw, ref_dw, 1e-6)
