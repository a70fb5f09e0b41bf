"""Optimiser and schedules (REFERENCE §5, §6, §9).

AdamW (β1 0.9, β2 0.95, weight decay 0.1 except norms and 1-D params), global-norm clipping at 1.0, FP32 master
parameters, Adam moments in ``train.moments_dtype`` (the TR keeps them in BF16).

The learning rate is *not* inside the optax chain: :func:`make_optimizer` returns the update direction
(clip → Adam → + wd·p) and the train step multiplies by ``-lr``. The schedules here are plain Python functions
of (steps done, tokens seen) evaluated on the host each step — exact 64-bit token counts (a 14.8T-token run
overflows int32 and float32 cannot count it), and the compiled step never depends on them.

Batch-size ramp (TR §4: 3072 → 15360 sequences over 469B tokens): a step is ``n`` fixed-size micro-batches
accumulated by a ``lax.scan`` inside the one jitted step; ``n`` grows with tokens seen. The scan length is a
shape, so each distinct ``n`` compiles once — the ramp is quantised to ``train.batch_ramp_levels`` sizes to
bound the number of compiled variants (we chose this over one padded max-size buffer with a dynamic trip
count: no wasted host→device transfer or memory for padding, at the price of a few compiles early in a run).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from dsv3_jax.config import ConfigError, TrainConfig

# ----------------------------------------------------------------------------------------------------------
# Schedules (host side, exact)
# ----------------------------------------------------------------------------------------------------------


def learning_rate(t: TrainConfig, step: int, tokens: int) -> float:
    """LR for the update of step ``step`` (0-based, = steps already done) after ``tokens`` tokens.

    Linear warm-up over ``warmup_steps`` (step s uses lr·(s+1)/warmup, so the first update is not wasted and
    step warmup-1 reaches lr), then constant until ``lr_constant_tokens``, cosine to ``lr_final`` over
    ``lr_decay_tokens`` (0 = never decay), then ``lr_final``. Phases after warm-up are driven by tokens because
    the batch size ramps (REFERENCE §9).
    """
    warm = min(1.0, (step + 1) / t.warmup_steps) if t.warmup_steps > 0 else 1.0
    if t.lr_decay_tokens <= 0 or tokens < t.lr_constant_tokens:
        base = t.lr
    elif tokens < t.lr_constant_tokens + t.lr_decay_tokens:
        frac = (tokens - t.lr_constant_tokens) / t.lr_decay_tokens
        base = t.lr_final + 0.5 * (t.lr - t.lr_final) * (1.0 + math.cos(math.pi * frac))
    else:
        base = t.lr_final
    return base * warm


def mtp_lambda(t: TrainConfig, tokens: int) -> float:
    """λ of the MTP loss: 0.3 for the first 10T tokens, 0.1 after (REFERENCE §6, §9)."""
    return t.mtp_lambda if tokens < t.mtp_lambda_switch_tokens else t.mtp_lambda_late


def bias_update_speed(t: TrainConfig, tokens: int) -> float:
    """γ of the aux-loss-free bias update: 0.001, then 0 for the last 500B tokens (REFERENCE §5)."""
    return t.bias_update_speed if tokens < t.bias_update_freeze_tokens else 0.0


def micro_batch_size(t: TrainConfig) -> int:
    """Sequences per micro-batch: the data iterator's batch size, fixed for the whole run.

    ``train.micro_batch_size``, or by default ``batch_ramp_start`` when the batch ramps (the ramp then moves in
    whole multiples of it) and ``global_batch_size`` otherwise (no accumulation).
    """
    mb = t.micro_batch_size or (t.batch_ramp_start if t.batch_ramp_start else t.global_batch_size)
    for name, value in (("global_batch_size", t.global_batch_size), ("batch_ramp_start", t.batch_ramp_start)):
        if value is not None and (value <= 0 or value % mb):
            raise ConfigError(f"train.{name}={value}: must be a positive multiple of the micro-batch size {mb} "
                              f"(train.micro_batch_size={t.micro_batch_size})")
    if t.batch_ramp_start is not None and t.batch_ramp_start > t.global_batch_size:
        raise ConfigError(f"train.batch_ramp_start={t.batch_ramp_start} > train.global_batch_size="
                          f"{t.global_batch_size}: the ramp only grows the batch")
    return mb


def num_micro_batches(t: TrainConfig, tokens: int) -> int:
    """Micro-batches in the step that starts after ``tokens`` tokens (the batch-size ramp).

    Linear in tokens from ``batch_ramp_start`` to ``global_batch_size`` over ``batch_ramp_tokens``, quantised to
    ``batch_ramp_levels`` steps (each distinct count is one compiled step variant: at most levels + 1).
    """
    mb = micro_batch_size(t)
    n_end = t.global_batch_size // mb
    if t.batch_ramp_start is None or t.batch_ramp_tokens <= 0 or tokens >= t.batch_ramp_tokens:
        return n_end
    n_start = t.batch_ramp_start // mb
    levels = max(1, min(t.batch_ramp_levels, n_end - n_start))
    # Ramp level j (0..levels-1) holds for tokens in [j, j+1)·ramp/levels and uses the linear interpolation
    # start → end at its left edge (rounded down to whole micro-batches); global_batch_size after the ramp.
    j = int(levels * tokens / t.batch_ramp_tokens)
    return n_start + (j * (n_end - n_start)) // levels


# ----------------------------------------------------------------------------------------------------------
# Optimiser (inside the jitted step)
# ----------------------------------------------------------------------------------------------------------


class OptimSettings(NamedTuple):
    """The optimiser hyper-parameters the compiled step depends on (hashable: a jit static argument)."""

    b1: float
    b2: float
    eps: float
    weight_decay: float
    grad_clip: float
    moments_dtype: str

    @classmethod
    def from_train(cls, t: TrainConfig) -> OptimSettings:
        return cls(t.adam_b1, t.adam_b2, t.adam_eps, t.weight_decay, t.grad_clip, t.moments_dtype)


class AdamState(NamedTuple):
    count: jax.Array  # int32 [] updates done (bias correction)
    mu: Any  # first moments, moments_dtype
    nu: Any  # second moments, moments_dtype


def scale_by_adam(b1: float, b2: float, eps: float, moments_dtype: str) -> optax.GradientTransformation:
    """Adam direction with *both* moments stored in ``moments_dtype`` (optax's ``mu_dtype`` covers only μ).

    The moment updates and the direction are computed in float32; only the stored moments are rounded.
    """
    dt = jnp.dtype(moments_dtype)

    def init(params):
        # Two separate trees: the train step donates the state, and a buffer cannot be donated twice.
        mu = jax.tree.map(lambda p: jnp.zeros(p.shape, dt), params)
        nu = jax.tree.map(lambda p: jnp.zeros(p.shape, dt), params)
        return AdamState(jnp.zeros((), jnp.int32), mu, nu)

    def update(grads, state, params=None):
        del params
        count = state.count + 1
        mu = jax.tree.map(lambda m, g: b1 * m.astype(jnp.float32) + (1 - b1) * g.astype(jnp.float32),
                          state.mu, grads)
        nu = jax.tree.map(lambda v, g: b2 * v.astype(jnp.float32) + (1 - b2) * jnp.square(g.astype(jnp.float32)),
                          state.nu, grads)
        c1 = 1 - b1 ** count.astype(jnp.float32)
        c2 = 1 - b2 ** count.astype(jnp.float32)
        direction = jax.tree.map(lambda m, v: (m / c1) / (jnp.sqrt(v / c2) + eps), mu, nu)
        mu, nu = (jax.tree.map(lambda x: x.astype(dt), tree) for tree in (mu, nu))
        return direction, AdamState(count, mu, nu)

    return optax.GradientTransformation(init, update)


def decay_mask(params: Any) -> Any:
    """True where weight decay applies: not norm weights (leaf ``scale``) and not 1-D params.

    Params of scanned layers carry a leading ``layers`` axis (path element ``layers``), so "1-D" is judged
    per layer: a stacked norm [L, d] or bias-like [L, E] is 1-D.
    """
    def rule(path, p) -> bool:
        names = [str(getattr(k, "key", k)) for k in path]
        ndim = p.ndim - (1 if "layers" in names else 0)
        return names[-1] != "scale" and ndim >= 2

    return jax.tree_util.tree_map_with_path(rule, params)


def make_optimizer(s: OptimSettings) -> optax.GradientTransformation:
    """clip(global norm) → Adam → + weight_decay·p (masked). Multiply the result by ``-lr`` to get the update."""
    return optax.chain(
        optax.clip_by_global_norm(s.grad_clip) if s.grad_clip > 0 else optax.identity(),
        scale_by_adam(s.b1, s.b2, s.eps, s.moments_dtype),
        optax.add_decayed_weights(s.weight_decay, mask=decay_mask),
    )
