"""Training losses: next-token CE, MTP CE, sequence-wise balance loss (REFERENCE §5, §6), V3.2 indexer KL (§11).

``L = L_main + (λ/D) Σ_k L_MTP^k + α (Σ_layers balance + Σ_k mtp_balance) + s_I Σ_layers KL_I``, all float32.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from dsv3_jax.model import ModelOutput


class Losses(NamedTuple):
    """Scalars: total (what is differentiated), ce (main next-token), mtp (Σ_k L_MTP^k / D, before λ),
    balance (α-weighted, main + MTP layers), indexer_kl (V3.2: Σ over layers of the indexer's KL, before its
    scale; 0 without an indexer)."""

    total: jax.Array
    ce: jax.Array
    mtp: jax.Array
    balance: jax.Array
    indexer_kl: jax.Array


@jax.custom_vjp
def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """``logsumexp(logits) - logits[target]`` per position: logits [..., V] float32, targets [...] int32 → [...].

    The gradient is ``(softmax(logits) - onehot(target))·g``, written as one elementwise expression of the logits
    (the one-hot as an iota compare). Autodiff of the gather would transpose it into a scatter into a zero
    [..., V] tree, which XLA cannot fuse with the softmax or with the cast to the head's compute dtype: an extra
    f32 pass over the logits (4 GB at the bench config)."""
    return _nll_fwd(logits, targets)[0]


def _nll_fwd(logits, targets):
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return lse - picked, (logits, lse, targets)


def _nll_bwd(res, g):
    logits, lse, targets = res
    hit = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1) == targets[..., None]
    return (jnp.exp(logits - lse[..., None]) - hit.astype(logits.dtype)) * g[..., None], None


token_nll.defvjp(_nll_fwd, _nll_bwd)


def cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Mean CE over valid positions. logits [..., V] (float32), targets [...] int, mask [...] bool or None."""
    nll = token_nll(logits.astype(jnp.float32), targets.astype(jnp.int32))
    if mask is None:
        return nll.mean()
    mask = mask.astype(jnp.float32)
    return (nll * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def mtp_targets(tokens: jax.Array, depth: int) -> tuple[jax.Array, jax.Array]:
    """Targets and validity for MTP depth k from tokens [B, T+1] (the model saw tokens[:, :T]).

    Position i of depth k predicts t_{i+k+1}. It is valid when the module's input token t_{i+k} was in the
    model input (i + k ≤ T-1) — then the target t_{i+k+1} ≤ t_T exists too. Returns (targets [B, T] with
    zeros past the end, mask [B, T] bool: the first T-k positions).
    """
    B, T1 = tokens.shape
    T = T1 - 1
    tgt = jnp.pad(tokens[:, depth + 1:], ((0, 0), (0, depth)))
    mask = jnp.broadcast_to(jnp.arange(T) < T - depth, (B, T))
    return tgt, mask


def target_mask(loss_mask: jax.Array, segment_ids: jax.Array, depth: int) -> jax.Array:
    """Packed chat rows (SFT): position i trains its depth-``depth`` target t_{i+depth+1} (depth 0: the main
    head's t_{i+1}) only when that token is an assistant token (``loss_mask``) of i's own sample. loss_mask,
    segment_ids [B, T+1] → [B, T] bool (the last ``depth`` positions False)."""
    T = loss_mask.shape[1] - 1
    tgt_mask = jnp.pad(loss_mask[:, depth + 1:], ((0, 0), (0, depth))) > 0
    same = jnp.pad(segment_ids[:, depth + 1:], ((0, 0), (0, depth)), constant_values=-1) == segment_ids[:, :T]
    return tgt_mask & same


def compute_losses(out: ModelOutput, tokens: jax.Array, mtp_lambda: jax.Array | float,
                   balance_alpha: float, loss_mask: jax.Array | None = None,
                   segment_ids: jax.Array | None = None, indexer_loss_scale: float = 1.0) -> Losses:
    """Losses of one (micro-)batch. tokens [B, T+1]; ``out`` is the model applied to tokens[:, :T].

    Balance: TR §2.1.2 gives each MoE layer its own sequence-wise loss ``α Σ_i f_i P_i``; the total loss adds
    them, so we SUM over layers (and over the MTP modules' MoE layers) rather than average: every layer's gate
    then gets gradient α·∂(its own term), independent of depth — which is what "α per layer" means. A mean would
    silently scale α by 1/L_moe (58× smaller for V3).

    Packed chat rows (``loss_mask`` and ``segment_ids`` [B, T+1]): CE only on assistant targets of the same
    sample (:func:`target_mask`). The balance loss stays per row (α is tiny; it balances the row's tokens).
    """
    packed = loss_mask is not None
    if packed and segment_ids is None:
        raise ValueError("compute_losses: loss_mask needs segment_ids (packed samples)")
    ce = cross_entropy(out.logits, tokens[:, 1:], target_mask(loss_mask, segment_ids, 0) if packed else None)
    if out.mtp_logits is not None and out.mtp_logits.shape[0] > 0:
        D = out.mtp_logits.shape[0]
        per_depth = []
        for k in range(1, D + 1):
            tgt, mask = mtp_targets(tokens, k)
            if packed:
                mask = mask & target_mask(loss_mask, segment_ids, k)
            per_depth.append(cross_entropy(out.mtp_logits[k - 1], tgt, mask))
        mtp = jnp.stack(per_depth).mean()  # (1/D) Σ_k L_MTP^k
    else:
        mtp = jnp.zeros((), jnp.float32)
    balance = balance_alpha * (out.balance.sum() + out.mtp_balance.sum())
    total = ce + mtp_lambda * mtp + balance
    # V3.2: each layer's indexer learns from its own KL (summed, like the balance terms); its inputs are detached
    # and the attention target carries no gradient, so this term moves the indexer parameters only.
    ikl = jnp.zeros((), jnp.float32) if out.indexer_kl is None else out.indexer_kl.sum()
    return Losses(total + indexer_loss_scale * ikl, ce, mtp, balance, ikl)
