"""Test session set-up: 8 simulated CPU devices so sharded runs can be compared with one device."""

import os

# Must happen before jax is imported anywhere in the test session.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import gc  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop jax's compiled executables after each test module. XLA:CPU maps every compiled program's code into the
    process; one pytest process compiling the whole suite (~420 tests, thousands of programs) ran into "INTERNAL:
    Failed to materialize symbols" in its last modules (vm.max_map_count is 65,530), while each failing test passes
    on its own."""
    yield
    import jax

    jax.clear_caches()
    gc.collect()
