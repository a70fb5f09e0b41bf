"""Concatenate-and-chunk packing as a Grain IterDataset (REFERENCE §9: no cross-document masking).

Token arrays (each a document ending in EOS) are laid end to end and cut into windows of ``length`` tokens; a
document may start in one window and end in the next, and no token is padded or dropped — except the last,
partial window of a finite input.

Checkpoint state is where the next window starts: the parent's state just before the document that holds
that token, and the token's offset in it. Restoring re-reads that one document.
"""

from __future__ import annotations

from typing import Any

import grain
import numpy as np


class PackIterDataset(grain.IterDataset):
    """Yields ``{"tokens": int32 [length]}`` windows packed from a parent of 1-D int32 token arrays."""

    def __init__(self, parent: grain.IterDataset, length: int) -> None:
        super().__init__(parent)
        if length <= 0:
            raise ValueError(f"window length must be positive, got {length}")
        self._length = length

    def __iter__(self) -> _PackIterator:
        return _PackIterator(self._parent.__iter__(), self._length)

    def __str__(self) -> str:
        return f"PackIterDataset(length={self._length})"


class _PackIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, length: int) -> None:
        super().__init__(parent)
        self._length = length
        self._doc = np.zeros(0, np.int32)
        self._pos = 0  # next unread token of self._doc
        self._doc_state = self._parent.get_state()  # parent state before self._doc was read

    def __next__(self) -> dict[str, np.ndarray]:
        out = np.empty(self._length, np.int32)
        filled = 0
        while filled < self._length:
            if self._pos >= len(self._doc):
                self._doc_state = self._parent.get_state()
                self._doc = np.asarray(next(self._parent), np.int32)  # StopIteration drops the partial window
                self._pos = 0
            n = min(self._length - filled, len(self._doc) - self._pos)
            out[filled:filled + n] = self._doc[self._pos:self._pos + n]
            filled += n
            self._pos += n
        return {"tokens": out}

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._doc_state, "offset": int(self._pos)}

    def set_state(self, state: dict[str, Any]) -> None:
        self._doc_state = state["parent"]
        self._parent.set_state(self._doc_state)
        try:
            self._doc = np.asarray(next(self._parent), np.int32)
        except StopIteration:  # restored at the end of a finite input
            self._doc = np.zeros(0, np.int32)
        self._pos = int(state["offset"])
