"""Expert parallelism: routed experts sharded over the ``expert`` mesh axis, tokens dispatched exactly.

Dropless scheme that runs on every backend (XLA:CPU has no ragged all-to-all): inside ``shard_map`` each
expert shard all-gathers the tokens of its expert group (and their routing), computes the copies routed to its
*local* experts with one grouped matmul, and a reduce-scatter returns each token's combined output to its
owner. Every token reaches all K experts; no capacity, nothing dropped. Traffic per device is
(ep-1)·n·d each way — equal to an all-to-all's (ep-1)/ep·K·n·d when ep = K, more for ep > K; a ragged
all-to-all (GPU) is the drop-in upgrade for large ep.
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from dsv3_jax import moe
from dsv3_jax.layers import swiglu
from sharding.rules import BATCH_AXES


def _local_experts(x, experts, weights, wg, wu, wd, *, num_experts: int, axis: str, fp8_pow2: bool | None):
    """Per expert shard: x [n, d], experts/weights [n, K], local expert weights [E/ep, ...] → [n, d]."""
    e_loc = wg.shape[0]
    xa = jax.lax.all_gather(x, axis, tiled=True)  # [ep·n, d]: every token of this expert group
    ea = jax.lax.all_gather(experts, axis, tiled=True)
    wa = jax.lax.all_gather(weights, axis, tiled=True)
    m, k = ea.shape
    local = ea - jax.lax.axis_index(axis) * e_loc
    mine = (local >= 0) & (local < e_loc)
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
