"""``train.init_from``: start a run from existing weights instead of random init (fine-tuning, REFERENCE §9 SFT).

Three kinds of source, told apart by what the directory holds:

    run      a trainer run dir (``checkpoints/`` inside) or its ``checkpoints/`` dir — latest complete step
    params   an Orbax params checkpoint from ``python -m dsv3_jax.convert`` (``config.yaml`` + ``variables/``)
    hf       a Hugging Face directory (``config.json`` + ``*.safetensors``; BF16, FP32 or the official FP8
             format, which is dequantised into the FP32 master weights)

The run keeps only the weights (params + router biases): the optimiser state is fresh and the step counter 0.
The model section comes from the source — the run's YAML may set only the run-time choices (:data:`RUNTIME_KEYS`:
dtypes, kernels, remat, FP8); an architecture key it sets to a value other than the source's is a ConfigError
naming both. The tokenizer comes with the source (its ``tokenizer.json``, or for a run without one the tokenizer
its data section makes) unless ``data.tokenizer`` is set.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any, Literal

import jax
import jax.numpy as jnp

from dsv3_jax.config import Config, ConfigError, DataConfig, ModelConfig, load_config

# Model keys that are how the run computes, not what the weights are: the run's YAML decides them.
# index_attention is the V3.2 training stage (dense warm-up or sparse), not a property of the weights.
RUNTIME_KEYS = frozenset({"dtype", "param_dtype", "attention_impl", "moe_impl", "mla_decode_impl", "dsa_attention_impl",
                          "dsa_index_impl", "remat", "fp8", "fp8_pow2_scales", "fp8_weights", "packed_samples",
                          "index_attention"})
# The V3.2 indexer's shape: a config that sets index_topk over a V3 source (no indexer) upgrades it to V3.2 with a
# freshly initialised indexer (the paper's recipe: the dense warm-up starts from a V3.1 checkpoint).
INDEXER_KEYS = ("index_topk", "index_n_heads", "index_head_dim")

Kind = Literal["run", "params", "hf"]


@dataclasses.dataclass(frozen=True)
class Source:
    """What ``train.init_from`` points at: its kind, directory, architecture and tokenizer."""

    kind: Kind
    path: Path
    model: ModelConfig
    tokenizer: Path | None  # a tokenizer.json shipped with the weights
    data: DataConfig | None  # a run's data section (makes its tokenizer when it kept no tokenizer.json)


def _tokenizer_near(d: Path, levels: int) -> Path | None:
    for p in [d, *d.parents][:levels + 1]:
        if (p / "tokenizer.json").is_file():
            return p / "tokenizer.json"
    return None


def inspect_source(path: str | Path) -> Source:
    """Identify ``path`` (see the module docstring) and read its model config without loading weights."""
    p = Path(path).expanduser().absolute()
    if not p.is_dir():
        raise ConfigError(f"train.init_from={str(path)!r}: no such directory (expected a trainer run dir, an Orbax "
                          f"params checkpoint from dsv3_jax.convert, or an HF safetensors directory)")
    if (p / "config.json").is_file() and (any(p.glob("*.safetensors")) or (p / "model.safetensors.index.json").is_file()):
        from dsv3_jax.hf import CheckpointError, HFCheckpoint

        try:
            ck = HFCheckpoint(p)
            model = ck.model_config()
        except CheckpointError as e:
            raise ConfigError(f"train.init_from: {e}") from None
        # HF's save_pretrained drops the MTP layers: the run gets only the MTP modules the files hold.
        present = ck.keys()
        for k in range(model.num_nextn_predict_layers):
            if not any(key.startswith(f"model.layers.{model.num_hidden_layers + k}.") for key in present):
                warnings.warn(f"{p}: no tensors for MTP module {k + 1}; the run has {k} MTP module(s)", stacklevel=2)
                model = dataclasses.replace(model, num_nextn_predict_layers=k)
                break
        tok = p / "tokenizer.json"
        return Source("hf", p, model, tok if tok.is_file() else None, None)
    if (p / "config.yaml").is_file() and (p / "variables").is_dir():
        cfg = load_config(p / "config.yaml")
        return Source("params", p, cfg.model, _tokenizer_near(p, 1), cfg.data)
    from dsv3_jax.training.checkpoint import Checkpointer, find_checkpoint_dir

    ckpt_dir = find_checkpoint_dir(p)
    ck = Checkpointer(ckpt_dir, async_save=False)
    try:
        if ck.latest_step() is None:
            raise ConfigError(f"train.init_from={str(path)!r}: neither an HF directory (config.json + *.safetensors), "
                              f"a params checkpoint (config.yaml + variables/) nor a run dir with a complete "
                              f"checkpoint in {ckpt_dir}")
        from dsv3_jax.config import from_dict

        saved = from_dict(Config, ck.saved_config())
    finally:
        ck.close()
    return Source("run", p, saved.model, _tokenizer_near(ckpt_dir, 2), saved.data)


def resolve_config(cfg: Config) -> tuple[Config, Source | None]:
    """``cfg`` with the model section of ``train.init_from`` (and its tokenizer unless ``data.tokenizer`` is set).

    Architecture keys the YAML/CLI set (any value other than ModelConfig's default) must equal the source's, except
    the indexer's (:data:`INDEXER_KEYS`) over a source without one: V3 → V3.2, the indexer initialised fresh by
    :func:`initialize_from`. Returns (cfg, None) when ``train.init_from`` is unset.
    """
    if not cfg.train.init_from:
        return cfg, None
    src = inspect_source(cfg.train.init_from)
    default = ModelConfig()
    upgrade = cfg.model.uses_dsa and not src.model.uses_dsa  # V3 weights + a fresh V3.2 indexer
    own = RUNTIME_KEYS | (set(INDEXER_KEYS) if upgrade else set())
    clash = [f"model.{f.name}: config {getattr(cfg.model, f.name)!r}, checkpoint {getattr(src.model, f.name)!r}"
             for f in dataclasses.fields(ModelConfig)
             if f.name not in own and getattr(cfg.model, f.name) != getattr(default, f.name)
             and getattr(cfg.model, f.name) != getattr(src.model, f.name)]
    if clash:
        raise ConfigError(f"train.init_from={cfg.train.init_from}: the config's architecture disagrees with the "
                          f"checkpoint's ({'; '.join(clash)}). Drop these keys (the model comes from the checkpoint) "
                          f"or point init_from at a matching checkpoint.")
    runtime = {k: getattr(cfg.model, k) for k in own}
    if src.kind == "hf" and src.model.fp8_pow2_scales:  # V3.1's ue8m0 scales: keep them in FP8 training
        runtime["fp8_pow2_scales"] = True
    model = dataclasses.replace(src.model, **runtime)
    data = cfg.data
    if not data.tokenizer:
        if src.tokenizer is not None:
            data = dataclasses.replace(data, tokenizer=str(src.tokenizer))
        elif src.data is not None and src.data.tokenizer:
            data = dataclasses.replace(data, tokenizer=src.data.tokenizer)
        elif src.data is None:
            raise ConfigError(f"train.init_from={cfg.train.init_from}: the checkpoint comes without a tokenizer.json; "
                              f"set data.tokenizer=PATH to the tokenizer the weights were trained with")
    return dataclasses.replace(cfg, model=model, data=data), src


def source_tokenizer(src: Source):
    """The tokenizer of a run that kept no tokenizer.json: the one its own data section makes (cached BPE)."""
    from dsv3_jax.data import load_tokenizer

    assert src.data is not None
    return load_tokenizer(src.data)


def load_source_variables(src: Source, model: ModelConfig) -> dict[str, Any]:
    """The source's {'params', 'router'} as host/default-device arrays, params in float32 (master weights)."""
    if src.kind == "hf":
        from dsv3_jax.hf import load_hf

        variables, _ = load_hf(src.path, dtype="float32", cfg=dataclasses.replace(model, fp8_weights=False),
                               place=lambda _path, a: a)
    elif src.kind == "params":
        from dsv3_jax.params_io import load_variables

        variables, _ = load_variables(src.path, "float32")
    else:
        from dsv3_jax.training.checkpoint import restore_params

        variables, _ = restore_params(src.path)
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), variables["params"])
    return {"params": params, "router": variables.get("router", {})}


def initialize_from(state, src: Source, model: ModelConfig):
    """``state`` (a fresh TrainState) with the source's params and router, on the state's own shardings.

    Shapes must match leaf for leaf (they do when the model came from :func:`resolve_config`). A V3 source for a
    V3.2 model (``model`` has the indexer, the source does not) keeps the state's freshly initialised indexer.
    """
    variables = load_source_variables(src, model)
    if model.uses_dsa and not src.model.uses_dsa:
        variables["params"] = _with_fresh_indexer(variables["params"], state.params, src)

    def put(path, new, old):
        if tuple(new.shape) != tuple(old.shape):
            raise ConfigError(f"train.init_from={src.path}: leaf {jax.tree_util.keystr(path)} has shape "
                              f"{list(new.shape)} in the checkpoint but {list(old.shape)} in the model")
        return jax.device_put(jnp.asarray(new, old.dtype), old.sharding)

    try:
        params = jax.tree_util.tree_map_with_path(put, variables["params"], state.params)
        router = jax.tree_util.tree_map_with_path(put, variables["router"], state.router)
    except ValueError as e:  # tree structure mismatch
        raise ConfigError(f"train.init_from={src.path}: the checkpoint's parameters do not match the model ({e})"
                          ) from None
    return state._replace(params=params, router=router)


def _with_fresh_indexer(source: dict, fresh: dict, src: Source) -> dict:
    """``fresh``'s structure: every leaf from ``source``, except the indexer's (absent there), which stay fresh."""
    have = {jax.tree_util.keystr(p): a for p, a in jax.tree_util.tree_flatten_with_path(source)[0]}
    used = set()

    def pick(path, init):
        key = jax.tree_util.keystr(path)
        if key in have:
            used.add(key)
            return have[key]
        if any(getattr(k, "key", None) == "indexer" for k in path):
            return init
        raise ConfigError(f"train.init_from={src.path}: the checkpoint has no parameter {key}")

    out = jax.tree_util.tree_map_with_path(pick, fresh)
    if extra := sorted(set(have) - used):
        raise ConfigError(f"train.init_from={src.path}: the checkpoint's parameters {extra[:3]} are not in the model")
    return out
