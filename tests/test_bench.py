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


def test_flops_formula_matches_the_hf_peers_count():
    """Our FLOPs/token for the bench config equals what the HF peer script computed from the HF model's own
    parameter count on the H100 (bench/results/2026-11-25-h100-s3/train_hf_L13.log: active non-embedding
    1.010B, 6.88 GFLOP/token at 13 layers, seq 4096)."""
    from bench.train import flops_formula, flops_per_token
    from dsv3_jax.config import load_config

    m = load_config("configs/bench_1gpu.yaml", ["model.num_nextn_predict_layers=0"]).model
    assert m.num_hidden_layers == 13
    assert round(flops_per_token(m, 4096) / 1e9, 2) == 6.88
    assert "6·1.010e9" in flops_formula(m, 4096) and flops_formula(m, 4096).endswith("6.88 GFLOP")


def test_dsa_bench_reports_a_failed_cell_and_goes_on():
    """bench/dsa.py: a measurement that runs out of memory becomes an "OOM" cell of the markdown table (the long
    lengths must not end the run); the table's tokens/s are tokens over the measured time."""
    from bench import dsa

    def oom():
        raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 170.00GiB")

    assert dsa._guarded(oom, iters=1) == "OOM"
    assert dsa._guarded(lambda: 1 / 0, iters=1).startswith("error: ZeroDivisionError")
    row = {"T": 65536, "mla_fwd_ms": 100.0, "dsa_fwd_ms": "OOM", "indexer_fwd_ms": "OOM", "mla_fwd_bwd_ms": 400.0,
           "dsa_fwd_bwd_ms": "OOM", "mla_decode_ms": 2.0, "dsa_decode_ms": 4.0}
    line = dsa.markdown([row], "test", "auto").splitlines()[-1]
    assert line == ("| 65,536 | 655,360 (100.0 ms) | OOM | – | 163,840 (400.0 ms) | OOM | 500 (2.0 ms) | "
                    "250 (4.0 ms) |")
