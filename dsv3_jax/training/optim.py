"""Optimiser (REFERENCE §9).

AdamW (β1 0.9, β2 0.95, weight decay 0.1 except norms and 1-D params), global-norm clipping at 1.0, FP32 master
parameters, Adam moments in ``train.moments_dtype`` (the TR keeps them in BF16).

The learning rate is *not* inside the optax chain: :func:`make_optimizer` returns the update direction
(clip → Adam → + wd·p) and the train step multiplies by ``-lr``, the value :class:`dsv3_jax.training.schedule.Schedule`
has in force for the step (evaluated on the host; the compiled step never depends on it).

The train step runs :func:`fused_adamw`: the same update as one elementwise pass per leaf (mean and clip as one
scalar factor), on the state ``make_optimizer(...).init`` builds; :func:`reference_adamw` is the chain applied
tree by tree, its reference. ``bench/optimizer_memory.py`` compares XLA's temporaries of the two.
"""

from __future__ import annotations

import functools
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


# ----------------------------------------------------------------------------------------------------------
# The same update in one elementwise pass (what the train step runs)
# ----------------------------------------------------------------------------------------------------------


def fused_adamw(g_sum: Any, opt_state: Any, params: Any, lr: jax.Array | float, s: OptimSettings, n: int = 1,
                keep: Any = None, grad_norm: jax.Array | None = None) -> tuple[Any, Any, jax.Array]:
    """One AdamW step of the FP32 master ``params`` from the summed micro-batch gradients ``g_sum`` (grads =
    g_sum / n), as one elementwise expression per leaf: (params, opt_state, grad_norm).

    The update of ``make_optimizer(s).update`` followed by ``p - lr·u`` (:func:`reference_adamw`): ``g =
    g_sum/n`` clipped to global norm ``c``; Adam moments in float32 from the stored ``moments_dtype`` ones;
    ``u = (m/c1)/(√(v/c2)+ε) + wd·p`` (``decay_mask``); ``p ← p - lr·u``. The mean and the clip are one scalar
    factor ``(c/‖g‖ or 1)/n``: a multiply, which XLA repeats inside every consumer, where optax's per-element
    divisions ``g/n`` and ``g/‖g‖`` are ops it computes once into a full-size tree read by the μ and ν updates.
    Only scalars (‖g‖, the factor, the bias corrections) are computed apart; per leaf the rest reads (g_sum, p,
    m, v) and writes (p, m, v) into the donated buffers — no clipped-gradient or direction tree. Not bit-exact
    with the chain: g·((c/‖g‖)/n) vs ((g/n)/‖g‖)·c is a few ulps when clipping (exact without clipping and n a
    power of two), and XLA may contract ``b·m + (1-b)·g`` differently (tests/test_training.py bounds both).
    ``opt_state`` keeps ``make_optimizer(s).init``'s structure ``(clip state, AdamState, decay state)``, so
    checkpoints are unchanged.

    ``keep`` (bool pytree like params, or None): where False the gradient counts as zero (before the norm and
    the moments, as the step's frozen leaves do) and the param does not move (no decay either).
    ``grad_norm``: ‖g_sum/n‖ when the caller already has it (after ``keep``), else computed here.
    """
    clip_state, adam, decay_state = opt_state
    if not isinstance(adam, AdamState):
        raise TypeError(f"fused_adamw: opt_state[1] is {type(adam).__name__}, not AdamState — an optimizer state "
                        "not built by make_optimizer")
    dt = jnp.dtype(s.moments_dtype)
    leaves, treedef = jax.tree.flatten(params)
    g_leaves = treedef.flatten_up_to(g_sum)
    keep_leaves = [True] * len(leaves) if keep is None else treedef.flatten_up_to(keep)
    mask_leaves = treedef.flatten_up_to(decay_mask(params)) if s.weight_decay else [False] * len(leaves)
    mu_leaves, nu_leaves = treedef.flatten_up_to(adam.mu), treedef.flatten_up_to(adam.nu)

    if grad_norm is None:  # Σ(g/n)² with the division inside each leaf's reduction (no scaled tree)
        grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g / n if n != 1 else g))
                                 for g, k in zip(g_leaves, keep_leaves) if k))
    count = adam.count + 1
    c1 = 1 - s.b1 ** count.astype(jnp.float32)
    c2 = 1 - s.b2 ** count.astype(jnp.float32)
    factor = jnp.float32(1.0)
    if s.grad_clip > 0:
        factor = jnp.where(grad_norm < s.grad_clip, factor, s.grad_clip / grad_norm)
    scale = factor / n if n != 1 else factor

    new_p, new_mu, new_nu = [], [], []
    for p, g, k, wd, m, v in zip(leaves, g_leaves, keep_leaves, mask_leaves, mu_leaves, nu_leaves):
        g = g.astype(jnp.float32) * scale if k else jnp.zeros(g.shape, jnp.float32)
        m = s.b1 * m.astype(jnp.float32) + (1 - s.b1) * g
        v = s.b2 * v.astype(jnp.float32) + (1 - s.b2) * jnp.square(g)
        u = (m / c1) / (jnp.sqrt(v / c2) + s.eps)
        if wd:
            u = u + s.weight_decay * p
        new_p.append(p - lr * u if k else p)
        new_mu.append(m.astype(dt))
        new_nu.append(v.astype(dt))
    unflat = functools.partial(jax.tree.unflatten, treedef)
    adam = AdamState(count, unflat(new_mu), unflat(new_nu))
    return unflat(new_p), (clip_state, adam, decay_state), grad_norm


def reference_adamw(g_sum: Any, opt_state: Any, params: Any, lr: jax.Array | float, s: OptimSettings, n: int = 1,
                    keep: Any = None) -> tuple[Any, Any, jax.Array]:
    """:func:`fused_adamw` as tree-at-a-time steps: the optax chain of :func:`make_optimizer` on the mean
    gradient, then ``p - lr·u`` — the train step's update before the fused pass (the tests' reference, and the
    "before" of ``bench/optimizer_memory.py``). Each ``tree.map`` is a full-size tree XLA may materialise."""
    grads = jax.tree.map(lambda g: g / n, g_sum)
    if keep is not None:
        grads = jax.tree.map(lambda g, k: g if k else jnp.zeros_like(g), grads, keep)
    grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
    direction, opt_state = make_optimizer(s).update(grads, opt_state, params)
    if keep is not None:
        direction = jax.tree.map(lambda u, k: u if k else jnp.zeros_like(u), direction, keep)
    return jax.tree.map(lambda p, u: p - lr * u, params, direction), opt_state, grad_norm
