"""The train state and the one jit-compiled train step (REFERENCE §5 balance, §6 MTP, §9 recipe).

One step = ``n`` micro-batches ``tokens [n, mb, T+1]`` scanned with gradient accumulation, one AdamW update of
the FP32 master params, and the aux-loss-free bias update of the ``router`` variables from the expert loads
summed over the whole global batch (all micro-batches; the model already sums over its batch axis, so once
the batch is sharded over data-parallel replicas XLA adds the cross-replica sum inside this same jit).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import weakref
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax import fp8
from dsv3_jax.config import Config, ModelConfig
from dsv3_jax.model import Transformer, init_variables
from dsv3_jax.training import optim
from dsv3_jax.training.loss import Losses, compute_losses, cross_entropy, target_mask
from dsv3_jax.training.schedule import Schedule


class TrainState(NamedTuple):
    """Everything a run needs to continue bit-exactly (a plain pytree; see checkpoint.py for the on-disk form).

    params       FP32 master parameters (the model casts to ``model.dtype`` for compute)
    router       ``e_score_correction_bias`` leaves: [L_moe, E] (stacked layers) and [E] per MTP module;
                 updated by the sign rule, never by gradient
    opt_state    optax state of :func:`optim.make_optimizer`: (clip, AdamState(count, mu, nu), decay); updated
                 by :func:`optim.fused_adamw`
    step         int64 [] numpy, host: steps done
    tokens_seen  int64 [] numpy, host: training tokens consumed (drives LR, λ, γ and the batch ramp)
    rng          uint32 [2] key data, split every step (reserved for stochastic layers; none today)

    ``step`` and ``tokens_seen`` stay on the host as exact 64-bit counters and never enter the jit: schedules
    are evaluated in Python and passed in as :class:`Hyper` scalars.
    """

    params: Any
    router: Any
    opt_state: Any
    step: np.ndarray
    tokens_seen: np.ndarray
    rng: jax.Array


class Hyper(NamedTuple):
    """Per-step schedule values (float32 scalars, traced — changing them never recompiles)."""

    lr: Any
    mtp_lambda: Any
    gamma: Any


def hyper_at(cfg: Config, step: int, tokens: int) -> Hyper:
    """The schedule's values for step ``step`` after ``tokens`` tokens, as the step's traced scalars."""
    v = Schedule(cfg).at(tokens, step)
    return Hyper(np.float32(v.lr), np.float32(v.mtp_lambda), np.float32(v.bias_update_speed))


def init_state(cfg: Config, seed: int | None = None, mesh: Any = None) -> TrainState:
    """Fresh state: model init from ``train.seed``; params promoted to float32 (master weights).

    With a ``mesh`` every leaf is created directly in its sharding (params by the rules table, optimizer state
    ZeRO-1 over ``data``), never whole on one device.
    """
    seed = cfg.train.seed if seed is None else seed
    # Init draws from an RBG key: its compiled init is ~2x faster to build than threefry's (one counter-based
    # bit generator instead of unrolled threefry rounds per parameter) and it is the usual choice for big
    # sharded inits.
    init_key = jax.random.key(seed, impl="rbg")
    train_key = jax.random.fold_in(jax.random.key(seed), 1)
    opt = optim.make_optimizer(optim.OptimSettings.from_train(cfg.train))

    def make(key):
        variables = init_variables(cfg.model, key)
        params = jax.tree.map(lambda p: p.astype(jnp.float32), variables["params"])
        return params, variables.get("router", {}), opt.init(params)

    if mesh is None:
        # Committed to the device like restored arrays are: the jit cache keys on committedness, so a fresh
        # and a restored state share one compiled step.
        out = jax.device_put(jax.jit(make)(init_key), jax.devices()[0])
        rng = jax.device_put(jax.random.key_data(train_key), jax.devices()[0])
    else:
        from sharding.partition import replicated, state_shardings

        p, r, o = jax.eval_shape(make, init_key)
        out = jax.jit(make, out_shardings=state_shardings(p, r, o, cfg.model, mesh, cfg.mesh.zero1))(init_key)
        rng = jax.device_put(jax.random.key_data(train_key), replicated(mesh))
    params, router, opt_state = out
    return TrainState(params, router, opt_state, np.int64(0), np.int64(0), rng)


# ----------------------------------------------------------------------------------------------------------
# Aux-loss-free balancing (REFERENCE §5)
# ----------------------------------------------------------------------------------------------------------


def update_router(router: Any, load: jax.Array, mtp_load: jax.Array, gamma: jax.Array | float) -> Any:
    """``b_i += γ·sign(c̄ - c_i)`` per layer. load [L_moe, E] (main layers, stacked like the router leaf),
    mtp_load [D, E] (module k ↔ router subtree ``mtp_{k-1}``). Loads are token counts over the global batch."""

    def one(path, b):
        top = str(getattr(path[0], "key", path[0]))
        c = mtp_load[int(top.removeprefix("mtp_"))] if top.startswith("mtp_") else load
        if c.shape != b.shape:
            raise ValueError(f"router leaf {jax.tree_util.keystr(path)} has shape {b.shape} but its expert load "
                             f"has shape {c.shape}")
        return b + gamma * jnp.sign(c.mean(-1, keepdims=True) - c)

    return jax.tree_util.tree_map_with_path(one, router)


def max_violation(load: jax.Array) -> jax.Array:
    """TR's MaxVio per layer: ``max_i c_i / c̄ - 1``. load [..., E] → [...]."""
    return load.max(-1) / jnp.maximum(load.mean(-1), 1e-9) - 1.0


# ----------------------------------------------------------------------------------------------------------
# The step
# ----------------------------------------------------------------------------------------------------------


def experts_cast_ahead(model_cfg: ModelConfig, requested: bool) -> bool:
    """Whether the routed experts' FP32 master weights reach the layers as one BF16 copy made outside the layer
    scan (:func:`expert_copy`), instead of every layer casting its slice in each pass (forward and rematerialised
    forward): ``train.experts_cast_ahead``, where it applies (BF16 compute on wider master weights; FP8
    prequantises instead). The same numbers. :func:`train_step` writes the next step's copy in the optimizer's
    pass over the master weights (2 bytes a parameter more there, in place of a separate cast's 6) and keeps it
    between steps (:func:`_ahead_copy`); the copy lives through the backward, and the experts' stacked gradient
    is BF16 until the optimizer reads it (in place of the FP32 one: the same memory)."""
    return requested and not model_cfg.fp8 and not model_cfg.fp8_weights and model_cfg.dtype != model_cfg.param_dtype


def expert_copy(params, dtype):
    """The routed-expert weights of ``params`` cast to ``dtype``, in a tree like ``params`` with None at every
    other leaf (the form :func:`_train_core` takes and returns as ``experts``). The layout stays the stored
    [..., E, in, out]: the BF16 Hopper kernels read it as is for the forward and transposed in shared memory for
    the Dgrad."""
    return jax.tree_util.tree_map_with_path(lambda p, w: w.astype(dtype) if fp8.expert_leaf(p, w) else None, params)


def _with_copy(params, experts):
    """``params`` with the expert leaves taken from ``experts`` (:func:`expert_copy`'s tree)."""
    return jax.tree.map(lambda c, w: w if c is None else c, experts, params, is_leaf=lambda x: x is None)


def cast_experts(params, dtype):
    """``params`` with every routed-expert weight cast to ``dtype`` (differentiable: the gradient reaches the
    master weight as the cast's transpose)."""
    return _with_copy(params, expert_copy(params, dtype))


_cast_copy = jax.jit(expert_copy, static_argnums=1)

class _Slot(NamedTuple):
    """The expert copy the last train_step's optimizer wrote, with weak references to the master leaves it is a
    cast of (the params that step returned). Only a params tree holding exactly those arrays reads it (jax arrays
    are immutable, and a donated one is deleted), so a restored, re-initialised or edited tree is cast afresh,
    never paired with a stale copy."""

    dtype: Any
    sources: list
    experts: Any


_AHEAD: dict[str, _Slot] = {}  # one slot: the copy is donated to the step that reads it


def _expert_sources(params) -> list:
    return [w for p, w in jax.tree_util.tree_leaves_with_path(params) if fp8.expert_leaf(p, w)]


def _ahead_copy(params, dtype, shardings: Any = None):
    """The BF16 expert copy for a step on ``params``: the one the previous step wrote if ``params`` are that step's
    output, else a fresh cast (on a mesh put into the params' ``shardings``, as the step's outputs are)."""
    slot, srcs = _AHEAD.pop("slot", None), _expert_sources(params)
    if (slot is not None and slot.dtype == jnp.dtype(dtype) and len(slot.sources) == len(srcs)
            and all(r() is w for r, w in zip(slot.sources, srcs))):
        return slot.experts
    copy = _cast_copy(params, jnp.dtype(dtype))
    return copy if shardings is None else _put_like(copy, shardings)


def _put_like(experts, shardings):
    """``experts`` (an :func:`expert_copy` tree) put into the shardings of the params they copy."""
    return jax.tree.map(lambda c, s: None if c is None else jax.device_put(c, s), experts, shardings,
                        is_leaf=lambda x: x is None)


def _remember_copy(params, experts, dtype) -> None:
    """Keep ``experts`` for the next step on ``params``; dropped as soon as any of those master leaves is (so a
    discarded state does not keep its copy alive)."""
    def forget(_):
        if "slot" in _AHEAD and _AHEAD["slot"].sources is refs:
            del _AHEAD["slot"]

    refs = [weakref.ref(w, forget) for w in _expert_sources(params)]
    _AHEAD["slot"] = _Slot(jnp.dtype(dtype), refs, experts)


def indexer_only(tree: Any) -> Any:
    """Bool pytree like ``tree``: True on the V3.2 lightning indexer's leaves (``…/indexer/…``)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: any(getattr(k, "key", None) == "indexer" for k in path), tree)


@functools.partial(jax.jit, static_argnames=("model_cfg", "opt", "balance_alpha", "indexer_loss_scale",
                                             "trainable", "cast_ahead"),
                   donate_argnames=("params", "router", "opt_state", "rng", "experts"))
def _train_core(params, router, opt_state, rng, tokens, hyper: Hyper, experts=None, *, model_cfg: ModelConfig,
                opt: optim.OptimSettings, balance_alpha: float, indexer_loss_scale: float = 1.0,
                trainable: str = "all", cast_ahead: bool = False):
    """tokens [n, mb, T+1] int32 — or a dict of such arrays: ``tokens`` plus, for packed chat rows,
    ``loss_mask``, ``positions``, ``segment_ids`` (dsv3_jax/data/chat.py) — → (params, router, opt_state, rng,
    metrics, experts). Compiled once per (configs, n, batch fields).

    ``experts`` (with ``cast_ahead`` where :func:`experts_cast_ahead` applies): :func:`expert_copy` of ``params``
    in the compute dtype; the layers read it, and the returned ``experts`` is the same copy of the updated params,
    written by the optimizer's pass (for the next step). None: the step casts the experts itself and returns None.
    """
    model = Transformer(model_cfg)
    E, D = model_cfg.n_routed_experts, model_cfg.num_nextn_predict_layers
    # FP8: the routed experts' E4M3 blocks once per step, outside the layer scan and the micro-batch loop
    # (fp8.prequantize_experts); the GEMMs read them and still return the master weights' gradients.
    pre = (fp8.prequantize_experts(params, model_cfg.fp8_pow2_scales)
           if model_cfg.fp8 and not model_cfg.fp8_weights else {})
    ahead = experts_cast_ahead(model_cfg, cast_ahead)
    given = ahead and experts is not None  # the copy the previous step's optimizer wrote
    cdt = jnp.dtype(model_cfg.dtype)

    def loss_fn(p, b):
        if ahead and not given:  # BF16: one cast of the stacked experts per micro-batch, outside the layer scan
            p = cast_experts(p, cdt)
        tok = b["tokens"]
        positions = b["positions"][:, :-1] if "positions" in b else None
        out = model.apply({"params": fp8.with_prequantized(p, pre) if pre else p, "router": router}, tok[:, :-1],
                          positions)
        losses = compute_losses(out, tok, hyper.mtp_lambda, balance_alpha, b.get("loss_mask"), b.get("segment_ids"),
                                indexer_loss_scale=indexer_loss_scale)
        mass = jnp.zeros((), jnp.float32) if out.topk_mass is None else out.topk_mass.mean()
        return losses.total, (losses, out.expert_load, out.mtp_expert_load, out.moe_dropped, mass)

    def micro(carry, tok):
        g_acc, l_acc, load_acc, mtp_acc, drop_acc, mass_acc = carry
        (_, (losses, load, mtp_load, dropped, mass)), g = jax.value_and_grad(loss_fn, has_aux=True)(
            _with_copy(params, experts) if given else params, tok)
        # the copy's BF16 gradient → FP32 (exact), as the cast's transpose does
        g = jax.tree.map(lambda gi, p: gi.astype(p.dtype), g, params)
        g_acc = jax.tree.map(jnp.add, g_acc, g)
        l_acc = jax.tree.map(jnp.add, l_acc, losses)
        return (g_acc, l_acc, load_acc + load, mtp_acc + mtp_load.reshape(D, E), drop_acc + dropped,
                mass_acc + mass), None

    batch = tokens if isinstance(tokens, dict) else {"tokens": tokens}
    n = batch["tokens"].shape[0]
    zero = jnp.zeros((), jnp.float32)
    init = (jax.tree.map(jnp.zeros_like, params), Losses(zero, zero, zero, zero, zero),
            jnp.zeros((model_cfg.num_moe_layers, E), jnp.float32), jnp.zeros((D, E), jnp.float32), zero, zero)
    if n == 1:  # no accumulation buffer: saves a full f32 copy of the params' size
        (g_sum, l_sum, load, mtp_load, dropped, mass), _ = micro(jax.tree.map(jnp.zeros_like, init),
                                                                 jax.tree.map(lambda a: a[0], batch))
    else:
        (g_sum, l_sum, load, mtp_load, dropped, mass), _ = jax.lax.scan(micro, init, batch)
    # Micro-batches have equal token counts, so the mean of per-micro means is the global-batch mean.
    losses = jax.tree.map(lambda v: v / n, l_sum)
    # V3.2 dense warm-up: only the indexer moves (clip sees only its gradient; no decay on the frozen params,
    # and the router biases stay)
    keep = indexer_only(params) if trainable == "indexer" else None
    # One elementwise pass per leaf over (g_sum, p, m, v): grads = g_sum/n, clipping and Adam fused in (the
    # same arithmetic as the optax chain of optim.make_optimizer; no clipped-grad or direction tree).
    params, opt_state, grad_norm = optim.fused_adamw(g_sum, opt_state, params, hyper.lr, opt, n, keep)
    router = update_router(router, load, mtp_load, hyper.gamma if keep is None else 0.0)
    rng = jax.random.key_data(jax.random.split(jax.random.wrap_key_data(rng))[0])
    # the next step's copy, from the same elementwise pass that wrote the new master weights
    experts = expert_copy(params, cdt) if given else None

    metrics = {
        "loss": losses.total, "ce": losses.ce, "mtp_loss": losses.mtp, "balance_loss": losses.balance,
        "grad_norm": grad_norm, "maxvio": max_violation(load), "mtp_maxvio": max_violation(mtp_load),
        "expert_load": load / jnp.maximum(load.mean(-1, keepdims=True), 1e-9),  # [L_moe, E] relative to mean
        # routed copies dropped for expert-parallel capacity this step (mesh.expert_capacity_factor), of
        # moe_copies = tokens × K × MoE layers (main + MTP)
        "moe_dropped": dropped,
        "finite": jnp.isfinite(losses.total) & jnp.isfinite(grad_norm),
        # V3.2: Σ_layers indexer KL; share of the head-mean attention on the top-k keys (dense attention only)
        "indexer_kl": losses.indexer_kl, "topk_mass": mass / n,
    }
    return params, router, opt_state, rng, metrics, experts


def training_model_config(cfg: Config) -> ModelConfig:
    """The model as the step runs it: ``train.precision: fp8`` switches the recipe's GEMMs to FP8 (REFERENCE §8);
    chat data (``data.format: chat``) packs samples that must not attend to each other (REFERENCE §9 SFT)."""
    return dataclasses.replace(cfg.model, fp8=cfg.train.precision == "fp8",
                               packed_samples=cfg.model.packed_samples or cfg.data.format == "chat")


def _on_mesh(mesh: Any, cfg: Config):
    """The context a step is traced in: nothing on one device, the parallel strategies on a mesh."""
    if mesh is None:
        return contextlib.nullcontext()
    from sharding.partition import parallel_context

    m = cfg.mesh
    return parallel_context(mesh, m.pipeline_microbatches, m.pipeline_schedule, m.pipeline_virtual_stages,
                            m.expert_capacity_factor)


def train_step(state: TrainState, tokens: np.ndarray, cfg: Config, mesh: Any = None
               ) -> tuple[TrainState, dict[str, Any]]:
    """One optimiser step on ``tokens [n, mb, T+1]`` (n micro-batches; or a dict of such arrays, see
    :func:`_train_core`). Donates ``state``'s device buffers.

    With a ``mesh`` (from :func:`sharding.mesh.make_mesh`) the batch is split over its batch axes and the step
    runs expert/pipeline/data parallel; the state keeps the shardings it came with. In a multi-process run
    ``tokens`` is this process's rows of each micro-batch (:func:`sharding.distributed.batch_shard`).
    Returns the new state and metrics as device arrays (fetch them only when needed: it waits for the step).
    """
    step, seen = int(state.step), int(state.tokens_seen)
    hyper = hyper_at(cfg, step, seen)
    if mesh is not None:
        from sharding.distributed import to_global
        from sharding.partition import microbatch_sharding

        # Multi-process: ``tokens`` holds this process's rows of each micro-batch (sharding.distributed).
        tokens = jax.tree.map(lambda a: to_global(np.asarray(a, np.int32), microbatch_sharding(mesh), batch_dim=1),
                              tokens)
        keep = jax.tree.map(lambda x: x.sharding, (state.params, state.router, state.opt_state, state.rng))
    else:
        tokens = jax.tree.map(lambda a: jnp.asarray(a, jnp.int32), tokens)
    n, mb, t1 = (tokens["tokens"] if isinstance(tokens, dict) else tokens).shape
    model_cfg = training_model_config(cfg)
    ahead = experts_cast_ahead(model_cfg, cfg.train.experts_cast_ahead)
    experts = _ahead_copy(state.params, model_cfg.dtype, keep[0] if mesh is not None else None) if ahead else None
    with _on_mesh(mesh, cfg):
        params, router, opt_state, rng, metrics, experts = _train_core(
            state.params, state.router, state.opt_state, state.rng, tokens, hyper, experts,
            model_cfg=model_cfg, opt=optim.OptimSettings.from_train(cfg.train),
            balance_alpha=cfg.train.balance_alpha, indexer_loss_scale=cfg.train.indexer_loss_scale,
            trainable=cfg.train.trainable, cast_ahead=cfg.train.experts_cast_ahead)
    if mesh is not None:  # a no-op when the partitioner kept them in place
        params, router, opt_state, rng = jax.device_put((params, router, opt_state, rng), keep)
        if experts is not None:
            experts = _put_like(experts, keep[0])
        if jax.process_count() > 1:  # every process reads the metrics (e.g. expert_load is sharded over stages)
            from sharding.partition import replicated

            metrics = jax.device_put(metrics, replicated(mesh))
    if experts is not None:
        _remember_copy(params, experts, model_cfg.dtype)
    step_tokens = n * mb * (t1 - 1)
    metrics = dict(metrics, lr=hyper.lr, mtp_lambda=hyper.mtp_lambda, tokens=step_tokens)
    return TrainState(params, router, opt_state, np.int64(step + 1), np.int64(seen + step_tokens), rng), metrics


@functools.partial(jax.jit, static_argnames=("model_cfg",))
def _eval_core(params, router, batch, *, model_cfg: ModelConfig):
    tokens = batch["tokens"]
    positions = batch["positions"][:, :-1] if "positions" in batch else None
    out = Transformer(model_cfg).apply({"params": params, "router": router}, tokens[:, :-1], positions, mtp=False)
    mask = target_mask(batch["loss_mask"], batch["segment_ids"], 0) if "loss_mask" in batch else None
    return cross_entropy(out.logits, tokens[:, 1:], mask)


def eval_loss(state: TrainState, batches: Any, cfg: Config, mesh: Any = None) -> float:
    """Mean next-token CE of the main head over ``batches`` (an iterable of tokens [B, T+1], or of dicts of
    such arrays: packed chat rows are scored on their assistant targets only)."""
    put = (lambda b: jnp.asarray(b, jnp.int32))
    if mesh is not None:  # multi-process: each batch is this process's rows (see train_step)
        from sharding.distributed import to_global
        from sharding.partition import batch_sharding

        put = (lambda b: to_global(np.asarray(b, np.int32), batch_sharding(mesh)))
    model_cfg = dataclasses.replace(cfg.model, packed_samples=training_model_config(cfg).packed_samples)
    batches = [jax.tree.map(put, b if isinstance(b, dict) else {"tokens": b}) for b in batches]
    with _on_mesh(mesh, cfg):
        losses = [_eval_core(state.params, state.router, b, model_cfg=model_cfg) for b in batches]
    if mesh is not None and jax.process_count() > 1:  # readable on every process
        from sharding.partition import replicated

        losses = jax.device_put(losses, replicated(mesh))
    if not losses:
        raise ValueError("eval_loss: no evaluation batches")
    return float(np.mean(jax.device_get(losses)))
