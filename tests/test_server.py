"""The OpenAI-compatible server, for real: uvicorn on 127.0.0.1 (a free port) in a background thread, driven
by the ``openai`` client and raw HTTP. Answers are checked against the engine's own output."""

from __future__ import annotations

import json
import re
import socket
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
from dsv3_jax.serving.app import create_app, max_token_chars
from dsv3_jax.serving.http import server_config
from tests.common import random_variables, running_server, tiny_config

MAX_LEN = 256
CFG = tiny_config(vocab_size=320, max_position_embeddings=MAX_LEN)
TEXT = "def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n    y: int = 0\n" * 20
KEY = "sk-test"
MODEL = "tiny"
GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_BODY = 2**20  # small limits so the hardening tests run in seconds
READ_TIMEOUT = 2.0


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(train_bpe([TEXT], CFG.vocab_size), "test")


@pytest.fixture(scope="module")
def server(tok):
    """(base url, engine) of a running server; 8 cache rows, so 32 clients queue."""
    engine = Engine(CFG, random_variables(CFG), tokenizer=tok, max_slots=8, max_len=MAX_LEN)
    engine.warmup(buckets=[16, 32])  # the buckets these tests use; compiles before any client timeout runs
    app = create_app(engine, tok, MODEL, api_key=KEY, max_body_bytes=MAX_BODY)
    config = server_config(app, read_timeout=READ_TIMEOUT, shutdown_timeout=5, log_level="warning")
    with running_server(app, config) as url:
        yield url, engine


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, timeout=120, max_retries=0)


def reference(engine: Engine, tok: Tokenizer, prompts: list[str], n: int) -> list[str]:
    params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
    return [c.text for c in engine.generate([tok.encode(p, allow_special=True) for p in prompts], params)]


def metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10, headers=AUTH).text
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
    # issue 24: values the engine cannot hold, lone surrogates, JSON too deep for the parser
    ("completions", {"model": MODEL, "prompt": "x", "top_k": 2**31}, 400, "top_k"),
    ("completions", {"model": MODEL, "prompt": "x", "stop_token_ids": [2**40]}, 400, "stop_token_ids"),
    ("completions", '{"model": "tiny", "prompt": "ab\\ud800cd"}', 400, "prompt"),
    ("completions", '{"model": "tiny", "prompt": ["ok", "\\udfff"]}', 400, "prompt"),
    ("chat/completions", '{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800"}]}', 400,
     "messages.0.content"),
    ("completions", '{"model": "tiny", "prompt": ' + "[" * 100_000 + "]" * 100_000 + "}", 400, "invalid_json"),
    ("completions", '{"model": "tiny", "prompt": "x", "stream_options": ' + '{"a": ' * 100_000 + "1" + "}" * 100_001,
     400, "invalid_json"),
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


# ------------------------------------------------------------------------------------------------------------
# Hardening (issue 24): one bad request never hurts another
# ------------------------------------------------------------------------------------------------------------


def test_engine_error_fails_only_its_request(server, client, tok, monkeypatch):
    """A request that makes the engine raise while admitting it (as top_k=2^31 once did: OverflowError in
    _prefill_row; validation now refuses it, so the fault is injected) gets its own 500 at once; streams
    running beside it finish unharmed."""
    url, engine = server
    prompts = [f"def g{i}(x):" for i in range(3)]
    want = reference(engine, tok, prompts, 40)
    prefill_row = engine._prefill_row

    def faulty(slot, req):
        if req.params.seed == 666:
            raise OverflowError("Python integer 2147483648 out of bounds for int32")
        return prefill_row(slot, req)

    monkeypatch.setattr(engine, "_prefill_row", faulty)

    def stream(prompt: str) -> str:
        chunks = client.completions.create(model=MODEL, prompt=prompt, max_tokens=40, stream=True, **GREEDY)
        return "".join(ch.choices[0].text for ch in chunks if ch.choices)

    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(stream, p) for p in prompts]
        time.sleep(0.3)  # the streams are running
        t0 = time.monotonic()
        r = httpx.post(url + "/v1/completions", headers=AUTH, timeout=30,
                       json={"model": MODEL, "prompt": "x", "max_tokens": 4, "seed": 666})
        assert time.monotonic() - t0 < 10
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
        assert [f.result(timeout=120) for f in futures] == want
    monkeypatch.undo()
    # The largest valid top_k runs (clamped to the vocabulary: keeps every token, like top_k=0).
    r = client.completions.create(model=MODEL, prompt="x", max_tokens=3, temperature=1.0, top_p=1.0, seed=3,
                                  extra_body={"top_k": 2**31 - 1, "ignore_eos": True})
    r0 = client.completions.create(model=MODEL, prompt="x", max_tokens=3, temperature=1.0, top_p=1.0, seed=3,
                                   extra_body={"top_k": 0, "ignore_eos": True})
    assert r.choices[0].text == r0.choices[0].text and r.usage.completion_tokens == 3
    assert metric(url, "cache_slots_used") == 0


def test_oversize_body_is_413_before_it_is_read(server):
    url, _ = server
    big = json.dumps({"model": MODEL, "prompt": "x" * (MAX_BODY + 10)})
    r = httpx.post(url + "/v1/completions", content=big, headers=AUTH | {"Content-Type": "application/json"},
                   timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunked():  # no Content-Length: refused once the bytes read pass the limit
        for _ in range(4 * MAX_BODY // 65536):
            yield b"x" * 65536

    r = httpx.post(url + "/v1/completions", content=chunked(), headers=AUTH, timeout=30)
    assert r.status_code == 413
    assert httpx.get(url + "/health", timeout=10).json()["status"] == "ok"


def test_tokenizing_runs_off_the_event_loop(server, tok, monkeypatch):
    """A slow tokenisation (a huge prompt) must not stall other clients; a prompt too long for the context is
    refused without being tokenised at all."""
    url, _ = server
    encode = tok.encode
    calls = []

    def slow_encode(text, **kw):
        calls.append(len(text))
        time.sleep(3.0)
        return encode(text, **kw)

    monkeypatch.setattr(tok, "encode", slow_encode)
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(httpx.post, url + "/v1/completions", headers=AUTH, timeout=60,
                           json={"model": MODEL, "prompt": "def f(x):", "max_tokens": 2})
        time.sleep(0.5)
        t0 = time.monotonic()
        assert httpx.get(url + "/health", timeout=10).status_code == 200
        assert time.monotonic() - t0 < 1.5, "/health waited for the tokenizer"
        assert slow.result().status_code == 200
    calls.clear()
    too_long = "a" * (MAX_LEN * max_token_chars(tok) + 1)
    r = httpx.post(url + "/v1/completions", headers=AUTH, timeout=30, json={"model": MODEL, "prompt": too_long})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    r = httpx.post(url + "/v1/chat/completions", headers=AUTH, timeout=30,
                   json={"model": MODEL, "messages": [{"role": "user", "content": too_long}]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert calls == []


def test_metrics_and_docs_need_the_key(server):
    url, _ = server
    for path in ("/metrics", "/docs", "/redoc", "/openapi.json"):
        r = httpx.get(url + path, timeout=10)
        assert r.status_code == 401, path
    assert httpx.get(url + "/metrics", headers=AUTH, timeout=10).status_code == 200
    assert httpx.get(url + "/docs", headers=AUTH, timeout=10).status_code == 404  # docs are off with a key
    assert httpx.get(url + "/health", timeout=10).status_code == 200


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    """True if the server closes ``sock`` within ``seconds`` (recv sees EOF or a reset)."""
    sock.settimeout(seconds)
    try:
        while sock.recv(4096):
            pass
        return True
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def test_slow_clients_are_timed_out(server, client):
    """Headers or a body sent too slowly: the connection is closed after the read timeout (uvicorn alone never
    closes it); a request that arrived in time runs to the end however long it takes."""
    url, _ = server
    port = int(url.rsplit(":", 1)[1])
    socks = []
    for head in (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n",  # headers never finish
                 b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"mo"):  # body stalls
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(head)
        socks.append(s)
    t0 = time.monotonic()
    for s in socks:
        assert _closed_within(s, READ_TIMEOUT + 5), "a slow client was never timed out"
        s.close()
    assert time.monotonic() - t0 >= READ_TIMEOUT - 0.5
    # A complete request outlives the read timeout while it generates.
    t0 = time.monotonic()
    r = client.completions.create(model=MODEL, prompt="x", max_tokens=200, **GREEDY)
    assert r.usage.completion_tokens == 200


def test_serve_py_missing_or_empty_dir_is_one_line(tmp_path, capsys):
    import serve

    (tmp_path / "empty").mkdir()
    for d, expected in ((tmp_path / "nope", "does not exist"), (tmp_path / "empty", "no complete checkpoint")):
        assert serve.main(["--checkpoint", str(d), "--prompt", "x"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("serve.py: error: ") and expected in err and "Traceback" not in err, err
    assert serve.main(["--checkpoint", str(tmp_path), "--max-body-bytes", "0"]) == 2
    assert "--max-body-bytes=0: must be positive" in capsys.readouterr().err
