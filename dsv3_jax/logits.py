"""Logit checker: run the main head over given tokens, to compare converted weights against another stack.

    python -m dsv3_jax.logits --hf-dir DIR --tokens TOKENS.npy --out LOGITS.npy [--dtype float32]
    python -m dsv3_jax.logits --checkpoint CKPT_DIR --tokens TOKENS.npy --out LOGITS.npy

TOKENS.npy holds int32 [B, T]; LOGITS.npy receives float32 [B, T, vocab] (positions 0..T-1, causal).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import jax
import numpy as np

from dsv3_jax.hf import CheckpointError, load_hf
from dsv3_jax.model import Transformer
from dsv3_jax.params_io import load_variables


def compute_logits(variables: dict, cfg, tokens: np.ndarray, dtype: str = "float32") -> np.ndarray:
    """float32 logits [B, T, V] of the main head for int tokens [B, T], computing in ``dtype``."""
    cfg = dataclasses.replace(cfg, dtype=dtype)
    fn = jax.jit(lambda v, t: Transformer(cfg).apply(v, t, mtp=False).logits)
    return np.asarray(fn(variables, tokens), np.float32)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dsv3_jax.logits", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf-dir")
    src.add_argument("--checkpoint")
    ap.add_argument("--tokens", required=True, help="int32 [B, T] .npy")
    ap.add_argument("--out", required=True, help="float32 [B, T, vocab] .npy to write")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
    a = ap.parse_args(argv)
    try:
        tokens = np.load(a.tokens)
    except (OSError, ValueError) as e:
        print(f"error: cannot read --tokens {a.tokens}: {e}", file=sys.stderr)
        return 2
    if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
        print(f"error: --tokens must hold an integer [B, T] array, got {tokens.dtype} {list(tokens.shape)}",
              file=sys.stderr)
        return 2
    try:
        if a.hf_dir:
            variables, cfg = load_hf(a.hf_dir, dtype="float32", strict=False)
        else:
            variables, full = load_variables(a.checkpoint)
            cfg = full.model
    except (CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if tokens.min() < 0 or tokens.max() >= cfg.vocab_size:
        print(f"error: token ids must be in [0, {cfg.vocab_size}); got [{tokens.min()}, {tokens.max()}]",
              file=sys.stderr)
        return 2
    logits = compute_logits(variables, cfg, tokens.astype(np.int32), a.dtype)
    np.save(a.out, logits)
    print(f"wrote {a.out}: float32 {list(logits.shape)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
