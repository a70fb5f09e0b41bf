"""Grouped (ragged) matmul for MoE experts: rows sorted by group, one weight matrix per group.

``lhs [M, k]`` rows are grouped contiguously by ``group_sizes [G]`` (sum ≤ M; rows past the sum are zero);
``rhs [G, k, n]`` → ``[M, n]``. The portable path is ``jax.lax.ragged_dot`` (differentiable; fine on CPU).
GPU kernels plug in here (see the GPU-performance issue); callers never branch on the backend.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def grouped_matmul(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, impl: str = "auto") -> jax.Array:
    """[M, k] × [G, k, n] with contiguous row groups → [M, n] in lhs.dtype (f32 accumulation)."""
    if impl not in ("auto", "ragged"):
        raise ValueError(f"grouped_matmul impl={impl!r}: expected 'auto' or 'ragged'")
    out = jax.lax.ragged_dot(lhs, rhs.astype(lhs.dtype), group_sizes.astype(jnp.int32),
                             preferred_element_type=jnp.float32)
    return out.astype(lhs.dtype)
