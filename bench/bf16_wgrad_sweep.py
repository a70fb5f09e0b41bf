"""Sweep of the Hopper BF16 grouped GEMMs' tiling (dsv3_jax/kernels/bf16_gemm_mgpu.py) at the bench config's
routed-expert shapes, to pick defaults in one device call: the k-grouped Wgrad in every schedule (``gpi`` 0: each
CTA item one output tile over all tokens, the first kernel; ``gpi`` g ≥ 1: one output tile of g groups over only
their slabs), tile (columns per warpgroup ``n``, tokens per step ``k``) and pipeline depth ``s``, on balanced
routing (768 rows per expert, the bench table's) and on skewed routing (experts' loads drawn from a Dirichlet,
each padded to 128 rows: with ``live`` the Wgrad skips the padding's whole slabs); then forward and Dgrad at
64- and 128-deep K steps.

    python bench/bf16_wgrad_sweep.py [--json OUT.json] [--budget 210] [--only wgrad] [--quick] [--lower-only]

Shapes: C = 8192 tokens × 6 = 49,152 token copies over E = 64 experts inside the aligned layout's static bound of
P = 57,344 rows; gate/up [P, 2048]·[64, 2048, 1024] (Wgrad [P, 2048]ᵀ·[P, 1024] per expert), down
[P, 1024]·[64, 1024, 2048]. TFLOP/s count the C routed rows only (the bench table's convention); ``rel_err`` is
‖kernel − FP32 reference‖ / ‖reference‖ (a BF16 output: ~2e-3).

Robust and bounded: every variant runs in a worker process that appends its row to a JSON-lines file; a variant
that fails to compile gets an error row and the worker goes on; one that fails at run time (which can leave the
CUDA context unusable) or stalls past ``--stall`` seconds gets an error row and a fresh worker takes the next
variant. Variants not started within ``--budget`` seconds get a "skipped" row. On CPU it runs tiny shapes in
Mosaic GPU's interpreter (``--quick`` is implied: a smoke test of the script); ``--lower-only`` lowers every
variant at the bench shapes for CUDA instead (no GPU needed: Pallas → Mosaic GPU with its shared-memory check),
so variants that cannot compile are known before the device call.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# (op, shape name, routing, tile_n, tile_k, steps, groups_per_item, live): the order they run in (most wanted first)
Variant = tuple[str, str, str, int, int, int, int, bool]


def variants(only: set[str], quick: bool = False) -> list[Variant]:
    """The sweep's variants in run order; ``quick``: one of each kind (the CPU smoke test)."""
    if quick:
        vs = [("wgrad", "down", "balanced", 64, 64, 2, 0, False), ("wgrad", "down", "skewed", 64, 128, 2, 2, False),
              ("wgrad", "gate/up", "skewed", 128, 64, 2, 1, True), ("fwd", "down", "balanced", 128, 128, 2, 0, False),
              ("dgrad", "gate/up", "balanced", 64, 64, 2, 0, False)]
        return [v for v in vs if v[0] in only]
    out: list[Variant] = []
    for shape in ("gate/up", "down"):
        if "wgrad" in only:
            # the first schedule (today's default n256 = tile_n 128, and n128 = tile_n 64: 348 TFLOP/s on H200)
            out += [("wgrad", shape, "balanced", tn, 64, 3, 0, False) for tn in (128, 64)]
            for tn, tk, steps in ((128, 64, 3), (128, 64, 4), (128, 128, 2), (64, 64, 3), (64, 64, 4), (64, 128, 2),
                                  (64, 128, 3)):
                for gpi in (1, 2) if tn == 64 else (1, 2, 4):
                    out.append(("wgrad", shape, "balanced", tn, tk, steps, gpi, False))
    for shape in ("gate/up", "down"):
        if "wgrad" in only:
            out += [("wgrad", shape, "skewed", 64, 64, 3, 0, False)]
            out += [("wgrad", shape, "skewed", tn, tk, steps, 1, live)
                    for tn, tk, steps in ((128, 64, 4), (128, 128, 2), (64, 64, 4)) for live in (False, True)]
    for op in ("fwd", "dgrad"):
        if op in only:
            out += [(op, shape, "balanced", 128, tk, steps, 0, False)
                    for shape in ("gate/up", "down") for tk, steps in ((64, 3), (64, 4), (128, 2))]  # k128 s3: > SMEM
    return out


def _label(v: Variant) -> str:
    op, _, _, tn, tk, steps, gpi, live = v
    extra = "" if op != "wgrad" else (" all-tok" if gpi == 0 else f" gpi{gpi}") + (" live" if live else "")
    return f"n{2 * tn} k{tk} s{steps}{extra}"


def _worker(args) -> int:
    """Run variants[start:] in this process, one JSON line each; exit 3 after a run-time error (fresh context)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from bench.kernels import bench
    from dsv3_jax.kernels import bf16_gemm_mgpu as bg
    from dsv3_jax.kernels._backend import on_gpu

    interpret = not on_gpu()
    quick = (args.quick or interpret) and not args.lower_only
    vs = variants(set(args.only), quick)
    T, d, f, E, k = (8192, 2048, 1024, 64, 6) if not quick else (128, 128, 128, 4, 2)
    C = T * k
    P = -(-(C + 127 * E) // 128) * 128  # moe.aligned_layout's static bound
    iters = 1 if interpret else args.iters
    data: dict = {}

    def routing(name):
        """(padded sizes [E], live sizes [E], live-row mask [P]) for balanced or skewed loads summing to C."""
        if name == "balanced":
            live = np.full(E, C // E)
        else:  # loads ~ C · Dirichlet(2): a few experts at 2-3× the mean, a few nearly idle
            p = np.random.default_rng(0).dirichlet(np.full(E, 2.0))
            live = np.floor(p * C).astype(np.int64)
            live[np.argmax(live)] += C - live.sum()
        padded = -(-live // 128) * 128
        starts = np.cumsum(padded) - padded
        mask = np.zeros(P, bool)
        for s, n in zip(starts, live):
            mask[s:s + n] = True
        return jnp.asarray(padded, jnp.int32), jnp.asarray(live, jnp.int32), jnp.asarray(mask)

    def setup(shape, rname):
        if (shape, rname) in data:
            return data[(shape, rname)]
        data.clear()  # one shape's operands on the device at a time
        K, N = (d, f) if shape == "gate/up" else (f, d)
        sizes, live, mask = routing(rname)
        key = jax.random.split(jax.random.key(len(shape) + 7 * len(rname)), 3)
        x = jnp.where(mask[:, None], jax.random.normal(key[0], (P, K), jnp.bfloat16), 0)
        dy = jnp.where(mask[:, None], jax.random.normal(key[1], (P, N), jnp.bfloat16), 0)
        w = (jax.random.normal(key[2], (E, K, N), jnp.float32) * 0.02).astype(jnp.bfloat16)
        gs = jax.lax.RaggedDotDimensionNumbers(dot_dimension_numbers=(([0], [0]), ([], [])),
                                               lhs_ragged_dimensions=[0], rhs_group_dimensions=[])
        f32 = jnp.float32
        refs = {"wgrad": lambda: jax.jit(lambda a, b, s: jax.lax.ragged_dot_general(
                    a, b, s, gs, preferred_element_type=f32))(x, dy, sizes),
                "fwd": lambda: jax.jit(lambda a, b, s: jax.lax.ragged_dot(a, b, s, preferred_element_type=f32))(
                    x, w, sizes),
                "dgrad": lambda: jax.jit(lambda g, b, s: jax.lax.ragged_dot(
                    g, b.transpose(0, 2, 1), s, preferred_element_type=f32))(dy, w, sizes)}
        data[(shape, rname)] = (x, dy, w, sizes, live, refs, 2 * C * K * N, {})
        return data[(shape, rname)]

    def kernel(v: Variant):
        op, _, _, tn, tk, steps, gpi, use_live = v
        kw = {"tile_n": tn, "tile_k": tk, "max_concurrent_steps": steps,
              "interpret": interpret and not args.lower_only}
        if op == "wgrad":
            return lambda a, b, w, s, ls: bg.kgrouped_matmul(a, b, s, groups_per_item=gpi,
                                                             live_sizes=ls if use_live else None, **kw)
        if op == "fwd":
            return lambda a, b, w, s, ls: bg.grouped_matmul(a, w, s, **kw)
        return lambda a, b, w, s, ls: bg.grouped_matmul(b, w, s, transpose_b=True, **kw)

    def lower(v: Variant) -> dict:
        """Lower for CUDA without a GPU (Pallas → Mosaic GPU, shared-memory budget included): finds the variants
        that cannot compile before the device call."""
        bg._num_sms = lambda: 132  # H100 SXM's SMs (the grid size; no device to ask)
        K, N = (d, f) if v[1] == "gate/up" else (f, d)
        sds, bf16 = jax.ShapeDtypeStruct, jnp.bfloat16
        ops = (sds((P, K), bf16), sds((P, N), bf16), sds((E, K, N), bf16), sds((E,), jnp.int32),
               sds((E,), jnp.int32))
        row = {"op": v[0], "shape": v[1], "routing": v[2], "variant": _label(v)}
        try:
            jax.jit(kernel(v)).trace(*ops).lower(lowering_platforms=("cuda",))
        except Exception as e:  # noqa: BLE001 - a row per variant
            return {**row, "error": f"lower: {type(e).__name__}: {str(e)[:240]}"}
        return {**row, "lowered": True}

    def run(v: Variant) -> dict:
        if args.lower_only:
            return lower(v)
        op, shape, rname = v[:3]
        x, dy, w, sizes, live, refs, flops, ref_cache = setup(shape, rname)
        fn, ops = kernel(v), (x, dy, w, sizes, live)
        row = {"op": op, "shape": shape, "routing": rname, "variant": _label(v)}
        try:
            compiled = jax.jit(fn).lower(*ops).compile()
        except Exception as e:  # noqa: BLE001 - a variant that does not compile is a row, not the end
            return {**row, "error": f"compile: {type(e).__name__}: {str(e)[:240]}"}
        if op not in ref_cache:
            ref_cache[op] = refs[op]()
        ref = ref_cache[op]
        got = compiled(*ops).astype(jnp.float32)
        err = float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref))
        t = bench(compiled, *ops, iters=iters, batch=5)
        return {**row, "ms": t * 1e3, "tflops": flops / t / 1e12, "rel_err": err}

    with open(args.rows, "a") as out:
        if args.start == 0:
            out.write(json.dumps({"i": -1, "quick": quick}) + "\n")
        for i in range(args.start, len(vs)):
            print(f"[{i}] {vs[i][0]} {vs[i][1]} {vs[i][2]} {_label(vs[i])}", flush=True)
            try:
                row = run(vs[i])
            except Exception as e:  # noqa: BLE001 - a run-time failure may poison the context: new worker
                out.write(json.dumps({"i": i, "op": vs[i][0], "shape": vs[i][1], "routing": vs[i][2],
                                      "variant": _label(vs[i]), "error": f"run: {type(e).__name__}: {str(e)[:240]}"})
                          + "\n")
                out.flush()
                return 3
            out.write(json.dumps({"i": i, **row}) + "\n")
            out.flush()
    return 0


def suggestions(vs: list[Variant], table: list[dict]) -> list[str]:
    """Per op, the variant with the least total time over both shapes on balanced routing, as the environment
    setting that makes the training step use it (dsv3_jax.kernels.grouped_matmul.kernel_tiling)."""
    out = []
    for op in ("fwd", "dgrad", "wgrad"):
        total: dict[tuple, float] = {}
        count: dict[tuple, int] = {}
        for v, r in zip(vs, table):
            if v[0] == op and v[2] == "balanced" and not v[7] and "ms" in r:
                key = v[3:7]
                total[key] = total.get(key, 0.0) + r["ms"]
                count[key] = count.get(key, 0) + 1
        full = {k: t for k, t in total.items() if count[k] == 2}
        if full:
            tn, tk, steps, gpi = min(full, key=full.get)
            env = f"tile_n={tn},tile_k={tk},steps={steps}" + (f",gpi={gpi}" if op == "wgrad" else "")
            ms = full[(tn, tk, steps, gpi)]
            out.append(f"best {op} (both shapes, balanced): DSV3_BF16_{op.upper()}={env}  ({ms:.3f} ms)")
    return out


def _read(path: str) -> dict[int, dict]:
    rows = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            rows[r["i"]] = r
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--budget", type=float, default=210.0, help="start no variant after this many seconds")
    ap.add_argument("--stall", type=float, default=60.0, help="a variant running longer than this is killed")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--only", action="append", choices=["wgrad", "fwd", "dgrad"], help="ops (repeatable; all)")
    ap.add_argument("--quick", action="store_true", help="tiny shapes (implied on CPU)")
    ap.add_argument("--lower-only", action="store_true",
                    help="no GPU needed: lower every variant at the bench shapes for CUDA (finds those that cannot "
                         "compile, e.g. over the shared-memory budget)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--start", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--rows", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    a.only = a.only or ["wgrad", "fwd", "dgrad"]
    if a.worker:
        return _worker(a)

    t0 = time.monotonic()
    vs = variants(set(a.only), a.quick)  # the first worker says whether it runs quick (on CPU; the parent never
    # initialises jax: it would take the GPU's memory from the workers)
    with tempfile.TemporaryDirectory() as tmp:
        rows_path = os.path.join(tmp, "rows.jsonl")
        Path(rows_path).touch()
        start = 0
        while start < len(vs) and time.monotonic() - t0 < a.budget:
            cmd = [sys.executable, __file__, "--worker", "--start", str(start), "--rows", rows_path,
                   "--iters", str(a.iters), *(f"--only={o}" for o in a.only), *(["--quick"] if a.quick else []),
                   *(["--lower-only"] if a.lower_only else [])]
            proc = subprocess.Popen(cmd)
            last, last_t, why = len(_read(rows_path)), time.monotonic(), None
            while proc.poll() is None:
                time.sleep(0.5)
                n = len(_read(rows_path))
                if n != last:
                    last, last_t = n, time.monotonic()
                if time.monotonic() - t0 > a.budget:
                    why = "skipped (time budget; killed while running)"
                elif time.monotonic() - last_t > a.stall:
                    why = f"stalled (> {a.stall:.0f} s: killed)"
                if why:
                    proc.kill()
                    proc.wait()
                    break
            done = _read(rows_path)
            if done.get(-1, {}).get("quick"):
                vs = variants(set(a.only), True)
            nxt = max(done, default=-1) + 1
            if proc.returncode not in (0, 3) and nxt < len(vs):
                # killed or crashed inside variant nxt: record it, go on with the next one
                why = why or f"worker died (rc {proc.returncode})"
                with open(rows_path, "a") as f:
                    f.write(json.dumps({"i": nxt, "op": vs[nxt][0], "shape": vs[nxt][1], "routing": vs[nxt][2],
                                        "variant": _label(vs[nxt]), "error": why}) + "\n")
                nxt += 1
            start = nxt
        rows = _read(rows_path)
        rows.pop(-1, None)
    table = []
    for i, v in enumerate(vs):
        table.append(rows.get(i, {"op": v[0], "shape": v[1], "routing": v[2], "variant": _label(v),
                                  "error": "skipped (time budget)"}))
    print(f"\n{'op':6s} {'shape':8s} {'routing':9s} {'variant':24s} {'ms':>8s} {'TFLOP/s':>8s}  rel_err")
    best = {}
    for r in table:
        if "tflops" in r:
            k = (r["op"], r["shape"], r["routing"])
            best[k] = max(best.get(k, 0.0), r["tflops"])
    for r in table:
        if r.get("lowered"):
            print(f"{r['op']:6s} {r['shape']:8s} {r['routing']:9s} {r['variant']:24s} lowers for CUDA")
        elif "tflops" in r:
            mark = "  <- best" if r["tflops"] == best[(r["op"], r["shape"], r["routing"])] else ""
            print(f"{r['op']:6s} {r['shape']:8s} {r['routing']:9s} {r['variant']:24s} {r['ms']:8.3f} "
                  f"{r['tflops']:8.1f}  {r['rel_err']:.1e}{mark}")
        else:
            print(f"{r['op']:6s} {r['shape']:8s} {r['routing']:9s} {r['variant']:24s} {'-':>8s} {'-':>8s}  "
                  f"ERROR {r['error']}")
    for line in suggestions(vs, table):
        print(line)
    print(f"sweep: {len(rows)}/{len(vs)} variants in {time.monotonic() - t0:.0f} s")
    if a.json:
        Path(a.json).write_text(json.dumps({"rows": table}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
