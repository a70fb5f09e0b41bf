"""Chat data for supervised fine-tuning (REFERENCE §9 SFT, §11 layout): JSONL conversations → packed rows.

Each JSONL line is ``{"messages": [...], "tools": [...]?}`` with OpenAI-style messages (system / user /
assistant / tool; assistant ``tool_calls`` and optional ``reasoning_content``). A conversation renders with the
built-in DeepSeek-V3.1 layout (``data.chat_template: deepseek_v3.1``) or a jinja2 chat template
(``tokenizer``: the ``chat_template`` of the tokenizer_config.json beside data.tokenizer; or a path to a
tokenizer_config.json / .jinja file), in thinking mode when its last assistant turn carries reasoning.

Samples are packed whole into rows of ``seq_len + 1`` tokens (a sample longer than that is cut); the rest of
a row is padding. Every batch is ``{"tokens", "loss_mask", "positions", "segment_ids"}``, each int32
``[batch, seq_len + 1]``: ``loss_mask`` 1 on assistant tokens (the targets trained), ``positions`` restarting at
0 for every sample, ``segment_ids`` 1, 2, … per sample and 0 for padding. The train step keeps attention inside
each sample (``model.packed_samples``) and trains target ``t+1`` only when it is an assistant token of the same
sample, so a sample's loss is what it would be alone in its row.

Training cycles over the shard's samples forever, in a new seeded order each epoch; validation cycles in file
order. ``get_state``/``set_state`` resume on exactly the next batch.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Literal

import numpy as np

from dsv3_jax.config import DataConfig
from dsv3_jax.data import chat_format
from dsv3_jax.data.corpus import DataError
from dsv3_jax.data.tokenizer import Tokenizer, load_tokenizer

log = logging.getLogger(__name__)

STATE_FORMAT = "dsv3_jax.data.chat/1"
BUILTIN = "deepseek_v3.1"
FIELDS = ("tokens", "loss_mask", "positions", "segment_ids")


def load_or_train_tokenizer(cfg: DataConfig) -> Tokenizer:
    """The data contract's tokenizer loader: chat fine-tuning uses the checkpoint's tokenizer (data.tokenizer)."""
    if not cfg.tokenizer:
        raise DataError("chat data needs the tokenizer the weights were trained with: set data.tokenizer=PATH "
                        "(train.init_from sets it from the checkpoint)")
    return load_tokenizer(cfg)


def load_template(cfg: DataConfig) -> str | None:
    """The jinja2 chat template ``data.chat_template`` names, or None for the built-in V3.1 layout."""
    name = cfg.chat_template
    if name == BUILTIN:
        return None
    if name == "tokenizer":
        if not cfg.tokenizer:
            raise DataError("data.chat_template=tokenizer needs data.tokenizer (its tokenizer_config.json)")
        path = Path(cfg.tokenizer).expanduser().parent / "tokenizer_config.json"
    else:
        path = Path(name).expanduser()
    if not path.is_file():
        raise DataError(f"data.chat_template={name!r}: {path} does not exist (use {BUILTIN!r}, 'tokenizer', or a "
                        f"tokenizer_config.json / .jinja path)")
    if path.suffix == ".json":
        tpl = json.loads(path.read_text()).get("chat_template")
        if isinstance(tpl, list):  # HF's named templates: take the default one
            tpl = next((t["template"] for t in tpl if t.get("name") == "default"), None)
        if not isinstance(tpl, str):
            raise DataError(f"data.chat_template={name!r}: {path} has no chat_template string")
        return tpl
    return path.read_text()


def encode_chat(tokenizer: Tokenizer, sample: dict, template: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One conversation → (tokens int32 [L], loss_mask int32 [L]). Thinking mode when the last assistant
    message carries reasoning (``reasoning_content``, or text before ``</think>``)."""
    messages, tools = sample.get("messages"), sample.get("tools")
    assistants = [m for m in messages or [] if isinstance(m, dict) and m.get("role") == "assistant"]
    if not assistants:
        raise chat_format.ChatFormatError("the conversation has no assistant message (nothing to train on)")
    last = assistants[-1]
    thinking = bool(last.get("reasoning_content")) or chat_format.END_THINK in str(last.get("content") or "")
    if template is None:
        spans = chat_format.render(messages, tools, thinking=thinking)
    else:
        spans = chat_format.render_jinja(template, messages, tools, thinking=thinking)
    ids, mask = chat_format.encode_spans(tokenizer, spans)
    return np.asarray(ids, np.int32), np.asarray(mask, np.int32)


def pack(samples: list[tuple[np.ndarray, np.ndarray]], length: int, pad_id: int) -> dict[str, np.ndarray]:
    """Whole samples laid end to end in one row of ``length`` (they must fit; the caller cuts long ones).
    Padding: ``pad_id``, loss_mask 0, segment 0, positions counting from 0 (its own pseudo-sample)."""
    row = {k: np.zeros(length, np.int32) for k in FIELDS}
    row["tokens"][:] = pad_id
    at = 0
    for seg, (tok, mask) in enumerate(samples, start=1):
        n = len(tok)
        if at + n > length:
            raise ValueError(f"samples of {sum(len(t) for t, _ in samples)} tokens do not fit a row of {length}")
        row["tokens"][at:at + n], row["loss_mask"][at:at + n] = tok, mask
        row["positions"][at:at + n], row["segment_ids"][at:at + n] = np.arange(n), seg
        at += n
    row["positions"][at:] = np.arange(length - at)
    return row


def _in_validation(line: bytes, fraction: float) -> bool:
    h = int.from_bytes(hashlib.blake2b(line, digest_size=8).digest(), "little")
    return h / 2**64 < fraction


def read_chats(source: str, split: Literal["train", "validation"], val_fraction: float) -> list[tuple[str, bytes]]:
    """(``file:line``, raw JSON line) of every conversation of ``split`` in the JSONL file(s) ``source``."""
    import glob

    paths = sorted(glob.glob(str(Path(source).expanduser()), recursive=True))
    if Path(source).expanduser().is_dir():
        paths = sorted(str(p) for p in Path(source).expanduser().rglob("*.jsonl"))
    if not paths:
        raise DataError(f"data.source={source!r}: no JSONL file (chat data is one {{'messages': [...]}} per line)")
    out = []
    for p in paths:
        for n, line in enumerate(Path(p).read_bytes().splitlines(), start=1):
            if line.strip() and _in_validation(line, val_fraction) == (split == "validation"):
                out.append((f"{p}:{n}", line))
    if not out:
        raise DataError(f"data.source={source!r}: the {split} split is empty"
                        + (" (raise data.val_fraction, or set train.eval_every=0)" if split == "validation" else ""))
    return out


class ChatIterator:
    """Batches of packed chat rows (see the module docstring) with a checkpointable position."""

    def __init__(self, cfg: DataConfig, tokenizer: Tokenizer, batch_size: int,
                 split: Literal["train", "validation"] = "train", shard_index: int = 0, shard_count: int = 1) -> None:
        if batch_size <= 0 or not 0 <= shard_index < shard_count:
            raise DataError(f"batch_size={batch_size}, shard {shard_index} of {shard_count}: need batch_size > 0 "
                            f"and 0 ≤ shard_index < shard_count")
        self.cfg, self.tok, self.batch_size, self.split = cfg, tokenizer, batch_size, split
        self.lines = read_chats(cfg.source, split, cfg.val_fraction)[shard_index::shard_count]
        if not self.lines:
            raise DataError(f"data.source={cfg.source!r}: no {split} conversations for shard {shard_index} of "
                            f"{shard_count}")
        self.template = load_template(cfg)
        self.length = cfg.seq_len + 1
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
        self.meta = {"split": split, "shard_index": shard_index, "shard_count": shard_count, "seq_len": cfg.seq_len,
                     "seed": cfg.seed, "tokenizer": tokenizer.fingerprint, "template": cfg.chat_template,
                     "samples": len(self.lines)}
        self.epoch, self.index = 0, 0  # the next sample: position `index` of epoch `epoch`'s order
        self._order = self._make_order(0)
        self.truncated = 0

    def _make_order(self, epoch: int) -> np.ndarray:
        n = len(self.lines)
        if self.split != "train":
            return np.arange(n)
        return np.random.default_rng((self.cfg.seed, epoch)).permutation(n)

    def _peek(self) -> tuple[np.ndarray, np.ndarray]:
        where, line = self.lines[int(self._order[self.index])]
        try:
            sample = json.loads(line)
            if not isinstance(sample, dict) or not isinstance(sample.get("messages"), list):
                raise chat_format.ChatFormatError('expected {"messages": [...]}')
            tok, mask = encode_chat(self.tok, sample, self.template)
        except (json.JSONDecodeError, chat_format.ChatFormatError) as e:
            raise DataError(f"{where}: {e}") from None
        if len(tok) > self.length:
            self.truncated += 1
            if self.truncated == 1:
                log.warning("%s: %d tokens > data.seq_len + 1 = %d: cut (raise data.seq_len to keep such samples "
                            "whole)", where, len(tok), self.length)
            tok, mask = tok[:self.length], mask[:self.length]
        return tok, mask

    def _advance(self) -> None:
        self.index += 1
        if self.index == len(self._order):
            self.epoch, self.index = self.epoch + 1, 0
            self._order = self._make_order(self.epoch)

    def _row(self) -> dict[str, np.ndarray]:
        samples, used = [], 0
        while True:
            tok, mask = self._peek()
            if samples and used + len(tok) > self.length:
                break
            samples.append((tok, mask))
            used += len(tok)
            self._advance()
            if used == self.length:
                break
        return pack(samples, self.length, self.pad_id)

    def __iter__(self) -> ChatIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        rows = [self._row() for _ in range(self.batch_size)]
        return {k: np.stack([r[k] for r in rows]) for k in FIELDS}

    def get_state(self) -> dict[str, Any]:
        return {"format": STATE_FORMAT, **self.meta, "epoch": self.epoch, "index": self.index}

    def set_state(self, state: dict[str, Any]) -> None:
        if state.get("format") != STATE_FORMAT:
            raise DataError(f"data iterator state has format {state.get('format')!r}, expected {STATE_FORMAT!r}")
        diff = [f"{k}: saved {state.get(k)!r}, now {v!r}" for k, v in self.meta.items() if state.get(k) != v]
        if diff:
            raise DataError("chat data state does not match this data (" + "; ".join(diff) + ")")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self._make_order(self.epoch)


def make_iterator(cfg: DataConfig, tokenizer: Tokenizer, batch_size: int, split: Literal["train", "validation"]
                  = "train", shard_index: int = 0, shard_count: int = 1) -> ChatIterator:
    """The data contract (train.py ``--data-module``; chosen by ``data.format: chat``)."""
    return ChatIterator(cfg, tokenizer, batch_size, split, shard_index, shard_count)
