"""The benchmark scripts run (CPU, tiny config): a sweep whose points keep the tokens per step, and a failing
point reported instead of ending the sweep."""

from __future__ import annotations

import json

from bench import scaling


def test_scaling_sweep_keeps_tokens_per_step_and_reports_failures(tmp_path, capsys):
    out = tmp_path / "scaling.json"
    scaling.main(["--config", "configs/tiny.yaml", "--layers", "2", "--tokens", "128", "--seqs", "32,64",
                  "--experts", "16,7", "--expert-seq", "32", "--steps", "1", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["sweep"] for r in rows] == ["seq", "seq", "experts", "experts"]
    ok = rows[:3]
    assert all(r["seq"] * r["sequences"] == 128 and r["tokens_per_s"] > 0 and r["layers"] == 2 for r in ok)
    assert [r["seq"] for r in ok] == [32, 64, 32] and ok[2]["experts"] == 16
    assert ok[1]["gflop_per_token"] > ok[0]["gflop_per_token"]  # attention FLOPs grow with the sequence
    assert "error" in rows[3]  # 7 experts do not split into the config's groups: reported, sweep finished
    assert "failed" in capsys.readouterr().out
