"""FP8 vs BF16 loss gap: two runs of train.py from the same init and data, differing only in train.precision.

    python train.py --config C ... train.precision=bf16 run_dir=runs/gap_bf16
    python train.py --config C ... train.precision=fp8  run_dir=runs/gap_fp8
    python bench/fp8_gap.py runs/gap_bf16 runs/gap_fp8 [--png fp8_gap.png] [--json gap.json]

Prints, over the steps both runs logged: the relative gap of the training loss averaged over the last quarter
of those steps ((fp8 − bf16) / bf16; the report's bar is < 0.25%), the gap at each common eval, and the
tokens/s of each run. ``--png`` plots both loss curves.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def read(run: str) -> list[dict]:
    path = Path(run) / "metrics.jsonl"
    if not path.exists():
        raise SystemExit(f"{path} does not exist: run train.py with run_dir={run} first")
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def gap(bf16: list[dict], fp8: list[dict]) -> dict:
    a = {r["step"]: r for r in bf16}
    b = {r["step"]: r for r in fp8}
    steps = sorted(set(a) & set(b))
    if not steps:
        raise SystemExit("the two runs have no logged step in common")
    tail = steps[-max(1, len(steps) // 4):]
    la = sum(a[s]["loss_avg"] for s in tail) / len(tail)
    lb = sum(b[s]["loss_avg"] for s in tail) / len(tail)
    evals = [(s, a[s]["eval_loss"], b[s]["eval_loss"]) for s in steps
             if "eval_loss" in a[s] and "eval_loss" in b[s]]

    def speed(rows: list[dict]) -> float:
        v = [r["tokens_per_s"] for r in rows[1:] if r.get("tokens_per_s")]  # the first interval holds compile
        return sorted(v)[len(v) // 2] if v else float("nan")

    return {"common_steps": steps[-1], "tail_steps": [tail[0], tail[-1]], "bf16_loss": la, "fp8_loss": lb,
            "rel_gap": (lb - la) / la, "evals": [{"step": s, "bf16": x, "fp8": y, "rel_gap": (y - x) / x}
                                                 for s, x, y in evals],
            "bf16_tokens_per_s": speed(bf16), "fp8_tokens_per_s": speed(fp8)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bf16_run")
    ap.add_argument("fp8_run")
    ap.add_argument("--png")
    ap.add_argument("--json")
    a = ap.parse_args()
    bf16, fp8 = read(a.bf16_run), read(a.fp8_run)
    g = gap(bf16, fp8)
    print(f"steps compared: 1..{g['common_steps']} (loss averaged over steps {g['tail_steps'][0]}.."
          f"{g['tail_steps'][1]})")
    print(f"| | BF16 | FP8 | relative gap |\n|---|---|---|---|\n| train loss | {g['bf16_loss']:.4f} | "
          f"{g['fp8_loss']:.4f} | {100 * g['rel_gap']:+.3f}% |")
    for e in g["evals"]:
        print(f"| eval loss, step {e['step']} | {e['bf16']:.4f} | {e['fp8']:.4f} | {100 * e['rel_gap']:+.3f}% |")
    print(f"| tokens/s (median interval) | {g['bf16_tokens_per_s']:.0f} | {g['fp8_tokens_per_s']:.0f} | |")
    if a.json:
        Path(a.json).write_text(json.dumps(g, indent=1))
    if a.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        for rows, name in ((bf16, "BF16"), (fp8, "FP8 (1×128 / 128×128 tiles)")):
            ax.plot([r["step"] for r in rows], [r["loss_avg"] for r in rows], label=name)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.set_title(f"FP8 vs BF16, same init and data: gap {100 * g['rel_gap']:+.3f}%")
        ax.legend()
        fig.tight_layout()
        fig.savefig(a.png, dpi=120)
        print(f"wrote {a.png}")


if __name__ == "__main__":
    main()
