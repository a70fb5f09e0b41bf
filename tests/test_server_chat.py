"""The V3.1 chat format through a real server and the ``openai`` client: thinking on/off, reasoning_content,
tools in the prompt, tool_calls (whole and streamed), tool results rendered back, malformed markup as content.

The tiny random model cannot write these outputs, so the engine's sampled tokens are replaced by a script
(``Forced``): the model still runs every step, but what each row commits is the scripted text's tokens, then
EOS. The prompts the engine receives are recorded and checked against the V3.1 layout."""

from __future__ import annotations

import json

import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

from dsv3_jax.data import Tokenizer, train_bpe
from dsv3_jax.data import chat_format as cf
from dsv3_jax.serving import Engine
from dsv3_jax.serving.app import create_app
from tests.common import random_variables, running_server, tiny_config

MAX_LEN = 512
TEXT = "def add(a, b):\n    return a + b\n\nParis weather city unit think plan answer tools\n" * 20
KEY = "sk-test"
MODEL = "tiny"
B, E, C, CE, S = cf.CALLS_BEGIN, cf.CALLS_END, cf.CALL_BEGIN, cf.CALL_END, cf.TOOL_SEP
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
USER = [{"role": "user", "content": "Weather in Paris?"}]


class Forced:
    """Replace what the engine commits for each new request by the tokens of ``self.text`` (then EOS)."""

    def __init__(self, engine: Engine, tok: Tokenizer) -> None:
        self.engine, self.tok, self.text = engine, tok, ""
        self.scripts: dict[str, list[int]] = {}
        self.prompts: list[list[int]] = []
        commit, submit = engine._commit, engine.submit

        def forced_commit(slot: int, new: list[int]) -> None:
            row = engine._rows[slot]
            script = self.scripts.setdefault(row.req.id, tok.encode(self.text, allow_special=True))
            k = len(row.out)
            commit(slot, (script + [tok.eos_id] * len(new))[k:k + len(new)])

        def recording_submit(prompt, *args, **kwargs):
            self.prompts.append(list(prompt))
            return submit(prompt, *args, **kwargs)

        engine._commit, engine.submit = forced_commit, recording_submit

    def prompt_text(self) -> str:
        return self.tok.decode(self.prompts[-1])


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    hf = train_bpe([TEXT + cf.tools_prompt(TOOLS) * 5], 512)  # merges that keep the tools prompt short
    hf.add_special_tokens([m for m in cf.MARKERS if hf.token_to_id(m) is None])  # one id each, as in DeepSeek's
    return Tokenizer(hf, "test-chat")


@pytest.fixture(scope="module")
def server(tok):
    """(client, Forced) of a running server whose chat outputs are scripted."""
    cfg = tiny_config(vocab_size=tok.vocab_size, max_position_embeddings=MAX_LEN)
    engine = Engine(cfg, random_variables(cfg), tokenizer=tok, max_slots=2, max_len=MAX_LEN)
    forced = Forced(engine, tok)
    with running_server(create_app(engine, tok, MODEL, api_key=KEY)) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key=KEY, timeout=300, max_retries=0), forced


def ask(server, text: str, stream: bool = False, **kw):
    client, forced = server
    forced.text = text
    kw.setdefault("messages", USER)
    kw.setdefault("max_tokens", 128)
    return client.chat.completions.create(model=MODEL, temperature=0, stream=stream, **kw)


def gather(chunks) -> tuple[list[str], str, str, dict[int, dict], str]:
    """A streamed answer → (kinds of the deltas in order, reasoning, content, tool calls by index, finish)."""
    kinds, reasoning, content, calls, finish = [], "", "", {}, None
    for ch in chunks:
        (c,) = ch.choices
        d = c.delta
        if getattr(d, "reasoning_content", None):
            kinds.append("reasoning")
            reasoning += d.reasoning_content
        if d.content:
            kinds.append("content")
            content += d.content
        for tc in d.tool_calls or []:
            kinds.append("tool_call")
            call = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
            call["id"] = tc.id or call["id"]
            assert tc.type in (None, "function")
            call["name"] += tc.function.name or ""
            call["arguments"] += tc.function.arguments or ""
        finish = c.finish_reason or finish
    return kinds, reasoning, content, calls, finish


def test_thinking_on_and_off(server):
    _, forced = server
    out = "Paris is in France; look it up.</think>It is sunny."
    r = ask(server, out, extra_body={"chat_template_kwargs": {"thinking": True}})
    assert forced.prompt_text().endswith(cf.USER + "Weather in Paris?" + cf.ASSISTANT + cf.THINK)
    m = r.choices[0].message
    assert (m.reasoning_content, m.content, r.choices[0].finish_reason) == (
        "Paris is in France; look it up.", "It is sunny.", "stop")

    kinds, reasoning, content, calls, finish = gather(
        ask(server, out, stream=True, extra_body={"chat_template_kwargs": {"thinking": True}}))
    assert (reasoning, content, calls, finish) == ("Paris is in France; look it up.", "It is sunny.", {}, "stop")
    assert kinds == sorted(kinds, key=["reasoning", "content"].index) and len(kinds) > 2  # reasoning, then content

    r = ask(server, out, extra_body={"chat_template_kwargs": {"thinking": False}})  # non-thinking: no split
    assert forced.prompt_text().endswith(cf.ASSISTANT + cf.END_THINK)
    assert r.choices[0].message.content == out and getattr(r.choices[0].message, "reasoning_content", None) is None
    r = ask(server, "Sunny.")  # the default is non-thinking
    assert forced.prompt_text().endswith(cf.ASSISTANT + cf.END_THINK) and r.choices[0].message.content == "Sunny."


CALL = B + C + "get_weather" + S + '{"city": "Paris"}' + CE + C + "get_weather" + S + '{"city": "Lyon"}' + CE + E


def test_tool_calls(server):
    _, forced = server
    r = ask(server, "Let me check." + CALL, tools=TOOLS)
    assert cf.tools_prompt(TOOLS) in forced.prompt_text()
    (choice,) = r.choices
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me check."
    calls = choice.message.tool_calls
    assert [(c.type, c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("function", "get_weather", {"city": "Paris"}), ("function", "get_weather", {"city": "Lyon"})]
    assert len({c.id for c in calls}) == 2

    kinds, reasoning, content, got, finish = gather(ask(server, CALL, stream=True, tools=TOOLS))
    assert (reasoning, content, finish) == ("", "", "tool_calls") and kinds == ["tool_call", "tool_call"]
    assert [(c["name"], json.loads(c["arguments"])) for c in got.values()] == [
        ("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Lyon"})]
    assert all(c["id"] for c in got.values())

    # the calls and their results go back into the prompt; the reply follows the tool outputs directly
    history = [*USER, {"role": "assistant", "content": None, "tool_calls": [
        {"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": c.function.arguments}}
        for c in calls]},
        {"role": "tool", "tool_call_id": calls[0].id, "content": "18C"},
        {"role": "tool", "tool_call_id": calls[1].id, "content": "21C"}]
    r = ask(server, "Paris 18C, Lyon 21C.", tools=TOOLS, messages=history)
    assert r.choices[0].message.content == "Paris 18C, Lyon 21C." and r.choices[0].finish_reason == "stop"
    assert forced.prompt_text().endswith(
        cf.ASSISTANT + cf.END_THINK + CALL + cf.EOS + cf.OUTPUT_BEGIN + "18C" + cf.OUTPUT_END
        + cf.OUTPUT_BEGIN + "21C" + cf.OUTPUT_END)

    r = ask(server, CALL, tools=TOOLS, tool_choice="none")  # tools off: neither rendered nor parsed
    assert "## Tools" not in forced.prompt_text() and r.choices[0].message.content == CALL


BAD_CALL = B + C + "get_weather" + S + '{"city": "Par' + CE + E


def test_malformed_tool_markup_is_content(server):
    r = ask(server, "Hmm." + BAD_CALL, tools=TOOLS)
    assert r.choices[0].message.content == "Hmm." + BAD_CALL and not r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "stop"
    _, _, content, calls, finish = gather(ask(server, "Hmm." + BAD_CALL, stream=True, tools=TOOLS))
    assert (content, calls, finish) == ("Hmm." + BAD_CALL, {}, "stop")
    unterminated = B + C + "get_weather" + S + '{"city": "Paris"}'  # cut by max_tokens mid-call
    r = ask(server, unterminated + CE + E, tools=TOOLS, max_tokens=len(server[1].tok.encode(unterminated,
                                                                                           allow_special=True)))
    assert r.choices[0].message.content == unterminated and r.choices[0].finish_reason == "length"


@pytest.mark.parametrize(("extra", "param"), [
    ({"chat_template_kwargs": {"thinking": "yes"}}, "thinking"),
    ({"tools": TOOLS, "tool_choice": "required"}, "tool_choice"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "text"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}, "assistant"),
])
def test_bad_chat_requests(server, extra, param):
    with pytest.raises(openai.BadRequestError, match=param):
        ask(server, "x", **({"extra_body": extra} if "chat_template_kwargs" in extra else extra))
