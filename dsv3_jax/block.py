"""The transformer block and the scanned stack of blocks (REFERENCE §2).

``h = h + MLA(RMSNorm(h))``; ``h = h + FFN(RMSNorm(h))`` with FFN a dense SwiGLU or DeepSeekMoE.
Layers of one kind are stacked on a leading ``layers`` axis and run with ``nn.scan`` (one trace, fast compiles;
the pipeline splits that axis into stages).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsv3_jax.attention import MLA, LatentCache, StackSlot
from dsv3_jax.config import ModelConfig
from dsv3_jax.dsa import DSA
from dsv3_jax.layers import MLP, RMSNorm, logical
from dsv3_jax.moe import MoE

REMAT_POLICIES = {
    "full": None,  # recompute everything in the backward pass
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Block(nn.Module):
    """x [B, T, d] → (x [B, T, d], cache, aux). ``moe`` picks DeepSeekMoE over the dense FFN."""

    cfg: ModelConfig
    moe: bool
    absorbed: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array, cache: LatentCache | StackSlot | None = None
                 ) -> tuple[jax.Array, LatentCache | StackSlot | None, dict[str, jax.Array]]:
        c = self.cfg
        norm = dict(eps=c.rms_norm_eps, dtype=c.dtype, param_dtype=c.param_dtype)
        xn = RMSNorm(name="input_layernorm", **norm)(x)
        attn_aux = {}
        if c.uses_dsa:  # V3.2: MLA over the lightning indexer's top-k keys (+ the indexer's KL in aux)
            h, cache, attn_aux = DSA(c, name="self_attn")(xn, positions, cache, self.absorbed)
        else:
            h, cache = MLA(c, name="self_attn")(xn, positions, cache, self.absorbed)
        x = x + h
        y = RMSNorm(name="post_attention_layernorm", **norm)(x)
        if self.moe:
            y, aux = MoE(c, name="mlp")(y)
        else:
            y, aux = MLP(c, c.intermediate_size, name="mlp")(y), {}
        aux = {**aux, **attn_aux}
        x = logical(x + y, ("activation_batch", "activation_length", "activation_embed"))
        return x, cache, aux


def _maybe_remat(cfg: ModelConfig) -> type[Block]:
    if cfg.remat == "none":
        return Block
    return nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=True)


class _ScanStep(nn.Module):
    """One scan step: carry (x, the whole stacked cache or None, layer index), broadcast positions → aux.

    The cache rides in the carry (not as a scanned slice) so each layer updates it in place."""

    cfg: ModelConfig
    moe: bool
    absorbed: bool

    @nn.compact
    def __call__(self, carry, positions):
        x, cache, i = carry
        slot = None if cache is None else StackSlot(cache, i)
        x, slot, aux = _maybe_remat(self.cfg)(self.cfg, self.moe, self.absorbed, name="block")(x, positions, slot)
        return (x, None if slot is None else slot.stack, i + 1), aux


# A parallel strategy (sharding/pipeline.py) may run the MoE stack itself: fn(cfg, variables, x, positions)
# → (x, aux) with the stacked variables of this stack. The layer math stays in Block.
_STACK: contextvars.ContextVar[Callable | None] = contextvars.ContextVar("moe_stack", default=None)


@contextlib.contextmanager
def moe_stack_override(fn: Callable):
    token = _STACK.set(fn)
    try:
        yield
    finally:
        _STACK.reset(token)


def apply_block(cfg: ModelConfig, moe: bool, variables: dict, x: jax.Array, positions: jax.Array):
    """One block from explicit per-layer variables {'params', 'router'?} (no stack axis) → (x, aux)."""
    x, _, aux = _maybe_remat(cfg)(cfg, moe).apply(variables, x, positions)
    return x, aux


class BlockStack(nn.Module):
    """``num_layers`` identical-kind blocks with params stacked on a leading ``layers`` axis.

    x [B, T, d], positions [B, T], cache (stacked [L, B, S, ·]) or None → (x, cache, aux stacked [L, ...]).
    """

    cfg: ModelConfig
    num_layers: int
    moe: bool
    absorbed: bool = False

    @nn.compact
    def __call__(self, x, positions, cache=None):
        override = _STACK.get()
        if override is not None and self.moe and cache is None and not self.is_initializing():
            x, aux = override(self.cfg, self.variables, x, positions)
            return x, None, aux
        scan = nn.scan(
            _ScanStep,
            variable_axes={"params": 0, "router": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast,),
            length=self.num_layers,
            unroll=min(self.cfg.scan_unroll, self.num_layers),
            # Only the MoE stack is pipelined; dense layers stay whole on every stage.
            metadata_params={nn.PARTITION_NAME: "layers" if self.moe else "dense_layers"},
        )
        (x, cache, _), aux = scan(self.cfg, self.moe, self.absorbed, name="layers")(
            (x, cache, jnp.zeros((), jnp.int32)), positions)
        return x, cache, aux
