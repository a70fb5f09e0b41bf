"""Checkpoint I/O: FP8 block format, HF ↔ Orbax conversion round trip, logit checker CLI, bad input."""

from __future__ import annotations

import json
import shutil
import warnings

import jax
import ml_dtypes
import numpy as np
import pytest

from dsv3_jax import convert, fp8, logits
from dsv3_jax.config import ConfigError
from dsv3_jax.hf import CheckpointError, HFCheckpoint, load_hf
from dsv3_jax.safetensors_io import SafetensorsFile, write_safetensors
from tests.common import FIXTURES

TINY = FIXTURES / "tiny_yarn"


# ---------------------------------------------------------------------------------------------------------
# FP8 block (de)quantisation
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(128, 128), (160, 200), (40, 300), (257, 129)])
def test_fp8_block_roundtrip_error_bound(shape):
    rng = np.random.default_rng(0)
    w = rng.normal(size=shape).astype(np.float32) * rng.uniform(0.01, 10, size=(shape[0], 1)).astype(np.float32)
    q, scale_inv = fp8.quantize_blocks(w)
    assert q.dtype == np.dtype(ml_dtypes.float8_e4m3fn)
    assert scale_inv.shape == (-(-shape[0] // 128), -(-shape[1] // 128))  # ceil, edge blocks included
    back = fp8.dequantize_blocks(q, scale_inv)
    # E4M3 has 3 mantissa bits: relative rounding error ≤ 2^-4 for normals; subnormals are bounded by the
    # block's scale × the smallest subnormal step (2^-9).
    bound = np.maximum(np.abs(w) * 2.0 ** -4, fp8.expand_blocks(scale_inv, shape) * 2.0 ** -9 / 2)
    assert np.all(np.abs(back - w) <= bound * (1 + 1e-6))
    # The block max is represented exactly at 448.
    assert np.isclose(np.abs(q.astype(np.float32)).max(), 448.0)


def test_fp8_edge_blocks_use_their_own_scale():
    w = np.ones((130, 130), np.float32)
    w[128:, :] = 1000.0  # bottom edge block rows
    q, s = fp8.quantize_blocks(w)
    assert s.shape == (2, 2)
    np.testing.assert_allclose(s[0, 0], 1 / 448, rtol=1e-6)
    np.testing.assert_allclose(s[1, 0], 1000 / 448, rtol=1e-6)
    np.testing.assert_allclose(fp8.dequantize_blocks(q, s), w, rtol=1e-6)


def test_fp8_dequant_rejects_floor_grid():
    q, s = fp8.quantize_blocks(np.ones((200, 200), np.float32))
    with pytest.raises(ValueError, match=r"needs \(2, 2\)"):
        fp8.dequantize_blocks(q, s[:1, :1])


def test_fp8_checkpoint_dequantised_on_load():
    """The FP8 fixture loads to the block-dequantised values of its own tensors (edge blocks included)."""
    ck = HFCheckpoint(FIXTURES / "tiny_yarn_fp8")
    key = "model.layers.1.self_attn.kv_a_proj_with_mqa.weight"  # [40, 160]: one full + one edge column block
    raw = ck.files[ck.where[key]]
    q = raw.get(key)
    s = raw.get(key.replace(".weight", ".weight_scale_inv"))
    assert q.dtype == np.dtype(ml_dtypes.float8_e4m3fn) and s.shape == (1, 2)
    np.testing.assert_array_equal(ck.read(key), q.astype(np.float32) * np.repeat(np.repeat(s, 128, 0), 128, 1)[:40, :160])


# ---------------------------------------------------------------------------------------------------------
# Conversion round trip and CLIs
# ---------------------------------------------------------------------------------------------------------


def _tensors(d):
    ck = HFCheckpoint(d)
    return {k: np.asarray(ck.files[ck.where[k]].get(k)) for k in ck.keys()}


@pytest.mark.parametrize("fixture", ["tiny_yarn", "tiny_plainq"])
def test_convert_round_trip_is_exact(tmp_path, fixture):
    src = FIXTURES / fixture
    assert convert.main(["--hf-dir", str(src), "--out", str(tmp_path / "ckpt")]) == 0
    assert (tmp_path / "ckpt" / "config.yaml").exists()
    assert convert.main(["--checkpoint", str(tmp_path / "ckpt"), "--to-hf", str(tmp_path / "hf")]) == 0
    a, b = _tensors(src), _tensors(tmp_path / "hf")
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k
    # The exported config reloads to the same architecture.
    assert HFCheckpoint(tmp_path / "hf").model_config() == HFCheckpoint(src).model_config()


def test_convert_bf16_and_refuses_overwrite(tmp_path, capsys):
    out = tmp_path / "ckpt"
    assert convert.main(["--hf-dir", str(TINY), "--out", str(out), "--dtype", "bfloat16"]) == 0
    assert convert.main(["--hf-dir", str(TINY), "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err


def test_logit_checker_cli_matches_hf(tmp_path):
    out = tmp_path / "logits.npy"
    assert logits.main(["--hf-dir", str(TINY), "--tokens", str(TINY / "tokens.npy"), "--out", str(out)]) == 0
    got, gold = np.load(out), np.load(TINY / "logits.npy")
    assert got.dtype == np.float32 and got.shape == gold.shape
    assert np.abs(got - gold).max() / np.abs(gold).max() <= 1e-3
    # Same through an Orbax checkpoint.
    assert convert.main(["--hf-dir", str(TINY), "--out", str(tmp_path / "ckpt")]) == 0
    out2 = tmp_path / "logits2.npy"
    assert logits.main(["--checkpoint", str(tmp_path / "ckpt"), "--tokens", str(TINY / "tokens.npy"),
                        "--out", str(out2)]) == 0
    np.testing.assert_allclose(np.load(out2), got, rtol=1e-5, atol=1e-5)


def test_logit_checker_rejects_bad_tokens(tmp_path, capsys):
    bad = tmp_path / "t.npy"
    np.save(bad, np.array([[0, 1, 100000]], np.int32))
    assert logits.main(["--hf-dir", str(TINY), "--tokens", str(bad), "--out", str(tmp_path / "o.npy")]) == 2
    assert "token ids must be in [0, 320)" in capsys.readouterr().err
    np.save(bad, np.zeros((3,), np.float32))
    assert logits.main(["--hf-dir", str(TINY), "--tokens", str(bad), "--out", str(tmp_path / "o.npy")]) == 2
    assert not (tmp_path / "o.npy").exists()


# ---------------------------------------------------------------------------------------------------------
# Bad input: one clear error naming the tensor/field; nothing half-written
# ---------------------------------------------------------------------------------------------------------


def _copy_with(tmp_path, edit_tensors=None, edit_config=None):
    d = tmp_path / "bad"
    shutil.copytree(TINY, d)
    if edit_tensors:
        t = {k: np.array(v) for k, v in _tensors(TINY).items()}
        edit_tensors(t)
        (d / "model.safetensors").unlink()
        write_safetensors(d / "model.safetensors", t)
    if edit_config:
        cfg = json.loads((d / "config.json").read_text())
        edit_config(cfg)
        (d / "config.json").write_text(json.dumps(cfg))
    return d


def _convert_fails(tmp_path, d, match, capsys):
    out = tmp_path / "out"
    rc = convert.main(["--hf-dir", str(d), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and match in err, err
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))  # nothing half-written


def test_missing_tensor_named(tmp_path, capsys):
    d = _copy_with(tmp_path, edit_tensors=lambda t: t.pop("model.layers.2.mlp.experts.5.up_proj.weight"))
    _convert_fails(tmp_path, d, "missing tensors: model.layers.2.mlp.experts.5.up_proj.weight", capsys)


def test_extra_tensor_named(tmp_path, capsys):
    def add(t):
        t["model.layers.7.self_attn.o_proj.weight"] = np.zeros((4, 4), np.float32)
    d = _copy_with(tmp_path, edit_tensors=add)
    _convert_fails(tmp_path, d, "unexpected tensors", capsys)
    with pytest.raises(CheckpointError, match=r"model\.layers\.7\.self_attn\.o_proj\.weight"):
        load_hf(d)
    load_hf(d, strict=False)  # allowed when asked


def test_wrong_shape_named(tmp_path, capsys):
    def bad(t):
        t["model.layers.0.self_attn.kv_b_proj.weight"] = np.zeros((7, 32), np.float32)
    d = _copy_with(tmp_path, edit_tensors=bad)
    _convert_fails(tmp_path, d, "'model.layers.0.self_attn.kv_b_proj.weight' has shape [7, 32], expected [112, 32]",
                   capsys)


def test_unsupported_dtype_named(tmp_path):
    d = _copy_with(tmp_path)
    (d / "model.safetensors").unlink()
    t = _tensors(TINY)
    write_safetensors(d / "model.safetensors", t)
    # Patch the header's dtype code to one we do not read (complex64 is not a checkpoint dtype).
    raw = (d / "model.safetensors").read_bytes()
    raw = raw.replace(b'"model.norm.weight":{"dtype":"F32"', b'"model.norm.weight":{"dtype":"C64"')
    (d / "model.safetensors").write_bytes(raw)
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight.*C64"):
        load_hf(d)


def test_unknown_config_field_named(tmp_path):
    d = _copy_with(tmp_path, edit_config=lambda c: c.update(n_routed_experts_typo=3))
    with pytest.raises(ConfigError, match="n_routed_experts_typo.*Did you mean 'n_routed_experts'"):
        load_hf(d)


def test_missing_mtp_layers_load_main_model_with_warning():
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        variables, cfg = load_hf(FIXTURES / "hf_save_pretrained")
    assert cfg.num_nextn_predict_layers == 0 and "mtp_0" not in variables["params"]
    assert any("no tensors for MTP layer 1" in str(x.message) for x in w)


def test_safetensors_reader_is_lazy_and_exact(tmp_path):
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    b = np.array([1.5, -2.0], dtype=ml_dtypes.bfloat16)
    write_safetensors(tmp_path / "x.safetensors", {"a": a, "b": b})
    f = SafetensorsFile(tmp_path / "x.safetensors")
    assert f.shape("a") == (3, 4) and f.dtype("b") == np.dtype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(f.get("a"), a)
    np.testing.assert_array_equal(f.get("b"), b)


def test_malformed_safetensors_named(tmp_path):
    """Issue 24: a damaged header length or tensor range is a SafetensorsError naming the file (and tensor),
    never a MemoryError or a reshape error."""
    from dsv3_jax.safetensors_io import SafetensorsError

    good = tmp_path / "good.safetensors"
    write_safetensors(good, {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(4, np.float32)})
    raw = good.read_bytes()
    n = int.from_bytes(raw[:8], "little")

    huge = tmp_path / "huge.safetensors"
    huge.write_bytes((2**60).to_bytes(8, "little") + raw[8:])
    with pytest.raises(SafetensorsError, match=r"huge\.safetensors: header length 1152921504606846976 runs past"):
        SafetensorsFile(huge)

    truncated = tmp_path / "trunc.safetensors"
    truncated.write_bytes(raw[:-8])  # the last tensor's bytes are cut
    with pytest.raises(SafetensorsError, match=r"trunc\.safetensors: tensor '(a|b)' has data_offsets .* truncated"):
        SafetensorsFile(truncated)

    header = json.loads(raw[8:8 + n])
    header["a"]["data_offsets"] = [0, 10**9]
    blob = json.dumps(header).encode()
    past = tmp_path / "past.safetensors"
    past.write_bytes(len(blob).to_bytes(8, "little") + blob + raw[8 + n:])
    with pytest.raises(SafetensorsError, match=r"past\.safetensors: tensor 'a' has data_offsets \[0, 1000000000\]"):
        SafetensorsFile(past)
    np.testing.assert_array_equal(SafetensorsFile(good).get("a"), np.arange(6).reshape(2, 3))


def test_damaged_params_checkpoint_is_refused(tmp_path):
    """Issue 24: a params checkpoint (convert's output, what serve.py loads) verifies checksums.json on load:
    4 KB garbled in a data file → DamagedCheckpoint naming the directory and arrays; a truncated file → one too."""
    from dsv3_jax.params_io import DamagedCheckpoint, load_variables, save_variables
    from tests.common import random_variables, tiny_config

    cfg = tiny_config()
    variables = random_variables(cfg)
    out = save_variables(tmp_path / "p", variables, cfg)
    back, _ = load_variables(out)
    assert all(np.array_equal(a, b) for a, b in zip(*(map(np.asarray, jax.tree.leaves(t)) for t in (variables, back)),
                                                   strict=True))
    data = max((p for p in (out / "variables").rglob("*") if p.is_file() and p.parent.name == "d"),
               key=lambda p: p.stat().st_size)
    raw = data.read_bytes()
    with open(data, "r+b") as f:
        f.seek(len(raw) // 2)
        f.write(np.random.default_rng(0).bytes(4096))
    # Garbled bytes land in raw array data (→ checksum mismatch) or in a chunk the reader can no longer decode.
    with pytest.raises(DamagedCheckpoint, match=r"p(: the data in \S+/variables does not match checksums.json "
                                                r"\(arrays| cannot be read)"):
        load_variables(out)
    data.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DamagedCheckpoint, match=r"cannot be read .*missing, truncated or corrupt"):
        load_variables(out)


def test_checksums_catch_any_one_changed_element():
    """Every element's weight is odd, so changing any one element (here its lowest bit) changes the checksum;
    equal arrays give equal sums."""
    from dsv3_jax import checksum

    rng = np.random.default_rng(0)
    tree = {"f32": rng.normal(size=(3, 5, 7)).astype(np.float32),
            "bf16": rng.normal(size=(64,)).astype(ml_dtypes.bfloat16),
            "u32": rng.integers(0, 2**32, size=(4, 4), dtype=np.uint32), "b": rng.random(9) > 0.5}
    base = checksum.checksums(tree)
    assert base == checksum.checksums({k: v.copy() for k, v in tree.items()})
    for name, arr in tree.items():
        for i in (0, arr.size // 2, arr.size - 1):
            bits = arr.copy().view(np.uint8 if arr.dtype == np.bool_ else f"u{arr.dtype.itemsize}").reshape(-1)
            bits[i] ^= 1
            changed = dict(tree, **{name: bits.view(arr.dtype).reshape(arr.shape)})
            assert checksum.mismatches(changed, base) == [name], (name, i)
