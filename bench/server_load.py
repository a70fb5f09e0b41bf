"""HTTP server under load: N concurrent streaming clients through the `openai` client against a real server.

    python bench/server_load.py                                   # tiny config, random weights, 64 clients
    python bench/server_load.py --config configs/bench_1gpu.yaml --clients 64 --slots 32 --tokens 128 \\
        model.num_hidden_layers=6 model.num_nextn_predict_layers=0 model.param_dtype=bfloat16

The server (``dsv3_jax.serving.app`` on uvicorn, 127.0.0.1, a free port) runs in this process over an engine
with ``--slots`` cache rows, so clients beyond that queue. Every client streams one completion of exactly
``--tokens`` tokens (EOS ignored) and checks its finish reason and usage count. Printed: clients finished /
lost, total generated tokens/s, time to the first streamed chunk (p50/p99) and request latency (p50/p99).
With random weights the text is mostly invalid UTF-8, which the server holds back until it is complete, so the
first chunk comes late: per-token TTFT is measured at the engine by ``bench/serving.py``.
Exit status 1 if any client is lost or short.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TEXT = "def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n    y: int = 0\n" * 20


def _pct(v: list[float], q: float) -> float:
    v = sorted(v)
    return v[min(len(v) - 1, int(q * len(v)))] if v else float("nan")


async def _clients(url: str, n: int, tokens: int, key: str) -> list[dict]:
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=key, timeout=600, max_retries=0)

    async def one(i: int) -> dict:
        t0 = time.perf_counter()
        first, n_tok, reason = None, -1, None
        try:
            stream = await client.completions.create(
                model="bench", prompt=f"def f{i}(x):\n    return x + {i}", max_tokens=tokens, temperature=0,
                stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
            async for ch in stream:
                if ch.choices and first is None:  # the first token's event (its text may be held back)
                    first = time.perf_counter() - t0
                if ch.choices and ch.choices[0].finish_reason:
                    reason = ch.choices[0].finish_reason
                if ch.usage:
                    n_tok = ch.usage.completion_tokens
        except Exception as e:  # a lost client is a result, not a crash of the benchmark
            return {"ok": False, "error": f"{type(e).__name__}: {e}"}
        return {"ok": reason == "length" and n_tok == tokens, "ttft": first, "latency": time.perf_counter() - t0,
                "tokens": n_tok, "reason": reason}

    return await asyncio.gather(*(one(i) for i in range(n)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/tiny.yaml")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--slots", type=int, default=16, help="engine cache rows (the rest of the clients queue)")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--decode-chunk", type=int, default=4)
    ap.add_argument("--json")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()

    import jax
    import uvicorn

    from dsv3_jax.config import load_config
    from dsv3_jax.data import Tokenizer, train_bpe
    from dsv3_jax.model import init_variables
    from dsv3_jax.serving import Engine
    from dsv3_jax.serving.app import create_app

    cfg = load_config(a.config, a.overrides).model
    if jax.default_backend() == "cpu":
        import dataclasses

        cfg = dataclasses.replace(cfg, dtype="float32")
    tok = Tokenizer(train_bpe([TEXT], min(cfg.vocab_size, 320)), "bench")
    variables = jax.jit(lambda k: init_variables(cfg, k))(jax.random.key(0))
    engine = Engine(cfg, variables, tokenizer=tok, max_slots=a.slots, max_len=a.tokens + 64,
                    decode_chunk=a.decode_chunk)
    engine.warmup(buckets=[16, 32])
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    srv = uvicorn.Server(uvicorn.Config(create_app(engine, tok, "bench", api_key="k"), log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.05)

    t0 = time.perf_counter()
    rows = asyncio.run(_clients(url, a.clients, a.tokens, "k"))
    wall = time.perf_counter() - t0
    srv.should_exit = True
    thread.join(15)

    ok = [r for r in rows if r["ok"]]
    lost = [r for r in rows if not r["ok"]]
    total = sum(r["tokens"] for r in ok)
    res = {"device": jax.devices()[0].device_kind, "clients": a.clients, "slots": a.slots, "tokens": a.tokens,
           "finished": len(ok), "lost": len(lost), "wall_s": wall, "tokens_per_s": total / wall,
           "ttft_p50_s": _pct([r["ttft"] for r in ok], 0.5), "ttft_p99_s": _pct([r["ttft"] for r in ok], 0.99),
           "latency_p50_s": _pct([r["latency"] for r in ok], 0.5),
           "latency_p99_s": _pct([r["latency"] for r in ok], 0.99),
           "errors": sorted({r.get("error", r.get("reason", "?")) for r in lost})[:5]}
    print(f"RESULT server {res['device']}: {a.clients} streaming clients on {a.slots} rows, {a.tokens} tokens "
          f"each: {len(ok)} finished, {len(lost)} lost; {res['tokens_per_s']:.0f} tokens/s; first chunk p50 "
          f"{res['ttft_p50_s'] * 1e3:.0f} ms p99 {res['ttft_p99_s'] * 1e3:.0f} ms; latency p50 "
          f"{res['latency_p50_s']:.2f} s p99 {res['latency_p99_s']:.2f} s" + (f"; errors {res['errors']}" if lost else ""))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
