"""A synthetic stand-in for ``dsv3_jax.data`` with the same contract (tests and ``train.py --data-module``).

Rows are arithmetic progressions mod the vocabulary (``t_{i+1} = t_i + stride``, random start and a stride
from a small set), so a tiny model learns them in a few dozen steps. Batch ``i`` of a split depends only on
(seed, split, shard, i): the iterator state is just the batch index.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from dsv3_jax.config import DataConfig

STRIDES = (1, 2, 3, 5)


@dataclass
class SyntheticTokenizer:
    vocab_size: int
    eos_id: int = 0


def load_or_train_tokenizer(cfg: DataConfig) -> SyntheticTokenizer:
    return SyntheticTokenizer(cfg.tokenizer_vocab_size)


class SyntheticIterator:
    """``{"tokens": int32 [batch, seq_len + 1]}`` forever, with ``get_state``/``set_state``.

    ``repeat``: always the same batch. ``bad_batch``: that batch index carries an out-of-vocabulary token
    (the model's embedding gather fills it with NaN: the divergence test).
    """

    def __init__(self, cfg: DataConfig, vocab: int, batch_size: int, split: str = "train", shard_index: int = 0,
                 shard_count: int = 1, repeat: bool = False, bad_batch: int | None = None) -> None:
        self.cfg, self.vocab, self.batch_size = cfg, vocab, batch_size
        self.key = (cfg.seed, 0 if split == "train" else 1, shard_index, shard_count)
        self.repeat, self.bad_batch = repeat, bad_batch
        self.index = 0

    def __iter__(self) -> SyntheticIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        i = 0 if self.repeat else self.index
        rng = np.random.default_rng([*self.key, i])
        start = rng.integers(0, self.vocab, (self.batch_size, 1))
        stride = rng.choice(STRIDES, (self.batch_size, 1))
        tokens = (start + stride * np.arange(self.cfg.seq_len + 1)) % self.vocab
        if self.bad_batch is not None and self.index == self.bad_batch:
            tokens[0, 1] = self.vocab + 7
        self.index += 1
        return {"tokens": tokens.astype(np.int32)}

    def get_state(self) -> dict[str, Any]:
        return {"index": self.index}

    def set_state(self, state: dict[str, Any]) -> None:
        self.index = int(state["index"])


def make_iterator(cfg: DataConfig, tokenizer: SyntheticTokenizer, batch_size: int, split: str = "train",
                  shard_index: int = 0, shard_count: int = 1) -> SyntheticIterator:
    return SyntheticIterator(cfg, tokenizer.vocab_size, batch_size, split, shard_index, shard_count)
