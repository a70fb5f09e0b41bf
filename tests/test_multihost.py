"""Multi-process runs: the launch environment, each process's batch rows, and a real 2-process CPU training run
(Gloo collectives over localhost) against one process with the same global mesh."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from dsv3_jax.config import MeshConfig
from sharding.distributed import DistributedError, allgather_json, batch_shard, launch_kwargs, to_global
from sharding.mesh import make_mesh
from sharding.partition import microbatch_sharding
from tests.common import TINY_MODEL_OVERRIDES

ROOT = Path(__file__).resolve().parents[1]
JAX_ENV = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
SLURM_ENV = {"SLURM_JOB_ID": "77", "SLURM_STEP_NODELIST": "gpu[01-02]", "SLURM_NTASKS": "2", "SLURM_PROCID": "1",
             "SLURM_LOCALID": "0"}


def test_launch_environment():
    assert launch_kwargs({}) is None  # single process: nothing to do
    assert launch_kwargs(JAX_ENV) == {"coordinator_address": "10.0.0.1:1234", "num_processes": 2, "process_id": 1}
    assert launch_kwargs({**JAX_ENV, "JAX_NUM_PROCESSES": "1", "JAX_PROCESS_ID": "0"}) is None
    assert launch_kwargs({**JAX_ENV, "DSV3_DISTRIBUTED": "0"}) is None
    with pytest.raises(DistributedError, match="JAX_NUM_PROCESSES, JAX_PROCESS_ID missing"):
        launch_kwargs({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"})
    with pytest.raises(DistributedError, match="need 0 ≤ process id < processes"):
        launch_kwargs({**JAX_ENV, "JAX_PROCESS_ID": "2"})
    with pytest.raises(DistributedError, match="expected an integer"):
        launch_kwargs({**JAX_ENV, "JAX_NUM_PROCESSES": "two"})
    with pytest.raises(DistributedError, match="host:port"):
        launch_kwargs({**JAX_ENV, "JAX_COORDINATOR_ADDRESS": "10.0.0.1"})
    # SLURM: JAX detects the rest; one task per node gets all the node's GPUs, not JAX's default of one.
    assert launch_kwargs(SLURM_ENV) == {}
    one_per_node = {**SLURM_ENV, "SLURM_NTASKS_PER_NODE": "1", "SLURM_GPUS_ON_NODE": "8"}
    assert launch_kwargs(one_per_node) == {"local_device_ids": list(range(8))}
    assert launch_kwargs({**one_per_node, "JAX_LOCAL_DEVICE_IDS": "0,1"}) == {}
    assert launch_kwargs({**SLURM_ENV, "SLURM_NTASKS": "1"}) is None
    assert launch_kwargs({"OMPI_COMM_WORLD_SIZE": "4"}) == {}
    with pytest.raises(DistributedError, match="DSV3_DISTRIBUTED=1"):
        launch_kwargs({"DSV3_DISTRIBUTED": "1"})


def test_partial_environment_stops_train_py(monkeypatch, capsys):
    import train as train_py

    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1")
    for v in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(v, raising=False)
    assert train_py.main(["--data-module", "tests.synthetic_data", "train.steps=1"]) == 2
    assert "JAX_NUM_PROCESSES, JAX_PROCESS_ID missing" in capsys.readouterr().err


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")
def test_one_process_holds_the_whole_batch():
    mesh = make_mesh(MeshConfig(data=2, expert=2, pipeline=2))
    assert batch_shard(mesh) == (0, 1)
    x = np.arange(2 * 8 * 3, dtype=np.int32).reshape(2, 8, 3)
    g = to_global(x, microbatch_sharding(mesh), batch_dim=1)
    assert g.shape == x.shape and g.sharding == microbatch_sharding(mesh)
    np.testing.assert_array_equal(np.asarray(g), x)
    assert allgather_json({"index": 3}) == [{"index": 3}]


# ------------------------------------------------------------------------------------------------------------
# A real 2-process run (train.py × 2 over localhost) against 1 process with the same 4-device mesh
# ------------------------------------------------------------------------------------------------------------

TINY = [
    *TINY_MODEL_OVERRIDES, "train.global_batch_size=4",
    "train.lr=1e-2", "train.warmup_steps=2", "train.log_every=1", "train.eval_every=0",
    "train.checkpoint_every=100", "mesh.data=2", "mesh.expert=2", "mesh.node_limited_routing=true",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_py(run_dir: Path, steps: int, processes: int, *extra: str, timeout: float = 400) -> list[str]:
    """train.py on ``processes`` local processes sharing 4 CPU devices; returns each process's stderr."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "SLURM_", "OMPI_"))}
    base.update(PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu",
                XLA_FLAGS=f"--xla_force_host_platform_device_count={4 // processes}")
    if processes > 1:
        base.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{_free_port()}", JAX_NUM_PROCESSES=str(processes))
    args = [sys.executable, str(ROOT / "train.py"), "--data-module", "tests.global_synthetic_data", *TINY,
            f"run_dir={run_dir}", f"train.steps={steps}", *extra]
    ids = [{"JAX_PROCESS_ID": str(i)} for i in range(processes)] if processes > 1 else [{}]
    procs = [subprocess.Popen(args, env={**base, **ids[i]}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for i in range(processes)]
    try:
        errs = [p.communicate(timeout=timeout)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, err in zip(procs, errs, strict=True):
        assert p.returncode == 0, err
    return errs


def _losses(run_dir: Path) -> list[tuple[int, float, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["grad_norm"]) for r in rows]


@pytest.mark.slow
def test_two_processes_match_one_and_resume(tmp_path):
    two, one = tmp_path / "two", tmp_path / "one"
    errs = _train_py(two, steps=3, processes=2)
    assert "process 1/2: 2 local devices" in errs[1] and "4 global devices" in errs[1]
    assert "step 3/3" in errs[0] and "step 3/3" not in errs[1]  # only process 0 reports progress
    # The expert axis (2 shards) lies inside each process here: one node, derived from the devices' processes.
    assert "4 router groups on 1 node(s) of 2 expert shard(s)" in errs[0]
    # One checkpoint, written once, holding both processes' data positions.
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["3"]
    meta = json.loads((two / "checkpoints" / "3" / "meta" / "metadata").read_text())
    assert meta["data_by_process"] == [{"index": 3}, {"index": 3}]
    # Resume on 2 processes to step 5; the whole run equals 1 process × 4 devices (same mesh) bit for bit.
    errs = _train_py(two, steps=5, processes=2)
    assert "resumed from" in errs[0] and "(192 tokens)" in errs[0]
    _train_py(one, steps=5, processes=1)
    # Not bit for bit: the data-axis gradient all-reduce crosses processes through Gloo, which sums the two
    # processes' partials in its own order, while one process sums them inside XLA (seen: losses equal to 1 float32
    # ulp at step 5). Reassociating a 2-term float32 sum moves it by ≤ 1 ulp per reduction; 5 Adam steps carry that
    # as relative noise of the same size, far inside rtol 1e-5. A wrong batch, a lost data position or a missed
    # resume moves the tiny model's loss by > 1e-3.
    (s2, l2, g2), (s1, l1, g1) = (list(zip(*_losses(r))) for r in (two, one))
    assert s2 == s1 == (1, 2, 3, 4, 5)
    np.testing.assert_allclose(l2, l1, rtol=1e-5)
    np.testing.assert_allclose(g2, g1, rtol=1e-5)


@pytest.mark.slow
def test_pipeline_stages_on_two_processes_match_one(tmp_path):
    """Stage 0 on process 0, stage 1 on process 1: both hold every batch row, so both read the same data."""
    mesh = ("mesh.data=1", "mesh.pipeline=2", "mesh.expert=2", "model.num_hidden_layers=3")
    _train_py(tmp_path / "two", 3, 2, *mesh)
    _train_py(tmp_path / "one", 3, 1, *mesh)
    assert _losses(tmp_path / "two") == _losses(tmp_path / "one")
    # The metrics every process reads (expert_load is sharded over the stages inside the step) match too.
    assert (tmp_path / "two" / "expert_load.jsonl").read_text() == (tmp_path / "one" / "expert_load.jsonl").read_text()
