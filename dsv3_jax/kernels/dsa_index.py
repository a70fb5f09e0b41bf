"""The DeepSeek-V3.2 lightning indexer's scores as a Pallas kernel (Triton backend):
I(t, s) = Σ_j w[t, j] · ReLU(q[t, j] · k[s] · D^-0.5) for a block of queries against every key.

The XLA path builds the per-head scores [t, J, S] in float32 and reduces them; here one program takes ``block_t``
queries × ``block_s`` keys, loops over the J heads with one [block_t, D] × [D, block_s] dot each (operands in the
input dtype — bf16 on a GPU, the issue's cheap BF16 scoring — accumulation in float32), and keeps only the
weighted ReLU sum: the [t, J, S] tensor never exists. A tile whose keys all lie after every query of the block
(k_pos > q_pos: causally invisible) is skipped and written as 0 (callers mask it; :func:`dsv3_jax.dsa.select_topk`
does), which halves the work of causal self-attention.

Off the GPU the kernel runs in Pallas interpret mode (tests). On the GPU (Triton): D, ``block_t`` and ``block_s``
powers of two ≥ 16.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _kernel(q_ref, w_ref, qpos_ref, k_ref, kpos_ref, o_ref, *, scale: float, dot_dtype):
    """q_ref [J, bt, D], w_ref [J, bt] f32, qpos_ref [bt] int32, k_ref [bs, D], kpos_ref [bs] int32 → o_ref [bt, bs]
    f32. ``dot_dtype``: operands cast to it first (interpret mode on CPU: no bf16 × bf16 → f32 dot in XLA:CPU's
    loop; bf16 products are exact in f32)."""
    cast = (lambda x: x.astype(dot_dtype)) if dot_dtype is not None else (lambda x: x)
    J, bt, _ = q_ref.shape
    bs = k_ref.shape[0]
    visible = jnp.min(kpos_ref[...]) <= jnp.max(qpos_ref[...])

    @pl.when(visible)
    def _():
        k = cast(k_ref[...])

        def body(j, acc):
            s = plgpu.dot(cast(q_ref[j]), k, trans_b=True)  # [bt, bs] f32
            return acc + w_ref[j][:, None] * jnp.maximum(s * scale, 0.0)

        o_ref[...] = jax.lax.fori_loop(0, J, body, jnp.zeros((bt, bs), jnp.float32))

    @pl.when(jnp.logical_not(visible))
    def _():
        o_ref[...] = jnp.zeros((bt, bs), jnp.float32)


@functools.partial(jax.jit, static_argnames=("dtype", "block_t", "block_s", "num_warps", "num_stages", "interpret"))
def index_scores_kernel(q: jax.Array, w: jax.Array, q_pos: jax.Array, keys: jax.Array, k_pos: jax.Array, *,
                        dtype=jnp.bfloat16, block_t: int = 64, block_s: int = 64, num_warps: int = 4,
                        num_stages: int = 2, interpret: bool = False) -> jax.Array:
    """q [B,T,J,D], w [B,T,J] (head weights, n_I^-0.5 folded in), q_pos [B,T] int, keys [B,S,D], k_pos [B,S] int
    → I [B,T,S] float32 (0 on tiles no query of the block can see; callers mask by position).

    ``dtype``: the dot operands' dtype (q and keys are cast to it; products accumulate in float32). T and S are
    padded to whole tiles internally (pass multiples of block_t / block_s to avoid the copies).
    """
    B, T, J, D = q.shape
    S = keys.shape[1]
    if w.shape != (B, T, J) or q_pos.shape != (B, T) or keys.shape != (B, S, D) or k_pos.shape != (B, S):
        raise ValueError(f"shapes: q {q.shape}, w {w.shape}, q_pos {q_pos.shape}, keys {keys.shape}, "
                         f"k_pos {k_pos.shape}")
    if not interpret:
        bad = {k: v for k, v in {"D": D, "block_t": block_t, "block_s": block_s}.items()
               if not (_is_pow2(v) and v >= 16)}
        if bad:
            raise ValueError(f"the Triton kernel needs power-of-two tile sizes ≥ 16, got {bad}")
    Tp, Sp = pl.cdiv(T, block_t) * block_t, pl.cdiv(S, block_s) * block_s
    qt = jnp.moveaxis(q.astype(dtype), 2, 1)  # [B, J, T, D]: head j of a query tile is a contiguous [bt, D] block
    wt = jnp.moveaxis(w.astype(jnp.float32), 2, 1)  # [B, J, T]
    qp, kp, ks = q_pos.astype(jnp.int32), k_pos.astype(jnp.int32), keys.astype(dtype)
    if Tp != T:  # padded queries: position −1 sees nothing; their rows are dropped
        qt = jnp.pad(qt, ((0, 0), (0, 0), (0, Tp - T), (0, 0)))
        wt = jnp.pad(wt, ((0, 0), (0, 0), (0, Tp - T)))
        qp = jnp.pad(qp, ((0, 0), (0, Tp - T)), constant_values=-1)
    if Sp != S:  # padded keys: the largest position, past every query
        ks = jnp.pad(ks, ((0, 0), (0, Sp - S), (0, 0)))
        kp = jnp.pad(kp, ((0, 0), (0, Sp - S)), constant_values=jnp.iinfo(jnp.int32).max)

    dot_dtype = jnp.float32 if interpret and jax.default_backend() == "cpu" else None
    out = pl.pallas_call(
        functools.partial(_kernel, scale=float(D) ** -0.5, dot_dtype=dot_dtype),
        grid=(B, Tp // block_t, Sp // block_s),
        in_specs=[
            pl.BlockSpec((None, J, block_t, D), lambda b, i, j: (b, 0, i, 0)),
            pl.BlockSpec((None, J, block_t), lambda b, i, j: (b, 0, i)),
            pl.BlockSpec((None, block_t), lambda b, i, j: (b, i)),
            pl.BlockSpec((None, block_s, D), lambda b, i, j: (b, j, 0)),
            pl.BlockSpec((None, block_s), lambda b, i, j: (b, j)),
        ],
        out_specs=pl.BlockSpec((None, block_t, block_s), lambda b, i, j: (b, i, j)),
        out_shape=jax.ShapeDtypeStruct((B, Tp, Sp), jnp.float32),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="dsa_index_scores",
    )(qt, wt, qp, ks, kp)
    return out[:, :T, :S]
