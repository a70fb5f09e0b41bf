"""Engine throughput: one stream's decode tokens/s and the throughput of N concurrent streams.

    python bench/serving.py                                  # configs/tiny.yaml, random weights
    python bench/serving.py --checkpoint runs/tiny/params --batch 8 --tokens 256 --speculative

Times exclude compilation (a warm-up run of the same shapes goes first). Prompts are 16 tokens; EOS is
ignored so every stream generates exactly ``--tokens``.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/tiny.yaml", help="model config for random weights")
    ap.add_argument("--checkpoint", help="params checkpoint instead of random weights")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--speculative", action="store_true")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. model.param_dtype=bfloat16")
    args = ap.parse_args()

    from dsv3_jax.config import load_config
    from dsv3_jax.model import init_variables
    from dsv3_jax.serving import Engine, SamplingParams

    if args.checkpoint:
        from dsv3_jax.params_io import load_variables

        variables, cfg = load_variables(args.checkpoint)
        model = cfg.model
    else:
        model = load_config(args.config, args.overrides).model
        variables = jax.jit(lambda k: init_variables(model, k))(jax.random.key(0))
    engine = Engine(model, variables, max_slots=args.batch, max_len=args.max_len, speculative=args.speculative)
    params = SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True)
    prompt = [10 + i % 1000 for i in range(args.prompt_len)]
    engine.generate([prompt], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))  # compile
    # Decode roofline at batch 1: every activated weight (bf16/f32 as stored; not the embedding table) read once
    # per token, plus the latent cache; HBM 2.35 TB/s measured on the H100 (../shared/GPU.md).
    c = model.param_counts()
    wbytes = (c["active"] - c["embedding"]) * jnp.dtype(model.param_dtype).itemsize
    cache_bytes = model.num_hidden_layers * model.latent_cache_dim * (args.prompt_len + args.tokens // 2) * 2
    roofline = 2.35e12 / (wbytes + cache_bytes)

    for n in (1, args.batch):
        t0 = time.perf_counter()
        out = engine.generate([[t + i for t in prompt] for i in range(n)], params)
        dt = time.perf_counter() - t0
        total = sum(len(c.token_ids) for c in out)
        print(f"RESULT ours {jax.devices()[0].platform} batch {n}: {total} tokens in {dt:.2f} s = "
              f"{total / dt:.1f} tokens/s ({total / n / dt:.1f} per stream)"
              + (f"; {100 * total / dt / roofline:.1f}% of the {roofline:.0f} tokens/s HBM roofline" if n == 1 else ""))
    if args.speculative:
        print(f"MTP acceptance rate {engine.acceptance_rate:.2f}")


if __name__ == "__main__":
    main()
