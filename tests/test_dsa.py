"""DeepSeek-V3.2 sparse attention (dsv3_jax/dsa.py, REFERENCE §11).

- logits of HF's DeepseekV32ForCausalLM (goldens from tests/make_goldens_v32.py, T = 32 > index_topk = 8), BF16/F32
  and official-FP8 checkpoints, through ``python -m dsv3_jax.logits`` and ``dsv3_jax.convert``;
- the indexer's scores and top-k against a NumPy loop; the gathered sparse attention against the masked-dense
  reference; the config keys (absent = dense V3).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax import convert, logits
from dsv3_jax.config import ConfigError, ModelConfig, model_config_from_hf, model_config_to_hf
from dsv3_jax.dsa import (
    IndexerOut,
    index_scores,
    masked_dense_attention,
    select_topk,
    selection_mask,
    sparse_latent_attention,
)
from dsv3_jax.hf import HFCheckpoint, load_hf
from dsv3_jax.logits import compute_logits
from tests.common import FIXTURES, tiny_config

V32 = FIXTURES / "tiny_v32"
V32_FP8 = FIXTURES / "tiny_v32_fp8"


def _rel(got, gold):
    return float(np.abs(got - gold).max() / np.abs(gold).max())


# ---- parity with HF ------------------------------------------------------------------------------------------


def test_v32_config_and_keys():
    ck = HFCheckpoint(V32)
    cfg = ck.model_config()
    assert (cfg.index_topk, cfg.index_n_heads, cfg.index_head_dim) == (8, 4, 16) and cfg.uses_dsa
    assert np.load(V32 / "tokens.npy").shape[1] > cfg.index_topk  # the selection is exercised
    assert "model.layers.1.self_attn.indexer.k_norm.bias" in ck.keys()
    # Exported config.json is a deepseek_v32 one and reloads to the same architecture.
    hf = model_config_to_hf(cfg)
    assert hf["model_type"] == "deepseek_v32" and hf["index_topk"] == 8
    assert model_config_from_hf(hf) == cfg


@pytest.mark.parametrize("fixture,fp8_weights", [("tiny_v32", False), ("tiny_v32_fp8", False),
                                                 ("tiny_v32_fp8", True)])
def test_v32_logits_match_hf(fixture, fp8_weights):
    # HF computes in float32 with the same op order up to reassociation (absorbed vs up-projected MLA): ~1e-6.
    # The goldens' indexer margins (k-th vs (k+1)-th score ≥ 1e-3 relative) keep the selection identical.
    d = FIXTURES / fixture
    variables, cfg = load_hf(d, fp8_weights=fp8_weights)
    got = compute_logits(variables, cfg, np.load(d / "tokens.npy"))
    assert _rel(got, np.load(d / "logits.npy")) <= 1e-4


def test_v32_logits_cli_and_convert_round_trip(tmp_path):
    out = tmp_path / "logits.npy"
    assert logits.main(["--hf-dir", str(V32), "--tokens", str(V32 / "tokens.npy"), "--out", str(out)]) == 0
    assert _rel(np.load(out), np.load(V32 / "logits.npy")) <= 1e-4
    assert convert.main(["--hf-dir", str(V32_FP8), "--out", str(tmp_path / "ckpt")]) == 0
    assert convert.main(["--checkpoint", str(tmp_path / "ckpt"), "--to-hf", str(tmp_path / "hf")]) == 0
    assert HFCheckpoint(tmp_path / "hf").model_config() == HFCheckpoint(V32_FP8).model_config()
    v, _ = load_hf(tmp_path / "hf")
    v0, _ = load_hf(V32_FP8)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), v, v0))


def test_goldens_need_the_sparse_selection():
    """The selection changes the logits: dense attention over every causal key misses HF's by far."""
    variables, cfg = load_hf(V32)
    tokens, gold = np.load(V32 / "tokens.npy"), np.load(V32 / "logits.npy")
    dense = compute_logits(variables, dataclasses.replace(cfg, index_attention="dense"), tokens)
    assert _rel(dense, gold) > 0.05


# ---- indexer and sparse attention against references ---------------------------------------------------------


def _indexer_out(rng, B, T, J, D):
    q = rng.standard_normal((B, T, J, D)).astype(np.float32)
    k = rng.standard_normal((B, T, D)).astype(np.float32)
    w = rng.standard_normal((B, T, J)).astype(np.float32)
    return IndexerOut(jnp.asarray(q), jnp.asarray(k), jnp.asarray(w))


def test_index_scores_and_topk_match_numpy():
    rng = np.random.default_rng(0)
    B, T, J, D, K = 2, 11, 3, 8, 4
    ix = _indexer_out(rng, B, T, J, D)
    got = np.asarray(index_scores(ix))
    q, k, w = (np.asarray(a, np.float64) for a in ix)
    ref = np.zeros((B, T, T))
    for b in range(B):
        for t in range(T):
            for s in range(T):
                ref[b, t, s] = sum(w[b, t, j] * max(q[b, t, j] @ k[b, s], 0.0) / np.sqrt(D) for j in range(J))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    mask = pos[:, None, :] <= pos[:, :, None]
    idx, valid = select_topk(jnp.asarray(ref, jnp.float32), mask, K)
    for b in range(B):
        for t in range(T):
            chosen = set(np.asarray(idx[b, t])[np.asarray(valid[b, t])].tolist())
            want = set(np.argsort(-ref[b, t, : t + 1])[:K].tolist())  # causal keys 0..t
            assert chosen == want, (b, t)


@pytest.mark.parametrize("T,block", [(20, 256), (37, 8)])  # one block; several blocks with a padded tail
def test_sparse_attention_equals_masked_dense(T, block):
    rng = np.random.default_rng(1)
    B, H, n, r, v, c, K = 2, 3, 8, 4, 6, 16, 5

    def a(*s):
        return jnp.asarray(rng.standard_normal(s).astype(np.float32))

    q_nope, q_rope, c_kv, k_rope, w = a(B, T, H, n), a(B, T, H, r), a(B, T, c), a(B, T, r), a(c, H, n + v) * 0.3
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    causal = pos[:, None, :] <= pos[:, :, None]
    idx, valid = select_topk(a(B, T, T), causal, K)
    got = sparse_latent_attention(q_nope, q_rope, c_kv, k_rope, w, idx, valid, 0.3, jnp.float32, block=block)
    ref = masked_dense_attention(q_nope, q_rope, c_kv, k_rope, w, causal & selection_mask(idx, valid, T), 0.3,
                                 jnp.float32)
    # Same math, absorbed vs up-projected (float32 reassociation only).
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-4, atol=1e-5)
    # Gradients agree too (the training path differentiates through the gather).
    gs = jax.grad(lambda x: sparse_latent_attention(q_nope, q_rope, x, k_rope, w, idx, valid, 0.3, jnp.float32,
                                                    block=block).sum())(c_kv)
    gd = jax.grad(lambda x: masked_dense_attention(q_nope, q_rope, x, k_rope, w,
                                                   causal & selection_mask(idx, valid, T), 0.3, jnp.float32).sum())(c_kv)
    np.testing.assert_allclose(np.asarray(gs), np.asarray(gd), rtol=1e-4, atol=1e-4)


# ---- config ---------------------------------------------------------------------------------------------------


def test_config_keys():
    assert ModelConfig().index_topk is None and not ModelConfig().uses_dsa  # absent = dense V3
    with pytest.raises(ConfigError, match="q_lora_rank"):
        tiny_config(index_topk=4, q_lora_rank=None)
    with pytest.raises(ConfigError, match="index_head_dim"):
        tiny_config(index_topk=4, index_head_dim=2)
    with pytest.raises(ConfigError, match="deepseek_v32"):
        model_config_from_hf({**model_config_to_hf(tiny_config()), "index_topk": 8})
