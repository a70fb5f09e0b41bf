"""Gathered sparse MLA attention for DeepSeek-V3.2 (DSA): a flash-attention Pallas kernel (Triton backend) over
each query's selected latent rows (FlashMLA-sparse style).

After ``w_uk`` is absorbed into the query (REFERENCE §4), every head of query t attends over the same k selected
cache rows — latent c_kv[idx[t]] [k, C] and shared rope key k_rope[idx[t]] [k, R] — so one program takes one
query and a block of ``block_h`` heads as the GEMM's M dimension: it gathers ``block_k`` selected rows at a time
by index straight from HBM (each row is C + R contiguous values), scores them for all its heads with two dots,
and runs an online softmax in float32, so neither the gathered [T, k, C + R] rows nor a [T, S] matrix ever
exist. The same rows serve as the values (from registers, not a second read).

Mask: entry j of query t counts iff idx[t, j] ≥ 0 (the wrapper writes −1 for unselected fillers and for padding
up to a multiple of ``block_k``). Every query must have at least one selected key (its own position always
qualifies in causal self-attention); one with none gets an average of filler rows (the XLA path gives one too,
of other filler rows) — a case DSA never produces.

Off the GPU the same kernel runs in Pallas interpret mode (``interpret=True``): slow, for tests only. On the GPU
(Triton) the tiles need power-of-two sizes ≥ 16 for the dots: C, R, ``block_h`` and ``block_k``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from dsv3_jax.kernels.mla_decode import latent_tile_init, latent_tile_step


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def default_block_h(H: int) -> int:
    """Heads per program: all of them up to 64 (the [block_h, C] float32 accumulator lives in registers)."""
    return min(H, 64)


def pallas_fits(q_lat: jax.Array, q_rope: jax.Array, idx: jax.Array) -> bool:
    """Whether the Triton kernel takes these shapes and dtypes (bf16/f16, power-of-two widths ≥ 16)."""
    H, C = q_lat.shape[-2:]
    bh = default_block_h(H)
    return (q_lat.dtype in (jnp.bfloat16, jnp.float16) and all(_is_pow2(v) and v >= 16 for v in (C, q_rope.shape[-1], bh))
            and H % bh == 0)


def _kernel(q_ref, qr_ref, idx_ref, c_ref, kr_ref, o_ref, *, scale: float, block_k: int, dot_dtype):
    """One (row b, query t, head block h) program.

    q_ref [bh, C], qr_ref [bh, R], idx_ref [Kp] int32 (−1 = skip), c_ref [S, C], kr_ref [S, R] (row b's whole
    cache) → o_ref [bh, C] (normalised). ``dot_dtype``: operands cast to it first (interpret mode on CPU: XLA:CPU
    has no bf16 × bf16 → f32 dot inside the loop; bf16 products are exact in f32, so the results are the same).
    """
    cast = (lambda x: x.astype(dot_dtype)) if dot_dtype is not None else (lambda x: x)
    bh, C = q_ref.shape
    q = cast(q_ref[...])
    qr = cast(qr_ref[...])
    n_blocks = idx_ref.shape[0] // block_k

    def body(j, carry):
        ids = idx_ref[pl.ds(j * block_k, block_k)]  # [bk]
        ok = ids >= 0
        rows = jnp.where(ok, ids, 0)
        c = c_ref[rows, :]  # [bk, C]: the gather, row by row from HBM
        kr = kr_ref[rows, :]  # [bk, R]
        return latent_tile_step(carry, q, qr, c, kr, ok[None, :], scale, cast)

    acc, _, l = jax.lax.fori_loop(0, n_blocks, body, latent_tile_init(bh, C))
    o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("scale", "block_k", "block_h", "num_warps", "num_stages", "interpret"))
def sparse_latent_attention_fwd(q_lat: jax.Array, q_rope: jax.Array, c_kv: jax.Array, k_rope: jax.Array,
                                idx: jax.Array, valid: jax.Array, scale: float, *, block_k: int = 64,
                                block_h: int | None = None, num_warps: int | None = None, num_stages: int = 2,
                                interpret: bool = False) -> jax.Array:
    """softmax_j(scale · (q_lat·c_kv[idx_j] + q_rope·k_rope[idx_j])) over the valid j, times c_kv[idx_j], per head.

    q_lat [B,T,H,C] (w_uk absorbed), q_rope [B,T,H,R], c_kv [B,S,C], k_rope [B,S,R], idx [B,T,k] int, valid
    [B,T,k] bool → o_lat [B,T,H,C] in q_lat's dtype (scores, softmax and accumulation in float32; probabilities
    cast to c_kv's dtype for the value dot, as the XLA path does). Cost O(T·k·H·(C + R)), memory O(T·H·C).

    block_k: selected rows gathered per loop step. block_h: heads per program (default :func:`default_block_h`).
    num_warps / num_stages: Triton launch parameters (num_warps default 4 for ≤ 16 heads per program, else 8).
    """
    B, T, H, C = q_lat.shape
    S, R, K = c_kv.shape[1], k_rope.shape[-1], idx.shape[-1]
    if q_rope.shape != (B, T, H, R) or c_kv.shape != (B, S, C) or k_rope.shape != (B, S, R):
        raise ValueError(f"shapes: q_lat {q_lat.shape}, q_rope {q_rope.shape}, c_kv {c_kv.shape}, "
                         f"k_rope {k_rope.shape}")
    if idx.shape != (B, T, K) or valid.shape != (B, T, K):
        raise ValueError(f"idx {idx.shape} / valid {valid.shape}: expected {(B, T, K)}")
    bh = block_h or default_block_h(H)
    if H % bh:
        raise ValueError(f"block_h={bh} does not divide the {H} heads")
    if not interpret:
        bad = {k: v for k, v in {"C": C, "R": R, "block_h": bh, "block_k": block_k}.items()
               if not (_is_pow2(v) and v >= 16)}
        if bad:
            raise ValueError(f"the Triton kernel needs power-of-two tile sizes ≥ 16, got {bad}")
    Kp = pl.cdiv(K, block_k) * block_k
    ids = jnp.where(valid, idx, -1).astype(jnp.int32)
    if Kp != K:
        ids = jnp.pad(ids, ((0, 0), (0, 0), (0, Kp - K)), constant_values=-1)

    dot_dtype = jnp.float32 if interpret and jax.default_backend() == "cpu" else None
    kernel = functools.partial(_kernel, scale=float(scale), block_k=block_k, dot_dtype=dot_dtype)
    return pl.pallas_call(
        kernel,
        grid=(B, T, H // bh),
        in_specs=[
            pl.BlockSpec((None, None, bh, C), lambda b, t, h: (b, t, h, 0)),
            pl.BlockSpec((None, None, bh, R), lambda b, t, h: (b, t, h, 0)),
            pl.BlockSpec((None, None, Kp), lambda b, t, h: (b, t, 0)),
            pl.BlockSpec((None, S, C), lambda b, t, h: (b, 0, 0)),  # the row's whole cache; the kernel gathers
            pl.BlockSpec((None, S, R), lambda b, t, h: (b, 0, 0)),
        ],
        out_specs=pl.BlockSpec((None, None, bh, C), lambda b, t, h: (b, t, h, 0)),
        out_shape=jax.ShapeDtypeStruct((B, T, H, C), q_lat.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps or (4 if bh <= 16 else 8), num_stages=num_stages),
        interpret=interpret,
        name="dsa_sparse_latent_attention",
    )(q_lat, q_rope.astype(q_lat.dtype), ids, c_kv.astype(q_lat.dtype), k_rope.astype(q_lat.dtype))
