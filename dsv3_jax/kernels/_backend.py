"""Which fast paths exist here: the backend and optional GPU kernel packages, probed once."""

from __future__ import annotations

import functools
import importlib
import sys
import types

import jax


@functools.cache
def on_gpu() -> bool:
    return jax.default_backend() == "gpu"


@functools.cache
def tokamax():
    """The tokamax module on a GPU backend, else None (it is an optional extra: pip install -e .[gpu])."""
    if not on_gpu():
        return None
    try:
        return importlib.import_module("tokamax")
    except ImportError as e:
        if "xprof" not in str(e):
            return None
    # tokamax imports xprof only for its benchmarking helpers; stub it when absent.
    for name in ("xprof", "xprof.cli", "xprof.cli.tools"):
        sys.modules.setdefault(name, types.ModuleType(name))
    try:
        return importlib.import_module("tokamax")
    except ImportError:
        return None
