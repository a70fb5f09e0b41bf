"""Multi-head Latent Attention (REFERENCE §4).

Two paths that give the same outputs:
- naive (training, prefill): up-project the latent to per-head keys/values and attend;
- absorbed (decode): fold ``kv_b_proj`` into the query and the output, attend directly over the latent
  cache of ``kv_lora_rank + qk_rope_head_dim`` values per token per layer.

Shapes: B batch, T query tokens, S cached tokens, H heads, n = qk_nope, r = qk_rope, v = v_head, c = kv_lora.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsv3_jax import rope, tokens
from dsv3_jax.config import ModelConfig
from dsv3_jax.kernels import causal_attention
from dsv3_jax.kernels._backend import on_gpu
from dsv3_jax.kernels.mla_decode import latent_decode_attention
from dsv3_jax.layers import Linear, RMSNorm, dtype_of, linear_args, logical


class LatentCache(NamedTuple):
    """Per-layer decode cache: normalised latent c_kv [B, S, c] and roped shared key k_rope [B, S, r]; for V3.2
    (DSA) also the lightning indexer's roped key k_index [B, S, d_I] (None otherwise).

    Slot s holds the token at position s. ``init`` makes an empty cache for a max length.
    """

    c_kv: jax.Array
    k_rope: jax.Array
    k_index: jax.Array | None = None

    @staticmethod
    def init(cfg: ModelConfig, batch: int, max_len: int, dtype: str | None = None) -> LatentCache:
        dt = dtype_of(dtype or cfg.dtype)
        k_index = jnp.zeros((batch, max_len, cfg.index_head_dim), dt) if cfg.uses_dsa else None
        return LatentCache(jnp.zeros((batch, max_len, cfg.kv_lora_rank), dt),
                           jnp.zeros((batch, max_len, cfg.qk_rope_head_dim), dt), k_index)


class StackSlot(NamedTuple):
    """Layer ``layer`` (int32 scalar) of a stacked cache ``stack`` (LatentCache with leaves [L, B, S, ·]).

    The scanned layer stack carries the whole cache and each layer writes its new entries in place
    (:func:`write_stacked`), so a decode step moves only the new tokens' latents, never a copy of the cache.
    """

    stack: LatentCache
    layer: jax.Array


NEG_INF = -1e30  # finite "minus infinity": keeps fully-masked rows NaN-free


def causal_mask(q_pos: jax.Array, k_pos: jax.Array) -> jax.Array:
    """[B, T, S] bool: key position ≤ query position."""
    return k_pos[:, None, :] <= q_pos[:, :, None]


def _softmax(scores: jax.Array, mask: jax.Array) -> jax.Array:
    """Masked softmax over the last axis in float32. scores [B, H, T, S], mask [B, T, S]."""
    scores = jnp.where(mask[:, None], scores, NEG_INF)
    return jax.nn.softmax(scores, axis=-1)


def naive_attention(q_nope, q_rope, k_nope, k_rope, v, mask, scale, dtype):
    """Standard attention with the shared rope key.

    q_nope [B,T,H,n], q_rope [B,T,H,r], k_nope [B,S,H,n], k_rope [B,S,r], v [B,S,H,v], mask [B,T,S]
    → [B,T,H,v].
    """
    scores = (jnp.einsum("bthn,bshn->bhts", q_nope, k_nope, preferred_element_type=jnp.float32)
              + jnp.einsum("bthr,bsr->bhts", q_rope, k_rope, preferred_element_type=jnp.float32))
    probs = _softmax(scores * scale, mask).astype(dtype)
    return jnp.einsum("bhts,bshv->bthv", probs, v, preferred_element_type=jnp.float32).astype(dtype)


def latent_attention(q_lat, q_rope, c_kv, k_rope, mask, scale, dtype):
    """The absorbed path's attention in latent space, as XLA einsums.

    q_lat [B,T,H,c] (w_uk absorbed), q_rope [B,T,H,r], c_kv [B,S,c], k_rope [B,S,r], mask [B,T,S] → o_lat [B,T,H,c].
    """
    scores = (jnp.einsum("bthc,bsc->bhts", q_lat.astype(dtype), c_kv, preferred_element_type=jnp.float32)
              + jnp.einsum("bthr,bsr->bhts", q_rope, k_rope, preferred_element_type=jnp.float32))
    probs = _softmax(scores * scale, mask).astype(dtype)
    return jnp.einsum("bhts,bsc->bthc", probs, c_kv, preferred_element_type=jnp.float32).astype(dtype)


def absorbed_attention(q_nope, q_rope, c_kv, k_rope, w_uk, w_uv, mask, scale, dtype, positions=None, impl="xla"):
    """Attention over the latent cache with kv_b_proj absorbed (REFERENCE §4).

    q_nope [B,T,H,n], q_rope [B,T,H,r], c_kv [B,S,c], k_rope [B,S,r], w_uk [c,H,n], w_uv [c,H,v] → [B,T,H,v].
    ``impl`` (ModelConfig.mla_decode_impl): "xla" runs :func:`latent_attention` with ``mask``; "pallas" the fused
    flash-decoding kernel (:mod:`dsv3_jax.kernels.mla_decode`; interpret mode off the GPU), which takes the
    causal-over-slots mask as ``positions`` [B,T] (slot s visible to query t iff s ≤ positions[b, t]).
    """
    q_lat = jnp.einsum("bthn,chn->bthc", q_nope, w_uk.astype(dtype), preferred_element_type=jnp.float32)
    if impl == "xla":
        o_lat = latent_attention(q_lat, q_rope, c_kv, k_rope, mask, scale, dtype)
    elif impl == "pallas":
        if positions is None:
            raise ValueError("mla_decode_impl='pallas' needs the query positions")
        o_lat = latent_decode_attention(q_lat.astype(dtype), q_rope.astype(dtype), c_kv, k_rope, positions, scale,
                                        interpret=not on_gpu())
    else:
        raise ValueError(f"mla_decode_impl={impl!r}: expected 'xla' or 'pallas'")
    return jnp.einsum("bthc,chv->bthv", o_lat, w_uv.astype(dtype), preferred_element_type=jnp.float32).astype(dtype)


def _entries(cache: LatentCache, new: LatentCache) -> LatentCache:
    if (cache.k_index is None) != (new.k_index is None):
        raise ValueError("the cache and the new entries disagree on the indexer key (k_index): a V3.2 (DSA) model "
                         "needs a cache from LatentCache.init/init_cache of its own config")
    return new


def write_cache(cache: LatentCache, c_kv: jax.Array, k_rope: jax.Array, positions: jax.Array,
                k_index: jax.Array | None = None) -> LatentCache:
    """Store new entries [B, T, ·] at slots positions[:, 0] .. +T-1 (contiguous per sequence)."""
    start = positions[:, 0]

    def put(buf, new):
        return jax.vmap(lambda b, n, s: jax.lax.dynamic_update_slice_in_dim(b, n.astype(b.dtype), s, axis=0))(
            buf, new, start)

    return jax.tree.map(put, cache, _entries(cache, LatentCache(c_kv, k_rope, k_index)))


def write_stacked(slot: StackSlot, c_kv: jax.Array, k_rope: jax.Array, positions: jax.Array,
                  k_index: jax.Array | None = None) -> tuple[StackSlot, LatentCache]:
    """Scatter new entries [B, T, ·] into layer ``slot.layer`` at slots positions[:, 0] .. +T-1 of each row
    (slots past the cache are dropped) → (updated slot, that layer's cache [B, S, ·])."""
    B, T = c_kv.shape[:2]
    rows = jnp.broadcast_to(jnp.arange(B)[:, None], (B, T))
    cols = positions[:, :1] + jnp.arange(T)[None]

    def put(buf, new):
        return buf.at[slot.layer, rows, cols].set(new.astype(buf.dtype), mode="drop")

    stack = jax.tree.map(put, slot.stack, _entries(slot.stack, LatentCache(c_kv, k_rope, k_index)))
    return StackSlot(stack, slot.layer), jax.tree.map(lambda a: a[slot.layer], stack)


class MLAInputs(NamedTuple):
    """MLA's projections of x [B, T, d] before attention (REFERENCE §4); RoPE already applied.

    cq [B, T, q_lora] the normalised query latent (None without q_lora_rank), q_nope [B, T, H, n],
    q_rope [B, T, H, r], c_kv [B, T, c] (normalised), k_rope [B, T, r], cos/sin [B, T, r/2] (the RoPE tables,
    which the V3.2 indexer reuses).
    """

    cq: jax.Array | None
    q_nope: jax.Array
    q_rope: jax.Array
    c_kv: jax.Array
    k_rope: jax.Array
    cos: jax.Array
    sin: jax.Array


def mla_inputs(c: ModelConfig, x: jax.Array, positions: jax.Array) -> MLAInputs:
    """Declare and apply the query and key/value-latent projections inside the calling module (its names:
    q_a_proj, q_a_layernorm, q_b_proj or q_proj, kv_a_proj_with_mqa, kv_a_layernorm). x [B, T, d]."""
    H, n, r, cl = c.num_attention_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.kv_lora_rank
    lin = linear_args(c)
    norm = dict(eps=c.rms_norm_eps, dtype=c.dtype, param_dtype=c.param_dtype)

    # Query: low-rank + norm (or plain projection), split nope / rope.
    cq = None
    if c.q_lora_rank:
        cq = Linear((c.q_lora_rank,), ("embed", "q_lora"), name="q_a_proj", **lin)(x)
        cq = RMSNorm(axis_name="q_lora", name="q_a_layernorm", **norm)(cq)
        q = Linear((H, n + r), ("q_lora", "heads", "qk_head_dim"), name="q_b_proj", **lin)(cq)
    else:
        q = Linear((H, n + r), ("embed", "heads", "qk_head_dim"), name="q_proj", **lin)(x)
    q = logical(q, ("activation_batch", "activation_length", "activation_heads", None))
    q_nope, q_rope = q[..., :n], q[..., n:]

    # Key/value latent + the single shared rope key. The norm is on c_kv only (REFERENCE §12).
    kv_a = Linear((cl + r,), ("embed", "kv_lora"), name="kv_a_proj_with_mqa", **lin)(x)
    c_kv = RMSNorm(axis_name="kv_lora", name="kv_a_layernorm", **norm)(kv_a[..., :cl])
    k_rope = kv_a[..., cl:]

    cos, sin = rope.rope_tables(c, positions)
    q_rope = rope.apply_rope(q_rope, cos, sin, c.rope_interleave)
    k_rope = rope.apply_rope(k_rope, cos, sin, c.rope_interleave)
    return MLAInputs(cq, q_nope, q_rope, c_kv, k_rope, cos, sin)


def kv_b_proj(c: ModelConfig) -> Linear:
    """The latent up-projection [c] → [H, n + v] (keys' nope part and values), declared in the caller."""
    return Linear((c.num_attention_heads, c.qk_nope_head_dim + c.v_head_dim), ("kv_lora", "heads", "kv_head_dim"),
                  name="kv_b_proj", **linear_args(c))


def o_proj(c: ModelConfig, out: jax.Array) -> jax.Array:
    """Attention output [B, T, H, v] → [B, T, d] through ``o_proj``, declared in the caller."""
    out = logical(out, ("activation_batch", "activation_length", "activation_heads", None))
    return Linear((c.hidden_size,), ("heads", "kv_head_dim", "embed"), in_dims=2, name="o_proj",
                  **linear_args(c))(out)


def causal_naive(c: ModelConfig, q_nope, q_rope, c_kv, k_rope, kv_b: Linear, scale,
                 k_start: jax.Array | None = None) -> jax.Array:
    """Training / prefill from scratch: up-project the latent, causal attention by index (one fused kernel
    where available). q_nope [B,T,H,n], q_rope [B,T,H,r], c_kv [B,T,c], k_rope [B,T,r] → [B,T,H,v].
    ``k_start`` [B, T]: each query's first visible key (packed samples), None = 0."""
    n, r = c.qk_nope_head_dim, c.qk_rope_head_dim
    # Every query sees the whole sequence's keys: where the queries' positions are split (context parallelism),
    # the small latent is gathered and up-projected, not the H-times-wider keys and values.
    c_kv = logical(c_kv, ("activation_batch", "activation_kv_length", None))
    k_rope = logical(k_rope, ("activation_batch", "activation_kv_length", None))
    with tokens.whole_sequences():  # its rows are the gathered whole sequences (dsv3_jax/tokens.py)
        kv = kv_b(c_kv)  # [B, T, H, n + v]
    k = jnp.concatenate([kv[..., :n], jnp.broadcast_to(k_rope[:, :, None], (*kv.shape[:3], r))], -1)
    return causal_attention(jnp.concatenate([q_nope, q_rope], -1), k, kv[..., n:], scale, c.attention_impl,
                            k_start)


class MLA(nn.Module):
    """x [B, T, d], positions [B, T] → out [B, T, d] (and the updated cache when one is given).

    Without a cache: naive causal attention over the T tokens (training). With a cache: the new latents are
    written at their positions and the queries attend over the whole cache (keys at position ≤ query's);
    ``absorbed`` picks the latent-space math (decode) over the up-projected one.
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array, cache: LatentCache | StackSlot | None = None,
                 absorbed: bool = False) -> tuple[jax.Array, LatentCache | StackSlot | None]:
        c = self.cfg
        dt = dtype_of(c.dtype)
        n, cl = c.qk_nope_head_dim, c.kv_lora_rank
        _, q_nope, q_rope, c_kv, k_rope, _, _ = mla_inputs(c, x, positions)
        scale, _ = rope.attention_factors(c)

        kv_b = kv_b_proj(c)
        if cache is None:
            keys_latent, keys_rope, mask = c_kv, k_rope, None
        else:
            if isinstance(cache, StackSlot):
                cache, view = write_stacked(cache, c_kv, k_rope, positions)
            else:
                cache = view = write_cache(cache, c_kv, k_rope, positions)
            keys_latent, keys_rope = view.c_kv.astype(dt), view.k_rope.astype(dt)
            slots = jnp.broadcast_to(jnp.arange(keys_latent.shape[1]), keys_latent.shape[:2])
            mask = causal_mask(positions, slots)

        if absorbed:
            if cache is None:
                raise ValueError("the absorbed MLA path attends over a latent cache: pass cache=LatentCache(...)")
            w = kv_b(None, in_shape=(cl,))  # [c, H, n + v]
            out = absorbed_attention(q_nope, q_rope, keys_latent, keys_rope, w[..., :n], w[..., n:],
                                     mask, scale, dt, positions, c.mla_decode_impl)
        elif cache is None:
            # Packed samples: positions restart per sample, so query t's sample starts at index t - positions[t].
            k_start = None
            if c.packed_samples:
                k_start = jnp.arange(positions.shape[1], dtype=positions.dtype)[None] - positions
            out = causal_naive(c, q_nope, q_rope, keys_latent, keys_rope, kv_b, scale, k_start)
        else:
            kv = kv_b(keys_latent)  # [B, S, H, n + v]
            out = naive_attention(q_nope, q_rope, kv[..., :n], keys_rope, kv[..., n:], mask, scale, dt)
        return o_proj(c, out), cache
