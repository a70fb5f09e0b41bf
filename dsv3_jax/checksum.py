"""Per-array checksums of a pytree, computed on the device: written with a checkpoint, verified on restore.

Each array's bits (viewed as unsigned integers of its width; 8-byte types as two 32-bit words) give two 32-bit
sums, ``Σ w·(a·i + 1)`` for a = 2 and a = 6 (mod 2^32), i the element's row-major index: every weight is odd,
hence invertible mod 2^32, so *any* change of one element changes both sums for certain; wider damage (a
garbled block, swapped values) leaves both unchanged only by a coincidence of two 32-bit sums. The arithmetic is
integer (exact, order-free), so a checkpoint saved on one mesh verifies on any other: the sums depend on the
global array only. Costs one read of each array on its devices.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_UINT = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}


def _words(x: jax.Array) -> jax.Array:
    """The array's bits as uint32 (one word per element; 8-byte elements give two, in a trailing axis)."""
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    size = jnp.dtype(x.dtype).itemsize
    w = jax.lax.bitcast_convert_type(x, jnp.uint32 if size == 8 else _UINT[size])
    return w.astype(jnp.uint32)


def _index(shape: tuple[int, ...]) -> jax.Array:
    """Row-major element index mod 2^32, uint32 [shape] (built per axis: no overflow for any size)."""
    idx = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for d in range(len(shape) - 1, -1, -1):
        idx = idx + jax.lax.broadcasted_iota(jnp.uint32, shape, d) * jnp.uint32(stride % 2**32)
        stride *= shape[d]
    return idx


def _sums(x: jax.Array) -> jax.Array:
    w = _words(x)
    i = _index(w.shape)
    return jnp.stack([jnp.sum(w * (i * jnp.uint32(2) + 1), dtype=jnp.uint32),
                      jnp.sum(w * (i * jnp.uint32(6) + 1), dtype=jnp.uint32)])


@jax.jit
def _tree_sums(tree: Any) -> Any:
    return jax.tree.map(_sums, tree)


def key(path: tuple) -> str:
    """A pytree key path → 'a/b/0' (the name checksums are stored under)."""
    return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def checksums(tree: Any, only: set[str] | None = None) -> dict[str, str]:
    """{'a/b/c': 16 hex digits} for every array leaf of ``tree`` (the leaf's key path, '/'-joined; only the
    keys in ``only`` if given)."""
    arrays = {key(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
              if hasattr(x, "shape") and (only is None or key(p) in only)}
    host = jax.device_get(_tree_sums({k: jnp.asarray(v) if isinstance(v, np.ndarray | np.generic) else v
                                      for k, v in arrays.items()}))
    return {k: f"{int(s[0]):08x}{int(s[1]):08x}" for k, s in host.items()}


def mismatches(tree: Any, expected: dict[str, str], only: set[str] | None = None) -> list[str]:
    """The key paths of ``tree`` whose checksum differs from ``expected`` (or that it lacks / has extra);
    restricted to the keys in ``only`` if given."""
    got = checksums(tree, only)
    if only is not None:
        expected = {k: v for k, v in expected.items() if k in only}
    return sorted(k for k in got.keys() | expected.keys() if got.get(k) != expected.get(k))
