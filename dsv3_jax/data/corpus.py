"""Document sources: the embedded stdlib corpus and user text / JSONL / ArrayRecord files.

A :class:`Corpus` is a random-access list of documents (``corpus[i] -> str``), the shape
``grain.MapDataset.source`` wants. Building one only lists files and indexes offsets; a document's text is read
when it is asked for, so the first batch does not wait for the whole corpus.

Train/validation split: a document goes to validation when a stable hash of its split key falls below
``val_fraction``. The key is the file's relative path for text files (so a file never straddles the split), the
chunk for a source that is one single text file, and ``path:line`` / ``path:record`` for JSONL / ArrayRecord.
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import json
import os
import sysconfig
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

Split = Literal["train", "validation", "all"]
Kind = Literal["text", "jsonl", "array_record"]

TEXT_SUFFIXES = (".txt", ".py", ".md")
JSONL_SUFFIXES = (".jsonl",)
ARRAY_RECORD_SUFFIXES = (".array_record", ".arrayrecord")
# Text files above this size are cut at line boundaries into documents of about this size: bounds the work per
# document (first-batch latency) and lets a single-file corpus (one big .txt) still have a validation split.
MAX_DOC_BYTES = 64 * 1024
_SKIP_STDLIB_DIRS = {"site-packages", "dist-packages", "__pycache__"}


class DataError(ValueError):
    """A data source or record is wrong; the message names the file (and line) and what is expected."""


@dataclass(frozen=True)
class _File:
    path: str  # absolute
    rel: str  # relative to the source root: stable across machines, used for split keys and fingerprints
    kind: Kind
    size: int


class Corpus:
    """The documents of one split, in a fixed order; ``corpus[i]`` reads document ``i``.

    Documents are spans of files: ``(file index, start, stop, line)`` where start/stop are byte offsets for
    text and JSONL and a record index for ArrayRecord; ``line`` is the 1-based JSONL line (for errors).
    """

    def __init__(self, name: str, files: list[_File], file_idx: np.ndarray, start: np.ndarray, stop: np.ndarray,
                 line: np.ndarray, fingerprint: str) -> None:
        self.name = name
        self.files = files
        self._file_idx, self._start, self._stop, self._line = file_idx, start, stop, line
        self.fingerprint = fingerprint  # of the whole source (both splits) and the split rule
        self._readers: dict[int, object] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._file_idx)

    def __repr__(self) -> str:
        return f"Corpus({self.name!r}, {len(self)} documents from {len(self.files)} files)"

    def location(self, i: int) -> str:
        """``path`` / ``path:line`` / ``path#record`` of document ``i`` (for messages)."""
        f = self.files[self._file_idx[i]]
        if f.kind == "jsonl":
            return f"{f.path}:{self._line[i]}"
        if f.kind == "array_record":
            return f"{f.path}#record {self._start[i]}"
        return f"{f.path} (bytes {self._start[i]}-{self._stop[i]})"

    def __getitem__(self, i: int) -> str:
        i = int(i)
        f = self.files[self._file_idx[i]]
        start, stop = int(self._start[i]), int(self._stop[i])
        if f.kind == "array_record":
            return _record_text(self._read_record(int(self._file_idx[i]), f, start), f"{f.path}#record {start}")
        with open(f.path, "rb") as fh:
            fh.seek(start)
            raw = fh.read(stop - start)
        if f.kind == "text":
            return raw.decode("utf-8", errors="replace")
        return _jsonl_text(raw, f"{f.path}:{self._line[i]}")

    def _read_record(self, fi: int, f: _File, index: int) -> bytes:
        with self._lock:  # one reader per file, shared by the prefetch threads
            reader = self._readers.get(fi)
            if reader is None:
                reader = self._readers[fi] = _array_record_reader(f.path)
            return reader.read([index])[0]  # type: ignore[attr-defined]

    def select(self, mask: np.ndarray, name: str) -> Corpus:
        """The documents where ``mask`` is true (order kept)."""
        return Corpus(name, self.files, self._file_idx[mask], self._start[mask], self._stop[mask],
                      self._line[mask], self.fingerprint)


def _jsonl_text(raw: bytes, where: str) -> str:
    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{where}: invalid JSON ({e}); each line must be an object like "
                        '{"text": "..."}') from None
    if not isinstance(obj, dict) or "text" not in obj:
        got = f"keys {sorted(obj)}" if isinstance(obj, dict) else f"a {type(obj).__name__}"
        raise DataError(f"{where}: no 'text' field (got {got}); each line must be an object like "
                        '{"text": "..."}')
    if not isinstance(obj["text"], str):
        raise DataError(f"{where}: 'text' is a {type(obj['text']).__name__}, expected a string")
    return obj["text"]


def _record_text(raw: bytes, where: str) -> str:
    """An ArrayRecord record: a JSON object with a 'text' field, else the record itself as UTF-8 text."""
    text = raw.decode("utf-8", errors="replace")
    if text.lstrip().startswith("{"):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError:
            return text
        if isinstance(obj, dict):
            return _jsonl_text(raw, where)
    return text


def _array_record_reader(path: str) -> object:
    try:
        from array_record.python.array_record_module import ArrayRecordReader
    except ImportError:
        raise DataError(f"{path}: reading ArrayRecord files needs the 'array-record' package "
                        "(pip install array-record)") from None
    return ArrayRecordReader(path, "readahead_buffer_size:0")


# ----------------------------------------------------------------------------------------------------------
# Listing sources
# ----------------------------------------------------------------------------------------------------------


def _kind(path: str) -> Kind | None:
    low = path.lower()
    if low.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if low.endswith(ARRAY_RECORD_SUFFIXES) or ".array_record-" in low:
        return "array_record"
    if low.endswith(TEXT_SUFFIXES):
        return "text"
    return None


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _list_stdlib() -> tuple[list[_File], bool]:
    root = stdlib_root()
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_STDLIB_DIRS]
        for fn in filenames:
            if fn.endswith(".py"):
                p = Path(dirpath) / fn
                out.append(_File(str(p), p.relative_to(root).as_posix(), "text", p.stat().st_size))
    return sorted(out, key=lambda f: f.rel), False


_EXPECTED = ("'stdlib', a file, a directory with *.txt/*.py/*.md/*.jsonl/*.array_record files, or a glob "
             "such as 'data/**/*.jsonl'")


def _list_user(source: str) -> tuple[list[_File], bool]:
    """Files of a user source and whether it is one single file (then text splits by chunk, not by file)."""
    expanded = os.path.expanduser(source)
    single = False
    if os.path.isfile(expanded):
        paths, root, single = [expanded], os.path.dirname(os.path.abspath(expanded)), True
    elif os.path.isdir(expanded):
        root = expanded
        paths = [str(p) for p in Path(expanded).rglob("*") if p.is_file() and _kind(str(p))]
        if not paths:
            raise DataError(f"data.source={source!r}: directory has no *.txt/*.py/*.md/*.jsonl/*.array_record "
                            "files")
    elif glob.has_magic(expanded):
        paths = [p for p in glob.glob(expanded, recursive=True) if os.path.isfile(p)]
        if not paths:
            raise DataError(f"data.source={source!r}: glob matched no files. Expected {_EXPECTED}")
        magic_at = min(i for i, c in enumerate(expanded) if c in "*?[")
        root = os.path.dirname(expanded[:magic_at]) or "."
    else:
        raise DataError(f"data.source={source!r}: no such file or directory. Expected {_EXPECTED}")
    files = []
    for p in paths:
        ap = os.path.abspath(p)
        files.append(_File(ap, os.path.relpath(ap, os.path.abspath(root)).replace(os.sep, "/"),
                           _kind(p) or "text", os.path.getsize(ap)))
    return sorted(files, key=lambda f: f.rel), single


def _text_spans(path: str, size: int) -> list[tuple[int, int]]:
    """Byte spans of about MAX_DOC_BYTES, cut just after a newline (found by seeking, not reading the file)."""
    if size <= MAX_DOC_BYTES:
        return [(0, size)] if size else []
    cuts = [0]
    with open(path, "rb") as fh:
        while cuts[-1] + MAX_DOC_BYTES < size:
            fh.seek(cuts[-1] + MAX_DOC_BYTES)
            fh.readline()
            cuts.append(min(fh.tell(), size))
    if cuts[-1] < size:
        cuts.append(size)
    return list(itertools.pairwise(cuts))


def _jsonl_spans(path: str) -> tuple[list[tuple[int, int]], list[int]]:
    spans, lines, off = [], [], 0
    with open(path, "rb") as fh:
        for n, raw in enumerate(fh, start=1):
            if raw.strip():  # blank lines (often the last one) are not records
                spans.append((off, off + len(raw)))
                lines.append(n)
            off += len(raw)
    return spans, lines


def _num_records(path: str) -> int:
    reader = _array_record_reader(path)
    try:
        return int(reader.num_records())  # type: ignore[attr-defined]
    finally:
        reader.close()  # type: ignore[attr-defined]


def _in_validation(keys: list[str], val_fraction: float) -> np.ndarray:
    """Stable split: blake2b of the key (not Python's salted hash) mapped to [0, 1)."""
    u = np.array([int.from_bytes(hashlib.blake2b(k.encode(), digest_size=8).digest(), "little") / 2**64
                  for k in keys], dtype=np.float64)
    return u < val_fraction


def load_corpus(source: str, split: Split = "train", val_fraction: float = 0.05) -> Corpus:
    """The documents of ``split`` of ``source`` ('stdlib', a file, a directory or a glob)."""
    if split not in ("train", "validation", "all"):
        raise DataError(f"split={split!r}: must be 'train', 'validation' or 'all'")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"data.val_fraction={val_fraction}: must be in [0, 1)")
    files, single = _list_stdlib() if source == "stdlib" else _list_user(source)
    file_idx, start, stop, line, keys = [], [], [], [], []
    for fi, f in enumerate(files):
        if f.kind == "text":
            spans = _text_spans(f.path, f.size)
            nums = [0] * len(spans)
            file_keys = [f"{f.rel}@{a}" for a, _ in spans] if single else [f.rel] * len(spans)
        elif f.kind == "jsonl":
            spans, nums = _jsonl_spans(f.path)
            file_keys = [f"{f.rel}:{n}" for n in nums]
        else:
            n = _num_records(f.path)
            spans, nums = [(r, r + 1) for r in range(n)], list(range(n))
            file_keys = [f"{f.rel}#{r}" for r in range(n)]
        file_idx += [fi] * len(spans)
        start += [a for a, _ in spans]
        stop += [b for _, b in spans]
        line += nums
        keys += file_keys
    if not keys:
        raise DataError(f"data.source={source!r}: the matched files hold no documents (all empty)")
    # Stdlib: relative paths + sizes (same Python = same corpus wherever installed); user data: absolute paths.
    h = hashlib.blake2b(f"{source == 'stdlib'}|{val_fraction}|".encode(), digest_size=16)
    for f in files:
        h.update(f"{f.rel if source == 'stdlib' else f.path}\0{f.size}\0".encode())
    corpus = Corpus("all", files, np.asarray(file_idx, np.int32), np.asarray(start, np.int64),
                    np.asarray(stop, np.int64), np.asarray(line, np.int64), h.hexdigest())
    if split == "all":
        return corpus
    in_val = _in_validation(keys, val_fraction)
    return corpus.select(in_val if split == "validation" else ~in_val, split)
