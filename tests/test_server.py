"""The OpenAI-compatible server, for real: uvicorn on 127.0.0.1 (a free port) in a background thread, driven
by the ``openai`` client and raw HTTP. Answers are checked against the engine's own output."""

from __future__ import annotations

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

# The serving stack is an optional extra (fastapi, uvicorn; openai + httpx to test): skip, saying why, without it.
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

from dsv3_jax.data import Tokenizer, train_bpe
from dsv3_jax.serving import Engine, SamplingParams
from dsv3_jax.serving.app import create_app
from tests.common import random_variables, running_server, tiny_config

MAX_LEN = 256
CFG = tiny_config(vocab_size=320, max_position_embeddings=MAX_LEN)
TEXT = "def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n    y: int = 0\n" * 20
KEY = "sk-test"
MODEL = "tiny"
GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(train_bpe([TEXT], CFG.vocab_size), "test")


@pytest.fixture(scope="module")
def server(tok):
    """(base url, engine) of a running server; 8 cache rows, so 32 clients queue."""
    engine = Engine(CFG, random_variables(CFG), tokenizer=tok, max_slots=8, max_len=MAX_LEN)
    engine.warmup(buckets=[16, 32])  # the buckets these tests use; compiles before any client timeout runs
    with running_server(create_app(engine, tok, MODEL, api_key=KEY)) as url:
        yield url, engine


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, timeout=120, max_retries=0)


def reference(engine: Engine, tok: Tokenizer, prompts: list[str], n: int) -> list[str]:
    params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
    return [c.text for c in engine.generate([tok.encode(p, allow_special=True) for p in prompts], params)]


def metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    return float(re.search(rf"^dsv3_{name} (\S+)$", text, re.MULTILINE).group(1))


def test_completion_chat_models_health(server, client, tok):
    url, engine = server
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(url + "/health", timeout=10).json()["status"] == "ok"

    r = client.completions.create(model=MODEL, prompt="def fib(n):", max_tokens=8, **GREEDY)
    assert r.choices[0].text == reference(engine, tok, ["def fib(n):"], 8)[0]
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(tok.encode("def fib(n):")), 8)

    c = client.chat.completions.create(model=MODEL, messages=[{"role": "system", "content": "Be brief."},
                                                              {"role": "user", "content": "hi"}],
                                       max_tokens=6, **GREEDY)
    assert c.choices[0].message.role == "assistant" and c.usage.completion_tokens == 6
    assert c.choices[0].finish_reason == "length" and isinstance(c.choices[0].message.content, str)


def test_streaming(server, client, tok):
    engine = server[1]
    want = reference(engine, tok, ["class Point:"], 10)[0]
    chunks = list(client.completions.create(model=MODEL, prompt="class Point:", max_tokens=10, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == want
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 10

    chat = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x = 1"}],
                                               max_tokens=5, stream=True, **GREEDY))
    assert chat[0].choices[0].delta.role == "assistant"
    assert chat[-1].choices[0].finish_reason == "length"


def test_32_concurrent_streams(server, client, tok):
    """32 streaming clients on 8 cache rows: all finish, each with its own greedy text and token count."""
    url, engine = server
    prompts = [f"def f{i}(x):\n    return x + {i}" for i in range(32)]
    want = reference(engine, tok, prompts, 12)

    def one(prompt: str) -> tuple[str, int, str]:
        text, usage, reason = "", -1, ""
        for ch in client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY):
            if ch.choices:
                text += ch.choices[0].text
                reason = ch.choices[0].finish_reason or reason
            if ch.usage:
                usage = ch.usage.completion_tokens
        return text, usage, reason

    with ThreadPoolExecutor(32) as pool:
        got = list(pool.map(one, prompts, timeout=300))
    assert [g[0] for g in got] == want
    assert all(g[1:] == (12, "length") for g in got)
    assert metric(url, "queue_depth") == 0 and metric(url, "cache_slots_used") == 0


BAD = [  # (route, body, status, param or code)
    ("completions", "{not json", 400, "invalid_json"),
    ("completions", "[1, 2]", 400, None),
    ("completions", {"model": MODEL}, 400, "prompt"),
    ("completions", {"prompt": "x"}, 400, "model"),
    ("completions", {"model": MODEL, "prompt": "x", "temperature": -0.5}, 400, "temperature"),
    ("completions", {"model": MODEL, "prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ("completions", {"model": MODEL, "prompt": "x", "top_p": 0}, 400, "top_p"),
    ("completions", {"model": MODEL, "prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ("completions", {"model": MODEL, "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("completions", {"model": MODEL, "prompt": "x", "max_tokens": -3}, 400, "max_tokens"),
    ("completions", {"model": MODEL, "prompt": "x", "max_tokens": 10**6}, 400, "max_tokens"),
    ("completions", {"model": MODEL, "prompt": "x" * 3000}, 400, "prompt"),
    ("completions", {"model": MODEL, "prompt": [5, 400]}, 400, "prompt"),
    ("completions", {"model": MODEL, "prompt": ""}, 400, "prompt"),
    ("completions", {"model": MODEL, "prompt": "x", "n": 3}, 400, "n"),
    ("completions", {"model": "gpt-4", "prompt": "x"}, 404, "model"),
    ("chat/completions", {"model": MODEL, "messages": []}, 400, "messages"),
    ("chat/completions", {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role"),
    ("chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 999},
     400, "max_tokens"),
]


@pytest.mark.parametrize(("route", "body", "status", "param"), BAD)
def test_bad_input_gets_openai_error(server, route, body, status, param):
    url, _ = server
    content = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(f"{url}/v1/{route}", content=content, timeout=30,
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert param in (None, err["param"], err["code"])


def test_auth_and_server_keeps_serving(server, client):
    url, _ = server
    r = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "x"}, timeout=30)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "x"}, timeout=30,
                   headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="x", temperature=-1)
    assert client.completions.create(model=MODEL, prompt="x", max_tokens=2, **GREEDY).usage.completion_tokens == 2


def test_disconnect_mid_stream_frees_the_row(server):
    url, _ = server
    cancelled = metric(url, "requests_cancelled_total")
    body = {"model": MODEL, "prompt": "def long(x):", "max_tokens": 230, "temperature": 0, "ignore_eos": True,
            "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(3)]
        assert got[0].startswith("data: ")
    deadline = time.monotonic() + 30
    while metric(url, "cache_slots_used") or metric(url, "requests_cancelled_total") == cancelled:
        assert time.monotonic() < deadline, "the abandoned stream still holds its row"
        time.sleep(0.1)
    assert metric(url, "generated_tokens_total") > 0
