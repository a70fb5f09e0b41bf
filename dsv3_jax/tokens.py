"""Flattening [B, T, ...] activations into token rows [N, ...] for per-token work (MoE routing and dispatch, the
FP8 GEMMs), in an order a parallel strategy may choose.

One device: row b·T + t (a reshape). Under a mesh that splits both the batch and the sequence (sharding/rules.py:
outside the pipelined stack the sequence is split over ``pipeline``), a device's tokens are not one run of those
rows when it holds more than one sequence, so XLA cannot keep the reshape local (it replicates, "involuntary full
rematerialization"). sharding/partition.py then installs a layout that orders rows sequence-chunk first
([B, P, T/P] → [P, B, T/P] → rows): every device's tokens are one contiguous block again. Any order is the
same math for per-token work; :func:`unflatten` puts the rows back.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable

import jax

# (flatten(x [B, T, ...]) → [N, ...], unflatten(y [N, ...], B, T) → [B, T, ...]) or None for a plain reshape.
_LAYOUT: contextvars.ContextVar[tuple[Callable, Callable] | None] = contextvars.ContextVar("token_layout",
                                                                                          default=None)


_WHOLE: contextvars.ContextVar[bool] = contextvars.ContextVar("whole_sequences", default=False)


@contextlib.contextmanager
def whole_sequences():
    """Within: the [B, T] activations being flattened hold whole sequences on each device (attention's gathered
    keys and values), so their rows are a plain reshape whatever the layout (and split over the batch axes only)."""
    token = _WHOLE.set(True)
    try:
        yield
    finally:
        _WHOLE.reset(token)


def in_whole_sequences() -> bool:
    return _WHOLE.get()


@contextlib.contextmanager
def layout_override(flatten: Callable, unflatten: Callable):
    """While active, :func:`flatten` / :func:`unflatten` use these (a parallel strategy's row order)."""
    token = _LAYOUT.set((flatten, unflatten))
    try:
        yield
    finally:
        _LAYOUT.reset(token)


def flatten(x: jax.Array) -> jax.Array:
    """x [B, T, ...] → token rows [B·T, ...] (the order is the installed layout's; a reshape by default)."""
    layout = None if _WHOLE.get() else _LAYOUT.get()
    return layout[0](x) if layout is not None else x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def unflatten(y: jax.Array, B: int, T: int) -> jax.Array:
    """Inverse of :func:`flatten`: rows [B·T, ...] → [B, T, ...]."""
    layout = None if _WHOLE.get() else _LAYOUT.get()
    return layout[1](y, B, T) if layout is not None else y.reshape(B, T, *y.shape[1:])
