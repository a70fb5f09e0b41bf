"""DeepSeek-V3.2 sparse attention (DSA): the lightning indexer and top-k sparse MLA (REFERENCE §11).

Per layer, the indexer scores every causal key s for every query t,

    I(t, s) = Σ_j w_{t,j} · ReLU(q_{t,j} · k_s) · d_I^-0.5,   w = weights_proj(x) · n_I^-0.5,

with ``q = wq_b(cq)`` [n_I, d_I] from MLA's normalised query latent, ``k = LayerNorm(wk(x))`` [d_I] (one key
per token, LayerNorm with weight and bias) and RoPE on the first ``qk_rope_head_dim`` dims of both. Each query
keeps its top ``index_topk`` causal keys and MLA attends only to those.

RoPE convention: the indexer rotates **half-split** pairs (x[i], x[i + r/2]) as HF transformers' ``deepseek_v32``
does (the parity reference), while MLA keeps the checkpoint's interleaved pairs; the first V3.2-Exp inference
code rotated interleaved pairs in the indexer too. The official code's Hadamard rotation of q and k is
orthogonal (dot products unchanged) and only matters with FP8 indexer scoring, so this BF16/FP32 path skips it.

Sparse attention is actually sparse: :func:`sparse_latent_attention` gathers each query's k selected latent rows
(c_kv, k_rope) and attends in latent space (kv_b_proj absorbed), O(T·k) instead of O(T²) — on a GPU in the
gathered flash kernel (:mod:`dsv3_jax.kernels.dsa_attention`), else a block of queries at a time in XLA. The
backward recomputes each query block (``jax.checkpoint``), so training memory is O(T·k) too: no gathered rows, no
[T, S] scores kept. The indexer's top-k scores a block of queries against every key at a time (on a GPU in the
fused kernel of :mod:`dsv3_jax.kernels.dsa_index`). :func:`masked_dense_attention` is the O(T²) reference the
sparse attention is tested against.

Shapes: B batch, T queries, S keys, H MLA heads, J = n_I indexer heads, D = d_I, k = selected keys per query,
c = kv_lora, r = qk_rope, n = qk_nope, v = v_head.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsv3_jax import rope
from dsv3_jax.attention import (
    NEG_INF,
    LatentCache,
    StackSlot,
    causal_mask,
    causal_naive,
    kv_b_proj,
    mla_inputs,
    naive_attention,
    o_proj,
    write_cache,
    write_stacked,
)
from dsv3_jax.config import ModelConfig
from dsv3_jax.kernels._backend import on_gpu
from dsv3_jax.kernels.dsa_attention import pallas_fits, sparse_latent_attention_fwd
from dsv3_jax.kernels.dsa_index import index_scores_kernel
from dsv3_jax.layers import Linear, dtype_of, linear_args


class LayerNorm(nn.Module):
    """``(x - mean) · rsqrt(var + eps) · w + b`` over the last axis in float32 (the indexer's ``k_norm``)."""

    eps: float = 1e-6
    param_dtype: str = "float32"
    axis_name: str = "index_head_dim"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        w = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)), (d,),
                       dtype_of(self.param_dtype))
        b = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, (self.axis_name,)), (d,),
                       dtype_of(self.param_dtype))
        x32 = x.astype(jnp.float32)
        mu = jnp.mean(x32, -1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mu), -1, keepdims=True)
        return (x32 - mu) * jax.lax.rsqrt(var + self.eps) * w.astype(jnp.float32) + b.astype(jnp.float32)


class IndexerOut(NamedTuple):
    """q [B, T, J, D] f32, k [B, T, D] f32 (both roped), w [B, T, J] f32 head weights (n_I^-0.5 folded in)."""

    q: jax.Array
    k: jax.Array
    w: jax.Array


class Indexer(nn.Module):
    """The lightning indexer's projections: x [B, T, d], cq [B, T, q_lora], cos/sin [B, T, r/2] → IndexerOut.

    Parameter names follow the checkpoint (``self_attn.indexer.{wq_b, wk, k_norm, weights_proj}``).
    ``weights_proj`` stays in float32 (HF keeps it FP32; the official checkpoint stores it BF16, never FP8).
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array, cq: jax.Array, cos: jax.Array, sin: jax.Array) -> IndexerOut:
        c = self.cfg
        J, D, r = c.index_n_heads, c.index_head_dim, c.qk_rope_head_dim
        lin = linear_args(c)
        q = Linear((J, D), ("q_lora", "index_heads", "index_head_dim"), name="wq_b", **lin)(cq).astype(jnp.float32)
        k = Linear((D,), ("embed", "index_head_dim"), name="wk", **lin)(x)
        k = LayerNorm(param_dtype=c.param_dtype, name="k_norm")(k)
        # Half-split RoPE on the first r dims (HF deepseek_v32), the rest passes through.
        q = jnp.concatenate([rope.apply_rope(q[..., :r], cos, sin, interleave=False), q[..., r:]], -1)
        k = jnp.concatenate([rope.apply_rope(k[..., :r], cos, sin, interleave=False), k[..., r:]], -1)
        w = Linear((J,), ("embed", "index_heads"), name="weights_proj", dtype="float32", param_dtype=c.param_dtype,
                   init_std=c.initializer_range)(x.astype(jnp.float32))
        return IndexerOut(q, k, w * J ** -0.5)


def index_scores(ix: IndexerOut, keys: jax.Array | None = None) -> jax.Array:
    """I(t, s) [B, T, S] float32 = Σ_j w_{t,j} · ReLU(q_{t,j} · k_s) · D^-0.5 for keys [B, S, D] (default ix.k)."""
    keys = ix.k if keys is None else keys
    D = ix.q.shape[-1]
    s = jnp.einsum("btjd,bsd->btjs", ix.q, keys.astype(jnp.float32), preferred_element_type=jnp.float32)
    return jnp.einsum("btj,btjs->bts", ix.w, jax.nn.relu(s * D ** -0.5))


def select_topk(scores: jax.Array, mask: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """Each query's top-k causal keys: scores [B, T, S], mask [B, T, S] → (idx [B, T, k'] int32, valid [B, T, k']).

    k' = min(k, S). A query with fewer than k' visible keys gets filler indices with valid False. Selection is
    not differentiable (the indexer learns through its own loss, not through the choice).
    """
    k = min(k, scores.shape[-1])
    masked = jnp.where(mask, jax.lax.stop_gradient(scores), -jnp.inf)
    vals, idx = jax.lax.top_k(masked, k)
    return idx.astype(jnp.int32), vals > -jnp.inf


def selection_mask(idx: jax.Array, valid: jax.Array, S: int) -> jax.Array:
    """[B, T, S] bool: key s is among query t's valid selected keys (the masked-dense form of a selection)."""
    hit = jax.nn.one_hot(idx, S, dtype=jnp.bool_) & valid[..., None]  # [B, T, k, S]
    return jnp.any(hit, axis=2)


def masked_dense_attention(q_nope, q_rope, c_kv, k_rope, w_kv_b, mask, scale, dtype):
    """Reference: up-projected MLA over all S keys with mask [B, T, S] (causal ∧ selected). O(T·S).

    q_nope [B,T,H,n], q_rope [B,T,H,r], c_kv [B,S,c], k_rope [B,S,r], w_kv_b [c,H,n+v] → [B,T,H,v].
    """
    n = q_nope.shape[-1]
    kv = jnp.einsum("bsc,chk->bshk", c_kv, w_kv_b.astype(dtype), preferred_element_type=jnp.float32).astype(dtype)
    return naive_attention(q_nope, q_rope, kv[..., :n], k_rope, kv[..., n:], mask, scale, dtype)


def _sparse_block(q_lat, q_rope, c_kv, k_rope, idx, valid, scale, dtype):
    """One query block: q_lat [B,t,H,c], q_rope [B,t,H,r], c_kv [B,S,c], k_rope [B,S,r], idx/valid [B,t,k]
    → o_lat [B,t,H,c]. Gathers the k selected latent rows per query: [B, t, k, c + r]."""
    ck, kr = gather_keys(c_kv, idx), gather_keys(k_rope, idx)
    scores = (jnp.einsum("bthc,btkc->bhtk", q_lat, ck, preferred_element_type=jnp.float32)
              + jnp.einsum("bthr,btkr->bhtk", q_rope, kr, preferred_element_type=jnp.float32))
    scores = jnp.where(valid[:, None], scores * scale, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
    return jnp.einsum("bhtk,btkc->bthc", probs, ck, preferred_element_type=jnp.float32).astype(dtype)


def map_query_blocks(fn, xs: tuple, block: int, remat: bool = False):
    """Apply ``fn(*xs)`` to ``block`` queries at a time: every array of xs is [B, T, ...]; the outputs (a pytree of
    [B, T, ...] arrays) are reassembled. T is padded up to a multiple of ``block`` (padded rows are dropped).

    ``remat``: the backward pass keeps only each block's inputs and recomputes the block (``jax.checkpoint``), so
    what a block builds — gathered rows [B, block, k, ·], [B, block, S] scores — is never stored for all T.
    """
    fn = jax.checkpoint(fn) if remat else fn
    T = xs[0].shape[1]
    if T <= block:
        return fn(*xs)
    nb = -(-T // block)
    pad = nb * block - T

    def split(a):  # [B, T, ...] → [nb, B, block, ...]
        a = jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
        return jnp.moveaxis(a.reshape(a.shape[0], nb, block, *a.shape[2:]), 1, 0)

    def join(a):  # [nb, B, block, ...] → [B, T, ...]
        return jnp.moveaxis(a, 0, 1).reshape(a.shape[1], nb * block, *a.shape[3:])[:, :T]

    return jax.tree.map(join, jax.lax.map(lambda b: fn(*b), tuple(split(a) for a in xs)))


def topk_blocked(ix: IndexerOut, keys: jax.Array, q_pos: jax.Array, k_pos: jax.Array, k: int,
                 block: int | None = None, impl: str = "xla", dtype=jnp.float32) -> tuple[jax.Array, jax.Array]:
    """Each query's top-k causal keys without the full score matrix, ``block`` queries at a time (default 64 for
    xla, 512 for pallas). keys [B, S, D], q_pos [B, T], k_pos [B, S] → (idx, valid) [B, T, k'] as
    :func:`select_topk`.

    ``impl`` (ModelConfig.dsa_index_impl): "xla" holds a block's per-head scores [B, block, J, S] in float32;
    "pallas" computes a block's [B, block, S] scores in the fused kernel of :mod:`dsv3_jax.kernels.dsa_index`
    with dot operands in ``dtype`` (the model's: BF16 on a GPU) and float32 accumulation (interpret mode off the
    GPU); "auto": pallas on a GPU, else xla.
    """
    if impl not in ("auto", "xla", "pallas"):
        raise ValueError(f"dsa_index_impl={impl!r}: expected 'auto', 'xla' or 'pallas'")
    if impl == "auto":
        impl = "pallas" if on_gpu() and ix.q.shape[-1] >= 16 and ix.q.shape[-1] & (ix.q.shape[-1] - 1) == 0 else "xla"
    block = block or (512 if impl == "pallas" else 64)
    sg = jax.lax.stop_gradient  # the selection has no gradient: none is traced through the scoring (or the kernel)
    ix, keys = IndexerOut(sg(ix.q), sg(ix.k), sg(ix.w)), sg(keys)
    S = keys.shape[1]
    if impl == "pallas":
        bs = 64
        if S % bs:  # pad once here, not per query block: padded keys sit past every query
            keys = jnp.pad(keys, ((0, 0), (0, -S % bs), (0, 0)))
            k_pos = jnp.pad(k_pos, ((0, 0), (0, -S % bs)), constant_values=jnp.iinfo(jnp.int32).max)

        def scores(q, w, qp):
            return index_scores_kernel(q, w, qp, keys, k_pos, dtype=dtype, block_t=16 if q.shape[1] <= 16 else 64,
                                       block_s=bs, interpret=not on_gpu())  # (16: decode pads less)
    else:
        def scores(q, w, qp):
            return index_scores(IndexerOut(q, keys, w))

    def one(q, w, qp):
        return select_topk(scores(q, w, qp), k_pos[:, None, :] <= qp[:, :, None], k)

    idx, valid = map_query_blocks(one, (ix.q, ix.w, q_pos), block)
    return idx[..., :min(k, S)], valid[..., :min(k, S)]  # (padded keys are never valid: they sort last)


def selected_scores(ix: IndexerOut, keys: jax.Array, idx: jax.Array, block: int = 256) -> jax.Array:
    """I(t, s) at the selected keys only: keys [B, S, D], idx [B, T, k] → [B, T, k] float32. O(T·k·J·D).

    ``block`` queries at a time, recomputed in the backward: the gathered keys [B, block, k, D] and the per-head
    scores [B, block, J, k] exist for one block only (the indexer's KL differentiates through this).
    """
    D = ix.q.shape[-1]
    keys = keys.astype(jnp.float32)

    def one(q, w, i):
        s = jnp.einsum("btjd,btkd->btjk", q, gather_keys(keys, i), preferred_element_type=jnp.float32)
        return jnp.einsum("btj,btjk->btk", w, jax.nn.relu(s * D ** -0.5))

    return map_query_blocks(one, (ix.q, ix.w, idx), block, remat=True)


def sparse_latent_attention(q_nope, q_rope, c_kv, k_rope, w_kv_b, idx, valid, scale, dtype, block: int = 256,
                            impl: str = "xla"):
    """MLA over each query's selected keys only, in latent space (kv_b_proj absorbed, REFERENCE §4).

    q_nope [B,T,H,n], q_rope [B,T,H,r], c_kv [B,S,c], k_rope [B,S,r], w_kv_b [c,H,n+v], idx/valid [B,T,k]
    → [B,T,H,v]. Cost O(T·k·H·(c + r)). ``impl`` (ModelConfig.dsa_attention_impl): see :func:`sparse_latent_core`.
    """
    n = q_nope.shape[-1]
    w = w_kv_b.astype(dtype)
    q_lat = jnp.einsum("bthn,chn->bthc", q_nope, w[..., :n], preferred_element_type=jnp.float32).astype(dtype)
    o_lat = sparse_latent_core(q_lat, q_rope.astype(dtype), c_kv.astype(dtype), k_rope.astype(dtype), idx, valid,
                               scale, dtype, block, impl)
    return jnp.einsum("bthc,chv->bthv", o_lat, w[..., n:], preferred_element_type=jnp.float32).astype(dtype)


def sparse_latent_xla(q_lat, q_rope, c_kv, k_rope, idx, valid, scale, dtype, block: int = 256):
    """The gathered latent attention as XLA ops, ``block`` queries at a time, each block recomputed in the backward.

    q_lat [B,T,H,c] (w_uk absorbed), q_rope [B,T,H,r], c_kv [B,S,c], k_rope [B,S,r], idx/valid [B,T,k]
    → o_lat [B,T,H,c]. Memory: the gathered rows [B, block, k, c + r] and probabilities [B, H, block, k] of one
    block; the backward stores only the inputs (O(T·k) indices, O(T·H·c) queries).
    """
    return map_query_blocks(lambda q, qr, i, ok: _sparse_block(q, qr, c_kv, k_rope, i, ok, scale, dtype),
                            (q_lat, q_rope, idx, valid), block, remat=True)


def sparse_latent_core(q_lat, q_rope, c_kv, k_rope, idx, valid, scale, dtype, block: int = 256, impl: str = "xla"):
    """o_lat [B,T,H,c] = softmax over each query's valid selected keys; shapes as :func:`sparse_latent_xla`.

    ``impl``: "xla" (:func:`sparse_latent_xla`), "pallas" (the gathered flash kernel of
    :mod:`dsv3_jax.kernels.dsa_attention`; its backward is the blocked XLA path; interpret mode off the GPU),
    "auto" (pallas on a GPU in bf16/f16 with power-of-two latent widths, else xla).
    """
    if impl not in ("auto", "xla", "pallas"):
        raise ValueError(f"dsa_attention_impl={impl!r}: expected 'auto', 'xla' or 'pallas'")
    if impl == "auto":
        impl = "pallas" if on_gpu() and pallas_fits(q_lat, q_rope, idx) else "xla"
    if impl == "pallas":
        return sparse_latent_pallas(q_lat, q_rope, c_kv, k_rope, idx, valid, scale, block)
    return sparse_latent_xla(q_lat, q_rope, c_kv, k_rope, idx, valid, scale, dtype, block)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def sparse_latent_pallas(q_lat, q_rope, c_kv, k_rope, idx, valid, scale, block: int = 256):
    """:func:`sparse_latent_xla` with the forward in the gathered flash kernel (interpret mode off the GPU) and the
    backward on the blocked XLA path (recomputing each block: no residuals beyond the inputs). Shapes as there."""
    return sparse_latent_attention_fwd(q_lat, q_rope, c_kv, k_rope, idx, valid, scale, interpret=not on_gpu())


def _pallas_fwd(q_lat, q_rope, c_kv, k_rope, idx, valid, scale, block):
    return sparse_latent_pallas(q_lat, q_rope, c_kv, k_rope, idx, valid, scale, block), (q_lat, q_rope, c_kv,
                                                                                         k_rope, idx, valid)


def _pallas_bwd(scale, block, res, g):
    q_lat, q_rope, c_kv, k_rope, idx, valid = res
    _, vjp = jax.vjp(lambda q, qr, c, kr: sparse_latent_xla(q, qr, c, kr, idx, valid, scale, q_lat.dtype, block),
                     q_lat, q_rope, c_kv, k_rope)
    return (*vjp(g), None, None)


sparse_latent_pallas.defvjp(_pallas_fwd, _pallas_bwd)


def head_mean_probs(q_nope, q_rope, c_kv, k_rope, w_uk, mask, scale) -> jax.Array:
    """The main attention distribution summed over heads and L1-normalised (= the head mean), float32, no
    gradient: q_nope [B,T,H,n], q_rope [B,T,H,r], c_kv [B,S,c], k_rope [B,S,r], w_uk [c,H,n], mask [B,T,S]
    → p [B, T, S] (rows sum to 1 over the masked-in keys). O(T·S·H): the dense warm-up's target."""
    q_lat = jnp.einsum("bthn,chn->bthc", q_nope.astype(jnp.float32), w_uk.astype(jnp.float32))
    scores = (jnp.einsum("bthc,bsc->bhts", q_lat, c_kv.astype(jnp.float32))
              + jnp.einsum("bthr,bsr->bhts", q_rope.astype(jnp.float32), k_rope.astype(jnp.float32)))
    probs = jax.nn.softmax(jnp.where(mask[:, None], scores * scale, NEG_INF), axis=-1)
    return jax.lax.stop_gradient(probs.mean(axis=1))


def indexer_kl(p: jax.Array, scores: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean over queries of KL(p_t ‖ softmax(I_t)) over the keys in ``mask`` (V3.2 paper; REFERENCE §11).

    p [B, T, S] (rows sum to 1 on ``mask``), scores [B, T, S] the indexer's I(t, ·), mask [B, T, S] bool → scalar.
    Dense warm-up: S = all keys, mask causal. Sparse stage: S = the k selected keys, mask = valid. Gradient flows
    into ``scores`` only (p is a fixed target).
    """
    logq = jax.nn.log_softmax(jnp.where(mask, scores, NEG_INF), axis=-1)
    p = jax.lax.stop_gradient(p)
    kl = jnp.where(mask & (p > 0), p * (jnp.log(jnp.where(p > 0, p, 1.0)) - logq), 0.0).sum(-1)
    return kl.mean()


def gather_keys(a: jax.Array, idx: jax.Array) -> jax.Array:
    """a [B, S, ...] at idx [B, T, k] → [B, T, k, ...]."""
    return jax.vmap(lambda x, i: x[i])(a, idx)


class DSA(nn.Module):
    """MLA with the lightning indexer: x [B, T, d], positions [B, T] → (out [B, T, d], cache, aux).

    The same parameters as :class:`dsv3_jax.attention.MLA` plus ``indexer``. ``cfg.index_attention`` "sparse":
    every query attends to its top ``index_topk`` causal keys (gathered); "dense": to every causal key (the
    warm-up stage of training). Without a cache, aux: ``indexer_kl`` (scalar) — dense: KL(head-mean attention ‖
    softmax(I)) over all causal keys; sparse: over the selected keys — and ``topk_mass`` (dense only, else NaN):
    the share of the head-mean attention on the top-k keys. The indexer's inputs are detached, so the indexer
    learns only from its KL and the main model only from the LM loss (the selection itself has no gradient).

    With a cache (``LatentCache`` with ``k_index``; serving: prefill chunks and decode) the new latents and
    indexer keys are written at their positions and each query selects its top-k among the cached slots at
    positions ≤ its own; the attention is the same gathered latent math either way (``absorbed`` changes
    nothing here), and aux is empty.
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array, cache: LatentCache | StackSlot | None = None,
                 absorbed: bool = False):
        c = self.cfg
        dt = dtype_of(c.dtype)
        n = c.qk_nope_head_dim
        inp = mla_inputs(c, x, positions)
        sg = jax.lax.stop_gradient
        ix = Indexer(c, name="indexer")(sg(x), sg(inp.cq), inp.cos, inp.sin)
        scale, _ = rope.attention_factors(c)
        kv_b = kv_b_proj(c)
        w = kv_b(None, in_shape=(c.kv_lora_rank,))  # [c, H, n + v]
        if cache is not None:
            if isinstance(cache, StackSlot):
                cache, view = write_stacked(cache, inp.c_kv, inp.k_rope, positions, ix.k)
            else:
                cache = view = write_cache(cache, inp.c_kv, inp.k_rope, positions, ix.k)
            slots = jnp.broadcast_to(jnp.arange(view.c_kv.shape[1]), view.c_kv.shape[:2])
            mask = causal_mask(positions, slots)
            c_kv, k_rope = view.c_kv.astype(dt), view.k_rope.astype(dt)
            if c.index_attention == "dense":
                out = masked_dense_attention(inp.q_nope, inp.q_rope, c_kv, k_rope, w, mask, scale, dt)
            else:
                idx, valid = topk_blocked(ix, view.k_index, positions, slots, c.index_topk, impl=c.dsa_index_impl,
                                          dtype=dt)
                out = sparse_latent_attention(inp.q_nope, inp.q_rope, c_kv, k_rope, w, idx, valid, scale, dt,
                                              impl=c.dsa_attention_impl)
            return o_proj(c, out), cache, {}
        if c.index_attention == "dense":  # the warm-up: O(T²) by design (the KL is over every causal key)
            causal = causal_mask(positions, positions)
            scores = index_scores(ix)
            idx, valid = select_topk(scores, causal, c.index_topk)
            out = causal_naive(c, inp.q_nope, inp.q_rope, inp.c_kv, inp.k_rope, kv_b, scale)
            p = head_mean_probs(inp.q_nope, inp.q_rope, inp.c_kv, inp.k_rope, w[..., :n], causal, scale)
            aux = {"indexer_kl": indexer_kl(p, scores, causal),
                   "topk_mass": jnp.mean(jnp.sum(jnp.where(valid, jnp.take_along_axis(p, idx, -1), 0.0), -1))}
        else:  # never a [T, T] array: blocked top-k, gathered attention, KL over the selected keys
            idx, valid = topk_blocked(ix, ix.k, positions, positions, c.index_topk, impl=c.dsa_index_impl, dtype=dt)
            out = sparse_latent_attention(inp.q_nope, inp.q_rope, inp.c_kv, inp.k_rope, w, idx, valid, scale, dt,
                                          impl=c.dsa_attention_impl)
            p = _selected_head_mean(inp.q_nope, inp.q_rope, inp.c_kv, inp.k_rope, w[..., :n], idx, valid, scale)
            aux = {"indexer_kl": indexer_kl(p, selected_scores(ix, ix.k, idx), valid),
                   "topk_mass": jnp.full((), jnp.nan, jnp.float32)}
        return o_proj(c, out), None, aux


def _selected_head_mean(q_nope, q_rope, c_kv, k_rope, w_uk, idx, valid, scale, block: int = 256) -> jax.Array:
    """Head-mean attention over each query's selected keys, float32, no gradient → [B, T, k]; ``block`` queries at
    a time (the gathered rows and [B, H, block, k] probabilities of one block only)."""
    f = jnp.float32
    sg = jax.lax.stop_gradient
    q_lat = jnp.einsum("bthn,chn->bthc", sg(q_nope).astype(f), sg(w_uk).astype(f))
    c_kv, k_rope = sg(c_kv).astype(f), sg(k_rope).astype(f)

    def one(q, qr, i, ok):
        ck, kr = gather_keys(c_kv, i), gather_keys(k_rope, i)
        s = jnp.einsum("bthc,btkc->bhtk", q, ck) + jnp.einsum("bthr,btkr->bhtk", qr, kr)
        return jax.nn.softmax(jnp.where(ok[:, None], s * scale, NEG_INF), axis=-1).mean(axis=1)

    return map_query_blocks(one, (q_lat, sg(q_rope).astype(f), idx, valid), block)
