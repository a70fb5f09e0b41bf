"""Causal attention for MLA training/prefill: q/k head dim 192 ≠ v head dim 128.

On a GPU with tokamax the Mosaic-GPU flash kernel runs natively on the unequal head dims (GPU.md: ~469 TFLOP/s
fwd on H100 vs 57 for plain XLA); elsewhere the XLA path (f32 softmax) that the tests compare against.

Packed samples (SFT): ``k_start [B, T]`` is the first key each query may see (its sample's start), so a query
attends to keys in [k_start, t] — the flash kernel takes it as a per-query key range (no dense [T, T] mask).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsv3_jax.kernels._backend import tokamax

IMPLS = ("auto", "xla", "tokamax")
NEG_INF = -1e30


def xla_causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float,
                         k_start: jax.Array | None = None) -> jax.Array:
    """q [B,T,H,D], k [B,T,H,D], v [B,T,H,Dv] → [B,T,H,Dv]; causal by index (and keys ≥ k_start [B,T] per
    query when given); softmax in float32."""
    T = q.shape[1]
    s = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=jnp.float32) * scale
    visible = jnp.tril(jnp.ones((T, T), bool))
    if k_start is not None:
        visible = visible & (jnp.arange(T)[None, None, :] >= k_start[:, :, None])[:, None]  # [B, 1, T, S]
    s = jnp.where(visible, s, NEG_INF)
    p = jax.nn.softmax(s, axis=-1).astype(q.dtype)
    return jnp.einsum("bhts,bshv->bthv", p, v, preferred_element_type=jnp.float32).astype(q.dtype)


def _tokamax_packed(q, k, v, scale, k_start):
    """The Mosaic flash kernel with a per-query key start (tokamax's Mask: causal ∧ key ≥ k_start)."""
    from tokamax._src.ops.attention import api, base  # the public wrapper takes no per-query key range

    mask = base.Mask(is_causal=True, k_start=k_start[:, None, :])  # [B, heads (broadcast), T]
    return api.IMPLEMENTATIONS["mosaic"](q, k, v, bias=None, mask=mask, logits_scale=scale, logits_soft_cap=None)


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float, impl: str = "auto",
                     k_start: jax.Array | None = None) -> jax.Array:
    """Causal self-attention over T tokens (no cache), within packed samples when ``k_start`` [B, T] is given.
    Shapes as :func:`xla_causal_attention`."""
    if impl not in IMPLS:
        raise ValueError(f"attention impl={impl!r}: expected one of {IMPLS}")
    tk = tokamax() if impl in ("auto", "tokamax") else None
    if impl == "tokamax" and tk is None:
        raise RuntimeError("attention impl='tokamax' needs a GPU and the tokamax package (pip install .[gpu])")
    if tk is not None and q.dtype in (jnp.bfloat16, jnp.float16):
        if k_start is not None:
            return _tokamax_packed(q, k, v, scale, k_start)
        return tk.dot_product_attention(q, k, v, scale=scale, is_causal=True, implementation="mosaic")
    return xla_causal_attention(q, k, v, scale, k_start)
