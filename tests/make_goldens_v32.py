"""Golden fixtures for DeepSeek-V3.2 (DSA) from HF transformers' DeepseekV32ForCausalLM (torch, CPU, float32).

Same throwaway venv as tests/make_goldens.py, but transformers >= 5.25 (the first with ``deepseek_v32``):

    /root/.pyenv/versions/3.11.7/bin/python -m venv /tmp/tv23
    /tmp/tv23/bin/pip install torch==2.13.0
    echo "torch==2.13.0+cpu" > /tmp/constr.txt
    /tmp/tv23/bin/pip install -c /tmp/constr.txt transformers==5.25.0 safetensors numpy ml-dtypes

Run from the repository root:  /tmp/tv23/bin/python tests/make_goldens_v32.py

Writes tests/fixtures/tiny_v32 (float32) and tests/fixtures/tiny_v32_fp8 (official FP8 block format: the indexer's
``wq_b`` and ``wk`` quantised like every linear, ``weights_proj`` kept in float as the official checkpoint keeps it
BF16). T = 32 tokens > index_topk = 8, so the indexer's selection changes the logits. Seeds are searched so every MoE
routing decision *and* every indexer top-k decision (k-th vs (k+1)-th causal score of each query with more than k
causal keys) has a clear margin; see tests/fixtures/README.md.
"""

from __future__ import annotations

import copy
import os
import sys

import numpy as np
import torch
import transformers
from transformers import DeepseekV32Config, DeepseekV32ForCausalLM
from transformers.models.deepseek_v32 import modeling_deepseek_v32 as m32

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_goldens as g  # noqa: E402  (V3 helpers: weights layout, FP8 blocks, routing margins, writers)

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

B, T = 2, 32
INDEX_MARGIN = 1e-3  # relative gap between the k-th and (k+1)-th indexer score; else reseed

CFG_TINY_V32 = {
    "architectures": ["DeepseekV32ForCausalLM"],
    "model_type": "deepseek_v32",
    "vocab_size": 160,
    "hidden_size": 64,
    "intermediate_size": 96,
    "moe_intermediate_size": 24,
    "num_hidden_layers": 2,
    "first_k_dense_replace": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "q_lora_rank": 32,
    "kv_lora_rank": 32,
    "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 8,
    "v_head_dim": 16,
    "n_routed_experts": 8,
    "n_shared_experts": 1,
    "n_group": 2,
    "topk_group": 1,
    "num_experts_per_tok": 2,
    "norm_topk_prob": True,
    "routed_scaling_factor": 2.5,
    "index_n_heads": 4,
    "index_head_dim": 16,
    "index_topk": 8,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 128,
    "rope_theta": 10000.0,
    "rope_scaling": {"type": "yarn", "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
                     "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 1.0},
    "num_nextn_predict_layers": 0,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "initializer_range": 0.02,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "torch_dtype": "float32",
}


def indexer_keys(cfg, i):
    """(key, shape, kind) of layer i's lightning indexer."""
    d, nI, dI, dq = cfg["hidden_size"], cfg["index_n_heads"], cfg["index_head_dim"], cfg["q_lora_rank"]
    p = f"model.layers.{i}.self_attn.indexer."
    return [(p + "wq_b.weight", (nI * dI, dq), "linear"), (p + "wk.weight", (dI, d), "linear"),
            (p + "k_norm.weight", (dI,), "norm"), (p + "k_norm.bias", (dI,), "lnbias"),
            (p + "weights_proj.weight", (nI, d), "linear")]


def make_weights(cfg, seed):
    """V3 weights (tests/make_goldens.py) plus the indexer's, from a second stream of the same seed."""
    w = g.make_weights(cfg, seed)
    rng = np.random.default_rng(seed + 10_000)
    for i in range(cfg["num_hidden_layers"]):
        for key, shape, kind in indexer_keys(cfg, i):
            if kind == "linear":
                a = rng.standard_normal(shape) / np.sqrt(shape[1])
            elif kind == "norm":
                a = 1.0 + 0.1 * rng.standard_normal(shape)
            else:
                a = 0.1 * rng.standard_normal(shape)
            w[key] = a.astype(np.float32)
    return w


def hf_config(cfg):
    c = copy.deepcopy({k: v for k, v in cfg.items() if k != "quantization_config"})
    return DeepseekV32Config.from_dict(c, attn_implementation="eager", experts_implementation="eager")


def build_model(cfg, w):
    model = DeepseekV32ForCausalLM(hf_config(cfg)).eval()
    sd = g.to_module_state(w, "", "", cfg["n_routed_experts"])
    missing, unexpected = model.load_state_dict(sd, strict=True)
    assert not missing and not unexpected
    return model


def index_margin(ind, hidden, q_resid, pe, mask):
    """Smallest relative gap between the k-th and (k+1)-th causal indexer score over queries with > k keys.

    Recomputes HF's scores with HF's own modules (wq_b, wk, k_norm, weights_proj, half-split RoPE)."""
    Bn, S, _ = hidden.shape
    cos, sin = pe
    q = ind.wq_b(q_resid).view(Bn, S, ind.n_heads, ind.head_dim)
    r = ind.qk_rope_head_dim
    k = ind.k_norm(ind.wk(hidden)).unsqueeze(2)
    qr, kr = m32.apply_rotary_pos_emb(q[..., :r], k[..., :r], cos, sin, unsqueeze_dim=2)
    q = torch.cat([qr, q[..., r:]], -1)
    k = torch.cat([kr, k[..., r:]], -1).squeeze(2)
    s = torch.relu(torch.einsum("bshd,btd->bsht", q.float(), k.float()) * ind.softmax_scale)
    wts = ind.weights_proj(hidden).float() * ind.n_heads ** -0.5
    sc = torch.einsum("bsh,bsht->bst", wts, s)
    causal = mask if mask.dtype == torch.bool else mask == 0
    sc = sc.masked_fill(~causal, float("-inf"))
    K = ind.index_topk
    srt = sc.sort(-1, descending=True)[0]
    rows = torch.arange(S) >= K  # queries with more than K causal keys
    gap = (srt[:, rows, K - 1] - srt[:, rows, K]) / srt[:, rows, 0].abs().clamp_min(1e-6)
    return gap.min().item()


@torch.no_grad()
def forward_all(cfg, w, tokens):
    model = build_model(cfg, w)
    gates, idx = [], []
    hooks = []
    for layer in model.model.layers:
        if hasattr(layer.mlp, "gate"):
            hooks.append(layer.mlp.gate.register_forward_hook(lambda mod, inp, out: gates.append((mod, inp[0]))))
        hooks.append(layer.self_attn.indexer.register_forward_hook(
            lambda mod, inp, out: idx.append(index_margin(mod, *inp[:4]))))
    tok = torch.from_numpy(tokens.astype(np.int64))
    logits = model(input_ids=tok, position_ids=torch.arange(T)[None], use_cache=False).logits.float().numpy()
    for h in hooks:
        h.remove()
    rmargin = min(g.routing_margins(cfg, x, gate) for gate, x in gates)
    # The sparse mask must matter: dense attention (index_topk ≥ T) gives other logits.
    dense_cfg = dict(cfg, index_topk=T)
    dense = build_model(dense_cfg, w)(input_ids=tok, use_cache=False).logits.float().numpy()
    return logits, rmargin, min(idx), float(np.abs(dense - logits).max())


def pick(name, cfg, tokens, base_seed, quantise=False):
    for attempt in range(300):
        seed = base_seed + attempt
        w = make_weights(cfg, seed)
        tensors = None
        if quantise:
            tensors, w = fp8_checkpoint(w)
        logits, rm, im, dense_diff = forward_all(cfg, w, tokens)
        ok = rm >= g.ROUTING_MARGIN and im >= INDEX_MARGIN
        print(f"  [{name}] seed {seed}: routing margin {rm:.2e}, index margin {im:.2e}, "
              f"|dense - sparse| {dense_diff:.3f} {'ok' if ok else 'reseed'}")
        if ok:
            return seed, w, tensors, logits, dict(seed=seed, routing_margin=rm, index_margin=im,
                                                  max_abs_diff_vs_dense=dense_diff)
    raise RuntimeError("no seed with clear margins")


def fp8_checkpoint(w):
    """Official FP8 layout: every 2-D linear except embed/head/gate and the indexer's weights_proj."""
    tensors, deq = {}, {}
    for k, v in w.items():
        if g.is_fp8_quantised(k, v) and not k.endswith("indexer.weights_proj.weight"):
            q, s = g.quantise_block_fp8(v)
            tensors[k], tensors[k + "_scale_inv"] = q, torch.from_numpy(s)
            deq[k] = g.dequantise_block_fp8(q, s)
        else:
            tensors[k], deq[k] = torch.from_numpy(v), v
    return tensors, deq


@torch.no_grad()
def check_from_pretrained(d, w_logits):
    model = DeepseekV32ForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager",
                                                   experts_implementation="eager").eval()
    tok = torch.from_numpy(np.load(os.path.join(d, "tokens.npy")).astype(np.int64))
    lg = model(input_ids=tok, use_cache=False).logits.numpy()
    assert np.array_equal(lg, w_logits), np.abs(lg - w_logits).max()


def main():
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, numpy {np.__version__}")
    cfg = CFG_TINY_V32
    tokens = np.random.default_rng(3003).integers(0, cfg["vocab_size"], size=(B, T)).astype(np.int32)
    seed, w, _, logits, info = pick("tiny_v32", cfg, tokens, 300)
    d = g.write_fixture("tiny_v32", cfg, {k: torch.from_numpy(v) for k, v in w.items()}, tokens, logits, {})
    check_from_pretrained(d, logits)
    print("tiny_v32", info)
    cfg8 = dict(cfg, quantization_config=g.FP8_QUANT_CONFIG)
    seed8, _, tensors8, logits8, info8 = pick("tiny_v32_fp8", cfg, tokens, seed, quantise=True)
    g.write_fixture("tiny_v32_fp8", cfg8, tensors8, tokens, logits8, {})
    print("tiny_v32_fp8", info8)


if __name__ == "__main__":
    main()
