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
    indexer_kl,
    masked_dense_attention,
    select_topk,
    selected_scores,
    selection_mask,
    sparse_latent_attention,
    topk_blocked,
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


@pytest.mark.slow
def test_v32_logits_match_hf_with_the_kernels():
    """Both DSA kernels in the model (Pallas interpret mode on CPU, float32 operands): the indexer's fused scoring
    picks the same keys and the gathered flash attention gives HF's logits, as the XLA path does."""
    variables, cfg = load_hf(V32)
    cfg = dataclasses.replace(cfg, dsa_attention_impl="pallas", dsa_index_impl="pallas")
    got = compute_logits(variables, cfg, np.load(V32 / "tokens.npy"))
    assert _rel(got, np.load(V32 / "logits.npy")) <= 1e-4


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
    # Blocked top-k (4 queries at a time, a padded tail) = the full-matrix one; scores at the selection agree.
    bidx, bvalid = topk_blocked(ix, ix.k, pos, pos, K, block=4)
    np.testing.assert_array_equal(np.asarray(bvalid), np.asarray(valid))
    np.testing.assert_array_equal(np.where(bvalid, bidx, -1), np.where(valid, idx, -1))
    np.testing.assert_allclose(np.asarray(selected_scores(ix, ix.k, idx)),
                               np.take_along_axis(got, np.asarray(idx), -1), rtol=1e-5, atol=1e-6)


def test_index_kernel_equals_xla_scores_and_selection():
    """The fused indexer kernel (Pallas interpret mode; 16×16 tiles over 37 queries × 37 keys: padded edges and
    skipped causally invisible tiles). Float32 operands: the XLA path's scores up to summation order (rtol 1e-5) on
    every visible (t, s), the same top-k. BF16 operands (the GPU default): within the bound rounding q and k to
    bf16 allows — each product q_i·k_i moves by ≤ 2·2⁻⁹ relative (plus 2⁻¹⁶), so |ΔI| ≤ Σ_j |w_j| · D^-0.5 ·
    Σ_i |q_ji k_i| · 2⁻⁸ (ReLU is 1-Lipschitz; f32 accumulation adds ~1e-6 relative)."""
    from dsv3_jax.kernels.dsa_index import index_scores_kernel

    rng = np.random.default_rng(5)
    B, T, J, D, K = 2, 37, 3, 16, 6
    ix = _indexer_out(rng, B, T, J, D)
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    causal = np.asarray(pos[:, None, :] <= pos[:, :, None])
    ref = np.asarray(index_scores(ix))
    for dtype in (jnp.float32, jnp.bfloat16):
        got = np.asarray(index_scores_kernel(ix.q, ix.w, pos, ix.k, pos, dtype=dtype, block_t=16, block_s=16,
                                             interpret=True))
        if dtype == jnp.float32:
            np.testing.assert_allclose(np.where(causal, got, 0), np.where(causal, ref, 0), rtol=1e-5, atol=1e-6)
        else:
            q, k, w = (np.asarray(a, np.float64) for a in ix)
            bound = np.einsum("btj,btjs->bts", np.abs(w), np.einsum("btjd,bsd->btjs", np.abs(q), np.abs(k))) / np.sqrt(D)
            assert np.all(np.abs(got - ref)[causal] <= (bound * 2 ** -8 + 1e-5)[causal])
    idx, valid = topk_blocked(ix, ix.k, pos, pos, K, block=8)
    pidx, pvalid = topk_blocked(ix, ix.k, pos, pos, K, block=8, impl="pallas", dtype=jnp.float32)
    np.testing.assert_array_equal(np.asarray(pvalid), np.asarray(valid))
    np.testing.assert_array_equal(np.where(pvalid, pidx, -1), np.where(valid, idx, -1))

    # Training differentiates around the selection (the KL at the selected keys): no tangent enters the kernel.
    def kl_like(q):
        i, ok = topk_blocked(IndexerOut(q, ix.k, ix.w), ix.k, pos, pos, K, block=8, impl="pallas")
        return jnp.where(ok, selected_scores(IndexerOut(q, ix.k, ix.w), ix.k, i), 0.0).sum()

    assert np.isfinite(np.asarray(jax.grad(kl_like)(ix.q))).all()


@pytest.mark.parametrize("T,block,impl", [(20, 256, "xla"), (37, 8, "xla"), (37, 8, "pallas")])
def test_sparse_attention_equals_masked_dense(T, block, impl):
    """One block; several blocks with a padded tail; the gathered flash kernel (Pallas interpret mode on CPU;
    5 selected keys in blocks of 64 → one block padded with skipped entries), whose backward is the XLA path's."""
    rng = np.random.default_rng(1)
    B, H, n, r, v, c, K = 2, 3, 8, 4, 6, 16, 5

    def a(*s):
        return jnp.asarray(rng.standard_normal(s).astype(np.float32))

    q_nope, q_rope, c_kv, k_rope, w = a(B, T, H, n), a(B, T, H, r), a(B, T, c), a(B, T, r), a(c, H, n + v) * 0.3
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    causal = pos[:, None, :] <= pos[:, :, None]
    idx, valid = select_topk(a(B, T, T), causal, K)
    mask = causal & selection_mask(idx, valid, T)

    def sparse(*x):
        return sparse_latent_attention(*x, w, idx, valid, 0.3, jnp.float32, block=block, impl=impl)

    def dense(*x):
        return masked_dense_attention(*x, w, mask, 0.3, jnp.float32)

    args = (q_nope, q_rope, c_kv, k_rope)
    # Same math, absorbed vs up-projected, one-pass vs online softmax: float32 reassociation only (~1e-6 here).
    np.testing.assert_allclose(np.asarray(sparse(*args)), np.asarray(dense(*args)), rtol=1e-4, atol=1e-5)
    # Gradients agree too, for every input (the training path differentiates through the gather).
    gs = jax.grad(lambda *x: sparse(*x).sum(), argnums=(0, 1, 2, 3))(*args)
    gd = jax.grad(lambda *x: dense(*x).sum(), argnums=(0, 1, 2, 3))(*args)
    for got, ref in zip(gs, gd, strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-4, atol=1e-4)


def test_sparse_attention_kernel_bf16_matches_xla_path():
    """BF16 operands (the GPU case; interpret mode casts the dots' operands to f32, and bf16 products are exact in
    f32, as on the tensor cores). The kernel rounds its unnormalised probabilities exp(s − m_running) to bf16 and
    divides at the end; the XLA path rounds the normalised ones: each weight differs by ≤ 2·2⁻⁹ relative, the
    output rounding adds 2⁻⁹ relative per path, so |Δo| ≤ (2·2⁻⁹ + 2·2⁻⁹) · max|c_kv| per element."""
    from dsv3_jax.dsa import sparse_latent_pallas, sparse_latent_xla

    rng = np.random.default_rng(6)
    B, T, H, c, r, K = 1, 24, 4, 32, 16, 9

    def a(*s):
        return jnp.asarray(rng.standard_normal(s), jnp.bfloat16)

    q, qr, ck, kr = a(B, T, H, c), a(B, T, H, r), a(B, T, c), a(B, T, r)
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    idx, valid = select_topk(jnp.asarray(rng.standard_normal((B, T, T)), jnp.float32),
                             pos[:, None, :] <= pos[:, :, None], K)
    got = np.asarray(sparse_latent_pallas(q, qr, ck, kr, idx, valid, 0.1, 8), np.float32)
    ref = np.asarray(sparse_latent_xla(q, qr, ck, kr, idx, valid, 0.1, jnp.bfloat16, 8), np.float32)
    assert np.abs(got - ref).max() <= 4 * 2 ** -9 * float(jnp.abs(ck.astype(jnp.float32)).max())


def test_sparse_training_memory_is_linear_in_T():
    """XLA's compiled memory analysis (CPU) of one DSA layer's forward + backward, sparse mode, top-64: the scratch
    memory grows ~linearly with T and stays far below one [T, T] float32 matrix (never stored: the indexer scores
    [block, S] and the gathered rows [block, k, ·] of one query block at a time, recomputed in the backward).
    Measured (jax 0.12.1): 4096 → 8192 tokens take 16.9 → 33.7 MiB, ~64 bytes per (query, selected key): indices,
    the selected scores and head-mean probabilities of the KL (a [T, T] f32 matrix at 8192 is 256 MiB; before the
    blocks were rematerialised 76.6 → 153 MiB: the gathered latent rows of every block kept for the backward)."""
    from dsv3_jax.dsa import DSA

    cfg = tiny_config(index_topk=64, index_n_heads=2, index_head_dim=16, num_attention_heads=2, hidden_size=32,
                      max_position_embeddings=16384, dsa_attention_impl="xla")
    layer = DSA(cfg)

    def temp_bytes(T):
        x = jax.ShapeDtypeStruct((1, T, cfg.hidden_size), jnp.float32)
        pos = jnp.arange(T, dtype=jnp.int32)[None]
        v = jax.eval_shape(lambda x: layer.init(jax.random.key(0), x, pos), x)

        def loss(v, x):
            out, _, aux = layer.apply(v, x, pos)
            return out.sum() + aux["indexer_kl"]

        return jax.jit(jax.grad(loss, argnums=(0, 1))).lower(v, x).compile().memory_analysis().temp_size_in_bytes

    small, big = temp_bytes(4096), temp_bytes(8192)
    assert big < 2.2 * small, (small, big)  # linear: ≤ 2× (+ fixed per-block buffers); quadratic: ~4×
    assert big < 8192 * 8192 * 4 / 4, big


# ---- config ---------------------------------------------------------------------------------------------------


def test_config_keys():
    assert ModelConfig().index_topk is None and not ModelConfig().uses_dsa  # absent = dense V3
    with pytest.raises(ConfigError, match="q_lora_rank"):
        tiny_config(index_topk=4, q_lora_rank=None)
    with pytest.raises(ConfigError, match="index_head_dim"):
        tiny_config(index_topk=4, index_head_dim=2)
    with pytest.raises(ConfigError, match="deepseek_v32"):
        model_config_from_hf({**model_config_to_hf(tiny_config()), "index_topk": 8})


# ---- training signals (the V3.2 recipe's indexer KL) ----------------------------------------------------------


def test_indexer_kl_matches_numpy():
    rng = np.random.default_rng(2)
    B, T = 2, 6
    p = rng.random((B, T, T))
    mask = np.tril(np.ones((T, T), bool))[None].repeat(B, 0)
    p = np.where(mask, p, 0)
    p /= p.sum(-1, keepdims=True)
    s = rng.standard_normal((B, T, T))
    q = np.where(mask, np.exp(s), 0)
    q /= q.sum(-1, keepdims=True)
    ref = np.mean(np.sum(np.where(mask, p * (np.log(np.where(mask, p, 1)) - np.log(np.where(mask, q, 1))), 0), -1))
    got = indexer_kl(jnp.asarray(p, jnp.float32), jnp.asarray(s, jnp.float32), jnp.asarray(mask))
    np.testing.assert_allclose(float(got), ref, rtol=1e-5)


def _is_indexer(path):
    return any(getattr(k, "key", None) == "indexer" for k in path)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_indexer_learns_from_its_kl_only(mode):
    """Gradients: KL → indexer only, LM loss → everything but the indexer. Training the indexer alone on its KL
    (the dense warm-up's rule, Adam lr 1e-2) lowers the KL and, dense, raises the attention mass the top-k keep."""
    from dsv3_jax.model import Transformer
    from dsv3_jax.training.loss import cross_entropy
    from tests.common import random_variables

    cfg = tiny_config(index_topk=4, index_n_heads=2, index_head_dim=8, num_nextn_predict_layers=0,
                      num_hidden_layers=2, index_attention=mode)
    v = random_variables(cfg, seed=3)
    tokens = jnp.asarray(np.random.default_rng(4).integers(0, cfg.vocab_size, (2, 17)), jnp.int32)

    def run(params):
        out = Transformer(cfg).apply({"params": params, "router": v["router"]}, tokens[:, :-1])
        return out.indexer_kl.sum(), cross_entropy(out.logits, tokens[:, 1:]), out.topk_mass.mean()

    if mode == "sparse":  # (one compile fewer: the dense stage detaches the indexer by the same code)
        _check_gradient_isolation(run, v["params"])
    _train_indexer(run, v["params"], mode)


def _check_gradient_isolation(run, params):
    g_kl, g_ce = jax.jit(lambda p: (jax.grad(lambda q: run(q)[0])(p), jax.grad(lambda q: run(q)[1])(p)))(params)
    leaves_kl = jax.tree_util.tree_flatten_with_path(g_kl)[0]
    leaves_ce = jax.tree_util.tree_flatten_with_path(g_ce)[0]
    for (path, a), (_, b) in zip(leaves_kl, leaves_ce):
        assert not np.asarray(b if _is_indexer(path) else a).any(), path  # KL ↛ main model, LM loss ↛ indexer
    assert all(np.asarray(a).any() for path, a in leaves_kl if _is_indexer(path) and path[-1].key == "kernel")
    assert any(np.asarray(b).any() for path, b in leaves_ce if not _is_indexer(path))



def _train_indexer(run, params, mode):
    import optax

    opt = optax.adam(1e-2)
    trainable = jax.tree_util.tree_map_with_path(lambda p_, _: _is_indexer(p_), params)

    @jax.jit
    def step(params, state):
        (kl, (_, mass)), g = jax.value_and_grad(lambda p: (lambda r: (r[0], r[1:]))(run(p)), has_aux=True)(params)
        g = jax.tree.map(lambda gi, t: gi if t else jnp.zeros_like(gi), g, trainable)
        upd, state = opt.update(g, state, params)
        return optax.apply_updates(params, upd), state, kl, mass

    state = opt.init(params)
    kls, masses = [], []
    for _ in range(30):
        params, state, kl, mass = step(params, state)
        kls.append(float(kl))
        masses.append(float(mass))
    assert kls[-1] < 0.5 * kls[0], kls
    if mode == "dense":
        assert masses[-1] > masses[0], masses


# ---- the two training stages through the real loop (configs/tiny_v32_*.yaml, shrunk) -----------------------------

SHRINK = ["model.num_hidden_layers=2", "model.vocab_size=256", "data.tokenizer_vocab_size=256", "data.seq_len=48",
          "model.index_topk=8", "model.index_n_heads=2", "model.index_head_dim=16", "model.n_routed_experts=8",
          "model.n_group=2", "model.topk_group=1", "model.num_experts_per_tok=2", "train.global_batch_size=4",
          "train.log_every=1", "train.eval_every=0", "train.checkpoint_every=0", "train.async_checkpoint=false"]


def _stage(tmp_path, name, steps):
    import json

    from dsv3_jax.config import load_config
    from dsv3_jax.training.loop import train
    from tests.test_training import data_fns

    cfg = load_config(FIXTURES.parent.parent / "configs" / f"{name}.yaml",
                      [*SHRINK, f"train.steps={steps}", f"run_dir={tmp_path / name}"])
    train(cfg, *data_fns(cfg))
    rows = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return cfg, rows


@pytest.mark.slow
def test_tiny_warmup_then_sparse_stage(tmp_path):
    """Stage 1 (dense warm-up, indexer only): the indexer KL falls, the top-k's attention mass rises, nothing but
    the indexer moves. Stage 2 (sparse): the LM loss falls and the indexer KL is logged."""
    from dsv3_jax.training.checkpoint import restore_params
    from dsv3_jax.training.step import init_state, indexer_only

    cfg, rows = _stage(tmp_path, "tiny_v32_warmup", 25)
    kl, mass = [r["indexer_kl"] for r in rows], [r["topk_mass"] for r in rows]
    assert kl[-1] < 0.7 * kl[0] and mass[-1] > mass[0], (kl, mass)
    start = init_state(cfg).params  # the same seed: the run's initial params
    end, _ = restore_params(tmp_path / "tiny_v32_warmup" / "checkpoints")
    moved = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), start, end["params"])
    assert moved == indexer_only(start)

    _, rows = _stage(tmp_path, "tiny_v32_sparse", 30)
    ce = [r["ce"] for r in rows]
    assert np.mean(ce[-5:]) < 0.8 * np.mean(ce[:5]) and all(np.isfinite(r["indexer_kl"]) for r in rows), ce


@pytest.mark.slow
def test_warmup_starts_from_a_v3_checkpoint_with_a_fresh_indexer(tmp_path):
    """The paper's recipe starts the dense warm-up from a V3 checkpoint: train.init_from on a V3 params checkpoint
    (no indexer) with the tiny warm-up config gives a V3.2 model with the V3 weights and a fresh indexer; the
    warm-up then trains the indexer only (KL falls) and every V3 weight ends exactly as loaded."""
    import json

    from dsv3_jax.config import load_config
    from dsv3_jax.params_io import save_variables
    from dsv3_jax.training.checkpoint import restore_params
    from dsv3_jax.training.init_from import resolve_config
    from dsv3_jax.training.loop import train
    from tests.common import random_variables
    from tests.test_training import data_fns

    overrides = [*SHRINK, "train.steps=20", f"run_dir={tmp_path / 'run'}"]
    cfg = load_config(FIXTURES.parent.parent / "configs" / "tiny_v32_warmup.yaml", overrides)
    v3 = dataclasses.replace(cfg.model, index_topk=None)  # the same widths, no indexer: a V3 model
    v3_vars = random_variables(v3, seed=7)
    save_variables(tmp_path / "v3", v3_vars, v3)
    cfg, src = resolve_config(load_config(FIXTURES.parent.parent / "configs" / "tiny_v32_warmup.yaml",
                                          [*overrides, f"train.init_from={tmp_path / 'v3'}"]))
    assert src.kind == "params" and not src.model.uses_dsa
    assert cfg.model == dataclasses.replace(v3, index_topk=8, index_n_heads=2, index_head_dim=16,
                                            index_attention="dense")
    train(cfg, *data_fns(cfg))
    kl = [json.loads(x)["indexer_kl"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert kl[-1] < 0.7 * kl[0], kl
    end, _ = restore_params(tmp_path / "run" / "checkpoints")
    flat = {jax.tree_util.keystr(p): a for p, a in jax.tree_util.tree_flatten_with_path(end["params"])[0]}
    for path, a in jax.tree_util.tree_flatten_with_path(v3_vars["params"])[0]:
        np.testing.assert_array_equal(flat.pop(jax.tree_util.keystr(path)), a)  # V3 weights: loaded, frozen
    assert flat and all("indexer" in k for k in flat)  # what is left is the (fresh, trained) indexer


# ---- serving: latent + indexer key cache ---------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["auto", pytest.param("pallas", marks=pytest.mark.slow)])
def test_cached_prefill_and_decode_equal_recompute_and_hf(impl):
    """Chunked prefill (5 + 8 tokens) then one-token absorbed decode over the latent + indexer key cache: every
    position's logits equal the full forward's and HF's (the top-k among cached slots is the same selection).
    "pallas": both DSA kernels (interpret mode) over the cache slots; the recompute stays on the XLA path."""
    from dsv3_jax.model import Transformer, init_cache

    variables, cfg = load_hf(V32)
    cfg = dataclasses.replace(cfg, dtype="float32")  # as compute_logits runs it
    full = compute_logits(variables, cfg, np.load(V32 / "tokens.npy"))
    cfg = dataclasses.replace(cfg, dsa_attention_impl=impl, dsa_index_impl=impl)
    tokens, gold = jnp.asarray(np.load(V32 / "tokens.npy")), np.load(V32 / "logits.npy")
    B, T = tokens.shape
    model = Transformer(cfg)
    cache = init_cache(cfg, B, max_len=T + 3, dtype="float32")
    assert cache["moe"].k_index.shape == (cfg.num_moe_layers, B, T + 3, cfg.index_head_dim)
    run = jax.jit(lambda v, t, pos, c, absorbed: model.apply(v, t, positions=pos, cache=c, absorbed=absorbed,
                                                             mtp=False), static_argnames="absorbed")
    got = []
    for a, b in ((0, 5), (5, 13)):
        pos = jnp.broadcast_to(jnp.arange(a, b, dtype=jnp.int32), (B, b - a))
        out = run(variables, tokens[:, a:b], pos, cache, absorbed=False)
        cache = out.cache
        got.append(np.asarray(out.logits))
    for t in range(13, T):
        out = run(variables, tokens[:, t:t + 1], jnp.full((B, 1), t, jnp.int32), cache, absorbed=True)
        cache = out.cache
        got.append(np.asarray(out.logits))
    got = np.concatenate(got, 1)
    np.testing.assert_allclose(got, full, rtol=1e-4, atol=1e-4)
    assert _rel(got, gold) <= 1e-4


@pytest.mark.slow
def test_speculative_engine_with_dsa_equals_recompute():
    """The serving engine on a V3.2 model (top-4 of up to 44 keys, MTP speculation with its own DSA block): greedy
    tokens equal a full recompute at every step, with drafts both accepted and rejected."""
    from dsv3_jax.data import Tokenizer, train_bpe
    from dsv3_jax.model import Transformer
    from dsv3_jax.serving import Engine, SamplingParams
    from tests.common import random_variables
    from tests.test_engine import TEXT, speculation_friendly

    max_len = 48
    cfg = tiny_config(vocab_size=320, max_position_embeddings=max_len, index_topk=4, index_n_heads=2,
                      index_head_dim=8)
    variables = speculation_friendly(random_variables(cfg, seed=5))
    engine = Engine(cfg, variables, tokenizer=Tokenizer(train_bpe([TEXT], cfg.vocab_size), "t"), max_slots=2,
                    max_len=max_len, speculative=True)
    prompts = [[5, 6, 7, 8, 9, 10, 11], list(range(50, 70))]
    out = engine.generate(prompts, SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True))
    full = jax.jit(lambda t: Transformer(cfg).apply(variables, t, mtp=False).logits[0])
    for prompt, c in zip(prompts, out, strict=True):
        seq = list(prompt)
        for _ in range(20):
            x = np.zeros((1, max_len), np.int32)
            x[0, :len(seq)] = seq
            seq.append(int(np.argmax(full(x)[len(seq) - 1])))
        assert c.token_ids == seq[len(prompt):]
    assert 0.0 < engine.acceptance_rate < 1.0
