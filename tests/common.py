"""Shared test helpers: fixture paths and a tiny float32 model config."""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from dsv3_jax.config import ModelConfig, RopeScaling

FIXTURES = Path(__file__).parent / "fixtures"


def tiny_config(**overrides) -> ModelConfig:
    """A small float32 DeepSeek-V3 with every feature on (q/kv low rank, YaRN, dense+MoE, groups, MTP)."""
    cfg = ModelConfig(
        vocab_size=97, hidden_size=48, intermediate_size=64, moe_intermediate_size=24, num_hidden_layers=3,
        first_k_dense_replace=1, num_attention_heads=3, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=8,
        qk_rope_head_dim=4, v_head_dim=6, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=3,
        n_group=4, topk_group=2, max_position_embeddings=64,
        rope_scaling=RopeScaling(factor=4.0, original_max_position_embeddings=16, mscale=0.707, mscale_all_dim=1.0),
        num_nextn_predict_layers=1, initializer_range=0.2, dtype="float32", param_dtype="float32",
    )
    return dataclasses.replace(cfg, **overrides)


def random_variables(cfg: ModelConfig, seed: int = 0) -> dict:
    """Variables distributed as ``init_variables`` gives them (normal(initializer_range) weights, unit norm
    scales, zero router biases), filled with NumPy from the abstract shapes: ~1 s instead of a ~30 s init."""
    import jax
    import numpy as np

    from dsv3_jax.model import init_variables

    shapes = jax.eval_shape(lambda k: init_variables(cfg, k), jax.random.key(0))
    rng = np.random.default_rng(seed)

    def fill(path, s):
        name = getattr(path[-1], "key", "")
        if name == "scale":
            return np.ones(s.shape, s.dtype)
        if name == "e_score_correction_bias":
            return np.zeros(s.shape, s.dtype)
        return (rng.standard_normal(s.shape) * cfg.initializer_range).astype(s.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


# The smallest model with every feature on, as train.py key=value overrides (CLI and multi-process tests).
TINY_MODEL_OVERRIDES = (
    "model.vocab_size=256", "model.hidden_size=32", "model.intermediate_size=64", "model.moe_intermediate_size=16",
    "model.num_hidden_layers=2", "model.first_k_dense_replace=1", "model.num_attention_heads=2",
    "model.q_lora_rank=16", "model.kv_lora_rank=16", "model.qk_nope_head_dim=8", "model.qk_rope_head_dim=8",
    "model.v_head_dim=8", "model.n_routed_experts=8", "model.n_group=4", "model.topk_group=2",
    "model.num_experts_per_tok=2", "model.max_position_embeddings=64", "model.rope_scaling=null",
    "model.dtype=float32", "data.seq_len=16", "data.tokenizer_vocab_size=256",
)


@contextlib.contextmanager
def running_server(app, config=None) -> Iterator[str]:
    """Serve an ASGI ``app`` with uvicorn on a free 127.0.0.1 port in a background thread → its base url.
    ``config``: a ``uvicorn.Config`` for ``app`` (default: uvicorn's, warnings only). The server must stop within
    15 s of the context's end."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    srv = uvicorn.Server(config or uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(15)
        sock.close()
    assert not thread.is_alive(), "the server did not shut down within 15 s"
