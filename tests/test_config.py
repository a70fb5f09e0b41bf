"""Config loading: YAML, dotted overrides, helpful errors, HF config.json both ways."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from dsv3_jax.config import (
    Config,
    ConfigError,
    ModelConfig,
    load_config,
    model_config_from_hf,
    model_config_to_hf,
    save_config,
)

CONFIGS = Path(__file__).parent.parent / "configs"


@pytest.mark.parametrize("name", ["tiny", "bench_1gpu", "deepseek_v3_671b", "deepseek_v3_671b_ext32k",
                                  "deepseek_v3_671b_ext128k"])
def test_shipped_configs_load(name):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert isinstance(cfg, Config) and isinstance(cfg.model, ModelConfig)


def test_671b_is_the_official_model():
    m = load_config(CONFIGS / "deepseek_v3_671b.yaml").model
    # ModelConfig's defaults are the released checkpoint's values; pre-training differs only in running at 4K with
    # plain RoPE (YaRN comes with the context extension, REFERENCE §3).
    assert m.rope_scaling is None and m.max_position_embeddings == 4096
    assert dataclasses.replace(m, remat="none", rope_scaling=ModelConfig().rope_scaling,
                               max_position_embeddings=163840) == ModelConfig()
    counts = m.param_counts()
    assert round(counts["total"] / 1e9) == 671  # README_WEIGHTS: 671B
    assert 36e9 < counts["active"] < 38e9  # 37B activated
    assert m.latent_cache_dim == 576


def test_overrides_and_types(tmp_path):
    cfg = load_config(CONFIGS / "tiny.yaml", ["train.steps=7", "model.q_lora_rank=null", "run_dir=runs/x",
                                             "model.dtype=bfloat16", "train.lr=1e-3"])
    assert cfg.train.steps == 7 and cfg.model.q_lora_rank is None and cfg.run_dir == "runs/x"
    assert cfg.train.lr == 1e-3 and cfg.model.dtype == "bfloat16"
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


@pytest.mark.parametrize("override,match", [
    ("train.stepz=3", r"unknown config key 'train.stepz'.*Did you mean 'steps'"),
    ("modle.hidden_size=3", r"unknown config key 'modle'.*Did you mean 'model'"),
    ("train.steps=abc", r"train.steps='abc': expected int"),
    ("model.dtype=float16", r"model.dtype='float16': must be one of 'float32', 'bfloat16'"),
    ("model.n_group=3", r"n_routed_experts=16 is not divisible by model.n_group=3"),
    ("train.steps", r"must look like key=value"),
])
def test_override_errors(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(CONFIGS / "tiny.yaml", [override])


def test_missing_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("nope.yaml")


def test_hf_round_trip():
    m = load_config(CONFIGS / "deepseek_v3_671b.yaml").model
    hf = json.loads(json.dumps(model_config_to_hf(m)))
    back = model_config_from_hf(hf, dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat)
    assert back == m


def test_hf_unknown_field_and_unsupported_values():
    base = model_config_to_hf(ModelConfig())
    with pytest.raises(ConfigError, match="unknown HF config field 'kv_lora_rnk'"):
        model_config_from_hf({**base, "kv_lora_rnk": 3})
    with pytest.raises(ConfigError, match="hidden_act='gelu'"):
        model_config_from_hf({**base, "hidden_act": "gelu"})
    with pytest.raises(ConfigError, match="rope_scaling type 'linear'"):
        model_config_from_hf({**base, "rope_scaling": {"type": "linear", "factor": 2.0}})


def test_hf_transformers5_rope_parameters():
    base = model_config_to_hf(ModelConfig())
    base.pop("rope_scaling")
    base.pop("rope_theta")
    base["rope_parameters"] = {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
                               "beta_fast": 32, "beta_slow": 1, "rope_theta": 50000.0}
    m = model_config_from_hf(base)
    assert m.rope_theta == 50000.0 and m.rope_scaling.factor == 40.0 and m.rope_scaling.mscale is None


def test_context_extension_stages_follow_the_report():
    from dsv3_jax.training.schedule import Schedule

    base = load_config(CONFIGS / "deepseek_v3_671b.yaml")
    for name, seq, batch in (("ext32k", 32768, 1920), ("ext128k", 131072, 480)):
        c = load_config(CONFIGS / f"deepseek_v3_671b_{name}.yaml")
        assert (c.data.seq_len, c.train.global_batch_size, c.train.steps) == (seq, batch, 1000)
        # YaRN s=40, β=32, α=1 switched on: the model is the released checkpoint's, the same architecture as the base
        assert dataclasses.replace(c.model, remat="none") == ModelConfig()
        assert dataclasses.replace(c.model, rope_scaling=None, max_position_embeddings=4096) == base.model
        s = Schedule(c)
        assert s.total_steps == 1000 and s.batch_size(0) == batch
        assert s.learning_rate(0, 0) == s.learning_rate(999, 10 ** 13) == pytest.approx(7.3e-6)


def test_base_chain(tmp_path):
    (tmp_path / "a.yaml").write_text("train: {steps: 5, lr: 0.5}\nrun_dir: x\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\ntrain: {steps: 7}\n")
    c = load_config(tmp_path / "b.yaml")
    assert (c.train.steps, c.train.lr, c.run_dir) == (7, 0.5, "x")
    (tmp_path / "c.yaml").write_text("base: c.yaml\n")
    with pytest.raises(ConfigError, match="loops back"):
        load_config(tmp_path / "c.yaml")
