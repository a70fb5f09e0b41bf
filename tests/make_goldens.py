"""Generate golden fixtures (tests/fixtures/<name>/) from HF transformers' DeepseekV3 (torch, CPU, float32).

The JAX model is tested against these files in CI without torch. torch/transformers are NOT project
dependencies; they live in a throwaway venv:

    /root/.pyenv/versions/3.11.7/bin/python -m venv /work/torchvenv
    /work/torchvenv/bin/pip install torch==2.13.0            # CPU wheel (2.13.0+cpu); install torch FIRST
    echo "torch==2.13.0+cpu" > /tmp/constr.txt
    /work/torchvenv/bin/pip install -c /tmp/constr.txt transformers safetensors numpy ml-dtypes

Run from the repository root:

    /work/torchvenv/bin/python tests/make_goldens.py

Generated with torch 2.13.0+cpu, transformers 5.24.0 (see tests/fixtures/README.md). Deterministic: fixed seeds,
one torch thread, fixed zip timestamps; re-running reproduces every file byte for byte.

Per fixture directory:
  config.json                         HF DeepseekV3 config (model_type deepseek_v3), every relevant field explicit
  model.safetensors | model-0000i-of-0000N.safetensors + model.safetensors.index.json
                                      HF key layout (REFERENCE §7) incl. MTP keys at layer num_hidden_layers+k-1
  tokens.npy                          int32 [B, T]
  logits.npy                          float32 [B, T, V], DeepseekV3ForCausalLM, eager attention, positions 0..T-1
  mtp_logits_k{k}.npy                 float32 [B, T-k, V], MTP module k reference (see mtp_reference)
"""

from __future__ import annotations

import copy
import io
import json
import math
import os
import shutil
import zipfile

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import save_file
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
    DeepseekV3DecoderLayer,
    DeepseekV3RMSNorm,
    DeepseekV3RotaryEmbedding,
)

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

HERE = os.path.dirname(os.path.abspath(__file__))
OUT_ROOT = os.path.join(HERE, "fixtures")

B, T = 2, 24
ROUTING_MARGIN = 2e-3  # min gap (biased score / group score) between selected and first rejected; else reseed

# ----------------------------------------------------------------------------------------------------------------
# Fixture configs (HF config.json contents)
# ----------------------------------------------------------------------------------------------------------------


def _base_config(**kw):
    cfg = {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "topk_method": "noaux_tc",
        "scoring_func": "sigmoid",
        "norm_topk_prob": True,
        "tie_word_embeddings": False,
        "num_key_value_heads": None,  # filled below (= num_attention_heads)
        "initializer_range": 0.02,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "use_cache": False,
        "torch_dtype": "float32",
        "ep_size": 1,
        "moe_layer_freq": 1,
        "aux_loss_alpha": 0.001,
        "seq_aux": True,
    }
    cfg.update(kw)
    cfg["num_key_value_heads"] = cfg["num_attention_heads"]
    return cfg


CFG_TINY_YARN = _base_config(
    vocab_size=320,
    hidden_size=160,
    intermediate_size=200,
    moe_intermediate_size=48,
    num_hidden_layers=3,
    first_k_dense_replace=1,
    num_attention_heads=4,
    q_lora_rank=48,
    kv_lora_rank=32,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=12,
    n_routed_experts=16,
    n_group=4,
    topk_group=2,
    num_experts_per_tok=4,
    n_shared_experts=1,
    routed_scaling_factor=2.5,
    rope_theta=10000.0,
    rope_scaling={
        "type": "yarn",
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 16,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 0.707,
        "mscale_all_dim": 1.0,
    },
    max_position_embeddings=64,
    rope_interleave=True,
    num_nextn_predict_layers=1,
    rms_norm_eps=1e-6,
)

CFG_TINY_PLAINQ = _base_config(
    vocab_size=257,
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=24,
    num_hidden_layers=4,
    first_k_dense_replace=2,
    num_attention_heads=3,
    q_lora_rank=None,
    kv_lora_rank=24,
    qk_nope_head_dim=12,
    qk_rope_head_dim=4,
    v_head_dim=20,
    n_routed_experts=8,
    n_group=1,
    topk_group=1,
    num_experts_per_tok=2,
    n_shared_experts=2,
    routed_scaling_factor=2.5,
    rope_theta=10000.0,
    rope_scaling=None,
    max_position_embeddings=64,
    rope_interleave=False,
    num_nextn_predict_layers=2,
    rms_norm_eps=1e-6,
)

FP8_QUANT_CONFIG = {
    "quant_method": "fp8",
    "fmt": "e4m3",
    "activation_scheme": "dynamic",
    "weight_block_size": [128, 128],
}

# ----------------------------------------------------------------------------------------------------------------
# Random weights in HF checkpoint layout (numpy, float32)
# ----------------------------------------------------------------------------------------------------------------


def _block_keys(cfg, i, moe: bool):
    """(key, shape, kind) of one decoder block at layer index i. kind: linear | norm | gate | bias."""
    d, H = cfg["hidden_size"], cfg["num_attention_heads"]
    dn, dr, dv = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    dc, dq = cfg["kv_lora_rank"], cfg["q_lora_rank"]
    p = f"model.layers.{i}."
    out = [(p + "input_layernorm.weight", (d,), "norm"), (p + "post_attention_layernorm.weight", (d,), "norm")]
    a = p + "self_attn."
    if dq:
        out += [
            (a + "q_a_proj.weight", (dq, d), "linear"),
            (a + "q_a_layernorm.weight", (dq,), "norm"),
            (a + "q_b_proj.weight", (H * (dn + dr), dq), "linear"),
        ]
    else:
        out += [(a + "q_proj.weight", (H * (dn + dr), d), "linear")]
    out += [
        (a + "kv_a_proj_with_mqa.weight", (dc + dr, d), "linear"),
        (a + "kv_a_layernorm.weight", (dc,), "norm"),
        (a + "kv_b_proj.weight", (H * (dn + dv), dc), "linear"),
        (a + "o_proj.weight", (d, H * dv), "linear"),
    ]
    m = p + "mlp."
    if not moe:
        f = cfg["intermediate_size"]
        out += [
            (m + "gate_proj.weight", (f, d), "linear"),
            (m + "up_proj.weight", (f, d), "linear"),
            (m + "down_proj.weight", (d, f), "linear"),
        ]
    else:
        E, f = cfg["n_routed_experts"], cfg["moe_intermediate_size"]
        out += [(m + "gate.weight", (E, d), "gate"), (m + "gate.e_score_correction_bias", (E,), "bias")]
        for j in range(E):
            e = f"{m}experts.{j}."
            out += [
                (e + "gate_proj.weight", (f, d), "linear"),
                (e + "up_proj.weight", (f, d), "linear"),
                (e + "down_proj.weight", (d, f), "linear"),
            ]
        fs = f * cfg["n_shared_experts"]
        s = m + "shared_experts."
        out += [
            (s + "gate_proj.weight", (fs, d), "linear"),
            (s + "up_proj.weight", (fs, d), "linear"),
            (s + "down_proj.weight", (d, fs), "linear"),
        ]
    return out


def make_weights(cfg, seed):
    """Random weights with O(1) activations. Returns dict key -> float32 np array (HF checkpoint layout)."""
    rng = np.random.default_rng(seed)
    d, V, L = cfg["hidden_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    spec = [("model.embed_tokens.weight", (V, d), "embed")]
    for i in range(L):
        spec += _block_keys(cfg, i, moe=i >= cfg["first_k_dense_replace"])
    spec += [("model.norm.weight", (d,), "norm"), ("lm_head.weight", (V, d), "linear")]
    for k in range(1, cfg["num_nextn_predict_layers"] + 1):
        i = L + k - 1
        p = f"model.layers.{i}."
        spec += [
            (p + "enorm.weight", (d,), "norm"),
            (p + "hnorm.weight", (d,), "norm"),
            (p + "eh_proj.weight", (d, 2 * d), "linear"),
            (p + "shared_head.norm.weight", (d,), "norm"),
        ]
        spec += _block_keys(cfg, i, moe=True)  # MTP block is always MoE
    w = {}
    for key, shape, kind in spec:
        if kind == "embed":
            a = rng.standard_normal(shape)
        elif kind == "linear":
            a = rng.standard_normal(shape) / math.sqrt(shape[1])
        elif kind == "gate":
            a = 1.5 * rng.standard_normal(shape) / math.sqrt(shape[1])
        elif kind == "norm":
            a = 1.0 + 0.1 * rng.standard_normal(shape)
        elif kind == "bias":
            a = 0.3 * rng.standard_normal(shape)
        else:
            raise ValueError(kind)
        w[key] = a.astype(np.float32)
    # The MTP copies of embedding and head equal the main ones (as in the released checkpoint, README_WEIGHTS).
    for k in range(1, cfg["num_nextn_predict_layers"] + 1):
        p = f"model.layers.{L + k - 1}."
        w[p + "embed_tokens.weight"] = w["model.embed_tokens.weight"].copy()
        w[p + "shared_head.head.weight"] = w["lm_head.weight"].copy()
    return w


# ----------------------------------------------------------------------------------------------------------------
# FP8 block quantisation (REFERENCE §8)
# ----------------------------------------------------------------------------------------------------------------

FP8_MAX = 448.0
BLK = 128


def is_fp8_quantised(key, w):
    if not key.endswith(".weight") or w.ndim != 2:
        return False
    skip = ("embed_tokens.weight", "lm_head.weight", "shared_head.head.weight", "mlp.gate.weight")
    return not key.endswith(skip)


def quantise_block_fp8(w: np.ndarray):
    """W [out,in] f32 -> (W_fp8 torch.float8_e4m3fn [out,in], scale_inv f32 [ceil(out/128), ceil(in/128)])."""
    out_, in_ = w.shape
    go, gi = -(-out_ // BLK), -(-in_ // BLK)
    scale = np.zeros((go, gi), np.float32)
    q = torch.empty((out_, in_), dtype=torch.float8_e4m3fn)
    wt = torch.from_numpy(w)
    for a in range(go):
        for b in range(gi):
            blk = wt[a * BLK : (a + 1) * BLK, b * BLK : (b + 1) * BLK]
            s = (blk.abs().max() / FP8_MAX).to(torch.float32)  # == amax of zero-padded block
            scale[a, b] = s.item()
            q[a * BLK : (a + 1) * BLK, b * BLK : (b + 1) * BLK] = (blk / s).to(torch.float8_e4m3fn)
    assert torch.isfinite(q.to(torch.float32)).all() and q.to(torch.float32).abs().max() <= FP8_MAX
    return q, scale


def dequantise_block_fp8(q: torch.Tensor, scale_inv: np.ndarray) -> np.ndarray:
    out_, in_ = q.shape
    s = np.repeat(np.repeat(scale_inv, BLK, axis=0), BLK, axis=1)[:out_, :in_]
    return (q.to(torch.float32).numpy() * s).astype(np.float32)


def fp8_checkpoint(w):
    """Return (tensors for safetensors, dequantised float32 weights in HF layout)."""
    tensors, deq = {}, {}
    for k, v in w.items():
        if is_fp8_quantised(k, v):
            q, s = quantise_block_fp8(v)
            tensors[k] = q
            tensors[k + "_scale_inv"] = torch.from_numpy(s)
            deq[k] = dequantise_block_fp8(q, s)
        else:
            tensors[k] = torch.from_numpy(v)
            deq[k] = v
    return tensors, deq


# ----------------------------------------------------------------------------------------------------------------
# HF model construction
# ----------------------------------------------------------------------------------------------------------------


def hf_config(cfg):
    # deep copy: transformers mutates the rope dict in place (adds rope_theta), which must not leak into config.json
    c = copy.deepcopy({k: v for k, v in cfg.items() if k != "quantization_config"})
    return DeepseekV3Config.from_dict(c, attn_implementation="eager", experts_implementation="eager")


def to_module_state(w, prefix_in, prefix_out, E):
    """HF checkpoint layout (per-expert keys) -> transformers-5 module layout (fused experts)."""
    sd = {}
    experts = {}
    for k, v in w.items():
        if not k.startswith(prefix_in):
            continue
        r = k[len(prefix_in) :]
        if ".mlp.experts." in "." + r:
            head, tail = ("." + r).split(".mlp.experts.")
            j, name = tail.split(".", 1)
            experts.setdefault(head[1:], {})[(int(j), name)] = v
            continue
        sd[prefix_out + r] = torch.from_numpy(v.copy())
    for head, ex in experts.items():
        pre = prefix_out + (head + "." if head else "") + "mlp.experts."
        gate_up = np.stack(
            [np.concatenate([ex[(j, "gate_proj.weight")], ex[(j, "up_proj.weight")]], 0) for j in range(E)]
        )
        down = np.stack([ex[(j, "down_proj.weight")] for j in range(E)])
        sd[pre + "gate_up_proj"] = torch.from_numpy(gate_up)
        sd[pre + "down_proj"] = torch.from_numpy(down)
    return sd


def build_main_model(cfg, w):
    config = hf_config(cfg)
    model = DeepseekV3ForCausalLM(config).eval()
    L, E = cfg["num_hidden_layers"], cfg["n_routed_experts"]
    main = {k: v for k, v in w.items() if not any(k.startswith(f"model.layers.{L + j}.") for j in range(8))}
    sd = to_module_state(main, "", "", E)
    missing, unexpected = model.load_state_dict(sd, strict=True)
    assert not missing and not unexpected
    return model


def build_mtp_modules(cfg, w, config, k):
    """HF modules of MTP module k (1-based) loaded from checkpoint keys model.layers.{L+k-1}.*"""
    L, d, eps, E = cfg["num_hidden_layers"], cfg["hidden_size"], cfg["rms_norm_eps"], cfg["n_routed_experts"]
    i = L + k - 1
    p = f"model.layers.{i}."
    enorm, hnorm, snorm = (DeepseekV3RMSNorm(d, eps=eps) for _ in range(3))
    enorm.weight.data = torch.from_numpy(w[p + "enorm.weight"].copy())
    hnorm.weight.data = torch.from_numpy(w[p + "hnorm.weight"].copy())
    snorm.weight.data = torch.from_numpy(w[p + "shared_head.norm.weight"].copy())
    eh_proj = torch.nn.Linear(2 * d, d, bias=False)
    eh_proj.weight.data = torch.from_numpy(w[p + "eh_proj.weight"].copy())
    head = torch.nn.Linear(d, cfg["vocab_size"], bias=False)
    head.weight.data = torch.from_numpy(w[p + "shared_head.head.weight"].copy())
    embed = torch.nn.Embedding(cfg["vocab_size"], d)
    embed.weight.data = torch.from_numpy(w[p + "embed_tokens.weight"].copy())
    assert i >= config.first_k_dense_replace
    block = DeepseekV3DecoderLayer(config, layer_idx=i).eval()
    block_w = {k2: v for k2, v in w.items() if k2.startswith(p)}
    sd = to_module_state(block_w, p, "", E)
    sd = {k2: v for k2, v in sd.items() if k2.split(".")[0] in ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm")}
    missing, unexpected = block.load_state_dict(sd, strict=True)
    assert not missing and not unexpected
    return dict(enorm=enorm, hnorm=hnorm, eh_proj=eh_proj, block=block, norm=snorm, head=head, embed=embed)


def causal_mask(n, dtype=torch.float32):
    m = torch.full((n, n), torch.finfo(dtype).min, dtype=dtype).triu(1)
    return m[None, None]


@torch.no_grad()
def mtp_reference(cfg, w, config, tokens, h0):
    """MTP logits per module k. h0: main model's final hidden state AFTER model.norm [B,T,d].

    h'_i = eh_proj(cat[enorm(embed(t_{i+k})), hnorm(h^{k-1}_i)]),  i = 0..T-1-k
    h^k  = DecoderLayer(h')   (causal over T-k positions, position ids 0..T-k-1)
    logits_k = shared_head.head(shared_head.norm(h^k))
    For k >= 2, h^{k-1} is the previous module's block output BEFORE shared_head.norm (REFERENCE §6 reading).
    Also returns the variant where h^{k-1} is taken AFTER shared_head.norm (HF MtpModel chaining) for k >= 2.
    """
    rotary = DeepseekV3RotaryEmbedding(config)
    outs, outs_postnorm_chain = {}, {}
    h_prev, h_prev_pn = h0, h0
    Tn = tokens.shape[1]
    for k in range(1, cfg["num_nextn_predict_layers"] + 1):
        m = build_mtp_modules(cfg, w, config, k)
        n = Tn - k
        emb = m["embed"](tokens[:, k:])
        pos = torch.arange(n)[None]
        pe = rotary(emb, pos)

        def run(hp):
            x = m["eh_proj"](torch.cat([m["enorm"](emb), m["hnorm"](hp[:, :n])], dim=-1))
            hk = m["block"](x, attention_mask=causal_mask(n), position_ids=pos, position_embeddings=pe)
            return hk, m["head"](m["norm"](hk))

        hk, logits = run(h_prev)
        outs[k] = logits.float().numpy()
        h_prev = hk
        hk_pn, logits_pn = run(h_prev_pn)
        outs_postnorm_chain[k] = logits_pn.float().numpy()
        h_prev_pn = m["norm"](hk_pn)
    return outs, outs_postnorm_chain


@torch.no_grad()
def hf_mtpmodel_check(cfg, w, model, tokens, h0, ref):
    """Cross-check module k=1 against transformers' own MtpModel (shares embed/lm_head with the main model)."""
    from transformers.modeling_layers import MtpModel

    D, L, E = cfg["num_nextn_predict_layers"], cfg["num_hidden_layers"], cfg["n_routed_experts"]
    mtp = MtpModel(model, D).eval()
    sd = {}
    for k in range(1, D + 1):
        p = f"model.layers.{L + k - 1}."
        blk = {k2: v for k2, v in w.items() if k2.startswith(p)}
        s = to_module_state(blk, p, f"layers.{k - 1}.", E)
        for k2, v in s.items():
            r = k2[len(f"layers.{k - 1}.") :]
            if r.startswith(("enorm.", "hnorm.", "eh_proj.")):
                sd[k2] = v
            elif r.startswith("shared_head.norm."):
                sd[f"layers.{k - 1}.post_norm.weight"] = v
            elif r.startswith(("shared_head.head.", "embed_tokens.")):
                continue
            else:
                sd[f"layers.{k - 1}.mtp_block." + r] = v
    own = {k2 for k2 in mtp.state_dict() if k2.startswith("layers.")}
    assert own == set(sd), (sorted(own ^ set(sd)))[:10]
    mtp.load_state_dict(sd, strict=False)
    n = tokens.shape[1] - 1
    hs = mtp.forward_layer(0, h0[:, :n], torch.arange(n)[None], None, input_ids=tokens[:, 1:])
    logits = model.lm_head(hs).numpy()
    err = np.abs(logits - ref[1]).max()
    assert err < 1e-4, err
    return err


# ----------------------------------------------------------------------------------------------------------------
# Routing margin check
# ----------------------------------------------------------------------------------------------------------------


def routing_margins(cfg, x, gate):
    """min over tokens of the group-selection margin and expert-selection margin (biased scores)."""
    E, G, TG, K = cfg["n_routed_experts"], cfg["n_group"], cfg["topk_group"], cfg["num_experts_per_tok"]
    x = x.reshape(-1, x.shape[-1]).float()
    s = torch.sigmoid(F.linear(x, gate.weight.float())) + gate.e_score_correction_bias
    gs = s.view(-1, G, E // G).topk(2, dim=-1)[0].sum(-1)
    gsorted = gs.sort(dim=-1, descending=True)[0]
    gmargin = (gsorted[:, TG - 1] - gsorted[:, TG]).min().item() if TG < G else float("inf")
    keep = torch.zeros_like(gs).scatter_(1, gs.topk(TG, dim=-1)[1], 1.0)
    keep = keep[:, :, None].expand(-1, G, E // G).reshape(-1, E).bool()
    sm = s.masked_fill(~keep, float("-inf")).sort(dim=-1, descending=True)[0]
    emargin = (sm[:, K - 1] - sm[:, K]).min().item()
    return min(gmargin, emargin)


@torch.no_grad()
def forward_all(cfg, w, tokens):
    """Main logits + MTP references + min routing margin over every MoE gate call."""
    model = build_main_model(cfg, w)
    config = model.config
    captured = []
    hooks = []
    for layer in model.model.layers:
        if hasattr(layer.mlp, "gate"):
            hooks.append(layer.mlp.gate.register_forward_hook(lambda mod, inp, out: captured.append((mod, inp[0]))))
    tok = torch.from_numpy(tokens.astype(np.int64))
    out = model(input_ids=tok, position_ids=torch.arange(tok.shape[1])[None], use_cache=False)
    logits = out.logits.float().numpy()
    h0 = model.model(input_ids=tok, position_ids=torch.arange(tok.shape[1])[None], use_cache=False).last_hidden_state
    assert np.array_equal(model.lm_head(h0).numpy(), logits)
    for h in hooks:
        h.remove()
    # MTP gates: patch DecoderLayer gates as they get built
    orig = DeepseekV3DecoderLayer.forward

    def fwd(self, *a, **kw):
        hk = self.mlp.gate.register_forward_hook(lambda mod, inp, o: captured.append((mod, inp[0])))
        try:
            return orig(self, *a, **kw)
        finally:
            hk.remove()

    DeepseekV3DecoderLayer.forward = fwd
    try:
        mtp, mtp_pn = mtp_reference(cfg, w, config, tok, h0)
    finally:
        DeepseekV3DecoderLayer.forward = orig
    margin = min(routing_margins(cfg, x, g) for g, x in captured)
    return model, h0, logits, mtp, mtp_pn, margin


# ----------------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------------


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def write_npz(path, arrays):
    """Deterministic .npz (np.savez stamps the current time into the zip)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        for name, arr in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asarray(arr), allow_pickle=False)
            zi = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            z.writestr(zi, buf.getvalue())


def save_single(d, tensors):
    save_file(tensors, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
    os.chmod(os.path.join(d, "model.safetensors"), 0o644)


def save_sharded(d, tensors, n_shards):
    keys = list(tensors)  # generation order: embed, layers..., norm, lm_head, MTP layers
    bounds = np.linspace(0, len(keys), n_shards + 1).round().astype(int)
    weight_map, total = {}, 0
    for s in range(n_shards):
        fname = f"model-{s + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {k: tensors[k] for k in keys[bounds[s] : bounds[s + 1]]}
        save_file(part, os.path.join(d, fname), metadata={"format": "pt"})
        os.chmod(os.path.join(d, fname), 0o644)
        for k, v in part.items():
            weight_map[k] = fname
            total += v.numel() * v.element_size()
    write_json(
        os.path.join(d, "model.safetensors.index.json"),
        {"metadata": {"total_size": int(total)}, "weight_map": dict(sorted(weight_map.items()))},
    )


def write_fixture(name, cfg, tensors, tokens, logits, mtp, sharded=0, extra=None):
    d = os.path.join(OUT_ROOT, name)
    if os.path.isdir(d):
        shutil.rmtree(d)
    os.makedirs(d)
    write_json(os.path.join(d, "config.json"), cfg)
    if sharded:
        save_sharded(d, tensors, sharded)
    else:
        save_single(d, tensors)
    np.save(os.path.join(d, "tokens.npy"), tokens.astype(np.int32))
    np.save(os.path.join(d, "logits.npy"), logits.astype(np.float32))
    for k, v in mtp.items():
        np.save(os.path.join(d, f"mtp_logits_k{k}.npy"), v.astype(np.float32))
    for fname, v in (extra or {}).items():
        np.save(os.path.join(d, fname), v.astype(np.float32))
    return d


@torch.no_grad()
def check_from_pretrained(d, cfg, w):
    """transformers' own loader reads our directory into the same parameters (validates key layout + config)."""
    model = DeepseekV3ForCausalLM.from_pretrained(
        d, dtype=torch.float32, attn_implementation="eager", experts_implementation="eager"
    ).eval()
    ref = build_main_model(cfg, w).state_dict()
    got = model.state_dict()
    assert set(ref) == set(got), sorted(set(ref) ^ set(got))[:10]
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    # ... and its forward (config.json parsed by HF, e.g. rope_scaling -> rope_parameters) reproduces logits.npy
    tok = torch.from_numpy(np.load(os.path.join(d, "tokens.npy")).astype(np.int64))
    lg = model(input_ids=tok, use_cache=False).logits.numpy()
    assert np.array_equal(lg, np.load(os.path.join(d, "logits.npy")))
    return model


def pick_seed(name, cfg, tokens, base_seed, extra_check=None):
    for attempt in range(200):
        seed = base_seed + attempt
        w = make_weights(cfg, seed)
        res = forward_all(cfg, w, tokens)
        margin = res[-1]
        ok = margin >= ROUTING_MARGIN
        if ok and extra_check is not None:
            ok, margin2 = extra_check(w)
            margin = min(margin, margin2)
        print(f"  [{name}] seed {seed}: min routing margin {margin:.3e} {'ok' if ok else 'reseed'}")
        if ok:
            return seed, w, res, margin
    raise RuntimeError("no seed with clear routing margins")


def rope_debug(cfg, model, d):
    config = model.config
    rot = model.model.rotary_emb
    dr = cfg["qk_rope_head_dim"]
    base = cfg["rope_theta"]
    inv_freq_base = 1.0 / (base ** (np.arange(0, dr, 2, dtype=np.float32) / dr))
    pos = torch.arange(T)[None]
    cos, sin = rot(torch.zeros(1, T, 1), pos)
    write_npz(
        os.path.join(d, "rope_debug.npz"),
        {
            "inv_freq": rot.inv_freq.numpy().astype(np.float32),  # after YaRN, [dr/2]
            "inv_freq_unscaled": inv_freq_base,
            "cos_sin_factor": np.float64(rot.attention_scaling),  # HF attention_scaling multiplying cos/sin
            "softmax_scale": np.float64(model.model.layers[0].self_attn.scaling),
            "softmax_scale_unscaled": np.float64((cfg["qk_nope_head_dim"] + dr) ** -0.5),
            "cos": cos[0].numpy().astype(np.float32),  # [T, dr] = cat(freqs, freqs) layout, * factor
            "sin": sin[0].numpy().astype(np.float32),
        },
    )
    return rot.inv_freq.numpy(), rot.attention_scaling, model.model.layers[0].self_attn.scaling


def main():
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, numpy {np.__version__}")
    os.makedirs(OUT_ROOT, exist_ok=True)
    summary = {}

    # ---- (a) tiny_yarn  +  (c) tiny_yarn_fp8 (same model, FP8 block format) -------------------------------------
    cfg_a = CFG_TINY_YARN
    tokens_a = np.random.default_rng(1001).integers(0, cfg_a["vocab_size"], size=(B, T)).astype(np.int32)
    fp8_res = {}

    def fp8_check(w):
        tensors, deq = fp8_checkpoint(w)
        res = forward_all(cfg_a, deq, tokens_a)
        fp8_res["v"] = (tensors, deq, res)
        return res[-1] >= ROUTING_MARGIN, res[-1]

    seed_a, w_a, res_a, m_a = pick_seed("tiny_yarn", cfg_a, tokens_a, 100, extra_check=fp8_check)
    model_a, h0_a, logits_a, mtp_a, _, _ = res_a
    err_a = hf_mtpmodel_check(cfg_a, w_a, model_a, torch.from_numpy(tokens_a.astype(np.int64)), h0_a, mtp_a)
    d = write_fixture("tiny_yarn", cfg_a, {k: torch.from_numpy(v) for k, v in w_a.items()}, tokens_a, logits_a, mtp_a)
    m_loaded = check_from_pretrained(d, cfg_a, w_a)
    inv_freq, fac, sc = rope_debug(cfg_a, m_loaded, d)
    summary["tiny_yarn"] = dict(seed=seed_a, margin=m_a, mtpmodel_err=err_a, inv_freq=inv_freq.tolist(),
                                cos_sin_factor=fac, softmax_scale=sc)

    tensors_c, deq_c, res_c = fp8_res["v"]
    _, h0_c, logits_c, mtp_c, _, m_c = res_c
    cfg_c = dict(cfg_a, quantization_config=FP8_QUANT_CONFIG)
    write_fixture("tiny_yarn_fp8", cfg_c, tensors_c, tokens_a, logits_c, mtp_c)
    summary["tiny_yarn_fp8"] = dict(seed=seed_a, margin=m_c,
                                    max_abs_logit_diff_vs_f32=float(np.abs(logits_c - logits_a).max()))

    # ---- (b) tiny_plainq (sharded, D=2) -------------------------------------------------------------------------
    cfg_b = CFG_TINY_PLAINQ
    tokens_b = np.random.default_rng(2002).integers(0, cfg_b["vocab_size"], size=(B, T)).astype(np.int32)
    seed_b, w_b, res_b, m_b = pick_seed("tiny_plainq", cfg_b, tokens_b, 200)
    model_b, h0_b, logits_b, mtp_b, mtp_b_pn, _ = res_b
    err_b = hf_mtpmodel_check(cfg_b, w_b, model_b, torch.from_numpy(tokens_b.astype(np.int64)), h0_b, mtp_b)
    extra = {"mtp_logits_k2_hf_postnorm_chain.npy": mtp_b_pn[2]}
    d = write_fixture("tiny_plainq", cfg_b, {k: torch.from_numpy(v) for k, v in w_b.items()}, tokens_b, logits_b,
                      mtp_b, sharded=3, extra=extra)
    check_from_pretrained(d, cfg_b, w_b)
    summary["tiny_plainq"] = dict(seed=seed_b, margin=m_b, mtpmodel_err=err_b,
                                  k2_chain_variant_maxdiff=float(np.abs(mtp_b_pn[2] - mtp_b[2]).max()))

    summary["hf_save_pretrained"] = make_hf_save_pretrained()
    make_rope_variants()

    for name in ("tiny_yarn", "tiny_yarn_fp8", "tiny_plainq", "hf_save_pretrained"):
        lg = np.load(os.path.join(OUT_ROOT, name, "logits.npy"))
        s = summary[name]
        s["logits_std"] = float(lg.std())
        s["logits_absmax"] = float(np.abs(lg).max())
    print(json.dumps(summary, indent=1, default=float))


def make_hf_save_pretrained():
    """(d) A checkpoint written by transformers' own ``save_pretrained`` in bfloat16: HF's config.json as HF writes
    it (``rope_parameters``, ``head_dim``, ...), no MTP tensors although num_nextn_predict_layers=1 (HF drops them),
    MoE from layer 0, YaRN without mscale keys (HF's fallback factors). Logits: the same bf16 weights in float32."""
    from transformers import DeepseekV3Config

    torch.manual_seed(4004)
    config = DeepseekV3Config(
        vocab_size=211, hidden_size=72, intermediate_size=80, moe_intermediate_size=40, num_hidden_layers=2,
        first_k_dense_replace=0, num_attention_heads=3, num_key_value_heads=3, q_lora_rank=40, kv_lora_rank=24,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=10, n_routed_experts=6, n_group=2, topk_group=1,
        num_experts_per_tok=2, n_shared_experts=1, routed_scaling_factor=1.7, initializer_range=0.15,
        max_position_embeddings=128,
        rope_scaling={"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 16, "beta_fast": 32,
                      "beta_slow": 1},
    )
    model = transformers.DeepseekV3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
        for layer in model.model.layers:
            layer.mlp.gate.e_score_correction_bias.copy_(0.3 * torch.randn(config.n_routed_experts))
    model = model.to(torch.bfloat16)
    d = os.path.join(OUT_ROOT, "hf_save_pretrained")
    if os.path.exists(d):
        shutil.rmtree(d)
    model.save_pretrained(d)
    for extra in ("generation_config.json",):
        if os.path.exists(os.path.join(d, extra)):
            os.remove(os.path.join(d, extra))
    tokens = np.random.default_rng(4005).integers(0, config.vocab_size, size=(B, T)).astype(np.int32)
    model = model.float()
    with torch.no_grad():
        logits = model(input_ids=torch.from_numpy(tokens.astype(np.int64))).logits.numpy().astype(np.float32)
    np.save(os.path.join(d, "tokens.npy"), tokens)
    np.save(os.path.join(d, "logits.npy"), logits)
    return {"note": "written by save_pretrained (bf16)"}


ROPE_VARIANTS = {
    "no_truncate": {"rope_type": "yarn", "factor": 6.0, "original_max_position_embeddings": 64, "truncate": False},
    "attention_factor": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                         "attention_factor": 1.3, "mscale": 1.0, "mscale_all_dim": 1.0},
    "mscale_only": {"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 128, "mscale": 0.707},
    "v3": {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096, "beta_fast": 32,
           "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
}


def make_rope_variants():
    """HF's YaRN numbers (inv_freq, cos/sin factor, softmax scale) for rope_scaling variants → rope_variants.json."""
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as m

    out = {}
    for name, rs in ROPE_VARIANTS.items():
        max_pos = 163840 if name == "v3" else 256
        config = DeepseekV3Config(hidden_size=64, num_attention_heads=2, qk_rope_head_dim=64, qk_nope_head_dim=128,
                                  v_head_dim=128, max_position_embeddings=max_pos, rope_scaling=copy.deepcopy(rs))
        rot = m.DeepseekV3RotaryEmbedding(config)
        attn = m.DeepseekV3Attention(config, 0)
        out[name] = {"rope_scaling": rs, "max_position_embeddings": max_pos,
                     "inv_freq": rot.inv_freq.tolist(), "cos_sin_factor": float(rot.attention_scaling),
                     "softmax_scale": float(attn.scaling)}
    write_json(os.path.join(OUT_ROOT, "rope_variants.json"), out)


if __name__ == "__main__":
    main()
