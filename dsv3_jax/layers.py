"""Small shared pieces: Linear (einsum with a logically-named kernel), RMSNorm, SwiGLU MLP, embedding.

Every parameter carries logical axis names (``sharding/rules.py`` maps them to mesh axes); no mesh code here.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsv3_jax import fp8
from dsv3_jax.config import ModelConfig


def dtype_of(name: str) -> jnp.dtype:
    return jnp.dtype(name)


def normal_init(std: float) -> nn.initializers.Initializer:
    return nn.initializers.normal(stddev=std)


def linear_args(cfg: ModelConfig) -> dict[str, Any]:
    """The :class:`Linear` settings every projection of the recipe takes from the config (FP8 included)."""
    return {"dtype": cfg.dtype, "param_dtype": cfg.param_dtype, "init_std": cfg.initializer_range, "fp8": cfg.fp8,
            "fp8_pow2_scales": cfg.fp8_pow2_scales, "fp8_weights": cfg.fp8_weights}


class Linear(nn.Module):
    """``y[..., *out] = x[..., *in] · W[*in, *out]`` — a bias-free projection.

    ``in_dims`` trailing dims of ``x`` are contracted (2 for o_proj's [H, v] input). The kernel is stored
    [*in, *out] (HF stores [out, in]; ``dsv3_jax.hf`` transposes). Compute in ``dtype``, accumulate in f32.
    Called with ``x=None`` and ``in_shape`` it returns the kernel itself (MLA's absorbed path needs it).

    ``fp8``: all three GEMMs in E4M3 with fine-grained scales (:func:`dsv3_jax.fp8.fp8_dot`, REFERENCE §8).
    ``fp8_weights``: the kernel is stored E4M3 with ``kernel_scale_inv`` [ceil(K/128), ceil(N/128)] over the
    flattened [K = prod(in), N = prod(out)] (an FP8 checkpoint's blocks, transposed); forward only.
    """

    features: tuple[int, ...]
    axes: tuple[str, ...]  # logical names of the kernel dims, inputs first
    in_dims: int = 1
    dtype: str = "bfloat16"
    param_dtype: str = "float32"
    init_std: float = 0.006
    out_dtype: str | None = None  # default: dtype (the LM head asks for float32 logits)
    fp8: bool = False
    fp8_pow2_scales: bool = False
    fp8_weights: bool = False

    @nn.compact
    def __call__(self, x: jax.Array | None, in_shape: tuple[int, ...] | None = None) -> jax.Array:
        if x is not None:
            in_shape = x.shape[x.ndim - self.in_dims:]
        assert in_shape is not None and len(in_shape) == self.in_dims
        shape = (*in_shape, *self.features)
        out_dtype = dtype_of(self.out_dtype or self.dtype)
        if self.fp8_weights:
            w = fp8_weight_param(self, "kernel", shape, self.axes, self.in_dims)
            if x is None:
                return dequantize_weight(w, self.in_dims)
            if self.fp8:
                return fp8.fp8_dot(x, w, self.in_dims, self.fp8_pow2_scales, out_dtype)
            return project(x, dequantize_weight(w, self.in_dims, dtype_of(self.dtype)), self.in_dims,
                           dtype_of(self.dtype), out_dtype)
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(normal_init(self.init_std), self.axes),
            shape,
            dtype_of(self.param_dtype),
        )
        if x is None:
            return kernel
        if self.fp8:
            return fp8.fp8_dot(x, kernel, self.in_dims, self.fp8_pow2_scales, out_dtype)
        return project(x, kernel, self.in_dims, dtype_of(self.dtype), out_dtype)


def fp8_weight_param(module: nn.Module, name: str, shape: tuple[int, ...], axes: tuple[str | None, ...],
                     in_dims: int, lead: int = 0) -> fp8.Quantized:
    """Declare an E4M3 weight ``name`` [*lead, *in, *out] and its ``{name}_scale_inv`` [*lead, Kb, Nb].

    ``lead`` leading dims (the expert axis) each hold their own block grid over the flattened [K, N].
    """
    K, N = math.prod(shape[lead: lead + in_dims]), math.prod(shape[lead + in_dims:])
    q = module.param(name, nn.with_logical_partitioning(nn.initializers.zeros, axes), shape, fp8.E4M3_JNP)
    grid = (*shape[:lead], -(-K // fp8.BLOCK), -(-N // fp8.BLOCK))
    scale = module.param(f"{name}_scale_inv", nn.with_logical_partitioning(nn.initializers.ones,
                                                                         (*axes[:lead], None, None)),
                         grid, jnp.float32)
    return fp8.Quantized(q, scale)


def dequantize_weight(w: fp8.Quantized, in_dims: int, dtype: jnp.dtype = jnp.float32, lead: int = 0) -> jax.Array:
    """E4M3 blocks [*lead, *in, *out] + scale_inv [*lead, Kb, Nb] → ``dtype`` [*lead, *in, *out]."""
    shape = w.q.shape
    K = math.prod(shape[lead: lead + in_dims])
    flat = fp8.Quantized(w.q.reshape(*shape[:lead], K, -1), w.scale)
    return fp8.dequantize(flat, fp8.WEIGHT, dtype).reshape(shape)


def _dims(x: jax.Array, in_dims: int):
    return ((tuple(range(x.ndim - in_dims, x.ndim)), tuple(range(in_dims))), ((), ()))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _dot_wide_out(x: jax.Array, kernel: jax.Array, in_dims: int) -> jax.Array:
    """x · kernel in their (narrow) dtype with a float32 result whose gradient GEMMs stay in the narrow dtype.

    Plain autodiff would carry the f32 cotangent into both backward GEMMs (TF32 on Hopper: the LM head's
    backward alone cost ~30 ms of a 224 ms bench step); the cotangent is rounded to x.dtype instead.
    """
    return jax.lax.dot_general(x, kernel, _dims(x, in_dims), preferred_element_type=jnp.float32)


def _dot_wide_fwd(x, kernel, in_dims):
    return _dot_wide_out(x, kernel, in_dims), (x, kernel)


def _dot_wide_bwd(in_dims, res, g):
    x, kernel = res
    _, vjp = jax.vjp(lambda a, b: jax.lax.dot_general(a, b, _dims(a, in_dims), preferred_element_type=x.dtype),
                     x, kernel)
    return vjp(g.astype(x.dtype))


_dot_wide_out.defvjp(_dot_wide_fwd, _dot_wide_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _dot_narrow(x: jax.Array, kernel: jax.Array, in_dims: int, dtype: jnp.dtype) -> jax.Array:
    """x · kernel.astype(dtype) → dtype (f32 accumulation inside the GEMM), with every backward GEMM on
    ``dtype`` inputs: dx in x.dtype, dkernel in kernel.dtype (the f32 master's gradient, f32-accumulated).

    Autodiff of "f32 result, then cast" carried an f32 cotangent into both backward GEMMs, which made them
    f32 × f32 (TF32 on Hopper: ~12 ms of a 209 ms bench step, 26 GEMMs).
    """
    return jax.lax.dot_general(x, kernel.astype(dtype), _dims(x, in_dims), preferred_element_type=dtype)


def _dot_narrow_fwd(x, kernel, in_dims, dtype):
    return _dot_narrow(x, kernel, in_dims, dtype), (x, kernel)


def _dot_narrow_bwd(in_dims, dtype, res, g):
    x, kernel = res
    nb = x.ndim - in_dims  # leading (token) dims of x and g
    g = g.astype(dtype)
    lead = tuple(range(nb))
    dk = jax.lax.dot_general(x, g, ((lead, lead), ((), ())), preferred_element_type=kernel.dtype)
    out = tuple(range(nb, g.ndim))
    dx = jax.lax.dot_general(g, kernel.astype(dtype), ((out, tuple(range(in_dims, kernel.ndim))), ((), ())),
                             preferred_element_type=x.dtype)
    return dx, dk


_dot_narrow.defvjp(_dot_narrow_fwd, _dot_narrow_bwd)


def project(x: jax.Array, kernel: jax.Array, in_dims: int, dtype: jnp.dtype,
            out_dtype: jnp.dtype | None = None) -> jax.Array:
    """Contract the last ``in_dims`` dims of x with the first ``in_dims`` of kernel in ``dtype`` (f32 accumulate)."""
    out_dtype = jnp.dtype(out_dtype or dtype)
    if out_dtype.itemsize > jnp.dtype(dtype).itemsize:  # e.g. f32 logits from a bf16 head
        return _dot_wide_out(x.astype(dtype), kernel.astype(dtype), in_dims).astype(out_dtype)
    return _dot_narrow(x.astype(dtype), kernel, in_dims, jnp.dtype(dtype)).astype(out_dtype)


class RMSNorm(nn.Module):
    """``x · rsqrt(mean(x²) + eps) · w`` in float32 (REFERENCE §2, §12); returns ``dtype``."""

    eps: float = 1e-6
    dtype: str = "bfloat16"
    param_dtype: str = "float32"
    axis_name: str = "embed"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        w = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)),
                       (x.shape[-1],), dtype_of(self.param_dtype))
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        # HF casts the normalised activations to the input dtype before the weight multiply.
        return (w.astype(jnp.float32) * y.astype(x.dtype).astype(jnp.float32)).astype(dtype_of(self.dtype))


class MLP(nn.Module):
    """SwiGLU feed-forward ``down(silu(gate(x)) · up(x))``: x [..., d] → [..., d]. Dense layers and shared experts."""

    cfg: ModelConfig
    width: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.cfg
        lin = linear_args(c)
        gate = Linear((self.width,), ("embed", "mlp"), name="gate_proj", **lin)(x)
        up = Linear((self.width,), ("embed", "mlp"), name="up_proj", **lin)(x)
        h = logical(swiglu(gate, up), ("activation_batch", "activation_length", "activation_mlp"))
        return Linear((x.shape[-1],), ("mlp", "embed"), name="down_proj", **lin)(h)


def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
    """silu(gate) · up, the SwiGLU activation (silu computed in float32)."""
    return (jax.nn.silu(gate.astype(jnp.float32)) * up.astype(jnp.float32)).astype(gate.dtype)


class Embed(nn.Module):
    """Token embedding table [vocab, d]; ``attend`` gives tied-head logits."""

    cfg: ModelConfig

    def setup(self) -> None:
        c = self.cfg
        self.embedding = self.param(
            "embedding", nn.with_logical_partitioning(normal_init(c.initializer_range), ("vocab", "embed")),
            (c.vocab_size, c.hidden_size), dtype_of(c.param_dtype))

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """tokens [B, T] int → [B, T, d] in the compute dtype."""
        return jnp.take(self.embedding, tokens, axis=0).astype(dtype_of(self.cfg.dtype))


def logical(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Annotate an activation with logical axis names (a no-op outside a mesh + rules context)."""
    return nn.with_logical_constraint(x, tuple(axes))
