"""Grouped (ragged) matmul for MoE experts: rows sorted by group, one weight matrix per group.

``lhs [M, k]`` rows are grouped contiguously by ``group_sizes [G]``; ``rhs [G, k, n]`` → ``[M, n]``. Rows past
``sum(group_sizes)`` are unspecified (callers mask them). On a GPU with tokamax installed the Mosaic-GPU kernel
runs (jax.lax.ragged_dot is ~7 TFLOP/s on H100, see ../shared/GPU.md); elsewhere ``jax.lax.ragged_dot``.
Both are differentiable.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsv3_jax.kernels._backend import tokamax

IMPLS = ("auto", "xla", "tokamax")


def grouped_matmul(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, impl: str = "auto") -> jax.Array:
    """[M, k] × [G, k, n] with contiguous row groups → [M, n] in lhs.dtype (f32 accumulation)."""
    if impl not in IMPLS:
        raise ValueError(f"grouped_matmul impl={impl!r}: expected one of {IMPLS}")
    rhs = rhs.astype(lhs.dtype)
    group_sizes = group_sizes.astype(jnp.int32)
    tk = tokamax() if impl in ("auto", "tokamax") else None
    if impl == "tokamax" and tk is None:
        raise RuntimeError("grouped_matmul impl='tokamax' needs a GPU and the tokamax package (pip install .[gpu])")
    if tk is not None:
        return tk.ragged_dot(lhs, rhs, group_sizes, preferred_element_type=lhs.dtype)
    out = jax.lax.ragged_dot(lhs, rhs, group_sizes, preferred_element_type=jnp.float32)
    return out.astype(lhs.dtype)
