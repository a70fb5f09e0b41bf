"""The README's Fine-tune commands: train.py with configs/tiny_sft.yaml from a run dir, then from the same weights
exported with ``convert --to-hf``; the 671B SFT config's recipe (REFERENCE §9)."""

from __future__ import annotations

import json
import math

import numpy as np

import train as train_py
from dsv3_jax import convert
from dsv3_jax.config import load_config
from dsv3_jax.training.checkpoint import Checkpointer
from dsv3_jax.training.schedule import Schedule
from dsv3_jax.training.step import init_state
from tests.test_chat_data import tok  # noqa: F401  (the module-scoped tokenizer fixture with the V3.1 markers)
from tests.test_docs import FAST_TRAIN
from tests.test_training import read_jsonl, tiny_cfg

CHATS = [
    {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hello world"}]},
    {"messages": [{"role": "user", "content": "2+2?"},
                  {"role": "assistant", "content": "4", "reasoning_content": "the sum is 4"}]},
    {"messages": [{"role": "user", "content": "weather in Paris?"},
                  {"role": "assistant", "content": None, "tool_calls": [
                      {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                  {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "sunny"}]},
]


def test_readme_fine_tune_from_run_dir_and_hf_export(tmp_path, tok):  # noqa: F811
    run = tmp_path / "tiny"
    cfg = tiny_cfg(run, "model.vocab_size=320")  # room for the test tokenizer's 302 ids
    ck = Checkpointer(run / "checkpoints", async_save=False)
    ck.save(init_state(cfg, seed=4)._replace(step=np.int64(3)), None, cfg)
    ck.close()
    tok.save(run / "tokenizer.json")  # as train.py keeps it in every run dir
    chats = tmp_path / "chats.jsonl"
    chats.write_text("\n".join(json.dumps(c) for c in CHATS) + "\n")
    for src, out in ((run, tmp_path / "sft"), (tmp_path / "exported", tmp_path / "sft_hf")):
        if src.name == "exported":
            assert convert.main(["--checkpoint", str(run), "--to-hf", str(src)]) == 0
            assert (src / "tokenizer.json").is_file()  # the tokenizer travels with the export
        rc = train_py.main(["--config", "configs/tiny_sft.yaml", f"train.init_from={src}", f"data.source={chats}",
                            f"run_dir={out}", *FAST_TRAIN, "data.seq_len=64"])
        assert rc == 0
        records = read_jsonl(out / "metrics.jsonl")
        assert [r["step"] for r in records] == [1, 2] and all(math.isfinite(r["loss"]) for r in records)
        assert load_config(out / "config.yaml").model.hidden_size == cfg.model.hidden_size
        assert (out / "tokenizer.json").read_text() == (run / "tokenizer.json").read_text()
    first = [read_jsonl(d / "metrics.jsonl")[0]["loss"] for d in (tmp_path / "sft", tmp_path / "sft_hf")]
    np.testing.assert_allclose(first[0], first[1], rtol=1e-6)  # same weights, same data: same first loss


def test_671b_sft_config_follows_the_recipe():
    """REFERENCE §9 SFT: cosine 5e-6 → 1e-6 over the run; chat data packed into 4096-token rows."""
    cfg = load_config("configs/deepseek_v3_671b_sft.yaml")
    assert cfg.data.format == "chat" and cfg.data.seq_len == 4096
    t = cfg.train
    tokens_per_step = t.global_batch_size * cfg.data.seq_len
    np.testing.assert_allclose(t.lr_decay_tokens, t.steps * tokens_per_step, rtol=0.01)
    sched = Schedule(cfg)
    assert sched.at(0, 0).lr == 5e-6
    np.testing.assert_allclose(sched.at(t.steps * tokens_per_step, t.steps).lr, 1e-6, rtol=1e-2)
