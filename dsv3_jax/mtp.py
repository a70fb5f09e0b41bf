"""Multi-Token Prediction modules (REFERENCE §6).

Module k (1..D) at position i combines the embedding of token t_{i+k} with the previous depth's hidden state
h^{k-1}_i (h^0 = the main model's final, normed hidden state), runs one full block with its own causal
attention, and predicts t_{i+k+1} through its own norm and the shared head. Sequences keep length T: the
last k positions have no input token and are padded; causal attention keeps the valid positions exact.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsv3_jax.attention import LatentCache
from dsv3_jax.block import Block
from dsv3_jax.config import ModelConfig
from dsv3_jax.layers import Linear, RMSNorm, linear_args


def shift_tokens(tokens: jax.Array, k: int, pad_id: int = 0) -> jax.Array:
    """tokens [B, T] → [B, T] with position i holding t_{i+k} (last k positions = pad_id)."""
    T = tokens.shape[1]
    return jnp.pad(tokens, ((0, 0), (0, k)), constant_values=pad_id)[:, k: k + T]


class MTPModule(nn.Module):
    """(h_prev [B, T, d], emb_next [B, T, d], positions [B, T]) → (h [B, T, d], normed h for the head, aux, cache).

    With ``cache`` (this module's own LatentCache [B, S, ·]) the block attends over it like a main-model layer
    (serving: speculative drafts); ``absorbed`` picks the latent-space decode math.
    """

    cfg: ModelConfig
    depth: int  # k, 1-based

    @nn.compact
    def __call__(self, h_prev: jax.Array, emb_next: jax.Array, positions: jax.Array,
                 cache: LatentCache | None = None, absorbed: bool = False
                 ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array], LatentCache | None]:
        c = self.cfg
        norm = dict(eps=c.rms_norm_eps, dtype=c.dtype, param_dtype=c.param_dtype)
        e = RMSNorm(name="enorm", **norm)(emb_next)
        h = RMSNorm(name="hnorm", **norm)(h_prev)
        # Embedding first, hidden second — the checkpoint's order (REFERENCE §6).
        x = Linear((c.hidden_size,), (None, "embed"), name="eh_proj", **linear_args(c))(
            jnp.concatenate([e, h], axis=-1))
        moe = c.num_hidden_layers + self.depth - 1 >= c.first_k_dense_replace
        x, cache, aux = Block(c, moe=moe, absorbed=absorbed, name="block")(x, positions, cache)
        return x, RMSNorm(name="head_norm", **norm)(x), aux, cache
