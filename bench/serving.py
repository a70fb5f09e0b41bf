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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/tiny.yaml", help="model config for random weights")
    ap.add_argument("--checkpoint", help="params checkpoint instead of random weights")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--speculative", action="store_true")
    args = ap.parse_args()

    from dsv3_jax.config import load_config
    from dsv3_jax.model import init_variables
    from dsv3_jax.serving import Engine, SamplingParams

    if args.checkpoint:
        from dsv3_jax.params_io import load_variables

        variables, cfg = load_variables(args.checkpoint)
        model = cfg.model
    else:
        model = load_config(args.config).model
        variables = jax.jit(lambda k: init_variables(model, k))(jax.random.key(0))
    engine = Engine(model, variables, max_slots=args.batch, max_len=args.max_len, speculative=args.speculative)
    params = SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True)
    prompt = list(range(10, 26))
    engine.generate([prompt], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))  # compile

    for n in (1, args.batch):
        t0 = time.perf_counter()
        out = engine.generate([[t + i for t in prompt] for i in range(n)], params)
        dt = time.perf_counter() - t0
        total = sum(len(c.token_ids) for c in out)
        print(f"{jax.devices()[0].platform} batch {n}: {total} tokens in {dt:.2f} s = {total / dt:.1f} tokens/s"
              f" ({total / n / dt:.1f} per stream)")
    if args.speculative:
        print(f"MTP acceptance rate {engine.acceptance_rate:.2f}")


if __name__ == "__main__":
    main()
