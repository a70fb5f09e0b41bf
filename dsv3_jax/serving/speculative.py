"""Speculative decoding with the model's own MTP modules (REFERENCE §6).

One engine step for a row whose last committed token ``t_p`` (position p) is not yet in the main cache:

1. **Verify**: the main model runs over ``[t_p, d_1 .. d_K]`` at positions p .. p+K in one forward
   (K = number of MTP modules; V3 has K = 1), giving the target distributions P_0 .. P_K.
2. **Accept** (:func:`accept`): the standard speculative-sampling rule — accept d_j with probability
   min(1, P(d_j) / Q(d_j)), stop at the first rejection and draw the next token from norm(max(0, P - Q)),
   or from P_K when every draft was accepted. The output is distributed exactly as plain sampling from P.
   Greedy rows have one-hot P and Q, so this is "accept while draft == argmax" and the output is
   token-for-token the greedy output without speculation.
3. **Draft** (:func:`draft`): MTP module k at position i reads h^{k-1}_i and the embedding of t_{i+k} and
   predicts t_{i+k+1}. Running module 1 .. K over the same window positions, with the accepted tokens, the
   new token and the drafts made so far as inputs, both rewrites each module's latent cache for the
   accepted positions (slots past them hold stale values that are overwritten before any query reaches
   them: attention only looks at slots ≤ the query's position) and yields the next drafts d'_1 .. d'_K at
   the last accepted position.

Prefill uses the same :func:`draft` over the prompt, so a row's MTP caches always match its tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsv3_jax.attention import LatentCache
from dsv3_jax.config import ModelConfig
from dsv3_jax.model import head_logits, mtp_step
from dsv3_jax.serving.sampling import row_keys, sample, token_probs

# PRNG streams (see sampling.row_keys): the token draw, the acceptance test, the drafts (DRAFT + k).
SAMPLE, ACCEPT, DRAFT = 0, 1, 16


def accept(p: jax.Array, q: jax.Array, drafts: jax.Array, u: jax.Array, keys: jax.Array
           ) -> tuple[jax.Array, jax.Array]:
    """Speculative acceptance.

    p [B, K+1, V] target probs at the window positions, q [B, K, V] draft probs, drafts [B, K] int32,
    u [B, K] uniform [0, 1), keys [B] for the final draw → (accepted count a [B] in 0..K, next token [B]).
    """
    K = drafts.shape[1]
    pd = jnp.take_along_axis(p[:, :K], drafts[..., None], axis=-1)[..., 0]
    qd = jnp.take_along_axis(q, drafts[..., None], axis=-1)[..., 0]
    ok = u * qd < pd  # accept with probability min(1, pd / qd)
    a = jnp.cumprod(ok.astype(jnp.int32), axis=1).sum(axis=1)
    p_a = jnp.take_along_axis(p, a[:, None, None], axis=1)[:, 0]
    q_a = jnp.take_along_axis(jnp.concatenate([q, jnp.zeros_like(q[:, :1])], axis=1), a[:, None, None], axis=1)[:, 0]
    r = jnp.maximum(p_a - q_a, 0.0)
    mass = r.sum(-1, keepdims=True)
    r = jnp.where(mass > 0, r / jnp.where(mass > 0, mass, 1.0), p_a)
    return a, sample(r, keys)


def draft(cfg: ModelConfig, variables: dict, hidden: jax.Array, ext: jax.Array, positions: jax.Array,
          idx: jax.Array, cache: LatentCache, sampling: tuple[jax.Array, ...], seeds: jax.Array,
          counters: jax.Array, absorbed: bool) -> tuple[jax.Array, jax.Array, LatentCache]:
    """Run the K MTP modules over a window and draft the next K tokens.

    hidden [B, T, d] main model's final normed hidden states at positions [B, T]; ext [B, T+K+1] int32 the
    row's tokens from the window's first position on (ext[:, j] = token at positions[:, 0] + j), valid up
    to index idx+1 (idx [B]: window index of the last accepted position; ext[idx+1] = the new token);
    cache [K, B, S, ·] the modules' latent caches; sampling = (temperature, top_k, top_p) [B] each;
    counters [B] the index of the new token. → (drafts [B, K], draft probs [B, K, V], cache).
    """
    B, T = positions.shape
    K = cfg.num_nextn_predict_layers
    rows = jnp.arange(B)
    h, drafts, probs, caches = hidden, [], [], []
    for k in range(1, K + 1):
        nxt = jax.lax.dynamic_slice_in_dim(ext, k, T, axis=1)  # t_{i+k} for each window position i
        layer = jax.tree.map(lambda a, k=k: a[k - 1], cache)
        h, h_normed, layer = mtp_step(cfg, variables, k, h, nxt, positions, layer, absorbed)
        at = jnp.take_along_axis(h_normed, idx[:, None, None], axis=1)  # [B, 1, d]
        q = token_probs(head_logits(cfg, variables, at)[:, 0], *sampling)
        d = sample(q, row_keys(seeds, counters, DRAFT + k))
        ext = ext.at[rows, idx + 1 + k].set(d)
        drafts.append(d)
        probs.append(q)
        caches.append(layer)
    cache = jax.tree.map(lambda *a: jnp.stack(a), *caches)
    return jnp.stack(drafts, axis=1), jnp.stack(probs, axis=1), cache
