"""Node-limited routing (REFERENCE §5, §10): with router groups aligned to nodes of the expert axis, the real
gate sends every token to experts on ≤ topk_group nodes, and the EP dispatch computes each token on exactly the
shards its experts live on."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from dsv3_jax import moe
from dsv3_jax.config import ConfigError, MeshConfig
from sharding.expert import check_node_limited, ep_dispatch, shards_per_node, shards_per_token
from sharding.mesh import make_mesh
from tests.common import tiny_config

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")

# V3's routing shape scaled down: 8 groups, ≤ 4 of them per token, 8 experts per token (4 experts per group).
V3_LIKE = tiny_config(n_routed_experts=32, n_group=8, topk_group=4, num_experts_per_tok=8)
NARROW = tiny_config(n_routed_experts=32, n_group=8, topk_group=2, num_experts_per_tok=4)


def _route(cfg, n=512, seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    logits = jax.random.normal(k1, (n, cfg.n_routed_experts))
    bias = 0.5 * jax.random.normal(k2, (cfg.n_routed_experts,))  # a trained-looking selection bias
    return moe.route(logits, bias, cfg)


def _distinct_per_row(ids: np.ndarray) -> np.ndarray:
    return np.array([len(set(row)) for row in ids])


@pytest.mark.parametrize("cfg, ep, per_node", [(V3_LIKE, 8, 1), (NARROW, 8, 2), (NARROW, 4, 1)],
                         ids=["v3like-ep8", "narrow-ep8-2pernode", "narrow-ep4"])
def test_each_token_reaches_at_most_topk_group_nodes(cfg, ep, per_node):
    mesh = make_mesh(MeshConfig(data=8 // ep, expert=ep))
    nodes = ep // per_node
    assert f"≤ {min(cfg.topk_group, nodes)} node" in check_node_limited(cfg, mesh, per_node)
    r = _route(cfg)
    experts = np.asarray(r.experts)
    shard = experts // (cfg.n_routed_experts // ep)
    per_token = _distinct_per_row(shard // per_node)
    assert per_token.max() == cfg.topk_group  # the bound holds and is reached
    # Without the group limit the same scores spread further: the limit is what bounds the nodes.
    free = np.asarray(_route(dataclasses.replace(cfg, topk_group=cfg.n_group)).experts)
    assert _distinct_per_row(free // (cfg.n_routed_experts // ep) // per_node).max() > cfg.topk_group
    # What the EP dispatch sends: exactly the token's distinct shards (its own ownership rule), so ≤ topk_group
    # nodes' worth of shards.
    with jax.set_mesh(mesh):
        sent = np.asarray(jax.jit(lambda e: shards_per_token(mesh, e, cfg.n_routed_experts))(r.experts))
    np.testing.assert_array_equal(sent, _distinct_per_row(shard))
    assert sent.max() <= cfg.topk_group * per_node


def test_ep_dispatch_is_exact_under_group_limited_routing():
    cfg = V3_LIKE
    mesh = make_mesh(MeshConfig(data=1, expert=8))
    r = _route(cfg, n=64, seed=1)
    ks = jax.random.split(jax.random.key(2), 4)
    E, d, F = cfg.n_routed_experts, 16, 8
    x = jax.random.normal(ks[0], (64, d))
    wg, wu = jax.random.normal(ks[1], (E, d, F)) * 0.1, jax.random.normal(ks[2], (E, d, F)) * 0.1
    wd = jax.random.normal(ks[3], (E, F, d)) * 0.1
    ref = moe.dispatch_dense(x, r, wg, wu, wd)
    with jax.set_mesh(mesh):
        y, dropped = jax.jit(lambda *a: ep_dispatch(mesh, *a))(x, r, wg, wu, wd)
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-5, atol=1e-5)
    assert float(dropped) == 0


def test_check_node_limited_errors_and_node_derivation():
    mesh = make_mesh(MeshConfig(expert=8))
    # One process holds all 8 shards: one node, trivially node-limited.
    assert "1 node(s) of 8 expert shard(s)" in check_node_limited(V3_LIKE, mesh)
    with pytest.raises(ConfigError, match="n_group must be a multiple of 8"):
        check_node_limited(tiny_config(), mesh, per_node=1)  # 4 groups over 8 single-shard nodes
    with pytest.raises(ConfigError, match="needs group-limited routing"):
        check_node_limited(dataclasses.replace(V3_LIKE, topk_method="greedy"), mesh, per_node=1)
    with pytest.raises(ConfigError, match="does not divide"):
        check_node_limited(V3_LIKE, mesh, per_node=3)
    # Expert shards per node from each device's process: [ep, other devices].
    assert shards_per_node(np.array([[0, 0], [0, 0], [1, 1], [1, 1]])) == 2
    assert shards_per_node(np.zeros((8, 1), int)) == 8
    # Interleaved hosts count as single-shard nodes (conservative: ≤ M blocks is ≤ M hosts); uneven runs fail.
    assert shards_per_node(np.array([[0], [1], [0], [1]])) == 1
    with pytest.raises(ConfigError, match="equal per-host blocks"):
        shards_per_node(np.array([[0], [0], [0], [1]]))
    with pytest.raises(ConfigError, match="expert_shards_per_node"):
        MeshConfig(expert_shards_per_node=-1)


def test_train_refuses_groups_that_straddle_nodes(tmp_path):
    from dsv3_jax.config import load_config
    from dsv3_jax.training.loop import train

    cfg = load_config(None, ["model.n_routed_experts=8", "model.n_group=4", "model.topk_group=2",
                             "model.num_experts_per_tok=2", "mesh.expert=8", "mesh.node_limited_routing=true",
                             "mesh.expert_shards_per_node=1", f"run_dir={tmp_path}"])

    def never(*a, **k):
        raise AssertionError("no data before the mesh check")

    with pytest.raises(ConfigError, match="model.n_group=4 router groups cannot each sit on one node"):
        train(cfg, never)

