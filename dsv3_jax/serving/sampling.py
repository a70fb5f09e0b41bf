"""Sampling: per-request parameters, the token distribution they define, and text-level stopping.

Device side (inside the jitted engine steps, one row per cache slot): :func:`token_probs` turns logits into
the distribution a request samples from (temperature, top-k, top-p; temperature 0 = greedy, a one-hot at
the argmax), :func:`row_keys` gives each row a key that depends only on the request's seed and the index
of the token being drawn — so a seeded request draws the same tokens alone or batched with others.

Host side: :class:`TextStream` detokenizes incrementally, finds stop strings and holds back text that may
still become one, so a stream never shows a stop string or half a UTF-8 character.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp


class RequestError(ValueError):
    """A request the engine will not run; ``param`` names the offending field (OpenAI error body)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one request picks tokens and when it stops.

    ``temperature`` 0 = greedy; ``top_k`` 0 = off; ``top_p`` in (0, 1]; ``seed`` None = fresh randomness.
    Generation stops at ``max_tokens``, at EOS (unless ``ignore_eos``), at any of ``stop_token_ids``, or when
    the text contains one of ``stop`` (the text is cut before it).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def check(self) -> None:
        """Raise :class:`RequestError` naming the first parameter out of range."""
        def bad(param: str, why: str) -> RequestError:
            return RequestError(f"{param}={getattr(self, param)!r}: {why}", param, "invalid_value")

        if not isinstance(self.max_tokens, int) or self.max_tokens <= 0:
            raise bad("max_tokens", "must be a positive integer")
        if not 0.0 <= self.temperature <= 2.0:
            raise bad("temperature", "must be in [0, 2] (0 = greedy)")
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", "must be in (0, 1]")
        if not isinstance(self.top_k, int) or not 0 <= self.top_k < 2**31:
            raise bad("top_k", "must be in [0, 2^31) (0 or -1 = off)")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise bad("seed", "must be in [0, 2^63)")
        if len(self.stop) > 16 or any(not s or len(s) > 256 for s in self.stop):
            raise bad("stop", "at most 16 non-empty strings of at most 256 characters")
        if len(self.stop_token_ids) > 256 or any(not 0 <= t < 2**31 for t in self.stop_token_ids):
            raise bad("stop_token_ids", "at most 256 token ids in [0, 2^31)")


# ----------------------------------------------------------------------------------------------------------
# Device side
# ----------------------------------------------------------------------------------------------------------


def token_probs(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """logits [B, V] f32, temperature [B] f32, top_k [B] int32 (0 = off), top_p [B] f32 → probs [B, V] f32.

    Greedy rows (temperature 0) get a one-hot at the argmax, so speculative acceptance treats them exactly.
    Top-k keeps the k largest logits, then top-p the smallest prefix (by probability) whose mass reaches
    top_p; ties at either threshold are kept.
    """
    V = logits.shape[-1]
    greedy = temperature <= 0
    x = logits / jnp.where(greedy, 1.0, temperature)[:, None]

    def truncate(x: jax.Array) -> jax.Array:
        s = -jnp.sort(-x, axis=-1)  # descending [B, V]
        k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)
        kth = jnp.take_along_axis(s, (k - 1)[:, None], axis=-1)  # [B, 1]
        s = jnp.where(s >= kth, s, -jnp.inf)
        ps = jax.nn.softmax(s, axis=-1)
        before = jnp.cumsum(ps, axis=-1) - ps  # mass strictly above each sorted entry
        n_keep = jnp.maximum(jnp.sum(before < top_p[:, None], axis=-1), 1)
        thr = jnp.take_along_axis(s, (n_keep - 1)[:, None], axis=-1)
        return jnp.where(x >= jnp.maximum(thr, kth), x, -jnp.inf)

    # The sort is the costliest part of a small step: skip it when no sampled row truncates.
    truncating = ~greedy & (((top_k > 0) & (top_k < V)) | (top_p < 1.0))
    x = jax.lax.cond(jnp.any(truncating), truncate, lambda x: x, x)
    probs = jax.nn.softmax(x, axis=-1)
    onehot = jax.nn.one_hot(jnp.argmax(logits, axis=-1), V, dtype=probs.dtype)
    return jnp.where(greedy[:, None], onehot, probs)


def row_keys(seeds: jax.Array, counters: jax.Array, stream: int) -> jax.Array:
    """One PRNG key per row from seeds [B] uint32, counters [B] int32 (index of the token drawn) and a stream
    id (separates the draws of one token: sample, acceptance test, draft) → keys [B]."""
    def one(seed, counter):
        return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), counter), stream)

    return jax.vmap(one)(seeds, counters)


def sample(probs: jax.Array, keys: jax.Array) -> jax.Array:
    """Draw one token per row: probs [B, V], keys [B] → [B] int32 (one-hot rows give their argmax)."""
    one_hot = probs.max(-1) >= 1.0
    top = jnp.argmax(probs, -1).astype(jnp.int32)

    def draw(probs: jax.Array) -> jax.Array:
        drawn = jax.vmap(jax.random.categorical)(keys, jnp.log(jnp.maximum(probs, 0.0)))
        return jnp.where(one_hot, top, drawn).astype(jnp.int32)

    # All-greedy batches skip drawing V Gumbel variates per row.
    return jax.lax.cond(jnp.all(one_hot), lambda p: top, draw, probs)


# ----------------------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------------------


class TextStream:
    """Incremental detokenization with stop strings.

    ``push(token)`` returns the text that is now safe to show; ``stopped`` turns True when a stop string
    appears (the text is cut before it). ``finish()`` returns what was held back. Only completed characters
    are emitted (byte-level BPE can split one character over several tokens).
    """

    def __init__(self, decode: Callable[[Sequence[int]], str], stop: Sequence[str] = ()) -> None:
        self._decode = decode
        self._stop = tuple(stop)
        self._ids: list[int] = []
        self._prefix = 0  # ids[_prefix:_read] decode to the tail of text already accounted for
        self._read = 0
        self.text = ""  # all completed text (cut at a stop string once found)
        self._shown = 0  # chars of self.text already returned
        self.stopped = False

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        self._ids.append(token)
        self._advance(final=False)
        return self._take(len(self.text) if self.stopped else len(self.text) - self._held())

    def finish(self) -> str:
        """The rest of the text (an incomplete last character shows as U+FFFD, as any decoder would)."""
        if not self.stopped:
            self._advance(final=True)
        return self._take(len(self.text))

    def _advance(self, final: bool) -> None:
        before = self._decode(self._ids[self._prefix:self._read])
        after = self._decode(self._ids[self._prefix:])
        if len(after) <= len(before) or (after.endswith("\ufffd") and not final):
            return
        start = max(0, len(self.text) - max((len(s) for s in self._stop), default=0))
        self.text += after[len(before):]
        self._prefix, self._read = self._read, len(self._ids)
        hits = [i for s in self._stop if (i := self.text.find(s, start)) >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            self.stopped = True

    def _held(self) -> int:
        """Length of the longest text suffix that is a proper prefix of a stop string."""
        for n in range(min(len(self.text), max((len(s) for s in self._stop), default=0)), 0, -1):
            if any(s.startswith(self.text[-n:]) and len(s) > n for s in self._stop):
                return n
        return 0

    def _take(self, end: int) -> str:
        out = self.text[self._shown:end]
        self._shown = max(self._shown, end)
        return out
