"""Optimiser (REFERENCE §9).

AdamW (β1 0.9, β2 0.95, weight decay 0.1 except norms and 1-D params), global-norm clipping at 1.0, FP32 master
parameters, Adam moments in ``train.moments_dtype`` (the TR keeps them in BF16).

The learning rate is *not* inside the optax chain: :func:`make_optimizer` returns the update direction
(clip → Adam → + wd·p) and the train step multiplies by ``-lr``, the value :class:`dsv3_jax.training.schedule.Schedule`
has in force for the step (evaluated on the host; the compiled step never depends on it).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from dsv3_jax.config import TrainConfig

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
