"""Plots of a training run, or of a config's schedule before the run.

    python -m dsv3_jax.plot RUN_DIR [--out DIR]
    python -m dsv3_jax.plot --schedule CONFIG [--out DIR]

A run: reads ``RUN_DIR/metrics.jsonl`` and ``expert_load.jsonl`` (written by the train loop) and writes
loss.png (loss, CE, MTP, eval), lr.png, throughput.png (tokens/s, MFU) and expert_load.png (per-expert load
relative to the mean at the last logged step, layers × experts, and MaxVio per layer over training).
A schedule: schedule.png — LR, batch size, MTP λ and γ against tokens (``dsv3_jax.training.schedule``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from dsv3_jax.config import ConfigError


def _read(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    by_step: dict[int, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            by_step[rec["step"]] = rec  # last record wins if a step was logged twice
    return [by_step[s] for s in sorted(by_step)]


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in records if r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write the PNGs; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir else run_dir
    out.mkdir(parents=True, exist_ok=True)
    recs = _read(run_dir / "metrics.jsonl")
    if not recs:
        raise FileNotFoundError(f"{run_dir / 'metrics.jsonl'} is missing or empty: is {run_dir} a run dir?")
    written = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(out / name)

    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("loss", "total loss"), ("loss_avg", "total loss, mean since last record"),
                       ("ce", "next-token CE"), ("mtp_loss", "MTP CE (mean over depths)"), ("eval_loss", "eval CE")):
        x, y = _series(recs, key)
        if x:
            ax.plot(x, y, label=label, marker="o" if key == "eval_loss" else None, ms=3)
    ax.set(xlabel="step", ylabel="loss", title="loss")
    ax.legend()
    ax.grid(alpha=0.3)
    save(fig, "loss.png")

    fig, ax = plt.subplots(figsize=(7, 3))
    ax.plot(*_series(recs, "lr"))
    ax.set(xlabel="step", ylabel="learning rate", title="learning rate")
    ax.grid(alpha=0.3)
    save(fig, "lr.png")

    fig, ax = plt.subplots(figsize=(7, 3))
    ax.plot(*_series(recs, "tokens_per_s"), label="tokens/s")
    ax.set(xlabel="step", ylabel="tokens/s", title="throughput")
    x, y = _series(recs, "mfu")
    if x:
        ax2 = ax.twinx()
        ax2.plot(x, [100 * v for v in y], color="tab:orange", label="MFU %")
        ax2.set_ylabel("MFU %")
    ax.grid(alpha=0.3)
    save(fig, "throughput.png")

    loads = _read(run_dir / "expert_load.jsonl")
    x, vio = _series(recs, "maxvio")
    if loads or x:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        if loads and loads[-1]["load"]:
            im = axes[0].imshow(loads[-1]["load"], aspect="auto", cmap="viridis", interpolation="nearest")
            axes[0].set(xlabel="expert", ylabel="MoE layer", title=f"load / mean load, step {loads[-1]['step']}",
                        yticks=range(len(loads[-1]["load"])))
            fig.colorbar(im, ax=axes[0])
        if x and vio[0]:
            for layer in range(len(vio[0])):
                axes[1].plot(x, [v[layer] for v in vio], label=f"MoE layer {layer}")
            axes[1].set(xlabel="step", ylabel="MaxVio", title="MaxVio = max load / mean − 1")
            if len(vio[0]) <= 10:
                axes[1].legend(fontsize=7)
            axes[1].grid(alpha=0.3)
        save(fig, "expert_load.png")
    return written


def plot_schedule(config: str | Path, out_dir: str | Path = ".", points: int = 2000) -> Path:
    """schedule.png: LR, batch size, MTP λ and bias update speed γ over the run's tokens. Returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dsv3_jax.config import load_config
    from dsv3_jax.training.schedule import Schedule

    sched = Schedule(load_config(config))
    t = sched.train
    end = int(t.tokens) if t.tokens < float("inf") else sched.total_steps * sched.batch_size(0) * sched.seq_len
    xs = sorted({end * i // points for i in range(points + 1)} | set(sched.milestones()) |
                {max(m - 1, 0) for m in sched.milestones()})  # both sides of every step of the schedule
    rows = [sched.at(x) for x in xs]
    rope = rows[0].rope_scaling
    fig, axes = plt.subplots(4, 1, figsize=(8, 9), sharex=True)
    for ax, key, label in zip(axes, ("lr", "batch_size", "mtp_lambda", "bias_update_speed"),
                              ("learning rate", "batch (sequences)", "MTP λ", "bias update speed γ")):
        ax.plot([x / 1e12 for x in xs], [getattr(r, key) for r in rows], drawstyle="steps-post")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("tokens (T)")
    axes[0].set_title(f"{Path(config).name}: RoPE scaling "
                      f"{'none' if rope is None else f'YaRN s={rope.factor:g}'}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out / "schedule.png", dpi=110)
    plt.close(fig)
    return out / "schedule.png"


def main(argv: list[str] | None = None) -> list[Path]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", nargs="?", help="a training run dir (with metrics.jsonl)")
    p.add_argument("--schedule", metavar="CONFIG", help="plot this config's schedule instead of a run")
    p.add_argument("--out", help="where to write the PNGs (default: the run dir; for --schedule the current dir)")
    args = p.parse_args(argv)
    if (args.run_dir is None) == (args.schedule is None):
        p.error("give a RUN_DIR or --schedule CONFIG (one of them)")
    try:
        if args.schedule:
            written = [plot_schedule(args.schedule, args.out or ".")]
        else:
            written = plot_run(args.run_dir, args.out)
    except (FileNotFoundError, ConfigError) as e:
        print(f"plot: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    for w in written:
        print(w)
    return written


if __name__ == "__main__":
    main()
