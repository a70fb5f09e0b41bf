"""Data pipeline: corpus sources and split, tokenizer, FIM, packing, shuffling, sharding, resume."""

from __future__ import annotations

import dataclasses
import json
import textwrap
import warnings
from pathlib import Path

import grain
import numpy as np
import pytest
import tokenizers

from dsv3_jax.config import DataConfig
from dsv3_jax.data import (
    SPECIAL_TOKENS,
    DataError,
    PackIterDataset,
    Tokenizer,
    encode_document,
    fim_split_points,
    load_corpus,
    load_tokenizer,
    make_iterator,
    train_bpe,
)
from dsv3_jax.data.tokenizer import BOS, EOS, FIM_BEGIN, FIM_END, FIM_HOLE, PAD

SAMPLE = "def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n    y: int = 0\n" * 20
CODE = Path(textwrap.__file__).read_text()  # ~20 KB of real Python: enough pairs for a few hundred merges


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(train_bpe([CODE, SAMPLE, "hello world, héllo wörld ✓\n"], 320), "test")


def _docs_dir(root: Path, n: int) -> Path:
    """``n`` text files, each one short document with a unique marker line."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (root / f"doc{i:03d}.txt").write_text(f"document {i:03d}\nx = {i} + 1\n")
    return root


def _cfg(tmp_path: Path, source: Path | str, **kw: object) -> DataConfig:
    base = {"source": str(source), "seq_len": 15, "fim_rate": 0.0, "val_fraction": 0.0,
            "cache_dir": str(tmp_path / "cache")}
    return DataConfig(**{**base, **kw})  # type: ignore[arg-type]


def _documents(tok: Tokenizer, batches: list[dict[str, np.ndarray]]) -> list[str]:
    """Decode a stream of batches back into its documents (split at EOS; the last may be partial)."""
    flat = np.concatenate([b["tokens"].reshape(-1) for b in batches]).tolist()
    docs, cur = [], []
    for t in flat:
        if t == tok.eos_id:
            docs.append(tok.decode(cur))
            cur = []
        else:
            cur.append(t)
    return docs


def _take(it, n: int) -> list[dict[str, np.ndarray]]:
    return [next(it) for _ in range(n)]


# ----------------------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------------------


def test_tokenizer_round_trip_and_special_ids(tok: Tokenizer) -> None:
    assert (tok.bos_id, tok.eos_id, tok.fim_begin_id, tok.fim_hole_id, tok.fim_end_id, tok.pad_id) == (0, 1, 2, 3, 4, 5)
    assert SPECIAL_TOKENS == (BOS, EOS, FIM_BEGIN, FIM_HOLE, FIM_END, PAD)
    assert tok.vocab_size == 320 and tok.has_fim
    for text in [SAMPLE, "héllo wörld ✓ — 日本語 \t\r\n  trailing  ", "", "\x00\x01 bytes"]:
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text
    assert len(tok.encode(CODE)) < 0.8 * len(CODE.encode())  # merges were learned
    # A document that spells a special token gets plain text ids; prompts may opt in.
    assert tok.eos_id not in tok.encode(f"a{EOS}b")
    assert tok.encode(EOS, allow_special=True) == [tok.eos_id]
    assert tok.decode([tok.fim_begin_id, *tok.encode("x"), tok.eos_id]) == f"{FIM_BEGIN}x{EOS}"
    assert tok.decode([tok.fim_begin_id, *tok.encode("x")], skip_special=True) == "x"


def test_tokenizer_from_file_finds_specials_by_name(tmp_path: Path, tok: Tokenizer) -> None:
    tok.save(tmp_path / "ours.json")
    again = Tokenizer.from_file(tmp_path / "ours.json")
    assert again.encode(SAMPLE) == tok.encode(SAMPLE) and again.fim_end_id == tok.fim_end_id

    hf = tokenizers.Tokenizer(tokenizers.models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    hf.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    hf.add_special_tokens(["</s>", "<|fim▁begin|>"])  # ASCII-bar spelling, and only one of the three FIM tokens
    hf.save(str(tmp_path / "plain.json"))
    plain = Tokenizer.from_file(tmp_path / "plain.json")
    assert plain.eos_id == 3 and plain.fim_begin_id == 4 and not plain.has_fim and plain.bos_id is None

    hf_no_eos = tokenizers.Tokenizer(tokenizers.models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    hf_no_eos.save(str(tmp_path / "no_eos.json"))
    with pytest.raises(DataError, match="no end-of-sentence token"):
        Tokenizer.from_file(tmp_path / "no_eos.json")
    with pytest.raises(DataError, match="no such file"):
        Tokenizer.from_file(tmp_path / "missing.json")

    # FIM requested with a tokenizer that lacks it: one clear warning, no FIM ids in the stream.
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("a b a b\n" * 50)
    cfg = _cfg(tmp_path, tmp_path / "d", fim_rate=1.0, tokenizer=str(tmp_path / "plain.json"))
    with pytest.warns(UserWarning, match="no FIM tokens"):
        it = make_iterator(cfg, load_tokenizer(cfg), 2)
    assert not np.isin(next(it)["tokens"], [4]).any()


def test_tokenizer_is_trained_once_and_cached(tmp_path: Path) -> None:
    src = _docs_dir(tmp_path / "docs", 3)
    (src / "code.py").write_text(CODE)
    cfg = _cfg(tmp_path, src, tokenizer_vocab_size=300)
    first = load_tokenizer(cfg)
    cached = list((tmp_path / "cache" / "tokenizers").glob("*.json"))
    assert len(cached) == 1 and first.name == str(cached[0])
    again = load_tokenizer(cfg)
    assert again.name == first.name and again.fingerprint == first.fingerprint
    other = load_tokenizer(dataclasses.replace(cfg, tokenizer_vocab_size=290))  # a new key retrains
    assert other.name != first.name and other.vocab_size == 290
    with pytest.raises(DataError, match="tokenizer_vocab_size=100"):
        load_tokenizer(dataclasses.replace(cfg, tokenizer_vocab_size=100))


def test_stdlib_tokenizer_trains_offline(tmp_path: Path) -> None:
    cfg = DataConfig(cache_dir=str(tmp_path), tokenizer_vocab_size=1024, tokenizer_train_bytes=1_000_000)
    tok = load_tokenizer(cfg)
    assert tok.vocab_size == 1024 and tok.has_fim and tok.eos_id == 1
    code = "import os\n\ndef main() -> None:\n    print(os.getcwd())\n"
    assert tok.decode(tok.encode(code)) == code and len(tok.encode(code)) < len(code) / 2


# ----------------------------------------------------------------------------------------------------------
# FIM
# ----------------------------------------------------------------------------------------------------------


def test_fim_psm_layout(tok: Tokenizer) -> None:
    ids = encode_document(tok, "abcdef", (2, 4))
    assert ids.dtype == np.int32
    assert ids.tolist() == [tok.fim_begin_id, *tok.encode("ab"), tok.fim_hole_id, *tok.encode("ef"),
                            tok.fim_end_id, *tok.encode("cd"), tok.eos_id]
    assert tok.decode(ids) == f"{FIM_BEGIN}ab{FIM_HOLE}ef{FIM_END}cd{EOS}"
    assert encode_document(tok, "abcdef").tolist() == [*tok.encode("abcdef"), tok.eos_id]
    assert tok.decode(encode_document(tok, "abcdef", (0, 6))) == f"{FIM_BEGIN}{FIM_HOLE}{FIM_END}abcdef{EOS}"


def test_fim_rate_and_determinism() -> None:
    def points(rate: float, seed: int) -> list[tuple[int, int] | None]:
        return [fim_split_points(10, np.random.default_rng((seed, i)), rate) for i in range(200)]

    assert all(p is None for p in points(0.0, 0))
    ones = points(1.0, 0)
    assert all(p is not None and 0 <= p[0] <= p[1] <= 10 for p in ones)
    assert len(set(ones)) > 20  # cuts vary by document
    assert points(1.0, 0) == ones and points(1.0, 1) != ones
    half = points(0.5, 0)
    assert 60 < sum(p is not None for p in half) < 140
    # The rate only decides whether to cut, never where: the same documents get the same cuts.
    assert all(h == o for h, o in zip(half, ones, strict=True) if h is not None)


def test_fim_in_pipeline(tmp_path: Path, tok: Tokenizer) -> None:
    src = _docs_dir(tmp_path / "docs", 12)
    never = np.concatenate([b["tokens"] for b in _take(make_iterator(_cfg(tmp_path, src), tok, 2), 10)])
    assert not np.isin(never, [tok.fim_begin_id, tok.fim_hole_id, tok.fim_end_id]).any()
    always = _take(make_iterator(_cfg(tmp_path, src, fim_rate=1.0), tok, 2), 10)
    docs = _documents(tok, always)[:-1]
    assert len(docs) > 5
    for d in docs:  # every document is PSM and holds exactly the characters of one source document
        assert d.startswith(FIM_BEGIN) and d.count(FIM_HOLE) == 1 and d.count(FIM_END) == 1
        prefix, rest = d[len(FIM_BEGIN):].split(FIM_HOLE)
        suffix, middle = rest.split(FIM_END)
        assert (prefix + middle + suffix).startswith("document ")
    assert _documents(tok, _take(make_iterator(_cfg(tmp_path, src, fim_rate=1.0), tok, 2), 10))[:-1] == docs


# ----------------------------------------------------------------------------------------------------------
# Packing
# ----------------------------------------------------------------------------------------------------------


def test_packing_known_ids() -> None:
    docs = [np.array(d, np.int32) for d in ([10, 11, 1], [12, 1], [13, 14, 15, 16, 1], [17, 1])]
    ds = PackIterDataset(grain.MapDataset.source(docs).to_iter_dataset(grain.ReadOptions(num_threads=0)), 4)
    assert [w["tokens"].tolist() for w in ds] == [[10, 11, 1, 12], [1, 13, 14, 15], [16, 1, 17, 1]]
    ds = PackIterDataset(grain.MapDataset.source(docs).to_iter_dataset(grain.ReadOptions(num_threads=0)), 5)
    assert [w["tokens"].tolist() for w in ds] == [[10, 11, 1, 12, 1], [13, 14, 15, 16, 1]]  # partial [17, 1] dropped


def test_packing_known_strings(tmp_path: Path, tok: Tokenizer) -> None:
    src = tmp_path / "s.jsonl"
    texts = ["alpha beta", "x = 1\n", "héllo wörld ✓ " * 3, "last"]
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    cfg = _cfg(tmp_path, src, seq_len=7)
    stream = [i for t in texts for i in [*tok.encode(t), tok.eos_id]]
    expected = np.array(stream[: len(stream) // 8 * 8], np.int32).reshape(-1, 8)
    # Validation keeps corpus order (here: every record, val_fraction ~1): the exact concatenate-and-chunk
    # windows of seq_len + 1 tokens, EOS between documents, the partial window and batch dropped.
    val_cfg = dataclasses.replace(cfg, val_fraction=0.999999)
    batches = list(make_iterator(val_cfg, tok, 2, "validation"))
    got = np.concatenate([b["tokens"] for b in batches])
    assert all(b["tokens"].shape == (2, 8) and b["tokens"].dtype == np.int32 for b in batches)
    assert got.tolist() == expected[: len(expected) // 2 * 2].tolist()
    assert (got == tok.eos_id).sum() >= 2


# ----------------------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------------------


def test_text_sources(tmp_path: Path) -> None:
    d = tmp_path / "d"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text("A text")
    (d / "sub" / "b.py").write_text("print('b')\n")
    (d / "c.md").write_text("# C\n")
    (d / "skip.bin").write_bytes(b"\x00\x01")
    (d / "empty.txt").write_text("")
    assert sorted(load_corpus(str(d), "all")[i] for i in range(3)) == ["# C\n", "A text", "print('b')\n"]
    assert len(load_corpus(str(d), "all")) == 3
    assert [load_corpus(str(d / "a.txt"), "all")[0]] == ["A text"]
    globbed = load_corpus(str(d / "**" / "*.py"), "all")
    assert len(globbed) == 1 and globbed[0] == "print('b')\n"
    # A big single file is cut at line boundaries into documents that add back up to the file.
    big = "".join(f"line {i} " + "x" * 50 + "\n" for i in range(4000))
    (tmp_path / "big.txt").write_text(big)
    c = load_corpus(str(tmp_path / "big.txt"), "all")
    chunks = [c[i] for i in range(len(c))]
    assert len(chunks) > 3 and "".join(chunks) == big and all(ch.endswith("\n") for ch in chunks)
    train, val = (load_corpus(str(tmp_path / "big.txt"), s, 0.3) for s in ("train", "validation"))
    assert len(train) + len(val) == len(c) and len(train) > 0 and len(val) > 0


def test_source_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file or directory"):
        load_corpus(str(tmp_path / "nope"))
    with pytest.raises(DataError, match="glob matched no files"):
        load_corpus(str(tmp_path / "*.jsonl"))
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "x.bin").write_bytes(b"1")
    with pytest.raises(DataError, match="directory has no"):
        load_corpus(str(tmp_path / "e"))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="hold no documents"):
        load_corpus(str(tmp_path / "empty.txt"))
    with pytest.raises(DataError, match="val_fraction"):
        load_corpus("stdlib", "train", 1.0)


def test_jsonl_source_and_errors(tmp_path: Path, tok: Tokenizer) -> None:
    good = tmp_path / "good.jsonl"
    good.write_text('{"text": "one", "id": 1}\n\n{"text": "two ✓"}\n')
    c = load_corpus(str(good), "all")
    assert [c[0], c[1]] == ["one", "two ✓"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": "broken\n{"body": "x"}\n{"text": 3}\n')
    c = load_corpus(str(bad), "all")
    assert c[0] == "ok"
    with pytest.raises(DataError, match=rf"{bad}:2: invalid JSON"):
        c[1]
    with pytest.raises(DataError, match=rf"{bad}:3: no 'text' field \(got keys \['body'\]\)"):
        c[2]
    with pytest.raises(DataError, match=rf"{bad}:4: 'text' is a int"):
        c[3]
    # The error surfaces through the pipeline unchanged.
    with pytest.raises(DataError, match=rf"{bad}:\d: "):
        _take(make_iterator(_cfg(tmp_path, bad, seq_len=3), tok, 1), 20)


def test_array_record_source(tmp_path: Path) -> None:
    ar = pytest.importorskip("array_record.python.array_record_module")
    path = tmp_path / "d.array_record"
    w = ar.ArrayRecordWriter(str(path), "group_size:1")
    for rec in [b"plain text", json.dumps({"text": "from json"}).encode(), b"{not json"]:
        w.write(rec)
    w.close()
    c = load_corpus(str(path), "all")
    assert [c[i] for i in range(3)] == ["plain text", "from json", "{not json"]


def test_train_validation_split_is_disjoint_by_file() -> None:
    train, val = load_corpus("stdlib", "train"), load_corpus("stdlib", "validation")
    files = {f.path for f in train.files if f.size}  # empty files hold no document
    train_files = {train.location(i).split(" (")[0] for i in range(len(train))}
    val_files = {val.location(i).split(" (")[0] for i in range(len(val))}
    assert not train_files & val_files and train_files | val_files == files
    assert all(p.endswith(".py") and "site-packages" not in p for p in files)
    assert 0.02 < len(val_files) / len(files) < 0.1  # val_fraction 0.05
    assert "os.py" in {Path(p).name for p in files}
    assert load_corpus("stdlib", "train").fingerprint == train.fingerprint  # listing is deterministic


# ----------------------------------------------------------------------------------------------------------
# Shuffle, sharding, resume
# ----------------------------------------------------------------------------------------------------------


def test_shuffle_is_seeded_and_changes_each_epoch(tmp_path: Path, tok: Tokenizer) -> None:
    src = _docs_dir(tmp_path / "docs", 10)
    cfg = _cfg(tmp_path, src, seq_len=63)
    docs = _documents(tok, _take(make_iterator(cfg, tok, 2), 12))
    assert len(docs) > 30
    epoch0, epoch1 = docs[:10], docs[10:20]
    assert sorted(epoch0) == sorted(epoch1) == sorted(load_corpus(str(src), "all")[i] for i in range(10))
    assert epoch0 != epoch1 and epoch0 != sorted(epoch0)
    assert _documents(tok, _take(make_iterator(cfg, tok, 2), 12)) == docs
    assert _documents(tok, _take(make_iterator(dataclasses.replace(cfg, seed=1), tok, 2), 12))[:10] != epoch0


def test_shards_are_disjoint(tmp_path: Path, tok: Tokenizer) -> None:
    src = _docs_dir(tmp_path / "docs", 11)
    cfg = _cfg(tmp_path, src, seq_len=63)
    shard_docs = [set(_documents(tok, _take(make_iterator(cfg, tok, 2, "train", i, 2), 6))) for i in range(2)]
    assert not shard_docs[0] & shard_docs[1]
    assert shard_docs[0] | shard_docs[1] == {load_corpus(str(src), "all")[i] for i in range(11)}
    with pytest.raises(DataError, match="shard_index=2"):
        make_iterator(cfg, tok, 2, "train", 2, 2)
    with pytest.raises(DataError, match="none for shard 11 of 12"):
        make_iterator(cfg, tok, 2, "train", 11, 12)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_exactly(tmp_path: Path, tok: Tokenizer, num_workers: int) -> None:
    (tmp_path / "d").mkdir()
    for i in range(6):  # documents of varied length, so saved states fall mid-document
        (tmp_path / "d" / f"{i}.py").write_text(SAMPLE[: 40 + 97 * i] + f"# {i}\n")
    cfg = _cfg(tmp_path, tmp_path / "d", fim_rate=0.5, num_workers=num_workers)
    straight = _take(make_iterator(cfg, tok, 3), 40)
    offsets = []
    for n in (0, 7, 23):
        it = make_iterator(cfg, tok, 3)
        _take(it, n)
        state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
        offsets.append(state["grain"]["offset"])
        resumed = make_iterator(cfg, tok, 3)
        resumed.set_state(state)
        for k in range(n, n + 5):
            np.testing.assert_array_equal(next(resumed)["tokens"], straight[k]["tokens"])
    assert any(o > 0 for o in offsets)  # some resume points fall inside a document
    with pytest.raises(DataError, match="seq_len: saved 15, now 31"):
        make_iterator(dataclasses.replace(cfg, seq_len=31), tok, 3).set_state(state)


def test_validation_is_finite_and_resumable(tmp_path: Path, tok: Tokenizer) -> None:
    src = _docs_dir(tmp_path / "docs", 40)
    cfg = _cfg(tmp_path, src, val_fraction=0.5)
    full = list(make_iterator(cfg, tok, 2, "validation"))
    assert len(full) > 3 and [b["tokens"].tolist() for b in full] == [
        b["tokens"].tolist() for b in make_iterator(cfg, tok, 2, "validation")]
    it = make_iterator(cfg, tok, 2, "validation")
    _take(it, 2)
    resumed = make_iterator(cfg, tok, 2, "validation")
    resumed.set_state(it.get_state())
    assert [b["tokens"].tolist() for b in resumed] == [b["tokens"].tolist() for b in full[2:]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(DataError, match="split 'validation' has 0 documents"):
            make_iterator(dataclasses.replace(cfg, val_fraction=0.0), tok, 2, "validation")
