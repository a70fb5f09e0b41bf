"""Pipeline parallelism over the MoE layer stack, inside one jit (GPipe schedule, collective permutes).

The stacked MoE layers [L, ...] are split into S = mesh.pipeline contiguous stages of L/S layers (the rules
table shards the ``layers`` axis over ``pipeline``, so no weight moves). The batch is cut into M micro-batches;
at iteration t stage s runs micro-batch t − s, all stages at once (``vmap`` over the stage axis, partitioned
over ``pipeline``), then activations shift one stage down (a roll → collective permute). M + S − 1 iterations
fill and drain the pipe; the backward pass is the same schedule reversed by autodiff. Bubble fraction:
(S − 1) / (M + S − 1).

Embedding, dense layers, head and MTP run outside the pipeline, replicated over ``pipeline`` (each stage
computes them for the whole batch): simple and exact; the cost is the non-MoE share of the step × (S − 1)/S.
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dsv3_jax.block import apply_block, moe_stack_override
from dsv3_jax.config import ModelConfig
from sharding.rules import BATCH_AXES


def bubble_fraction(stages: int, microbatches: int) -> float:
    """Idle share of the GPipe schedule: (S − 1) / (M + S − 1)."""
    return (stages - 1) / (microbatches + stages - 1)


def _constrain(mesh: Mesh, x: jax.Array, *spec) -> jax.Array:
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(*spec)))


def pipeline_stack(mesh: Mesh, microbatches: int, cfg: ModelConfig, variables: dict, x: jax.Array,
                   positions: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Run the stacked MoE layers ``variables`` ({'params': {'layers': ...}, 'router': ...}, leaves [L, ...])
    over x [B, T, d] through the pipeline. Returns (x [B, T, d], aux {load [L, E], balance [L]})."""
    S = mesh.shape["pipeline"]
    stacked = {col: tree["layers"]["block"] for col, tree in variables.items()}
    L = jax.tree.leaves(stacked)[0].shape[0]
    if L % S:
        raise ValueError(f"{L} MoE layers cannot be split into mesh.pipeline={S} equal stages; choose a "
                         f"pipeline size that divides num_hidden_layers - first_k_dense_replace = {L}")
    B, T, d = x.shape
    M = microbatches or 2 * S
    if B % M:
        raise ValueError(f"batch {B} is not divisible into mesh.pipeline_microbatches={M} micro-batches")
    mb = B // M
    stages = jax.tree.map(lambda a: _constrain(mesh, a.reshape(S, L // S, *a.shape[1:]), "pipeline"), stacked)
    xs = x.reshape(M, mb, T, d)
    pos = positions.reshape(M, mb, T)

    def stage_fn(stage_vars, h, p):
        def layer(h, layer_vars):
            return apply_block(cfg, True, layer_vars, h, p)
        return jax.lax.scan(layer, h, stage_vars)

    run_stages = jax.vmap(stage_fn, spmd_axis_name="pipeline")
    act_spec = ("pipeline", BATCH_AXES, None, None)
    stage_ids = jnp.arange(S)

    def step(carry, t):
        state, outputs, load, balance = carry
        mbi = t - stage_ids  # micro-batch each stage works on
        valid = (mbi >= 0) & (mbi < M)
        p = jnp.take(pos, jnp.clip(mbi, 0, M - 1), axis=0)
        out, aux = run_stages(stages, state, p)  # out [S, mb, T, d]; aux leaves [S, L/S, ...]
        out = _constrain(mesh, out, *act_spec)
        load = load + jnp.where(valid[:, None, None], aux["load"], 0)
        balance = balance + jnp.where(valid[:, None], aux["balance"], 0)
        done = t - (S - 1)  # micro-batch leaving the last stage
        slot = jnp.clip(done, 0, M - 1)
        outputs = outputs.at[slot].set(jnp.where(done >= 0, out[S - 1], outputs[slot]))
        fresh = jnp.where(t + 1 < M, jnp.take(xs, jnp.clip(t + 1, 0, M - 1), axis=0), 0)
        state = _constrain(mesh, jnp.concatenate([fresh[None], out[:-1]], axis=0), *act_spec)
        return (state, outputs, load, balance), None

    state = jnp.zeros((S, mb, T, d), x.dtype).at[0].set(xs[0])
    state = _constrain(mesh, state, *act_spec)
    E = cfg.n_routed_experts
    init = (state, jnp.zeros_like(xs), jnp.zeros((S, L // S, E), jnp.float32), jnp.zeros((S, L // S), jnp.float32))
    (_, outputs, load, balance), _ = jax.lax.scan(step, init, jnp.arange(M + S - 1))
    return outputs.reshape(B, T, d), {"load": load.reshape(L, E), "balance": balance.reshape(L) / M}


@contextlib.contextmanager
def pipeline_parallel(mesh: Mesh, microbatches: int = 0):
    """Within this context, the MoE stack traced under ``mesh`` runs through the pipeline schedule."""
    if mesh.shape.get("pipeline", 1) == 1:
        yield
        return
    with moe_stack_override(functools.partial(pipeline_stack, mesh, microbatches)):
        yield
