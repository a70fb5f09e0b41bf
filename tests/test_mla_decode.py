"""The fused MLA decode kernel (Pallas, interpret mode on CPU) against the absorbed path's XLA einsums, and the
model's decode steps with ``mla_decode_impl=pallas`` against the default."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax.attention import _softmax, causal_mask, latent_attention
from dsv3_jax.kernels.mla_decode import auto_splits, latent_decode_attention
from dsv3_jax.model import Transformer, init_cache
from tests.common import random_variables, tiny_config


def _inputs(B: int, T: int, H: int, C: int, R: int, S: int, dtype, seed: int = 0) -> list[jax.Array]:
    """q_lat [B,T,H,C], q_rope [B,T,H,R], c_kv [B,S,C], k_rope [B,S,R] ~ N(0, 1) (NumPy: no compiles)."""
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.standard_normal(shape, np.float32), dtype)
            for shape in ((B, T, H, C), (B, T, H, R), (B, S, C), (B, S, R))]


@functools.partial(jax.jit, static_argnums=5)
def _reference(q_lat, q_rope, c_kv, k_rope, positions, scale):
    """What absorbed_attention computes between its w_uk and w_uv products, with the decode path's mask.

    bf16: XLA:CPU here cannot run a bf16 × bf16 → f32 dot ("Unsupported element type for DotThunk"), so the
    operands go up to f32 first (bf16 products are exact in f32) and the probabilities are rounded to bf16 as
    :func:`latent_attention` rounds them.
    """
    B, S = c_kv.shape[:2]
    mask = causal_mask(positions, jnp.broadcast_to(jnp.arange(S), (B, S)))
    if q_lat.dtype == jnp.float32:
        return latent_attention(q_lat, q_rope, c_kv, k_rope, mask, scale, jnp.float32)
    f32 = [x.astype(jnp.float32) for x in (q_lat, q_rope, c_kv, k_rope)]
    scores = jnp.einsum("bthc,bsc->bhts", f32[0], f32[2]) + jnp.einsum("bthr,bsr->bhts", f32[1], f32[3])
    probs = _softmax(scores * scale, mask).astype(q_lat.dtype).astype(jnp.float32)
    return jnp.einsum("bhts,bsc->bthc", probs, f32[2]).astype(q_lat.dtype)


# (T, H, S, block_s, block_h, num_splits, positions): ragged rows, one at position 0, one past the last full block.
CASES = {
    "T1": (1, 4, 40, 16, None, None, [[0], [17], [39]]),  # S = 40: not a multiple of block_s
    "T3_splits": (3, 5, 37, 8, 4, 3, [[0, 1, 2], [20, 21, 22], [34, 35, 36]]),  # H·T = 15 rows in blocks of 4
    "T3_one_split": (3, 3, 24, 16, 8, 1, [[5, 6, 7], [0, 1, 2], [21, 22, 23]]),
}


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", CASES)
def test_kernel_equals_einsums(case, dtype, tol):
    T, H, S, block_s, block_h, splits, pos = CASES[case]
    B, C, R, scale = len(pos), 32, 16, 0.3
    q_lat, q_rope, c_kv, k_rope = _inputs(B, T, H, C, R, S, dtype)
    positions = jnp.asarray(pos, jnp.int32)
    out = latent_decode_attention(q_lat, q_rope, c_kv, k_rope, positions, scale, block_s=block_s, block_h=block_h,
                                  num_splits=splits, interpret=True)
    ref = _reference(q_lat, q_rope, c_kv, k_rope, positions, scale)
    assert out.shape == (B, T, H, C) and out.dtype == dtype
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    np.testing.assert_allclose(out, ref, rtol=tol, atol=tol)
    # A query at position 0 sees slot 0 only: every head's output is that slot's latent.
    b, t = next((b, t) for b, row in enumerate(pos) for t, p in enumerate(row) if p == 0)
    np.testing.assert_array_equal(out[b, t], np.broadcast_to(np.asarray(c_kv[b, 0], np.float32), (H, C)))


def test_positions_past_the_cache_see_every_slot():
    """A free engine row can run past the cache (its writes are dropped): it attends over all S slots."""
    q_lat, q_rope, c_kv, k_rope = _inputs(2, 1, 2, 16, 8, 20, jnp.float32, seed=1)
    positions = jnp.asarray([[25], [19]], jnp.int32)
    out = latent_decode_attention(q_lat, q_rope, c_kv, k_rope, positions, 0.5, block_s=8, num_splits=2,
                                  interpret=True)
    np.testing.assert_allclose(out, _reference(q_lat, q_rope, c_kv, k_rope, positions, 0.5), rtol=1e-5, atol=1e-5)


def test_auto_splits_and_triton_tile_checks():
    assert auto_splits(batch=1, m_blocks=1, seq_len=4096, block_s=64) == 64  # one block per split: 64 programs
    assert auto_splits(batch=64, m_blocks=1, seq_len=4096, block_s=64) == 5
    assert auto_splits(batch=1, m_blocks=1, seq_len=40, block_s=64) == 1
    q_lat, q_rope, c_kv, k_rope = _inputs(1, 1, 2, 24, 8, 16, jnp.float32)
    with pytest.raises(ValueError, match="power-of-two"):  # C = 24 cannot be a Triton tile
        latent_decode_attention(q_lat, q_rope, c_kv, k_rope, jnp.zeros((1, 1), jnp.int32), 1.0)


def test_model_decode_pallas_equals_xla():
    """The tiny model (3 heads, kv_lora 16: H and C off the kernel's blocks) prefills, then decodes single
    tokens at ragged per-row positions and one 3-token verify window; the pallas path gives the default's
    logits and greedy tokens."""
    cfg = tiny_config(num_hidden_layers=2)  # one dense and one MoE block
    variables = random_variables(cfg, seed=3)
    B, P, S = 2, 6, 24
    tokens = jax.random.randint(jax.random.key(2), (B, 12), 0, cfg.vocab_size)
    prefill = jax.jit(lambda v, t, c: Transformer(cfg).apply(v, t, cache=c, mtp=False))
    cache0 = prefill(variables, tokens[:, :P], init_cache(cfg, B, S, "float32")).cache

    def run(impl: str):
        model = Transformer(dataclasses.replace(cfg, mla_decode_impl=impl))
        step = jax.jit(lambda v, t, pos, c: model.apply(v, t, positions=pos, cache=c, absorbed=True, mtp=False))
        cache, logits = cache0, []
        pos = jnp.asarray([[P], [P - 3]], jnp.int32)  # row 1 rewinds: its later slots are stale, masked
        jaxpr = str(jax.make_jaxpr(step)(variables, tokens[:, P:P + 1], pos, cache))
        assert ("mla_latent_decode" in jaxpr) == (impl == "pallas")  # the kernel runs in every layer's MLA
        for i in range(3):
            out = step(variables, tokens[:, P + i:P + i + 1], pos + i, cache)
            cache = out.cache
            logits.append(out.logits)
        window = pos + 3 + jnp.arange(3)[None]  # a speculative verify window: T = 3 at consecutive positions
        out = step(variables, tokens[:, P + 3:P + 6], window, cache)
        return logits + [out.logits], out.cache

    xla, xla_cache = run("xla")
    pallas, pallas_cache = run("pallas")
    for a, b in zip(xla, pallas, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4)
        np.testing.assert_array_equal(jnp.argmax(b, -1), jnp.argmax(a, -1))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5), xla_cache, pallas_cache)
