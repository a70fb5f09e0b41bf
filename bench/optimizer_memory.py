"""XLA's compiled memory analysis of the train step and of the optimizer update alone: the optax chain as the step
ran it before (``optim.reference_adamw``) vs the one-pass update it runs now (``optim.fused_adamw``).

    python bench/optimizer_memory.py [--config configs/tiny.yaml] [--layers N] [--seq 32] [--mb 1] [--micro 1]
                                     [--mtp D] [--only step|optimizer] [--json OUT.json] [key=value ...]

For each variant it compiles (never runs) ``_train_core`` on abstract inputs and prints arguments / outputs /
aliased / temporaries (``compiled.memory_analysis()``), the temporaries in units of the FP32 params' bytes, and
from the optimized HLO the number of values of a param leaf's full f32 shape that are real buffers (instructions
outside fused computations: fusions, copies, dynamic-update-slices ...). ``--only optimizer`` compiles the update
alone (grads, params and state as donated arguments): its temporaries are exactly the optimizer's extra trees.

On the GPU (the bench config, what ``bench/gpu_bf16.sh`` trains; carry .whl; ~4 compiles of the step):
    source bench/gpu_setup.sh && python3 bench/optimizer_memory.py --config configs/bench_1gpu.yaml --layers 13 \\
        --seq 4096 --mb 2 --mtp 0 --json $OUT/optimizer_memory.json model.remat=full train.moments_dtype=bfloat16

On the CPU the update's fusions stay separate (no multi-output fusion), so XLA copies the old moments/params
it aliases in place: part of the temporaries there is that, not the optimizer's trees.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax.config import load_config
from dsv3_jax.training import optim

VARIANTS = {"optax chain (before)": optim.reference_adamw, "fused (now)": optim.fused_adamw}

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.+?)\s+([\w\-]+)\(")
_SHAPE = re.compile(r"(\w+)\[([\d,]*)\]")
_BYTES = {"f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "s8": 1, "u8": 1, "pred": 1, "f8e4m3fn": 1}
_SKIP = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "call", "while", "conditional"}


def hlo_buffers(text: str, shapes: set[tuple[int, ...]]) -> dict:
    """Count, outside fused computations, the instructions whose result (or a tuple element of it) is an f32
    array of one of ``shapes``: each is a buffer XLA allocates (or aliases). Also the count and result bytes of
    copies / dynamic-update-slices / dynamic-slices anywhere (inside fusions too)."""
    full, ops = 0, {"copy": [0, 0], "dynamic-update-slice": [0, 0], "dynamic-slice": [0, 0]}
    fused = False
    by_op: dict[str, int] = {}
    for line in text.splitlines():
        s = line.strip()
        if s.endswith("{") and ("(" in s or s.startswith("ENTRY")):  # a computation header
            name = s.split()[1] if s.startswith("ENTRY") else s.split()[0]
            fused = "fused" in name or "fusion" in name
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        result, op = m.groups()
        arrays = [(dt, tuple(int(d) for d in dims.split(",") if d)) for dt, dims in _SHAPE.findall(result)]
        if op in ops:
            ops[op][0] += 1
            ops[op][1] += sum(int(np.prod(sh)) * _BYTES[dt] for dt, sh in arrays if dt in _BYTES)
        if fused or op in _SKIP:
            continue
        n = sum(1 for dt, sh in arrays if dt == "f32" and sh in shapes)
        if n:
            full += n
            by_op[op] = by_op.get(op, 0) + n
    return {"full_f32_buffers": full, "full_f32_by_op": by_op,
            **{f"{k}_count": v[0] for k, v in ops.items()}, **{f"{k}_bytes": v[1] for k, v in ops.items()}}


@contextlib.contextmanager
def update_fn(fn):
    """The step traced with ``fn`` as its optimizer update (caches cleared, so the step is traced again)."""
    saved = optim.fused_adamw
    optim.fused_adamw = fn
    jax.clear_caches()
    try:
        yield
    finally:
        optim.fused_adamw = saved
        jax.clear_caches()


def analyse(compiled, params) -> dict:
    ma = compiled.memory_analysis()
    p_bytes = sum(int(np.prod(p.shape)) * 4 for p in jax.tree.leaves(params))
    # big leaves only: small ones (norm scales, biases) share shapes with activations
    shapes = {tuple(p.shape) for p in jax.tree.leaves(params) if np.prod(p.shape) >= 4096}
    return {"argument_bytes": ma.argument_size_in_bytes, "output_bytes": ma.output_size_in_bytes,
            "alias_bytes": ma.alias_size_in_bytes, "temp_bytes": ma.temp_size_in_bytes,
            "params_f32_bytes": p_bytes, "temp_in_params": ma.temp_size_in_bytes / p_bytes,
            **hlo_buffers(compiled.as_text(), shapes)}


def compile_step(cfg, micro: int, mb: int, seq: int):
    from dsv3_jax.training.step import _train_core, hyper_at, init_state, training_model_config

    state = jax.eval_shape(lambda: init_state(cfg))
    tokens = jax.ShapeDtypeStruct((micro, mb, seq + 1), np.int32)
    compiled = _train_core.lower(
        state.params, state.router, state.opt_state, state.rng, tokens, hyper_at(cfg, 0, 0),
        model_cfg=training_model_config(cfg), opt=optim.OptimSettings.from_train(cfg.train),
        balance_alpha=cfg.train.balance_alpha).compile()
    return compiled, state.params


def compile_optimizer(cfg, fn, micro: int = 1):
    from dsv3_jax.training.step import init_state

    state = jax.eval_shape(lambda: init_state(cfg))
    s = optim.OptimSettings.from_train(cfg.train)
    # donated as the step donates them: state and params (the grads are the step's own temporaries)
    step = jax.jit(lambda g, o, p, lr: fn(g, o, p, lr, s, micro), donate_argnums=(1, 2))
    return step.lower(state.params, state.opt_state, state.params, jnp.float32(1e-3)).compile(), state.params


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/tiny.yaml")
    ap.add_argument("--layers", type=int)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--mb", type=int, default=1, help="sequences per micro-batch")
    ap.add_argument("--micro", type=int, default=1, help="micro-batches per step (gradient accumulation)")
    ap.add_argument("--mtp", type=int)
    ap.add_argument("--only", choices=("step", "optimizer"))
    ap.add_argument("--json")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args(argv)
    ov = list(a.overrides) + [f"data.seq_len={a.seq}"]
    if a.layers:
        ov.append(f"model.num_hidden_layers={a.layers}")
    if a.mtp is not None:
        ov.append(f"model.num_nextn_predict_layers={a.mtp}")
    cfg = load_config(a.config, ov)
    print(f"device {jax.devices()[0].device_kind}; {a.config} {' '.join(ov)}; micro {a.micro} × mb {a.mb}")
    res = {}
    for what in ("optimizer", "step"):
        if a.only and a.only != what:
            continue
        for name, fn in VARIANTS.items():
            t0 = time.perf_counter()
            with update_fn(fn):
                compiled, params = (compile_optimizer(cfg, fn, a.micro) if what == "optimizer"
                                    else compile_step(cfg, a.micro, a.mb, a.seq))
            r = analyse(compiled, params)
            res[f"{what}: {name}"] = r
            mib = 2 ** 20
            print(f"{what:9s} {name:22s} temp {r['temp_bytes'] / mib:9.2f} MiB = {r['temp_in_params']:.2f}× "
                  f"f32 params ({r['params_f32_bytes'] / mib:.2f} MiB); args {r['argument_bytes'] / mib:.2f} "
                  f"out {r['output_bytes'] / mib:.2f} aliased {r['alias_bytes'] / mib:.2f} MiB; "
                  f"full-size f32 buffers {r['full_f32_buffers']} {r['full_f32_by_op']}; "
                  f"copy {r['copy_count']} ({r['copy_bytes'] / mib:.1f} MiB) "
                  f"dus {r['dynamic-update-slice_count']} ds {r['dynamic-slice_count']} "
                  f"(compile {time.perf_counter() - t0:.0f}s)", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
