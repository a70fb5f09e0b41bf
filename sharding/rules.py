"""THE logical-axis → mesh-axis table. Model code names axes; this file alone decides where they live.

Mesh axes: ``pipeline`` (stages), ``data`` (replicas; ZeRO-1 shards optimizer state over it), ``fsdp``
(params sharded, gathered per layer), ``expert`` (routed experts; also a data axis for everything else, as in
DeepSeek-V3's EP64 over DP ranks), ``tensor`` (heads / FFN width; off in the report's recipe).
"""

from __future__ import annotations

import math

from jax.sharding import PartitionSpec

# Axes that split the batch (sequences) everywhere.
BATCH_AXES = ("data", "fsdp", "expert")
# Outside the pipelined MoE stack (embedding, dense layers, final norm, head, loss, MTP) the sequence is split over
# ``pipeline`` as well: each stage computes 1/S of those tokens instead of all of them (context parallelism on the
# pipeline axis; attention gathers the compressed key/value latent, "activation_kv_length" below). Inside the
# stack a stage needs whole sequences: sharding/pipeline.py traces its stages under STAGE_RULES.
OUTER_LENGTH_AXES = "pipeline"

LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # activations
    ("activation_batch", BATCH_AXES),
    ("activation_length", OUTER_LENGTH_AXES),
    ("activation_kv_length", None),  # keys/values of attention: every query position sees the whole sequence
    ("activation_logits_length", None),  # logits are split by vocab (below) rather than by position
    ("activation_lookup_length", None),  # embedding rows as looked up from the vocab-split table
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_mlp", "tensor"),
    # Vocab over pipeline too: the embedding, the LM head and the logits are split across the stages (each
    # computes 1/S of the logits) instead of a full copy on every stage; fit_sharding moves the axis to
    # another dim when the vocab does not divide.
    ("activation_vocab", ("pipeline", "tensor")),
    ("activation_vocab", "tensor"),  # where `pipeline` already splits the sequence (flax takes the first free rule)
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


# The rules a pipeline stage is traced under: whole sequences on each stage (the stage axis is `pipeline`).
STAGE_RULES = tuple((name, None if name == "activation_length" else axes) for name, axes in LOGICAL_RULES)


def token_axes(rules=None) -> tuple[str, ...]:
    """Mesh axes that split flattened token rows (dsv3_jax/tokens.py) under ``rules`` (default: the rules in
    force, so the answer differs inside a pipeline stage): the length axes, then the batch axes — where the
    sequence is split, rows are ordered [P, B, T/P] (sharding/partition.py: sequence_split_layout)."""
    import flax.linen as nn

    from dsv3_jax import tokens

    names = ("activation_batch",) if tokens.in_whole_sequences() else ("activation_length", "activation_batch")
    spec = nn.logical_to_mesh_axes(names, rules)
    return tuple(a for entry in spec if entry is not None for a in ((entry,) if isinstance(entry, str) else entry))


def row_axes(mesh, n: int) -> tuple[str, ...]:
    """The mesh axes that n flattened token rows are split over where the caller runs: :func:`token_axes` (the
    batch axes, plus ``pipeline`` outside the pipelined stack), or the batch axes alone when n does not divide
    over all of those (or no rules are in force). Shared by the EP dispatch and the token-parallel FP8 GEMMs."""
    axes = token_axes() or BATCH_AXES
    return axes if n % math.prod(mesh.shape.get(a, 1) for a in axes) == 0 else BATCH_AXES


def batch_spec(ndim: int = 2) -> PartitionSpec:
    """PartitionSpec of a [B, ...] input batch: B over the batch axes, the rest replicated."""
    return PartitionSpec(BATCH_AXES, *([None] * (ndim - 1)))
