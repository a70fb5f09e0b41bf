"""The model against independent references: HF transformers goldens, NumPy, and its own slow paths."""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax import moe, rope
from dsv3_jax.attention import LatentCache
from dsv3_jax.config import ModelConfig, RopeScaling
from dsv3_jax.hf import load_hf
from dsv3_jax.model import Transformer, head_logits, init_cache, init_mtp_cache, init_variables, mtp_step
from tests.common import FIXTURES, random_variables, tiny_config

GOLDEN = ["tiny_yarn", "tiny_plainq", "tiny_yarn_fp8", "hf_save_pretrained"]


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


@pytest.fixture(scope="module", params=GOLDEN)
def golden(request):
    d = FIXTURES / request.param
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # hf_save_pretrained has no MTP tensors (HF drops them); loader warns
        variables, cfg = load_hf(d)
    cfg = dataclasses.replace(cfg, dtype="float32")
    tokens = np.load(d / "tokens.npy")
    out = jax.jit(lambda v, t: Transformer(cfg).apply(v, t))(variables, tokens)
    return d, cfg, variables, tokens, out


def test_logits_match_hf(golden):
    d, _, _, _, out = golden
    gold = np.load(d / "logits.npy")
    assert out.logits.shape == gold.shape
    assert rel_err(out.logits, gold) <= 1e-3
    # A wrong model is far off: the check can fail.
    assert rel_err(np.roll(np.asarray(out.logits), 1, axis=1), gold) > 1e-2


def test_mtp_logits_match_reference(golden):
    d, cfg, _, _, out = golden
    for k in range(1, cfg.num_nextn_predict_layers + 1):
        gold = np.load(d / f"mtp_logits_k{k}.npy")  # [B, T-k, V]: positions with an input token
        ours = np.asarray(out.mtp_logits[k - 1][:, : gold.shape[1]])
        assert rel_err(ours, gold) <= 1e-3, f"MTP depth {k}"


def test_forward_aux_outputs(golden):
    _, cfg, _, tokens, out = golden
    B, T = tokens.shape
    assert out.expert_load.shape == (cfg.num_moe_layers, cfg.n_routed_experts)
    # Dropless: every token reaches exactly K experts in every MoE layer.
    np.testing.assert_array_equal(np.asarray(out.expert_load).sum(-1), B * T * cfg.num_experts_per_tok)
    assert out.balance.shape == (cfg.num_moe_layers,)
    assert np.all(np.asarray(out.balance) > 0)


@pytest.mark.parametrize("moe_impl", ["auto", "gather"])
def test_absorbed_decode_equals_naive_forward(moe_impl):
    """Prefill half the prompt, then decode one token at a time over the latent cache (absorbed path);
    every step's logits equal the full naive forward's at that position (decode's MoE as auto or gather)."""
    cfg = tiny_config()
    variables = init_variables(cfg, jax.random.key(0))
    B, T, P = 2, 12, 5
    tokens = jax.random.randint(jax.random.key(1), (B, T), 0, cfg.vocab_size)
    full = jax.jit(lambda v, t: Transformer(cfg).apply(v, t, mtp=False).logits)(variables, tokens)
    model = Transformer(dataclasses.replace(cfg, moe_impl=moe_impl))

    cache = init_cache(cfg, B, max_len=16, dtype="float32")
    prefill = jax.jit(lambda v, t, c: model.apply(v, t, cache=c, mtp=False))
    out = prefill(variables, tokens[:, :P], cache)  # naive prefill over the cache
    np.testing.assert_allclose(out.logits, full[:, :P], rtol=1e-4, atol=1e-4)
    cache = out.cache
    step = jax.jit(lambda v, t, pos, c: model.apply(v, t, positions=pos, cache=c, absorbed=True, mtp=False))
    for t in range(P, T):
        pos = jnp.full((B, 1), t, jnp.int32)
        out = step(variables, tokens[:, t:t + 1], pos, cache)
        cache = out.cache
        np.testing.assert_allclose(out.logits[:, 0], full[:, t], rtol=1e-4, atol=1e-4)
    # The cache holds exactly kv_lora + rope values per token per layer.
    assert cache["moe"].c_kv.shape[-1] + cache["moe"].k_rope.shape[-1] == cfg.latent_cache_dim


def test_mtp_over_its_cache_equals_training_path():
    """MTP modules run window by window over their own latent caches (serving's drafts: naive prefill, then
    absorbed single steps) give the training path's MTP logits; depth 2 chains on depth 1's hidden state."""
    cfg = tiny_config(num_nextn_predict_layers=2)
    variables = random_variables(cfg, seed=4)
    B, T, P = 2, 10, 4
    tokens = jax.random.randint(jax.random.key(5), (B, T), 0, cfg.vocab_size)
    full = jax.jit(lambda v, t: Transformer(cfg).apply(v, t))(variables, tokens)
    ext = jnp.pad(tokens, ((0, 0), (0, cfg.num_nextn_predict_layers)))

    @functools.partial(jax.jit, static_argnums=4)
    def window(v, h, pos, caches, absorbed):
        logits, new = [], []
        for k in (1, 2):  # module k at position i reads t_{i+k}
            nxt = jnp.take_along_axis(ext, pos + k, axis=1)
            h, hn, c = mtp_step(cfg, v, k, h, nxt, pos, caches[k - 1], absorbed)
            logits.append(head_logits(cfg, v, hn))
            new.append(c)
        return logits, new

    mtp_cache = init_mtp_cache(cfg, B, 16, "float32")
    caches = [LatentCache(mtp_cache.c_kv[k], mtp_cache.k_rope[k]) for k in range(2)]
    pos = jnp.broadcast_to(jnp.arange(P), (B, P))
    logits, caches = window(variables, full.hidden[:, :P], pos, caches, False)
    for k in (1, 2):
        np.testing.assert_allclose(logits[k - 1], full.mtp_logits[k - 1][:, :P], rtol=1e-4, atol=1e-4)
    for t in range(P, T - 2):  # positions whose depth-2 input token exists
        pos = jnp.full((B, 1), t, jnp.int32)
        logits, caches = window(variables, full.hidden[:, t:t + 1], pos, caches, True)
        for k in (1, 2):
            np.testing.assert_allclose(logits[k - 1][:, 0], full.mtp_logits[k - 1][:, t], rtol=1e-4, atol=1e-4)


def test_absorbed_equals_naive_over_same_cache():
    cfg = tiny_config()
    variables = init_variables(cfg, jax.random.key(2))
    tokens = jax.random.randint(jax.random.key(3), (2, 7), 0, cfg.vocab_size)
    cache = init_cache(cfg, 2, 8, "float32")
    run = jax.jit(lambda v, t, c, absorbed: Transformer(cfg).apply(v, t, cache=c, absorbed=absorbed, mtp=False).logits,
                  static_argnums=3)
    naive, absorbed = run(variables, tokens, cache, False), run(variables, tokens, cache, True)
    np.testing.assert_allclose(absorbed, naive, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------
# Gate vs a NumPy reference
# ---------------------------------------------------------------------------------------------------------


def numpy_route(logits, bias, cfg):
    """Plain-loop reference of REFERENCE §5 for one token at a time."""
    N, E = logits.shape
    G, K = cfg.n_group, cfg.num_experts_per_tok
    experts, weights = [], []
    for n in range(N):
        z = logits[n].astype(np.float64)
        s = 1 / (1 + np.exp(-z)) if cfg.scoring_func == "sigmoid" else np.exp(z - z.max()) / np.exp(z - z.max()).sum()
        sb = s + (bias if bias is not None else 0)
        if cfg.topk_method != "greedy" and G > 1:
            groups = sb.reshape(G, E // G)
            if cfg.topk_method == "noaux_tc":
                gscore = np.sort(groups, axis=1)[:, -2:].sum(1)
            else:
                gscore = groups.max(1)
            keep = np.argsort(-gscore, kind="stable")[: cfg.topk_group]
            masked = np.full(E, -np.inf)
            for g in keep:
                masked[g * (E // G):(g + 1) * (E // G)] = sb[g * (E // G):(g + 1) * (E // G)]
            sb = masked
        top = np.argsort(-sb, kind="stable")[:K]
        w = s[top]
        if cfg.norm_topk_prob and K > 1:
            w = w / w.sum()
        experts.append(top)
        weights.append(w * cfg.routed_scaling_factor)
    return np.array(experts), np.array(weights)


@pytest.mark.parametrize("scoring,method,norm", [("sigmoid", "noaux_tc", True), ("softmax", "group_limited_greedy", False),
                                                 ("softmax", "greedy", False)])
def test_gate_matches_numpy(scoring, method, norm):
    cfg = dataclasses.replace(tiny_config(), scoring_func=scoring, topk_method=method, norm_topk_prob=norm,
                              n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4)
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(64, 16)).astype(np.float32)
    bias = (rng.normal(size=16) * 0.5).astype(np.float32) if method == "noaux_tc" else None
    r = moe.route(jnp.asarray(logits), None if bias is None else jnp.asarray(bias), cfg)
    ref_e, ref_w = numpy_route(logits, bias, cfg)
    ours_e = np.asarray(r.experts)
    order = np.argsort(ours_e, axis=1)
    ref_order = np.argsort(ref_e, axis=1)
    np.testing.assert_array_equal(np.take_along_axis(ours_e, order, 1), np.take_along_axis(ref_e, ref_order, 1))
    np.testing.assert_allclose(np.take_along_axis(np.asarray(r.weights), order, 1),
                               np.take_along_axis(ref_w, ref_order, 1), rtol=1e-5)


def test_bias_selects_but_does_not_weight():
    cfg = dataclasses.replace(tiny_config(), n_group=1, topk_group=1, num_experts_per_tok=2, n_routed_experts=4)
    logits = jnp.array([[2.0, 1.0, 0.0, -1.0]])
    plain = moe.route(logits, jnp.zeros(4), cfg)
    assert sorted(np.asarray(plain.experts)[0].tolist()) == [0, 1]
    biased = moe.route(logits, jnp.array([0.0, 0.0, 0.0, 5.0]), cfg)
    assert sorted(np.asarray(biased.experts)[0].tolist()) == [0, 3]  # bias moved the selection...
    s = jax.nn.sigmoid(logits[0])
    w = np.asarray(biased.weights)[0][np.argsort(np.asarray(biased.experts)[0])]
    expect = np.array([s[0], s[3]]) / (s[0] + s[3]) * cfg.routed_scaling_factor  # ...weights stay unbiased
    np.testing.assert_allclose(w, expect, rtol=1e-6)


def test_group_limit_masks_groups():
    cfg = dataclasses.replace(tiny_config(), n_routed_experts=8, n_group=4, topk_group=1, num_experts_per_tok=2)
    # Group 1 (experts 2, 3) has the best top-2 sum although expert 7 alone scores highest.
    logits = jnp.array([[0.0, 0.0, 3.0, 3.0, 0.0, 0.0, -5.0, 4.0]])
    r = moe.route(logits, jnp.zeros(8), cfg)
    assert sorted(np.asarray(r.experts)[0].tolist()) == [2, 3]


def test_ragged_dispatch_equals_dense_and_differentiates():
    cfg = tiny_config()
    rng = jax.random.split(jax.random.key(0), 5)
    d, E, F, N = cfg.hidden_size, cfg.n_routed_experts, cfg.moe_intermediate_size, 40
    x = jax.random.normal(rng[0], (N, d))
    wg, wu = jax.random.normal(rng[1], (E, d, F)) * 0.1, jax.random.normal(rng[2], (E, d, F)) * 0.1
    wd = jax.random.normal(rng[3], (E, F, d)) * 0.1
    r = moe.route(jax.random.normal(rng[4], (N, E)), jnp.zeros(E), cfg)
    np.testing.assert_allclose(moe.dispatch_ragged(x, r, wg, wu, wd), moe.dispatch_dense(x, r, wg, wu, wd),
                               rtol=1e-5, atol=1e-5)
    g1 = jax.grad(lambda w: moe.dispatch_ragged(x, r, w, wu, wd).sum())(wg)
    g2 = jax.grad(lambda w: moe.dispatch_dense(x, r, w, wu, wd).sum())(wg)
    np.testing.assert_allclose(g1, g2, rtol=1e-4, atol=1e-5)
    # The decode path (gathered expert weights, no sort) is the same function.
    np.testing.assert_allclose(moe.dispatch_gather(x[:3], _take(r, 3), wg, wu, wd),
                               moe.dispatch_dense(x[:3], _take(r, 3), wg, wu, wd), rtol=1e-5, atol=1e-5)


def _take(r: moe.Routing, n: int) -> moe.Routing:
    return moe.Routing(*(a[:n] for a in r))


def test_sequence_balance_formula():
    cfg = dataclasses.replace(tiny_config(), n_routed_experts=4, n_group=1, topk_group=1, num_experts_per_tok=2)
    rng = np.random.default_rng(1)
    scores = rng.uniform(0.1, 1, size=(2, 5, 4)).astype(np.float32)
    experts = np.stack([np.argsort(-scores[b], axis=-1)[:, :2] for b in range(2)])
    got = float(moe.sequence_balance(jnp.asarray(scores), jnp.asarray(experts), cfg))
    ref = 0.0
    for b in range(2):
        p = (scores[b] / scores[b].sum(-1, keepdims=True)).mean(0)
        f = np.array([(experts[b] == i).sum() for i in range(4)]) * 4 / (2 * 5)
        ref += (f * p).sum() / 2
    assert math.isclose(got, ref, rel_tol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# RoPE / YaRN
# ---------------------------------------------------------------------------------------------------------


def test_yarn_frequencies_match_formula_and_hf():
    cfg = ModelConfig(qk_rope_head_dim=64, rope_theta=10000.0, max_position_embeddings=163840,
                      rope_scaling=RopeScaling(factor=40, original_max_position_embeddings=4096))
    d, base, s, L0 = 64, 10000.0, 40.0, 4096

    def corr(r):
        return d * math.log(L0 / (2 * math.pi * r)) / (2 * math.log(base))

    low, high = max(math.floor(corr(32)), 0), min(math.ceil(corr(1)), d - 1)
    f = base ** (-np.arange(0, d, 2) / d)
    ramp = np.clip((np.arange(d // 2) - low) / (high - low), 0, 1)
    expect = f / s * ramp + f * (1 - ramp)
    np.testing.assert_allclose(rope.inv_freq(cfg), expect, rtol=1e-6)
    scale, cos_factor = rope.attention_factors(cfg)
    m = 0.1 * math.log(40) + 1
    assert math.isclose(scale, 192 ** -0.5 * m * m, rel_tol=1e-12) and cos_factor == 1.0
    # Against HF's own numbers for the tiny_yarn fixture (mscale ≠ mscale_all_dim).
    hf = np.load(FIXTURES / "tiny_yarn" / "rope_debug.npz")
    _, tcfg = load_hf(FIXTURES / "tiny_yarn")
    np.testing.assert_allclose(rope.inv_freq(tcfg), hf["inv_freq"], rtol=1e-6)
    t_scale, t_factor = rope.attention_factors(tcfg)
    assert math.isclose(t_scale, float(hf["softmax_scale"]), rel_tol=1e-6)
    assert math.isclose(t_factor, float(hf["cos_sin_factor"]), rel_tol=1e-6)


def test_yarn_off_when_official_and_not_extended():
    rs = RopeScaling(factor=4, original_max_position_embeddings=4096)
    hf_like = ModelConfig(max_position_embeddings=4096, rope_scaling=rs)
    official = dataclasses.replace(hf_like, yarn_only_when_extended=True)
    assert hf_like.uses_yarn and not official.uses_yarn
    assert rope.attention_factors(official) == (192 ** -0.5, 1.0)


@pytest.mark.parametrize("interleave", [True, False])
def test_rope_is_a_relative_rotation(interleave):
    """q·k after RoPE depends only on the position difference, in both pairing conventions."""
    cfg = ModelConfig(qk_rope_head_dim=8, rope_scaling=None)
    rng = np.random.default_rng(0)
    q, k = rng.normal(size=8).astype(np.float32), rng.normal(size=8).astype(np.float32)

    def dot(pq, pk):
        pos = jnp.array([[pq, pk]])
        cos, sin = rope.rope_tables(cfg, pos)
        x = jnp.stack([q, k])[None]
        y = rope.apply_rope(x, cos, sin, interleave)[0]
        return float(y[0] @ y[1])

    assert math.isclose(dot(3, 1), dot(10, 8), rel_tol=1e-4)
    assert not math.isclose(dot(3, 1), dot(3, 2), rel_tol=1e-3)


def test_yarn_variants_match_hf():
    """HF's own YaRN numbers for rope_scaling variants (no truncation, explicit attention_factor, mscale only)."""
    import json

    from dsv3_jax.config import model_config_from_hf, model_config_to_hf

    variants = json.loads((FIXTURES / "rope_variants.json").read_text())
    base = model_config_to_hf(ModelConfig(qk_rope_head_dim=64))
    for name, v in variants.items():
        cfg = model_config_from_hf({**base, "rope_scaling": v["rope_scaling"],
                                    "max_position_embeddings": v["max_position_embeddings"]})
        np.testing.assert_allclose(rope.inv_freq(cfg), v["inv_freq"], rtol=1e-6, err_msg=name)
        scale, factor = rope.attention_factors(cfg)
        assert math.isclose(scale, v["softmax_scale"], rel_tol=1e-6), name
        assert math.isclose(factor, v["cos_sin_factor"], rel_tol=1e-6), name


@pytest.mark.parametrize("in_dims,x_shape,k_shape", [(1, (3, 8, 16), (16, 12)), (2, (3, 8, 2, 16), (2, 16, 12)),
                                                     (1, (3, 8, 16), (16, 3, 5))])
def test_bf16_projection_gradients_stay_bf16_and_match_f32(in_dims, x_shape, k_shape):
    """``project`` in bf16 with an f32 master kernel: forward and both gradients match an f32 HIGHEST reference
    to bf16 accuracy, the kernel gradient comes back f32, and no backward GEMM runs on f32 inputs (that made
    them TF32 on Hopper)."""
    from dsv3_jax.layers import _dims, project

    kx, kk, kg = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, x_shape).astype(jnp.bfloat16)
    k = jax.random.normal(kk, k_shape)
    gy = jax.random.normal(kg, x_shape[:len(x_shape) - in_dims] + k_shape[in_dims:])

    def ours(x, k):
        return (project(x, k, in_dims, jnp.bfloat16).astype(jnp.float32) * gy).sum()

    def ref(x, k):
        return (jax.lax.dot_general(x.astype(jnp.float32), k, _dims(x, in_dims), precision="highest") * gy).sum()

    (dx, dk), (rx, rk) = jax.grad(ours, (0, 1))(x, k), jax.grad(ref, (0, 1))(x, k)
    assert dx.dtype == jnp.bfloat16 and dk.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(dx, np.float32), rx, atol=0.02 * float(jnp.abs(rx).max()))
    np.testing.assert_allclose(dk, rk, atol=0.01 * float(jnp.abs(rk).max()))
    y = project(x, k, in_dims, jnp.bfloat16)
    y_ref = jax.lax.dot_general(x.astype(jnp.float32), k, _dims(x, in_dims), precision="highest")
    np.testing.assert_allclose(np.asarray(y, np.float32), y_ref, atol=0.01 * float(jnp.abs(y_ref).max()))
    dots = [e for e in jax.make_jaxpr(jax.grad(ours, (0, 1)))(x, k).jaxpr.eqns if e.primitive.name == "dot_general"]
    assert len(dots) >= 2 and all(v.aval.dtype == jnp.bfloat16 for e in dots for v in e.invars)


def test_unrolled_layer_scan_gives_the_same_loss_and_grads():
    """``model.scan_unroll`` only changes how XLA loops over the stacked layers (a while loop with dynamic slices
    vs static slices). Same params layout, same math per layer: the loss and every gradient agree to float32
    reassociation (XLA fuses the unrolled body differently: ~1e-6 relative measured; 1e-4 bounds it, where a
    layer run with another layer's weights or a gradient written to the wrong slice is off by O(1))."""
    cfg = tiny_config(num_hidden_layers=4, remat="full")  # 1 dense + 3 MoE layers: a 3-long scan
    variables = random_variables(cfg, seed=5)
    tokens = jnp.asarray(np.random.default_rng(5).integers(0, cfg.vocab_size, (2, 12)), jnp.int32)

    def loss_and_grads(c):
        def loss(p):
            out = Transformer(c).apply({**variables, "params": p}, tokens)
            return jnp.mean(jax.nn.logsumexp(out.logits, -1)) + jnp.mean(out.mtp_logits ** 2)
        return jax.jit(jax.value_and_grad(loss))(variables["params"])

    l1, g1 = loss_and_grads(cfg)
    lu, gu = loss_and_grads(dataclasses.replace(cfg, scan_unroll=3))
    np.testing.assert_allclose(lu, l1, rtol=1e-5)
    for path, a, b in zip(jax.tree_util.tree_leaves_with_path(gu), jax.tree.leaves(gu), jax.tree.leaves(g1)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * float(jnp.abs(b).max()),
                                   err_msg=jax.tree_util.keystr(path[0]))
