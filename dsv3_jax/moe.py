"""DeepSeekMoE: gate (scores, selection bias, group limit, top-k), dropless dispatch, experts (REFERENCE §5).

Shapes: N tokens (B·T flattened), d model width, E routed experts, K experts per token, F expert width.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsv3_jax import fp8, tokens
from dsv3_jax.config import ModelConfig
from dsv3_jax.kernels import grouped_matmul
from dsv3_jax.kernels._backend import on_gpu
from dsv3_jax.kernels.grouped_matmul import wants_aligned_rows
from dsv3_jax.layers import MLP, dequantize_weight, dtype_of, fp8_weight_param, logical, normal_init, swiglu

# expert weights [E, in, out]; Quantized when serving FP8 weights with fp8 on; Prequantized when an FP8 train step
# quantised them ahead (fp8.prequantize_experts: only dispatch_ragged reads its blocks, other paths its .w)
Weight = jax.Array | fp8.Quantized | fp8.Prequantized


class Routing(NamedTuple):
    """Gate output: expert ids [N, K] int32, combine weights [N, K] f32, unbiased scores [N, E] f32."""

    experts: jax.Array
    weights: jax.Array
    scores: jax.Array


def route(logits: jax.Array, bias: jax.Array | None, cfg: ModelConfig) -> Routing:
    """Select K experts per token from gate logits [N, E] (float32). REFERENCE §5 steps 1-5.

    ``bias`` (noaux_tc) shifts scores for *selection only*; weights come from the unbiased scores.
    """
    logits = logits.astype(jnp.float32)
    N, E = logits.shape
    K, G = cfg.num_experts_per_tok, cfg.n_group
    if cfg.scoring_func == "sigmoid":
        scores = jax.nn.sigmoid(logits)
    else:
        scores = jax.nn.softmax(logits, axis=-1)
    sel = scores if bias is None else scores + bias.astype(jnp.float32)[None, :]
    if cfg.topk_method != "greedy" and G > 1:
        grouped = sel.reshape(N, G, E // G)
        if cfg.topk_method == "noaux_tc":
            group_score = jax.lax.top_k(grouped, 2)[0].sum(-1)  # sum of the top-2 biased scores
        else:
            group_score = grouped.max(-1)
        _, keep = jax.lax.top_k(group_score, cfg.topk_group)  # [N, topk_group]
        group_mask = jax.nn.one_hot(keep, G, dtype=jnp.int32).sum(1) > 0  # [N, G]
        sel = jnp.where(jnp.repeat(group_mask, E // G, axis=1), sel, -jnp.inf)
    _, experts = jax.lax.top_k(sel, K)
    weights = jnp.take_along_axis(scores, experts, axis=-1)
    if cfg.norm_topk_prob and K > 1:
        weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
    return Routing(experts.astype(jnp.int32), weights * cfg.routed_scaling_factor, scores)


def expert_load(experts: jax.Array, num_experts: int) -> jax.Array:
    """Tokens routed to each expert [E] float32 from expert ids [..., K] (a one-hot sum: no scatter)."""
    return jax.nn.one_hot(experts.reshape(-1), num_experts, dtype=jnp.float32).sum(0)


def sequence_balance(scores: jax.Array, experts: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Sequence-wise balance term ``Σ_i f_i P_i`` averaged over sequences (REFERENCE §5; α applied by the loss).

    scores [B, T, E] unbiased gate scores, experts [B, T, K]. f uses the actual selection (no gradient).
    """
    B, T, E = scores.shape
    K = cfg.num_experts_per_tok
    p = (scores / scores.sum(-1, keepdims=True)).mean(axis=1)  # [B, E]
    hits = jax.vmap(lambda e: expert_load(e, E))(experts)  # [B, E]
    f = jax.lax.stop_gradient(hits * (E / (K * T)))
    return (f * p).sum(-1).mean()


def expert_matmul(a: jax.Array, w: Weight, sizes: jax.Array, impl: str = "auto",
                  fp8_pow2: bool | None = None, aligned: bool = False, live_sizes: jax.Array | None = None
                  ) -> jax.Array:
    """Rows a [M, k] grouped by expert (``sizes`` [E]) × w [E, k, n] → [M, n]: the grouped GEMM of the experts.

    ``fp8_pow2`` None: :func:`grouped_matmul` in a's dtype. Else FP8 (REFERENCE §8; power-of-two scales if True).
    ``aligned``: groups padded to multiples of 128 rows (:func:`aligned_layout`), for the Hopper kernels (FP8, or
    BF16 with ``impl`` mgpu); ``live_sizes`` [E]: each padded group's rows before its padding (BF16 only).
    """
    if fp8_pow2 is None:
        return grouped_matmul(a, w, sizes, impl, aligned=aligned, live_sizes=live_sizes)
    return fp8.fp8_grouped_matmul(a, w, sizes, fp8_pow2, aligned=aligned)


@jax.custom_vjp
def permute_rows(x: jax.Array, perm: jax.Array, inverse: jax.Array) -> jax.Array:
    """``x[perm]`` for an injective ``perm`` whose inverse map is ``inverse`` (row r of x lands at ``inverse[r]``):
    the backward pass is a gather by ``inverse`` instead of the scatter-add autodiff would emit (scatters are
    slow on GPUs). Out-of-range indices give zero rows both ways, so the same call moves rows into and out of
    :func:`aligned_layout`'s padding; for a permutation every index is in range."""
    return jnp.take(x, perm, axis=0, mode="fill", fill_value=0)


def _permute_fwd(x, perm, inverse):
    return permute_rows(x, perm, inverse), (perm, inverse)


def _permute_bwd(res, dy):
    _, inverse = res
    return jnp.take(dy, inverse, axis=0, mode="fill", fill_value=0), None, None


permute_rows.defvjp(_permute_fwd, _permute_bwd)


def aligned_layout(order: jax.Array, inverse: jax.Array, sizes: jax.Array, align: int = fp8.BLOCK
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Sorted token copies laid out with every expert's rows padded to a multiple of ``align`` (DeepGEMM's
    contiguous layout: 128-row tiles and 128-token scale tiles never straddle two experts).

    From :func:`sort_by_expert`'s (order [C], inverse [C], sizes [E]) → (src [P]: the copy in each padded row,
    C (out of range) for padding; pos [C]: each copy's padded row; padded sizes [E]). P = the static bound
    ``round_up(C + (align - 1)·E, align)``; rows past the padded sizes' sum are padding too.
    """
    C, E = order.shape[0], sizes.shape[0]
    P = -(-(C + (align - 1) * E) // align) * align
    sizes = sizes.astype(jnp.int32)
    psizes = (sizes + align - 1) // align * align
    pends, ends = jnp.cumsum(psizes), jnp.cumsum(sizes)
    pstarts, starts = pends - psizes, ends - sizes
    p = jnp.arange(P, dtype=jnp.int32)
    g = fp8.group_ids(psizes, P)  # expert of each padded row
    i = p - pstarts[g]
    valid = (i < sizes[g]) & (p < pends[-1])
    src = jnp.where(valid, jnp.take(order, jnp.clip(starts[g] + i, 0, C - 1)), C).astype(jnp.int32)
    j = inverse.astype(jnp.int32)  # sorted position of each copy
    gc = jnp.take(fp8.group_ids(sizes, C), j)  # its expert
    pos = (pstarts[gc] + j - starts[gc]).astype(jnp.int32)
    return src, pos, psizes


def sort_by_expert(experts: jax.Array, num_experts: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Copies [N, K] → (order: sorted position → copy index, inverse, group sizes [E]) — no scatter."""
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    bounds = jnp.searchsorted(jnp.take(flat, order), jnp.arange(num_experts + 1), side="left",
                              method="compare_all")  # one fused compare (see fp8.group_ids)
    return order, jnp.argsort(order), jnp.diff(bounds).astype(jnp.int32)


# Token copies per expert from which FP8 dispatch pads experts to 128 rows: the padding (≤ 127 rows per expert,
# computed as zero tiles) then costs at most a quarter of the rows.
ALIGN_MIN_ROWS_PER_EXPERT = 4 * 127


def expert_rows(rows: jax.Array, ids: jax.Array, w_gate: Weight, w_up: Weight, w_down: Weight, impl: str = "auto",
                fp8_pow2: bool | None = None, align: int | None = None, empty_rows: bool = True) -> jax.Array:
    """Each row through its expert's SwiGLU FFN: rows [R, d], expert ids [R] → [R, d] (the GEMMs' output dtype).

    Rows are sorted by expert, run through grouped matmuls and unsorted (no scatter). An id ≥ E (the number of
    experts in ``w_gate``) marks an empty row: it sorts last, is computed by no expert and comes back as zeros.
    ``empty_rows`` False: the caller promises every id < E, so no row needs zeroing (saves a select over [R, d]
    and its transpose in the backward).
    ``fp8_pow2`` not None: expert GEMMs in FP8 (REFERENCE §8) with power-of-two scales if True.
    ``align``: pad every expert's rows to a multiple of this (:func:`aligned_layout`); None: 128 when the
    GEMMs run Hopper kernels that want it — FP8's (:func:`dsv3_jax.fp8.aligned_groups`) or BF16's (``impl`` mgpu,
    or auto on a GPU unless ``DSV3_BF16_GEMM=tokamax``: :func:`dsv3_jax.kernels.grouped_matmul.wants_aligned_rows`) —
    and there are at least ``ALIGN_MIN_ROWS_PER_EXPERT`` rows per expert (training batches; decode stays
    unpadded), else 0.
    """
    R = rows.shape[0]
    E = w_gate.shape[0]
    if align is None:  # padding costs up to 127 rows per expert: only worth it for batches this size or more
        kernels = fp8.aligned_groups() if fp8_pow2 is not None else wants_aligned_rows(impl)
        align = fp8.BLOCK if (kernels and not isinstance(w_gate, fp8.Quantized)
                              and R >= ALIGN_MIN_ROWS_PER_EXPERT * E) else 0
    order, inverse, sizes = sort_by_expert(ids, E)  # row j of the sorted batch is row order[j]
    live = None  # rows of each padded group before its padding: the BF16 Wgrad skips the padding's slabs
    if align:
        live = sizes
        src, pos, sizes = aligned_layout(order, inverse, sizes, align)
        xs = permute_rows(rows, src, pos)  # [P, d], padding rows zero
    else:
        xs = permute_rows(rows, order, inverse)  # [R, d]
    aligned = align > 0 and align % fp8.BLOCK == 0

    def gemm(a, w):
        return expert_matmul(a, w, sizes, impl, fp8_pow2, aligned, live)

    h = swiglu(gemm(xs, w_gate), gemm(xs, w_up))
    ys = gemm(h, w_down)  # [R or P, d]
    ys = permute_rows(ys, pos, src) if align else permute_rows(ys, inverse, order)
    if not empty_rows:
        return ys
    # Rows past the experts' groups hold whatever the grouped GEMM leaves there: zero the empty rows' outputs.
    return jnp.where((ids < E)[:, None], ys, 0)


def combine(ys: jax.Array, weights: jax.Array, dtype) -> jax.Array:
    """Σ_k weight · expert output: ys [N·K, d] (copy n·K + k), weights [N, K] → [N, d] in ``dtype`` (FP32 sum)."""
    N, K = weights.shape
    return jnp.einsum("nkd,nk->nd", ys.reshape(N, K, -1), weights.astype(dtype), preferred_element_type=jnp.float32
                      ).astype(dtype)


def token_copies(x: jax.Array, k: int) -> jax.Array:
    """x [N, d] → [N·K, d]: row n·K + k is token n's copy for its k-th expert (backward: a sum over K)."""
    N, d = x.shape
    return jnp.broadcast_to(x[:, None], (N, k, d)).reshape(N * k, d)


def dispatch_ragged(x: jax.Array, routing: Routing, w_gate: Weight, w_up: Weight, w_down: Weight,
                    impl: str = "auto", fp8_pow2: bool | None = None, align: int | None = None) -> jax.Array:
    """Dropless MoE by sorting token copies by expert and grouped matmuls (:func:`expert_rows`). x [N, d] → [N, d].

    Every token reaches all its K experts (no capacity, no dropping): N·K rows, grouped by expert id.
    """
    K = routing.experts.shape[1]
    ys = expert_rows(token_copies(x, K), routing.experts.reshape(-1), w_gate, w_up, w_down, impl, fp8_pow2, align,
                     empty_rows=False)  # route() picks only real experts
    return combine(ys, routing.weights, x.dtype)


def dispatch_dense(x: jax.Array, routing: Routing, w_gate: Weight, w_up: Weight, w_down: Weight,
                   fp8_pow2: bool | None = None) -> jax.Array:
    """Reference MoE: every expert on every token, combined by the sparse weights. x [N, d] → [N, d].

    ``fp8_pow2`` not None: each expert's GEMMs through :func:`dsv3_jax.fp8.fp8_dot` (the grouped path's reference).
    """
    E = w_gate.shape[0]
    dt = x.dtype
    if fp8_pow2 is None:
        h = swiglu(jnp.einsum("nd,edf->enf", x, w_gate.astype(dt)), jnp.einsum("nd,edf->enf", x, w_up.astype(dt)))
        y = jnp.einsum("enf,efd->end", h, w_down.astype(dt), preferred_element_type=jnp.float32)
    else:
        h = swiglu(jax.vmap(lambda w: fp8.fp8_dot(x, w, pow2=fp8_pow2))(w_gate),
                   jax.vmap(lambda w: fp8.fp8_dot(x, w, pow2=fp8_pow2))(w_up))
        y = jax.vmap(lambda a, w: fp8.fp8_dot(a, w, pow2=fp8_pow2, out_dtype=jnp.float32))(h, w_down)
    combine = jnp.zeros((x.shape[0], E), jnp.float32).at[
        jnp.arange(x.shape[0])[:, None], routing.experts].add(routing.weights)
    return jnp.einsum("end,ne->nd", y, combine).astype(dt)


def dispatch_gather(x: jax.Array, routing: Routing, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array
                    ) -> jax.Array:
    """MoE for a handful of tokens (decode): each token copy reads its expert's weights directly. x [N, d] → [N, d].

    Written as multiply + reduce over the gathered weights [N, K, d, F] so XLA fuses the gather into the
    reduction: each selected expert's weights are read once from HBM, nothing is sorted or materialised —
    the bytes-optimal path when N·K is small next to E (no weight is shared between copies to amortise it).
    """
    dt = x.dtype
    idx = routing.experts  # [N, K]

    def proj(a: jax.Array, w: jax.Array) -> jax.Array:  # a [N, K, in] · w[idx] [N, K, in, out] → [N, K, out] f32
        wk = jnp.take(w, idx, axis=0).astype(dt)
        return jnp.sum(a[..., None].astype(jnp.float32) * wk, axis=2, dtype=jnp.float32)

    xk = jnp.broadcast_to(x[:, None], (*idx.shape, x.shape[-1]))
    h = swiglu(proj(xk, w_gate).astype(dt), proj(xk, w_up).astype(dt))
    y = proj(h, w_down)  # [N, K, d] f32
    return jnp.einsum("nkd,nk->nd", y, routing.weights).astype(dt)


# Token copies (N·K) up to which moe_impl=auto takes :func:`dispatch_gather` on a GPU (decode-sized batches).
GATHER_MAX_COPIES = 32


# A parallel strategy (sharding/expert.py) may replace the dispatch while a step is traced; the math stays here.
_DISPATCH: contextvars.ContextVar[Callable | None] = contextvars.ContextVar("moe_dispatch", default=None)


@contextlib.contextmanager
def dispatch_override(fn: Callable):
    """Use ``fn(x, routing, w_gate, w_up, w_down, fp8_pow2=...) → (y, copies dropped [])`` for routed experts
    while the context is active (``fp8_pow2`` as :func:`expert_matmul` takes it)."""
    token = _DISPATCH.set(fn)
    try:
        yield
    finally:
        _DISPATCH.reset(token)


class MoE(nn.Module):
    """Routed experts + shared expert(s). x [B, T, d] → (y [B, T, d], aux {load [E], balance [], dropped []})."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        c = self.cfg
        B, T, d = x.shape
        E, F = c.n_routed_experts, c.moe_intermediate_size
        pdt = dtype_of(c.param_dtype)
        gate_w = self.param("gate", nn.with_logical_partitioning(normal_init(c.initializer_range), ("embed", None)),
                            (d, E), jnp.float32)
        bias = None
        if c.topk_method == "noaux_tc":
            # Not a trained parameter: updated from global expert loads after each step (REFERENCE §5).
            bias = self.variable("router", "e_score_correction_bias",
                                 nn.with_logical_partitioning(nn.initializers.zeros, (None,)), None,
                                 (E,), jnp.float32).value
        init = normal_init(c.initializer_range)
        shapes = {"gate_proj": ((E, d, F), ("exp", "embed", "moe_mlp")),
                  "up_proj": ((E, d, F), ("exp", "embed", "moe_mlp")),
                  "down_proj": ((E, F, d), ("exp", "moe_mlp", "embed"))}
        if c.fp8_weights:  # E4M3 blocks + scale_inv per expert (serving an FP8 checkpoint)
            ws = [fp8_weight_param(self, n, s, a, in_dims=1, lead=1) for n, (s, a) in shapes.items()]
            if not c.fp8:  # weight-only FP8: dequantise per block on the fly, compute in dtype
                ws = [dequantize_weight(w, 1, dtype_of(c.dtype), lead=1) for w in ws]
        else:
            ws = [self.param(n, nn.with_logical_partitioning(init, a), s, pdt) for n, (s, a) in shapes.items()]
        w_gate, w_up, w_down = ws
        fp8_pow2 = c.fp8_pow2_scales if c.fp8 else None
        master = [w.w if isinstance(w, fp8.Prequantized) else w for w in ws]  # for paths other than ragged

        xf = tokens.flatten(x)  # [B·T, d], rows in the parallel layout's order (dsv3_jax/tokens.py)
        logits = jnp.dot(xf.astype(jnp.float32), gate_w.astype(jnp.float32))  # gate in f32 (REFERENCE §12)
        r = route(logits, bias, c)
        dropped = jnp.zeros((), jnp.float32)  # routed copies dropped for capacity (expert parallelism only)
        if (override := _DISPATCH.get()) is not None:
            y, dropped = override(xf, r, *master, fp8_pow2=fp8_pow2)
        elif c.moe_impl == "dense":
            y = dispatch_dense(xf, r, *master, fp8_pow2)
        elif c.moe_impl == "gather" or (c.moe_impl == "auto" and fp8_pow2 is None and on_gpu()
                                        and not isinstance(w_gate, fp8.Quantized)
                                        and B * T * c.num_experts_per_tok <= min(GATHER_MAX_COPIES, E)):
            y = dispatch_gather(xf, r, *master)
        else:
            y = dispatch_ragged(xf, r, w_gate, w_up, w_down, "auto" if c.moe_impl == "ragged" else c.moe_impl,
                                fp8_pow2=fp8_pow2)
        y = tokens.unflatten(y, B, T)
        if c.n_shared_experts:
            y = y + MLP(c, F * c.n_shared_experts, name="shared_experts")(x)
        aux = {"load": expert_load(r.experts, E),
               "balance": sequence_balance(tokens.unflatten(r.scores, B, T), tokens.unflatten(r.experts, B, T), c),
               "dropped": dropped}
        return logical(y, ("activation_batch", "activation_length", "activation_embed")), aux
