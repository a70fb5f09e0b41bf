"""Fill-in-Middle at document level, before packing (REFERENCE §9).

With probability ``rate`` a document is cut at two character positions into prefix / middle / suffix and
re-ordered in PSM form; every document then ends with EOS:

    <｜fim▁begin｜> prefix <｜fim▁hole｜> suffix <｜fim▁end｜> middle <｜end▁of▁sentence｜>

The pieces are tokenised separately and the special ids spliced in, so text that happens to spell a special
token can never become one.
"""

from __future__ import annotations

import numpy as np

from dsv3_jax.data.tokenizer import Tokenizer


def fim_split_points(length: int, rng: np.random.Generator, rate: float) -> tuple[int, int] | None:
    """``(a, b)`` with ``0 ≤ a ≤ b ≤ length`` (prefix = text[:a], middle = text[a:b], suffix = text[b:]) with
    probability ``rate``, else None. Always draws the same numbers from ``rng``, so the choice at one rate
    does not shift the split points drawn at another."""
    u, a, b = rng.random(), int(rng.integers(0, length + 1)), int(rng.integers(0, length + 1))
    if u >= rate:
        return None
    return (a, b) if a <= b else (b, a)


def encode_document(tokenizer: Tokenizer, text: str, split: tuple[int, int] | None = None) -> np.ndarray:
    """Token ids ``[n] int32`` of one document: plain or PSM (``split`` from :func:`fim_split_points`) + EOS."""
    if split is None:
        ids = tokenizer.encode(text)
        ids.append(tokenizer.eos_id)
        return np.asarray(ids, np.int32)
    if not tokenizer.has_fim:
        raise ValueError(f"tokenizer {tokenizer.name!r} has no FIM tokens; use split=None")
    a, b = split
    prefix, middle, suffix = text[:a], text[a:b], text[b:]
    ids = [tokenizer.fim_begin_id, *tokenizer.encode(prefix), tokenizer.fim_hole_id, *tokenizer.encode(suffix),
           tokenizer.fim_end_id, *tokenizer.encode(middle), tokenizer.eos_id]
    return np.asarray(ids, np.int32)
