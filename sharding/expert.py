"""Expert parallelism: routed experts sharded over the ``expert`` mesh axis, tokens dispatched exactly.

Dropless scheme that runs on every backend (XLA:CPU has no ragged all-to-all): inside ``shard_map`` each
expert shard all-gathers the tokens of its expert group (and their routing), computes the copies routed to its
*local* experts with one grouped matmul, and a reduce-scatter returns each token's combined output to its
owner. Every token reaches all K experts; no capacity, nothing dropped. Traffic per device is
(ep-1)·n·d each way — equal to an all-to-all's (ep-1)/ep·K·n·d when ep = K, more for ep > K; a ragged
all-to-all (GPU) is the drop-in upgrade for large ep.

Node-limited routing (REFERENCE §5, §10): shard ``s`` holds experts ``[s·E/ep, (s+1)·E/ep)`` and router group
``g`` experts ``[g·E/G, (g+1)·E/G)``, so when each group lies on one node, group-limited top-k (≤ ``topk_group``
groups per token) is node-limited routing. :func:`check_node_limited` checks that for a mesh.
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from dsv3_jax import moe
from dsv3_jax.config import ConfigError, ModelConfig
from dsv3_jax.layers import swiglu
from sharding.rules import BATCH_AXES


def _owned(experts, e_loc: int, axis: str):
    """This shard's view of expert ids [..., K]: (local ids, mask of the copies its experts compute)."""
    local = experts - jax.lax.axis_index(axis) * e_loc
    return local, (local >= 0) & (local < e_loc)


def _local_experts(x, experts, weights, wg, wu, wd, *, num_experts: int, axis: str, fp8_pow2: bool | None):
    """Per expert shard: x [n, d], experts/weights [n, K], local expert weights [E/ep, ...] → [n, d]."""
    e_loc = wg.shape[0]
    xa = jax.lax.all_gather(x, axis, tiled=True)  # [ep·n, d]: every token of this expert group
    ea = jax.lax.all_gather(experts, axis, tiled=True)
    wa = jax.lax.all_gather(weights, axis, tiled=True)
    m, k = ea.shape
    local, mine = _owned(ea, e_loc, axis)
    key = jnp.where(mine, local, e_loc)  # other shards' copies sort last (group e_loc) and are not computed
    order, inverse, sizes = moe.sort_by_expert(key, e_loc + 1)
    sizes = sizes[:e_loc]
    copies = jnp.broadcast_to(xa[:, None], (m, k, xa.shape[-1])).reshape(m * k, -1)
    xs = moe.permute_rows(copies, order, inverse)
    mm = functools.partial(moe.expert_matmul, sizes=sizes, fp8_pow2=fp8_pow2)  # FP8 when the model asks
    h = swiglu(mm(xs, wg), mm(xs, wu))
    ys = moe.permute_rows(mm(h, wd), inverse, order).reshape(m, k, -1)
    ys = jnp.where(mine[..., None], ys, 0)
    y = jnp.einsum("mkd,mk->md", ys, jnp.where(mine, wa, 0).astype(ys.dtype), preferred_element_type=jnp.float32)
    return jax.lax.psum_scatter(y, axis, scatter_dimension=0, tiled=True).astype(x.dtype)


def ep_dispatch(mesh: Mesh, x, routing: moe.Routing, w_gate, w_up, w_down, axis: str = "expert",
                fp8_pow2: bool | None = None):
    """Expert-parallel drop-in for :func:`dsv3_jax.moe.dispatch_ragged`. x [N, d] with N over the batch axes."""
    ep = mesh.shape[axis]
    E = w_gate.shape[0]
    if E % ep:
        raise ValueError(f"{E} routed experts cannot be split over mesh.expert={ep}")
    tok = P(BATCH_AXES)
    fn = jax.shard_map(
        functools.partial(_local_experts, num_experts=E, axis=axis, fp8_pow2=fp8_pow2),
        mesh=mesh,
        in_specs=(tok, tok, tok, P(axis), P(axis), P(axis)),
        out_specs=tok,
        check_vma=False,
    )
    return fn(x, routing.experts, routing.weights, w_gate, w_up, w_down)


@contextlib.contextmanager
def expert_parallel(mesh: Mesh, axis: str = "expert"):
    """Within this context, MoE layers traced under ``mesh`` dispatch across its expert axis."""
    if mesh.shape.get(axis, 1) == 1:
        yield
        return
    with moe.dispatch_override(functools.partial(ep_dispatch, mesh, axis=axis)):
        yield


def shards_per_token(mesh: Mesh, experts: jax.Array, num_experts: int, axis: str = "expert") -> jax.Array:
    """How many expert shards compute copies of each token: experts [N, K] (N over the batch axes) → int32 [N].

    Uses the dispatch's own ownership rule (:func:`_owned`), so it counts what :func:`ep_dispatch` sends.
    """
    e_loc = num_experts // mesh.shape[axis]

    def count(e):
        _, mine = _owned(jax.lax.all_gather(e, axis, tiled=True), e_loc, axis)
        return jax.lax.psum_scatter(mine.any(-1).astype(jnp.int32), axis, scatter_dimension=0, tiled=True)

    tok = P(BATCH_AXES)
    return jax.shard_map(count, mesh=mesh, in_specs=tok, out_specs=tok, check_vma=False)(experts)


def shards_per_node(hosts: np.ndarray) -> int:
    """Expert shards per node from the process index of each device, ``hosts`` [ep, other devices]: the length
    of the runs of one host along the expert axis (equal for every run, else ConfigError)."""
    ep, col = hosts.shape[0], hosts[:, 0]
    n = int(np.argmax(col != col[0])) or ep  # the first run's length (all one host: ep)
    blocks = hosts.reshape(ep // n, n, -1) if ep % n == 0 else None
    if blocks is None or not (blocks == blocks[:, :1]).all():
        raise ConfigError(f"the expert axis's devices are not in equal per-host blocks (process of each expert "
                          f"shard: {col.tolist()}); set mesh.expert_shards_per_node")
    return n


def check_node_limited(cfg: ModelConfig, mesh: Mesh | None, per_node: int = 0, axis: str = "expert") -> str:
    """ConfigError unless every token's routed experts are on ≤ ``cfg.topk_group`` nodes of the expert axis.

    A node = ``per_node`` consecutive expert shards (0: those of one process, from the mesh's devices). Holds iff
    routing is group-limited and each of the ``n_group`` groups lies on one node, i.e. the number of nodes
    the expert axis spans divides ``n_group``. Returns a one-line description for the run's log.
    """
    G, M, E = cfg.n_group, cfg.topk_group, cfg.n_routed_experts
    if cfg.topk_method == "greedy" or G == 1:
        raise ConfigError(f"mesh.node_limited_routing needs group-limited routing; model.topk_method="
                          f"{cfg.topk_method!r}, model.n_group={G} (use noaux_tc or group_limited_greedy, n_group > 1)")
    ep = 1 if mesh is None else mesh.shape[axis]
    if E % ep:
        raise ConfigError(f"{E} routed experts cannot be split over mesh.expert={ep}")
    if per_node == 0:
        if mesh is None:
            per_node = 1
        else:
            devs = np.moveaxis(mesh.devices, mesh.axis_names.index(axis), 0).reshape(ep, -1)
            per_node = shards_per_node(np.vectorize(lambda d: d.process_index)(devs))
    if ep % per_node:
        raise ConfigError(f"mesh.expert_shards_per_node={per_node} does not divide mesh.expert={ep}")
    nodes = ep // per_node
    if G % nodes:
        raise ConfigError(f"mesh.node_limited_routing: the expert axis ({ep} shards) spans {nodes} nodes of "
                          f"{per_node} shards, and model.n_group={G} router groups cannot each sit on one node; "
                          f"n_group must be a multiple of {nodes} (or change mesh.expert / "
                          f"mesh.expert_shards_per_node)")
    return (f"node-limited routing: {G} router groups on {nodes} node(s) of {per_node} expert shard(s) "
            f"({G // nodes} groups per node): each token's {cfg.num_experts_per_tok} experts on ≤ {min(M, nodes)} "
            f"node(s)")
