"""The Grain input pipeline: documents → FIM → tokens + EOS → packed windows → batches.

    corpus split ─ shard ─ shuffle (seeded, new order each epoch) ─ repeat ─┐  (MapDataset: random access)
        ┌───────────────────────────────────────────────────────────────────┘
        └ read + FIM + tokenise (num_workers threads) ─ pack seq_len + 1 ─ batch   (IterDataset: streaming)

Each batch is ``{"tokens": int32 [batch, seq_len + 1]}``: inputs ``tokens[:, :-1]``, targets ``tokens[:, 1:]``.
Training repeats forever; validation is one finite pass in corpus order (the last partial window and batch are
dropped so every batch has the same shape). Documents are read and tokenised only when packing needs them.
"""

from __future__ import annotations

import warnings
from typing import Any, Literal

import grain
import numpy as np

from dsv3_jax.config import DataConfig
from dsv3_jax.data.corpus import DataError, load_corpus
from dsv3_jax.data.fim import encode_document, fim_split_points
from dsv3_jax.data.packing import PackIterDataset
from dsv3_jax.data.tokenizer import Tokenizer

STATE_FORMAT = "dsv3_jax.data/1"
# State fields that must match on restore: they change what the grain indices and token offsets refer to.
_STATE_KEYS = ("split", "shard_index", "shard_count", "seq_len", "seed", "fim_rate", "corpus", "tokenizer")


def make_dataset(cfg: DataConfig, tokenizer: Tokenizer, batch_size: int, split: Literal["train", "validation"]
                 = "train", shard_index: int = 0, shard_count: int = 1) -> tuple[grain.IterDataset, dict[str, Any]]:
    """The Grain dataset behind :func:`make_iterator` (same arguments) and what its state depends on."""
    _check_args(cfg, batch_size, split, shard_index, shard_count)
    corpus = load_corpus(cfg.source, split, cfg.val_fraction)
    ds = grain.MapDataset.source(corpus)[shard_index::shard_count]
    if len(ds) == 0:
        raise DataError(f"data.source={cfg.source!r}: split {split!r} has {len(corpus)} documents, none for shard "
                        f"{shard_index} of {shard_count}" + (" (raise data.val_fraction or use a larger source)"
                                                              if split == "validation" else ""))
    if split == "train":
        ds = ds.shuffle(seed=cfg.seed).repeat()  # grain reseeds the shuffle for each epoch
    fim_rate = _effective_fim_rate(cfg, tokenizer)

    def read_and_encode(index: int, text: str) -> np.ndarray:
        # One generator per (seed, shard, position in the stream): deterministic, and new cuts each epoch.
        rng = np.random.default_rng((cfg.seed, shard_index, index))
        return encode_document(tokenizer, text, fim_split_points(len(text), rng, fim_rate))

    ds = ds.map_with_index(read_and_encode)
    # data.num_workers threads read + tokenise documents ahead of packing; 0 = in the calling thread.
    read = grain.ReadOptions(num_threads=cfg.num_workers, prefetch_buffer_size=4 * cfg.num_workers)
    ds = PackIterDataset(ds.to_iter_dataset(read), cfg.seq_len + 1).batch(batch_size, drop_remainder=True)
    meta = {"split": split, "shard_index": shard_index, "shard_count": shard_count, "seq_len": cfg.seq_len,
            "seed": cfg.seed, "fim_rate": fim_rate, "corpus": corpus.fingerprint, "tokenizer": tokenizer.fingerprint}
    return ds, meta


class DataIterator:
    """Iterator of ``{"tokens": int32 [batch, seq_len + 1]}`` with checkpointable position.

    ``get_state()`` is a small JSON-serialisable dict; ``set_state(s)`` on a fresh iterator built with the same
    data config, tokenizer, split and shard continues with exactly the batch that followed ``s``. The batch
    size may differ on restore (the position is kept in windows).
    """

    def __init__(self, iterator: grain.DatasetIterator, meta: dict[str, Any]) -> None:
        self._it = iterator
        self._meta = meta

    def __iter__(self) -> DataIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._it)

    def close(self) -> None:
        """Stop the prefetch threads (num_workers > 0); they also stop when the iterator is dropped."""
        self._it.close()

    def get_state(self) -> dict[str, Any]:
        return {"format": STATE_FORMAT, **self._meta, "grain": self._it.get_state()}

    def set_state(self, state: dict[str, Any]) -> None:
        if state.get("format") != STATE_FORMAT:
            raise DataError(f"data iterator state has format {state.get('format')!r}, expected {STATE_FORMAT!r}")
        diff = [f"{k}: saved {state.get(k)!r}, now {self._meta[k]!r}" for k in _STATE_KEYS
                if state.get(k) != self._meta[k]]
        if diff:
            raise DataError("data iterator state does not match this pipeline (" + "; ".join(diff) + "). Use the "
                            "saved data config and tokenizer, or start without the saved data state.")
        self._it.set_state(state["grain"])


def make_iterator(cfg: DataConfig, tokenizer: Tokenizer, batch_size: int, split: Literal["train", "validation"]
                  = "train", shard_index: int = 0, shard_count: int = 1) -> DataIterator:
    """Batches of ``batch_size`` packed windows for data-parallel host ``shard_index`` of ``shard_count``
    (hosts read disjoint documents). ``batch_size`` is this host's share of the global batch."""
    ds, meta = make_dataset(cfg, tokenizer, batch_size, split, shard_index, shard_count)
    return DataIterator(ds.__iter__(), meta)


def _effective_fim_rate(cfg: DataConfig, tokenizer: Tokenizer) -> float:
    if cfg.fim_rate > 0 and not tokenizer.has_fim:
        warnings.warn(f"data.fim_rate={cfg.fim_rate} but tokenizer {tokenizer.name!r} has no FIM tokens "
                      "(<｜fim▁begin｜>, <｜fim▁hole｜>, <｜fim▁end｜>): training without Fill-in-Middle",
                      stacklevel=3)
        return 0.0
    return cfg.fim_rate


def _check_args(cfg: DataConfig, batch_size: int, split: str, shard_index: int, shard_count: int) -> None:
    if split not in ("train", "validation"):
        raise DataError(f"split={split!r}: must be 'train' or 'validation'")
    if batch_size <= 0:
        raise DataError(f"batch_size={batch_size}: must be positive")
    if not 0 <= shard_index < shard_count:
        raise DataError(f"shard_index={shard_index}, shard_count={shard_count}: need 0 ≤ shard_index < shard_count")
    if cfg.seq_len <= 0:
        raise DataError(f"data.seq_len={cfg.seq_len}: must be positive")
    if not 0.0 <= cfg.fim_rate <= 1.0:
        raise DataError(f"data.fim_rate={cfg.fim_rate}: must be in [0, 1]")
    if cfg.num_workers < 0:
        raise DataError(f"data.num_workers={cfg.num_workers}: must be ≥ 0")
    if not 0 <= cfg.seed < 2**32:
        raise DataError(f"data.seed={cfg.seed}: must be in [0, 2**32) (Grain's shuffle seed)")
