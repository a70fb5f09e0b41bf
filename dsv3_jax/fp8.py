"""FP8 (E4M3) block scaling: the official checkpoint format and the training recipe's quantisers (REFERENCE §8).

Weights: one float32 scale per 128×128 block, stored as ``weight_scale_inv`` (the multiplier that dequantises):
``W = W_fp8[block] · scale_inv[block]``, grid ``[ceil(out/128), ceil(in/128)]`` with partial edge blocks.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np

E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
E4M3_MAX = float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)  # 448
BLOCK = 128


def block_grid(shape: tuple[int, int], block: int = BLOCK) -> tuple[int, int]:
    """Scale-grid shape for a [rows, cols] weight: ceil on both dims (edge blocks are partial)."""
    return math.ceil(shape[0] / block), math.ceil(shape[1] / block)


def expand_blocks(scale: np.ndarray, shape: tuple[int, int], block: int = BLOCK) -> np.ndarray:
    """Broadcast a block grid [ceil(r/b), ceil(c/b)] to a full [r, c] array (edge blocks cropped)."""
    return np.repeat(np.repeat(scale, block, axis=0), block, axis=1)[: shape[0], : shape[1]]


def dequantize_blocks(w_fp8: np.ndarray, scale_inv: np.ndarray, block: int = BLOCK,
                      dtype: np.dtype = np.float32) -> np.ndarray:
    """float8 [r, c] and float32 scale_inv [ceil(r/b), ceil(c/b)] → ``dtype`` [r, c]."""
    if w_fp8.ndim != 2:
        raise ValueError(f"FP8 block dequantisation expects a 2-D weight, got shape {w_fp8.shape}")
    want = block_grid(w_fp8.shape, block)
    if tuple(scale_inv.shape) != want:
        raise ValueError(f"weight_scale_inv has shape {tuple(scale_inv.shape)}; a {w_fp8.shape} weight with "
                         f"{block}×{block} blocks needs {want} (ceil on both dims)")
    out = w_fp8.astype(np.float32) * expand_blocks(scale_inv.astype(np.float32), w_fp8.shape, block)
    return out.astype(dtype)


def quantize_blocks(w: np.ndarray, block: int = BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """[r, c] → (float8_e4m3fn [r, c], scale_inv float32 grid) with ``scale = amax(block) / 448``."""
    w = np.asarray(w, np.float32)
    gr, gc = block_grid(w.shape, block)
    padded = np.zeros((gr * block, gc * block), np.float32)
    padded[: w.shape[0], : w.shape[1]] = w  # zero padding: edge blocks' amax over the real values only
    amax = np.abs(padded.reshape(gr, block, gc, block)).max(axis=(1, 3))
    scale = np.where(amax > 0, amax / E4M3_MAX, 1.0).astype(np.float32)
    q = (w / expand_blocks(scale, w.shape, block)).astype(E4M3)
    return q, scale
