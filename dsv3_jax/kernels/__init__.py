"""Fast paths behind one function each, with a pure-JAX fallback chosen automatically off-GPU.

The block-scaled FP8 GEMMs (:mod:`dsv3_jax.kernels.fp8_gemm`) are the exception: Pallas kernels with no fallback
of their own, used by :mod:`dsv3_jax.fp8` only with ``DSV3_FP8_GEMM=pallas`` (interpret mode off-GPU).
"""

from dsv3_jax.kernels.attention import causal_attention
from dsv3_jax.kernels.fp8_gemm import block_scaled_grouped_matmul, block_scaled_kgrouped_matmul, block_scaled_matmul
from dsv3_jax.kernels.grouped_matmul import grouped_matmul

__all__ = ["block_scaled_grouped_matmul", "block_scaled_kgrouped_matmul", "block_scaled_matmul", "causal_attention",
           "grouped_matmul"]
