"""The recipe printer on the shipped 671B configs against the report (REFERENCE §3, §6, §9).

Every number comes from the printer's ``--json`` lines (what a user reads), checked against the report's values
and, for the cosine, against the closed form. No JAX: the schedule is host arithmetic.
"""

from __future__ import annotations

import json
import math
from itertools import pairwise
from pathlib import Path

import pytest

from dsv3_jax.config import load_config
from dsv3_jax.training.schedule import Schedule, main, parse_tokens

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PRETRAIN = str(CONFIGS / "deepseek_v3_671b.yaml")
B, T = 10**9, 10**12


def printed(capsys, config: str, tokens: str) -> dict[int, dict]:
    assert main(["--config", config, "--tokens", tokens, "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert all(set(r) >= {"tokens", "lr", "batch_size", "mtp_lambda", "bias_update_speed", "rope_scaling"}
               for r in rows)
    return {r["tokens"]: r for r in rows}


def test_parse_tokens():
    assert parse_tokens("300B") == 300 * B and parse_tokens("14.4T") == 14_400 * B  # exact, no float rounding
    assert parse_tokens("14.633T") == 14_633 * B and parse_tokens("469e9") == 469 * B
    assert parse_tokens("1_000") == 1000 and parse_tokens("2.5M") == 2_500_000 and parse_tokens("3k") == 3000
    for bad in ("", "12X", "T", "-5B", "1,5T"):
        with pytest.raises(ValueError, match="token count"):
            parse_tokens(bad)


def test_671b_learning_rate(capsys):
    r = printed(capsys, PRETRAIN, "0,100B,1T,5T,9.99T,10T,12T,14.3T,14.4T,14.632T,14.634T,14.75T,14.8T")
    assert r[0]["lr"] == pytest.approx(2.2e-4 / 2000)  # warm-up: step 0 of 2000 (REFERENCE §9)
    for x in (100 * B, 1 * T, 5 * T, 9_990 * B, 10 * T):  # the constant phase (100B is past the 2K warm-up steps)
        assert r[x]["lr"] == pytest.approx(2.2e-4, rel=1e-12), x
    # Cosine 2.2e-4 → 2.2e-5 over 4.3T tokens from 10T: at 12T, 2/4.3 of the way.
    lr12 = r[12 * T]["lr"]
    assert 2.2e-5 < lr12 < 2.2e-4
    assert lr12 == pytest.approx(2.2e-5 + 0.5 * (2.2e-4 - 2.2e-5) * (1 + math.cos(math.pi * 2 / 4.3)), rel=1e-12)
    # 2.2e-5 for 333B tokens after the cosine (14.3T → 14.633T), then 7.3e-6 for the last 167B.
    for x in (14_300 * B, 14_400 * B, 14_632 * B):
        assert r[x]["lr"] == pytest.approx(2.2e-5, rel=1e-12), x
    for x in (14_634 * B, 14_750 * B, 14_800 * B):
        assert r[x]["lr"] == pytest.approx(7.3e-6, rel=1e-12), x
    cfg = load_config(PRETRAIN)
    assert cfg.train.tokens == 14.8e12  # the run length is set, and it is where the 167B tail ends
    t = cfg.train
    assert t.lr_constant_tokens + t.lr_decay_tokens + t.lr_final_tokens + 167e9 == pytest.approx(t.tokens)


def test_671b_batch_ramp_is_gradual(capsys):
    r = printed(capsys, PRETRAIN, "0,300B,468.9B,469B,1T,14T")
    assert r[0]["batch_size"] == 3072
    assert 3072 < r[300 * B]["batch_size"] < 15360
    assert r[468_900 * 10**6]["batch_size"] < 15360  # still ramping just before 469B
    assert r[469 * B]["batch_size"] == r[T]["batch_size"] == r[14 * T]["batch_size"] == 15360
    # Gradual: every ramp level (a step of one micro-batch) lasts at most 30B tokens (was 117B), each level a
    # multiple of the 128 batch shards (data × expert), and the step count to 469B is exact.
    s = Schedule(load_config(PRETRAIN))
    starts = [m for m in s.milestones() if m <= 469 * B]
    sizes = [s.batch_size(m) for m in starts]
    assert sizes == sorted(set(sizes)) and sizes[0] == 3072 and sizes[-1] == 15360 and len(sizes) >= 16
    assert max(b - a for a, b in pairwise(starts)) <= 30 * B
    batch_shards = load_config(PRETRAIN).mesh.data * load_config(PRETRAIN).mesh.expert
    assert batch_shards == 128 and all(b % batch_shards == 0 for b in sizes)
    assert all(s.batch_size(a) == s.batch_size(b - 1) for a, b in pairwise(starts))  # flat inside a level
    assert s.micro_batch_size % (load_config(PRETRAIN).mesh.pipeline_microbatches * batch_shards) == 0


def test_671b_mtp_lambda_and_bias_update_speed(capsys):
    r = printed(capsys, PRETRAIN, "0,5T,9.999T,10T,12T,14.299T,14.3T,14.8T")
    for x in (0, 5 * T, 9_999 * B):
        assert r[x]["mtp_lambda"] == 0.3, x
    for x in (10 * T, 12 * T, 14_800 * B):
        assert r[x]["mtp_lambda"] == 0.1, x  # λ 0.1 after 10T (REFERENCE §6)
    for x in (0, 12 * T, 14_299 * B):
        assert r[x]["bias_update_speed"] == 0.001, x
    for x in (14_300 * B, 14_800 * B):
        assert r[x]["bias_update_speed"] == 0.0, x  # γ = 0 in the last 500B tokens of the 14.8T (REFERENCE §9)
    assert load_config(PRETRAIN).train.tokens - load_config(PRETRAIN).train.bias_update_freeze_tokens == 500e9


def test_rope_scaling_plain_at_4k_yarn_40_in_both_extensions(capsys):
    from dsv3_jax.rope import yarn_mscale

    assert all(row["rope_scaling"] is None for row in printed(capsys, PRETRAIN, "0,1T,14.8T").values())
    assert load_config(PRETRAIN).model.max_position_embeddings == 4096
    for stage in ("ext32k", "ext128k"):
        rows = printed(capsys, str(CONFIGS / f"deepseek_v3_671b_{stage}.yaml"), "0,1T")
        for row in rows.values():
            rs = row["rope_scaling"]
            assert (rs["type"], rs["factor"], rs["original_max_position_embeddings"]) == ("yarn", 40.0, 4096)
            assert (rs["beta_fast"], rs["beta_slow"]) == (32.0, 1.0)  # β = 32, α = 1 (REFERENCE §3)
            assert row["lr"] == pytest.approx(7.3e-6)
        assert yarn_mscale(40.0, 1.0) == pytest.approx(0.1 * math.log(40) + 1)  # √t = 0.1 ln s + 1
    main(["--config", str(CONFIGS / "deepseek_v3_671b_ext32k.yaml"), "--tokens", "0"])
    assert "yarn s=40" in capsys.readouterr().out
    main(["--config", PRETRAIN, "--tokens", "0"])
    assert "none (plain RoPE)" in capsys.readouterr().out


def test_printer_table_milestones_and_errors(capsys):
    assert main(["--config", PRETRAIN]) == 0  # no --tokens: every point where something changes
    out = capsys.readouterr().out
    assert "14.8T tokens" in out and "14.633T" in out and "469B" in out and "10T" in out
    assert main(["--config", PRETRAIN, "--tokens", "12Q"]) == 2
    assert "token count '12Q'" in capsys.readouterr().err
    assert main(["--config", PRETRAIN, "--tokens", "0", "train.steps=0", "train.tokens=.inf"]) == 2
    assert "set a run length" in capsys.readouterr().err


def test_plot_schedule(tmp_path):
    from dsv3_jax import plot

    written = plot.main(["--schedule", PRETRAIN, "--out", str(tmp_path)])
    assert [w.name for w in written] == ["schedule.png"] and written[0].stat().st_size > 10_000
    with pytest.raises(SystemExit):
        plot.main(["--schedule", str(tmp_path / "missing.yaml")])


def test_readme_printer_command(capsys):
    from tests.test_docs import readme_argv

    argv = readme_argv("python -m dsv3_jax.training.schedule")[3:]  # after "python -m dsv3_jax.training.schedule"
    assert "--json" in argv and main(argv) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["tokens"] for r in rows] == [0, 300 * B, 12 * T, 14_400 * B, 14_750 * B]
    assert rows[-1]["lr"] == pytest.approx(7.3e-6)
