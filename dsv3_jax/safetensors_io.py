"""Minimal zero-copy safetensors reader/writer over NumPy + ml_dtypes (BF16 and FP8 included).

The format: 8-byte little-endian header length, a JSON header ``{name: {dtype, shape, data_offsets}}``, then
raw little-endian bytes. Reading memory-maps the file, so a tensor costs no RAM until it is used.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
CODES = {v: k for k, v in DTYPES.items()}


class SafetensorsError(ValueError):
    """A safetensors file is malformed or holds a dtype we cannot read; the message names file and tensor."""


class SafetensorsFile:
    """Lazy reader: ``keys()``, ``shape(k)``, ``dtype(k)``, ``get(k)`` → read-only memory-mapped ndarray."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise SafetensorsError(f"{self.path}: not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8:  # checked before reading: a damaged length must not allocate exabytes
                raise SafetensorsError(f"{self.path}: header length {n} runs past the end of the file "
                                       f"({size} bytes): truncated or not a safetensors file")
            try:
                self.header: dict = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
                raise SafetensorsError(f"{self.path}: unreadable safetensors header ({e})") from None
        if not isinstance(self.header, dict):
            raise SafetensorsError(f"{self.path}: the safetensors header is not a JSON object")
        self.metadata = self.header.pop("__metadata__", {}) or {}
        self._base = 8 + n
        data = size - self._base
        for key, entry in self.header.items():  # every tensor's byte range lies inside the file
            try:
                start, end = entry["data_offsets"]
                ok = isinstance(start, int) and isinstance(end, int) and 0 <= start <= end <= data
                shape_ok = all(isinstance(d, int) and d >= 0 for d in entry["shape"])
            except (KeyError, TypeError, ValueError):
                raise SafetensorsError(f"{self.path}: tensor {key!r} has a malformed header entry {entry!r}"
                                       ) from None
            if not shape_ok:
                raise SafetensorsError(f"{self.path}: tensor {key!r} has a malformed shape {entry['shape']!r}")
            if not ok:
                raise SafetensorsError(f"{self.path}: tensor {key!r} has data_offsets {[start, end]} outside the "
                                       f"file's {data} data bytes: the file is truncated or damaged")
        self._mm: np.memmap | None = None

    def keys(self) -> list[str]:
        return list(self.header)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.header[key]["shape"])

    def dtype(self, key: str) -> np.dtype:
        code = self.header[key]["dtype"]
        if code not in DTYPES:
            raise SafetensorsError(f"{self.path}: tensor {key!r} has dtype {code}, which is not supported "
                                   f"(supported: {', '.join(DTYPES)})")
        return DTYPES[code]

    def get(self, key: str) -> np.ndarray:
        if key not in self.header:
            raise KeyError(f"{self.path}: no tensor {key!r}")
        if self._mm is None:
            self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        start, end = self.header[key]["data_offsets"]
        dt, shape = self.dtype(key), self.shape(key)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        if end - start != nbytes:
            raise SafetensorsError(f"{self.path}: tensor {key!r} has {end - start} bytes, expected {nbytes} "
                                   f"for {dt} {list(shape)}")
        return self._mm[self._base + start: self._base + end].view(dt).reshape(shape)


def write_safetensors(path: str | Path, tensors: Mapping[str, np.ndarray] | Iterator[tuple[str, np.ndarray]],
                      metadata: dict[str, str] | None = None) -> None:
    """Write tensors (C-contiguous copies are made one at a time) to ``path``."""
    items = list(tensors.items() if isinstance(tensors, Mapping) else tensors)
    header: dict = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    for name, arr in items:
        dt = np.dtype(arr.dtype)
        if dt not in CODES:
            raise SafetensorsError(f"cannot write tensor {name!r}: dtype {dt} has no safetensors code")
        header[name] = {"dtype": CODES[dt], "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for _, arr in items:
            f.write(np.ascontiguousarray(arr).tobytes())
