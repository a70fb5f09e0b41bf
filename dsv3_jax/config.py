"""Typed configuration: model, data, training, mesh.

One frozen dataclass per concern, nested under :class:`Config`. Configs load from our YAML files
(``configs/*.yaml``), take dotted ``key=value`` overrides from the command line, and convert to and from a
Hugging Face ``config.json`` (REFERENCE §1). Every error names the key, the value and what was expected.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml


class ConfigError(ValueError):
    """A configuration key or value is wrong; the message says which and what is allowed."""


# ----------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """YaRN context extension (REFERENCE §3). ``mscale``/``mscale_all_dim`` None = key absent in HF config."""

    type: Literal["yarn"] = "yarn"  # only YaRN is supported
    factor: float = 40.0  # s: context extension factor (extended / original length)
    original_max_position_embeddings: int = 4096  # the pre-training context the frequencies were tuned for
    beta_fast: float = 32.0  # YaRN ramp: rotations above this count keep their frequency (extrapolate)
    beta_slow: float = 1.0  # YaRN ramp: rotations below this count are fully interpolated
    mscale: float | None = 1.0  # cos/sin factor yarn(s, mscale) / yarn(s, mscale_all_dim), yarn = 0.1·m·ln s + 1
    mscale_all_dim: float | None = 1.0  # also multiplies the softmax scale by yarn(s, mscale_all_dim)² (REFERENCE §3)
    attention_factor: float | None = None  # explicit cos/sin factor (HF key); None = from mscale terms
    truncate: bool = True  # floor/ceil the correction range (HF's default)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """DeepSeek-V3 architecture. Field names follow HF ``config.json`` (REFERENCE §1); defaults are the 671B."""

    vocab_size: int = 129280  # tokens in the embedding and the output head
    hidden_size: int = 7168  # d: width of the residual stream
    intermediate_size: int = 18432  # hidden width of the dense SwiGLU MLP (first_k_dense_replace layers)
    moe_intermediate_size: int = 2048  # hidden width of each routed and shared expert
    num_hidden_layers: int = 61  # transformer blocks of the main model (MTP blocks not counted)
    first_k_dense_replace: int = 3  # the first k blocks use a dense MLP, the rest MoE
    num_attention_heads: int = 128  # MLA heads (no GQA: every head has its own keys/values from the latent)
    q_lora_rank: int | None = 1536  # query low-rank width; null = a plain q_proj
    kv_lora_rank: int = 512  # d_c: the compressed KV latent that is cached
    qk_nope_head_dim: int = 128  # per-head query/key width without RoPE
    qk_rope_head_dim: int = 64  # per-head decoupled RoPE width (the rope key is shared by all heads and cached)
    v_head_dim: int = 128  # per-head value width
    n_routed_experts: int = 256  # routed experts per MoE layer
    n_shared_experts: int = 1  # always-on experts per MoE layer
    num_experts_per_tok: int = 8  # K: routed experts selected per token
    n_group: int = 8  # expert groups for group-limited routing
    topk_group: int = 4  # groups a token may route to
    routed_scaling_factor: float = 2.5  # multiplies the routed experts' combined output
    scoring_func: Literal["sigmoid", "softmax"] = "sigmoid"  # gate affinity: sigmoid (V3) or softmax (V2)
    # noaux_tc: top-k on bias-adjusted scores within the best topk_group groups (V3)
    topk_method: Literal["noaux_tc", "greedy", "group_limited_greedy"] = "noaux_tc"
    norm_topk_prob: bool = True  # normalise the selected gate weights to sum to 1
    rms_norm_eps: float = 1e-6  # RMSNorm epsilon
    rope_theta: float = 10000.0  # RoPE base
    max_position_embeddings: int = 163840  # longest supported context
    rope_scaling: RopeScaling | None = dataclasses.field(default_factory=RopeScaling)  # YaRN; null = plain RoPE
    # True: checkpoint rope dims are adjacent pairs (x[2i], x[2i+1]) — the official/HF default for V3.
    rope_interleave: bool = True
    # Official code applies YaRN only when max_position_embeddings > original length; HF whenever yarn is set.
    yarn_only_when_extended: bool = False
    num_nextn_predict_layers: int = 1  # D: multi-token prediction modules (0 = none)
    tie_word_embeddings: bool = False  # share the embedding with the output head (false for V3)
    initializer_range: float = 0.006  # std of the normal init of weights
    # Numerics: parameters are stored in param_dtype, matmuls run in dtype (norms/softmax/gate always float32).
    dtype: Literal["float32", "bfloat16"] = "bfloat16"
    param_dtype: Literal["float32", "bfloat16"] = "float32"  # storage dtype of the params (training: FP32 master)
    # Kernel choices ("auto" picks the fastest available on the backend, pure JAX elsewhere).
    attention_impl: Literal["auto", "xla", "tokamax"] = "auto"
    # ragged: sort + grouped matmul (tokamax on GPU, else lax.ragged_dot); dense: every expert on every token;
    # gather: each token copy reads its experts' weights (decode). auto: gather for ≤32 token copies on a GPU,
    # else ragged. mgpu: ragged on the Hopper BF16 grouped GEMMs (dsv3_jax/kernels/bf16_gemm_mgpu.py; experts
    # padded to 128 rows; the interpreter off the GPU: tests); auto/ragged take it on a GPU for training-sized
    # batches (env DSV3_BF16_GEMM=tokamax keeps them on tokamax).
    moe_impl: Literal["auto", "ragged", "dense", "xla", "tokamax", "gather", "mgpu"] = "auto"
    # Absorbed (latent-cache) decode attention: xla = the einsums; pallas = the fused flash-decoding Pallas/Triton
    # kernel (dsv3_jax/kernels/mla_decode.py), in interpret mode off the GPU (slow: for tests).
    mla_decode_impl: Literal["xla", "pallas"] = "xla"
    # Rematerialisation of each block in the backward pass: none | full | save_dots (keep matmul outputs).
    remat: Literal["none", "full", "save_dots"] = "none"
    # Layers per iteration of each layer scan's loop (nn.scan's unroll): 1 = a loop over the stacked layers
    # (dynamic slices of the stacked weights, dynamic-update-slices of their stacked gradients); the stack's
    # length unrolls it fully (static slices XLA may fuse away; longer compiles). The same numbers either way.
    scan_unroll: int = 1
    # FP8 mixed precision (REFERENCE §8): every linear of the recipe (attention projections, dense MLP, shared
    # and routed experts, MTP eh_proj) runs its forward and backward GEMMs in E4M3 — activations per 1×128 tile,
    # weights per 128×128 block, FP32 accumulation. Embedding, lm_head, MoE gate, norms and attention core keep
    # `dtype`/float32. Set by train.precision=fp8; False leaves every matmul exactly as in `dtype`.
    fp8: bool = False
    # Round FP8 scales up to powers of two (UE8M0, as the V3.1+ kernels do): scale multiplies become exact.
    fp8_pow2_scales: bool = False
    # Serving an FP8 checkpoint: quantised linear weights stay E4M3 + per-block scale_inv params (no upcast of
    # the model); dequantised per block on the fly, or fed to the FP8 GEMM when `fp8` is also on. Not trainable.
    fp8_weights: bool = False
    # Packed samples (SFT, REFERENCE §9): positions restart at 0 for every sample in a row, and training attention
    # keeps each query inside its own sample (keys from t - positions[t] to t). Set by the chat data's train step.
    packed_samples: bool = False
    # DeepSeek-V3.2 sparse attention (DSA, REFERENCE §11): a lightning indexer per layer picks each query's top
    # `index_topk` causal keys and MLA attends only to those. index_topk null = dense V3 attention (no indexer).
    index_topk: int | None = None  # keys kept per query (2048 for V3.2); null = no indexer
    index_n_heads: int = 64  # n_I: indexer query heads (their ReLU scores are summed with learned weights)
    index_head_dim: int = 128  # d_I: indexer query/key width; RoPE (half-split, as HF) on its first qk_rope dims
    # Which keys MLA attends to when the indexer exists: sparse = the indexer's top-k (V3.2 inference and sparse
    # training); dense = every causal key (the dense warm-up stage, where only the indexer learns, by its KL).
    index_attention: Literal["sparse", "dense"] = "sparse"
    # The gathered sparse attention: xla = blocked einsums (each query block recomputed in the backward); pallas =
    # the gathered flash kernel (dsv3_jax/kernels/dsa_attention.py; backward on the blocked XLA path; interpret
    # mode off the GPU: tests); auto = pallas on a GPU in bf16 with power-of-two latent widths, else xla.
    dsa_attention_impl: Literal["auto", "xla", "pallas"] = "auto"
    # The indexer's scores for the top-k: xla = float32 einsums over a block of queries ([block, J, S] per-head
    # scores); pallas = the fused kernel (dsv3_jax/kernels/dsa_index.py: dots in `dtype`, BF16 on a GPU, float32
    # accumulation, causally invisible tiles skipped; interpret mode off the GPU); auto = pallas on a GPU.
    dsa_index_impl: Literal["auto", "xla", "pallas"] = "auto"

    def __post_init__(self) -> None:
        _check_positive(self, "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
                        "num_hidden_layers", "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim",
                        "qk_rope_head_dim", "v_head_dim", "n_routed_experts", "num_experts_per_tok",
                        "n_group", "topk_group", "max_position_embeddings", "scan_unroll")
        if self.q_lora_rank is not None and self.q_lora_rank <= 0:
            raise ConfigError(f"model.q_lora_rank={self.q_lora_rank}: must be a positive int or null (plain q_proj)")
        if self.qk_rope_head_dim % 2:
            raise ConfigError(f"model.qk_rope_head_dim={self.qk_rope_head_dim}: must be even (RoPE rotates pairs)")
        if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
            raise ConfigError(f"model.first_k_dense_replace={self.first_k_dense_replace}: must be in "
                              f"[0, num_hidden_layers={self.num_hidden_layers}]")
        if self.n_routed_experts % self.n_group:
            raise ConfigError(f"model.n_routed_experts={self.n_routed_experts} is not divisible by "
                              f"model.n_group={self.n_group}")
        if self.topk_group > self.n_group:
            raise ConfigError(f"model.topk_group={self.topk_group} > model.n_group={self.n_group}")
        if self.num_experts_per_tok > self.topk_group * (self.n_routed_experts // self.n_group):
            raise ConfigError(f"model.num_experts_per_tok={self.num_experts_per_tok} exceeds the experts in the "
                              f"kept groups (topk_group × experts per group = "
                              f"{self.topk_group * (self.n_routed_experts // self.n_group)})")
        if self.num_nextn_predict_layers < 0 or self.n_shared_experts < 0:
            raise ConfigError("model.num_nextn_predict_layers and model.n_shared_experts must be ≥ 0")
        if self.index_topk is not None:
            _check_positive(self, "index_topk", "index_n_heads", "index_head_dim")
            if not self.q_lora_rank:
                raise ConfigError("model.index_topk is set but model.q_lora_rank is null: the DSA indexer reads "
                                  "MLA's normalised query latent, so it needs q_lora_rank")
            if self.index_head_dim < self.qk_rope_head_dim:
                raise ConfigError(f"model.index_head_dim={self.index_head_dim} < model.qk_rope_head_dim="
                                  f"{self.qk_rope_head_dim}: the indexer ropes its first qk_rope_head_dim dims")

    # Derived sizes -------------------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def uses_dsa(self) -> bool:
        """True when the layers carry the V3.2 lightning indexer (``index_topk`` set)."""
        return self.index_topk is not None

    @property
    def num_moe_layers(self) -> int:
        return self.num_hidden_layers - self.first_k_dense_replace

    @property
    def latent_cache_dim(self) -> int:
        """Values cached per token per layer by the absorbed decode path (kv_lora + rope key; 576 for V3)."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def uses_yarn(self) -> bool:
        rs = self.rope_scaling
        if rs is None:
            return False
        if self.yarn_only_when_extended:
            return self.max_position_embeddings > rs.original_max_position_embeddings
        return True

    def param_counts(self) -> dict[str, int]:
        """Parameter counts of the main model and MTP: total, activated per token, embedding, head."""
        d, h = self.hidden_size, self.num_attention_heads
        if self.q_lora_rank:
            q = d * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * h * self.qk_head_dim
        else:
            q = d * h * self.qk_head_dim
        kv = (d * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank
              + self.kv_lora_rank * h * (self.qk_nope_head_dim + self.v_head_dim))
        attn = q + kv + h * self.v_head_dim * d + 2 * d  # + the two block norms
        dense_ffn = 3 * d * self.intermediate_size
        expert = 3 * d * self.moe_intermediate_size
        moe_total = self.n_routed_experts * expert + self.n_shared_experts * expert + d * self.n_routed_experts
        moe_active = (self.num_experts_per_tok + self.n_shared_experts) * expert + d * self.n_routed_experts
        nd, nm = self.first_k_dense_replace, self.num_moe_layers
        emb = self.vocab_size * d
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        body_total = nd * (attn + dense_ffn) + nm * (attn + moe_total) + d
        body_active = nd * (attn + dense_ffn) + nm * (attn + moe_active) + d
        mtp_one = 2 * d * d + 3 * d + attn + moe_total
        mtp_one_active = 2 * d * d + 3 * d + attn + moe_active
        return {
            "total": emb + head + body_total,
            "active": emb + head + body_active,
            "embedding": emb,
            "head": head,
            "mtp_total": self.num_nextn_predict_layers * mtp_one,
            "mtp_active": self.num_nextn_predict_layers * mtp_one_active,
        }


# ----------------------------------------------------------------------------------------------------------
# Data, training, mesh
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where tokens come from. ``source: stdlib`` is the embedded default corpus (Python's own sources)."""

    source: str = "stdlib"  # stdlib | path to a text file / directory / *.jsonl / *.array_record (glob ok)
    tokenizer: str | None = None  # path to a tokenizer.json; None = byte-level BPE trained on the corpus
    tokenizer_vocab_size: int = 4096  # vocabulary of the default BPE (must be ≤ model.vocab_size)
    seq_len: int = 128  # tokens per training sequence (windows of seq_len + 1 are packed)
    fim_rate: float = 0.1  # fraction of documents rearranged for Fill-in-the-Middle (PSM)
    seed: int = 0  # shuffling and FIM randomness
    val_fraction: float = 0.05  # share of documents held out for evaluation (stable hash of each document)
    cache_dir: str = "~/.cache/dsv3_jax"  # where the trained tokenizer is cached
    num_workers: int = 0  # Grain worker processes (0 = in the training process)
    # The default BPE tokenizer trains on about this many bytes of the train split (keeps training to seconds).
    tokenizer_train_bytes: int = 8_000_000
    # text: documents packed for pretraining (dsv3_jax/data/pipeline.py); chat: JSONL conversations for SFT with
    # an assistant-only loss and per-sample attention (dsv3_jax/data/chat.py).
    format: Literal["text", "chat"] = "text"
    # Chat rendering: deepseek_v3.1 (the built-in V3.1 layout, REFERENCE §11) | tokenizer (the chat_template of
    # the tokenizer_config.json beside data.tokenizer) | a path to a tokenizer_config.json or .jinja file.
    chat_template: str = "deepseek_v3.1"


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh axis sizes. The product must divide the device count (the first devices are used);
    ``data: -1`` takes all remaining devices. All 1 (the default) = one device, no mesh code in the step."""

    pipeline: int = 1  # pipeline stages (the MoE layer stack is split into contiguous blocks)
    data: int = 1  # data-parallel replicas (-1 = all remaining devices)
    expert: int = 1  # expert parallelism: routed experts sharded; also splits the batch elsewhere
    fsdp: int = 1  # params sharded over the embed dim and gathered per layer; splits the batch
    tensor: int = 1  # heads / FFN width / vocab sharded (off in the report's recipe)
    pipeline_microbatches: int = 0  # micro-batches per step through the pipeline; 0 = 2 × pipeline stages
    # gpipe: contiguous stages, bubble (S−1)/(M+S−1); circular: each stage holds V round-robin chunks of layers
    # (interleaved), bubble (S−1)/(V·M+S−1), needs M ≥ S. See sharding/pipeline.py.
    pipeline_schedule: Literal["gpipe", "circular"] = "gpipe"
    pipeline_virtual_stages: int = 1  # V, circular only
    zero1: bool = True  # shard optimizer state over `data` (ZeRO-1); false = replicate it like the params
    # Node-limited routing (REFERENCE §5, §10): require that model.n_group router groups each sit on one node of
    # the expert axis, so group-limited top-k sends every token to experts on ≤ model.topk_group nodes. Checked
    # when the mesh is built (error if the groups straddle nodes); routing numerics do not change.
    node_limited_routing: bool = False
    expert_shards_per_node: int = 0  # expert-axis shards per node for that check; 0 = one process's (host's)
    # All-to-all expert dispatch (sharding/expert.py): each device sends each expert shard at most
    # ceil(f · its routed copies / mesh.expert) rows (rounded up to 8); a balanced layer needs f = 1. Copies past
    # that are dropped and counted (metrics.jsonl `moe_dropped`, the progress line). 0 (default) = exact/dropless:
    # room for every copy to go to one shard, mesh.expert × the buffers of f = 1 — set f (e.g. 2) at scale.
    expert_capacity_factor: float = 0.0

    def __post_init__(self) -> None:
        if self.expert_shards_per_node < 0:
            raise ConfigError(f"mesh.expert_shards_per_node={self.expert_shards_per_node}: must be ≥ 0 (0 = derive "
                              f"from the processes)")
        if self.pipeline_virtual_stages < 1:
            raise ConfigError(f"mesh.pipeline_virtual_stages={self.pipeline_virtual_stages}: must be ≥ 1")
        if self.expert_capacity_factor < 0:
            raise ConfigError(f"mesh.expert_capacity_factor={self.expert_capacity_factor}: must be ≥ 0 (0 = dropless)")
        if self.pipeline_microbatches < 0:
            raise ConfigError(f"mesh.pipeline_microbatches={self.pipeline_microbatches}: must be ≥ 0 "
                              "(0 = 2 × stages)")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation recipe (REFERENCE §5, §6, §9). Token counts are in tokens, LR values absolute."""

    steps: int = 200  # optimizer steps to run (resuming counts the steps already done); 0 = until train.tokens
    tokens: float = math.inf  # run length in tokens: the run also ends once it has seen this many
    global_batch_size: int = 8  # sequences per step (after the batch ramp)
    micro_batch_size: int | None = None  # None = no gradient accumulation
    batch_ramp_start: int | None = None  # sequences per step at token 0; None = no ramp
    batch_ramp_tokens: int = 0  # tokens over which the batch ramps to global_batch_size
    batch_ramp_levels: int = 8  # equal token intervals of the ramp (each batch size compiles one step variant)
    lr: float = 2.2e-4  # peak learning rate
    warmup_steps: int = 20  # linear warm-up to lr over these steps
    lr_constant_tokens: float = 0.0  # after warm-up, hold lr until this many tokens
    lr_decay_tokens: float = 0.0  # cosine to lr_final over this many tokens (0 = no decay)
    lr_final: float = 2.2e-5  # learning rate at the end of the cosine decay (and after it)
    lr_final_tokens: float = math.inf  # tokens held at lr_final after the cosine, then lr_tail
    lr_tail: float | None = None  # learning rate after lr_final_tokens (the report's last 167B: 7.3e-6); null = none
    adam_b1: float = 0.9  # AdamW β1
    adam_b2: float = 0.95  # AdamW β2
    adam_eps: float = 1e-8  # AdamW ε
    weight_decay: float = 0.1  # decoupled weight decay (none on norms and 1-D params)
    grad_clip: float = 1.0  # global gradient-norm clip
    moments_dtype: Literal["float32", "bfloat16"] = "float32"  # dtype of AdamW's first and second moments
    # BF16 compute on FP32 master weights: the routed experts reach the layers as one model.dtype copy made outside
    # the layer scan (written by the previous step's optimizer and kept between steps; cast afresh for a new or
    # edited params tree) instead of a cast per layer in each pass (same numbers and peak memory; H100 bench step
    # 275 → 238 ms cast once per step, 230 ms with the copy written by the optimizer)
    experts_cast_ahead: bool = True
    mtp_lambda: float = 0.3  # λ: weight of the MTP loss
    mtp_lambda_late: float = 0.1  # λ after mtp_lambda_switch_tokens
    mtp_lambda_switch_tokens: float = math.inf  # tokens after which λ becomes mtp_lambda_late
    balance_alpha: float = 1e-4  # α: weight of the sequence-wise balance loss (summed over MoE layers)
    bias_update_speed: float = 1e-3  # γ
    bias_update_freeze_tokens: float = math.inf  # γ = 0 after this many tokens
    precision: Literal["bf16", "fp8"] = "bf16"  # fp8 = the FP8 recipe for every linear (sets model.fp8 for training)
    # V3.2 (DSA, REFERENCE §11): the indexer's KL loss is added to the total with this weight (its inputs are
    # detached, so it trains only the indexer). trainable=indexer freezes everything else (updates, weight decay
    # and router biases): the dense warm-up stage; all = the sparse stage (main model on the LM loss).
    indexer_loss_scale: float = 1.0  # weight of Σ_layers indexer KL in the total loss (V3.2 models only)
    trainable: Literal["all", "indexer"] = "all"  # indexer = freeze all but the V3.2 indexer (dense warm-up)
    seed: int = 0  # model init and step rng
    log_every: int = 10  # steps between metrics.jsonl records
    eval_every: int = 100  # steps between held-out evaluations (0 = never)
    eval_batches: int = 4  # held-out batches per evaluation
    checkpoint_every: int = 100  # steps between checkpoints (0 = only at the end)
    keep_checkpoints: int = 3  # complete checkpoints kept (older ones are deleted)
    async_checkpoint: bool = True  # write checkpoints in a background thread (training continues meanwhile)
    # Peak FLOP/s of one device for MFU; 0 = look it up from the device kind (H100/H200: 989e12 dense BF16).
    peak_flops: float = 0.0
    # Start from these weights instead of random init (fine-tuning): a trainer run dir (or its checkpoints/), an
    # Orbax params checkpoint (dsv3_jax.convert) or an HF safetensors dir (BF16 or FP8). Fresh optimizer, step 0;
    # the model section (and the tokenizer, unless data.tokenizer is set) come from it. Ignored when run_dir
    # already holds a checkpoint (that run resumes). See dsv3_jax/training/init_from.py.
    init_from: str | None = None

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ConfigError:
            return ConfigError(f"train.{name}={getattr(self, name)!r}: {why}")

        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise bad("steps", "must be an integer ≥ 0 (0 = until train.tokens)")
        for name in ("log_every", "eval_batches", "keep_checkpoints", "batch_ramp_levels"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise bad(name, "must be a positive integer")
        for name in ("warmup_steps", "eval_every", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise bad(name, "must be ≥ 0")
        for name in ("lr", "lr_final", "weight_decay", "grad_clip", "balance_alpha", "bias_update_speed",
                     "mtp_lambda", "mtp_lambda_late", "peak_flops", "lr_constant_tokens", "lr_decay_tokens"):
            v = getattr(self, name)
            if not (v >= 0 and (math.isfinite(v) or name.endswith("_tokens"))):
                raise bad(name, "must be a finite number ≥ 0")
        if self.lr == 0:
            raise bad("lr", "must be > 0 (the peak learning rate)")
        for name in ("adam_b1", "adam_b2"):
            if not 0 <= getattr(self, name) < 1:
                raise bad(name, "must be in [0, 1)")
        if not self.adam_eps > 0:
            raise bad("adam_eps", "must be > 0")


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything one run needs. ``run_dir`` receives config.yaml, metrics.jsonl, events and checkpoints."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)  # the architecture
    data: DataConfig = dataclasses.field(default_factory=DataConfig)  # corpus and tokenizer
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)  # the optimisation recipe
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)  # the device mesh
    run_dir: str = "runs/default"  # receives config.yaml, metrics, events and checkpoints


# ----------------------------------------------------------------------------------------------------------
# Building dataclasses from plain dicts, with errors that help
# ----------------------------------------------------------------------------------------------------------

T = TypeVar("T")


def _check_positive(obj: Any, *names: str) -> None:
    for n in names:
        v = getattr(obj, n)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ConfigError(f"model.{n}={v!r}: must be a positive integer")


def _suggest(key: str, valid: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(valid), n=3, cutoff=0.5)
    return f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert a YAML/JSON/CLI value to annotation ``tp`` or raise ConfigError naming ``where``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none")):
            if type(None) in args:
                return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}={value!r}: expected {_type_name(tp)}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{where}={value!r}: must be one of {', '.join(map(repr, allowed))}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, prefix=where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}={value!r}: expected bool (true/false)")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}={value!r}: expected int")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(float(value)) if float(value).is_integer() else int(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}={value!r}: expected int")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}={value!r}: expected float")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}={value!r}: expected float")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}={value!r}: expected str")
    return value


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from a dict; unknown keys and wrong types raise ConfigError."""
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        where = f"{prefix}.{k}" if prefix else k
        if k not in fields:
            raise ConfigError(f"unknown config key {where!r}.{_suggest(k, fields)} "
                              f"Valid keys{' of ' + prefix if prefix else ''}: {', '.join(sorted(fields))}")
        kwargs[k] = _coerce(v, hints[k], where)
    try:
        return cls(**kwargs)
    except TypeError as e:  # pragma: no cover - all fields have defaults
        raise ConfigError(f"{prefix or cls.__name__}: {e}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a config (YAML/JSON friendly; inf stays a float)."""
    return dataclasses.asdict(cfg)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any, cls: type) -> None:
    parts = dotted.split(".")
    node, node_cls = tree, cls
    for i, p in enumerate(parts):
        where = ".".join(parts[: i + 1])
        if not dataclasses.is_dataclass(node_cls):
            raise ConfigError(f"override {dotted!r}: {'.'.join(parts[:i])!r} is not a section")
        names = {f.name for f in dataclasses.fields(node_cls)}
        if p not in names:
            raise ConfigError(f"unknown config key {where!r}.{_suggest(p, names)}")
        hint = typing.get_type_hints(node_cls)[p]
        if i == len(parts) - 1:
            node[p] = yaml.safe_load(value) if isinstance(value, str) else value
            return
        sub_cls = next((a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)), hint)
        if not isinstance(node.get(p), dict):
            node[p] = {} if node.get(p) is None else node[p]
        node, node_cls = node[p], sub_cls


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read_yaml(p: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A config file as a dict; ``base: other.yaml`` (relative to the file) is loaded first and overlaid."""
    if not p.exists():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    if p.resolve() in seen:
        raise ConfigError(f"{p}: 'base' chain loops back to itself")
    loaded = yaml.safe_load(p.read_text()) or {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{p}: top level must be a mapping")
    base = loaded.pop("base", None)
    if base is None:
        return loaded
    return _merge(_read_yaml(p.parent / base, (*seen, p.resolve())), loaded)


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = (),
                cls: type[T] = Config) -> T:
    """Load a YAML config (optionally ``base:``-derived from another) and apply ``key=value`` overrides
    (values parsed as YAML scalars)."""
    tree: dict[str, Any] = {}
    if path is not None:
        tree = _read_yaml(Path(path))
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r} must look like key=value (e.g. train.steps=50)")
        key, value = ov.split("=", 1)
        _set_dotted(tree, key.strip(), value, cls)
    return from_dict(cls, tree)


def save_config(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


# ----------------------------------------------------------------------------------------------------------
# HF config.json ↔ ModelConfig
# ----------------------------------------------------------------------------------------------------------

# HF keys that carry no architecture information for us (or are handled elsewhere).
_HF_IGNORED = {
    "architectures", "model_type", "auto_map", "torch_dtype", "dtype", "transformers_version", "bos_token_id",
    "eos_token_id", "pad_token_id", "use_cache", "attention_bias", "attention_dropout", "hidden_act",
    "pretraining_tp", "moe_layer_freq", "ep_size", "aux_loss_alpha", "seq_aux", "quantization_config",
    "num_key_value_heads", "head_dim", "_name_or_path", "output_attentions",
    "output_hidden_states", "return_dict", "id2label", "label2id", "rope_parameters",
    "mlp_layer_types", "layer_types", "sliding_window", "max_window_layers", "use_sliding_window",
    "output_router_logits", "router_aux_loss_coef", "qk_head_dim", "tokenizer_class", "is_encoder_decoder",
    "use_bfloat16", "torchscript", "chunk_size_feed_forward", "problem_type", "add_cross_attention",
    "tie_encoder_decoder", "_attn_implementation", "_attn_implementation_autoset", "mlp_bias",
}


def model_config_from_hf(hf: dict[str, Any] | str | Path, **overrides: Any) -> ModelConfig:
    """ModelConfig from an HF ``config.json`` (dict or path). Unknown keys raise ConfigError naming them."""
    if not isinstance(hf, dict):
        p = Path(hf)
        if p.is_dir():
            p = p / "config.json"
        if not p.exists():
            raise ConfigError(f"HF config {str(p)!r} does not exist")
        hf = json.loads(p.read_text())
    hf = dict(hf)
    model_type = hf.get("model_type", "deepseek_v3")
    if model_type not in ("deepseek_v3", "deepseek_v2", "deepseek_v32"):
        raise ConfigError(f"HF config model_type={model_type!r}: expected 'deepseek_v3', 'deepseek_v32' "
                          f"(or 'deepseek_v2')")
    if model_type == "deepseek_v32":  # HF's defaults for keys a V3.2 config.json may leave out
        hf = {"index_topk": 2048, "index_n_heads": 64, "index_head_dim": 128, **hf}
    elif "index_topk" in hf:
        raise ConfigError(f"HF config has index_topk but model_type={model_type!r}: DSA checkpoints are "
                          f"'deepseek_v32'")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"HF config hidden_act={hf['hidden_act']!r}: only 'silu' (SwiGLU) is supported")
    if hf.get("attention_bias"):
        raise ConfigError("HF config attention_bias=true is not supported (DeepSeek-V3 has no attention biases)")
    if hf.get("moe_layer_freq", 1) != 1:
        raise ConfigError(f"HF config moe_layer_freq={hf['moe_layer_freq']}: only 1 (every layer after "
                          f"first_k_dense_replace is MoE) is supported")
    if "qk_head_dim" in hf and hf["qk_head_dim"] != hf.get("qk_nope_head_dim", 128) + hf.get("qk_rope_head_dim", 64):
        raise ConfigError(f"HF config qk_head_dim={hf['qk_head_dim']} ≠ qk_nope_head_dim + qk_rope_head_dim")
    rope_params = hf.pop("rope_parameters", None)
    rs = hf.pop("rope_scaling", None)
    if rs is None and isinstance(rope_params, dict) and rope_params.get("rope_type") not in (None, "default"):
        rs = rope_params
    if isinstance(rope_params, dict) and "rope_theta" in rope_params and "rope_theta" not in hf:
        hf["rope_theta"] = rope_params["rope_theta"]
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    kw: dict[str, Any] = {}
    for k, v in hf.items():
        if k in _HF_IGNORED:
            continue
        if k not in fields:
            raise ConfigError(f"unknown HF config field {k!r}.{_suggest(k, fields)}")
        kw[k] = v
    if "initializer_range" in kw and kw["initializer_range"] is None:
        kw.pop("initializer_range")
    if rs is not None and rs.get("rope_type", rs.get("type")) not in (None, "default"):
        rtype = rs.get("rope_type", rs.get("type"))
        if rtype != "yarn":
            raise ConfigError(f"HF config rope_scaling type {rtype!r}: only 'yarn' is supported")
        orig = int(rs.get("original_max_position_embeddings") or hf.get("max_position_embeddings", 4096))
        factor = rs.get("factor")
        if factor is None:  # HF: the ratio of the extended to the original length
            factor = hf.get("max_position_embeddings", orig) / orig
        kw["rope_scaling"] = RopeScaling(
            factor=float(factor),
            original_max_position_embeddings=orig,
            beta_fast=float(rs.get("beta_fast") or 32),
            beta_slow=float(rs.get("beta_slow") or 1),
            mscale=None if rs.get("mscale") is None else float(rs["mscale"]),
            mscale_all_dim=None if rs.get("mscale_all_dim") is None else float(rs["mscale_all_dim"]),
            attention_factor=None if rs.get("attention_factor") is None else float(rs["attention_factor"]),
            truncate=bool(rs.get("truncate", True)),
        )
    else:
        kw["rope_scaling"] = None
    kw.setdefault("rope_interleave", True)
    # V3.1+: power-of-two FP8 scales (REFERENCE §11); FP8 training then rounds its scales the same way.
    if (hf.get("quantization_config") or {}).get("scale_fmt") == "ue8m0":
        kw["fp8_pow2_scales"] = True
    kw.update(overrides)
    rope_scaling = kw.pop("rope_scaling")
    return dataclasses.replace(from_dict(ModelConfig, kw, prefix="model"), rope_scaling=rope_scaling)


def model_config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """HF ``config.json`` dict for ``cfg`` (loadable by transformers' DeepseekV3ForCausalLM)."""
    out: dict[str, Any] = ({"architectures": ["DeepseekV32ForCausalLM"], "model_type": "deepseek_v32"} if cfg.uses_dsa
                           else {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3"})
    skip = {"rope_scaling", "yarn_only_when_extended", "dtype", "param_dtype", "attention_impl", "moe_impl",
            "mla_decode_impl", "dsa_attention_impl", "dsa_index_impl", "remat", "scan_unroll", "fp8",
            "fp8_pow2_scales", "fp8_weights", "packed_samples", "index_attention"}
    if not cfg.uses_dsa:
        skip |= {"index_topk", "index_n_heads", "index_head_dim"}
    for f in dataclasses.fields(cfg):
        if f.name not in skip:
            out[f.name] = getattr(cfg, f.name)
    rs = cfg.rope_scaling
    if rs is not None:
        d = {"type": "yarn", "rope_type": "yarn", "factor": rs.factor,
             "original_max_position_embeddings": rs.original_max_position_embeddings,
             "beta_fast": rs.beta_fast, "beta_slow": rs.beta_slow}
        if rs.mscale is not None:
            d["mscale"] = rs.mscale
        if rs.mscale_all_dim is not None:
            d["mscale_all_dim"] = rs.mscale_all_dim
        if rs.attention_factor is not None:
            d["attention_factor"] = rs.attention_factor
        if not rs.truncate:
            d["truncate"] = False
        out["rope_scaling"] = d
    else:
        out["rope_scaling"] = None
    out.update({"hidden_act": "silu", "attention_bias": False, "num_key_value_heads": cfg.num_attention_heads,
                "torch_dtype": "bfloat16", "bos_token_id": 0, "eos_token_id": 1})
    return out
