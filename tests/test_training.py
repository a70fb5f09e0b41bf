"""Training system: schedules, losses, bias update, the train step, checkpoints/resume, signals, CLI errors.

One tiny model config for every test that runs the step, so the jitted step compiles once per process.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax.config import Config, ConfigError, DataConfig, ModelConfig, TrainConfig, load_config, save_config
from dsv3_jax.model import ModelOutput, Transformer
from dsv3_jax.training import optim
from dsv3_jax.training.checkpoint import CheckpointDamaged, Checkpointer, restore_params
from dsv3_jax.training.loop import Diverged, train
from dsv3_jax.training.loss import compute_losses, mtp_targets
from dsv3_jax.training.metrics import flops_per_token
from dsv3_jax.training.runlock import RunDirLock, RunDirLocked
from dsv3_jax.training.schedule import Schedule
from dsv3_jax.training.step import (
    TrainState,
    hyper_at,
    indexer_only,
    init_state,
    max_violation,
    train_step,
    update_router,
)
from tests.common import TINY_MODEL_OVERRIDES
from tests.synthetic_data import SyntheticIterator

ROOT = Path(__file__).resolve().parents[1]
TINY = [  # the test model: every feature on, as small as it gets
    *TINY_MODEL_OVERRIDES, "model.initializer_range=0.02",
    "train.global_batch_size=4", "train.lr=1e-2", "train.warmup_steps=2", "train.log_every=1",
    "train.eval_every=0", "train.checkpoint_every=2", "train.steps=6",
]


def tiny_cfg(run_dir: Path | str = "runs/test", *overrides: str) -> Config:
    return load_config(None, [*TINY, f"run_dir={run_dir}", *overrides])


def data_fns(cfg: Config, **kw):
    def make(split):
        return lambda bs: SyntheticIterator(cfg.data, cfg.data.tokenizer_vocab_size, bs, split, **kw)
    return make("train"), make("validation")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def subprocess_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}


# ------------------------------------------------------------------------------------------------------------
# Schedules and the batch ramp
# ------------------------------------------------------------------------------------------------------------


def sched(**train_kw) -> Schedule:
    return Schedule(Config(train=TrainConfig(**train_kw)))


def test_lr_schedule_at_known_points():
    lr = sched(lr=1.0, lr_final=0.1, warmup_steps=10, lr_constant_tokens=1000, lr_decay_tokens=2000,
               lr_final_tokens=500, lr_tail=0.03).learning_rate
    assert lr(0, 0) == pytest.approx(0.1)  # first update: lr·1/warmup
    assert lr(4, 50) == pytest.approx(0.5)
    assert lr(9, 90) == pytest.approx(1.0)  # warm-up done
    assert lr(500, 999) == 1.0  # constant phase
    assert lr(500, 1000) == pytest.approx(1.0)  # cosine starts at lr
    assert lr(500, 2000) == pytest.approx(0.55)  # cosine midpoint: (lr + lr_final) / 2
    assert lr(500, 3000) == lr(500, 3499) == pytest.approx(0.1)  # end of decay, held for lr_final_tokens
    assert lr(500, 3500) == lr(10**9, 14_800_000_000_000) == 0.03  # then lr_tail, exact 64-bit tokens
    assert sched(lr=1.0, lr_final=0.1, warmup_steps=1, lr_decay_tokens=10).learning_rate(5, 10**12) == 0.1  # no tail
    assert sched(lr=1.0, warmup_steps=5, lr_decay_tokens=0).learning_rate(100, 10**12) == 1.0  # no decay


def test_mtp_lambda_and_gamma_switch_on_tokens():
    s = sched(mtp_lambda=0.3, mtp_lambda_late=0.1, mtp_lambda_switch_tokens=1e13, bias_update_speed=1e-3,
              bias_update_freeze_tokens=1.43e13)
    assert s.mtp_lambda(10**13 - 1) == 0.3 and s.mtp_lambda(10**13) == 0.1
    assert s.bias_update_speed(14 * 10**12) == 1e-3 and s.bias_update_speed(15 * 10**12) == 0.0


def test_batch_ramp_micro_batch_counts():
    s = sched(global_batch_size=16, micro_batch_size=2, batch_ramp_start=4, batch_ramp_tokens=1000,
              batch_ramp_levels=3)
    counts = [s.num_micro_batches(tok) for tok in (0, 333, 334, 666, 667, 999, 1000, 10**6)]
    # start 2 micro-batches, end 8; levels at tokens [0, 334), [334, 667), [667, 1000): 2, 4, 6; then 8.
    assert counts == [2, 2, 4, 4, 6, 6, 8, 8]
    assert sched(global_batch_size=8).num_micro_batches(0) == 1  # no ramp, no accumulation
    assert sched(global_batch_size=8, micro_batch_size=2).num_micro_batches(0) == 4
    with pytest.raises(ConfigError, match="multiple of the micro-batch size"):
        sched(global_batch_size=10, micro_batch_size=4)
    with pytest.raises(ConfigError, match="set a run length"):
        sched(steps=0)


def test_steps_to_tokens_matches_stepping_through_the_ramp():
    """Schedule.steps_to (level by level, closed form per level) = a step-by-step simulation of the loop."""
    s = Schedule(Config(data=DataConfig(seq_len=7), train=TrainConfig(
        global_batch_size=30, micro_batch_size=3, batch_ramp_start=6, batch_ramp_tokens=5000, batch_ramp_levels=5,
        steps=0, tokens=20_000)))
    step, seen, starts = 0, 0, []
    while not s.done(step, seen):
        starts.append(seen)
        seen += s.batch_size(seen) * 7
        step += 1
    assert s.total_steps == step == len(starts)
    for target in (0, 1, 20, 21, 999, 1000, 1001, 4999, 5000, 5001, 12_345, 20_000):
        assert s.steps_to(target) == sum(x < target for x in starts), target


def test_weight_decay_mask_skips_norms_and_1d():
    params = {"dense_layers": {"layers": {"block": {"input_layernorm": {"scale": jnp.ones((2, 8))},
                                                    "mlp": {"up_proj": {"kernel": jnp.ones((2, 8, 4))}}}}},
              "moe": {"layers": {"gate": jnp.ones((3, 8, 4)), "bias_like": jnp.ones((3, 4))}},
              "norm": {"scale": jnp.ones(8)}, "embed": {"embedding": jnp.ones((16, 8))}, "vec": jnp.ones(8)}
    mask = optim.decay_mask(params)
    assert mask["dense_layers"]["layers"]["block"]["input_layernorm"]["scale"] is False
    assert mask["dense_layers"]["layers"]["block"]["mlp"]["up_proj"]["kernel"] is True
    assert mask["moe"]["layers"]["gate"] is True and mask["moe"]["layers"]["bias_like"] is False
    assert mask["norm"]["scale"] is False and mask["vec"] is False and mask["embed"]["embedding"] is True


def test_bf16_moments_and_adamw_update():
    s = optim.OptimSettings(0.9, 0.95, 1e-8, 0.1, 1.0, "bfloat16")
    tx = optim.make_optimizer(s)
    params = {"w": jnp.full((2, 2), 2.0), "scale": jnp.ones(2)}
    state = tx.init(params)
    assert state[1].mu["w"].dtype == jnp.bfloat16 and state[1].nu["w"].dtype == jnp.bfloat16
    grads = {"w": jnp.full((2, 2), 0.1), "scale": jnp.full(2, 0.1)}
    direction, state = tx.update(grads, state, params)
    # First Adam step: m̂/√v̂ = sign(g) = 1; decay 0.1·p on w only (the norm scale is excluded).
    np.testing.assert_allclose(direction["w"], 1.0 + 0.1 * 2.0, rtol=1e-6)
    np.testing.assert_allclose(direction["scale"], 1.0, rtol=1e-6)


def _adam_case(seed: int, moments: str):
    """A params tree with every kind of leaf the decay mask tells apart, its optax-chain state after one step
    (non-zero moments, count 1), and gradient sums for the next step."""
    r = np.random.default_rng(seed)

    def f(*shape):
        return jnp.asarray(r.normal(size=shape), jnp.float32)

    params = {"moe": {"layers": {"w": f(3, 8, 16), "bias_like": f(3, 8)}}, "embed": {"embedding": f(32, 8)},
              "indexer": {"wq": f(8, 4)}, "norm": {"scale": 1 + 0.1 * f(8)}, "vec": f(8)}
    s = optim.OptimSettings(0.9, 0.95, 1e-8, 0.1, 1.0, moments)
    state = optim.make_optimizer(s).init(params)
    g0 = jax.tree.map(lambda p: 0.01 * jnp.asarray(r.normal(size=p.shape), jnp.float32), params)
    params, state, _ = optim.reference_adamw(g0, state, params, 1e-2, s)
    g = jax.tree.map(lambda p: jnp.asarray(r.normal(size=p.shape), jnp.float32), params)
    return s, params, state, g


@pytest.mark.parametrize("moments", ["float32", "bfloat16"])
@pytest.mark.parametrize("n,gscale,keep", [(1, 1e-3, False), (4, 1e-3, True), (3, 1.0, True)],
                         ids=["n1", "n4-frozen", "n3-clipped-frozen"])
def test_fused_adamw_is_the_optax_chain(moments, n, gscale, keep):
    """The one-pass update against the optax chain the step ran before (``optim.reference_adamw``: clip → Adam →
    decay as separate trees, then p - lr·u), from the same state, for both moment dtypes, with and without
    clipping, accumulation and the V3.2 warm-up's frozen leaves.

    Not bit-exact: (1) the fused g_sum·((c/‖g‖)/n) and optax's ((g_sum/n)/‖g‖)·c round 3 times each, so g
    differs by ≤ 6ε relative (ε = 2⁻²⁴; 0 without clipping and n a power of two); (2) XLA's CPU code contracts
    b·m + (1-b)·g into an FMA in one fusion layout and not in the other (seen: 1 ulp in 1 of 32 μ's), an error
    relative to the *terms*, not to the (possibly cancelling) sum. So each moment may differ by 16ε·M with
    M = b1|m₀| + (1-b1)|g| (resp. b2·v₀ + (1-b2)g²), plus one bf16 ulp (2⁻⁸·|m|) when stored in bf16; the
    direction u = m̂/(√v̂+eps) by 16ε·(M/c1/(√v̂+eps) + |u|); the param by lr times that plus one ulp of p.
    A wrong term (a missing bias correction, decay on a norm, the clip factor off) is off by ≥ 1e-3 relative."""
    s, params, state, g = _adam_case(0, moments)
    g = jax.tree.map(lambda x: gscale * n * x, g)  # g_sum of n micro-batches; ‖g_sum/n‖ ≈ 14·gscale
    keep_tree = indexer_only(params) if keep else None
    lr = np.float32(1e-2)
    ref = jax.jit(lambda g, o, p: optim.reference_adamw(g, o, p, lr, s, n, keep_tree))
    fused = jax.jit(lambda g, o, p: optim.fused_adamw(g, o, p, lr, s, n, keep_tree))
    (p_r, o_r, norm_r), (p_f, o_f, norm_f) = ref(g, state, params), fused(g, state, params)
    norm = float(norm_r)
    assert (norm >= 1.0) == (gscale == 1.0)
    assert norm_f == norm_r  # the same reductions
    assert int(o_f[1].count) == int(o_r[1].count) == 2
    assert jax.tree.structure(o_f) == jax.tree.structure(o_r)  # checkpoints keep their layout
    eps, c1, c2 = 2.0 ** -24, 1 - 0.9 ** 2, 1 - 0.95 ** 2
    bf16 = 2.0 ** -8 if moments == "bfloat16" else 0.0
    flat = [jax.tree.leaves(t) for t in (params, g, state[1].mu, state[1].nu, p_f, p_r, o_f[1].mu, o_r[1].mu,
                                         o_f[1].nu, o_r[1].nu, optim.decay_mask(params),
                                         keep_tree or jax.tree.map(lambda _: True, params))]
    for p0, gs, m0, v0, pf, pr, mf, mr, vf, vr, wd, k in zip(*flat):
        p0, m0, v0 = (np.asarray(x, np.float64) for x in (p0, m0, v0))
        pf, pr, mf, mr, vf, vr = (np.asarray(x, np.float32) for x in (pf, pr, mf, mr, vf, vr))
        if not k:  # frozen: the param stays bit for bit
            np.testing.assert_array_equal(pf, p0.astype(np.float32))
        ge = np.asarray(gs, np.float64) / n * min(1.0, 1.0 / norm) * k
        m, v = 0.9 * m0 + 0.1 * ge, 0.95 * v0 + 0.05 * ge ** 2
        big_m, big_v = 0.9 * np.abs(m0) + 0.1 * np.abs(ge), v
        assert (np.abs(mf - mr) <= 16 * eps * big_m + bf16 * np.abs(mr)).all()
        assert (np.abs(vf - vr) <= 16 * eps * big_v + bf16 * np.abs(vr)).all()
        den = np.sqrt(v / c2) + 1e-8
        u = m / c1 / den + (0.1 * p0 if wd else 0.0)
        np.testing.assert_allclose(pr, p0 - float(lr) * u * k, rtol=1e-5, atol=1e-7)  # the reference is AdamW
        bound = float(lr) * 16 * eps * (big_m / c1 / den + np.abs(u)) * k + np.spacing(np.abs(pr))
        assert (np.abs(pf - pr) <= bound).all(), float(np.max(np.abs(pf - pr) / bound))


def test_fused_adamw_refuses_a_foreign_state():
    s, params, state, g = _adam_case(1, "float32")
    with pytest.raises(TypeError, match="not AdamState"):
        optim.fused_adamw(g, (state[0], {"mu": state[1].mu}, state[2]), params, 1e-2, s)


# ------------------------------------------------------------------------------------------------------------
# Losses, bias update, MaxVio, FLOPs
# ------------------------------------------------------------------------------------------------------------


def np_ce(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    m = logits.max(-1, keepdims=True)
    lse = np.log(np.exp(logits - m).sum(-1)) + m[..., 0]
    return lse - np.take_along_axis(logits, targets[..., None], -1)[..., 0]


def fake_output(B=2, T=6, V=11, D=2, L=3, E=4, seed=0) -> ModelOutput:
    r = np.random.default_rng(seed)
    return ModelOutput(logits=jnp.asarray(r.normal(size=(B, T, V)), jnp.float32),
                       mtp_logits=jnp.asarray(r.normal(size=(D, B, T, V)), jnp.float32),
                       expert_load=jnp.zeros((L, E)), balance=jnp.asarray([1.0, 2.0, 3.0][:L], jnp.float32),
                       mtp_expert_load=jnp.zeros((D, E)), mtp_balance=jnp.full((D,), 0.5, jnp.float32),
                       cache=None, hidden=jnp.zeros((B, T, 1)))


def test_mtp_loss_matches_numpy():
    B, T, V, D = 2, 6, 11, 2
    out = fake_output(B, T, V, D)
    tokens = np.random.default_rng(1).integers(0, V, (B, T + 1))
    lam = 0.3
    losses = compute_losses(out, jnp.asarray(tokens), lam, balance_alpha=0.0)
    logits, mtp_logits = np.asarray(out.logits), np.asarray(out.mtp_logits)
    ce = np_ce(logits, tokens[:, 1:]).mean()
    # Depth k, position i predicts t_{i+k+1}; valid for i < T - k (the MTP input t_{i+k} was in the input).
    per_depth = [np.mean([np_ce(mtp_logits[k - 1, b, i], np.array(tokens[b, i + k + 1]))
                          for b in range(B) for i in range(T - k)]) for k in range(1, D + 1)]
    np.testing.assert_allclose(losses.ce, ce, rtol=1e-5)
    np.testing.assert_allclose(losses.mtp, np.mean(per_depth), rtol=1e-5)
    np.testing.assert_allclose(losses.total, ce + lam / D * sum(per_depth), rtol=1e-5)
    tgt, mask = mtp_targets(jnp.asarray(tokens), 2)
    assert mask.sum() == B * (T - 2) and int(tgt[0, 0]) == tokens[0, 3]


def test_cross_entropy_gradient_is_softmax_minus_onehot():
    """loss.token_nll's hand-written backward (an iota compare, no scatter) against the NumPy gradient of the
    masked mean CE, (softmax - onehot)·mask/Σmask, in float64. Tolerance: float32 exp/logsumexp of logits of size
    ~10, a few ulps of the largest gradient entry (≤ 1/Σmask)."""
    from dsv3_jax.training.loss import cross_entropy

    rng = np.random.default_rng(3)
    logits = (rng.standard_normal((2, 7, 19)) * 4).astype(np.float32)
    targets = rng.integers(0, 19, (2, 7))
    mask = rng.random((2, 7)) < 0.6
    for m in (None, mask):
        loss, grad = jax.value_and_grad(cross_entropy)(jnp.asarray(logits), jnp.asarray(targets),
                                                       None if m is None else jnp.asarray(m))
        x = logits.astype(np.float64)
        p = np.exp(x - x.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        w = np.ones(targets.shape) if m is None else m.astype(np.float64)
        onehot = np.eye(19)[targets]
        np.testing.assert_allclose(loss, (np_ce(logits, targets) * w).sum() / w.sum(), rtol=1e-6)
        np.testing.assert_allclose(grad, (p - onehot) * (w / w.sum())[..., None], rtol=0, atol=1e-7)


def test_balance_loss_sums_layers_times_alpha():
    out = fake_output(L=3, D=2)  # balance [1, 2, 3], mtp_balance [0.5, 0.5]
    tokens = jnp.zeros((2, 7), jnp.int32)
    l0 = compute_losses(out, tokens, 0.3, balance_alpha=0.0)
    l1 = compute_losses(out, tokens, 0.3, balance_alpha=1e-4)
    l2 = compute_losses(out, tokens, 0.3, balance_alpha=2e-4)
    np.testing.assert_allclose(l1.balance, 1e-4 * (1 + 2 + 3 + 0.5 + 0.5), rtol=1e-6)
    np.testing.assert_allclose(l2.balance, 2 * l1.balance, rtol=1e-6)
    np.testing.assert_allclose(l1.total - l0.total, l1.balance, rtol=1e-4)


def test_bias_update_sign_rule_and_maxvio():
    router = {"moe_layers": {"layers": {"block": {"mlp": {"e_score_correction_bias": jnp.zeros((2, 4))}}}},
              "mtp_0": {"block": {"mlp": {"e_score_correction_bias": jnp.full((4,), 0.5)}}}}
    load = jnp.asarray([[10.0, 2.0, 4.0, 0.0],  # mean 4: over, under, equal, under
                        [4.0, 4.0, 4.0, 4.0]])  # balanced: no change
    mtp_load = jnp.asarray([[0.0, 8.0, 0.0, 0.0]])  # mean 2
    new = update_router(router, load, mtp_load, 0.001)
    np.testing.assert_allclose(new["moe_layers"]["layers"]["block"]["mlp"]["e_score_correction_bias"],
                               [[-0.001, 0.001, 0.0, 0.001], [0.0, 0.0, 0.0, 0.0]])
    np.testing.assert_allclose(new["mtp_0"]["block"]["mlp"]["e_score_correction_bias"],
                               [0.501, 0.499, 0.501, 0.501])
    frozen = update_router(router, load, mtp_load, 0.0)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), frozen, router))
    np.testing.assert_allclose(max_violation(load), [10 / 4 - 1, 0.0])


def test_flops_per_token_formula():
    m = ModelConfig(vocab_size=100, hidden_size=8, intermediate_size=16, moe_intermediate_size=4,
                    num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=2, q_lora_rank=None,
                    kv_lora_rank=4, qk_nope_head_dim=4, qk_rope_head_dim=2, v_head_dim=4, n_routed_experts=4,
                    n_group=1, topk_group=1, num_experts_per_tok=2, num_nextn_predict_layers=1)
    pc = m.param_counts()
    n = pc["active"] - 100 * 8 + 100 * 8 + pc["mtp_active"]  # minus embedding, plus one more head (MTP)
    attn = 3 * 3 * 2 * 32 * (6 + 4)  # 3 · (2 layers + 1 MTP) · heads · T · (d_qk + d_v)
    assert flops_per_token(m, 32) == 6 * n + attn


# ------------------------------------------------------------------------------------------------------------
# The train step and the loop
# ------------------------------------------------------------------------------------------------------------


def test_loss_falls_on_a_repeating_batch():
    cfg = tiny_cfg()
    state = init_state(cfg)
    tokens = np.random.default_rng(0).integers(0, 256, (1, 4, 17)).astype(np.int32)
    losses, grad_norms = [], []
    for _ in range(30):
        state, m = train_step(state, tokens, cfg)
        losses.append(float(m["loss"]))
        grad_norms.append(float(m["grad_norm"]))
    assert losses[-1] < 0.25 * losses[0], losses
    assert all(map(math.isfinite, losses + grad_norms))
    assert int(state.step) == 30 and int(state.tokens_seen) == 30 * 4 * 16
    # The router biases moved by whole multiples of γ = 0.001 (no gradient ever reaches them).
    bias = np.asarray(state.router["moe_layers"]["layers"]["block"]["mlp"]["e_score_correction_bias"])
    assert np.abs(bias).max() > 0 and np.allclose(bias / 1e-3, np.round(bias / 1e-3), atol=1e-3)


def test_fp8_step_prequantizes_experts_and_matches_online_quantisation(monkeypatch):
    """``train.precision=fp8``: the step quantises the routed experts once, ahead of the layer scan
    (fp8.prequantize_experts); its update equals the one with every layer quantising its own weights."""
    from dsv3_jax import fp8

    cfg = tiny_cfg("runs/test", "train.precision=fp8")
    tokens = np.random.default_rng(0).integers(0, 256, (1, 4, 17)).astype(np.int32)
    calls = []
    real = fp8.prequantize_experts
    monkeypatch.setattr(fp8, "prequantize_experts", lambda *a, **k: calls.append(1) or real(*a, **k))
    ahead, m_ahead = train_step(init_state(cfg), tokens, cfg)
    assert calls
    monkeypatch.setattr(fp8, "prequantize_experts", lambda *a, **k: calls.append(0) or {})  # layers quantise
    jax.clear_caches()  # the step is jitted: retrace it with the patched function
    online, m_online = train_step(init_state(cfg), tokens, cfg)
    assert calls[-1] == 0
    for k in ("loss", "ce", "mtp_loss", "grad_norm"):
        np.testing.assert_allclose(m_ahead[k], m_online[k], rtol=1e-5, err_msg=k)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), ahead.params, online.params)


@pytest.mark.slow
def test_bf16_experts_cast_ahead_gives_the_same_update(monkeypatch):
    """``train.experts_cast_ahead``: the layers read one BF16 copy of the routed experts made outside the layer
    scan — cast before the first step (step.expert_copy), then written by each step's optimizer for the next —
    instead of each layer casting its slice. The cast commutes with slicing and its transpose (BF16 gradient →
    FP32) with stacking, so the arithmetic is the same: bit-identical updates, step after step. A params tree that
    is not the one the last step returned (here: edited experts) must not read that step's copy: it is cast
    afresh, and the update still equals the per-layer cast's."""
    from dsv3_jax.training import step as step_mod

    tokens = np.random.default_rng(0).integers(0, 256, (3, 1, 4, 17)).astype(np.int32)
    casts = []
    real = step_mod._cast_copy
    monkeypatch.setattr(step_mod, "_cast_copy", lambda *a: casts.append(1) or real(*a))
    cfgs = {ahead: tiny_cfg("runs/test", "model.dtype=bfloat16", f"train.experts_cast_ahead={ahead}")
            for ahead in ("true", "false")}
    states = {k: init_state(c) for k, c in cfgs.items()}
    for i in range(3):
        runs = {k: train_step(states[k], tokens[i], cfgs[k]) for k in cfgs}
        states = {k: r[0] for k, r in runs.items()}
        for k in ("loss", "ce", "mtp_loss", "grad_norm"):
            np.testing.assert_array_equal(runs["true"][1][k], runs["false"][1][k], err_msg=f"step {i}: {k}")
        jax.tree.map(np.testing.assert_array_equal, states["true"].params, states["false"].params)
    assert casts == [1], "steps 2 and 3 must read the copy the optimizer wrote, not cast again"

    def edit(path, w):  # new expert arrays: the last step's copy no longer matches them
        return w * 1.5 if step_mod.fp8.expert_leaf(path, w) else w

    edited = {k: s._replace(params=jax.tree_util.tree_map_with_path(edit, s.params)) for k, s in states.items()}
    runs = {k: train_step(edited[k], tokens[0], cfgs[k]) for k in cfgs}
    assert casts == [1, 1]
    np.testing.assert_array_equal(runs["true"][1]["loss"], runs["false"][1]["loss"])
    jax.tree.map(np.testing.assert_array_equal, runs["true"][0].params, runs["false"][0].params)


@pytest.mark.slow
def test_gradient_accumulation_matches_one_big_batch():
    """The batch ramp's mechanism: n micro-batches of m sequences = one batch of n·m (same update)."""
    cfg = tiny_cfg()
    tokens = np.random.default_rng(0).integers(0, 256, (1, 4, 17)).astype(np.int32)
    big, m_big = train_step(init_state(cfg), tokens, cfg)
    acc, m_acc = train_step(init_state(cfg), tokens.reshape(2, 2, 17), cfg)
    for k in ("loss", "ce", "mtp_loss", "grad_norm"):
        np.testing.assert_allclose(m_acc[k], m_big[k], rtol=2e-5, err_msg=k)
    np.testing.assert_array_equal(m_acc["expert_load"], m_big["expert_load"])  # loads summed over micro-batches
    # Adam's first update is lr·g/(|g|+ε) per element: where the summed gradient nearly cancels (|g| a few orders
    # above ε), the f32 reassociation of the two batchings' sums moves that quotient by up to ~1e-3, so params
    # agree to 1e-3 of the step's lr in absolute terms (elsewhere to rtol); a dropped or mis-scaled micro-batch
    # moves whole updates by O(lr) (and grad_norm above catches a scale error, to which Adam's first step is blind).
    lr = float(hyper_at(cfg, 0, 0).lr)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3 * lr), acc.params, big.params)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), acc.router, big.router))


def test_resume_is_bit_identical(tmp_path):
    straight = tiny_cfg(tmp_path / "straight")
    res = train(straight, *data_fns(straight))
    assert res.step == 6 and res.stopped_by is None

    split_dir = tmp_path / "split"
    first = tiny_cfg(split_dir, "train.steps=4", "train.checkpoint_every=3")
    assert train(first, *data_fns(first)).step == 4  # checkpoints at 3 and (final) 4
    # Steps 5..6 of an interrupted run were logged but never checkpointed: resuming must drop and redo them.
    with open(split_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 5, "loss": -1.0}) + "\n")
    second = tiny_cfg(split_dir, "train.checkpoint_every=3")
    res2 = train(second, *data_fns(second))
    assert res2.step == 6

    a, b = read_jsonl(tmp_path / "straight" / "metrics.jsonl"), read_jsonl(split_dir / "metrics.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "ce", "mtp_loss", "balance_loss", "grad_norm", "lr", "maxvio"):
        assert [r[key] for r in a] == [r[key] for r in b], key  # bit-identical (JSON floats round-trip)
    va, _ = restore_params(tmp_path / "straight")
    vb, cfg_b = restore_params(split_dir)
    assert jax.tree.all(jax.tree.map(lambda x, y: bool((np.asarray(x) == np.asarray(y)).all()), va, vb))
    assert cfg_b == second

    # Run dir contents: resolved config, metrics with the documented keys, TensorBoard events, keep-last-N.
    assert load_config(split_dir / "config.yaml") == second
    assert {"step", "loss", "ce", "mtp_loss", "balance_loss", "grad_norm", "lr", "tokens_per_s", "mfu",
            "maxvio"} <= set(b[-1]) and b[-1]["mfu"] is None  # CPU: no MFU
    assert len(b[-1]["maxvio"]) == 1 and len(read_jsonl(split_dir / "expert_load.jsonl")[-1]["load"][0]) == 8
    assert list((split_dir / "events").iterdir())
    assert Checkpointer(split_dir / "checkpoints").all_steps() == [3, 4, 6]

    # restore_params serves the model directly.
    logits = jax.jit(lambda v, t: Transformer(cfg_b.model).apply(v, t, mtp=False).logits)(
        vb, jnp.zeros((1, 8), jnp.int32))
    assert logits.shape == (1, 8, 256) and bool(jnp.isfinite(logits).all())

    from dsv3_jax import plot
    written = plot.main([str(split_dir)])
    assert {p.name for p in written} >= {"loss.png", "lr.png", "throughput.png", "expert_load.png"}


def test_run_length_in_tokens_ends_the_loop(tmp_path):
    cfg = tiny_cfg(tmp_path, "train.steps=0", "train.checkpoint_every=0")
    per_step = cfg.train.global_batch_size * cfg.data.seq_len
    cfg = tiny_cfg(tmp_path, "train.steps=0", "train.checkpoint_every=0", f"train.tokens={2 * per_step + 1}")
    assert Schedule(cfg).total_steps == 3
    res = train(cfg, *data_fns(cfg))  # stops at the first step that reaches train.tokens, logging it
    assert (res.step, res.tokens_seen, res.stopped_by) == (3, 3 * per_step, None)
    assert res.last_record["step"] == 3 and Checkpointer(tmp_path / "checkpoints").all_steps() == [3]


def test_partial_checkpoint_is_ignored(tmp_path):
    cfg = tiny_cfg(tmp_path, "train.steps=2")
    train(cfg, *data_fns(cfg))
    ckdir = tmp_path / "checkpoints"
    # What a crash mid-save leaves behind: an unfinalised tmp dir of a later step, with partial contents.
    partial = ckdir / "4.orbax-checkpoint-tmp-1234567890"
    shutil.copytree(ckdir / "2", partial)
    (partial / "commit_success.txt").unlink(missing_ok=True)
    (partial / "variables" / "garbage").write_bytes(b"\0" * 100)
    ck = Checkpointer(ckdir)
    assert ck.latest_step() == 2 and ck.all_steps() == [2]
    state, data_state = ck.restore(init_state(cfg))
    assert int(state.step) == 2 and data_state == {"index": 2}
    ck.close()
    assert not partial.exists()  # cleaned up on start
    # And the loop resumes from the good step.
    more = tiny_cfg(tmp_path, "train.steps=3")
    assert train(more, *data_fns(more)).step == 3
    # A different model in the same run dir is refused up front, naming the differing keys.
    other = tiny_cfg(tmp_path, "model.hidden_size=48")
    with pytest.raises(ConfigError, match="model.hidden_size: saved 32, now 48"):
        train(other, *data_fns(other))


KILL_DURING_SAVE = r"""
import os, signal, sys, time
import jax.numpy as jnp, numpy as np
from dsv3_jax.config import Config
from dsv3_jax.training.checkpoint import Checkpointer
from dsv3_jax.training.step import TrainState
d = sys.argv[1]
def state(step, size):
    big = {"w": jnp.full((size, 1024), float(step))}
    return TrainState(big, {}, {"m": jnp.zeros(4)}, np.int64(step), np.int64(step * 10), jnp.zeros(2, jnp.uint32))
ck = Checkpointer(d, async_save=True)
ck.save(state(1, 4), {"index": 1}, Config()); ck.wait()
ck.save(state(2, 50_000), {"index": 2}, Config())  # 200 MB: still writing when we die
for _ in range(2000):
    if any(".orbax-checkpoint-tmp" in p for p in os.listdir(d)):
        break
    time.sleep(0.005)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_kill_9_during_save_keeps_previous_checkpoint(tmp_path):
    d = tmp_path / "ck"
    r = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE, str(d)], env=subprocess_env(), check=False,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert any(".orbax-checkpoint-tmp" in p.name for p in d.iterdir()), list(d.iterdir())  # died mid-save
    ck = Checkpointer(d)
    assert ck.latest_step() == 1
    template = TrainState({"w": jnp.zeros((4, 1024))}, {}, {"m": jnp.zeros(4)}, np.int64(0), np.int64(0),
                          jnp.zeros(2, jnp.uint32))
    state, data_state = ck.restore(template)
    assert data_state == {"index": 1} and float(state.params["w"][0, 0]) == 1.0
    ck.close()


def test_nan_stops_with_step_and_keeps_last_good_checkpoint(tmp_path):
    cfg = tiny_cfg(tmp_path, "train.steps=10")

    def make_train(bs):
        return SyntheticIterator(cfg.data, 256, bs, bad_batch=2)  # the 3rd step sees an out-of-vocab token

    with pytest.raises(Diverged, match=r"step 3: loss=nan .* Last good checkpoint: .*checkpoints/2"):
        train(cfg, make_train)
    assert Checkpointer(tmp_path / "checkpoints").all_steps() == [2]  # the bad step 3 was not saved


def _largest_data_file(step_dir: Path, item: str) -> Path:
    return max((p for p in (step_dir / item).rglob("*") if p.is_file() and p.parent.name == "d"),
               key=lambda p: p.stat().st_size)


def test_damaged_checkpoint_falls_back_and_ends_bit_identical(tmp_path, capsys):
    """Issue 24: 4 KB overwritten in a data file of the latest step and a truncated data file of the one before:
    the resume reports both (naming step and file or arrays), restores the newest intact step instead, and the
    run ends with exactly the losses it had before the damage."""
    run = tmp_path / "damaged"
    cfg = tiny_cfg(run, "train.steps=8")
    train(cfg, *data_fns(cfg))  # checkpoints 4, 6, 8 (keep 3)
    undamaged = read_jsonl(run / "metrics.jsonl")
    ck = run / "checkpoints"

    target = _largest_data_file(ck / "8", "variables")
    with open(target, "r+b") as f:  # garble 4 KB in the middle
        f.seek(target.stat().st_size // 2)
        f.write(np.random.default_rng(0).bytes(4096))
    target = _largest_data_file(ck / "6", "opt")
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])  # truncated
    # Garbage in a compressed chunk is caught by the reader itself ("cannot be read"), elsewhere by the checksums:
    # where the 4 KB land depends on the layout Orbax wrote, and either way the step is refused by name.
    with pytest.raises(CheckpointDamaged, match=r"checkpoints/8.*(does not match its checksums \(array|cannot be read)"):
        restore_params(run, step=8)  # an explicit step: refused, naming it
    with pytest.raises(CheckpointDamaged, match=r"checkpoints/6 cannot be read .*truncated"):
        Checkpointer(ck).restore(init_state(cfg), step=6)
    capsys.readouterr()
    assert train(cfg, *data_fns(cfg)).step == 8
    err = capsys.readouterr().err
    assert re.search(r"checkpoint \S+/checkpoints/8(: the data in \S+/checkpoints/8/variables does not match| cannot be read)",
                     err), err
    assert re.search(r"checkpoint \S+/checkpoints/6 cannot be read", err), err
    assert re.search(r"resuming from the newest intact checkpoint \S+/checkpoints/4", err), err
    assert sorted(p.name for p in (run / "checkpoints.damaged").iterdir()) == ["6", "8"]

    b = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in undamaged] == [r["step"] for r in b] == list(range(1, 9))
    for key in ("loss", "grad_norm", "maxvio"):
        assert [r[key] for r in undamaged] == [r[key] for r in b], key

    # No intact step at all: a clear error naming each damaged one.
    for step in Checkpointer(ck).all_steps():
        t = _largest_data_file(ck / str(step), "variables")
        t.write_bytes(t.read_bytes()[:10])
    with pytest.raises(CheckpointDamaged, match=r"no intact checkpoint .*checkpoints/8.*checkpoints/6"):
        Checkpointer(ck).restore(init_state(cfg))


def test_one_writer_per_run_dir(tmp_path, capsys):
    """Issue 24: a second trainer on a live run dir stops at once naming the holder; the lock dies with its
    process however it ends (kill -9 leaves no stale lock)."""
    cfg = tiny_cfg(tmp_path, "train.steps=1")
    with RunDirLock(tmp_path):
        with pytest.raises(RunDirLocked, match=rf"in use by another training process \(pid {os.getpid()} on "):
            train(cfg, *data_fns(cfg))
        import train as train_py

        assert train_py.main(["--data-module", "tests.synthetic_data", *TINY, f"run_dir={tmp_path}"]) == 2
        assert f"pid {os.getpid()}" in capsys.readouterr().err
    assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "config.yaml").exists()

    code = ("import sys, time; from dsv3_jax.training.runlock import RunDirLock; "
            "RunDirLock(sys.argv[1]).acquire(); print('ok', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], env=subprocess_env(),
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "ok"
    with pytest.raises(RunDirLocked, match=rf"pid {holder.pid} "):
        RunDirLock(tmp_path).acquire()
    holder.kill()
    holder.wait(timeout=30)
    with RunDirLock(tmp_path):  # the dead holder's lock is gone (the file stays, unlocked)
        assert (tmp_path / ".lock.0").exists()


# ------------------------------------------------------------------------------------------------------------
# train.py: config errors and signals (subprocesses)
# ------------------------------------------------------------------------------------------------------------


def run_train_py(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], env=subprocess_env(), check=False,
                          capture_output=True, text=True, timeout=timeout)


def test_train_py_config_errors_exit_2_without_traceback(tmp_path, capsys):
    save_config(tiny_cfg(tmp_path), tmp_path / "cfg.yaml")
    r = run_train_py("--config", str(tmp_path / "cfg.yaml"), "train.stepz=5")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "train.stepz" in r.stderr and "'steps'" in r.stderr  # names the closest key

    import train as train_py  # the same entry point in-process (no JAX start-up per case)

    for args, expected in ((["train.steps=abc"], "train.steps='abc': expected int"),
                           (["--config", str(tmp_path / "missing.yaml")], "does not exist"),
                           (["model.hiden_size=64"], "Did you mean 'hidden_size'"),
                           (["train.global_batch_size=6", "train.micro_batch_size=4"],
                            "multiple of the micro-batch size"),
                           (["mesh.pipeline_schedule=1f1b"], "must be one of 'gpipe', 'circular'"),
                           (["train.steps=0"], "set a run length"),
                           (["mesh.pipeline_virtual_stages=0"], "must be ≥ 1"),
                           (["train.lr=-1"], "train.lr=-1.0: must be a finite number ≥ 0"),  # issue 24
                           (["train.steps=-5"], "train.steps=-5: must be an integer ≥ 0"),
                           (["train.adam_b2=1.5"], "train.adam_b2=1.5: must be in [0, 1)")):
        assert train_py.main(args) == 2
        assert expected in capsys.readouterr().err


def test_failed_save_is_one_line_naming_the_intact_checkpoint(tmp_path, monkeypatch, capsys):
    """Issue 24: a save that fails (here: the disk fills up at the second checkpoint) ends train.py with exit 4
    and one line saying what failed and which checkpoint is intact."""
    import errno

    import orbax.checkpoint as ocp

    import train as train_py

    save = ocp.CheckpointManager.save
    calls = []

    def full_disk(self, step, *args, **kw):
        calls.append(step)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(self, step, *args, **kw)

    monkeypatch.setattr(ocp.CheckpointManager, "save", full_disk)
    args = ["--data-module", "tests.synthetic_data", *TINY, f"run_dir={tmp_path}", "train.steps=4"]
    assert train_py.main(args) == 4
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.fullmatch(r"train\.py: error: saving step 4 to \S+/checkpoints failed \(OSError: \[Errno 28\] No "
                        r"space left on device\); the newest complete checkpoint is \S+/checkpoints/2", err), err
    assert Checkpointer(tmp_path / "checkpoints").all_steps() == [2]


@pytest.mark.slow
def test_sigterm_saves_and_exits_0(tmp_path):
    cfg = tiny_cfg(tmp_path / "run", "train.steps=100000", "train.checkpoint_every=100000")
    save_config(cfg, tmp_path / "cfg.yaml")
    log = (tmp_path / "stderr.txt").open("w")
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--config", str(tmp_path / "cfg.yaml"),
                             "--data-module", "tests.synthetic_data"], env=subprocess_env(),
                            stdout=subprocess.DEVNULL, stderr=log)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and metrics.read_text().count("\n") >= 3:
            break
        time.sleep(0.2)
    assert proc.poll() is None, (tmp_path / "stderr.txt").read_text()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    log.close()
    err = (tmp_path / "stderr.txt").read_text()
    assert proc.returncode == 0, err
    assert "SIGTERM: saved step" in err
    steps = Checkpointer(tmp_path / "run" / "checkpoints").all_steps()
    last_logged = read_jsonl(metrics)[-1]["step"]
    assert len(steps) == 1 and steps[0] == last_logged >= 3  # the step finished, was logged and saved


_SAVE_ON_LAST_DEVICE = """
import sys, jax, jax.numpy as jnp, numpy as np
from dsv3_jax.config import Config, ModelConfig
from dsv3_jax.params_io import save_variables
from dsv3_jax.training.checkpoint import Checkpointer
from dsv3_jax.training.step import TrainState
dev = jax.devices()[-1]
assert dev.id == 3, jax.devices()
params = {"w": jax.device_put(jnp.arange(12, dtype=jnp.float32).reshape(3, 4), dev)}
router = {"b": jax.device_put(jnp.ones(2, jnp.float32), dev)}
save_variables(sys.argv[1] + "/params", {"params": params, "router": router}, ModelConfig())
ck = Checkpointer(sys.argv[1] + "/run", async_save=False)
ck.save(TrainState(params, router, {"mu": params}, np.int64(5), np.int64(0), jax.device_put(jnp.zeros(2, jnp.uint32), dev)),
        None, Config())
ck.close()
"""

_RESTORE_ON_ONE_DEVICE = """
import sys, jax, numpy as np
from dsv3_jax.params_io import load_variables
from dsv3_jax.training.checkpoint import restore_params
assert len(jax.devices()) == 1
v, _ = load_variables(sys.argv[1] + "/params", dtype="bfloat16")
r, _ = restore_params(sys.argv[1] + "/run")
for tree, wdt in ((v, "bfloat16"), (r, "float32")):
    assert str(tree["params"]["w"].dtype) == wdt and str(tree["router"]["b"].dtype) == "float32"
    np.testing.assert_array_equal(np.asarray(tree["params"]["w"], np.float32), np.arange(12.0).reshape(3, 4))
    assert tree["params"]["w"].devices() == {jax.devices()[0]}
print("OK")
"""


def test_checkpoints_restore_on_another_topology(tmp_path):
    """Saved from device cpu:3 of a 4-device process, both checkpoint kinds restore in a 1-device process (a
    checkpoint from a GPU box served elsewhere): the saved shardings name devices that no longer exist."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    for code, n in ((_SAVE_ON_LAST_DEVICE, 4), (_RESTORE_ON_ONE_DEVICE, 1)):
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n}"
        r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env, capture_output=True, text=True,
                           timeout=300, check=False)
        assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().endswith("OK")
