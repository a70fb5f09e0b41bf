"""The server's V3.1 output parser (dsv3_jax/serving/chat.py) on hand-written model outputs: the reasoning /
content / tool-call split written out by hand, then the same text streamed in every possible chunking (every
single cut, one character at a time, random multi-cuts, and token by token through the engine's incremental
detokenizer with and without the markers as single tokens) must give exactly that split again."""

from __future__ import annotations

import json
import random

import pytest

from dsv3_jax.data import Tokenizer, train_bpe
from dsv3_jax.data import chat_format as cf
from dsv3_jax.serving import chat
from dsv3_jax.serving.sampling import TextStream

B, E, C, CE, S = cf.CALLS_BEGIN, cf.CALLS_END, cf.CALL_BEGIN, cf.CALL_END, cf.TOOL_SEP
WEATHER = C + "get_weather" + S + '{"city": "Paris", "unit": "C"}' + CE
ADD = C + "add" + S + '{"a": 1, "b": [2, 3]}' + CE

# (name, text, thinking, tools, expected [(kind, text-or-(name, arguments))] with adjacent text merged)
CASES = [
    ("think", "Two and two.\nSo 4.</think>The answer is 4.", True, False,
     [("reasoning", "Two and two.\nSo 4."), ("content", "The answer is 4.")]),
    ("think-unclosed", "still thinking <｜tool▁calls▁begin｜> </thin", True, True,
     [("reasoning", "still thinking <｜tool▁calls▁begin｜> </thin")]),
    ("think-leading-tag", "<think>hmm</think>ok", True, False, [("reasoning", "hmm"), ("content", "ok")]),
    ("think-empty", "</think>direct", True, False, [("content", "direct")]),
    ("no-think", "a </think> b <think>", False, False, [("content", "a </think> b <think>")]),
    ("no-tools-in-request", "x" + B + WEATHER + E, False, False, [("content", "x" + B + WEATHER + E)]),
    ("calls", "Checking." + B + WEATHER + ADD + E, False, True,
     [("content", "Checking."), ("tool_call", ("get_weather", '{"city": "Paris", "unit": "C"}')),
      ("tool_call", ("add", '{"a": 1, "b": [2, 3]}'))]),
    ("calls-only-whitespace-between", B + "\n" + WEATHER + " \n" + ADD + "\n" + E, False, True,
     [("tool_call", ("get_weather", '{"city": "Paris", "unit": "C"}')), ("tool_call", ("add", '{"a": 1, "b": [2, 3]}'))]),
    ("calls-no-section-end", B + WEATHER, False, True, [("tool_call", ("get_weather", '{"city": "Paris", "unit": "C"}'))]),
    ("think-then-call", "plan</think>" + B + ADD + E, True, True,
     [("reasoning", "plan"), ("tool_call", ("add", '{"a": 1, "b": [2, 3]}'))]),
    ("text-after-section", B + ADD + E + " done", False, True,
     [("tool_call", ("add", '{"a": 1, "b": [2, 3]}')), ("content", " done")]),
    # malformed markup comes back as content, verbatim
    ("bad-json", B + C + "f" + S + '{"a": ' + CE + E, False, True, [("content", B + C + "f" + S + '{"a": ' + CE + E)]),
    ("bad-then-good", B + C + "f" + S + "[1]" + CE + ADD + E, False, True,
     [("content", B + C + "f" + S + "[1]" + CE), ("tool_call", ("add", '{"a": 1, "b": [2, 3]}'))]),
    ("no-separator", B + C + "f{}" + CE + E, False, True, [("content", B + C + "f{}" + CE + E)]),
    ("empty-name", B + C + S + "{}" + CE + E, False, True, [("content", B + C + S + "{}" + CE + E)]),
    ("name-with-space", B + C + "get weather" + S + "{}" + CE, False, True, [("content", B + C + "get weather" + S + "{}" + CE)]),
    ("unterminated-call", "ok" + B + C + "f" + S + '{"a": 1', False, True, [("content", "ok" + B + C + "f" + S + '{"a": 1')]),
    ("garbage-in-section", B + "oops " + ADD + E, False, True, [("content", B + "oops " + ADD + E)]),
    ("good-then-garbage", B + ADD + "oops" + E, False, True,
     [("tool_call", ("add", '{"a": 1, "b": [2, 3]}')), ("content", "oops" + E)]),
    ("empty-section", "a" + B + E + "b", False, True, [("content", "a" + B + E + "b")]),
    ("marker-prefix-at-end", "a <｜tool▁cal", False, True, [("content", "a <｜tool▁cal")]),
    ("marker-lookalike", "a <｜tool▁calls▁beg!n｜> b", False, True, [("content", "a <｜tool▁calls▁beg!n｜> b")]),
]


def normal(deltas: list[chat.Delta]) -> list[tuple]:
    """Deltas with adjacent text of one kind merged; tool calls as (name, arguments)."""
    out: list[tuple] = []
    for d in deltas:
        if d.kind == "tool_call":
            out.append(("tool_call", (d.call.name, d.call.arguments)))
        elif d.text and out and out[-1][0] == d.kind:
            out[-1] = (d.kind, out[-1][1] + d.text)
        elif d.text:
            out.append((d.kind, d.text))
    return out


def streamed(chunks: list[str], thinking: bool, tools: bool) -> list[chat.Delta]:
    p = chat.OutputParser(thinking, tools, id_prefix="t")
    out = [d for c in chunks for d in p.feed(c)] + p.finish()
    calls = [d.call for d in out if d.kind == "tool_call"]
    assert [c.index for c in calls] == list(range(len(calls))) and len({c.id for c in calls}) == len(calls)
    assert p.calls == calls
    return out


@pytest.mark.parametrize(("text", "thinking", "tools", "want"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_parse_at_every_chunking(text, thinking, tools, want):
    assert normal(chat.parse(text, thinking, tools)) == want
    assert normal(streamed(list(text), thinking, tools)) == want  # one character at a time
    for i in range(len(text) + 1):  # every single cut
        assert normal(streamed([text[:i], text[i:]], thinking, tools)) == want, f"cut at {i}: {text[:i]!r}"
    rng = random.Random(0)
    for _ in range(50):  # random multi-cuts, empty chunks included
        cuts = sorted(rng.choices(range(len(text) + 1), k=rng.randint(2, 6)))
        chunks = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        assert normal(streamed(chunks, thinking, tools)) == want, chunks


def test_no_marker_text_leaks_early():
    """Content is never sent while it could still be the start of a marker (it would have to be taken back)."""
    text = "Checking." + B + WEATHER + E
    p = chat.OutputParser(tools=True)
    sent = ""
    for ch in text:
        sent += "".join(d.text for d in p.feed(ch) if d.kind == "content")
        assert "<" not in sent
    assert sent == "Checking."


def test_response_message_and_finish_reason():
    deltas = chat.parse("plan</think>" + B + ADD + E, thinking=True, tools=True, id_prefix="call_x")
    p = chat.OutputParser(tools=True)
    p.feed(B + ADD)
    assert chat.finish_reason("stop", p) == "tool_calls" and chat.finish_reason("length", p) == "length"
    assert chat.message(deltas, thinking=True) == {
        "role": "assistant", "content": None, "reasoning_content": "plan",
        "tool_calls": [{"id": "call_x_0", "type": "function",
                        "function": {"name": "add", "arguments": '{"a": 1, "b": [2, 3]}'}}]}
    assert chat.message(chat.parse("hi"), thinking=False) == {"role": "assistant", "content": "hi"}
    assert chat.message(chat.parse("", thinking=True), thinking=True) == {
        "role": "assistant", "content": "", "reasoning_content": ""}
    assert chat.Delta("reasoning", "r").openai() == {"reasoning_content": "r"}
    call = deltas[-1].call
    assert chat.Delta("tool_call", call=call).openai() == {"tool_calls": [{"index": 0} | call.openai()]}
    assert json.loads(call.arguments) == {"a": 1, "b": [2, 3]}


TEXT = "def add(a, b):\n    return a + b\n\nParis weather city unit think plan answer\n" * 20


@pytest.fixture(scope="module", params=["markers-as-bytes", "markers-as-tokens"])
def tok(request) -> Tokenizer:
    hf = train_bpe([TEXT], 300)
    if request.param == "markers-as-tokens":  # as in DeepSeek's tokenizer: each marker one id
        hf.add_special_tokens([m for m in cf.MARKERS if hf.token_to_id(m) is None])
    return Tokenizer(hf, request.param)


@pytest.mark.parametrize("name", ["think", "calls", "think-then-call", "bad-then-good", "unterminated-call"])
def test_token_streams(tok, name):
    """Token by token through the engine's detokenizer (TextStream): only whole characters are emitted, and
    markers arrive whole (one token) or spread over several byte-level tokens."""
    _, text, thinking, tools, want = next(c for c in CASES if c[0] == name)
    ids = tok.encode(text, allow_special=True)
    assert tok.decode(ids) == text
    stream = TextStream(tok.decode)
    chunks = [stream.push(t) for t in ids] + [stream.finish()]
    assert "".join(chunks) == text
    assert normal(streamed(chunks, thinking, tools)) == want


def test_chat_prompt_builtin_and_jinja(tok):
    msgs = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    for thinking in (False, True):
        ids = chat.chat_prompt(msgs, tok, thinking=thinking)
        spans = cf.render([{"role": "system", "content": "Be brief."}, msgs[1]], thinking=thinking,
                          add_generation_prompt=True)
        assert ids == cf.encode_spans(tok, spans)[0]
        assert tok.decode(ids).endswith(cf.ASSISTANT + (cf.THINK if thinking else cf.END_THINK))
    tools = [{"type": "function", "function": {"name": "add", "description": "Add.", "parameters": {}}}]
    assert cf.tools_prompt(tools) in tok.decode(chat.chat_prompt(msgs, tok, tools))
    template = ("{{ bos_token }}{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"
                "{% if tools %}[tools]{{ tools | length }}{% endif %}"
                "{% if add_generation_prompt %}<｜Assistant｜>{{ '<think>' if thinking else '</think>' }}{% endif %}")
    got = tok.decode(chat.chat_prompt(msgs, tok, tools, thinking=True, template=template))
    assert got == cf.BOS + "[system]Be brief.[user]2+2?[tools]1<｜Assistant｜><think>"
    with pytest.raises(cf.ChatFormatError, match="last message"):
        chat.chat_prompt([*msgs, {"role": "assistant", "content": "4"}], tok)


def test_request_options():
    assert chat.thinking_of(None) is False and chat.thinking_of({"thinking": True}) is True
    with pytest.raises(ValueError, match="thinking"):
        chat.thinking_of({"thinking": "yes"})
    tools = [{"type": "function", "function": {"name": "f"}}]
    assert chat.tools_for(tools, None) == tools and chat.tools_for(tools, "auto") == tools
    assert chat.tools_for(tools, "none") is None and chat.tools_for(None, "auto") is None
    with pytest.raises(ValueError, match="tool_choice"):
        chat.tools_for(tools, "required")
