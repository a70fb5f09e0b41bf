"""Engine speed: decode tokens/s at several batch sizes, time to first token, device time of one decode step.

    python bench/serving.py                                  # configs/tiny.yaml, random weights
    python bench/serving.py --config configs/bench_1gpu.yaml --batches 1,32,64 --prompt-len 512 --tokens 128 \\
        --decode-chunk 8 model.num_nextn_predict_layers=0 model.param_dtype=bfloat16
    python bench/serving.py --checkpoint runs/tiny/params --batches 8 --speculative

For each batch size B an engine with B rows runs B prompts of ``--prompt-len`` tokens to ``--tokens`` new
tokens each (greedy, EOS ignored), after a warm-up of the same shapes (compilation excluded). Printed per B:

- ``decode tokens/s``: generated tokens ÷ (wall time − the batch's prefill time), prefill measured separately;
- ``TTFT``: submit → first token of one request on an idle engine (prefill + first sample + host work);
- ``device step``: one jitted decode call timed alone (``--decode-chunk`` tokens per row), so the gap to the
  engine's rate is host overhead.

At batch 1 the rate is compared with the HBM roofline: every activated weight (as stored; not the embedding
table) plus the latent cache read once per token at 2.35 TB/s (measured on the H100, ../shared/GPU.md).
``--json PATH`` writes the rows.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _timed_step(engine, n: int, reps: int = 20) -> float:
    """Seconds of one jitted decode call (n tokens per row), device time only (no host bookkeeping)."""
    B = engine.max_slots
    z = np.zeros(B, np.int32)
    args = (z + 7, z + engine.max_len // 2, engine._temp, engine._top_k, engine._top_p, engine._seeds, z)
    toks, engine._cache = engine._decode_jit(engine.variables, engine._cache, *args[:2], *args[2:], n)
    jax.block_until_ready(toks)
    t0 = time.perf_counter()
    for _ in range(reps):
        toks, engine._cache = engine._decode_jit(engine.variables, engine._cache, *args[:2], *args[2:], n)
    jax.block_until_ready(toks)
    return (time.perf_counter() - t0) / reps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/tiny.yaml", help="model config for random weights")
    ap.add_argument("--checkpoint", help="params checkpoint instead of random weights")
    ap.add_argument("--batches", default="1,8", help="comma-separated batch sizes (engine rows = batch)")
    ap.add_argument("--tokens", type=int, default=128, help="new tokens per sequence")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--prompt-text", help="with --checkpoint: real prompts — this text's tokens, cut to --prompt-len "
                    "from a different offset per sequence (synthetic token ids otherwise)")
    ap.add_argument("--max-len", type=int, help="context per row (default prompt + tokens + 16)")
    ap.add_argument("--decode-chunk", type=int, default=1, help="decode steps per device call")
    ap.add_argument("--speculative", action="store_true")
    ap.add_argument("--json", help="write the result rows here")
    ap.add_argument("--profile", help="trace 5 decode calls of the first batch size here; print time per kernel")
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. model.param_dtype=bfloat16")
    args = ap.parse_args()

    from dsv3_jax.config import load_config
    from dsv3_jax.model import init_variables
    from dsv3_jax.serving import Engine, SamplingParams

    if args.checkpoint:  # a params checkpoint or a training run / checkpoint dir, as serve.py takes it
        from dsv3_jax.serving.loading import load_model

        loaded = load_model(args.checkpoint)
        variables, model = loaded.variables, loaded.model
        if args.overrides:
            ap.error("config overrides apply to --config runs (random weights), not to --checkpoint")
    else:
        model = load_config(args.config, args.overrides).model
        variables = jax.jit(lambda k: init_variables(model, k))(jax.random.key(0))
    max_len = args.max_len or args.prompt_len + args.tokens + 16
    params = SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True)
    first = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    prompt = [10 + i % 1000 for i in range(args.prompt_len)]
    text_ids = None
    if args.prompt_text:
        if not args.checkpoint:
            ap.error("--prompt-text needs --checkpoint (a trained model and its tokenizer)")
        from dsv3_jax.serving.loading import load_serving_tokenizer

        text_ids = load_serving_tokenizer(loaded)[0].encode(Path(args.prompt_text).read_text())
        if len(text_ids) < 2 * args.prompt_len:
            ap.error(f"{args.prompt_text} has {len(text_ids)} tokens: too few for --prompt-len {args.prompt_len}")
        prompt = text_ids[:args.prompt_len]

    c = model.param_counts()
    wbytes = (c["active"] - c["embedding"]) * jnp.dtype(model.param_dtype).itemsize
    cache_bytes = model.num_hidden_layers * model.latent_cache_dim * (args.prompt_len + args.tokens // 2) * 2
    roofline = 2.35e12 / (wbytes + cache_bytes)
    dev = jax.devices()[0]
    print(f"device {dev.device_kind} ({dev.platform}), jax {jax.__version__}; layers {model.num_hidden_layers}, "
          f"weights read per token at batch 1: {wbytes / 1e9:.3f} GB + cache {cache_bytes / 1e6:.1f} MB → "
          f"roofline {roofline:.0f} tokens/s")
    rows = []
    for n in (int(b) for b in args.batches.split(",")):
        engine = Engine(model, variables, max_slots=n, max_len=max_len, speculative=args.speculative,
                        decode_chunk=args.decode_chunk)
        if text_ids is not None:  # each sequence its own window of the text
            step = max(1, (len(text_ids) - args.prompt_len) // max(n, 1))
            prompts = [text_ids[i * step: i * step + args.prompt_len] for i in range(n)]
        else:
            prompts = [[(t + i) % model.vocab_size for t in prompt] for i in range(n)]
        engine.generate(prompts, SamplingParams(max_tokens=2 * args.decode_chunk + 2, temperature=0.0,
                                                ignore_eos=True))  # compile every shape used below
        engine.generate(prompts, first)  # the first call after warm-up carries one-off costs: not timed
        t0 = time.perf_counter()
        engine.generate(prompts, first)
        prefill = time.perf_counter() - t0  # n prefills (one per row, as the engine admits them) + 1 token each
        t0 = time.perf_counter()
        out = engine.generate([prompt], first)
        ttft = time.perf_counter() - t0
        assert len(out[0].token_ids) == 1
        t0 = time.perf_counter()
        out = engine.generate(prompts, params)
        wall = time.perf_counter() - t0
        total = sum(len(o.token_ids) for o in out)
        if wall - prefill > 0.2 * wall:  # tokens after each row's first, over decode time
            tps = (total - n) / (wall - prefill)
        else:  # too short a run to subtract the prefill reliably: whole wall time, say so
            tps = total / wall
            print(f"note: batch {n}: generation too short to subtract prefill ({prefill:.3f} of {wall:.3f} s); "
                  "the rate includes it — use more --tokens")
        row = {"batch": n, "tokens": total, "wall_s": wall, "prefill_s": prefill, "decode_tokens_per_s": tps,
               "ttft_ms": 1e3 * ttft, "decode_chunk": args.decode_chunk}
        if not args.speculative:
            step = _timed_step(engine, args.decode_chunk)
            row["device_ms_per_token_step"] = 1e3 * step / args.decode_chunk
            if args.profile and not rows:
                from bench.profile_summary import summarise

                jax.profiler.start_trace(args.profile, create_perfetto_trace=True)
                _timed_step(engine, args.decode_chunk, reps=5)
                jax.profiler.stop_trace()
                steps = 6 * args.decode_chunk  # _timed_step runs 1 + reps calls
                print(f"PROFILE batch {n}: device ms per decode token by kernel (calls per token)")
                for name, ms, calls in summarise(args.profile, steps=steps, top=30):
                    print(f"PROFILE {ms:7.3f} {calls:4d}  {name[:140]}")
        if n == 1:
            row["roofline_tokens_per_s"] = roofline
            row["pct_roofline"] = 100 * tps / roofline
        else:
            row["per_stream"] = tps / n
        rows.append(row)
        print(f"RESULT ours {dev.platform} batch {n}: {tps:.1f} decode tokens/s ({tps / n:.1f} per stream), "
              f"TTFT {1e3 * ttft:.1f} ms, wall {wall:.2f} s for {total} tokens"
              + (f", device step {row['device_ms_per_token_step']:.3f} ms/token"
                 if "device_ms_per_token_step" in row else "")
              + (f"; {row['pct_roofline']:.1f}% of the {roofline:.0f} tokens/s HBM roofline" if n == 1 else ""),
              flush=True)
        if args.speculative:
            print(f"MTP acceptance rate {engine.acceptance_rate:.2f}")
            row["acceptance_rate"] = engine.acceptance_rate
        del engine
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": dev.device_kind, "jax": jax.__version__, "overrides": args.overrides,
                       "prompt_len": args.prompt_len, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
