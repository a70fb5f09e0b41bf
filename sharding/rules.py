"""THE logical-axis → mesh-axis table. Model code names axes; this file alone decides where they live.

Mesh axes: ``pipeline`` (stages), ``data`` (replicas; ZeRO-1 shards optimizer state over it), ``fsdp``
(params sharded, gathered per layer), ``expert`` (routed experts; also a data axis for everything else, as in
DeepSeek-V3's EP64 over DP ranks), ``tensor`` (heads / FFN width; off in the report's recipe).
"""

from __future__ import annotations

from jax.sharding import PartitionSpec

# Axes that split the batch (tokens) for every non-pipelined computation.
BATCH_AXES = ("data", "fsdp", "expert")

LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # activations
    ("activation_batch", BATCH_AXES),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_mlp", "tensor"),
    # Vocab over pipeline too: the embedding, the LM head and the logits are split across the stages (each
    # computes 1/S of the logits) instead of a full copy on every stage; fit_sharding moves the axis to
    # another dim when the vocab does not divide.
    ("activation_vocab", ("pipeline", "tensor")),
    # parameters
    ("vocab", ("pipeline", "tensor")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("q_lora", None),
    ("kv_lora", None),
    ("qk_head_dim", None),
    ("kv_head_dim", None),
    ("index_heads", None),  # the V3.2 indexer (small: replicated)
    ("index_head_dim", None),
    ("exp", "expert"),
    ("moe_mlp", "tensor"),
    ("layers", "pipeline"),  # the MoE layer stack: contiguous blocks of layers per pipeline stage
    ("dense_layers", None),
    ("stage", "pipeline"),
)


def batch_spec(ndim: int = 2) -> PartitionSpec:
    """PartitionSpec of a [B, ...] input batch: B over the batch axes, the rest replicated."""
    return PartitionSpec(BATCH_AXES, *([None] * (ndim - 1)))
