"""Causal attention for MLA training/prefill: q/k head dim 192 ≠ v head dim 128.

On a GPU with tokamax the Mosaic-GPU flash kernel runs natively on the unequal head dims (GPU.md: ~469 TFLOP/s
fwd on H100 vs 57 for plain XLA); elsewhere the XLA path (f32 softmax) that the tests compare against.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsv3_jax.kernels._backend import tokamax

IMPLS = ("auto", "xla", "tokamax")
NEG_INF = -1e30


def xla_causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float) -> jax.Array:
    """q [B,T,H,D], k [B,T,H,D], v [B,T,H,Dv] → [B,T,H,Dv]; causal by index; softmax in float32."""
    T = q.shape[1]
    s = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=jnp.float32) * scale
    s = jnp.where(jnp.tril(jnp.ones((T, T), bool)), s, NEG_INF)
    p = jax.nn.softmax(s, axis=-1).astype(q.dtype)
    return jnp.einsum("bhts,bshv->bthv", p, v, preferred_element_type=jnp.float32).astype(q.dtype)


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float, impl: str = "auto") -> jax.Array:
    """Causal self-attention over T tokens (no cache). Shapes as :func:`xla_causal_attention`."""
    if impl not in IMPLS:
        raise ValueError(f"attention impl={impl!r}: expected one of {IMPLS}")
    tk = tokamax() if impl in ("auto", "tokamax") else None
    if impl == "tokamax" and tk is None:
        raise RuntimeError("attention impl='tokamax' needs a GPU and the tokamax package (pip install .[gpu])")
    if tk is not None and q.dtype in (jnp.bfloat16, jnp.float16):
        return tk.dot_product_attention(q, k, v, scale=scale, is_causal=True, implementation="mosaic")
    return xla_causal_attention(q, k, v, scale)
