"""``tests.synthetic_data`` with shard-independent global batches (``train.py --data-module`` in multi-process tests).

Shard ``i`` of ``n`` yields rows ``[i·b, (i+1)·b)`` of the batch a single process would read with batch size
``n·b``, so a run on any number of processes trains on the same global batches (the real pipeline instead gives
each shard disjoint documents).
"""

from __future__ import annotations

import numpy as np

from dsv3_jax.config import DataConfig
from tests.synthetic_data import SyntheticIterator, SyntheticTokenizer, load_or_train_tokenizer

__all__ = ["load_or_train_tokenizer", "make_iterator"]


class GlobalSliceIterator(SyntheticIterator):
    def __init__(self, cfg: DataConfig, vocab: int, batch_size: int, split: str, shard_index: int,
                 shard_count: int) -> None:
        super().__init__(cfg, vocab, batch_size * shard_count, split)  # the unsharded stream's batches
        self.rows = slice(shard_index * batch_size, (shard_index + 1) * batch_size)

    def __next__(self) -> dict[str, np.ndarray]:
        return {"tokens": super().__next__()["tokens"][self.rows]}


def make_iterator(cfg: DataConfig, tokenizer: SyntheticTokenizer, batch_size: int, split: str = "train",
                  shard_index: int = 0, shard_count: int = 1) -> GlobalSliceIterator:
    return GlobalSliceIterator(cfg, tokenizer.vocab_size, batch_size, split, shard_index, shard_count)
