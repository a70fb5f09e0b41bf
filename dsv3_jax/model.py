"""DeepSeek-V3: embed → dense blocks → MoE blocks → norm → head, plus the MTP modules (REFERENCE §2, §6).

``Transformer(cfg).init(rng, tokens)`` gives ``{"params": ..., "router": ...}`` (router holds the MoE
selection biases, which are not trained by gradient). ``apply`` returns a :class:`ModelOutput`.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsv3_jax.attention import LatentCache
from dsv3_jax.block import BlockStack
from dsv3_jax.config import ModelConfig
from dsv3_jax.layers import Embed, Linear, RMSNorm, logical
from dsv3_jax.mtp import MTPModule, shift_tokens


class ModelOutput(NamedTuple):
    """logits [B, T, V] f32; mtp_logits [D, B, T, V] f32 (position i of depth k predicts t_{i+k+1}; the last
    k positions are padding) or None; expert_load [L_moe, E] and balance [L_moe] of the main MoE layers;
    mtp_expert_load [D, E], mtp_balance [D]; cache (dict of stacked LatentCache) or None; hidden [B, T, d]
    the final normed hidden state (the head input); moe_dropped [] routed copies dropped for expert-parallel
    capacity, all MoE layers (main + MTP) together (sharding/expert.py; 0 without expert parallelism);
    indexer_kl / topk_mass [L + D] (V3.2 only)."""

    logits: jax.Array
    mtp_logits: jax.Array | None
    expert_load: jax.Array
    balance: jax.Array
    mtp_expert_load: jax.Array
    mtp_balance: jax.Array
    cache: dict[str, LatentCache] | None
    hidden: jax.Array
    # V3.2 (DSA) only, per layer [L + D] (main layers, then the MTP blocks): the indexer's KL to the head-mean attention and the share of that
    # attention the top-k keys hold (dense warm-up; NaN in the sparse stage). None without an indexer.
    indexer_kl: jax.Array | None = None
    topk_mass: jax.Array | None = None
    moe_dropped: jax.Array | float = 0.0


def _stacked_cache(cfg: ModelConfig, n: int, batch: int, max_len: int, dtype: str | None) -> LatentCache:
    one = LatentCache.init(cfg, batch, max_len, dtype)
    return jax.tree.map(lambda a: jnp.broadcast_to(a, (n, *a.shape)), one)


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype: str | None = None) -> dict[str, LatentCache]:
    """Empty latent caches for the main layers: {'dense': [L_dense, B, S, ·], 'moe': [L_moe, B, S, ·]}."""
    return {name: _stacked_cache(cfg, n, batch, max_len, dtype)
            for name, n in (("dense", cfg.first_k_dense_replace), ("moe", cfg.num_moe_layers)) if n}


def init_mtp_cache(cfg: ModelConfig, batch: int, max_len: int, dtype: str | None = None) -> LatentCache:
    """Empty latent caches for the MTP modules' own blocks, stacked [D, B, S, ·] (module k at index k-1)."""
    return _stacked_cache(cfg, cfg.num_nextn_predict_layers, batch, max_len, dtype)


def lm_head(cfg: ModelConfig, name: str | None = "lm_head") -> Linear:
    """The untied output projection [d] → [V] float32 logits."""
    return Linear((cfg.vocab_size,), ("embed", "vocab"), name=name, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                  init_std=cfg.initializer_range, out_dtype="float32")


def tied_logits(h: jax.Array, embedding: jax.Array) -> jax.Array:
    """Tied head: h [..., d] · embedding [V, d]ᵀ → [..., V] float32."""
    return jnp.einsum("...d,vd->...v", h, embedding.astype(h.dtype), preferred_element_type=jnp.float32)


class Transformer(nn.Module):
    """tokens [B, T] int32 (positions [B, T], default 0..T-1) → :class:`ModelOutput`.

    With ``cache`` the new tokens' latents are written at their positions and attention runs over the cache
    (``absorbed=True``: latent-space decode math). ``mtp=False`` skips the MTP modules (serving).
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
                 cache: dict[str, LatentCache] | None = None, absorbed: bool = False,
                 mtp: bool = True) -> ModelOutput:
        c = self.cfg
        B, T = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        embed = Embed(c, name="embed")
        def lookup(t):  # the looked-up rows first whole-sequence ("activation_lookup_length"): a vocab-split table
            # is then read in place (each shard its rows, summed) instead of being gathered whole to every device
            e = logical(embed(t), ("activation_batch", "activation_lookup_length", "activation_embed"))
            return logical(e, ("activation_batch", "activation_length", "activation_embed"))

        x = lookup(tokens)

        new_cache: dict[str, LatentCache] = {}
        ikl, mass = [], []
        E = c.n_routed_experts
        load, balance = jnp.zeros((0, E), jnp.float32), jnp.zeros((0,), jnp.float32)
        dropped = jnp.zeros((), jnp.float32)
        for kind, n, moe in (("dense", c.first_k_dense_replace, False), ("moe", c.num_moe_layers, True)):
            if not n:
                continue
            layer_cache = None if cache is None else cache[kind]
            x, layer_cache, aux = BlockStack(c, n, moe, absorbed, name=f"{kind}_layers")(x, positions, layer_cache)
            if layer_cache is not None:
                new_cache[kind] = layer_cache
            if moe:
                load, balance, dropped = aux["load"], aux["balance"], aux["dropped"].sum()
            if "indexer_kl" in aux:  # V3.2 layers (a pipelined MoE stack returns only the MoE aux)
                ikl.append(aux["indexer_kl"])
                mass.append(aux["topk_mass"])

        h = RMSNorm(eps=c.rms_norm_eps, dtype=c.dtype, param_dtype=c.param_dtype, name="norm")(x)
        if c.tie_word_embeddings:
            def head(z):
                return tied_logits(z, embed.embedding)
        else:
            head = lm_head(c)
        # Logits name their own length axis: where the sequence is split (outside a pipeline's stack) the rules
        # split the vocab instead, so the head gathers h (d wide), not its [d, V] weight.
        logits_axes = ("activation_batch", "activation_logits_length", "activation_vocab")
        logits = logical(head(h), logits_axes)

        mtp_logits, mtp_load, mtp_bal = None, jnp.zeros((0, E), jnp.float32), jnp.zeros((0,), jnp.float32)
        if mtp and c.num_nextn_predict_layers:
            outs, loads, bals = [], [], []
            h_prev = h
            for k in range(1, c.num_nextn_predict_layers + 1):
                emb_next = lookup(shift_tokens(tokens, k))
                h_prev, h_normed, aux, _ = MTPModule(c, k, name=f"mtp_{k - 1}")(h_prev, emb_next, positions)
                outs.append(logical(head(h_normed), logits_axes))
                loads.append(aux.get("load", jnp.zeros((E,), jnp.float32)))
                bals.append(aux.get("balance", jnp.zeros((), jnp.float32)))
                dropped = dropped + aux.get("dropped", 0.0)
                if "indexer_kl" in aux:  # the MTP block's own indexer (V3.2)
                    ikl.append(aux["indexer_kl"][None])
                    mass.append(aux["topk_mass"][None])
            mtp_logits, mtp_load, mtp_bal = jnp.stack(outs), jnp.stack(loads), jnp.stack(bals)

        return ModelOutput(logits, mtp_logits, load, balance, mtp_load, mtp_bal,
                           new_cache if cache is not None else None, h,
                           jnp.concatenate(ikl) if ikl else None, jnp.concatenate(mass) if mass else None, dropped)


def init_variables(cfg: ModelConfig, rng: jax.Array, batch: int = 1, seq: int = 8) -> dict:
    """Fresh variables {'params', 'router'} as plain arrays (logical-axis boxes removed)."""
    tokens = jnp.zeros((batch, seq), jnp.int32)
    return nn.meta.unbox(Transformer(cfg).init(rng, tokens))


# ----------------------------------------------------------------------------------------------------------
# Pieces of the model applied on their own (serving: speculative drafts with the MTP modules)
# ----------------------------------------------------------------------------------------------------------


def head_logits(cfg: ModelConfig, variables: dict, h: jax.Array) -> jax.Array:
    """The shared output head on normed hidden states h [..., d] → logits [..., V] float32."""
    p = variables["params"]
    if cfg.tie_word_embeddings:
        return tied_logits(h, p["embed"]["embedding"])
    return lm_head(cfg, name=None).apply({"params": p["lm_head"]}, h)


def mtp_step(cfg: ModelConfig, variables: dict, depth: int, h_prev: jax.Array, next_tokens: jax.Array,
             positions: jax.Array, cache: LatentCache, absorbed: bool = False
             ) -> tuple[jax.Array, jax.Array, LatentCache]:
    """MTP module ``depth`` (1-based) over a window, attending over its own latent cache (REFERENCE §6).

    h_prev [B, T, d] is h^{depth-1} at the window's positions (depth 1: the main model's final normed hidden
    state), next_tokens [B, T] holds t_{i+depth} for each position i, positions [B, T], cache [B, S, ·].
    Returns (h^{depth} [B, T, d], its head-normed form [B, T, d] for :func:`head_logits`, updated cache).
    The same parameters as ``Transformer``'s MTP path (``mtp_{depth-1}``, shared embedding and head).
    """
    name = f"mtp_{depth - 1}"
    sub = {col: tree[name] for col, tree in variables.items() if name in tree}
    emb = Embed(cfg).apply({"params": variables["params"]["embed"]}, next_tokens)
    h, h_normed, _, cache = MTPModule(cfg, depth).apply(sub, h_prev, emb, positions, cache, absorbed)
    return h, h_normed, cache
