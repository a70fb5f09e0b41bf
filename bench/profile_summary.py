"""Summarise a jax.profiler Perfetto trace: device time per kernel (op-by-op breakdown of a step).

    python bench/profile_summary.py TRACE_DIR [--steps N] [--top 30]
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import sys
from pathlib import Path


def summarise(trace_dir: str, steps: int = 1, top: int = 30) -> list[tuple[str, float, int]]:
    files = sorted(Path(trace_dir).rglob("*.trace.json.gz")) + sorted(Path(trace_dir).rglob("perfetto_trace.json.gz"))
    if not files:
        raise FileNotFoundError(f"no *.trace.json.gz under {trace_dir}")
    with gzip.open(files[-1], "rt") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    pids = {e["pid"]: e["args"].get("name", "") for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    gpu = {p for p, n in pids.items() if "/device:GPU" in n or "GPU" in n}
    total = collections.Counter()
    count = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e.get("pid") in gpu and "dur" in e:
            total[e["name"]] += e["dur"] / 1e3 / steps
            count[e["name"]] += 1
    return [(n, ms, count[n] // steps) for n, ms in total.most_common(top)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("trace_dir")
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--top", type=int, default=30)
    a = ap.parse_args(argv)
    rows = summarise(a.trace_dir, a.steps, a.top)
    all_ms = sum(ms for _, ms, _ in rows)
    print(f"{'kernel':90s} {'ms/step':>9s} {'calls':>6s}")
    for n, ms, c in rows:
        print(f"{n[:90]:90s} {ms:9.2f} {c:6d}")
    print(f"(top {len(rows)} kernels: {all_ms:.1f} ms/step)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
