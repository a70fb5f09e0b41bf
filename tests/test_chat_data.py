"""Chat data for SFT: the V3.1 layout (REFERENCE §11) exactly, the assistant-only loss mask, packing with
per-sample positions and attention (REFERENCE §9), and packed losses against the samples run alone."""

from __future__ import annotations

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers

from dsv3_jax.config import DataConfig
from dsv3_jax.data import chat_format as cf
from dsv3_jax.data.chat import ChatIterator, encode_chat, pack
from dsv3_jax.data.tokenizer import SPECIAL_TOKENS, Tokenizer, train_bpe
from dsv3_jax.model import Transformer
from dsv3_jax.training.loss import compute_losses, cross_entropy
from tests.common import random_variables, tiny_config

B, E, U, A = cf.BOS, cf.EOS, cf.USER, cf.ASSISTANT
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
CALL = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}


def trained_text(spans) -> str:
    return "".join(s.text for s in spans if s.trained)


def test_non_thinking_multi_turn_drops_earlier_reasoning():
    msgs = [{"role": "system", "content": "S1"}, {"role": "system", "content": "S2"},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello", "reasoning_content": "greet back"},
            {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "<think>add</think>4"}]
    spans = cf.render(msgs)
    assert cf.render_text(spans) == (f"{B}S1\n\nS2{U}hi{A}</think>hello{E}{U}2+2?{A}</think>4{E}")
    assert trained_text(spans) == f"hello{E}4{E}"
    prompt = cf.render(msgs[:5], add_generation_prompt=True)
    assert cf.render_text(prompt).endswith(f"{U}2+2?{A}</think>")
    assert cf.render_text(cf.render(msgs[:5], thinking=True, add_generation_prompt=True)).endswith(f"{A}<think>")


def test_thinking_keeps_the_last_turns_reasoning_only():
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "x", "reasoning_content": "r1"},
            {"role": "user", "content": "b"}, {"role": "assistant", "content": "y", "reasoning_content": "r2"}]
    spans = cf.render(msgs, thinking=True)
    assert cf.render_text(spans) == f"{B}{U}a{A}</think>x{E}{U}b{A}<think>r2</think>y{E}"
    # Trained: the reasoning, its closing tag, the answer and EOS; the opening <think> is the prompt's.
    assert trained_text(spans) == f"x{E}r2</think>y{E}"


def test_tools_calls_and_results():
    msgs = [{"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [CALL, dict(CALL, id="c2")]},
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
            {"role": "tool", "tool_call_id": "c2", "content": "22C"},
            {"role": "assistant", "content": "Sunny, 22C."}]
    spans = cf.render(msgs, tools=[WEATHER])
    text = cf.render_text(spans)
    system, rest = text.split(U, 1)
    assert system.startswith(f"{B}## Tools\nYou have access to the following tools:\n\n### get_weather\n"
                             f"Description: Weather of a city\n\nParameters: ")
    assert f"{cf.CALLS_BEGIN}{cf.CALL_BEGIN}tool_call_name{cf.TOOL_SEP}tool_call_arguments{cf.CALL_END}" in system
    call = f'{cf.CALL_BEGIN}get_weather{cf.TOOL_SEP}{{"city": "Paris"}}{cf.CALL_END}'
    assert rest == (f"Weather in Paris?{A}</think>{cf.CALLS_BEGIN}{call}{call}{cf.CALLS_END}{E}"
                    f"{cf.OUTPUT_BEGIN}sunny{cf.OUTPUT_END}{cf.OUTPUT_BEGIN}22C{cf.OUTPUT_END}Sunny, 22C.{E}")
    assert trained_text(spans) == f"{cf.CALLS_BEGIN}{call}{call}{cf.CALLS_END}{E}Sunny, 22C.{E}"
    # After tool results the model continues directly: no generation prompt is added.
    assert cf.render_text(cf.render(msgs[:4], add_generation_prompt=True)).endswith(cf.OUTPUT_END)


def test_bad_messages_are_named():
    with pytest.raises(cf.ChatFormatError, match=r"messages\[1\]: role"):
        cf.render([{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}])
    with pytest.raises(cf.ChatFormatError, match="tool call"):
        cf.render([{"role": "user", "content": "a"}, {"role": "assistant", "tool_calls": [{"x": 1}]}])


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    """A small BPE that holds every V3.1 marker as one special token (like DeepSeek's tokenizer.json)."""
    hf = train_bpe(["hello world, the weather in Paris is sunny. 2+2=4"] * 20, 300)
    hf.add_special_tokens([tokenizers.AddedToken(m, special=True, normalized=False)
                           for m in cf.MARKERS if m not in SPECIAL_TOKENS])
    return Tokenizer(hf, "test-chat")


def test_token_layout_and_mask(tok):
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    ids, mask = encode_chat(tok, {"messages": msgs})
    sid = tok._hf.token_to_id
    hi, hello = tok.encode("hi"), tok.encode("hello")
    assert ids.tolist() == [sid(B), sid(U), *hi, sid(A), sid("</think>"), *hello, sid(E)]
    assert mask.tolist() == [0, 0, *[0] * len(hi), 0, 0, *[1] * len(hello), 1]
    # Message text cannot inject a marker: it is tokenised as plain text.
    ids2, _ = encode_chat(tok, {"messages": [{"role": "user", "content": f"x{E}"}, *msgs[1:]]})
    assert ids2.tolist().count(sid(E)) == 1


def test_jinja_template_matches_builtin_layout(tok):
    """A jinja2 template of the V3.1 layout (a minimal one written here) gives the built-in's tokens and mask."""
    tpl = ("{{ bos_token }}{% for m in messages %}{% if m.role == 'user' %}<｜User｜>{{ m.content }}"
           "{% elif m.role == 'assistant' %}<｜Assistant｜></think>{{ m.content }}<｜end▁of▁sentence｜>{% endif %}"
           "{% endfor %}{% if add_generation_prompt %}<｜Assistant｜></think>{% endif %}")
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "the weather"}, {"role": "assistant", "content": "sunny"}]
    want = encode_chat(tok, {"messages": msgs})
    got = encode_chat(tok, {"messages": msgs}, tpl)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


def test_pack_positions_segments_and_padding():
    a = (np.array([5, 6, 7], np.int32), np.array([0, 1, 1], np.int32))
    b = (np.array([8, 9], np.int32), np.array([0, 1], np.int32))
    row = pack([a, b], 7, pad_id=3)
    assert row["tokens"].tolist() == [5, 6, 7, 8, 9, 3, 3]
    assert row["loss_mask"].tolist() == [0, 1, 1, 0, 1, 0, 0]
    assert row["positions"].tolist() == [0, 1, 2, 0, 1, 0, 1]
    assert row["segment_ids"].tolist() == [1, 1, 1, 2, 2, 0, 0]


def test_iterator_packs_whole_samples_and_resumes(tok, tmp_path):
    lines = [{"messages": [{"role": "user", "content": "hi " * (i % 4 + 1)},
                           {"role": "assistant", "content": "hello " * (i % 3 + 1)}]} for i in range(12)]
    src = tmp_path / "chats.jsonl"
    src.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    cfg = DataConfig(source=str(src), format="chat", seq_len=31, val_fraction=0.0)
    it = ChatIterator(cfg, tok, 2)
    batches = [next(it) for _ in range(3)]
    for b in batches:
        assert set(b) == {"tokens", "loss_mask", "positions", "segment_ids"} and b["tokens"].shape == (2, 32)
        for r in range(2):  # every sample in a row starts with BOS at position 0
            seg, pos, t = b["segment_ids"][r], b["positions"][r], b["tokens"][r]
            starts = np.flatnonzero((pos == 0) & (seg > 0))
            assert (t[starts] == tok.bos_id).all() and len(starts) == seg.max()
    state = json.loads(json.dumps(it.get_state()))
    want = next(it)
    it2 = ChatIterator(cfg, tok, 2)
    it2.set_state(state)
    got = next(it2)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])


def test_bad_jsonl_line_is_named(tok, tmp_path):
    src = tmp_path / "chats.jsonl"
    src.write_text('{"messages": [{"role": "user", "content": "a"}]}\n')
    it = ChatIterator(DataConfig(source=str(src), format="chat", val_fraction=0.0), tok, 1)
    with pytest.raises(ValueError, match=r"chats.jsonl:1: .*no assistant message"):
        next(it)


# ------------------------------------------------------------------------------------------------------------
# Packing isolation through the model
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    cfg = dataclasses.replace(tiny_config(), packed_samples=True)
    return cfg, random_variables(cfg, seed=2)


def run(cfg, variables, tokens, positions):
    return Transformer(cfg).apply(variables, jnp.asarray(tokens)[None], jnp.asarray(positions)[None])


def test_packed_sample_sees_only_itself(model):
    """A sample's logits do not change when its neighbour changes, and equal the sample's logits alone."""
    cfg, variables = model
    rng = np.random.default_rng(0)
    a, b1, b2 = rng.integers(0, 97, 7), rng.integers(0, 97, 9), rng.integers(0, 97, 9)
    pos = np.concatenate([np.arange(9), np.arange(7)])
    out1 = run(cfg, variables, np.concatenate([b1, a]), pos)
    out2 = run(cfg, variables, np.concatenate([b2, a]), pos)
    alone = run(cfg, variables, a, np.arange(7))
    # The same arithmetic per query row up to the masked keys (exp(-1e30) = 0 exactly): float32 matmul
    # reassociation across the different row lengths only.
    np.testing.assert_allclose(out1.logits[0, 9:], out2.logits[0, 9:], rtol=0, atol=1e-5)
    np.testing.assert_allclose(out1.logits[0, 9:], alone.logits[0], rtol=0, atol=1e-5)
    # MTP's own block is isolated too (its last position of a sample reads the neighbour's token: masked out
    # of the loss by target_mask).
    np.testing.assert_allclose(out1.mtp_logits[0, 0, 9:-1], alone.mtp_logits[0, 0, :-1], rtol=0, atol=1e-5)
    assert not np.allclose(out1.logits[0, :9], out2.logits[0, :9])  # the neighbour did change


def test_packed_loss_equals_per_sample_losses(model):
    """CE of a packed row with the loss mask = the token-weighted mean of each sample's masked CE run alone."""
    cfg, variables = model
    rng = np.random.default_rng(1)
    samples = [(rng.integers(0, 97, n), (rng.random(n) < 0.6).astype(np.int32)) for n in (6, 9, 5)]
    row = pack(samples, 24, pad_id=0)
    out = run(cfg, variables, row["tokens"][:-1], row["positions"][:-1])
    losses = compute_losses(out, jnp.asarray(row["tokens"])[None], 0.3, 0.0,
                            jnp.asarray(row["loss_mask"])[None], jnp.asarray(row["segment_ids"])[None])
    nll_sum, count, mtp_sum, mtp_count = 0.0, 0, 0.0, 0
    for tok, mask in samples:
        o = run(cfg, variables, tok[:-1], np.arange(len(tok) - 1))
        m = mask[1:].astype(bool)
        nll_sum += float(cross_entropy(o.logits[0], jnp.asarray(tok[1:]), m)) * m.sum()
        count += m.sum()
        mm = mask[2:].astype(bool)  # depth 1 predicts t_{i+2}; the sample's own last position has no target
        mtp_sum += float(cross_entropy(o.mtp_logits[0, 0, :-1], jnp.asarray(tok[2:]), mm)) * mm.sum()
        mtp_count += mm.sum()
    np.testing.assert_allclose(float(losses.ce), nll_sum / count, rtol=2e-5)
    np.testing.assert_allclose(float(losses.mtp), mtp_sum / mtp_count, rtol=2e-5)
