"""The serving engine: a slot-preallocated latent cache, bucketed prefill, one jitted decode step for all slots.

    engine = Engine(cfg, variables, tokenizer=tok, max_slots=8, max_len=2048)
    [c] = engine.generate([tok.encode("def fib(n):")], SamplingParams(max_tokens=32, temperature=0))
    engine.start(); engine.submit(ids, params, on_event=callback); ...; engine.stop()   # background thread

Cache: ``max_slots`` rows × ``max_len`` (+ K for speculation) latent slots per layer (REFERENCE §4); slot s of a
row holds the token at position s. A request owns one row from admission to its last token (continuous
batching: requests join and leave between steps).

- Prefill (naive MLA path): the prompt, padded *after* its end to a power-of-two bucket, runs alone over the
  first ``bucket`` slots of its row. Padding writes slots past the prompt, which decoding overwrites before
  any query attends to them (attention only covers slots ≤ the query's position), so it never leaks.
- Decode (absorbed MLA path): one jitted step feeds every row its last token at its own position; free rows
  run on dummy inputs that only touch their own (free) row. Shapes are fixed, so nothing recompiles per
  request: one compile per prefill bucket and one for the decode step (``traces`` counts them).
  ``decode_chunk`` steps run per device call (one host round trip) while no waiting request needs a row.
- Speculative (``speculative=True``): the decode step verifies the MTP drafts and drafts anew
  (``speculative.py``); each step commits 1 .. K+1 tokens per row (``decode_chunk`` steps per call too).

Threading: ``submit``/``cancel`` may be called from any thread; everything else runs on the engine thread
(``start``) or on the caller's thread (``generate`` without ``start``). ``on_event`` callbacks run on the
engine thread and must not block.

Failures: an exception while admitting a request (its prefill) ends that request alone with finish_reason
"error"; only a failed decode step, which holds every row, fails all requests in flight and resets the cache.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import itertools
import logging
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax.config import ModelConfig
from dsv3_jax.model import Transformer, head_logits, init_cache, init_mtp_cache
from dsv3_jax.serving import speculative
from dsv3_jax.serving.sampling import RequestError, SamplingParams, TextStream, row_keys, sample, token_probs

log = logging.getLogger(__name__)

RATE_WINDOW_S = 10.0  # tokens/s is measured over this window


class EngineBusy(RequestError):
    """The waiting queue is full; retry later (HTTP 429)."""


@dataclasses.dataclass
class Event:
    """Progress of one request: the tokens and text produced since the last event; ``finish_reason`` is set
    on the last event ("stop", "length", "cancelled" or "error")."""

    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int


@dataclasses.dataclass
class Completion:
    request_id: str
    prompt_tokens: int
    token_ids: list[int]
    text: str
    finish_reason: str


@dataclasses.dataclass
class _Request:
    id: str
    prompt: list[int]
    params: SamplingParams
    on_event: Callable[[Event], None] | None
    seed: int  # 32-bit, mixed from params.seed or fresh


@dataclasses.dataclass
class _Row:
    """A request in a cache row: ``last`` (the newest token, at position ``pos``) is not yet in the cache."""

    req: _Request
    pos: int
    last: int
    out: list[int]
    text: TextStream | None
    drafts: list[int]


def prefill_buckets(min_bucket: int, max_len: int) -> tuple[int, ...]:
    """Powers of two from ``min_bucket`` up to (and capped at) ``max_len``."""
    out, b = [], min_bucket
    while b < max_len:
        out.append(b)
        b *= 2
    return (*out, max_len)


def _seed32(seed: int | None) -> int:
    if seed is None:
        return secrets.randbits(32)
    return int.from_bytes(hashlib.blake2b(str(seed).encode(), digest_size=4).digest(), "little")


class Engine:
    """Continuous-batching generation over a fixed set of cache rows (see the module docstring).

    ``variables`` {'params', 'router'}; ``tokenizer`` (anything with ``decode(ids)`` and ``eos_id``) enables
    text output and stop strings; ``max_len`` is the context (prompt + completion), default
    min(max_position_embeddings, 4096); ``max_queue`` bounds waiting requests (beyond it: :class:`EngineBusy`).
    """

    def __init__(self, cfg: ModelConfig, variables: dict, *, tokenizer: Any = None, eos_id: int | None = None,
                 max_slots: int = 8, max_len: int | None = None, min_bucket: int = 16, speculative: bool = False,
                 cache_dtype: str | None = None, max_queue: int = 4096, decode_chunk: int = 1) -> None:
        if speculative and not cfg.num_nextn_predict_layers:
            raise ValueError("speculative decoding drafts with the MTP modules, but the model has none "
                             "(model.num_nextn_predict_layers=0); run without --speculative")
        self.cfg = cfg
        self.variables = jax.device_put(variables)
        self.tokenizer = tokenizer
        self.eos_id = eos_id if eos_id is not None else getattr(tokenizer, "eos_id", None)
        self.max_slots = max_slots
        self.max_len = max_len or min(cfg.max_position_embeddings, 4096)
        self.buckets = prefill_buckets(min(min_bucket, self.max_len), self.max_len)
        self.K = cfg.num_nextn_predict_layers if speculative else 0
        self.max_queue = max_queue
        if decode_chunk < 1:
            raise ValueError(f"decode_chunk={decode_chunk}: must be ≥ 1")
        self.decode_chunk = decode_chunk
        self._single_step = False  # warmup: force the single-step variant
        self._cache_len = self.max_len + self.K  # a verify window may reach K slots past the context
        self._cache_dtype = cache_dtype
        self._reset_state()

        self.traces: collections.Counter[str] = collections.Counter()  # one entry per compile
        self._prefill_jit = jax.jit(self._prefill, donate_argnums=(1, 2, 3))
        self._decode_jit = jax.jit(self._decode, donate_argnums=(1,), static_argnums=(9,))
        self._spec_jit = jax.jit(self._spec, donate_argnums=(1, 2, 3), static_argnums=(11,))

        self._lock = threading.Condition()
        self._waiting: collections.deque[_Request] = collections.deque()
        self._cancelled: set[str] = set()
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        # Metrics (read from other threads; ints and floats are updated atomically enough for reporting).
        self.requests_total = 0
        self.requests_cancelled = 0
        self.tokens_total = 0
        self.drafted_total = 0
        self.accepted_total = 0
        self.steps_total = 0
        self._recent: collections.deque[tuple[float, int]] = collections.deque(maxlen=100_000)  # (time, tokens)

    # ------------------------------------------------------------------------------------------------------
    # Public API
    # ------------------------------------------------------------------------------------------------------

    def submit(self, prompt: Sequence[int], params: SamplingParams,
               on_event: Callable[[Event], None] | None = None, request_id: str | None = None) -> str:
        """Queue a request (thread-safe); returns its id. Raises :class:`RequestError` when it cannot run."""
        prompt = [int(t) for t in prompt]
        self.check(prompt, params)
        rid = request_id or f"req-{next(self._ids)}"
        req = _Request(rid, prompt, params, on_event, _seed32(params.seed))
        with self._lock:
            if len(self._waiting) >= self.max_queue:
                raise EngineBusy(f"{len(self._waiting)} requests are waiting (max_queue={self.max_queue}); retry later",
                                 None, "queue_full")
            self._waiting.append(req)
            self.requests_total += 1
            self._lock.notify()
        return rid

    def check(self, prompt: Sequence[int], params: SamplingParams) -> None:
        """Raise :class:`RequestError` if this request cannot run (parameters, prompt ids, context length)."""
        params.check()
        if not prompt:
            raise RequestError("the prompt is empty: give at least one token", "prompt", "invalid_value")
        if any(not 0 <= t < self.cfg.vocab_size for t in prompt):
            raise RequestError(f"prompt token ids must be in [0, {self.cfg.vocab_size})", "prompt", "invalid_value")
        if len(prompt) >= self.max_len:
            raise RequestError(f"the prompt has {len(prompt)} tokens; this server's context is {self.max_len} "
                               "tokens (prompt + completion): shorten the prompt", "prompt",
                               "context_length_exceeded")
        if len(prompt) + params.max_tokens > self.max_len:
            raise RequestError(f"max_tokens={params.max_tokens} + {len(prompt)} prompt tokens exceeds the context "
                               f"of {self.max_len} tokens: ask for at most {self.max_len - len(prompt)}",
                               "max_tokens", "context_length_exceeded")

    def cancel(self, request_id: str) -> None:
        """Stop a request (thread-safe): it leaves the queue or frees its row before the next step."""
        with self._lock:
            self._cancelled.add(request_id)
            self._lock.notify()

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams]
                 ) -> list[Completion]:
        """Run prompts to completion (on the engine thread if started, else on this one) → completions in order."""
        plist = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        parts: dict[str, list[Event]] = collections.defaultdict(list)
        done = threading.Semaphore(0)

        def collect(ev: Event) -> None:
            parts[ev.request_id].append(ev)
            if ev.finish_reason:
                done.release()

        ids = [self.submit(p, sp, collect) for p, sp in zip(prompts, plist, strict=True)]
        for _ in ids:
            while not done.acquire(timeout=1.0 if self.running else 0.0):
                if not self.running:
                    self.step()
        out = []
        for rid, prompt in zip(ids, prompts, strict=True):
            evs = parts[rid]
            out.append(Completion(rid, len(prompt), [t for e in evs for t in e.token_ids],
                                  "".join(e.text for e in evs), evs[-1].finish_reason or ""))
        return out

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Run the engine loop on a background thread."""
        if self.running:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="dsv3-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        with self._lock:
            self._lock.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def warmup(self, buckets: Sequence[int] | None = None) -> None:
        """Compile the prefill buckets (all by default) and every decode variant with throwaway requests: the
        ``decode_chunk``-step call and, when it is > 1, the single-step call that serves a queue while a row is
        about to free (compiled mid-traffic, it stalled every stream for seconds on the H100)."""
        buckets = list(buckets or self.buckets)
        greedy = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
        for b in buckets:
            self.generate([[0] * min(b, self.max_len - 2)], greedy)
        if self.decode_chunk > 1:
            self._single_step = True
            try:
                self.generate([[0] * min(buckets[0], self.max_len - 2)], greedy)
            finally:
                self._single_step = False

    def stats(self) -> dict[str, float]:
        """Counters and gauges for /metrics."""
        now = time.monotonic()
        rate = sum(n for t, n in self._recent.copy() if now - t <= RATE_WINDOW_S) / RATE_WINDOW_S
        return {
            "requests_total": self.requests_total,
            "requests_cancelled_total": self.requests_cancelled,
            "generated_tokens_total": self.tokens_total,
            "tokens_per_second": rate,
            "queue_depth": len(self._waiting),
            "cache_slots_used": sum(r is not None for r in self._rows),
            "cache_slots_total": self.max_slots,
            "steps_total": self.steps_total,
            "spec_drafted_total": self.drafted_total,
            "spec_accepted_total": self.accepted_total,
            "spec_acceptance_rate": self.acceptance_rate,
        }

    @property
    def acceptance_rate(self) -> float:
        """Accepted / drafted MTP tokens so far (0 without speculation)."""
        return self.accepted_total / self.drafted_total if self.drafted_total else 0.0

    # ------------------------------------------------------------------------------------------------------
    # The loop
    # ------------------------------------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                while not (self._stop.is_set() or self._waiting or self._cancelled
                           or any(r is not None for r in self._rows)):
                    self._lock.wait(timeout=1.0)
            if self._stop.is_set():
                return
            try:
                self.step()
            except Exception:  # a failed step must not take the server down
                log.exception("engine step failed; failing the requests in flight and resetting the cache")
                self._fail_all()

    def step(self) -> bool:
        """One iteration: drop cancelled requests, admit waiting ones (prefill), one decode step for all rows."""
        self._drop_cancelled()
        before = self.tokens_total
        admitted = self._admit()
        busy = any(r is not None for r in self._rows)
        if busy:
            if self.K:
                self._spec_step()
            else:
                self._decode_step()
            self.steps_total += 1
        self._recent.append((time.monotonic(), self.tokens_total - before))
        return admitted or busy

    def _reset_state(self) -> None:
        B, S = self.max_slots, self._cache_len
        self._cache = init_cache(self.cfg, B, S, self._cache_dtype)
        self._mtp_cache = init_mtp_cache(self.cfg, B, S, self._cache_dtype) if self.K else None
        self._q = jnp.zeros((B, self.K, self.cfg.vocab_size), jnp.float32) if self.K else None
        self._rows: list[_Row | None] = [None] * B
        self._temp = np.zeros(B, np.float32)
        self._top_k = np.zeros(B, np.int32)
        self._top_p = np.ones(B, np.float32)
        self._seeds = np.zeros(B, np.uint32)

    def _fail_all(self) -> None:
        rows = [r for r in self._rows if r is not None]
        with self._lock:
            waiting, self._waiting = list(self._waiting), collections.deque()
        for row in rows:
            self._emit(row.req, [], "", "error", len(row.out))
        for req in waiting:
            self._emit(req, [], "", "error", 0)
        self._reset_state()

    def _drop_cancelled(self) -> None:
        with self._lock:
            if not self._cancelled:
                return
            gone, self._cancelled = self._cancelled, set()
            dropped = [r for r in self._waiting if r.id in gone]
            self._waiting = collections.deque(r for r in self._waiting if r.id not in gone)
        for req in dropped:
            self._emit(req, [], "", "cancelled", 0)
        for i, row in enumerate(self._rows):
            if row is not None and row.req.id in gone:
                self._emit(row.req, [], "", "cancelled", len(row.out))
                self._rows[i] = None
                self.requests_cancelled += 1
        self.requests_cancelled += len(dropped)

    def _admit(self) -> bool:
        admitted = False
        for slot in range(self.max_slots):
            if self._rows[slot] is not None:
                continue
            with self._lock:
                if not self._waiting:
                    break
                req = self._waiting.popleft()
            try:
                self._prefill_row(slot, req)
            except Exception:  # noqa: BLE001 — any failure of this request fails it alone
                self._fail_one(slot, req)
                continue
            admitted = True
        return admitted

    def _fail_one(self, slot: int, req: _Request) -> None:
        """A request whose admission raised: it alone ends with "error". The shared cache survives unless the
        failure came after the prefill consumed (donated) it; then every request in flight fails too."""
        log.exception("admitting request %s failed; failing that request", req.id)
        self._rows[slot] = None
        self._emit(req, [], "", "error", 0)
        leaves = jax.tree.leaves((self._cache, self._mtp_cache, self._q))
        if any(x.is_deleted() for x in leaves if isinstance(x, jax.Array)):
            log.error("the cache was lost with it; failing the requests in flight and resetting the cache")
            self._fail_all()

    def _prefill_row(self, slot: int, req: _Request) -> None:
        p = req.params
        top_k = min(max(p.top_k, 0), self.cfg.vocab_size)  # k ≥ V keeps every token, like 0
        self._temp[slot], self._top_k[slot], self._top_p[slot] = p.temperature, top_k, p.top_p
        self._seeds[slot] = req.seed
        n = len(req.prompt)
        bucket = next(b for b in self.buckets if b >= n)
        tokens = np.zeros((1, bucket), np.int32)
        tokens[0, :n] = req.prompt
        samp = (self._temp[slot:slot + 1], self._top_k[slot:slot + 1], self._top_p[slot:slot + 1])
        tok, drafts, self._cache, self._mtp_cache, self._q = self._prefill_jit(
            self.variables, self._cache, self._mtp_cache, self._q, tokens, np.int32(slot), np.int32(n), samp,
            self._seeds[slot:slot + 1])
        tok, drafts = jax.device_get((tok, drafts))
        text = None
        if self.tokenizer is not None:
            text = TextStream(self.tokenizer.decode, p.stop)
        row = _Row(req, n, int(tok[0]), [], text, [int(d) for d in drafts[0]])
        self._rows[slot] = row
        self._commit(slot, [row.last])

    def _decode_step(self) -> None:
        B = self.max_slots
        tokens, pos, counters = np.zeros(B, np.int32), np.zeros(B, np.int32), np.zeros(B, np.int32)
        left = []
        for i, row in enumerate(self._rows):
            if row is not None:
                tokens[i], pos[i], counters[i] = row.last, row.pos, len(row.out)
                left.append(row.req.params.max_tokens - len(row.out))
        n = self._steps_per_call(left)
        toks, self._cache = self._decode_jit(self.variables, self._cache, tokens, pos, self._temp, self._top_k,
                                             self._top_p, self._seeds, counters, n)
        toks = jax.device_get(toks)
        for i, row in enumerate(self._rows):
            if row is not None:
                new = toks[i].tolist()
                row.pos, row.last = row.pos + n, new[-1]
                self._commit(i, new)

    def _spec_step(self) -> None:
        B, K = self.max_slots, self.K
        window, pos, counters = np.zeros((B, K + 1), np.int32), np.zeros(B, np.int32), np.zeros(B, np.int32)
        left = []
        for i, row in enumerate(self._rows):
            if row is not None:
                window[i] = [row.last, *row.drafts]
                pos[i], counters[i] = row.pos, len(row.out)
                left.append(row.req.params.max_tokens - len(row.out))
        n = self._steps_per_call(left)
        out = self._spec_jit(self.variables, self._cache, self._mtp_cache, self._q, window, pos, self._temp,
                             self._top_k, self._top_p, self._seeds, counters, n)
        a, nxt, windows, drafts, self._cache, self._mtp_cache, self._q = out
        a, nxt, windows, drafts = jax.device_get((a, nxt, windows, drafts))
        for i, row in enumerate(self._rows):
            if row is None:
                continue
            new = []
            for t in range(n):
                m = int(a[t, i])
                self.drafted_total += K
                self.accepted_total += m
                new += [*windows[t, i, 1:m + 1].tolist(), int(nxt[t, i])]
                if len(row.out) + len(new) >= row.req.params.max_tokens:
                    break  # what later steps drafted past the row's end is not counted
            row.pos, row.last, row.drafts = row.pos + len(new), new[-1], [int(d) for d in drafts[i]]
            self._commit(i, new)

    def _steps_per_call(self, left: list[int]) -> int:
        """Device steps for the next call: ``decode_chunk`` while no waiting request needs a row that frees
        within them (a row that finishes early discards its surplus tokens; their cache writes stay in its own
        row, past what it attends to), else 1."""
        n = self.decode_chunk
        with self._lock:
            waiting = bool(self._waiting)
        return 1 if n > 1 and (self._single_step or waiting and min(left) < n) else n

    def _commit(self, slot: int, new: list[int]) -> None:
        """Append new tokens to a row, apply the stop rules, emit an event; free the row when finished."""
        row = self._rows[slot]
        assert row is not None
        p = row.req.params
        took, text, reason = [], "", None
        for t in new:
            took.append(t)
            row.out.append(t)
            if (t == self.eos_id and not p.ignore_eos) or t in p.stop_token_ids:
                reason = "stop"
                break
            if row.text is not None:
                text += row.text.push(t)
                if row.text.stopped:
                    reason = "stop"
                    break
            if len(row.out) >= p.max_tokens:
                reason = "length"
                break
        if reason and row.text is not None:
            text += row.text.finish()
        self.tokens_total += len(took)
        self._emit(row.req, took, text, reason, len(row.out))
        if reason:
            self._rows[slot] = None

    def _emit(self, req: _Request, tokens: list[int], text: str, reason: str | None, n_out: int) -> None:
        if req.on_event is None:
            return
        try:
            req.on_event(Event(req.id, tokens, text, reason, len(req.prompt), n_out))
        except Exception:  # a consumer's bug must not stop the engine
            log.exception("on_event callback of %s failed", req.id)

    # ------------------------------------------------------------------------------------------------------
    # Jitted steps (pure functions of their arguments; ``traces`` counts compiles)
    # ------------------------------------------------------------------------------------------------------

    def _prefill(self, variables, cache, mtp_cache, q, tokens, slot, length, samp, seed):
        """tokens [1, T] (prompt + padding), slot [], length [] → (token [1], drafts [1, K], caches, q)."""
        T = tokens.shape[1]
        self.traces[f"prefill_{T}"] += 1
        cfg = self.cfg

        def row(a):  # [L, B, S, ·] → this row's first T slots [L, 1, T, ·]
            return jax.lax.dynamic_slice(a, (0, slot, 0, 0), (a.shape[0], 1, T, a.shape[3]))

        def put(a, r):
            return jax.lax.dynamic_update_slice(a, r.astype(a.dtype), (0, slot, 0, 0))

        positions = jnp.arange(T, dtype=jnp.int32)[None]
        out = Transformer(cfg).apply(variables, tokens, positions=positions, cache=jax.tree.map(row, cache),
                                     mtp=False)
        idx = jnp.reshape(length - 1, (1,))
        h = jnp.take_along_axis(out.hidden, idx[:, None, None], axis=1)  # [1, 1, d]; unused logits are DCE'd
        probs = token_probs(head_logits(cfg, variables, h)[:, 0], *samp)
        zero = jnp.zeros((1,), jnp.int32)
        tok = sample(probs, row_keys(seed, zero, speculative.SAMPLE))
        cache = jax.tree.map(put, cache, out.cache)
        drafts = jnp.zeros((1, self.K), jnp.int32)
        if self.K:
            ext = jnp.pad(tokens, ((0, 0), (0, self.K + 1))).at[0, length].set(tok[0])
            drafts, qd, mrow = speculative.draft(cfg, variables, out.hidden, ext, positions, idx,
                                                 jax.tree.map(row, mtp_cache), samp, seed, zero, absorbed=False)
            mtp_cache = jax.tree.map(put, mtp_cache, mrow)
            q = jax.lax.dynamic_update_slice(q, qd, (slot, 0, 0))
        return tok, drafts, cache, mtp_cache, q

    def _decode(self, variables, cache, tokens, pos, temp, top_k, top_p, seeds, counters, n):
        """tokens, pos [B] (each row's last token and its position) → (next n tokens [B, n], cache).

        ``n`` (static) decode steps run back to back on the device, each feeding the token it sampled to the
        next; row keys depend on (seed, token index) only, so the tokens equal n single steps'.
        """
        self.traces[f"decode_{n}"] += 1
        model = Transformer(self.cfg)

        def one(carry, _):
            cache, tokens, pos, counters = carry
            out = model.apply(variables, tokens[:, None], positions=pos[:, None], cache=cache, absorbed=True,
                              mtp=False)
            probs = token_probs(out.logits[:, 0], temp, top_k, top_p)
            nxt = sample(probs, row_keys(seeds, counters, speculative.SAMPLE))
            return (out.cache, nxt, pos + 1, counters + 1), nxt

        (cache, *_), toks = jax.lax.scan(one, (cache, tokens, pos, counters), None, length=n)
        return toks.T, cache

    def _spec(self, variables, cache, mtp_cache, q, window, pos, temp, top_k, top_p, seeds, counters, n):
        """window [B, K+1] = [last, drafts], pos [B] → ``n`` (static) verify-and-draft steps back to back:
        (accepted [n, B], next token [n, B], windows verified [n, B, K+1], drafts after the last step [B, K],
        cache, mtp_cache, draft probs [B, K, V]). Step i+1 verifies the window step i drafted, at the position
        after what step i committed; keys depend on (seed, token index) only, so n steps equal n single calls.
        """
        self.traces[f"spec_{n}"] += 1
        cfg, K = self.cfg, self.K
        B, T = window.shape
        model = Transformer(cfg)
        rep = functools.partial(jnp.repeat, repeats=T, axis=0)
        offsets = jnp.arange(T, dtype=jnp.int32)[None]

        def one(carry, _):
            cache, mtp_cache, q, window, pos, counters = carry
            positions = pos[:, None] + offsets
            out = model.apply(variables, window, positions=positions, cache=cache, absorbed=True, mtp=False)
            p = token_probs(out.logits.reshape(B * T, -1), rep(temp), rep(top_k), rep(top_p)).reshape(B, T, -1)
            u = jax.vmap(lambda k: jax.random.uniform(k, (K,)))(row_keys(seeds, counters, speculative.ACCEPT))
            a, nxt = speculative.accept(p, q, window[:, 1:], u, row_keys(seeds, counters, speculative.SAMPLE))
            ext = jnp.pad(window, ((0, 0), (0, K + 1))).at[jnp.arange(B), a + 1].set(nxt)
            drafts, q, mtp_cache = speculative.draft(cfg, variables, out.hidden, ext, positions, a, mtp_cache,
                                                     (temp, top_k, top_p), seeds, counters + a, absorbed=True)
            nxt_window = jnp.concatenate([nxt[:, None], drafts], axis=1)
            carry = (out.cache, mtp_cache, q, nxt_window, pos + a + 1, counters + a + 1)
            return carry, (a, nxt, window)

        init = (cache, mtp_cache, q, window, pos, counters)
        (cache, mtp_cache, q, last_window, _, _), (a, nxt, windows) = jax.lax.scan(one, init, None, length=n)
        return a, nxt, windows, last_window[:, 1:], cache, mtp_cache, q
