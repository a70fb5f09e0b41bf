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


IMPORT_ERRORS: list[str] = []  # why an optional kernel package was not used (benchmarks print this)


class _Stub(types.ModuleType):
    """Stand-in for a module imported only for optional tooling: any attribute is a no-op callable."""

    def __getattr__(self, name: str):
        return lambda *a, **k: None


def _import_tokamax():
    return importlib.import_module("tokamax")


@functools.cache
def tokamax():
    """The tokamax module on a GPU backend, else None (it is an optional extra: pip install -e .[gpu])."""
    if not on_gpu():
        return None
    try:
        return _import_tokamax()
    except ImportError as e:
        if "xprof" not in str(e):
            IMPORT_ERRORS.append(f"tokamax: {e}")
            return None
    # tokamax imports xprof only for its benchmarking helpers; stub it when absent.
    for mod in [m for m in sys.modules if m == "tokamax" or m.startswith("tokamax.")]:
        del sys.modules[mod]
    for name in ("xprof", "xprof.cli", "xprof.cli.tools"):
        sys.modules.setdefault(name, _Stub(name))
    try:
        return _import_tokamax()
    except ImportError as e:
        IMPORT_ERRORS.append(f"tokamax (xprof stubbed): {e}")
        return None
