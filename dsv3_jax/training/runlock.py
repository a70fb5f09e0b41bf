"""One writer per run dir: an exclusive ``flock`` on ``run_dir/.lock.<process index>``, held while training.

Two ``train.py`` on one run dir corrupt it (interleaved saves, duplicate metrics steps). The lock is an OS
advisory lock on an open file: the kernel drops it when the process exits however it exits (``kill -9``, a
crash), so a lock left behind is never stale — the file may remain, but nobody holds it. The file records the
holder (host, pid, start time) for the error the second process prints. Multi-process runs: process i locks
``.lock.i``, so a second launch fails on every process. (On NFS, flock needs a server with lock support — v4,
or v3 with lockd.)
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from types import TracebackType
from typing import Self

from dsv3_jax.config import ConfigError


class RunDirLocked(ConfigError):
    """Another live process is writing this run dir."""


class RunDirLock:
    """``with RunDirLock(run_dir, process_index):`` — exclusive for the block; :class:`RunDirLocked` if held."""

    def __init__(self, run_dir: str | Path, process_index: int = 0) -> None:
        self.path = Path(run_dir) / f".lock.{process_index}"
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunDirLocked(f"run dir {self.path.parent} is in use by another training process "
                               f"({self._holder()}); wait for it to finish or stop it, or pick another run_dir"
                               ) from None
        holder = {"host": socket.gethostname(), "pid": os.getpid(),
                  "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode() + b"\n", 0)
        os.fsync(fd)
        self._fd = fd

    def _holder(self) -> str:
        try:
            h = json.loads(self.path.read_text())
            return f"pid {h['pid']} on {h['host']}, since {h['since']}; lock file {self.path}"
        except (OSError, ValueError, KeyError, TypeError):
            return f"lock file {self.path}"

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> Self:
        self.acquire()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()
