"""Pipeline parallelism over the MoE layer stack, inside one jit: GPipe and circular (interleaved) schedules.

The stacked MoE layers [L, ...] are cut into C = S·V chunks of K = ⌈L/C⌉ layers (S = mesh.pipeline stages,
V = mesh.pipeline_virtual_stages; V = 1 for ``gpipe``). Chunk c lives on stage c mod S, so stage s holds chunks
s, s+S, s+2S, … (round-robin, as in Megatron's interleaved 1F1B and MaxText's circular pipeline; with V = 1 this
is GPipe's contiguous split). The batch is cut into M micro-batches. At iteration t every stage works at once
(``vmap`` over the stage axis, partitioned over ``pipeline``): stage s runs work item i = t − s, i.e. micro-batch
i mod M through its chunk of repeat i // M; then activations shift one stage down (a permute). What leaves the
last stage goes into a buffer of M slots, which stage 0 reads back M iterations later for the next repeat (so
circular needs M ≥ S). M·V + S − 1 iterations fill and drain the pipe; each costs one chunk (L/(S·V) layers).
Bubble fraction: (S − 1) / (V·M + S − 1) — V times smaller than GPipe's (S − 1) / (M + S − 1) for the same M.

Uneven stages: when C does not divide L (DeepSeek-V3's 58 MoE layers on PP16) the stack is padded inside this
function to K·C layers with zero weights: identity layers (a zero-weight block adds exactly 0 to the residual
stream, and its gradient passes straight through), whose routing statistics are masked (no load, no balance term). The param tree and checkpoints are unchanged and the real layers' grads are exact (the pad's
transpose drops the padded cotangents). The padded slots still compute: (K·C − L)/(K·C) of the pipelined layer
FLOPs are wasted (6/64 = 9.4% for 58 layers on 16 stages).

Weight layout. The stored stack is [L, ...] with ``layers`` over ``pipeline`` in contiguous blocks when S divides
L (sharding/partition.py moves ``pipeline`` to another dim otherwise: for the 671B config on PP16 every leaf of the
58-layer stack is still split 16 ways, on d_model or a head dim). GPipe with S | L uses that layout as is: the
compiled step has no collective on the stack weights (checked in the HLO). Circular, or uneven stages, re-lay the
stack into [S, V, K, ...] stage order inside the jit, once per step (and the transpose on the grads). Left to
itself XLA lowers that re-sharding as an all-gather of the whole stack over ``pipeline`` and a local slice (HLO:
e.g. f32[2,2,2,4,48,24], all S·V·K layers of the local experts): a transient of S× the stage's weights — at 671B
on PP16×EP64 the device's expert share of all 58 layers, ~41 GB of f32 params, instead of ~2.6 GB. From
``EXPLICIT_RELAYOUT_MIN_STAGES`` = 8 stages on, the re-layout is explicit instead (``_relayout_explicit``: in
shard_map with the stored specs, an all_to_all moves ``pipeline`` from the layer dim to a weight dim, the now-whole
layer dim is permuted locally, an all_to_all moves it back: 2× the stage share of traffic, a few × of transient).
XLA's memory analysis of the compiled step (circular V=2, remat full, weights-dominated tiny model with
moe_intermediate_size=384, 4.0 MB params/device on pp8, 2.3 MB on pp4×ep2): pp8 temp 21.0 MB → 13.7 MB explicit;
pp4 6.3 MB → 9.8 MB (hence the threshold). Storing the stack in stage order (MaxText's [repeats, stages, ...]
params) would remove the re-layout at the price of a mesh-dependent checkpoint layout.

Memory. The backward pass is autodiff of the whole schedule: the forward scan runs all M micro-batches, then its
transpose. Per stage it keeps, for every (micro-batch, chunk) item, what the layer remat policy saves —
``model.remat: full`` keeps one [mb, T, d] input per layer, M·L/S of them (the same as without a pipeline). No
weights are saved per iteration: GPipe scans over its stage's layers (static slices), and circular, which picks
chunk r of the stage's weights with a dynamic index, runs each layer under ``jax.checkpoint`` with the stage's
weights as input (loop-invariant, saved once); remat ``none`` becomes "save the matmul outputs" there, since saving
everything would save weight-derived values once per iteration (M copies of the stage's weights). Measured with
XLA's memory analysis (tiny model, 8 MoE layers, pp2×ep2×dp2, batch 16, remat full, M = 2/4/8/16): temp
bytes per device stay flat or fall as M grows — GPipe 936/723/678/609 KB, circular V=2 1256/990/999/927 KB (the
extra ~300 KB is the re-laid weight copy and its grad; params are 452 KB per device). True 1F1B (Megatron; DualPipe)
bounds live activations at S micro-batches by running micro-batch i's backward before micro-batch i+S's forward.
That cannot be expressed here: the loss (head, MTP) is computed outside the pipelined MoE stack and autodiff
transposes the finished forward scan, so no backward starts before every forward is done. 1F1B needs a schedule
that owns its backward — a ``custom_vjp`` over the whole step, or a scan whose body calls ``jax.vjp`` per stage and
holds the head on the last stage.

Embedding, dense layers, head and MTP run outside the pipeline, split over ``pipeline`` by sequence position
(sharding/rules.py: ``activation_length`` → ``pipeline``): each stage computes 1/S of every sequence's tokens
there, and their attention gathers the small compressed key/value latent (``activation_kv_length``) of the whole
sequence. Their weights are split over ``pipeline`` as well (sharding/partition.py: FSDP on that axis, gathered
where used). The stack needs whole sequences: this function gathers its input over ``pipeline`` (one all-gather
of the micro-step's activations) and traces the stages under ``STAGE_RULES``; its output is sliced back. Before,
every stage computed those parts for the whole batch: at 671B on PP16 that was 16× the MTP layer's expert-dispatch
buffers (79 GB) and the dense layers' weights, grads and moments on every stage (25 GB). The price is the
weights' all-gathers and grad reduce-scatters on ``pipeline`` each micro-step (``python -m sharding.plan`` prints
them); placing those layers on the first and last stage instead (DeepSeek's layout) needs stage-specific
programs, which the vmapped stages here cannot express.
"""

from __future__ import annotations

import contextlib
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dsv3_jax import fp8
from dsv3_jax.block import REMAT_POLICIES, Block, apply_block, moe_stack_override
from dsv3_jax.config import ModelConfig
from sharding.rules import BATCH_AXES, LOGICAL_RULES, STAGE_RULES

SCHEDULES = ("gpipe", "circular")
# Re-lay the stack with explicit all_to_alls from this many stages on (XLA's all-gather is cheaper below).
EXPLICIT_RELAYOUT_MIN_STAGES = 8


def bubble_fraction(stages: int, microbatches: int, virtual_stages: int = 1) -> float:
    """Idle share of the schedule: (S − 1) / (V·M + S − 1); V = 1 is GPipe."""
    return (stages - 1) / (virtual_stages * microbatches + stages - 1)


def schedule_summary(stages: int, microbatches: int, schedule: str = "gpipe", virtual_stages: int = 1) -> str:
    """One line for the train-start log: schedule, stages, micro-batches and bubble."""
    V = virtual_stages if schedule == "circular" else 1
    M = microbatches or 2 * stages
    chunks = f" × {V} virtual" if schedule == "circular" else ""
    return (f"pipeline: {schedule}, {stages} stages{chunks} × {M} micro-batches, "
            f"bubble {bubble_fraction(stages, M, V):.1%}")


def _constrain(mesh: Mesh, x: jax.Array, *spec) -> jax.Array:
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(*spec)))


def _layer_fn(cfg: ModelConfig):
    """(stage chunk weights [V, K, ...], repeat r, layer k, x, positions) → (x, aux) for layer [r, k].

    Circular only (GPipe scans over its stage's layers directly). The weight slice is taken inside the
    checkpointed function and never saved: its residuals are the whole stage's weights (loop-invariant: not
    stacked per iteration), not one slice per iteration."""
    def f(w, r, k, x, p):
        y, _, aux = Block(cfg, True).apply(jax.tree.map(lambda a: a[r, k], w), x, p)
        return y, aux

    # model.remat: none saves every matmul output and recomputes the element-wise ops: saving "everything but the
    # weight slice" still saves values derived from it (reshapes, casts), i.e. weights once per iteration.
    policy = jax.checkpoint_policies.dots_saveable if cfg.remat == "none" else REMAT_POLICIES[cfg.remat]
    return jax.checkpoint(f, policy=policy, prevent_cse=True)


def _stored_specs(cfg: ModelConfig, mesh: Mesh, stacked: dict) -> dict:
    """The shardings the stored stack leaves have (sharding/partition.py: rules table, fitted to the shapes)."""
    from dsv3_jax.moe import dispatch_override
    from sharding.partition import fit_sharding  # lazy: partition imports this module

    x = jax.ShapeDtypeStruct((1, 1, cfg.hidden_size), jnp.float32)
    pos = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    with dispatch_override(None):  # shapes only: no expert-parallel dispatch of the one dummy token
        boxed = jax.eval_shape(lambda x, p: Block(cfg, True).init(jax.random.key(0), x, p), x, pos)
    axes = jax.tree.map(lambda s: nn.logical_to_mesh_axes(s, LOGICAL_RULES), nn.get_partition_spec(boxed),
                        is_leaf=lambda s: isinstance(s, P))
    return jax.tree.map(lambda ax, a: fit_sharding(NamedSharding(mesh, P("pipeline", *ax)), a.shape),
                        axes, stacked, is_leaf=lambda s: isinstance(s, P))


def _relayout_explicit(mesh: Mesh, a: jax.Array, sharding: NamedSharding, L: int, S: int, V: int, K: int):
    """[L, ...] stored as ``sharding`` → [S·V·K, ...] in stage order (row s·V·K + r·K + k is layer
    (r·S + s)·K + k, zero rows past L), split over ``pipeline`` in contiguous blocks, with all_to_alls inside
    shard_map: each device receives only its stage's share. None when the layout does not allow it (the caller
    lets XLA re-shard)."""
    spec = list(sharding.spec) + [None] * (a.ndim - len(sharding.spec))
    names = [() if n is None else ((n,) if isinstance(n, str) else tuple(n)) for n in spec]
    size = lambda ns: math.prod(mesh.shape[n] for n in ns)
    if names[0] == ("pipeline",):  # layers split over stages: first move `pipeline` onto a weight dim j
        js = [i for i in range(1, a.ndim) if "pipeline" not in names[i] and (a.shape[i] // size(names[i])) % S == 0]
        out_names = names
    else:  # uneven stack: `pipeline` already on a weight dim (the minor axis there, see fit_sharding)
        js = [i for i in range(1, a.ndim) if names[i][-1:] == ("pipeline",)] if not names[0] else []
        out_names = [("pipeline",)] + [tuple(n for n in ns if n != "pipeline") for ns in names[1:]]
    if not js:
        return None
    j, Lp = js[0], S * V * K
    order = np.array([(r * S + s) * K + k for s in range(S) for r in range(V) for k in range(K)])

    def local(x):
        if names[0]:
            x = jax.lax.all_to_all(x, "pipeline", split_axis=j, concat_axis=0, tiled=True)  # every layer, dim j split
        x = jnp.take(jnp.pad(x, [(0, Lp - L)] + [(0, 0)] * (x.ndim - 1)), order, axis=0)
        return jax.lax.all_to_all(x, "pipeline", split_axis=0, concat_axis=j, tiled=True)  # own stage's rows

    to_spec = lambda ns: P(*[n or None for n in ns])
    return jax.shard_map(local, mesh=mesh, in_specs=to_spec(names), out_specs=to_spec(out_names),
                         check_vma=False)(a)


def pipeline_stack(mesh: Mesh, microbatches: int, schedule: str, virtual_stages: int, cfg: ModelConfig,
                   variables: dict, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Run the stacked MoE layers ``variables`` ({'params': {'layers': ...}, 'router': ...}, leaves [L, ...])
    over x [B, T, d] through the pipeline. Returns (x [B, T, d], aux {load [L, E], balance [L], dropped [L]})."""
    if schedule not in SCHEDULES:
        raise ValueError(f"mesh.pipeline_schedule={schedule!r}: expected one of {', '.join(SCHEDULES)}")
    S = mesh.shape["pipeline"]
    V = virtual_stages if schedule == "circular" else 1
    if V < 1:
        raise ValueError(f"mesh.pipeline_virtual_stages={virtual_stages}: must be ≥ 1")
    stacked = {col: tree["layers"]["block"] for col, tree in variables.items()}
    L = jax.tree.leaves(stacked)[0].shape[0]
    K = math.ceil(L / (S * V))  # layers per chunk
    Lp = K * S * V
    B, T, d = x.shape
    M = microbatches or 2 * S
    if B % M:
        raise ValueError(f"batch {B} is not divisible into mesh.pipeline_microbatches={M} micro-batches")
    if V > 1 and M < S:
        raise ValueError(f"the circular schedule needs mesh.pipeline_microbatches ≥ mesh.pipeline (got {M} < {S}):"
                         f" a micro-batch re-enters stage 0 M iterations after it first did")
    mb = B // M

    def relayout_array(a, sharding):  # [L, ...] → [S, V, K, ...]: stage s, repeat r holds chunk r·S + s
        explicit = sharding is not None and S >= EXPLICIT_RELAYOUT_MIN_STAGES
        staged = _relayout_explicit(mesh, a, sharding, L, S, V, K) if explicit else None
        if staged is not None:
            a = staged.reshape(S, V, K, *a.shape[1:])
        else:  # GPipe with S | L: already in place; otherwise XLA re-shards (an all-gather of the stack)
            a = jnp.pad(a, [(0, Lp - L)] + [(0, 0)] * (a.ndim - 1))
            a = a.reshape(V, S, K, *a.shape[1:]).swapaxes(0, 1)
        return _constrain(mesh, a, "pipeline", None, None, *[P.UNCONSTRAINED] * (a.ndim - 3))

    def relayout(a, sharding):
        if not isinstance(a, fp8.Prequantized):
            return relayout_array(a, sharding)
        from sharding.partition import fit_sharding  # lazy: partition imports this module

        # FP8 experts quantised ahead of the scan: w as stored; q_t [..., N, K] has w's spec with the last two
        # dims swapped; the block scales [..., K/128, N/128] w's spec, fitted to their shape.
        fit = (lambda spec, shape: None if sharding is None else
               fit_sharding(NamedSharding(mesh, P(*spec)), shape))
        spec = list(sharding.spec) + [None] * (a.w.ndim - len(sharding.spec)) if sharding is not None else []
        swapped = spec[:-2] + spec[-2:][::-1]
        return fp8.Prequantized(relayout_array(a.w, sharding), relayout_array(a.q_t, fit(swapped, a.q_t.shape)),
                                relayout_array(a.scale, fit(spec, a.scale.shape)))

    is_weight = lambda a: isinstance(a, fp8.Prequantized)
    free = V == 1 and L % S == 0
    stored = (jax.tree.map(lambda _: None, stacked, is_leaf=is_weight) if free
              else _stored_specs(cfg, mesh, stacked))
    stages = jax.tree.map(relayout, stacked, stored, is_leaf=lambda a: a is None or is_weight(a))
    # Outside the stack `pipeline` splits the sequence (sharding/rules.py): gather whole sequences here (the
    # micro-batch buffer is on every stage, as stage 0 reads it back M iterations later on the circular schedule).
    # Micro-batch i = rows i, M + i, 2M + i, ...: with the batch split over the batch axes in contiguous blocks
    # (a multiple of M rows each when mb divides over them) every device keeps its own rows, i.e. the split is
    # local. (Contiguous micro-batches need an all-to-all, which XLA lowered as an all-gather of the whole
    # micro-step: at 671B two 45 GB copies per device.) Any split is the same math: the loss sums over tokens.
    def split(a):  # [B, ...] → [M, mb, ...]
        return jnp.swapaxes(a.reshape(mb, M, *a.shape[1:]), 0, 1)

    xs = split(_constrain(mesh, x, BATCH_AXES, None, None))
    pos = split(_constrain(mesh, positions, BATCH_AXES, None))
    layer_fn = _layer_fn(cfg)

    def stage_fn(w, s, r, h, p):  # one stage, one chunk: K layers of repeat r
        def body(h, xk):
            lw, k = xk
            y, aux = apply_block(cfg, True, lw, h, p) if V == 1 else layer_fn(w, r, k, h, p)
            # Padded slots are identity layers: with all-zero weights a block adds exactly 0 to the residual
            # stream (o_proj, the experts' and shared expert's down projections are zero), so y == h there and
            # only the routing statistics need masking. (A select on y saved its [B, T, d] predicate per layer
            # and iteration for the backward.)
            real = (r * S + s) * K + k < L
            return y, jax.tree.map(lambda a: jnp.where(real, a, 0), aux)
        # GPipe: the stage's layers are the scan's xs (static slice: nothing per iteration to save).
        return jax.lax.scan(body, h, (jax.tree.map(lambda a: a[0], w) if V == 1 else None, jnp.arange(K)))

    run_stages = jax.vmap(stage_fn, spmd_axis_name="pipeline")
    act_spec = ("pipeline", BATCH_AXES, None, None)
    stage_ids = jnp.arange(S)

    def step(carry, t):
        prev, buf, load, balance, dropped = carry
        item = t - stage_ids  # work item of each stage: micro-batch item mod M, repeat item // M
        valid = (item >= 0) & (item < M * V)
        mbi, rep = jnp.mod(item, M), jnp.clip(item // M, 0, V - 1)
        state = jnp.concatenate([buf[jnp.mod(t, M)][None], prev[:-1]], axis=0)  # shift one stage down
        state = _constrain(mesh, state, *act_spec)
        out, aux = run_stages(stages, stage_ids, rep, state, jnp.take(pos, mbi, axis=0))
        out = _constrain(mesh, out, *act_spec)  # [S, mb, T, d]; aux leaves [S, K, ...]
        hit = jax.nn.one_hot(rep, V, dtype=jnp.float32) * valid[:, None]  # [S, V]
        load = load + hit[:, :, None, None] * aux["load"][:, None]
        balance = balance + hit[:, :, None] * aux["balance"][:, None]
        dropped = dropped + hit[:, :, None] * aux["dropped"][:, None]
        done = t - (S - 1)  # item leaving the last stage: back into the buffer (the output after repeat V − 1)
        slot = jnp.mod(done, M)
        buf = buf.at[slot].set(jnp.where((done >= 0) & (done < M * V), out[S - 1], buf[slot]))
        return (out, buf, load, balance, dropped), None

    E = cfg.n_routed_experts
    init = (_constrain(mesh, jnp.zeros((S, mb, T, d), x.dtype), *act_spec), xs,
            jnp.zeros((S, V, K, E), jnp.float32), jnp.zeros((S, V, K), jnp.float32), jnp.zeros((S, V, K), jnp.float32))
    with nn.logical_axis_rules(STAGE_RULES):  # a stage's layers see whole sequences
        (_, outputs, load, balance, dropped), _ = jax.lax.scan(step, init, jnp.arange(M * V + S - 1))

    def unstage(a):  # [S, V, K, ...] → [L, ...]
        return a.swapaxes(0, 1).reshape(Lp, *a.shape[3:])[:L]
    return jnp.swapaxes(outputs, 0, 1).reshape(B, T, d), {"load": unstage(load), "balance": unstage(balance) / M,
                                      "dropped": unstage(dropped)}


@contextlib.contextmanager
def pipeline_parallel(mesh: Mesh, microbatches: int = 0, schedule: str = "gpipe", virtual_stages: int = 1):
    """Within this context, the MoE stack traced under ``mesh`` runs through the pipeline schedule."""
    if mesh.shape.get("pipeline", 1) == 1:
        yield
        return
    with moe_stack_override(functools.partial(pipeline_stack, mesh, microbatches, schedule, virtual_stages)):
        yield
