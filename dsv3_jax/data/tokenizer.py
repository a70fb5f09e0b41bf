"""Tokenizer: a byte-level BPE trained on the corpus (cached), or any Hugging Face ``tokenizer.json``.

Special tokens use DeepSeek-V3's own spellings — fullwidth bars ``｜`` (U+FF5C) and ``▁`` (U+2581), as in its
``tokenizer.json`` — so prompts written for DeepSeek work unchanged. Lookups in a user tokenizer also accept the
ASCII-bar spellings (``<|fim▁begin|>``) and common BOS/EOS/PAD names. REFERENCE §9.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from dsv3_jax.config import DataConfig
from dsv3_jax.data.corpus import Corpus, DataError, load_corpus

log = logging.getLogger(__name__)

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
FIM_BEGIN = "<｜fim▁begin｜>"
FIM_HOLE = "<｜fim▁hole｜>"
FIM_END = "<｜fim▁end｜>"
PAD = "<｜▁pad▁｜>"
# Ids 0..5 of the trained tokenizer, in this order: BOS = 0 and EOS = 1 as in DeepSeek-V3.
SPECIAL_TOKENS = (BOS, EOS, FIM_BEGIN, FIM_HOLE, FIM_END, PAD)

# Bump when training changes (algorithm, pre-tokenizer, specials, subset): cached tokenizers then retrain.
TOKENIZER_VERSION = "bpe-v1"


def _ascii(tok: str) -> str:
    return tok.replace("｜", "|")


# Names searched, in order, in a user-supplied tokenizer.json.
_NAMES: dict[str, tuple[str, ...]] = {
    "bos": (BOS, _ascii(BOS), "<s>", "<bos>", "<|begin_of_text|>"),
    "eos": (EOS, _ascii(EOS), "</s>", "<eos>", "<|endoftext|>", "<|end_of_text|>"),
    "pad": (PAD, _ascii(PAD), "<|pad|>", "<pad>", "[PAD]"),
    "fim_begin": (FIM_BEGIN, _ascii(FIM_BEGIN)),
    "fim_hole": (FIM_HOLE, _ascii(FIM_HOLE)),
    "fim_end": (FIM_END, _ascii(FIM_END)),
}


class Tokenizer:
    """A Hugging Face tokenizer with the ids the pipeline needs.

    ``encode`` treats special-token spellings inside ``text`` as plain text unless ``allow_special`` (documents
    must not be able to inject an EOS or FIM marker); ``decode`` keeps special tokens unless told otherwise.
    """

    def __init__(self, hf: tokenizers.Tokenizer, name: str = "") -> None:
        self.name = name
        self._hf = hf  # parses special-token spellings in text
        self._hf_plain = tokenizers.Tokenizer.from_str(hf.to_str())
        self._hf_plain.encode_special_tokens = True
        ids = {k: next((i for t in names if (i := hf.token_to_id(t)) is not None), None) for k, names in _NAMES.items()}
        if ids["eos"] is None:
            raise DataError(f"tokenizer {name!r} has no end-of-sentence token (looked for {', '.join(_NAMES['eos'])}); "
                            "packing needs one to separate documents")
        self.eos_id: int = ids["eos"]
        self.bos_id: int | None = ids["bos"]
        self.pad_id: int | None = ids["pad"]
        self.fim_begin_id: int | None = ids["fim_begin"]
        self.fim_hole_id: int | None = ids["fim_hole"]
        self.fim_end_id: int | None = ids["fim_end"]
        self.vocab_size: int = hf.get_vocab_size(with_added_tokens=True)
        self.fingerprint = hashlib.blake2b(hf.to_str().encode(), digest_size=8).hexdigest()

    @property
    def has_fim(self) -> bool:
        return None not in (self.fim_begin_id, self.fim_hole_id, self.fim_end_id)

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        p = Path(path).expanduser()
        if not p.is_file():
            raise DataError(f"data.tokenizer={str(path)!r}: no such file (expected a Hugging Face tokenizer.json)")
        try:
            hf = tokenizers.Tokenizer.from_file(str(p))
        except Exception as e:
            raise DataError(f"data.tokenizer={str(path)!r}: not a Hugging Face tokenizer.json ({e})") from None
        return cls(hf, str(p))

    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        hf = self._hf if allow_special else self._hf_plain
        return hf.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], *, skip_special: bool = False) -> str:
        return self._hf.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def save(self, path: str | Path) -> None:
        self._hf.save(str(path))

    def __repr__(self) -> str:
        return f"Tokenizer({self.name!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id}, fim={self.has_fim})"


def train_bpe(texts: Iterable[str], vocab_size: int) -> tokenizers.Tokenizer:
    """Byte-level BPE with ``vocab_size`` ids in all (256 bytes + merges + the 6 specials at ids 0..5)."""
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise DataError(f"data.tokenizer_vocab_size={vocab_size}: must be ≥ {256 + len(SPECIAL_TOKENS)} "
                        "(256 byte tokens + 6 special tokens)")
    hf = tokenizers.Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    hf.train_from_iterator(texts, trainer)
    return hf


def _training_texts(corpus: Corpus, max_bytes: int) -> Iterable[str]:
    """About ``max_bytes`` of documents in a fixed pseudo-random order (a spread of the corpus, not its first
    directories alphabetically). A subset keeps training to seconds; BPE merges converge well before 8 MB."""
    order = sorted(range(len(corpus)), key=lambda i: hashlib.blake2b(str(i).encode(), digest_size=8).digest())
    total = 0
    for i in order:
        text = corpus[i]
        yield text
        total += len(text)
        if total >= max_bytes:
            return


def load_tokenizer(cfg: DataConfig) -> Tokenizer:
    """``cfg.tokenizer`` if given; else the BPE trained on the train split of ``cfg.source``, cached in
    ``cfg.cache_dir`` under a name keyed by corpus fingerprint, vocab size and TOKENIZER_VERSION."""
    if cfg.tokenizer:
        return Tokenizer.from_file(cfg.tokenizer)
    corpus = load_corpus(cfg.source, "train", cfg.val_fraction)
    key = hashlib.blake2b(f"{corpus.fingerprint}|{cfg.tokenizer_train_bytes}".encode(), digest_size=8).hexdigest()
    name = f"{TOKENIZER_VERSION}-{cfg.tokenizer_vocab_size}-{key}.json"
    path = Path(cfg.cache_dir).expanduser() / "tokenizers" / name
    if path.is_file():
        return Tokenizer(tokenizers.Tokenizer.from_file(str(path)), str(path))
    t0 = time.perf_counter()
    hf = train_bpe(_training_texts(corpus, cfg.tokenizer_train_bytes), cfg.tokenizer_vocab_size)
    log.info("trained a %d-token BPE on %s in %.1f s -> %s", hf.get_vocab_size(), cfg.source,
             time.perf_counter() - t0, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write-then-rename: hosts training the same tokenizer at once never read a half-written file.
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    hf.save(tmp)
    os.replace(tmp, path)
    return Tokenizer(hf, str(path))
