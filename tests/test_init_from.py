"""train.init_from: a run starts from a trainer run dir, an Orbax params checkpoint or an HF directory, and its
first loss is the source model's loss on the same batch (the weights arrive unchanged, fresh optimizer, step 0).

One source checkpoint (the test model at seed 3, saved as a run saves it) is exported both ways; the three fine-tune starts share one
compiled step (same model config, same batch shape).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from dsv3_jax.config import ConfigError
from dsv3_jax.hf import save_hf
from dsv3_jax.model import Transformer
from dsv3_jax.params_io import save_variables
from dsv3_jax.training.checkpoint import Checkpointer, restore_params
from dsv3_jax.training.init_from import initialize_from, inspect_source, resolve_config
from dsv3_jax.training.loss import compute_losses
from dsv3_jax.training.step import init_state, train_step
from tests.test_training import tiny_cfg


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    d = tmp_path_factory.mktemp("init_from")
    cfg = tiny_cfg(d / "run")
    # A trainer checkpoint without training (no step compile here): seed 3's init, saved as a run would save it.
    ck = Checkpointer(d / "run" / "checkpoints", async_save=False)
    ck.save(init_state(cfg, seed=3)._replace(step=np.int64(5)), {"index": 5}, cfg)
    ck.close()
    variables, saved = restore_params(d / "run")
    save_variables(d / "params", variables, saved.model)
    save_hf(variables, saved.model, d / "hf")
    (d / "tok.json").write_text("{}")  # a stand-in path: these tests never tokenize
    return d, variables, saved


@pytest.fixture(scope="module")
def batch():
    return np.random.default_rng(1).integers(0, 256, (1, 4, 17)).astype(np.int32)


def source_loss(variables, model_cfg, tokens, cfg) -> float:
    """The source model's training loss on ``tokens`` [1, B, T+1], computed directly from its variables."""
    out = Transformer(model_cfg).apply(variables, tokens[0, :, :-1])
    return float(compute_losses(out, tokens[0], cfg.train.mtp_lambda, cfg.train.balance_alpha).total)


@pytest.mark.parametrize("kind", ["run", "params", "hf"])
def test_first_loss_equals_source_loss(sources, batch, kind, tmp_path):
    d, variables, saved = sources
    # No model keys in the fine-tune config: the architecture comes from the checkpoint.
    cfg = tiny_cfg(tmp_path / "ft", f"train.init_from={d / kind}", "data.tokenizer=" + str(d / "tok.json"))
    cfg, src = resolve_config(cfg)
    assert src.kind == kind and cfg.model == saved.model
    state = initialize_from(init_state(cfg), src, cfg.model)
    assert int(state.step) == 0 and int(state.tokens_seen) == 0
    # Fresh AdamW: count 0, zero moments (every optimizer leaf is zero).
    assert all(float(abs(x).max()) == 0 for x in jax.tree.leaves(state.opt_state))
    want = source_loss(variables, saved.model, batch, cfg)
    _, m = train_step(state, batch, cfg)
    # Same params, same arithmetic (float32 export, float32 master weights): equal up to XLA's op-order freedom
    # between the jitted step and the eager apply (a few ulp of a ~5.5 loss).
    np.testing.assert_allclose(float(m["loss"]), want, rtol=1e-6)


def test_model_comes_from_checkpoint_and_clashes_are_named(sources, tmp_path):
    d, _, saved = sources
    cfg = tiny_cfg(tmp_path / "ft", f"train.init_from={d / 'hf'}", "model.hidden_size=64",
                   "data.tokenizer=" + str(d / "tok.json"))
    with pytest.raises(ConfigError, match=r"model.hidden_size: config 64, checkpoint \d+"):
        resolve_config(cfg)
    # Run-time choices stay the run's: bfloat16 compute on the checkpoint's architecture.
    cfg = tiny_cfg(tmp_path / "ft", f"train.init_from={d / 'params'}", "model.dtype=bfloat16", "model.remat=full")
    cfg2, _ = resolve_config(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, hidden_size=7168)))
    assert cfg2.model.dtype == "bfloat16" and cfg2.model.remat == "full"
    assert cfg2.model.hidden_size == saved.model.hidden_size


def test_tokenizer_comes_with_the_checkpoint(sources, tmp_path):
    d, _, _ = sources
    cfg = tiny_cfg(tmp_path / "ft", f"train.init_from={d / 'hf'}")
    with pytest.raises(ConfigError, match="data.tokenizer=PATH"):  # an HF export without tokenizer.json
        resolve_config(cfg)
    hf2 = tmp_path / "hf2"
    import shutil

    shutil.copytree(d / "hf", hf2)
    (hf2 / "tokenizer.json").write_text("{}")
    cfg2, _ = resolve_config(tiny_cfg(tmp_path / "ft", f"train.init_from={hf2}"))
    assert cfg2.data.tokenizer == str(hf2 / "tokenizer.json")
    cfg3, _ = resolve_config(tiny_cfg(tmp_path / "ft", f"train.init_from={hf2}", "data.tokenizer=mine.json"))
    assert cfg3.data.tokenizer == "mine.json"  # an explicit data.tokenizer wins
    # A run without tokenizer.json: its own data section makes the tokenizer (train.py: source_tokenizer).
    cfg4, src = resolve_config(tiny_cfg(tmp_path / "ft", f"train.init_from={d / 'run'}"))
    assert src.data is not None and cfg4.data.tokenizer is None


def test_bad_source_is_a_config_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises((ConfigError, FileNotFoundError)):
        inspect_source(tmp_path / "empty")
    with pytest.raises(ConfigError, match="no such directory"):
        inspect_source(tmp_path / "nope")


def test_hf_ue8m0_scale_format_sets_pow2_scales():
    from dsv3_jax.config import model_config_from_hf, model_config_to_hf
    from tests.common import tiny_config

    hf = model_config_to_hf(tiny_config())
    assert not model_config_from_hf(hf).fp8_pow2_scales
    hf["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0",
                                 "weight_block_size": [128, 128]}
    assert model_config_from_hf(hf).fp8_pow2_scales
