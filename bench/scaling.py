"""How the train step's cost grows with the work: tokens/s and MFU against sequence length and expert count.

    python bench/scaling.py [--config configs/bench_1gpu.yaml] [--layers 4] [--tokens 16384]
                            [--seqs 1024,2048,4096,8192,16384] [--experts 16,32,64,128] [--expert-seq 4096]
                            [--json OUT.json] [key=value ...]

Every point trains the bench architecture at ``--layers`` layers (1 dense + MoE, MTP off) for a few steps in
one process (one compile per point). The sequence sweep keeps ``--tokens`` tokens per step (sequences =
tokens / seq), so only the attention share changes; the expert sweep runs seq ``--expert-seq`` with the same tokens per step
and changes ``n_routed_experts`` (top-6 kept: the active FLOPs stay, the parameters and optimizer bytes grow).
A point that runs out of memory is reported as such and the sweep goes on. Prints a table; ``--json`` writes
the rows. Same FLOPs formula as ``bench/train.py``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax
import numpy as np

from bench.train import flops_per_token, peak_flops
from dsv3_jax.config import load_config


def run_point(config: str, overrides: list[str], mb: int, steps: int) -> dict:
    """Step time, tokens/s and MFU of one config (``mb`` sequences per step)."""
    from dsv3_jax.training.step import init_state, train_step

    cfg = load_config(config, overrides + [f"train.global_batch_size={mb}", "train.micro_batch_size=null"])
    m, seq = cfg.model, cfg.data.seq_len
    t0 = time.perf_counter()
    state = init_state(cfg)
    tokens = np.random.default_rng(0).integers(0, m.vocab_size, (1, mb, seq + 1)).astype(np.int32)
    for _ in range(2):
        state, met = train_step(state, tokens, cfg)
        jax.block_until_ready(met["loss"])
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        state, met = train_step(state, tokens, cfg)
        jax.block_until_ready(met["loss"])
        times.append(time.perf_counter() - t)
    del state, met
    step_s = statistics.median(times)
    tps = mb * seq / step_s
    fpt = flops_per_token(m, seq)
    peak = peak_flops()
    return dict(seq=seq, sequences=mb, experts=m.n_routed_experts, layers=m.num_hidden_layers,
                step_ms=step_s * 1e3, tokens_per_s=tps, gflop_per_token=fpt / 1e9,
                mfu=tps * fpt / peak if peak else None, compile_s=compile_s,
                params_b=m.param_counts()["total"] / 1e9)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/bench_1gpu.yaml")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=16384, help="tokens per step at every point")
    ap.add_argument("--seqs", default="1024,2048,4096,8192,16384")
    ap.add_argument("--experts", default="16,32,64,128")
    ap.add_argument("--expert-seq", type=int, default=4096, help="sequence length of the expert sweep")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--json")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args(argv)
    base = list(a.overrides) + [f"model.num_hidden_layers={a.layers}", "model.num_nextn_predict_layers=0"]
    points = []
    for s in filter(None, a.seqs.split(",")):
        seq = int(s)
        if a.tokens % seq:
            raise SystemExit(f"--tokens {a.tokens} is not a multiple of seq {seq}")
        points.append(("seq", base + [f"data.seq_len={seq}", f"model.max_position_embeddings={max(seq, 4096)}"],
                       a.tokens // seq))
    for e in filter(None, a.experts.split(",")):
        points.append(("experts", base + [f"data.seq_len={a.expert_seq}", f"model.n_routed_experts={int(e)}"],
                       a.tokens // a.expert_seq))
    rows = []
    for sweep, ov, mb in points:
        try:
            r = dict(sweep=sweep, **run_point(a.config, ov, mb, a.steps))
        except Exception as e:  # noqa: BLE001 — one point out of memory must not end the sweep
            msg = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
            r = dict(sweep=sweep, overrides=ov[len(base):], sequences=mb, error=msg)
        rows.append(r)
        if "error" in r:
            print(f"POINT {sweep} {r['overrides']} failed: {r['error']}", flush=True)
        else:
            print(f"POINT {sweep} seq={r['seq']} x{r['sequences']} experts={r['experts']} step {r['step_ms']:.1f} ms "
                  f"tokens/s {r['tokens_per_s']:.0f} GFLOP/token {r['gflop_per_token']:.2f} MFU "
                  f"{'n/a' if r['mfu'] is None else f'{100 * r['mfu']:.1f}%'} (compile {r['compile_s']:.0f}s)",
                  flush=True)
    print("\n| sweep | seq × sequences | experts | step ms | tokens/s | GFLOP/token | MFU |\n|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['sweep']} | {' '.join(r['overrides'])} | | failed: {r['error'][:60]} | | | |")
        else:
            mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
            print(f"| {r['sweep']} | {r['seq']} × {r['sequences']} | {r['experts']} | {r['step_ms']:.1f} | "
                  f"{r['tokens_per_s']:.0f} | {r['gflop_per_token']:.2f} | {mfu} |")
    if a.json:
        Path(a.json).write_text(json.dumps(dict(device=jax.devices()[0].device_kind, jax=jax.__version__,
                                                rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
