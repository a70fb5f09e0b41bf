"""Multi-process (multi-host) runs: start-up, and each process's share of the global batch.

One process per host drives all of that host's accelerators; together they see one global device list and one
mesh. :func:`initialize` joins them (``jax.distributed.initialize``) when the environment says the run is
multi-process:

- ``JAX_COORDINATOR_ADDRESS`` (host:port of process 0), ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``: all three or
  none (a partial set is an error naming the missing ones);
- otherwise SLURM (``srun``; ``SLURM_NTASKS`` > 1) or Open MPI (``OMPI_COMM_WORLD_SIZE`` > 1): JAX's own cluster
  detection fills in everything. With one task per node, all of the node's GPUs are used
  (``SLURM_GPUS_ON_NODE``; JAX alone would give each task one GPU);
- ``DSV3_DISTRIBUTED=0`` forces a single process (e.g. inside an ``sbatch`` script without ``srun``).

Single-process runs (none of the above) do nothing. On CPU the cross-process collectives use Gloo.

A process feeds only the rows of the global batch its devices hold (:func:`batch_shard`, :func:`to_global`);
processes whose devices hold the same rows (a pipeline or tensor axis across hosts) read the same data.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import os
import sys
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from dsv3_jax.config import ConfigError

ENV_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")


class DistributedError(ConfigError):
    """The environment asks for a multi-process run in a way that cannot work (exit 2 in train.py)."""


def launch_kwargs(env: dict[str, str] | None = None) -> dict[str, Any] | None:
    """The ``jax.distributed.initialize`` arguments the environment asks for; None = single process."""
    env = os.environ if env is None else env
    mode = env.get("DSV3_DISTRIBUTED", "auto").lower()
    if mode in ("0", "false", "off"):
        return None
    given = [v for v in ENV_VARS if env.get(v)]
    if given:
        if len(given) < len(ENV_VARS):
            missing = [v for v in ENV_VARS if v not in given]
            raise DistributedError(f"multi-process launch: {', '.join(given)} set but {', '.join(missing)} missing; "
                                   f"set all of {', '.join(ENV_VARS)} (or none for a single process)")
        n, pid = (_int_env_from(env, v) for v in ENV_VARS[1:])
        if n < 1 or not 0 <= pid < n:
            raise DistributedError(f"JAX_PROCESS_ID={pid}, JAX_NUM_PROCESSES={n}: need 0 ≤ process id < processes")
        if ":" not in env["JAX_COORDINATOR_ADDRESS"]:
            raise DistributedError(f"JAX_COORDINATOR_ADDRESS={env['JAX_COORDINATOR_ADDRESS']!r}: expected host:port "
                                   f"of process 0")
        if n == 1:
            return None
        return {"coordinator_address": env["JAX_COORDINATOR_ADDRESS"], "num_processes": n, "process_id": pid}
    if all(v in env for v in _SLURM_VARS) and int(env["SLURM_NTASKS"]) > 1:
        kwargs: dict[str, Any] = {}
        one_per_node = env.get("SLURM_NTASKS_PER_NODE") == "1" or (
            env.get("SLURM_TASKS_PER_NODE", "").split("(")[0] == "1")
        if one_per_node and not env.get("JAX_LOCAL_DEVICE_IDS") and env.get("SLURM_GPUS_ON_NODE", "").isdigit():
            kwargs["local_device_ids"] = list(range(int(env["SLURM_GPUS_ON_NODE"])))
        return kwargs  # JAX's SLURM detection: coordinator = first node of the step, port from the job id
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
        return {}
    if mode in ("1", "true", "on"):
        raise DistributedError(f"DSV3_DISTRIBUTED={mode} but neither {', '.join(ENV_VARS)} nor a SLURM/Open MPI "
                               f"multi-task environment is set")
    return None


def _int_env_from(env: dict[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise DistributedError(f"{name}={env[name]!r}: expected an integer") from None


def initialize(log=None) -> bool:
    """Join the multi-process run the environment describes (see the module doc); True if multi-process.

    Call before any other JAX work. Logs process index/count and local/global devices on every process.
    """
    kwargs = launch_kwargs()
    if kwargs is None:
        return False
    if not jax.distributed.is_initialized():
        if jax.config.jax_cpu_collectives_implementation in (None, "none"):
            # Cross-process collectives for CPU devices (tests, CPU clusters); GPU/TPU backends ignore it.
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(**kwargs)
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    local = jax.local_devices()
    log(f"process {jax.process_index()}/{jax.process_count()}: {len(local)} local devices "
        f"({local[0].platform}: {', '.join(str(d.id) for d in local)}), {jax.device_count()} global devices")
    return True


def is_main_process() -> bool:
    """Process 0: the one that writes logs, metrics and TensorBoard events."""
    return jax.process_index() == 0


# ----------------------------------------------------------------------------------------------------------
# The global batch, one process's rows at a time
# ----------------------------------------------------------------------------------------------------------


@functools.cache
def batch_shard(mesh: Mesh) -> tuple[int, int]:
    """``(index, count)``: this process holds rows ``[index·B/count, (index+1)·B/count)`` of any batch of B rows
    split over the batch axes of ``mesh``. (0, 1) on one process. Raises if its rows are not one block."""
    from sharding.partition import batch_sharding

    blocks = math.prod(mesh.shape[a] for a in batch_sharding(mesh).spec[0])
    spans = sorted({(s[0].start or 0, blocks if s[0].stop is None else s[0].stop)
                    for s in batch_sharding(mesh).addressable_devices_indices_map((blocks, 1)).values()})
    lo, hi = spans[0][0], spans[-1][1]
    if any(a != b for (_, b), (a, _) in itertools.pairwise(spans)) or blocks % (hi - lo) or lo % (hi - lo):
        raise ConfigError(f"process {jax.process_index()}'s devices hold batch blocks {spans} of {blocks}, not one "
                          f"aligned block: order the mesh so each host's devices are adjacent on the batch axes")
    return lo // (hi - lo), blocks // (hi - lo)


def to_global(local: np.ndarray, sharding: NamedSharding, batch_dim: int = 0) -> jax.Array:
    """This process's rows (its :func:`batch_shard` of dim ``batch_dim``) → the global array on ``sharding``."""
    if jax.process_count() == 1:
        return jax.device_put(local, sharding)
    _, count = batch_shard(sharding.mesh)
    shape = list(local.shape)
    shape[batch_dim] *= count
    return jax.make_array_from_process_local_data(sharding, np.asarray(local), tuple(shape))


def allgather_json(obj: Any) -> list[Any]:
    """Every process's ``obj`` (JSON-serialisable), in process order; all processes must call it."""
    if jax.process_count() == 1:
        return [obj]
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.array([data.size], np.int32))).reshape(-1)
    buf = np.zeros(int(sizes.max()), np.uint8)
    buf[: data.size] = data
    rows = np.asarray(multihost_utils.process_allgather(buf)).reshape(len(sizes), -1)
    return [json.loads(bytes(rows[i, : sizes[i]]).decode()) for i in range(len(sizes))]


def any_process(flag: bool) -> bool:
    """True if ``flag`` is True on any process (all processes must call it)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.asarray(multihost_utils.process_allgather(np.array([int(flag)], np.int32))).any())
