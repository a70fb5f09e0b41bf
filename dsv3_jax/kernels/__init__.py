"""Fast paths behind one function each, with a pure-JAX fallback chosen automatically off-GPU."""

from dsv3_jax.kernels.attention import causal_attention
from dsv3_jax.kernels.grouped_matmul import grouped_matmul

__all__ = ["causal_attention", "grouped_matmul"]
