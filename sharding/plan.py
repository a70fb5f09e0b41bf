"""Per-device memory and per-step communication plan for a config on a mesh — no arrays allocated.

    python -m sharding.plan --config configs/deepseek_v3_671b.yaml --mesh pipeline=16,expert=64,data=2
    python -m sharding.plan --config configs/tiny.yaml --mesh pipeline=2,expert=2,data=2 \
        model.num_hidden_layers=5 --lower
    python -m sharding.plan --config configs/deepseek_v3_671b.yaml --serve --gpus 8 --gpu-mem 141 [--fp8]
    ... --json PLAN.json                          (the same numbers, machine-readable)

Everything is per device and in decimal GB (1e9 bytes); "busiest device" where shards are uneven.

**State** (exact, from the real code): parameter shapes come from ``jax.eval_shape`` of the model init with the
real config, shardings from :func:`sharding.partition.state_shardings` on an ``AbstractMesh`` (the rules table,
ZeRO-1), so the plan cannot drift from what :func:`dsv3_jax.training.step.init_state` creates. Per-device bytes
of a leaf = Π_dims ceil(dim / Π mesh axes sharding that dim) × itemsize (ceil = the busiest device, e.g.
ceil(58/16) = 4 MoE layers on a PP16 stage — the pipeline code today needs 58 % 16 == 0; the plan does not).
 - params: FP32 master weights (+ router biases);
 - grads: FP32, param-sharded; ×2 when the step accumulates over n > 1 micro-batches (the scan carries an
   accumulator and each micro-batch's gradient tree is whole before it is added — the stacked MoE leaf is one
   array);
 - moments: μ and ν in ``train.moments_dtype`` with the ZeRO-1 shardings (``data`` added to a dim).

**Activations** (analytic, ``model.remat: full``; every block input is saved, the block recomputed in backward):
 with T = seq_len, Nb = data·fsdp·expert (the batch axes), B = train micro-batch (sequences per accumulation
 step), tok = B·T/Nb tokens per device, S = pipeline stages, M = pipeline micro-batches (0 → 2S),
 tok_pm = tok/M, L_s = ceil(L_moe/S), a = bytes of ``model.dtype``, d = hidden size:
 - pipeline saved = slots · L_s · tok_pm · d · a, slots = micro-batches whose stage inputs are alive at the
   end of the forward: M + S − 1 for this repo's GPipe scan (autodiff of the scan keeps every iteration's
   residuals, bubble iterations included), S for 1F1B, S + 1 for DualPipe;
 - outside the pipeline (embedding, dense layers, head, MTP; sequence-split over ``pipeline`` when S divides T,
   sharding/rules.py, so on tok_o = tok/S tokens per device): (1 + n_dense + 3 + 5·D) · tok_o · d · a (embedding
   out, dense inputs, the pipeline's input and output buffers, final hidden, and per MTP module its embedding,
   hidden, concat (2) and block input);
 - logits: (1 + D + 1) · tok_o · V · 4 (FP32 main and MTP logits kept for the CE backward + one cotangent);
 - one layer's working set (live while it is recomputed and differentiated; ×2 for the cotangents) at the
   token count it runs on (tok_pm for pipelined MoE layers, tok_o for dense and MTP; these two also hold the
   whole sequences' keys and values, 2·tok·h·(qk + v)·a, and one layer's weights gathered over ``pipeline`` with
   its unreduced grads, FP32): attention projections
   (q_lora + h·(2·qk + nope + v + v) + kv_lora + rope + d values/token; flash attention, no T² scores, unless
   ``attention_impl: xla``: + 6·h·T·4 bytes/token, the f32 score buffers of XLA's attention backward, fitted
   to H100 compiles; ``auto`` is planned as flash, i.e. tokamax installed on the GPU), the dense SwiGLU
   (3·inter) or the shared expert (3·moe_inter·n_shared);
 - EP dispatch buffers of that MoE layer (×2 for the cotangents): this repo's all-gather EP materialises every
   token of the expert group: ep·n·d·a (gathered) + 2·ep·n·K·d·a (copies, sorted) + 3·ep·n·K·moe_inter·a
   (gate/up/act) + 2·ep·n·K·d·a (expert out, unsorted) + ep·n·d·4 (FP32 combine); an all-to-all EP (ragged,
   as in the report) holds n·K rows instead of ep·n·K (balanced load).
 The peak is the worst phase: the head backward (saved + logits), the MTP / a MoE stage / a dense layer backward
 (saved + that layer's working set + its EP buffers), or the optimizer update (grads + 2 FP32 param-sized
 temporaries: XLA's allocation for this step on an H100, see ``bench/results/plan-671b.txt``); persistent
 state is alive in all of them. Not modelled: XLA fragmentation, CUDA/NCCL workspaces (keep ~5 GB headroom).

**Collectives** (analytic, bytes each device sends per optimizer step; ring algorithms: all-reduce
2(n−1)/n·X, reduce-scatter and all-gather (n−1)/n·X for X the full buffer):
 - gradient sync per leaf over the batch axes that do not shard it (non-expert weights: data·expert; experts:
   data): with ZeRO-1 reduce-scatter over ``data`` + all-reduce of the shard over the rest + all-gather of the
   updated FP32 params over ``data``; without, all-reduces; once per step (accumulated locally);
 - fsdp: all-gather of the compute-dtype weights in forward and in the recomputed forward, reduce-scatter of
   the FP32 grads, per micro-batch;
 - EP per MoE layer and pipeline iteration (forward, remat recompute, backward): all-gather EP
   (ep−1)·n·(d·(a+4) + 8K) twice + (ep−1)·n·d·(a+4) once; all-to-all (ep−1)/ep·n·K·d·(dispatch + combine
   bytes) three times; × L_s × (M + S − 1) scan iterations (the GPipe scan runs every stage each iteration);
 - pipeline: activation (forward) and its cotangent (backward) of tok_pm·d·a per scan iteration; the stack's
   input gathered over ``pipeline`` and its cotangent reduce-scattered, per micro-batch; the dense/MTP weights
   (FSDP over ``pipeline``): FP32 all-gather in forward and recompute, FP32 grad reduce-scatter, per micro-batch.

``--lower`` also traces and lowers the real train step for ``cuda`` on an ``AbstractMesh`` with
``ShapeDtypeStruct`` arguments (no allocation, no GPU needed) and reports the lowered module's FLOPs and
collectives; XLA's memory analysis needs a compile for the real devices, which only happens here when the mesh
fits the local devices: the tiny configs on 8 simulated CPUs, or the 671B layout on 2,048 (about 8 minutes on two
cores; a CPU runs XLA attention and BF16, so compare with the plan for those settings):

    XLA_FLAGS=--xla_force_host_platform_device_count=2048 python -m sharding.plan \
        --config configs/deepseek_v3_671b.yaml --mesh pipeline=16,expert=64,data=2 --lower \
        train.precision=bf16 model.attention_impl=xla

(bench/results/plan-671b-xla.txt: plan 96.2 GB vs XLA 109.4 GB per device, +13.7%.) Serving (``--serve``): see :func:`serve_plan`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from dsv3_jax.config import Config, ConfigError, MeshConfig, ModelConfig, load_config
from sharding.mesh import AXES

GB = 1e9
PEAK_FLOPS = 989e12  # H800/H100 dense BF16 (REFERENCE §10)
LINK_BYTES_PER_S = 50e9  # InfiniBand per GPU (REFERENCE §10): PP16 × EP64 × DP2 spans nodes on every axis
BATCH = ("data", "fsdp", "expert")


# ----------------------------------------------------------------------------------------------------------
# Shapes and shardings from the real code
# ----------------------------------------------------------------------------------------------------------


def abstract_mesh(sizes: dict[str, int]) -> AbstractMesh:
    return AbstractMesh(tuple(sizes.get(a, 1) for a in AXES), AXES, axis_types=(AxisType.Auto,) * len(AXES))


def abstract_state(cfg: Config):
    """(params, router, opt_state) as ShapeDtypeStructs — what ``init_state`` builds (eval_shape, no arrays)."""
    from dsv3_jax.model import init_variables
    from dsv3_jax.training import optim

    opt = optim.make_optimizer(optim.OptimSettings.from_train(cfg.train))

    def make(key):
        v = init_variables(cfg.model, key)
        params = jax.tree.map(lambda p: p.astype(jnp.float32), v["params"])
        return params, v.get("router", {}), opt.init(params)

    return jax.eval_shape(make, jax.random.key(0, impl="rbg"))


def _names(entry) -> tuple[str, ...]:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def device_bytes(shape, dtype, spec: P, sizes: dict[str, int]) -> int:
    """Bytes of the busiest device's shard: Π ceil(dim / Π axes sharding it) × itemsize."""
    n = jnp.dtype(dtype).itemsize
    for i, dim in enumerate(shape):
        f = math.prod(sizes.get(a, 1) for a in _names(spec[i] if i < len(spec) else None))
        n *= -(-dim // f)
    return n


def _path(p) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in p)


def _group(path: str) -> str:
    """The part of the model a leaf belongs to (for the busiest-stage what-ifs and the report)."""
    for key, name in (("moe_layers", "moe"), ("dense_layers", "dense"), ("mtp_", "mtp"), ("embed", "embed")):
        if key in path:
            return name
    return "head"  # lm_head, final norm


def state_leaves(cfg: Config, sizes: dict[str, int]) -> list[dict]:
    """One row per state leaf: path, kind (params | router | moments), group, global and per-device bytes, spec."""
    from sharding.partition import state_shardings

    p, r, o = abstract_state(cfg)
    mesh = abstract_mesh(sizes)
    ps, rs, os_ = state_shardings(p, r, o, cfg.model, mesh, cfg.mesh.zero1)
    rows = []
    for kind, tree, sh in (("params", p, ps), ("router", r, rs), ("moments", o, os_)):
        flat = jax.tree_util.tree_flatten_with_path(tree)[0]
        for (path, x), s in zip(flat, jax.tree.leaves(sh, is_leaf=lambda v: isinstance(v, NamedSharding))):
            name = _path(path)
            rows.append({"path": name, "kind": kind, "group": _group(name), "shape": tuple(x.shape),
                         "dtype": str(x.dtype), "spec": tuple(s.spec), "bytes": x.size * x.dtype.itemsize,
                         "device_bytes": device_bytes(x.shape, x.dtype, s.spec, sizes)})
    return rows


def resolve_mesh(cfg: Config, text: str | None, num_devices: int | None = None) -> dict[str, int]:
    """Mesh sizes from the config's ``mesh`` section, overridden by ``pipeline=16,expert=64,data=2``."""
    sizes = {a: getattr(cfg.mesh, a) for a in AXES}
    for part in filter(None, (text or "").split(",")):
        k, _, v = part.partition("=")
        if k.strip() not in AXES:
            raise ConfigError(f"--mesh: unknown axis {k!r} (axes: {', '.join(AXES)})")
        sizes[k.strip()] = int(v)
    if sizes["data"] == -1:
        fixed = math.prod(n for a, n in sizes.items() if a != "data")
        sizes["data"] = max(1, (num_devices or fixed) // fixed)
    return sizes


# ----------------------------------------------------------------------------------------------------------
# The analytic model
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Knobs:
    """How the step runs. The defaults are this repo's code today; the others are what-ifs (not implemented)."""

    schedule: str = "gpipe"  # gpipe (this repo's scan: M+S-1 slots) | 1f1b (S) | dualpipe (S+1, 2x stage params)
    ep: str = "alltoall"  # alltoall (sharding/expert.py: fixed-capacity blocks) | ragged (n·K rows, what-if)
    act_cache_bytes: int | None = None  # bytes per saved block-input value (None: model.dtype; 1: FP8 caching)
    head: str = "full"  # full: FP32 logits of the whole local batch | chunked: one micro-batch at a time
    outer_in_pipeline: bool = False  # embedding/dense on the first stage, head/MTP on the last, per micro-batch
    grad_buffers: int | None = None  # None: 2 with accumulation (this repo), else 1; or explicit
    saved_bytes_per_token_layer: float | None = None  # None: remat=full (the block input); else e.g. selective
    update_temps: float = 2.0  # FP32 param-sized trees the optimizer update holds besides the grads (measured)


def _batch(cfg: Config, sizes: dict[str, int]) -> dict[str, Any]:
    from dsv3_jax.training.schedule import Schedule

    t, m = cfg.train, cfg.model
    mb = Schedule(cfg).micro_batch_size
    n_acc = t.global_batch_size // mb
    Nb = math.prod(sizes[a] for a in BATCH)
    S = sizes["pipeline"]
    M = (cfg.mesh.pipeline_microbatches or 2 * S) if S > 1 else 1
    T = cfg.data.seq_len
    notes = []
    if mb % Nb:
        notes.append(f"train micro-batch {mb} does not divide over the {Nb} batch shards (data·fsdp·expert)")
    if S > 1 and (mb % M or (mb // M) % Nb):
        notes.append(f"pipeline micro-batch {mb}/{M} = {mb / M:g} sequences does not split evenly over {Nb} batch "
                     f"shards ({mb / M / Nb:.3g} sequences per device): choose mesh.pipeline_microbatches so that "
                     f"{mb} / M is a multiple of {Nb} (M = {mb // Nb} gives 1 sequence per device)")
    if S > 1 and m.num_moe_layers % S:
        notes.append(f"{m.num_moe_layers} MoE layers do not divide into {S} stages: planned with ceil = "
                     f"{-(-m.num_moe_layers // S)} layers on the busiest stage (sharding/pipeline.py pads the "
                     f"stack with identity layers to {-(-m.num_moe_layers // S) * S})")
    if m.remat != "full":
        notes.append(f"model.remat={m.remat}: the activation model assumes remat=full (block inputs only); "
                     f"saved activations are underestimated")
    tok = mb * T / Nb
    return {"micro_batch": mb, "accum_steps": n_acc, "seq_len": T, "batch_shards": Nb, "stages": S,
            "pipeline_microbatches": M, "tokens_per_device": tok, "tokens_per_device_microbatch": tok / M,
            "moe_layers_per_stage": -(-m.num_moe_layers // S), "notes": notes}


def _layer_values(m: ModelConfig, kind: str) -> float:
    """Values per token of one block's forward intermediates (excluding routed experts)."""
    h = m.num_attention_heads
    attn = ((m.q_lora_rank or 0) + h * (2 * m.qk_head_dim + m.qk_nope_head_dim + 2 * m.v_head_dim)
            + m.kv_lora_rank + m.qk_rope_head_dim + 2 * m.hidden_size)
    ffn = 3 * (m.intermediate_size if kind == "dense" else m.moe_intermediate_size * m.n_shared_experts)
    router = 3 * m.n_routed_experts * 2 if kind != "dense" else 0  # f32 scores, biased scores (counted as 2 B)
    return attn + ffn + router


XLA_SCORE_BUFFERS = 6  # f32 [h, T, T] buffers of XLA attention's backward: fitted to two H100 compiles (bench/results)


def _working_bytes(m: ModelConfig, kind: str, n: float, T: int) -> float:
    a = jnp.dtype(m.dtype).itemsize
    scores = XLA_SCORE_BUFFERS * m.num_attention_heads * T * 4 * n if m.attention_impl == "xla" else 0.0
    return 2 * _layer_values(m, kind) * n * a + scores


def _received_rows(m: ModelConfig, ep: int, n: float, capacity_factor: float) -> float:
    """Rows one device's experts compute per MoE layer: ep blocks of :func:`sharding.expert.capacity` rows."""
    from sharding.expert import capacity

    return ep * capacity(max(1, round(n * m.num_experts_per_tok)), ep, capacity_factor)


def _ep_bytes(m: ModelConfig, ep: int, n: float, impl: str, capacity_factor: float = 0.0) -> float:
    """Per-device dispatch buffers of one MoE layer on n local tokens (×2: forward + cotangents).

    ``alltoall`` (sharding/expert.py, this repo): the n·K token copies, the send buffer, the received rows
    (R = ep·cap), their expert-sorted copy, gate/up/SwiGLU [R, F], the expert outputs sorted, unsorted and sent
    back, the copies' outputs and the FP32 combine; with ep = 1 the local sort → grouped GEMM → unsort of
    ``moe.dispatch_ragged`` (R = n·K). ``ragged``: a ragged all-to-all's balanced n·K received rows (what-if)."""
    a, d, K, f = jnp.dtype(m.dtype).itemsize, m.hidden_size, m.num_experts_per_tok, m.moe_intermediate_size
    if impl == "alltoall" and ep > 1:
        r = _received_rows(m, ep, n, capacity_factor)
        fwd = 2 * n * K * d * a + 5 * r * d * a + 3 * r * f * a + n * d * 4
    else:
        r = n * K  # rows received (balanced)
        fwd = 2 * r * d * a + 3 * r * f * a + 2 * r * d * a
    return 2 * fwd


def _state_totals(rows: list[dict], cfg: Config, b: dict, k: Knobs) -> dict[str, dict[str, float]]:
    """Per group: params, grads, moments per-device bytes."""
    out: dict[str, dict[str, float]] = {}
    buffers = k.grad_buffers or (2 if b["accum_steps"] > 1 else 1)
    for r in rows:
        g = out.setdefault(r["group"], {"params": 0.0, "grads": 0.0, "moments": 0.0})
        if r["kind"] == "moments":
            g["moments"] += r["device_bytes"]
        else:
            g["params"] += r["device_bytes"]
            if r["kind"] == "params":
                g["grads"] += buffers * r["device_bytes"]  # grads of FP32 params are FP32, param-sharded
    return out


def _stage_layout(groups: dict[str, dict[str, float]], m: ModelConfig, S: int, mirror: bool, layer_b: float,
                  vec_b: float) -> tuple[dict[str, float], float, str]:
    """What-if layout: embedding + dense layers on stage 0, head + MTP on the last, the MoE layers spread to
    minimise the busiest device's params (``mirror``: DualPipe, device i also holds stage S−1−i).
    ``layer_b``: saved bytes per token of one block, ``vec_b``: of one [d] vector (embedding out, MTP pieces).
    Returns (state bytes of the busiest device, saved bytes per token per micro-batch on the worst stage, text)."""
    L, nd, D = m.num_moe_layers, m.first_k_dense_replace, m.num_nextn_predict_layers
    Ls = -(-L // S)
    per_layer = {key: v / Ls for key, v in groups["moe"].items()}
    first = {key: groups.get("embed", {}).get(key, 0) + groups.get("dense", {}).get(key, 0) for key in per_layer}
    last = {key: groups.get("head", {}).get(key, 0) + groups.get("mtp", {}).get(key, 0) for key in per_layer}
    first_in = vec_b + nd * layer_b  # embedding output + dense blocks
    last_in = (3 + 4 * D) * vec_b + D * layer_b  # hidden, pipeline output, head input; MTP pieces + block
    if S == 1:
        st = {key: first[key] + last[key] + L * per_layer[key] for key in per_layer}
        return st, first_in + last_in + L * layer_b, f"all {L} MoE layers"
    best = None
    for x in range(Ls + 1):
        for y in range(Ls + 1):
            if S == 2 and x + y != L:
                continue
            mid = -(-(L - x - y) // (S - 2)) if S > 2 else 0
            f = {key: first[key] + x * per_layer[key] for key in per_layer}
            la = {key: last[key] + y * per_layer[key] for key in per_layer}
            mi = {key: mid * per_layer[key] for key in per_layer}
            devices = ([("first+last", f, la), ("middle+middle", mi, mi)] if mirror else
                       [("first", f), ("last", la), ("middle", mi)])
            loads = [(sum(sum(part.values()) for part in dev[1:]), dev) for dev in devices]
            worst = max(loads, key=lambda t: t[0])
            if best is None or worst[0] < best[0]:
                best = (worst[0], worst[1], x, y, mid)
    _, dev, x, y, mid = best
    st = {key: sum(part[key] for part in dev[1:]) for key in per_layer}
    inputs = max(first_in + x * layer_b, last_in + y * layer_b, mid * layer_b)
    return st, inputs, (f"{dev[0]} stage{'s' if mirror else ''} (first: embed+dense+{x} MoE, last: head+MTP+{y} "
                        f"MoE, middle: {mid} MoE{'; DualPipe: device i holds stages i and S-1-i' if mirror else ''})")


def selective_bytes_per_token_layer(m: ModelConfig) -> float:
    """Saved bytes per token per MoE layer under the report's recipe (TR §3.3, REFERENCE §4/§8): recompute
    RMSNorm, MLA up-projections and SwiGLU; cache GEMM inputs in FP8, the o_proj input in E5M6 (1.5 B), the
    residual stream in BF16. A rough estimate (the report gives no per-tensor list)."""
    d, h, K, f = m.hidden_size, m.num_attention_heads, m.num_experts_per_tok, m.moe_intermediate_size
    return (d + (m.q_lora_rank or 0) + m.kv_lora_rank + m.qk_rope_head_dim  # attention GEMM inputs, FP8
            + h * 4  # softmax log-sum-exp, FP32
            + 1.5 * h * m.v_head_dim  # o_proj input, E5M6
            + d  # MLP input, FP8
            + K * d + 2 * K * f  # dispatched expert inputs + SwiGLU inputs, FP8
            + 2 * f * m.n_shared_experts  # shared expert SwiGLU inputs, FP8
            + 4 * m.n_routed_experts  # router scores, FP32
            + 2 * d)  # residual stream, BF16


def memory(cfg: Config, sizes: dict[str, int], rows: list[dict], k: Knobs = Knobs()) -> dict[str, Any]:
    m, b = cfg.model, _batch(cfg, sizes)
    a = jnp.dtype(m.dtype).itemsize
    d, V, D, T = m.hidden_size, m.vocab_size, m.num_nextn_predict_layers, b["seq_len"]
    S, M, Ls = b["stages"], b["pipeline_microbatches"], b["moe_layers_per_stage"]
    tok, tok_pm = b["tokens_per_device"], b["tokens_per_device_microbatch"]
    ep = sizes["expert"]
    cf = cfg.mesh.expert_capacity_factor
    per_tok = k.saved_bytes_per_token_layer or d * (k.act_cache_bytes or a)  # one saved block input

    groups = _state_totals(rows, cfg, b, k)
    slots = {"gpipe": M + S - 1, "1f1b": S, "dualpipe": S + 1}[k.schedule] if S > 1 else 1
    outer_units = 1 + m.first_k_dense_replace + 3 + 5 * D
    if k.outer_in_pipeline:
        st, per_mb, where = _stage_layout(groups, m, S, k.schedule == "dualpipe", per_tok,
                                          d * (k.act_cache_bytes or a))
        saved_pipe, saved_outer = slots * per_mb * tok_pm, 0.0
        outer_tok = tok_pm
    else:
        # sharding/rules.py: outside the stack the sequence is split over `pipeline` (when T divides), so each
        # device runs the embedding, dense layers, head and MTP on 1/S of its tokens; attention there gathers the
        # latent and up-projects the whole sequence's keys and values.
        cp = S if S > 1 and T % S == 0 else 1
        where = ("every device (embedding and LM head split over pipeline by the vocab rule; dense layers and MTP "
                 f"replicated over pipeline{f', their tokens split {cp} ways over it' if cp > 1 else ''})")
        st = {key: sum(g[key] for g in groups.values()) for key in ("params", "grads", "moments")}
        if k.schedule == "dualpipe":  # two copies of the stage's layers (TR Table 2: parameters 2x)
            st = {key: st[key] + groups["moe"][key] for key in st}
        outer_tok = tok / cp
        saved_pipe = slots * Ls * tok_pm * per_tok
        saved_outer = outer_units * outer_tok * d * (k.act_cache_bytes or a)
    # FSDP over pipeline (partition.py): one layer's weights gathered, and its grads before the reduce-scatter
    def gathered(group, layers):
        full = sum(r["device_bytes"] * S for r in rows if r["kind"] == "params" and r["group"] == group
                   and any("pipeline" in _names(e) for e in r["spec"]))
        return 2 * full / max(layers, 1) if S > 1 and not k.outer_in_pipeline else 0.0

    # keys and values of the whole local sequences, where the queries' positions are split (and cotangents)
    kv_full = (2 * tok * m.num_attention_heads * (m.qk_head_dim + m.v_head_dim) * a
               if not k.outer_in_pipeline and outer_tok < tok else 0.0)
    head_tok = tok_pm if k.head == "chunked" else outer_tok
    logits = (1 + D + 1) * head_tok * V * 4 if k.head == "full" else 2 * head_tok * V * 4

    phases = {
        "head backward": {"activations (saved)": saved_pipe + saved_outer, "logits": logits},
        "MoE stage backward": {"activations (saved)": saved_pipe + saved_outer,
                               "layer working set": _working_bytes(m, "moe", tok_pm, T),
                               "EP dispatch buffers": _ep_bytes(m, ep, tok_pm, k.ep, cf)},
    }
    if m.first_k_dense_replace:
        phases["dense layer backward"] = {"activations (saved)": saved_outer if not k.outer_in_pipeline
                                          else saved_pipe,
                                          "layer working set": _working_bytes(m, "dense", outer_tok, T) + kv_full
                                                             + gathered("dense", m.first_k_dense_replace)}
    if D:
        phases["MTP layer backward"] = {"activations (saved)": saved_pipe + saved_outer,
                                        "layer working set": (_working_bytes(m, "moe", outer_tok, T) + kv_full
                                                              + gathered("mtp", D)),
                                        "EP dispatch buffers": _ep_bytes(m, ep, outer_tok, k.ep, cf)}
    # After the backward: grads (accumulated) + the update's FP32 temporaries (clipped grads, the Adam
    # direction), param-sharded. 2 trees is what XLA allocated for the step on an H100 (bench/results).
    fp32_tree = st["grads"] / (k.grad_buffers or (2 if b["accum_steps"] > 1 else 1))
    phases["optimizer update"] = {"optimizer update temporaries": k.update_temps * fp32_tree}
    totals = {name: sum(v.values()) for name, v in phases.items()}
    peak = max(totals, key=totals.get)
    terms = {"params": st["params"], "grads": st["grads"], "optimizer moments": st["moments"]}
    for key in ("activations (saved)", "logits", "layer working set", "EP dispatch buffers",
                "optimizer update temporaries"):
        terms[key] = phases[peak].get(key, 0.0)
    total = sum(terms.values())
    return {"terms": terms, "total": total, "peak_phase": peak,
            "phases": {n: {"total": totals[n] + st["params"] + st["grads"] + st["moments"], **v}
                       for n, v in phases.items()},
            "state_where": where, "pipeline_slots": slots, "knobs": dataclasses.asdict(k),
            "groups": groups}


def collectives(cfg: Config, sizes: dict[str, int], rows: list[dict], k: Knobs = Knobs()) -> list[dict]:
    """Rows {axis, what, bytes}: bytes each device sends per optimizer step (see the module docstring)."""
    m, b = cfg.model, _batch(cfg, sizes)
    a = jnp.dtype(m.dtype).itemsize
    d, K = m.hidden_size, m.num_experts_per_tok
    S, M, Ls, n_acc = b["stages"], b["pipeline_microbatches"], b["moe_layers_per_stage"], b["accum_steps"]
    iters = (M + S - 1) if S > 1 else 1
    cp = S if S > 1 and b["seq_len"] % S == 0 else 1  # outside the stack the sequence is split over pipeline
    out: dict[tuple[str, str], float] = {}

    def add(axis, what, x):
        if x:
            out[(axis, what)] = out.get((axis, what), 0.0) + x

    for r in rows:
        if r["kind"] != "params":
            continue
        X = r["device_bytes"]  # FP32 grads of this device's param shard
        spec_axes = {ax for e in r["spec"] for ax in _names(e)}
        red = [ax for ax in BATCH if sizes[ax] > 1 and ax not in spec_axes]
        if cfg.mesh.zero1 and "data" in red:
            n = sizes["data"]
            add("data", "ZeRO-1 grad reduce-scatter (FP32)", (n - 1) / n * X)
            add("data", "ZeRO-1 param all-gather (FP32)", (n - 1) / n * X)
            X /= n
            red.remove("data")
        for ax in red:
            n = sizes[ax]
            add(ax, "grad all-reduce (FP32)" + (" — non-expert weights" if ax == "expert" else ""),
                2 * (n - 1) / n * X)
        if S > 1 and r["group"] != "moe":  # outside the stack the stages hold different tokens
            full = r["device_bytes"] * (S if "pipeline" in spec_axes else 1)
            if "pipeline" in spec_axes and r["group"] in ("dense", "mtp"):  # FSDP over pipeline (partition.py)
                add("pipeline", "dense/MTP param all-gather (fwd + recompute, FP32)",
                    n_acc * 2 * (S - 1) / S * full)
                add("pipeline", "dense/MTP grad reduce-scatter (FP32)", n_acc * (S - 1) / S * full)
            elif "pipeline" in spec_axes:  # embedding / head: vocab-split, the tokens' activations move instead
                pass
            else:
                add("pipeline", "grad all-reduce (FP32) — small weights outside the stack", 2 * (S - 1) / S * X)
        if sizes["fsdp"] > 1 and "fsdp" in spec_axes:
            n = sizes["fsdp"]
            full = r["device_bytes"] * n
            add("fsdp", "param all-gather (fwd + recompute)", n_acc * 2 * (n - 1) / n * full * a / 4)
            add("fsdp", "grad reduce-scatter (FP32)", n_acc * (n - 1) / n * full)

    ep = sizes["expert"]
    if ep > 1 and m.num_moe_layers:
        def per_layer(n):  # forward, remat recompute, backward
            if k.ep == "alltoall":  # dense blocks of cap rows to each peer, both ways, in the compute dtype
                cap = _received_rows(m, ep, n, cfg.mesh.expert_capacity_factor) / ep
                return 3 * (ep - 1) * cap * (2 * d * a + 4)  # + the int32 expert id of each row
            disp = 1 if cfg.train.precision == "fp8" else a  # the report sends dispatch in FP8, combine in BF16
            return 3 * (ep - 1) / ep * n * K * d * (disp + a)
        what = ("EP all-to-all dispatch + combine" if k.ep == "alltoall"
                else "what-if: ragged all-to-all, FP8 dispatch (n·K rows)")
        add("expert", f"{what}, MoE stage ({Ls} layers × {iters} iterations × {n_acc})",
            n_acc * iters * Ls * per_layer(b["tokens_per_device_microbatch"]))
        if m.num_nextn_predict_layers:
            add("expert", f"{what}, MTP ({m.num_nextn_predict_layers} layer × {n_acc})",
                n_acc * m.num_nextn_predict_layers * per_layer(b["tokens_per_device"] / cp))
    if S > 1:
        add("pipeline", f"activations fwd + grads bwd ({iters} iterations × {n_acc})",
            n_acc * iters * 2 * b["tokens_per_device_microbatch"] * d * a)
        if cp > 1:  # whole sequences gathered into the stack and its cotangent reduce-scattered back
            add("pipeline", f"stack input all-gather + cotangent reduce-scatter ({n_acc})",
                n_acc * 2 * (cp - 1) / cp * b["tokens_per_device"] * d * a)
    return [{"axis": ax, "what": w, "bytes": v} for (ax, w), v in out.items()]


LADDER = (
    ("this repo today", {}),
    ("+ one grad buffer, update in place per layer", {"grad_buffers": 1, "update_temps": 0.0}),
    ("+ FP8 cached block inputs", {"act_cache_bytes": 1}),
    ("+ 1F1B in-flight micro-batches (S)", {"schedule": "1f1b"}),
)
# Not cumulative: DeepSeek's placement instead of this repo's sequence split of the outer layers over `pipeline`
# (no dense/MTP weight traffic on that axis, but the end stages hold those layers whole).
ALTERNATIVES = (
    ("instead: embed/dense on first stage, head/MTP on last, chunked",
     {"outer_in_pipeline": True, "head": "chunked"}),
)


def report_recipe(m: ModelConfig) -> Knobs:
    """The TR's setting (REFERENCE §10, §8): DualPipe, all-to-all EP, embedding/head on the end stages, one
    FP32 grad buffer, selective recompute with FP8 activation caching (moments and ZeRO-1 come from the config)."""
    return Knobs(schedule="dualpipe", ep="ragged", head="chunked", outer_in_pipeline=True, grad_buffers=1,
                 update_temps=0.0, saved_bytes_per_token_layer=selective_bytes_per_token_layer(m))


def _max_tokens(mm: dict, budget: float, b: dict) -> float:
    """Tokens per device per pipeline micro-batch at which the peak would just fit: every activation term is
    linear in the micro-batch, the state is not (scales the micro-batch at a fixed number of micro-batches)."""
    state = mm["terms"]["params"] + mm["terms"]["grads"] + mm["terms"]["optimizer moments"]
    best = math.inf
    for name, ph in mm["phases"].items():
        if name == "optimizer update":  # does not depend on the micro-batch
            best = 0.0 if ph["total"] > budget else best
        elif ph["total"] > state:
            best = min(best, max(0.0, (budget - state) / (ph["total"] - state) * b["tokens_per_device_microbatch"]))
    return best


def plan(cfg: Config, mesh_sizes: dict[str, int] | str | None = None, *, gpu_mem_gb: float = 80.0,
         lower: bool = False, ladder: bool = True) -> dict[str, Any]:
    """The training plan of ``cfg`` on ``mesh_sizes`` (dict of axis sizes, or "pipeline=16,expert=64,data=2";
    None: the config's mesh) as a JSON-able dict: params, memory (this repo's code), collectives, the what-if
    ladder, and the lowering report when ``lower``."""
    sizes = mesh_sizes if isinstance(mesh_sizes, dict) else resolve_mesh(cfg, mesh_sizes)
    sizes = {ax: int(sizes.get(ax, 1)) for ax in AXES}
    cfg = dataclasses.replace(cfg, mesh=dataclasses.replace(cfg.mesh, **sizes))
    rows = state_leaves(cfg, sizes)
    counts = cfg.model.param_counts()
    leaf_total = sum(math.prod(r["shape"]) for r in rows if r["kind"] == "params")
    mem = memory(cfg, sizes, rows)
    budget = gpu_mem_gb * GB
    out: dict[str, Any] = {
        "config": {"mesh": sizes, "devices": math.prod(sizes.values()), "gpu_mem_gb": gpu_mem_gb,
                   "moments_dtype": cfg.train.moments_dtype, "zero1": cfg.mesh.zero1, "dtype": cfg.model.dtype,
                   "param_dtype": "float32", "remat": cfg.model.remat, "precision": cfg.train.precision},
        "params": {"total_with_mtp": leaf_total, "main": counts["total"], "activated": counts["active"],
                   "mtp": counts["mtp_total"], "per_device": sum(r["device_bytes"] for r in rows
                                                                 if r["kind"] == "params") / 4},
        "batch": _batch(cfg, sizes),
        "memory": {**mem, "fits": mem["total"] <= budget, "margin": budget - mem["total"]},
        "collectives": collectives(cfg, sizes, rows),
    }
    from dsv3_jax.training.metrics import flops_per_token

    b = out["batch"]
    step_tokens = cfg.train.global_batch_size * b["seq_len"]
    fpt = flops_per_token(cfg.model, b["seq_len"])
    n_dev = out["config"]["devices"]
    out["compute"] = {"flops_per_token": fpt, "tokens_per_step": step_tokens,
                      "flops_per_device_per_step": fpt * step_tokens / n_dev,
                      # MoE layers hold 58/61 of the compute; the replicated outer parts run on every stage
                      "seconds_at_peak": fpt * step_tokens / n_dev / PEAK_FLOPS}
    link = {ax: LINK_BYTES_PER_S for ax in AXES}
    out["collective_seconds"] = {ax: sum(r["bytes"] for r in out["collectives"] if r["axis"] == ax) / link[ax]
                                 for ax in AXES if any(r["axis"] == ax for r in out["collectives"])}
    if ladder:
        steps, k = [], Knobs()
        for label, change in LADDER:
            k = dataclasses.replace(k, **change)
            mm = memory(cfg, sizes, rows, k)
            steps.append({"label": label, "total": mm["total"], "fits": mm["total"] <= budget,
                          "peak_phase": mm["peak_phase"], "terms": mm["terms"], "knobs": dataclasses.asdict(k),
                          "max_tokens_per_microbatch": _max_tokens(mm, budget, b)})
        for label, change in ALTERNATIVES:
            mm = memory(cfg, sizes, rows, Knobs(**change))
            steps.append({"label": label, "total": mm["total"], "fits": mm["total"] <= budget,
                          "peak_phase": mm["peak_phase"], "terms": mm["terms"],
                          "knobs": dataclasses.asdict(Knobs(**change)),
                          "max_tokens_per_microbatch": _max_tokens(mm, budget, b)})
        rk = report_recipe(cfg.model)
        mm = memory(cfg, sizes, rows, rk)
        steps.append({"label": "report's recipe (DualPipe, selective recompute + FP8 cache)", "total": mm["total"],
                      "fits": mm["total"] <= budget, "peak_phase": mm["peak_phase"], "terms": mm["terms"],
                      "knobs": dataclasses.asdict(rk), "state_where": mm["state_where"],
                      "max_tokens_per_microbatch": _max_tokens(mm, budget, b)})
        out["ladder"] = steps
        out["collectives_ragged"] = collectives(cfg, sizes, rows, Knobs(ep="ragged"))
    if lower:
        out["lowered"] = lower_step(cfg, sizes)
    return out


# ----------------------------------------------------------------------------------------------------------
# Lowering the real step (no allocation)
# ----------------------------------------------------------------------------------------------------------


def lower_step(cfg: Config, sizes: dict[str, int]) -> dict[str, Any]:
    """Trace + lower ``_train_core`` for cuda on an AbstractMesh with ShapeDtypeStruct args; when the mesh fits
    the local devices also compile it there and report XLA's memory analysis."""
    from dsv3_jax.training import optim
    from dsv3_jax.training import step as st
    from sharding.partition import microbatch_sharding, parallel_context, state_shardings

    b = _batch(cfg, sizes)
    res: dict[str, Any] = {}

    def args(mesh):
        p, r, o = abstract_state(cfg)
        ps, rs, os_ = state_shardings(p, r, o, cfg.model, mesh, cfg.mesh.zero1)
        sds = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
        rep = NamedSharding(mesh, P())
        tok = jax.ShapeDtypeStruct((b["accum_steps"], b["micro_batch"], b["seq_len"] + 1), jnp.int32,
                                   sharding=microbatch_sharding(mesh))
        hyper = st.Hyper(*(jax.ShapeDtypeStruct((), jnp.float32, sharding=rep) for _ in range(3)))
        return (jax.tree.map(sds, p, ps), jax.tree.map(sds, r, rs), jax.tree.map(sds, o, os_),
                jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=rep), tok, hyper)

    static = {"model_cfg": st.training_model_config(cfg), "opt": optim.OptimSettings.from_train(cfg.train),
                  "balance_alpha": cfg.train.balance_alpha}
    t0 = time.perf_counter()
    try:
        mesh = abstract_mesh(sizes)
        abstract_args = args(mesh)  # outside the context: the shardings come from an init traced without EP
        with parallel_context(mesh, cfg.mesh.pipeline_microbatches,
                              expert_capacity_factor=cfg.mesh.expert_capacity_factor):
            lowered = st._train_core.trace(*abstract_args, **static).lower(lowering_platforms=("cuda",))
    except (ValueError, TypeError, NotImplementedError, RuntimeError) as e:  # the analytic plan still stands
        res["error"] = f"{type(e).__name__}: {' '.join(str(e).split())[:600]}"
        res["seconds"] = time.perf_counter() - t0
        return res
    res["seconds"] = time.perf_counter() - t0
    text = lowered.as_text()
    res["collectives_in_module"] = {op: len(re.findall(rf"stablehlo\.{op}\b", text)) for op in
                                    ("all_gather", "reduce_scatter", "all_reduce", "all_to_all",
                                     "collective_permute")}
    try:
        ca = lowered.cost_analysis()
        res["flops"] = float(ca.get("flops", 0.0))
        res["bytes_accessed"] = float(ca.get("bytes accessed", 0.0))
    except (ValueError, TypeError, NotImplementedError, RuntimeError) as e:
        res["cost_analysis_error"] = f"{type(e).__name__}: {e}"[:300]
    res["memory_analysis"] = None
    res["analytic_state_bytes"] = sum(r["device_bytes"] for r in state_leaves(cfg, sizes))
    n = math.prod(sizes.values())
    if n <= jax.device_count():
        from sharding.mesh import make_mesh

        mesh = make_mesh(MeshConfig(**sizes), jax.devices()[:n])
        abstract_args = args(mesh)
        with parallel_context(mesh, cfg.mesh.pipeline_microbatches,
                              expert_capacity_factor=cfg.mesh.expert_capacity_factor):
            comp = st._train_core.trace(*abstract_args, **static).lower().compile()
        ma = comp.memory_analysis()
        if ma is not None:
            res["memory_analysis"] = {f: int(getattr(ma, f)) for f in (
                "argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
                "generated_code_size_in_bytes", "alias_size_in_bytes") if hasattr(ma, f)}
            res["memory_analysis"]["backend"] = jax.devices()[0].platform
    else:
        res["memory_analysis_note"] = (f"XLA memory analysis needs a compile for the {n} target devices "
                                       f"(only {jax.device_count()} here): analytic model only")
    return res


# ----------------------------------------------------------------------------------------------------------
# Serving
# ----------------------------------------------------------------------------------------------------------


def serve_plan(cfg: Config, gpus: int, gpu_mem_gb: float, *, fp8: bool = False, mtp: bool = False,
               kv_dtype: str = "bfloat16", reserve_gb: float = 10.0,
               batches: tuple[int, ...] = (1, 8, 32, 64, 128, 256)) -> dict[str, Any]:
    """Serving on ``gpus`` devices: experts over all of them (mesh expert=gpus), attention and everything else
    replicated and data-parallel over the batch (each device caches only its own sequences' latents).

    Weights from ``eval_shape`` of the serving model (BF16, or with ``fp8`` the checkpoint format: E4M3 linear
    weights + FP32 128×128 block scales, embeddings/head/norms/gate BF16) and the real shardings. KV: the
    absorbed path caches (kv_lora_rank + qk_rope_head_dim) values per token per layer (576 for V3) for the
    main layers, + the MTP module's layer when ``mtp`` (speculative decoding). ``reserve_gb`` covers
    activations, CUDA graphs/NCCL and fragmentation.
    """
    from sharding.partition import variable_shardings

    m = dataclasses.replace(cfg.model, param_dtype="bfloat16", dtype="bfloat16", fp8_weights=fp8,
                            num_nextn_predict_layers=cfg.model.num_nextn_predict_layers if mtp else 0)
    from dsv3_jax.model import Transformer

    abstract = jax.eval_shape(lambda t: Transformer(m).init(jax.random.key(0), t),
                              jax.ShapeDtypeStruct((1, 1), jnp.int32))
    import flax.linen as nn

    abstract = nn.meta.unbox(abstract)
    sizes = {ax: 1 for ax in AXES} | {"expert": gpus}
    sh = variable_shardings(m, abstract_mesh(sizes))
    total = per_dev = expert_dev = 0
    for x, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(sh, is_leaf=lambda v: isinstance(v, NamedSharding))):
        nb = device_bytes(x.shape, x.dtype, s.spec, sizes)
        total += x.size * x.dtype.itemsize
        per_dev += nb
        if any("expert" in _names(e) for e in s.spec):
            expert_dev += nb
    layers = m.num_hidden_layers + (m.num_nextn_predict_layers if mtp else 0)
    kv_tok = layers * m.latent_cache_dim * jnp.dtype(kv_dtype).itemsize
    free = gpu_mem_gb * GB - per_dev - reserve_gb * GB
    tokens_dev = max(0.0, free) / kv_tok
    rows = []
    for B in batches:
        per = -(-B // gpus)
        ctx = tokens_dev / per
        rows.append({"batch": B, "seqs_per_device": per, "max_context": int(ctx),
                     "max_context_capped": int(min(ctx, m.max_position_embeddings))})
    return {"gpus": gpus, "gpu_mem_gb": gpu_mem_gb, "weights": "fp8 (E4M3 + block scales)" if fp8 else "bf16",
            "mtp": mtp, "mesh": sizes, "weights_total_bytes": total, "weights_per_device_bytes": per_dev,
            "expert_weights_per_device_bytes": expert_dev, "replicated_weights_per_device_bytes": per_dev - expert_dev,
            "kv_layers": layers, "kv_values_per_token_per_layer": m.latent_cache_dim, "kv_dtype": kv_dtype,
            "kv_bytes_per_token": kv_tok, "reserve_gb": reserve_gb, "free_for_kv_bytes": free,
            "kv_tokens_per_device": int(tokens_dev), "fits": free > 0, "batches": rows,
            "suggested_mesh": f"expert={gpus} (EP over all GPUs for the routed experts; attention, dense layers, "
                              f"embedding and head replicated, batch data-parallel over the same {gpus} devices)"}


# ----------------------------------------------------------------------------------------------------------
# Printing
# ----------------------------------------------------------------------------------------------------------


_UNIT = [GB, "GB"]  # set per printed plan: MB for small configs


def _gb(x: float) -> str:
    return f"{x / _UNIT[0]:9.2f}"


def _n(x: float) -> str:
    return f"{x / 1e9:.2f}B" if x >= 1e9 else f"{x / 1e6:.2f}M"


def format_plan(p: dict[str, Any]) -> str:
    c, b, mem, pr = p["config"], p["batch"], p["memory"], p["params"]
    _UNIT[:] = [GB, "GB"] if mem["total"] >= GB else [1e6, "MB"]
    U = _UNIT[1]
    mesh = " × ".join(f"{ax}={n}" for ax, n in c["mesh"].items() if n > 1) or "one device"
    L = [f"Plan: {mesh} ({c['devices']} devices), per device, GB = 1e9 bytes, budget {c['gpu_mem_gb']:g} GB",
         (f"params: {_n(pr['total_with_mtp'])} with MTP = {_n(pr['main'])} main + {_n(pr['mtp'])} MTP; activated "
          f"{_n(pr['activated'])}/token; {_n(pr['per_device'])} on the busiest device"),
         (f"batch: {b['accum_steps']} × {b['micro_batch']} sequences of {b['seq_len']}; "
         f"{b['tokens_per_device']:.0f} tokens/device per micro-batch; pipeline {b['stages']} stages × "
         f"{b['pipeline_microbatches']} micro-batches ({b['tokens_per_device_microbatch']:.0f} tokens/device), "
         f"{b['moe_layers_per_stage']} MoE layers on the busiest stage"),
         (f"recipe: params FP32, moments {c['moments_dtype']} (ZeRO-1 {'on' if c['zero1'] else 'off'}), "
         f"activations {c['dtype']}, remat {c['remat']}, precision {c['precision']}")]
    L += [f"note: {n}" for n in b["notes"]]
    L += ["", f"Memory (this repo's code; peak phase: {mem['peak_phase']}; state on {mem['state_where']})",
          f"  {'term':<24}{U:>9}"]
    L += [f"  {k:<24}{_gb(v)}" for k, v in mem["terms"].items()]
    verdict = "FITS" if mem["fits"] else "DOES NOT FIT"
    L += [(f"  {'total':<24}{_gb(mem['total'])}   {verdict} in {c['gpu_mem_gb']:g} GB "
          f"(margin {mem['margin'] / GB:+.2f} GB)")]
    biggest = max(mem["terms"], key=mem["terms"].get)
    L += [f"  dominant term: {biggest} ({mem['terms'][biggest] / _UNIT[0]:.2f} {U})"]
    L += [f"  phases ({U}): " + "; ".join(f"{n} {v['total'] / _UNIT[0]:.1f}" for n, v in mem["phases"].items())]
    if "ladder" in p:
        L += ["", "What else would help (what-ifs, analytic; only the first row is implemented; the next rows add up):",
              f"  {'step':<60}{'total ' + U:>9}  {'verdict':<13}{'fits up to':>11}  largest term"]
        for s in p["ladder"]:
            big = max(s["terms"], key=s["terms"].get)
            L += [(f"  {s['label']:<60}{_gb(s['total'])}  {'FITS' if s['fits'] else 'DOES NOT FIT':<13}"
                   f"{s['max_tokens_per_microbatch']:>11.0f}  {big} {s['terms'][big] / _UNIT[0]:.1f}")]
        L += [("  (fits up to: tokens per device per pipeline micro-batch at which that row's peak would fit; "
              f"now {b['tokens_per_device_microbatch']:.0f})")]
    L += ["", "Collectives per optimizer step (bytes sent per device, analytic)",
          f"  {'axis':<10}{U:>10}  what"]
    for r in sorted(p["collectives"], key=lambda r: AXES.index(r["axis"])):
        L += [f"  {r['axis']:<10}{r['bytes'] / _UNIT[0]:10.2f}  {r['what']}"]
    alt = [r for r in p.get("collectives_ragged", []) if "EP" in r["what"]]
    cs, co = p["collective_seconds"], p["compute"]
    L_time = [f"  time at {LINK_BYTES_PER_S / 1e9:g} GB/s per GPU (IB), not overlapped: "
              + ", ".join(f"{ax} {t:.1f} s" for ax, t in cs.items())
              + f"; compute {co['flops_per_device_per_step']:.3e} FLOPs/device/step = {co['seconds_at_peak']:.1f} s "
              f"at {PEAK_FLOPS / 1e12:g} TFLOP/s peak ({co['flops_per_token']:.3e} FLOPs/token, "
              f"{co['tokens_per_step']:,} tokens/step)"]
    for r in alt:
        L += [f"  {r['axis']:<10}{r['bytes'] / _UNIT[0]:10.2f}  {r['what']}"]
    L += L_time
    ep_bytes = sum(r["bytes"] for r in p["collectives"] if r["axis"] == "expert" and "EP" in r["what"])
    if ep_bytes:
        L += [f"  EP all-to-all alone: {ep_bytes / 50e9:.1f} s at 50 GB/s (InfiniBand), {ep_bytes / 400e9:.1f} s at "
              f"400 GB/s (NVLink), not overlapped (this repo does not overlap it with compute)"]
    if "lowered" in p:
        lo = p["lowered"]
        L += ["", "Lowered train step (cuda, AbstractMesh, no allocation)"]
        if "error" in lo:
            L += [f"  not lowered ({lo['seconds']:.1f} s): {lo['error']}"]
        else:
            L += [(f"  lowered in {lo['seconds']:.1f} s; module cost analysis {lo.get('flops', 0):.3e} FLOPs (not the "
                   f"step's: loop bodies counted once, shard_map bodies per shard)"),
                  (f"  collectives in the lowered module {lo['collectives_in_module']} (the shard_map ones; the "
                   f"partitioner adds the rest at compile)")]
            if lo.get("memory_analysis"):
                ma = lo["memory_analysis"]
                L += [f"  XLA memory analysis ({ma['backend']} compile on local devices): " + ", ".join(
                    f"{k.removesuffix('_size_in_bytes')} {v / 1e6:.2f} MB" for k, v in ma.items() if k != "backend")]
                L += [(f"  analytic state (params + router + moments) {lo['analytic_state_bytes'] / 1e6:.2f} MB vs "
                      f"XLA arguments {ma['argument_size_in_bytes'] / 1e6:.2f} MB (+ tokens, rng, scalars); analytic "
                      f"grads + activations {(mem['total'] - mem['terms']['params'] - mem['terms']['optimizer moments']) / 1e6:.2f}"
                      f" MB vs XLA temp {ma['temp_size_in_bytes'] / 1e6:.2f} MB")]
                xla_total = ma["argument_size_in_bytes"] + ma["temp_size_in_bytes"]
                L += [(f"  per-device peak: plan {mem['total'] / 1e9:.2f} GB vs XLA (arguments + temp) "
                       f"{xla_total / 1e9:.2f} GB: {xla_total / mem['total'] - 1:+.1%}"
                       + (" (a CPU compile: XLA attention and BF16/emulated FP8 are what it runs; plan with "
                          "model.attention_impl=xla train.precision=bf16 to compare like with like)"
                          if ma["backend"] == "cpu" else ""))]
            else:
                L += [f"  {lo.get('memory_analysis_note', '')}"]
    return "\n".join(L)


def format_serve(s: dict[str, Any]) -> str:
    L = [(f"Serving: {s['gpus']} GPUs × {s['gpu_mem_gb']:g} GB, weights {s['weights']}, MTP "
         f"{'kept (speculative)' if s['mtp'] else 'dropped'}"),
         f"suggested mesh: {s['suggested_mesh']}",
         f"  weights total              {s['weights_total_bytes'] / GB:9.2f} GB",
         (f"  weights per device         {s['weights_per_device_bytes'] / GB:9.2f} GB "
         f"(experts {s['expert_weights_per_device_bytes'] / GB:.2f} + replicated "
         f"{s['replicated_weights_per_device_bytes'] / GB:.2f})"),
         f"  reserve (activations, CUDA/NCCL) {s['reserve_gb']:5.1f} GB",
         (f"  KV (latent) per token      {s['kv_bytes_per_token']:9d} B = {s['kv_layers']} layers × "
         f"{s['kv_values_per_token_per_layer']} values × {jnp.dtype(s['kv_dtype']).itemsize} B ({s['kv_dtype']})"),
         (f"  free for KV per device     {s['free_for_kv_bytes'] / GB:9.2f} GB → "
         f"{s['kv_tokens_per_device']:,} tokens/device, {'FITS' if s['fits'] else 'DOES NOT FIT'}"),
         "", f"  {'batch':>6} {'seqs/device':>12} {'max context/seq':>16} {'capped at max_pos':>18}"]
    L += [f"  {r['batch']:>6} {r['seqs_per_device']:>12} {r['max_context']:>16,} {r['max_context_capped']:>18,}"
          for r in s["batches"]]
    if not s["fits"]:
        L += [("  DOES NOT FIT: the weights alone exceed a device; use the FP8 checkpoint (--fp8), more GPUs, or also "
              "shard attention/dense weights (tensor parallel within a node, as the report's prefill TP4 does)")]
    return "\n".join(L)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sharding.plan", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--mesh", help="axis sizes, e.g. pipeline=16,expert=64,data=2 (default: the config's)")
    ap.add_argument("--gpu-mem", type=float, default=None, help="GB per device (default 80 train, 141 serve)")
    ap.add_argument("--lower", action=argparse.BooleanOptionalAction, default=None,
                    help="lower the real step on an AbstractMesh (default: on below 10B params)")
    ap.add_argument("--serve", action="store_true", help="serving plan instead of training")
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--fp8", action="store_true", help="serve the FP8 checkpoint format (E4M3 + block scales)")
    ap.add_argument("--mtp", action="store_true", help="serve with the MTP module (speculative decoding)")
    ap.add_argument("--kv-dtype", default="bfloat16", choices=("bfloat16", "float32", "float8_e4m3fn"))
    ap.add_argument("--reserve", type=float, default=10.0, help="GB per device kept for activations/runtime")
    ap.add_argument("--json", help="write the plan as JSON here")
    ap.add_argument("overrides", nargs="*", help="config overrides key=value")
    a = ap.parse_args(argv)
    try:
        cfg = load_config(a.config, a.overrides)
        if a.serve:
            out = serve_plan(cfg, a.gpus, a.gpu_mem or 141.0, fp8=a.fp8, mtp=a.mtp, kv_dtype=a.kv_dtype,
                             reserve_gb=a.reserve)
            print(format_serve(out))
        else:
            lower = a.lower if a.lower is not None else sum(cfg.model.param_counts()[k] for k in
                                                            ("total", "mtp_total")) < 10e9
            out = plan(cfg, a.mesh, gpu_mem_gb=a.gpu_mem or 80.0, lower=lower)
            print(format_plan(out))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
