"""Build a device mesh from ``MeshConfig`` (axis sizes; ``data: -1`` takes the remaining devices)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from dsv3_jax.config import ConfigError, MeshConfig

AXES = ("pipeline", "data", "fsdp", "expert", "tensor")  # outermost → innermost (expert/tensor on NVLink)


def mesh_shape(cfg: MeshConfig, num_devices: int) -> dict[str, int]:
    """Resolve axis sizes; the product must equal ``num_devices`` (error names the sizes otherwise)."""
    sizes = {a: getattr(cfg, a) for a in AXES}
    for a, n in sizes.items():
        if n == 0 or n < -1:
            raise ConfigError(f"mesh.{a}={n}: must be ≥ 1 (or -1 for mesh.data)")
    free = [a for a, n in sizes.items() if n == -1]
    if len(free) > 1:
        raise ConfigError(f"only one mesh axis may be -1, got {free}")
    fixed = math.prod(n for n in sizes.values() if n != -1)
    if free:
        if num_devices % fixed:
            raise ConfigError(f"mesh {sizes}: fixed axes multiply to {fixed}, which does not divide the "
                              f"{num_devices} devices")
        sizes[free[0]] = num_devices // fixed
    if num_devices % math.prod(sizes.values()):
        raise ConfigError(f"mesh {sizes} needs {math.prod(sizes.values())} devices, which does not divide the "
                          f"{num_devices} available; choose axis sizes whose product divides the device count")
    return sizes


def make_mesh(cfg: MeshConfig | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A Mesh with axes ``AXES`` (size-1 axes included, so specs can always name every axis)."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = mesh_shape(cfg or MeshConfig(), len(devices))
    devices = devices[: math.prod(sizes.values())]
    shape = tuple(sizes[a] for a in AXES)
    # Auto axes: XLA's partitioner propagates shardings from params, inputs and logical constraints.
    auto = (jax.sharding.AxisType.Auto,) * len(AXES)
    return Mesh(np.asarray(devices).reshape(shape), AXES, axis_types=auto)
