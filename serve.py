"""Serve a DeepSeek-V3 checkpoint: one offline completion, or an OpenAI-compatible HTTP server.

    python serve.py --checkpoint runs/tiny/params --prompt "def fib(n):" --max-tokens 64
    python serve.py --hf-dir /models/DeepSeek-V3 --port 8000 --api-key sk-local --speculative
    curl -s 127.0.0.1:8000/v1/completions -H 'content-type: application/json' \\
         -d '{"model": "params", "prompt": "def fib(n):", "max_tokens": 32}'

See ``dsv3_jax/serving/`` for the engine and the API.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="params checkpoint dir (config.yaml + variables/) or training checkpoint")
    src.add_argument("--hf-dir", help="Hugging Face DeepSeek-V3 dir (config.json + *.safetensors)")
    ap.add_argument("--tokenizer", help="tokenizer.json (default: found beside/above the weights, else the "
                                        "config's default BPE)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], help="cast the params on load")
    ap.add_argument("--compute-dtype", choices=["float32", "bfloat16"],
                    help="matmul dtype (default: the config's; float32 on CPU, whose XLA lacks bf16 dots)")
    ap.add_argument("--prompt", help="generate one completion, print it and exit (no server)")
    ap.add_argument("--max-tokens", type=int, default=64, help="offline: tokens to generate")
    ap.add_argument("--temperature", type=float, default=0.0, help="offline: 0 = greedy")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--api-key", default=os.environ.get("DSV3_API_KEY"),
                    help="require 'Authorization: Bearer KEY' on every route but /health, /metrics included, and "
                         "turn the /docs pages off (default: $DSV3_API_KEY, else none)")
    ap.add_argument("--max-body-bytes", type=int, default=8 * 2**20,
                    help="largest request body; larger ones get 413 before they are read (default 8 MiB)")
    ap.add_argument("--read-timeout", type=float, default=30.0,
                    help="seconds a client has to send a whole request (headers and body) before its connection "
                         "is closed (default 30)")
    ap.add_argument("--keep-alive-timeout", type=int, default=5,
                    help="seconds an idle keep-alive connection stays open (default 5)")
    ap.add_argument("--shutdown-timeout", type=int, default=10,
                    help="on SIGTERM/SIGINT, seconds to let requests in flight finish before closing them "
                         "(default 10)")
    ap.add_argument("--model-name", help="the model id clients send (default: the weights dir name)")
    ap.add_argument("--max-slots", type=int, default=8, help="concurrent sequences (cache rows)")
    ap.add_argument("--max-len", type=int, help="context per sequence (default min(max_position_embeddings, 4096))")
    ap.add_argument("--speculative", action="store_true", help="MTP speculative decoding")
    ap.add_argument("--decode-chunk", type=int, default=4,
                    help="decode steps per device call when no request waits for a row (1 = lowest admission "
                         "latency; more = less host overhead per token)")
    ap.add_argument("--warmup", action="store_true", help="compile every prefill bucket before serving")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for flag in ("max_body_bytes", "read_timeout", "keep_alive_timeout"):
        if getattr(args, flag) <= 0:
            print(f"serve.py: error: --{flag.replace('_', '-')}={getattr(args, flag)}: must be positive",
                  file=sys.stderr)
            return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("jax").setLevel(logging.WARNING)
    import jax

    from dsv3_jax.config import ConfigError
    from sharding.distributed import initialize

    try:  # a multi-process launch environment joins here, before any other JAX work (sharding/distributed.py)
        multi = initialize(logging.getLogger("serve").info)
    except ConfigError as e:
        print(f"serve.py: error: {e}", file=sys.stderr)
        return 2
    if multi:  # the engine runs on one host's devices; N processes would each serve the same port
        print(f"serve.py: error: launched as {jax.process_count()} processes, but serving runs on one host; "
              f"start serve.py as a single process (unset JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/"
              f"JAX_PROCESS_ID, or DSV3_DISTRIBUTED=0 under SLURM)", file=sys.stderr)
        return 2

    from dsv3_jax.serving import Engine, RequestError, SamplingParams
    from dsv3_jax.serving.loading import load_model, load_serving_tokenizer

    try:
        loaded = load_model(args.checkpoint, args.hf_dir, args.dtype)
    except (OSError, ValueError) as e:  # missing/empty dir, not a checkpoint, damaged files: one line, no traceback
        print(f"serve.py: error: {e}", file=sys.stderr)
        return 2
    compute = args.compute_dtype
    if compute is None and jax.default_backend() == "cpu" and loaded.model.dtype != "float32":
        logging.getLogger("serve").info("CPU backend: computing in float32 (model.dtype=%s; pass --compute-dtype to force)",
                     loaded.model.dtype)
        compute = "float32"
    if compute:
        loaded.model = dataclasses.replace(loaded.model, dtype=compute)
    tok, tok_cfg = load_serving_tokenizer(loaded, args.tokenizer)
    engine = Engine(loaded.model, loaded.variables, tokenizer=tok, max_slots=args.max_slots, max_len=args.max_len,
                    speculative=args.speculative, decode_chunk=args.decode_chunk)
    if args.warmup:
        engine.warmup()

    if args.prompt is not None:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                                top_k=args.top_k, seed=args.seed)
        t0 = time.perf_counter()
        sys.stdout.write(args.prompt)
        done = []

        def show(ev):
            sys.stdout.write(ev.text)
            sys.stdout.flush()
            if ev.finish_reason:
                done.append(ev)

        try:
            engine.submit(tok.encode(args.prompt, allow_special=True), params, on_event=show)
        except RequestError as e:
            print(f"\nerror: {e.message}", file=sys.stderr)
            return 2
        while not done:
            engine.step()
        dt = time.perf_counter() - t0
        n = done[0].completion_tokens
        extra = f", MTP acceptance {engine.acceptance_rate:.2f}" if args.speculative else ""
        print(f"\n[{n} tokens in {dt:.2f} s incl. compile, finish_reason={done[0].finish_reason}{extra}]",
              file=sys.stderr)
        return 0

    import uvicorn

    from dsv3_jax.serving.app import create_app
    from dsv3_jax.serving.http import server_config

    template = tok_cfg.get("chat_template")
    if isinstance(template, list):  # [{"name": ..., "template": ...}]
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    name = args.model_name or loaded.source.absolute().name
    app = create_app(engine, tok, name, api_key=args.api_key, chat_template=template,
                     add_bos=bool(tok_cfg.get("add_bos_token", False)), max_body_bytes=args.max_body_bytes)
    uvicorn.Server(server_config(app, args.host, args.port, read_timeout=args.read_timeout,
                                 keep_alive=args.keep_alive_timeout, shutdown_timeout=args.shutdown_timeout)).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
