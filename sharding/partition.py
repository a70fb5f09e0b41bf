"""Shardings for params, optimizer state and batches from logical names; the context a step is traced in."""

from __future__ import annotations

import contextlib
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dsv3_jax import fp8, tokens
from dsv3_jax.config import ModelConfig
from dsv3_jax.model import Transformer
from sharding.expert import expert_parallel
from sharding.pipeline import pipeline_parallel
from sharding.rules import LOGICAL_RULES, batch_spec, row_axes


def _boxed_variables(cfg: ModelConfig) -> dict:
    """``Transformer(cfg)``'s variables as abstract, logically partitioned boxes (no allocation)."""
    one_token = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    return jax.eval_shape(lambda t: Transformer(cfg).init(jax.random.key(0), t), one_token)


def logical_specs(cfg: ModelConfig) -> dict:
    """Logical PartitionSpecs of every variable of ``Transformer(cfg)`` (no allocation)."""
    return nn.get_partition_spec(_boxed_variables(cfg))


STACK_MODULE = "moe_layers"  # the MoE layer stack (model.py's BlockStack): pipelined over `pipeline`


def variable_shardings(cfg: ModelConfig, mesh: Mesh) -> dict:
    """NamedSharding per variable leaf ({'params', 'router'}) from the rules table, fitted to the leaf shapes."""
    boxed = _boxed_variables(cfg)
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, LOGICAL_RULES)

    def leaf(path, s, v):
        s = fit_sharding(s, v.shape)
        # Outside the pipelined stack every stage works on 1/S of the tokens (sharding/rules.py), so those
        # weights are split over `pipeline` too (FSDP on that axis: gathered where used, grads reduce-scattered)
        # instead of a full copy, grads and moments on every stage.
        if not any(getattr(k, "key", None) == STACK_MODULE for k in path):
            s = zero1_sharding(s, v.shape, "pipeline")
        return s
    return jax.tree_util.tree_map_with_path(leaf, shardings, nn.unbox(boxed))


def fit_sharding(sharding: NamedSharding, shape: tuple[int, ...]) -> NamedSharding:
    """``sharding`` with every mesh axis that does not divide its dim moved to the first dim it divides (or
    dropped: replicated). E.g. 58 MoE layers on mesh.pipeline=16: the ``layers`` dim cannot be split into 16
    equal stages, so ``pipeline`` shards another dim of the stack and the pipeline re-lays it per step."""
    mesh = sharding.mesh
    spec = list(sharding.spec) + [None] * (len(shape) - len(sharding.spec))
    names = [[] if s is None else ([s] if isinstance(s, str) else list(s)) for s in spec]
    moved = []
    for i, dim in enumerate(shape):
        while names[i] and dim % math.prod(mesh.shape[a] for a in names[i]):
            moved.append(names[i].pop())
    if not moved:
        return sharding
    out = NamedSharding(mesh, P(*[tuple(n) if n else None for n in names]))
    for axis in moved:
        out = zero1_sharding(out, shape, axis)
    return out


def zero1_sharding(sharding: NamedSharding, shape: tuple[int, ...], axis: str = "data") -> NamedSharding:
    """The sharding of an optimizer-state leaf under ZeRO-1: its param's, with ``axis`` added to the first dim
    that still divides evenly (left as is when none does, or when ``axis`` is already used)."""
    mesh = sharding.mesh
    n = mesh.shape.get(axis, 1)
    spec = list(sharding.spec) + [None] * (len(shape) - len(sharding.spec))
    names = [() if s is None else ((s,) if isinstance(s, str) else tuple(s)) for s in spec]
    if n == 1 or any(axis in a for a in names):
        return sharding
    for i, dim in enumerate(shape):
        factor = math.prod(mesh.shape[a] for a in names[i])
        if dim % (factor * n) == 0:
            spec[i] = (*names[i], axis)
            return NamedSharding(mesh, P(*spec))
    return sharding


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    return NamedSharding(mesh, batch_spec(ndim))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def microbatch_sharding(mesh: Mesh) -> NamedSharding:
    """Tokens [n_micro, B, T+1]: the batch dim over the batch axes."""
    return NamedSharding(mesh, P(None, *batch_spec(2)))


def state_shardings(params, router, opt_state, cfg: ModelConfig, mesh: Mesh, zero1: bool = True):
    """Shardings for (params, router, opt_state): params/router from the rules table; optimizer-state subtrees
    shaped like the params get the params' shardings, plus ``data`` under ZeRO-1; other leaves replicated."""
    var = variable_shardings(cfg, mesh)
    p_sh, r_sh = var["params"], var.get("router", {})
    p_def = jax.tree.structure(params)
    replicated = NamedSharding(mesh, P())

    def opt_tree(node):
        if jax.tree.structure(node) == p_def:
            return jax.tree.map(lambda s, x: zero1_sharding(s, x.shape) if zero1 else s, p_sh, node)
        return None

    def walk(node):
        sub = opt_tree(node)
        if sub is not None:
            return sub
        if isinstance(node, (tuple, list)) or (hasattr(node, "_fields") and isinstance(node, tuple)):
            children = [walk(c) for c in node]
            return type(node)(*children) if hasattr(node, "_fields") else type(node)(children)
        if isinstance(node, dict):
            return {k: walk(v) for k, v in node.items()}
        return jax.tree.map(lambda _: replicated, node)

    return p_sh, r_sh, walk(opt_state)


def token_parallel(mesh: Mesh):
    """Run a token-parallel GEMM ``f(x [M, K], w)`` per device on its rows of x (the batch axes), w whole: the FP8
    Hopper kernels then see per-device shapes (fp8.token_map_override). Each device's rows are a contiguous run of
    the global rows, so when that run is a multiple of 128 rows the 128-token Wgrad tiles are the global ones and
    only the sum over devices is reassociated; otherwise (or with one batch shard) ``f`` runs on the global array."""
    def run(f, x, w):
        axes = row_axes(mesh, x.shape[0])  # outside the pipelined stack `pipeline` splits the tokens too
        shards = math.prod(mesh.shape.get(a, 1) for a in axes)
        if shards == 1 or x.shape[0] % shards or (x.shape[0] // shards) % fp8.BLOCK:
            return f(x, w)
        rows = P(axes, None)
        return jax.shard_map(f, mesh=mesh, in_specs=(rows, P()), out_specs=rows, check_vma=False)(x, w)
    return run


def sequence_split_layout(mesh: Mesh) -> tuple:
    """(flatten, unflatten) for dsv3_jax/tokens.py: where the rules in force split the sequence over P devices
    (outside the pipelined stack), rows are ordered [P, B, T/P] so each device's tokens are one contiguous block
    of rows, split over ``token_axes()`` (length axes first); elsewhere a plain reshape."""
    def split(T: int) -> int:
        spec = nn.logical_to_mesh_axes(("activation_length",))[0]
        names = () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)
        P_ = math.prod(mesh.shape.get(a, 1) for a in names)
        return P_ if P_ > 1 and T % P_ == 0 else 1

    def flatten(x):
        B, T, rest = x.shape[0], x.shape[1], x.shape[2:]
        Ps = split(T)
        if Ps == 1:
            return x.reshape(B * T, *rest)
        x = jnp.swapaxes(x.reshape(B, Ps, T // Ps, *rest), 0, 1)  # local: each device keeps its [b, t] block
        return x.reshape(B * T, *rest)

    def unflatten(y, B, T):
        Ps, rest = split(T), y.shape[1:]
        if Ps == 1:
            return y.reshape(B, T, *rest)
        return jnp.swapaxes(y.reshape(Ps, B, T // Ps, *rest), 0, 1).reshape(B, T, *rest)
    return flatten, unflatten


@contextlib.contextmanager
def parallel_context(mesh: Mesh, pipeline_microbatches: int = 0, pipeline_schedule: str = "gpipe",
                     pipeline_virtual_stages: int = 1, expert_capacity_factor: float = 0.0):
    """Trace model code under ``mesh``: logical constraints resolve through the rules table, MoE layers
    dispatch across the expert axis by all-to-all (sharding/expert.py; ``expert_capacity_factor`` 0 = dropless)
    and the MoE stack runs through the pipeline (sharding/pipeline.py)."""
    use = jax.set_mesh if isinstance(mesh, Mesh) else jax.sharding.use_abstract_mesh  # abstract: plans
    with (use(mesh), nn.logical_axis_rules(LOGICAL_RULES), expert_parallel(mesh, expert_capacity_factor),
          fp8.token_map_override(token_parallel(mesh)), tokens.layout_override(*sequence_split_layout(mesh)),
          pipeline_parallel(mesh, pipeline_microbatches, pipeline_schedule, pipeline_virtual_stages)):
        yield
