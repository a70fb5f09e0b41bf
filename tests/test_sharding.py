"""Sharded runs on 8 simulated CPU devices give one device's numbers."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dsv3_jax import moe
from dsv3_jax.config import ConfigError, MeshConfig
from dsv3_jax.model import Transformer, init_variables
from sharding.expert import ep_dispatch
from sharding.mesh import make_mesh, mesh_shape
from sharding.partition import batch_sharding, parallel_context, variable_shardings, zero1_sharding
from sharding.pipeline import bubble_fraction
from tests.common import tiny_config

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")

CFG = tiny_config(num_hidden_layers=5)  # 1 dense + 4 MoE layers: splits into 2 or 4 pipeline stages


def _loss(cfg):
    def f(params, router, tokens):
        out = Transformer(cfg).apply({"params": params, "router": router}, tokens)
        ce = optax.softmax_cross_entropy_with_integer_labels(out.logits[:, :-1], tokens[:, 1:]).mean()
        mtp = optax.softmax_cross_entropy_with_integer_labels(out.mtp_logits[0][:, :-2], tokens[:, 2:]).mean()
        return ce + 0.3 * mtp + 1e-2 * out.balance.mean(), out.expert_load
    return jax.value_and_grad(f, has_aux=True)


@pytest.fixture(scope="module")
def reference():
    v = init_variables(CFG, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (8, 16), 0, CFG.vocab_size)
    return v, tokens, jax.jit(_loss(CFG))(v["params"], v["router"], tokens)


@pytest.mark.parametrize("mesh_cfg", [
    MeshConfig(data=8),
    MeshConfig(data=1, expert=8),
    MeshConfig(data=2, fsdp=2, expert=2),
    pytest.param(MeshConfig(pipeline=2, data=2, expert=2), marks=pytest.mark.slow),
    pytest.param(MeshConfig(pipeline=4, data=1, expert=2), marks=pytest.mark.slow),
], ids=["dp8", "ep8", "dp2-fsdp2-ep2", "pp2-dp2-ep2", "pp4-ep2"])
def test_loss_and_grads_match_one_device(reference, mesh_cfg):
    v, tokens, ((loss, load), grads) = reference
    mesh = make_mesh(mesh_cfg)
    vs = jax.device_put(v, variable_shardings(CFG, mesh))
    t = jax.device_put(tokens, batch_sharding(mesh))
    with parallel_context(mesh):
        (l2, load2), g2 = jax.jit(_loss(CFG))(vs["params"], vs["router"], t)
    assert abs(float(l2) - float(loss)) <= 1e-5 * abs(float(loss))
    np.testing.assert_array_equal(np.asarray(load2), np.asarray(load))  # same routing, every token counted
    for a, b in zip(jax.tree.leaves(g2), jax.tree.leaves(grads)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
    # Experts really are split over the expert axis.
    w = vs["params"]["moe_layers"]["layers"]["block"]["mlp"]["gate_proj"]
    assert w.sharding.shard_shape(w.shape)[1] == CFG.n_routed_experts // mesh.shape["expert"]
    # Embedding and LM head are split over the pipeline stages, not copied onto each (vocab 97 is prime, so
    # the pipeline axis lands on their model dim).
    for leaf in (vs["params"]["embed"]["embedding"], vs["params"]["lm_head"]["kernel"]):
        assert leaf.sharding.shard_shape(leaf.shape)[0] * leaf.sharding.shard_shape(leaf.shape)[1] * \
            mesh.shape["pipeline"] * mesh.shape["fsdp"] == leaf.size


@pytest.mark.slow
def test_vocab_split_over_pipeline_matches_one_device():
    """With a vocab the stages divide, embedding, LM head and logits are sharded on the vocab dim over
    ``pipeline`` (no full copy per stage); loss and gradients still equal one device."""
    cfg = dataclasses.replace(CFG, vocab_size=96)
    v = init_variables(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (8, 16), 0, cfg.vocab_size)
    (loss, _), grads = jax.jit(_loss(cfg))(v["params"], v["router"], tokens)
    mesh = make_mesh(MeshConfig(pipeline=2, data=2, expert=2))
    vs = jax.device_put(v, variable_shardings(cfg, mesh))
    emb, head = vs["params"]["embed"]["embedding"], vs["params"]["lm_head"]["kernel"]
    assert emb.sharding.shard_shape(emb.shape)[0] == 48 and head.sharding.shard_shape(head.shape)[1] == 48
    with parallel_context(mesh):
        (l2, _), g2 = jax.jit(_loss(cfg))(vs["params"], vs["router"], jax.device_put(tokens, batch_sharding(mesh)))
    assert abs(float(l2) - float(loss)) <= 1e-5 * abs(float(loss))
    for a, b in zip(jax.tree.leaves(g2), jax.tree.leaves(grads)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def _skewed_moe(N=64, K=2):
    cfg = CFG
    rng = jax.random.split(jax.random.key(3), 5)
    d, E, F = cfg.hidden_size, cfg.n_routed_experts, cfg.moe_intermediate_size
    x = jax.random.normal(rng[0], (N, d))
    wg, wu = jax.random.normal(rng[1], (E, d, F)) * 0.1, jax.random.normal(rng[2], (E, d, F)) * 0.1
    wd = jax.random.normal(rng[3], (E, F, d)) * 0.1
    experts = jnp.tile(jnp.arange(K, dtype=jnp.int32), (N, 1))  # every token: experts 0 and 1
    routing = moe.Routing(experts, jax.random.uniform(rng[4], (N, K)), jnp.zeros((N, E)))
    return x, routing, (wg, wu, wd)


def test_expert_parallel_capacity_drops_are_counted_and_exact_mode_is_complete():
    """Every token routed to experts 0 and 1, which both live on expert shard 0 of ep4 (8 experts, 2 per shard):
    each of the 8 devices (dp2 × ep4) sends all its 8 tokens × 2 copies to one peer. Exact mode (capacity factor
    0): every copy is computed, equal to the dense reference. Factor 2: a device may send ceil(2·16/4) = 8 rows
    per peer, so it sends its first 8 copies in copy order (its tokens 0-3) and drops 8: the output equals the
    reference with exactly those copies' combine weights zeroed, and 8 × 8 = 64 drops are reported."""
    from sharding.expert import capacity

    mesh = make_mesh(MeshConfig(data=2, expert=4))
    x, routing, ws = _skewed_moe()
    N, K = routing.experts.shape
    assert CFG.n_routed_experts == 8
    with jax.set_mesh(mesh):
        run = jax.jit(lambda cf, *a: ep_dispatch(mesh, *a, capacity_factor=cf), static_argnums=0)
        y0, drop0 = run(0.0, x, routing, *ws)
        y2, drop2 = run(2.0, x, routing, *ws)
    np.testing.assert_allclose(np.asarray(y0), np.asarray(moe.dispatch_dense(x, routing, *ws)), rtol=1e-5, atol=1e-5)
    assert float(drop0) == 0
    n = N // 8  # tokens per device
    assert capacity(n * K, 4, 2.0) == 8
    kept = (np.arange(n * K) < 8).reshape(n, K)  # per device, copy t·K + k
    w = routing.weights * jnp.asarray(np.tile(kept, (8, 1)), jnp.float32)
    ref = moe.dispatch_dense(x, routing._replace(weights=w), *ws)
    np.testing.assert_allclose(np.asarray(y2), np.asarray(ref), rtol=1e-5, atol=1e-5)
    assert float(drop2) == 8 * (n * K - 8)


def test_expert_parallel_backward_has_no_scatter():
    """The all-to-all dispatch's gradient moves rows by gathers and all-to-alls only (scatters are slow on GPUs)."""
    mesh = make_mesh(MeshConfig(data=2, expert=4))
    x, routing, ws = _skewed_moe()
    with jax.set_mesh(mesh):
        f = jax.jit(jax.grad(lambda x, *w: ep_dispatch(mesh, x, routing, *w, capacity_factor=2.0)[0].sum(),
                             argnums=(0, 1, 2, 3)))
        hlo = f.lower(x, *ws).as_text()
    assert "all_to_all" in hlo or "all-to-all" in hlo
    assert "scatter" not in hlo


def test_zero1_shards_optimizer_state_over_data():
    mesh = make_mesh(MeshConfig(data=4, expert=2))
    sh = variable_shardings(CFG, mesh)["params"]["moe_layers"]["layers"]["block"]["mlp"]["gate_proj"]
    shape = (4, CFG.n_routed_experts, CFG.hidden_size, CFG.moe_intermediate_size)
    z = zero1_sharding(sh, shape)
    flat = [a for s in z.spec if s is not None for a in ((s,) if isinstance(s, str) else s)]
    assert "data" in flat and "expert" in flat
    assert np.prod(z.shard_shape(shape)) * 8 == np.prod(shape)  # split over all 8 devices


def test_mesh_errors_and_bubble():
    assert mesh_shape(MeshConfig(pipeline=2, expert=2, data=-1), 8)["data"] == 2
    with pytest.raises(ConfigError, match="does not divide the 8 devices"):
        mesh_shape(MeshConfig(pipeline=3, data=-1), 8)
    with pytest.raises(ConfigError, match="needs 3 devices, which does not divide the 8"):
        mesh_shape(MeshConfig(pipeline=3, data=1), 8)
    assert make_mesh(MeshConfig(data=2, expert=2)).devices.size == 4  # a subset of the devices
    assert bubble_fraction(4, 8) == pytest.approx(3 / 11)


# ---------------------------------------------------------------------------------------------------------
# The real train step on a mesh (3 optimizer steps) and checkpoints across meshes
# ---------------------------------------------------------------------------------------------------------

def _train_cfg(precision="bf16", **mesh):
    from dsv3_jax.config import Config, DataConfig, TrainConfig

    return Config(model=dataclasses.replace(CFG, num_nextn_predict_layers=1), data=DataConfig(seq_len=16),
                  train=TrainConfig(global_batch_size=8, lr=1e-3, warmup_steps=1, adam_eps=1e-4, precision=precision),
                  mesh=MeshConfig(**mesh))


def _run_steps(cfg, mesh, steps=3):
    """3 train steps on one fixed batch. Every step must drop no routed copy, so that a mesh computes what one
    device does: exact mode (capacity factor 0) guarantees it; with a capacity the count is what is checked."""
    from dsv3_jax.training.step import init_state, train_step

    state = init_state(cfg, mesh=mesh)
    tokens = np.random.default_rng(0).integers(0, CFG.vocab_size, (1, 8, 17)).astype(np.int32)
    losses = []
    for _ in range(steps):
        state, m = train_step(state, tokens, cfg, mesh)
        losses.append(float(m["loss"]))
        assert float(m["moe_dropped"]) == 0
    return state, losses


@pytest.fixture(scope="module")
def single_device_run():
    return _run_steps(_train_cfg(), None)


@pytest.mark.parametrize("mesh_kw", [
    dict(data=8),
    pytest.param(dict(data=8, zero1=False), marks=pytest.mark.slow),
    dict(pipeline=2, data=2, expert=2, zero1=False),
    dict(expert=8, expert_capacity_factor=2.0),  # capacity blocks; this batch's routing fits them
    dict(expert=4, data=2),  # exact mode (the default): at factor 2 this routing would drop 2-3 copies
    pytest.param(dict(pipeline=4, expert=2), marks=pytest.mark.slow),
], ids=["dp8-zero1", "dp8-nozero1", "pp2-dp2-ep2", "ep8", "ep4-dp2", "pp4-ep2"])
def test_train_steps_match_one_device(single_device_run, mesh_kw):
    ref_state, ref_losses = single_device_run
    cfg = _train_cfg(**mesh_kw)
    mesh = make_mesh(cfg.mesh)
    state, losses = _run_steps(cfg, mesh)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    # adam_eps=1e-4: with the default 1e-8 Adam divides near-zero gradients by their own size, turning
    # reduction-order noise (~1e-9) into full lr-sized steps; a wrong gradient term is still off by ~lr = 1e-3.
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_state.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)
    for a, b in zip(jax.tree.leaves(state.router), jax.tree.leaves(ref_state.router)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # bias update from global loads
    mu = state.opt_state[1].mu["moe_layers"]["layers"]["block"]["mlp"]["gate_proj"]
    flat = [a for s in mu.sharding.spec if s is not None for a in ((s,) if isinstance(s, str) else s)]
    assert ("data" in flat) == (cfg.mesh.zero1 and mesh.shape["data"] > 1)


@pytest.fixture(scope="module")
def fp8_single_device_run():
    return _run_steps(_fp8_cfg(), None)


def _fp8_cfg(**mesh):  # init std 0.02 as configs/tiny.yaml: tiny_config's 0.2 amplifies FP8 rounding ~30×
    c = _train_cfg("fp8", **mesh)
    return dataclasses.replace(c, model=dataclasses.replace(c.model, initializer_range=0.02))


@pytest.mark.slow
@pytest.mark.parametrize("mesh_kw", [
    dict(expert=4, data=2),
    # circular: the stack is re-laid into stage order inside the step, the experts' prequantised FP8 blocks
    # (fp8.Prequantized) with it; the dense layer, head and MTP run sequence-split over the two stages
    dict(pipeline=2, expert=2, data=2, pipeline_schedule="circular", pipeline_virtual_stages=2,
         pipeline_microbatches=2),
], ids=["ep4-dp2", "pp2-v2-ep2-dp2"])
def test_fp8_train_steps_on_a_mesh_match_one_device(fp8_single_device_run, mesh_kw):
    """The FP8 recipe (CPU: the exact emulation) on a mesh against one device. The forward is the same
    arithmetic (1×128 token tiles and 128×128 weight blocks do not depend on where a token lives), so the first
    loss is equal to float32 reassociation. The experts' Wgrad quantises the gradient in 128-token column tiles
    of each expert's rows, and an expert shard holds its rows in a different order (blocks by source device), so
    those tiles group other tokens: an FP8 rounding difference of a few percent in the expert weights' gradients,
    which Adam can turn into a different sign of a small gradient's step: up to 2·lr per step where it flips,
    so 3·2·lr = 6e-3 after 3 steps at worst, and 2·lr for all but a handful of elements (one flip); the pipeline
    case also regroups the other layers' token tiles (micro-batches, the sequence-split row order: measured one
    element of 3,456 at 2.19e-3). The losses move by < 1e-3 relative (measured with train.py on configs/tiny.yaml,
    10 steps: 2.6e-4). A wrong gradient term moves the loss by far more."""
    ref_state, ref_losses = fp8_single_device_run
    cfg = _fp8_cfg(**mesh_kw)
    state, losses = _run_steps(cfg, make_mesh(cfg.mesh))
    assert losses[0] == pytest.approx(ref_losses[0], rel=1e-6)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-3)
    lr = cfg.train.lr
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_state.params)):
        diff = np.abs(np.asarray(a) - np.asarray(b))
        assert diff.max() <= 3 * 2 * lr, diff.max()
        assert (diff > 2 * lr).mean() < 1e-3, (diff > 2 * lr).sum()


def test_checkpoint_restores_onto_another_mesh(tmp_path, single_device_run):
    from dsv3_jax.training.checkpoint import Checkpointer
    from dsv3_jax.training.step import init_state

    cfg_a = _train_cfg(data=8)
    state_a = init_state(cfg_a, seed=3, mesh=make_mesh(cfg_a.mesh))
    ck = Checkpointer(tmp_path / "ck", keep=2, async_save=False)
    ck.save(state_a, None, cfg_a)
    ck.wait() if hasattr(ck, "wait") else None
    ck.close()
    cfg_b = _train_cfg(pipeline=2, expert=4)
    mesh_b = make_mesh(cfg_b.mesh)
    template = init_state(cfg_b, seed=0, mesh=mesh_b)
    ck = Checkpointer(tmp_path / "ck", keep=2, async_save=False)
    state_b, _ = ck.restore(template)
    ck.close()
    for a, b, t in zip(jax.tree.leaves(state_a.params), jax.tree.leaves(state_b.params),
                       jax.tree.leaves(template.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert b.sharding == t.sharding  # landed in the new mesh's layout
