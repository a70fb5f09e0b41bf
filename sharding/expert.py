"""Expert parallelism: routed experts sharded over the ``expert`` mesh axis, tokens moved by all-to-all.

Inside ``shard_map`` each device holds n tokens and E/ep experts. Per MoE layer (REFERENCE §10; MaxText's and
DeepSeek's dispatch): every routed copy of a local token (n·K of them) goes to the one expert shard that owns
its expert, the owner runs its local experts on what it received with one grouped GEMM
(:func:`dsv3_jax.moe.expert_rows`), and the outputs come back the same way to be combined where the token lives.

Static shapes: each device sends each peer a fixed block of ``cap`` rows (:func:`capacity`), so the exchange is a
dense ``jax.lax.all_to_all`` of [ep, cap, d] — it runs on every backend (XLA:CPU has no ragged all-to-all).
``cap = ceil(capacity_factor · n·K / ep)`` rounded up to 8 (``mesh.expert_capacity_factor``; a balanced layer
sends n·K/ep to each peer), at most n·K. Copies past a peer's ``cap`` are dropped: their expert output is zero,
the token keeps its other experts and the shared expert, and the count goes to the step's ``moe_dropped``
metric — never silent. ``capacity_factor: 0`` (the default) is the exact (dropless) mode: cap = n·K, the most
one peer can be sent. Traffic per device and layer: 2·(ep−1)·cap·d each way (dispatch + combine), against the
(ep−1)·n·d·… of gathering every token of the group; memory: ep·cap rows instead of ep·n·K.

Every row move is a gather whose backward is a gather (:func:`dsv3_jax.moe.permute_rows`), and the all-to-all's
transpose is the reverse all-to-all: the backward pass has no scatter.

Node-limited routing (REFERENCE §5, §10): shard ``s`` holds experts ``[s·E/ep, (s+1)·E/ep)`` and router group
``g`` experts ``[g·E/G, (g+1)·E/G)``, so when each group lies on one node, group-limited top-k (≤ ``topk_group``
groups per token) is node-limited routing. :func:`check_node_limited` checks that for a mesh.
"""

from __future__ import annotations

import contextlib
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from dsv3_jax import moe
from dsv3_jax.config import ConfigError, ModelConfig
from sharding.rules import row_axes

CAPACITY_ALIGN = 8  # receive blocks are whole multiples of this many rows


def capacity(copies: int, ep: int, factor: float) -> int:
    """Rows each device sends each expert shard: ``copies`` = n·K routed copies on the device; factor 0 = dropless."""
    if factor < 0:
        raise ConfigError(f"mesh.expert_capacity_factor={factor}: must be ≥ 0 (0 = dropless)")
    if factor == 0:
        return copies
    return min(copies, -(-math.ceil(factor * copies / ep) // CAPACITY_ALIGN) * CAPACITY_ALIGN)


def send_layout(dest: jax.Array, ep: int, cap: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Where each copy goes in the [ep·cap] send buffer, as the two maps :func:`moe.permute_rows` takes.

    dest [C] int32, the expert shard of each copy → (src [ep·cap]: the copy in each slot, C for an empty slot;
    slot [C]: each copy's slot, ep·cap if it is dropped; dropped []: copies past their peer's ``cap``). A peer's
    copies keep their order; the first ``cap`` of them are sent.
    """
    C = dest.shape[0]
    order, inverse, sizes = moe.sort_by_expert(dest, ep)
    starts = jnp.cumsum(sizes) - sizes
    i = jnp.arange(ep * cap, dtype=jnp.int32)
    peer, r = i // cap, i % cap
    src = jnp.where(r < sizes[peer], jnp.take(order, jnp.clip(starts[peer] + r, 0, C - 1)), C).astype(jnp.int32)
    rank = inverse.astype(jnp.int32) - starts[dest]
    slot = jnp.where(rank < cap, dest * cap + rank, ep * cap).astype(jnp.int32)
    return src, slot, jnp.maximum(sizes - cap, 0).sum()


def _local_experts(x, experts, weights, wg, wu, wd, *, axis: str, ep: int, capacity_factor: float,
                   fp8_pow2: bool | None):
    """Per device: x [n, d], experts/weights [n, K], local expert weights [E/ep, ...] → (y [n, d], dropped [1])."""
    n, d = x.shape
    K = experts.shape[1]
    e_loc = wg.shape[0]
    cap = capacity(n * K, ep, capacity_factor)
    flat = experts.reshape(-1)
    src, slot, dropped = send_layout(flat // e_loc, ep, cap)
    send = moe.permute_rows(moe.token_copies(x, K), src, slot)  # [ep·cap, d]; empty slots zero
    local_id = jnp.take(flat % e_loc, src, mode="fill", fill_value=e_loc)  # e_loc marks an empty slot

    def exchange(a):  # block p of a [ep, cap, ...] goes to shard p; block q of the result came from shard q
        return jax.lax.all_to_all(a.reshape(ep, cap, *a.shape[1:]), axis, 0, 0).reshape(a.shape)

    ys = moe.expert_rows(exchange(send), exchange(local_id), wg, wu, wd, fp8_pow2=fp8_pow2)
    ys = moe.permute_rows(exchange(ys), slot, src)  # [n·K, d]: each copy's output; dropped copies zero
    return moe.combine(ys, weights, x.dtype), dropped.astype(jnp.float32)[None]


def ep_dispatch(mesh: Mesh, x, routing: moe.Routing, w_gate, w_up, w_down, axis: str = "expert",
                fp8_pow2: bool | None = None, capacity_factor: float = 0.0) -> tuple[jax.Array, jax.Array]:
    """Expert-parallel :func:`dsv3_jax.moe.dispatch_ragged`: x [N, d] with N over the token axes → (y [N, d],
    copies dropped for capacity []); ``capacity_factor`` as :func:`capacity` takes it (0: exact, dropless)."""
    ep = mesh.shape[axis]
    E = w_gate.shape[0]
    if E % ep:
        raise ValueError(f"{E} routed experts cannot be split over mesh.expert={ep}")
    tok = P(row_axes(mesh, x.shape[0]))
    fn = jax.shard_map(
        functools.partial(_local_experts, axis=axis, ep=ep, capacity_factor=capacity_factor, fp8_pow2=fp8_pow2),
        mesh=mesh,
        in_specs=(tok, tok, tok, P(axis), P(axis), P(axis)),
        out_specs=(tok, tok),
        check_vma=False,
    )
    y, dropped = fn(x, routing.experts, routing.weights, w_gate, w_up, w_down)
    return y, dropped.sum()


@contextlib.contextmanager
def expert_parallel(mesh: Mesh, capacity_factor: float = 0.0, axis: str = "expert"):
    """Within this context, MoE layers traced under ``mesh`` dispatch across its expert axis by all-to-all."""
    if mesh.shape.get(axis, 1) == 1:
        yield
        return
    with moe.dispatch_override(functools.partial(ep_dispatch, mesh, axis=axis, capacity_factor=capacity_factor)):
        yield


def shards_per_token(mesh: Mesh, experts: jax.Array, num_experts: int, axis: str = "expert") -> jax.Array:
    """How many expert shards each token sends copies to: experts [N, K] → int32 [N].

    Uses the dispatch's own ownership rule (shard of expert e = e // (E/ep), as :func:`_local_experts` sends).
    """
    ep = mesh.shape[axis]
    dest = experts // (num_experts // ep)
    return (jax.nn.one_hot(dest, ep, dtype=jnp.int32).sum(-2) > 0).sum(-1).astype(jnp.int32)


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
