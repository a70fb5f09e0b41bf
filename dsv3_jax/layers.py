"""Small shared pieces: Linear (einsum with a logically-named kernel), RMSNorm, SwiGLU MLP, embedding.

Every parameter carries logical axis names (``sharding/rules.py`` maps them to mesh axes); no mesh code here.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsv3_jax.config import ModelConfig


def dtype_of(name: str) -> jnp.dtype:
    return jnp.dtype(name)


def normal_init(std: float) -> nn.initializers.Initializer:
    return nn.initializers.normal(stddev=std)


class Linear(nn.Module):
    """``y[..., *out] = x[..., *in] · W[*in, *out]`` — a bias-free projection.

    ``in_dims`` trailing dims of ``x`` are contracted (2 for o_proj's [H, v] input). The kernel is stored
    [*in, *out] (HF stores [out, in]; ``dsv3_jax.hf`` transposes). Compute in ``dtype``, accumulate in f32.
    Called with ``x=None`` and ``in_shape`` it returns the kernel itself (MLA's absorbed path needs it).
    """

    features: tuple[int, ...]
    axes: tuple[str, ...]  # logical names of the kernel dims, inputs first
    in_dims: int = 1
    dtype: str = "bfloat16"
    param_dtype: str = "float32"
    init_std: float = 0.006
    out_dtype: str | None = None  # default: dtype (the LM head asks for float32 logits)

    @nn.compact
    def __call__(self, x: jax.Array | None, in_shape: tuple[int, ...] | None = None) -> jax.Array:
        if x is not None:
            in_shape = x.shape[x.ndim - self.in_dims:]
        assert in_shape is not None and len(in_shape) == self.in_dims
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(normal_init(self.init_std), self.axes),
            (*in_shape, *self.features),
            dtype_of(self.param_dtype),
        )
        if x is None:
            return kernel
        return project(x, kernel, self.in_dims, dtype_of(self.dtype), dtype_of(self.out_dtype or self.dtype))


def project(x: jax.Array, kernel: jax.Array, in_dims: int, dtype: jnp.dtype,
            out_dtype: jnp.dtype | None = None) -> jax.Array:
    """Contract the last ``in_dims`` dims of x with the first ``in_dims`` of kernel in ``dtype`` (f32 accumulate)."""
    contract_x = tuple(range(x.ndim - in_dims, x.ndim))
    contract_k = tuple(range(in_dims))
    y = jax.lax.dot_general(
        x.astype(dtype), kernel.astype(dtype), ((contract_x, contract_k), ((), ())),
        preferred_element_type=jnp.float32,
    )
    return y.astype(out_dtype or dtype)


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
        lin = dict(dtype=c.dtype, param_dtype=c.param_dtype, init_std=c.initializer_range)
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
