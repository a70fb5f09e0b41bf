"""Rotary position embedding with YaRN context extension (REFERENCE §3).

Frequencies and the two YaRN factors are plain NumPy functions of the config (computed once, at trace time);
``apply_rope`` rotates the decoupled rope dims of q and the shared rope key.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax.config import ModelConfig


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """``m(s, k) = 0.1·k·ln(s) + 1`` for s > 1, else 1 (REFERENCE §3)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _correction_dim(num_rotations: float, dim: int, base: float, max_pos: int) -> float:
    return dim * math.log(max_pos / (num_rotations * 2 * math.pi)) / (2 * math.log(base))


def inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Rotation frequencies [d/2] float32 for d = qk_rope_head_dim, YaRN-blended when configured."""
    d, base = cfg.qk_rope_head_dim, cfg.rope_theta
    freq = 1.0 / (base ** (np.arange(0, d, 2, dtype=np.float32) / np.float32(d)))
    if not cfg.uses_yarn:
        return freq.astype(np.float32)
    rs = cfg.rope_scaling
    assert rs is not None
    low = _correction_dim(rs.beta_fast, d, base, rs.original_max_position_embeddings)
    high = _correction_dim(rs.beta_slow, d, base, rs.original_max_position_embeddings)
    if rs.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(d // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    smooth = 1 - ramp  # 1 = keep the original (extrapolated) frequency
    return (freq / rs.factor * (1 - smooth) + freq * smooth).astype(np.float32)


def attention_factors(cfg: ModelConfig) -> tuple[float, float]:
    """(softmax scale, cos/sin factor) with YaRN's mscale terms as HF applies them (REFERENCE §3)."""
    scale = cfg.qk_head_dim ** -0.5
    rs = cfg.rope_scaling
    if not cfg.uses_yarn or rs is None:
        return scale, 1.0
    if rs.mscale_all_dim:
        scale *= yarn_mscale(rs.factor, rs.mscale_all_dim) ** 2
    if rs.attention_factor is not None:
        cos_factor = rs.attention_factor
    elif rs.mscale and rs.mscale_all_dim:
        cos_factor = yarn_mscale(rs.factor, rs.mscale) / yarn_mscale(rs.factor, rs.mscale_all_dim)
    else:
        cos_factor = yarn_mscale(rs.factor)
    return scale, cos_factor


def rope_tables(cfg: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin [B, T, d/2] float32 for integer positions [B, T] (the cos/sin factor folded in)."""
    freq = jnp.asarray(inv_freq(cfg))
    _, factor = attention_factors(cfg)
    angles = positions.astype(jnp.float32)[..., None] * freq
    return jnp.cos(angles) * factor, jnp.sin(angles) * factor


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array, interleave: bool) -> jax.Array:
    """Rotate x [B, T, H, d] (or [B, T, d]) by cos/sin [B, T, d/2]; computed in f32, returned in x.dtype.

    ``interleave``: pairs are (x[2i], x[2i+1]) — the official checkpoint layout; else (x[i], x[i+d/2]).
    The output keeps the input's layout, so q·k is the same whichever layout both use.
    """
    if x.ndim == cos.ndim + 1:
        cos, sin = cos[..., None, :], sin[..., None, :]
    xf = x.astype(jnp.float32)
    if interleave:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        out = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(x.shape)
    else:
        half = x.shape[-1] // 2
        x1, x2 = xf[..., :half], xf[..., half:]
        out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
