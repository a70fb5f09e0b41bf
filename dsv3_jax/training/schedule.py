"""The training schedule: what is in force at token T (REFERENCE §3, §5, §6, §9).

    python -m dsv3_jax.training.schedule --config configs/deepseek_v3_671b.yaml --tokens 0,300B,12T,14.75T [--json]

One object, :class:`Schedule`, answers for a config "which learning rate, batch size, MTP λ, bias update speed γ
and RoPE scaling does the step that starts after ``tokens`` tokens use". The training loop asks it every step,
this module's CLI prints it (so a recipe can be checked before money is spent on it) and ``dsv3_jax.plot``
draws it.

Everything is a plain Python function of (steps done, tokens seen), evaluated on the host with exact integers:
a 14.8T-token run overflows int32 and float32 cannot count it, and the compiled step never depends on it.

- **LR** (TR §4): linear warm-up over ``warmup_steps`` steps (the only phase counted in steps), ``lr`` until
  ``lr_constant_tokens``, cosine to ``lr_final`` over ``lr_decay_tokens`` (0 = never decay), ``lr_final`` for
  ``lr_final_tokens`` more tokens, then ``lr_tail`` (the report: 2.2e-5 for 333B tokens, then 7.3e-6).
- **Batch ramp** (TR §4: 3072 → 15360 sequences over 469B tokens): a step is ``n`` fixed-size micro-batches
  accumulated by a ``lax.scan`` inside the one jitted step; ``n`` grows linearly with tokens, in
  ``batch_ramp_levels`` equal token intervals. The scan length is a shape, so each distinct ``n`` compiles once
  (we chose this over one padded max-size buffer with a dynamic trip count: no wasted host→device transfer or
  memory for padding, at the price of a few compiles early in a run). Every batch is a whole number of
  micro-batches, so the micro-batch sets the ramp's granularity.
- **MTP λ** 0.3 → 0.1 after ``mtp_lambda_switch_tokens``; **γ** 0.001 → 0 after ``bias_update_freeze_tokens``.
- **RoPE scaling**: ``model.rope_scaling`` — constant within a run; pretraining (4K) has none, each context
  extension stage is its own config with YaRN s = 40 (REFERENCE §3).
- **Run length**: ``train.steps`` and/or ``train.tokens``; the run ends at whichever comes first.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys
from typing import Any

from dsv3_jax.config import Config, ConfigError, RopeScaling, load_config


@dataclasses.dataclass(frozen=True)
class InForce:
    """The schedule's values for one step: the step that starts after ``tokens`` tokens (step index ``step``)."""

    tokens: int
    step: int
    lr: float
    batch_size: int  # sequences in the step (micro_batches × micro-batch size)
    micro_batches: int
    mtp_lambda: float
    bias_update_speed: float
    rope_scaling: RopeScaling | None

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if self.rope_scaling is not None:
            d["rope_scaling"] = {"type": "yarn", **{k: v for k, v in d["rope_scaling"].items() if k != "type"}}
        return d


class Schedule:
    """Everything of a run that changes with steps or tokens (see the module docstring). Cheap to build."""

    def __init__(self, cfg: Config) -> None:
        self.train = t = cfg.train
        self.seq_len = cfg.data.seq_len
        self.rope_scaling = cfg.model.rope_scaling if cfg.model.uses_yarn else None
        mb = t.micro_batch_size or (t.batch_ramp_start if t.batch_ramp_start else t.global_batch_size)
        for name, value in (("global_batch_size", t.global_batch_size), ("batch_ramp_start", t.batch_ramp_start)):
            if value is not None and (value <= 0 or value % mb):
                raise ConfigError(f"train.{name}={value}: must be a positive multiple of the micro-batch size {mb} "
                                  f"(train.micro_batch_size={t.micro_batch_size})")
        if t.batch_ramp_start is not None and t.batch_ramp_start > t.global_batch_size:
            raise ConfigError(f"train.batch_ramp_start={t.batch_ramp_start} > train.global_batch_size="
                              f"{t.global_batch_size}: the ramp only grows the batch")
        if t.tokens <= 0 or (t.steps <= 0 and t.tokens == math.inf):
            raise ConfigError(f"train.steps={t.steps}, train.tokens={t.tokens}: set a run length — train.steps > 0 "
                              f"and/or a finite train.tokens > 0")
        self.micro_batch_size = mb
        self._ramp = t.batch_ramp_start is not None and t.batch_ramp_tokens > 0
        self._ramp_tokens = int(t.batch_ramp_tokens) if self._ramp else 0
        self._n_end = t.global_batch_size // mb
        self._n_start = t.batch_ramp_start // mb if self._ramp else self._n_end
        self._levels = max(1, min(t.batch_ramp_levels, self._n_end - self._n_start))

    # Values ---------------------------------------------------------------------------------------------
    def learning_rate(self, step: int, tokens: int) -> float:
        """LR for the update of step ``step`` (0-based, = steps already done) after ``tokens`` tokens.

        Warm-up: step s uses lr·(s+1)/warmup, so the first update is not wasted and step warmup-1 reaches lr.
        The phases after it are driven by tokens because the batch size ramps (REFERENCE §9).
        """
        t = self.train
        warm = min(1.0, (step + 1) / t.warmup_steps) if t.warmup_steps > 0 else 1.0
        decay_end = t.lr_constant_tokens + t.lr_decay_tokens
        if t.lr_decay_tokens <= 0 or tokens < t.lr_constant_tokens:
            base = t.lr
        elif tokens < decay_end:
            frac = (tokens - t.lr_constant_tokens) / t.lr_decay_tokens
            base = t.lr_final + 0.5 * (t.lr - t.lr_final) * (1.0 + math.cos(math.pi * frac))
        elif t.lr_tail is None or tokens < decay_end + t.lr_final_tokens:
            base = t.lr_final
        else:
            base = t.lr_tail
        return base * warm

    def mtp_lambda(self, tokens: int) -> float:
        """λ of the MTP loss: 0.3 for the first 10T tokens, 0.1 after (REFERENCE §6, §9)."""
        t = self.train
        return t.mtp_lambda if tokens < t.mtp_lambda_switch_tokens else t.mtp_lambda_late

    def bias_update_speed(self, tokens: int) -> float:
        """γ of the aux-loss-free bias update: 0.001, then 0 for the last 500B tokens (REFERENCE §5, §9)."""
        t = self.train
        return t.bias_update_speed if tokens < t.bias_update_freeze_tokens else 0.0

    def num_micro_batches(self, tokens: int) -> int:
        """Micro-batches in the step that starts after ``tokens`` tokens (the batch-size ramp).

        Level j (0..levels-1) holds for tokens in [j, j+1)·ramp/levels and uses the linear interpolation
        start → end at its left edge, in whole micro-batches; global_batch_size from the end of the ramp on.
        Integer arithmetic: the level boundaries are exact token counts.
        """
        if not self._ramp or tokens >= self._ramp_tokens:
            return self._n_end
        j = self._levels * int(tokens) // self._ramp_tokens
        return self._n_start + (j * (self._n_end - self._n_start)) // self._levels

    def batch_size(self, tokens: int) -> int:
        return self.num_micro_batches(tokens) * self.micro_batch_size

    def at(self, tokens: int, step: int | None = None) -> InForce:
        """What is in force for the step that starts after ``tokens`` tokens. ``step`` (its index, which only
        the LR warm-up reads) defaults to the step count of an uninterrupted run of this config at ``tokens``."""
        tokens = int(tokens)
        step = self.steps_to(tokens) if step is None else step
        n = self.num_micro_batches(tokens)
        return InForce(tokens, step, self.learning_rate(step, tokens), n * self.micro_batch_size, n,
                       self.mtp_lambda(tokens), self.bias_update_speed(tokens), self.rope_scaling)

    # Steps ↔ tokens -------------------------------------------------------------------------------------
    def _next_change(self, tokens: int) -> float:
        """First token count > ``tokens`` where the number of micro-batches may change (inf: never again)."""
        if not self._ramp or tokens >= self._ramp_tokens:
            return math.inf
        j = self._levels * tokens // self._ramp_tokens
        return -(-(j + 1) * self._ramp_tokens // self._levels)  # ceil: the first token of level j + 1

    def steps_to(self, tokens: int) -> int:
        """Steps an uninterrupted run takes before it has seen ≥ ``tokens`` tokens (exact, level by level)."""
        step, seen = 0, 0
        while seen < tokens:
            per_step = self.num_micro_batches(seen) * self.micro_batch_size * self.seq_len
            k = -(-(min(tokens, self._next_change(seen)) - seen) // per_step)  # ≥ 1 whole steps at this size
            step, seen = step + int(k), seen + int(k) * per_step
        return step

    @property
    def total_steps(self) -> int:
        """Steps of the whole run: ``train.steps`` or the steps to ``train.tokens``, whichever is fewer."""
        t = self.train
        by_tokens = self.steps_to(int(t.tokens)) if t.tokens < math.inf else None
        if t.steps <= 0:
            assert by_tokens is not None
            return by_tokens
        return t.steps if by_tokens is None else min(t.steps, by_tokens)

    def done(self, step: int, tokens: int) -> bool:
        """True when the run has reached its length (``train.steps`` steps or ``train.tokens`` tokens)."""
        t = self.train
        return (t.steps > 0 and step >= t.steps) or tokens >= t.tokens

    def milestones(self) -> list[int]:
        """Token counts where something changes: warm-up end, ramp levels' starts, LR phases, λ/γ switches, end."""
        t = self.train
        marks = {0}
        end = int(t.tokens) if t.tokens < math.inf else None
        if self._ramp:  # the first token of each level (exact: see num_micro_batches)
            marks.update(-(-j * self._ramp_tokens // self._levels) for j in range(self._levels + 1))
        if t.lr_decay_tokens > 0:
            d_end = t.lr_constant_tokens + t.lr_decay_tokens
            marks.update((t.lr_constant_tokens, t.lr_constant_tokens + t.lr_decay_tokens / 2, d_end))
            if t.lr_tail is not None:
                marks.add(d_end + t.lr_final_tokens)
        marks.update((t.mtp_lambda_switch_tokens, t.bias_update_freeze_tokens))
        out = sorted(int(m) for m in marks if 0 <= m < math.inf and (end is None or m <= end))
        return out + ([end] if end is not None and end not in out else [])


# ------------------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------------------

_SUFFIX = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}


def parse_tokens(text: str) -> int:
    """A token count: ``300B``, ``14.4T``, ``469e9``, ``1_000``, ``2.5M`` (K/M/B=G/T suffixes, decimal)."""
    m = re.fullmatch(r"\s*([0-9][0-9_]*(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?)\s*([kKmMbBgGtT]?)\s*", text)
    if m is None:
        raise ValueError(f"token count {text!r}: expected a number with an optional K/M/B/T suffix, e.g. 300B, "
                         f"14.4T, 469e9")
    from decimal import Decimal

    return int(Decimal(m.group(1).replace("_", "")) * _SUFFIX[m.group(2).upper()])


def format_tokens(n: int) -> str:
    for suffix, scale in (("T", 10**12), ("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= scale:
            return f"{n / scale:.6g}{suffix}"
    return str(n)


def _rope_text(rs: RopeScaling | None) -> str:
    if rs is None:
        return "none (plain RoPE)"
    from dsv3_jax.rope import yarn_mscale

    return (f"yarn s={rs.factor:g} ({rs.original_max_position_embeddings}→"
            f"{int(rs.original_max_position_embeddings * rs.factor)}, β {rs.beta_fast:g}/α {rs.beta_slow:g}, "
            f"mscale {yarn_mscale(rs.factor, rs.mscale_all_dim or 1.0):.4f})")


def format_table(rows: list[InForce]) -> str:
    head = f"{'tokens':>10} {'step':>9} {'lr':>10} {'batch':>6} {'×mb':>4} {'mtp_λ':>6} {'γ':>8}  rope_scaling"
    lines = [head]
    for r in rows:
        lines.append(f"{format_tokens(r.tokens):>10} {r.step:>9} {r.lr:>10.4g} {r.batch_size:>6} "
                     f"{r.micro_batches:>4} {r.mtp_lambda:>6.3g} {r.bias_update_speed:>8.3g}  "
                     f"{_rope_text(r.rope_scaling)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dsv3_jax.training.schedule",
                                description="Print what a config's schedule has in force at given token counts.")
    p.add_argument("--config", required=True, help="a YAML config, e.g. configs/deepseek_v3_671b.yaml")
    p.add_argument("--tokens", help="comma-separated token counts (300B, 14.4T, 469e9, ...); default: the "
                                    "schedule's milestones (every point where something changes)")
    p.add_argument("--json", action="store_true", help="one JSON object per line instead of a table")
    p.add_argument("overrides", nargs="*", help="dotted key=value config overrides, e.g. train.lr=1e-4")
    a = p.parse_args(argv)
    try:
        sched = Schedule(load_config(a.config, a.overrides))
        points = [parse_tokens(x) for x in a.tokens.split(",")] if a.tokens else sched.milestones()
    except (ConfigError, ValueError) as e:
        print(f"schedule: error: {e}", file=sys.stderr)
        return 2
    rows = [sched.at(x) for x in points]
    if a.json:
        for r in rows:
            print(json.dumps(r.to_json()))
    else:
        t = sched.train
        length = f"{sched.total_steps} steps" + (f" / {format_tokens(int(t.tokens))} tokens"
                                                 if t.tokens < math.inf else "")
        print(f"{a.config}: micro-batch {sched.micro_batch_size} × seq_len {sched.seq_len}; run {length}")
        print(format_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
