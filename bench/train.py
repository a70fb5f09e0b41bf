"""Train-step benchmark: tokens/s, step time, MFU and peak memory for a config on one device.

    python bench/train.py --config configs/bench_1gpu.yaml [--layers 6] [--seq 4096] [--mb 2] [--steps 10]
                          [--mtp 0|1] [--json OUT.json] [key=value ...]

MFU counts 6·(active non-embedding params, incl. lm_head and MTP) + 3·L·n_h·T·(d_qk + d_v) FLOPs per token
(the attention term is already halved for causality: 2 matmuls × fwd+bwd 3× × ½) against the device's dense
BF16 peak (989 TFLOP/s for H100 SXM) — the same formula as ../shared/GPU.md's HF peer numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax
import numpy as np

from dsv3_jax import fp8
from dsv3_jax.config import ModelConfig, load_config

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "H800": 989e12}


def flops_per_token(m: ModelConfig, seq: int) -> float:
    """Training FLOPs per token (see module docstring)."""
    c = m.param_counts()
    active = c["active"] - c["embedding"] + c["mtp_active"]
    layers = m.num_hidden_layers + m.num_nextn_predict_layers
    attn = layers * m.num_attention_heads * seq * (m.qk_head_dim + m.v_head_dim)
    return 6 * active + 3 * attn


def flops_formula(m: ModelConfig, seq: int) -> str:
    """The FLOPs-per-token formula with this model's numbers filled in (printed next to every MFU)."""
    c = m.param_counts()
    active = c["active"] - c["embedding"] + c["mtp_active"]
    layers = m.num_hidden_layers + m.num_nextn_predict_layers
    return (f"per token = 6·active non-embedding params + 3·L·n_h·T·(d_qk + d_v) = 6·{active / 1e9:.3f}e9 + "
            f"3·{layers}·{m.num_attention_heads}·{seq}·({m.qk_head_dim}+{m.v_head_dim}) = "
            f"{flops_per_token(m, seq) / 1e9:.2f} GFLOP")


def peak_flops() -> float | None:
    kind = jax.devices()[0].device_kind
    return next((v for k, v in PEAK_BF16.items() if k in kind), None)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/bench_1gpu.yaml")
    ap.add_argument("--layers", type=int)
    ap.add_argument("--seq", type=int)
    ap.add_argument("--mb", type=int, default=2, help="sequences per step")
    ap.add_argument("--mtp", type=int, help="MTP depth (0 to compare with HF, which has none)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--breakdown", action="store_true",
                    help="also time the forward loss and forward+backward alone (optimizer = step − fwd+bwd)")
    ap.add_argument("--profile", help="trace 3 steps into this directory and print device time per kernel")
    ap.add_argument("--memory-only", action="store_true",
                    help="compile the step and print XLA's memory analysis (arguments + temporaries); run nothing")
    ap.add_argument("--json")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args(argv)

    from dsv3_jax.training.step import init_state, train_step

    ov = list(a.overrides) + [f"train.global_batch_size={a.mb}", "train.micro_batch_size=null"]
    if a.layers:
        ov.append(f"model.num_hidden_layers={a.layers}")
    if a.seq:
        ov += [f"data.seq_len={a.seq}", f"model.max_position_embeddings={max(a.seq, 4096)}"]
    if a.mtp is not None:
        ov.append(f"model.num_nextn_predict_layers={a.mtp}")
    cfg = load_config(a.config, ov)
    m, seq = cfg.model, cfg.data.seq_len
    if jax.default_backend() == "cpu":  # smoke-test size
        m = dataclasses.replace(m, dtype="float32")
        cfg = dataclasses.replace(cfg, model=m)

    if a.memory_only:
        return _memory_only(cfg, a.mb, seq)
    t0 = time.perf_counter()
    state = init_state(cfg)
    tokens = np.random.default_rng(0).integers(0, m.vocab_size, (1, a.mb, seq + 1)).astype(np.int32)
    for _ in range(a.warmup):
        state, met = train_step(state, tokens, cfg)
        jax.block_until_ready(met["loss"])
    compile_s = time.perf_counter() - t0
    times, losses = [], []
    for _ in range(a.steps):
        t = time.perf_counter()
        state, met = train_step(state, tokens, cfg)
        losses.append(float(jax.block_until_ready(met["loss"])))
        times.append(time.perf_counter() - t)
    step_s = statistics.median(times)
    tps = a.mb * seq / step_s
    fpt = flops_per_token(m, seq)
    peak = peak_flops()
    mfu = tps * fpt / peak if peak else None
    print(f"FLOPS {flops_formula(m, seq)}; MFU against {'n/a' if peak is None else f'{peak / 1e12:.0f} TFLOP/s'}")
    if a.profile:
        from bench.profile_summary import summarise

        jax.profiler.start_trace(a.profile, create_perfetto_trace=True)
        for _ in range(3):
            state, met = train_step(state, tokens, cfg)
            jax.block_until_ready(met["loss"])
        jax.profiler.stop_trace()
        rows = summarise(a.profile, steps=3, top=80)
        print("PROFILE top kernels (ms/step, calls/step):")
        for n, ms, c in rows:
            print(f"PROFILE {ms:8.2f} {c:5d}  {n[:150]}")
    parts = {}
    if a.breakdown:
        from dsv3_jax.model import Transformer
        from dsv3_jax.training.loss import compute_losses

        def loss(p, r, t):
            out = Transformer(m).apply({"params": p, "router": r}, t[:, :-1])
            return compute_losses(out, t, 0.3, cfg.train.balance_alpha).total

        tok = jax.numpy.asarray(tokens[0])
        for name, fn in (("forward", jax.jit(loss)), ("forward+backward", jax.jit(jax.grad(loss)))):
            jax.block_until_ready(fn(state.params, state.router, tok))
            ts = []
            for _ in range(a.steps):
                t = time.perf_counter()
                jax.block_until_ready(fn(state.params, state.router, tok))
                ts.append(time.perf_counter() - t)
            parts[name + "_ms"] = statistics.median(ts) * 1e3
        parts["optimizer_and_rest_ms"] = step_s * 1e3 - parts["forward+backward_ms"]
        print("BREAKDOWN " + " ".join(f"{k}={v:.1f}" for k, v in parts.items()))
    is_fp8 = cfg.train.precision == "fp8"
    stats = jax.devices()[0].memory_stats() or {}
    mem = stats.get("peak_bytes_in_use", 0) / 2 ** 30
    res = dict(device=jax.devices()[0].device_kind, jax=jax.__version__, layers=m.num_hidden_layers,
               mtp=m.num_nextn_predict_layers, seq=seq, mb=a.mb, step_ms=step_s * 1e3, tokens_per_s=tps,
               tflops_per_s=tps * fpt / 1e12, mfu=mfu, peak_mem_gib=mem, compile_and_warmup_s=compile_s,
               loss_first=losses[0], loss_last=losses[-1], flops_per_token=fpt,
               active_params=m.param_counts()["active"], attention_impl=m.attention_impl, moe_impl=m.moe_impl,
               remat=m.remat, precision=cfg.train.precision, fp8_gemm=fp8.gemm_mode() if is_fp8 else None,
               **parts)
    print(f"RESULT ours layers={res['layers']} mtp={res['mtp']} seq={seq} mb={a.mb} "
          + (f"fp8 ({res['fp8_gemm']}) " if is_fp8 else "") + f"step {res['step_ms']:.0f} ms "
          f"tokens/s {tps:.0f} TFLOP/s {res['tflops_per_s']:.1f} MFU "
          f"{'n/a' if mfu is None else f'{100 * mfu:.1f}%'} peak mem {mem:.1f} GiB (compile+warmup {compile_s:.0f}s)")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    return 0


def _memory_only(cfg, mb: int, seq: int) -> int:
    """Lower + compile the train step on abstract inputs and print the compiled memory footprint."""
    from dsv3_jax.training import optim
    from dsv3_jax.training.step import _train_core, hyper_at, init_state, training_model_config

    t0 = time.perf_counter()
    state = jax.eval_shape(lambda: init_state(cfg))
    tokens = jax.ShapeDtypeStruct((1, mb, seq + 1), np.int32)
    compiled = _train_core.lower(
        state.params, state.router, state.opt_state, state.rng, tokens, hyper_at(cfg, 0, 0),
        model_cfg=training_model_config(cfg), opt=optim.OptimSettings.from_train(cfg.train),
        balance_alpha=cfg.train.balance_alpha).compile()
    ma = compiled.memory_analysis()
    gib = 2 ** 30
    args_b, temp_b = ma.argument_size_in_bytes, ma.temp_size_in_bytes
    print(f"MEMORY layers={cfg.model.num_hidden_layers} seq={seq} mb={mb} remat={cfg.model.remat}: arguments "
          f"{args_b / gib:.2f} GiB + temporaries {temp_b / gib:.2f} GiB = {(args_b + temp_b) / gib:.2f} GiB "
          f"(outputs {ma.output_size_in_bytes / gib:.2f}, aliased {ma.alias_size_in_bytes / gib:.2f}; "
          f"compile {time.perf_counter() - t0:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
