"""The serving engine against a full naive forward recomputed at every step; batching, sampling, speculation.

One plain and one speculative engine per module (compiled once); the last test checks nothing recompiled.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax.data import Tokenizer, train_bpe
from dsv3_jax.model import Transformer
from dsv3_jax.serving import Engine, RequestError, SamplingParams
from dsv3_jax.serving.sampling import TextStream, token_probs
from dsv3_jax.serving.speculative import accept
from tests.common import random_variables, tiny_config

MAX_LEN = 64
CFG = tiny_config(vocab_size=320, max_position_embeddings=MAX_LEN)
TEXT = "def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n    y: int = 0\n" * 20
PROMPTS = [[5, 6, 7, 8, 9], [40] * 20, [100, 101], list(range(50, 63)), [7] * 17, [300, 3, 33]]
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def speculation_friendly(variables: dict, eps: float = 0.01) -> dict:
    """Shrink every block's output (o_proj, down_proj) and make MTP's eh_proj pass the embedding through.

    The main model then predicts mostly from the current token and MTP from the next one, so MTP drafts are
    mostly — not always — right: both the accept and the reject paths run (a random model rejects ~all).
    """
    def f(path, a):
        names = {getattr(k, "key", None) for k in path}
        if names & {"o_proj", "down_proj"}:
            return a * eps
        if "eh_proj" in names:  # [emb; h] → d: identity on the embedding half
            d = a.shape[1]
            return jnp.concatenate([jnp.eye(d, dtype=a.dtype), a[d:] * eps])
        return a

    return jax.tree_util.tree_map_with_path(f, variables)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(train_bpe([TEXT], CFG.vocab_size), "test")


@pytest.fixture(scope="module")
def variables() -> dict:
    return random_variables(CFG)


@pytest.fixture(scope="module")
def engine(variables, tok) -> Engine:
    return Engine(CFG, variables, tokenizer=tok, max_slots=4, max_len=MAX_LEN)


@pytest.fixture(scope="module")
def full_logits():
    """Logits of the full naive forward (no cache) at every position of a [1, MAX_LEN] padded sequence."""
    return jax.jit(lambda v, t: Transformer(CFG).apply(v, t, mtp=False).logits[0])


def greedy_reference(full_logits, variables, prompt: list[int], n: int) -> list[int]:
    """Greedy tokens recomputing the whole sequence each step (padding after it is causal-masked away)."""
    seq = list(prompt)
    for _ in range(n):
        x = np.zeros((1, MAX_LEN), np.int32)
        x[0, :len(seq)] = seq
        seq.append(int(np.argmax(full_logits(variables, x)[len(seq) - 1])))
    return seq[len(prompt):]


def test_greedy_equals_full_forward_every_step(engine, variables, full_logits):
    out = engine.generate(PROMPTS[:3], GREEDY)  # prompts in buckets 16 and 32
    for prompt, c in zip(PROMPTS[:3], out, strict=True):
        assert c.token_ids == greedy_reference(full_logits, variables, prompt, GREEDY.max_tokens)
        assert c.finish_reason == "length" and c.prompt_tokens == len(prompt)


def test_batched_equals_one_at_a_time(engine):
    """Six requests of different lengths, max_tokens and sampling on 4 rows (some queue, rows are reused
    mid-flight) give exactly what each gives alone; seeded sampling too (keys depend on seed and index)."""
    params = [dataclasses.replace(GREEDY, max_tokens=m) for m in (3, 12, 7, 9, 2, 11)]
    params[1] = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, seed=7, ignore_eos=True)
    params[4] = SamplingParams(max_tokens=5, temperature=1.2, top_k=20, seed=3, ignore_eos=True)
    together = engine.generate(PROMPTS, params)
    alone = [engine.generate([p], sp)[0] for p, sp in zip(PROMPTS, params, strict=True)]
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]
    assert [len(c.token_ids) for c in together] == [sp.max_tokens for sp in params]


def test_decode_chunk_equals_single_steps(engine, variables, tok):
    """Several decode steps per device call (rows finishing mid-chunk, queued requests, seeded sampling, a stop
    token) give exactly the single-step engine's tokens and finish reasons."""
    chunked = Engine(CFG, variables, tokenizer=tok, max_slots=4, max_len=MAX_LEN, decode_chunk=4)
    params = [dataclasses.replace(GREEDY, max_tokens=m) for m in (3, 12, 7, 9, 2, 11)]
    params[1] = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, seed=7, ignore_eos=True)
    ref = engine.generate(PROMPTS, params)
    params[5] = dataclasses.replace(params[5], stop_token_ids=(ref[5].token_ids[6],))
    ref[5] = engine.generate([PROMPTS[5]], params[5])[0]
    out = chunked.generate(PROMPTS, params)
    assert [(c.token_ids, c.finish_reason) for c in out] == [(c.token_ids, c.finish_reason) for c in ref]
    assert ref[5].finish_reason == "stop" and len(ref[5].token_ids) <= 7
    assert chunked.traces["decode_4"] == 1


def test_sampling_params(engine):
    greedy = engine.generate([PROMPTS[0]], GREEDY)[0].token_ids
    top1 = SamplingParams(max_tokens=12, temperature=1.0, top_k=1, seed=5, ignore_eos=True)
    assert engine.generate([PROMPTS[0]], top1)[0].token_ids == greedy
    tiny_p = SamplingParams(max_tokens=12, temperature=1.0, top_p=1e-6, seed=5, ignore_eos=True)
    assert engine.generate([PROMPTS[0]], tiny_p)[0].token_ids == greedy
    hot = [SamplingParams(max_tokens=12, temperature=1.5, seed=s, ignore_eos=True) for s in (1, 1, 2)]
    a, b, c = (x.token_ids for x in engine.generate([PROMPTS[0]] * 3, hot))
    assert a == b and a != c  # seeded: reproducible; another seed: another sample

    # stop_token_ids (the EOS path): stops at the first occurrence, the stop token counted but not shown.
    stop_id = greedy[4]
    r = engine.generate([PROMPTS[0]], dataclasses.replace(GREEDY, stop_token_ids=(stop_id,)))[0]
    assert r.token_ids == greedy[:greedy.index(stop_id) + 1] and r.finish_reason == "stop"


def test_stop_strings_cut_the_text(engine, tok):
    full = engine.generate([PROMPTS[3]], dataclasses.replace(GREEDY, max_tokens=20))[0]
    # The random model writes invalid UTF-8 too: replacement characters may differ, everything else not.
    assert full.text.replace("\ufffd", "") == tok.decode(full.token_ids).replace("\ufffd", "")
    stop = full.text[len(full.text) // 2:][:2]
    cut = engine.generate([PROMPTS[3]], dataclasses.replace(GREEDY, max_tokens=20, stop=(stop, "\x00never")))[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[:full.text.index(stop)]
    assert stop not in cut.text and len(cut.token_ids) < len(full.token_ids)


def test_text_stream_holds_back_partial_stops():
    chars = "abcXYdefXYZg"
    ts = TextStream(lambda ids: "".join(chars[i] for i in ids), stop=("XYZ",))
    shown = [ts.push(i) for i in range(len(chars))]
    # "XY" is held until "d" shows it is not "XYZ"; the second "XY" + "Z" is the stop: never shown.
    assert shown == ["a", "b", "c", "", "", "XYd", "e", "f", "", "", "", ""]
    assert ts.stopped and ts.text == "abcXYdef" and ts.finish() == ""


def test_request_validation(engine):
    for bad, param in [({"temperature": -0.1}, "temperature"), ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"),
                       ({"max_tokens": 0}, "max_tokens"), ({"top_k": -2}, "top_k")]:
        with pytest.raises(RequestError) as e:
            engine.submit([1, 2], SamplingParams(**bad))
        assert e.value.param == param
    with pytest.raises(RequestError, match="context"):
        engine.submit([1] * MAX_LEN, SamplingParams(max_tokens=1))
    with pytest.raises(RequestError) as e:
        engine.submit([1] * 10, SamplingParams(max_tokens=MAX_LEN - 9))
    assert e.value.param == "max_tokens"
    with pytest.raises(RequestError):
        engine.submit([], SamplingParams())
    with pytest.raises(RequestError):
        engine.submit([CFG.vocab_size], SamplingParams())


def test_cancel_frees_the_row(engine):
    seen = []
    rid = engine.submit(PROMPTS[0], dataclasses.replace(GREEDY, max_tokens=40), on_event=seen.append)
    engine.step()
    engine.step()
    engine.cancel(rid)
    engine.step()
    assert seen[-1].finish_reason == "cancelled"
    assert engine.stats()["cache_slots_used"] == 0


def test_speculative_accept_rule_is_exact():
    """The first token out of ``accept`` is distributed as the target p_0 whatever the draft distribution,
    and greedy (one-hot) rows accept exactly while draft == argmax."""
    V, K, B = 5, 2, 40000
    kp, kq, kd, ku, ks = jax.random.split(jax.random.key(0), 5)
    p = jax.nn.softmax(2 * jax.random.normal(kp, (K + 1, V)))
    q = jax.nn.softmax(2 * jax.random.normal(kq, (K, V)))
    drafts = jax.random.categorical(kd, jnp.log(q), shape=(B, K))
    u = jax.random.uniform(ku, (B, K))
    a, nxt = accept(jnp.broadcast_to(p, (B, K + 1, V)), jnp.broadcast_to(q, (B, K, V)), drafts, u,
                    jax.random.split(ks, B))
    first = np.where(np.asarray(a) >= 1, np.asarray(drafts[:, 0]), np.asarray(nxt))
    np.testing.assert_allclose(np.bincount(first, minlength=V) / B, p[0], atol=0.01)
    assert 0 < float(a.mean()) < K

    one_hot = functools.partial(jax.nn.one_hot, num_classes=V)
    target = jnp.array([[1, 2, 3]])  # argmax of p at the K+1 window positions
    for d, want_a, want_next in [([1, 2], 2, 3), ([1, 4], 1, 2), ([0, 2], 0, 1)]:
        a, nxt = accept(one_hot(target), one_hot(jnp.array([d])), jnp.array([d]), jnp.full((1, K), 0.999),
                        jax.random.split(ks, 1))
        assert (int(a[0]), int(nxt[0])) == (want_a, want_next)


def test_token_probs_filters():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 3))
    probs = token_probs(logits, jnp.array([1.0, 1.0, 0.0]), jnp.array([2, 0, 0]), jnp.array([1.0, 0.7, 1.0]))
    np.testing.assert_allclose(probs[0], [0.625, 0.375, 0, 0], atol=1e-6)  # top-k 2
    np.testing.assert_allclose(probs[1], [0.625, 0.375, 0, 0], atol=1e-6)  # top-p 0.7 keeps 0.5 + 0.3
    np.testing.assert_array_equal(probs[2], [1, 0, 0, 0])  # temperature 0: one-hot argmax


@pytest.fixture(scope="module")
def spec_variables(variables) -> dict:
    return speculation_friendly(variables)


@pytest.fixture(scope="module")
def spec_engine(spec_variables, tok) -> Engine:
    return Engine(CFG, spec_variables, tokenizer=tok, max_slots=4, max_len=MAX_LEN, speculative=True)


def test_speculative_greedy_equals_plain_greedy(spec_engine, spec_variables, full_logits):
    params = dataclasses.replace(GREEDY, max_tokens=24)
    out = spec_engine.generate(PROMPTS, params)
    for prompt, c in zip(PROMPTS, out, strict=True):
        assert c.token_ids == greedy_reference(full_logits, spec_variables, prompt, params.max_tokens)
    rate = spec_engine.acceptance_rate
    print(f"MTP acceptance rate {rate:.2f} over {spec_engine.drafted_total} drafts")
    assert 0.2 < rate < 1.0  # both accepted and rejected drafts were exercised
    # Sampling with speculation: reproducible for a seed; stop rules still apply.
    hot = SamplingParams(max_tokens=20, temperature=0.8, top_p=0.95, seed=11, ignore_eos=True)
    a, b = spec_engine.generate([PROMPTS[0]] * 2, hot)
    assert a.token_ids == b.token_ids and len(a.token_ids) == 20


def test_chunked_speculation_equals_single_steps(spec_engine, spec_variables, tok):
    """Several verify-and-draft steps per device call commit exactly the single-step engine's tokens (greedy,
    seeded sampling, rows finishing mid-chunk, queued requests) with the same acceptance counts."""
    chunked = Engine(CFG, spec_variables, tokenizer=tok, max_slots=4, max_len=MAX_LEN, speculative=True,
                     decode_chunk=3)
    params = [dataclasses.replace(GREEDY, max_tokens=m) for m in (3, 14, 7, 9, 2, 11)]
    params[1] = SamplingParams(max_tokens=14, temperature=0.8, top_p=0.95, seed=11, ignore_eos=True)
    before = (spec_engine.drafted_total, spec_engine.accepted_total)
    ref = spec_engine.generate(PROMPTS, params)
    out = chunked.generate(PROMPTS, params)
    assert [(c.token_ids, c.finish_reason) for c in out] == [(c.token_ids, c.finish_reason) for c in ref]
    assert chunked.traces["spec_3"] == 1
    assert chunked.accepted_total <= chunked.drafted_total and chunked.drafted_total > 0
    assert spec_engine.drafted_total > before[0]


def test_speculative_drafts_are_the_mtp_predictions(spec_engine, spec_variables):
    """After every step the row's draft is what the training-path MTP module predicts from the committed
    sequence (module 1 at the position before the last token) — so its own cache is kept exact."""
    full = jax.jit(lambda v, t: Transformer(CFG).apply(v, t).mtp_logits[0, 0])
    prompt = PROMPTS[3]
    seen = []
    spec_engine.submit(prompt, dataclasses.replace(GREEDY, max_tokens=30), on_event=seen.append)
    checked = 0
    while not (seen and seen[-1].finish_reason):
        spec_engine.step()
        row = next((r for r in spec_engine._rows if r is not None), None)  # white-box: the row's drafts
        if row is None:
            break
        seq = prompt + row.out
        x = np.zeros((1, MAX_LEN), np.int32)
        x[0, :len(seq)] = seq
        assert row.drafts == [int(np.argmax(full(spec_variables, x)[len(seq) - 2]))]
        checked += 1
    assert checked >= 5


def test_no_recompiles_after_warmup(engine, spec_engine):
    for e in (engine, spec_engine):
        e.warmup(buckets=[16, 32])
    before = dict(engine.traces), dict(spec_engine.traces)
    assert before[0] == {"prefill_16": 1, "prefill_32": 1, "decode_1": 1}  # each compiled once, whatever ran
    assert before[1] == {"prefill_16": 1, "prefill_32": 1, "spec_1": 1}
    prompts = [[3] * n for n in (1, 4, 9, 16, 17, 25, 31)]
    params = [SamplingParams(max_tokens=m, temperature=t, top_k=k, seed=m)
              for m, t, k in zip((2, 5, 3, 8, 1, 4, 6), (0, 1, 0.5, 0, 2, 0, 1), (0, 3, 0, 1, 0, 0, 50), strict=True)]
    engine.generate(prompts, params)
    spec_engine.generate(prompts, params)
    assert (dict(engine.traces), dict(spec_engine.traces)) == before


def test_chunked_engines_do_not_compile_mid_traffic(variables, spec_variables, tok):
    """With decode_chunk > 1 a queue meeting a row about to finish takes single-step calls; warmup compiles
    that variant too, so a burst of more requests than rows (rows finishing at different steps) compiles
    nothing new."""
    for v, spec in ((variables, False), (spec_variables, True)):
        e = Engine(CFG, v, tokenizer=tok, max_slots=2, max_len=MAX_LEN, decode_chunk=4, speculative=spec)
        e.warmup(buckets=[16, 32])
        kind = "spec" if spec else "decode"
        before = dict(e.traces)
        assert before == {"prefill_16": 1, "prefill_32": 1, f"{kind}_4": 1, f"{kind}_1": 1}
        params = [dataclasses.replace(GREEDY, max_tokens=m) for m in (3, 9, 6, 2, 7)]
        out = e.generate([[3] * n for n in (1, 4, 9, 16, 20)], params)
        assert [len(c.token_ids) for c in out] == [3, 9, 6, 2, 7]
        assert dict(e.traces) == before
