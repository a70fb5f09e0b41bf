"""HF safetensors checkpoints ↔ dsv3-jax variables (REFERENCE §7, §8).

Loading streams tensor by tensor from memory-mapped files into one preallocated array per parameter leaf
(stacked layers and experts are filled slice by slice), so the only full copy in RAM is the result. The
official FP8 format (``float8_e4m3fn`` + ``weight_scale_inv`` per 128×128 block) is dequantised on the fly,
or kept as it is with ``load_hf(..., fp8_weights=True)`` (served by the FP8 Linear path, REFERENCE §8).
Every mismatch — missing or unexpected tensors, wrong shapes, unsupported dtypes — raises one
:class:`CheckpointError` naming the tensors.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import tempfile
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax import fp8
from dsv3_jax.config import ModelConfig, model_config_from_hf, model_config_to_hf
from dsv3_jax.model import Transformer
from dsv3_jax.safetensors_io import SafetensorsError, SafetensorsFile, write_safetensors


class CheckpointError(ValueError):
    """The checkpoint does not match the model; the message names the tensors and what was expected."""


@dataclasses.dataclass(frozen=True)
class Slot:
    """Where one HF tensor goes: leaf ``path`` of ``collection``, at [layer][expert] of a stacked leaf.

    ``in_dims`` > 0 marks a linear weight: HF [out, in] ↔ ours [*in, *out] with ``in_dims`` input dims.
    ``copy_of`` marks a duplicate the checkpoint stores (MTP's embedding and head) that we share.
    """

    collection: str
    path: tuple[str, ...]
    layer: int | None = None
    expert: int | None = None
    in_dims: int = 0
    copy_of: str | None = None


_ATTN_LINEARS = {"q_a_proj": 1, "q_b_proj": 1, "q_proj": 1, "kv_a_proj_with_mqa": 1, "kv_b_proj": 1, "o_proj": 2}


def _block_slots(cfg: ModelConfig, prefix: str, where: tuple[str, ...], layer: int | None,
                 moe: bool) -> Iterator[tuple[str, Slot]]:
    """HF keys of one decoder block under ``prefix`` → slots under ``where`` (a block's param path)."""
    p = "params"
    for norm in ("input_layernorm", "post_attention_layernorm"):
        yield f"{prefix}{norm}.weight", Slot(p, (*where, norm, "scale"), layer)
    attn = ["kv_a_proj_with_mqa", "kv_b_proj", "o_proj"] + (["q_a_proj", "q_b_proj"] if cfg.q_lora_rank else ["q_proj"])
    for name in attn:
        yield f"{prefix}self_attn.{name}.weight", Slot(p, (*where, "self_attn", name, "kernel"), layer,
                                                       in_dims=_ATTN_LINEARS[name])
    norms = ["kv_a_layernorm"] + (["q_a_layernorm"] if cfg.q_lora_rank else [])
    for name in norms:
        yield f"{prefix}self_attn.{name}.weight", Slot(p, (*where, "self_attn", name, "scale"), layer)
    if cfg.uses_dsa:  # the V3.2 lightning indexer
        ix = f"{prefix}self_attn.indexer."
        for name in ("wq_b", "wk", "weights_proj"):
            yield f"{ix}{name}.weight", Slot(p, (*where, "self_attn", "indexer", name, "kernel"), layer, in_dims=1)
        for hf_name, ours in (("weight", "scale"), ("bias", "bias")):
            yield f"{ix}k_norm.{hf_name}", Slot(p, (*where, "self_attn", "indexer", "k_norm", ours), layer)
    mlp = (*where, "mlp")
    if not moe:
        for name in ("gate_proj", "up_proj", "down_proj"):
            yield f"{prefix}mlp.{name}.weight", Slot(p, (*mlp, name, "kernel"), layer, in_dims=1)
        return
    yield f"{prefix}mlp.gate.weight", Slot(p, (*mlp, "gate"), layer, in_dims=1)
    if cfg.topk_method == "noaux_tc":
        yield f"{prefix}mlp.gate.e_score_correction_bias", Slot("router", (*mlp, "e_score_correction_bias"), layer)
    for j in range(cfg.n_routed_experts):
        for name in ("gate_proj", "up_proj", "down_proj"):
            yield f"{prefix}mlp.experts.{j}.{name}.weight", Slot(p, (*mlp, name), layer, j, in_dims=1)
    if cfg.n_shared_experts:
        for name in ("gate_proj", "up_proj", "down_proj"):
            yield f"{prefix}mlp.shared_experts.{name}.weight", Slot(p, (*mlp, "shared_experts", name, "kernel"),
                                                                    layer, in_dims=1)


def key_map(cfg: ModelConfig) -> dict[str, Slot]:
    """Every HF tensor name of a checkpoint for ``cfg`` (MTP layers included) → its slot in our variables."""
    m: dict[str, Slot] = {
        "model.embed_tokens.weight": Slot("params", ("embed", "embedding")),
        "model.norm.weight": Slot("params", ("norm", "scale")),
    }
    if not cfg.tie_word_embeddings:
        m["lm_head.weight"] = Slot("params", ("lm_head", "kernel"), in_dims=1)
    nd = cfg.first_k_dense_replace
    for i in range(cfg.num_hidden_layers):
        moe = i >= nd
        where = ("moe_layers" if moe else "dense_layers", "layers", "block")
        m.update(_block_slots(cfg, f"model.layers.{i}.", where, i - nd if moe else i, moe))
    for k in range(cfg.num_nextn_predict_layers):
        i = cfg.num_hidden_layers + k
        pre, mod = f"model.layers.{i}.", f"mtp_{k}"
        m.update(_block_slots(cfg, pre, (mod, "block"), None, moe=i >= nd))
        m[f"{pre}enorm.weight"] = Slot("params", (mod, "enorm", "scale"))
        m[f"{pre}hnorm.weight"] = Slot("params", (mod, "hnorm", "scale"))
        m[f"{pre}eh_proj.weight"] = Slot("params", (mod, "eh_proj", "kernel"), in_dims=1)
        m[f"{pre}shared_head.norm.weight"] = Slot("params", (mod, "head_norm", "scale"))
        m[f"{pre}embed_tokens.weight"] = Slot("params", ("embed", "embedding"), copy_of="model.embed_tokens.weight")
        if not cfg.tie_word_embeddings:
            m[f"{pre}shared_head.head.weight"] = Slot("params", ("lm_head", "kernel"), in_dims=1,
                                                      copy_of="lm_head.weight")
    return m


def abstract_variables(cfg: ModelConfig) -> dict:
    """Shapes/dtypes of ``Transformer(cfg)`` variables, without allocating them."""
    tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    return nn.meta.unbox(jax.eval_shape(lambda t: Transformer(cfg).init(jax.random.key(0), t), tokens))


def _leaf(tree: dict, path: tuple[str, ...]):
    for p in path:
        tree = tree[p]
    return tree


def _slot_shape(slot: Slot, leaf_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of one HF tensor's slice of the leaf (stack and expert axes removed), in our layout."""
    return leaf_shape[(slot.layer is not None) + (slot.expert is not None):]


def _hf_shape(slot: Slot, ours: tuple[int, ...]) -> tuple[int, ...]:
    if not slot.in_dims:
        return ours
    return math.prod(ours[slot.in_dims:]), math.prod(ours[: slot.in_dims])


def to_ours(slot: Slot, w: np.ndarray, ours: tuple[int, ...]) -> np.ndarray:
    """HF tensor → our layout (linear weights: [out, in] → [*in, *out])."""
    return w.T.reshape(ours) if slot.in_dims else w.reshape(ours)


def to_hf(slot: Slot, w: np.ndarray) -> np.ndarray:
    """Our layout → HF tensor (inverse of :func:`to_ours`)."""
    if not slot.in_dims:
        return w
    n_in = math.prod(w.shape[: slot.in_dims])
    return np.ascontiguousarray(w.reshape(n_in, -1).T)


class HFCheckpoint:
    """An HF checkpoint directory: ``config.json`` + ``model.safetensors`` or sharded files with an index."""

    def __init__(self, hf_dir: str | Path):
        self.dir = Path(hf_dir)
        if not (self.dir / "config.json").exists():
            raise CheckpointError(f"{self.dir}: no config.json (is this an HF checkpoint directory?)")
        self.hf_config = json.loads((self.dir / "config.json").read_text())
        index = self.dir / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.dir.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"{self.dir}: no *.safetensors files")
        self.files: dict[str, SafetensorsFile] = {}
        self.where: dict[str, str] = {}
        for f in files:
            if not (self.dir / f).exists():
                raise CheckpointError(f"{self.dir}: index names {f!r}, which does not exist")
            sf = SafetensorsFile(self.dir / f)
            self.files[f] = sf
            for k in sf.keys():
                if k in self.where:
                    raise CheckpointError(f"{self.dir}: tensor {k!r} is in both {self.where[k]} and {f}")
                self.where[k] = f
        if index.exists():
            missing = sorted(k for k, f in weight_map.items() if self.where.get(k) != f)
            if missing:
                raise CheckpointError(f"{self.dir}: index lists tensors its files lack: {_few(missing)}")
        q = self.hf_config.get("quantization_config") or {}
        self.fp8_block = tuple(q.get("weight_block_size", (fp8.BLOCK, fp8.BLOCK))) if q else None

    def model_config(self, **overrides) -> ModelConfig:
        return model_config_from_hf(self.hf_config, **overrides)

    def keys(self) -> set[str]:
        return set(self.where)

    def read(self, key: str) -> np.ndarray:
        """One tensor as float32/original dtype, FP8 block weights dequantised to float32."""
        sf = self.files[self.where[key]]
        w = sf.get(key)
        if w.dtype == fp8.E4M3 or w.dtype.name.startswith("float8"):
            sk = key.removesuffix(".weight") + ".weight_scale_inv"
            if sk not in self.where:
                raise CheckpointError(f"{self.dir}: FP8 tensor {key!r} has no {sk!r}")
            block = self.fp8_block or (fp8.BLOCK, fp8.BLOCK)
            if block[0] != block[1]:
                raise CheckpointError(f"{self.dir}: weight_block_size {list(block)} must be square")
            try:
                return fp8.dequantize_blocks(w, self.files[self.where[sk]].get(sk), block[0])
            except ValueError as e:
                raise CheckpointError(f"{self.dir}: {key}: {e}") from None
        return w

    def read_fp8(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """One linear weight as (E4M3 [out, in], scale_inv float32 [ceil(out/128), ceil(in/128)]) in HF layout.

        FP8 tensors come as stored; others (a BF16 checkpoint) are block-quantised here.
        """
        sf = self.files[self.where[key]]
        w = sf.get(key)
        if not (w.dtype == fp8.E4M3 or w.dtype.name.startswith("float8")):
            return fp8.quantize_blocks(w)
        if w.dtype != fp8.E4M3:
            raise CheckpointError(f"{self.dir}: {key} is {w.dtype}; FP8 weights are kept only as float8_e4m3fn "
                                  f"(load without fp8_weights to dequantise)")
        block = self.fp8_block or (fp8.BLOCK, fp8.BLOCK)
        if tuple(block) != (fp8.BLOCK, fp8.BLOCK):
            raise CheckpointError(f"{self.dir}: weight_block_size {list(block)}: FP8 weights are kept only with "
                                  f"[{fp8.BLOCK}, {fp8.BLOCK}] blocks (load without fp8_weights to dequantise)")
        sk = key.removesuffix(".weight") + ".weight_scale_inv"
        if sk not in self.where:
            raise CheckpointError(f"{self.dir}: FP8 tensor {key!r} has no {sk!r}")
        s = np.asarray(self.files[self.where[sk]].get(sk), np.float32)
        if s.shape != fp8.block_grid(w.shape):
            raise CheckpointError(f"{self.dir}: {sk} has shape {list(s.shape)}; a {list(w.shape)} weight with "
                                  f"128×128 blocks needs {list(fp8.block_grid(w.shape))} (ceil on both dims)")
        return w, s


def _few(names: list[str], n: int = 8) -> str:
    return ", ".join(names[:n]) + (f" … and {len(names) - n} more" if len(names) > n else "")


def load_hf(hf_dir: str | Path, dtype: str | None = "float32", cfg: ModelConfig | None = None,
            strict: bool = True, place: Callable[[tuple[str, ...], np.ndarray], jax.Array] | None = None,
            progress: bool = False, fp8_weights: bool = False) -> tuple[dict, ModelConfig]:
    """Read an HF DeepSeek-V3 checkpoint → (variables {'params', 'router'}, ModelConfig).

    ``dtype`` is the storage dtype of the loaded params (router bias and gate stay float32); ``place`` puts
    each finished leaf where it belongs (default ``jnp.asarray``; pass a sharded ``device_put`` for meshes).
    ``strict`` rejects tensors the model has no place for. ``fp8_weights`` keeps the quantised linear weights
    as E4M3 + ``*_scale_inv`` leaves (sets ``cfg.fp8_weights``; a BF16 checkpoint is block-quantised on load).
    """
    ck = HFCheckpoint(hf_dir)
    cfg = cfg or ck.model_config()
    if dtype is not None:
        cfg = dataclasses.replace(cfg, param_dtype=dtype)
    if fp8_weights:
        cfg = dataclasses.replace(cfg, fp8_weights=True)
    present = ck.keys()
    # HF's save_pretrained drops the MTP layers: load the main model, and say so, when none of them is there.
    for k in range(cfg.num_nextn_predict_layers):
        if not any(key.startswith(f"model.layers.{cfg.num_hidden_layers + k}.") for key in present):
            warnings.warn(f"{hf_dir}: config has {cfg.num_nextn_predict_layers} MTP layer(s) but the checkpoint has "
                          f"no tensors for MTP layer {k + 1} (model.layers.{cfg.num_hidden_layers + k}.*); "
                          f"loading {k} MTP layer(s)", stacklevel=2)
            cfg = dataclasses.replace(cfg, num_nextn_predict_layers=k)
            break
    kmap = key_map(cfg)
    scale_keys = {k for k in present if k.endswith(".weight_scale_inv")}
    missing = sorted(k for k, s in kmap.items() if k not in present and s.copy_of is None)
    extra = sorted(present - set(kmap) - scale_keys)
    if missing or (extra and strict):
        msg = []
        if missing:
            msg.append(f"missing tensors: {_few(missing)}")
        if extra and strict:
            msg.append(f"unexpected tensors (not in a {cfg.num_hidden_layers}-layer model with "
                       f"{cfg.num_nextn_predict_layers} MTP layers): {_few(extra)}")
        raise CheckpointError(f"{hf_dir}: " + "; ".join(msg))

    abstract = abstract_variables(cfg)
    by_leaf: dict[tuple[str, tuple[str, ...]], list[tuple[str, Slot]]] = defaultdict(list)
    copies = []
    for k, s in kmap.items():
        if s.copy_of is not None:
            if k in present:
                copies.append((k, s))
            continue
        by_leaf[(s.collection, s.path)].append((k, s))

    place = place or (lambda _path, a: jnp.asarray(a))
    out: dict = {"params": {}, "router": {}}
    n_leaves = len(by_leaf)
    for n, ((col, path), entries) in enumerate(sorted(by_leaf.items())):
        spec = _leaf(abstract[col], path)
        buf = np.empty(spec.shape, np.dtype(spec.dtype))
        # An E4M3 leaf (fp8_weights) comes with a scale_inv leaf: our [K, N] grid is the checkpoint's, transposed.
        scale_path = (*path[:-1], f"{path[-1]}_scale_inv") if buf.dtype == fp8.E4M3 else None
        sbuf = None if scale_path is None else np.empty(_leaf(abstract[col], scale_path).shape, np.float32)
        for key, slot in entries:
            ours = _slot_shape(slot, spec.shape)
            src_shape = ck.files[ck.where[key]].shape(key)
            want = _hf_shape(slot, ours)
            if tuple(src_shape) != tuple(want):
                raise CheckpointError(f"{hf_dir}: tensor {key!r} has shape {list(src_shape)}, expected {list(want)}")
            idx = tuple(i for i in (slot.layer, slot.expert) if i is not None)
            try:
                if sbuf is None:
                    buf[idx] = to_ours(slot, ck.read(key), ours)
                else:
                    q, s = ck.read_fp8(key)
                    buf[idx], sbuf[idx] = to_ours(slot, q, ours), s.T
            except SafetensorsError as e:
                raise CheckpointError(str(e)) from None
        node = out[col]
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = place((col, *path), buf)
        if scale_path is not None:
            node[scale_path[-1]] = place((col, *scale_path), sbuf)
        del buf, sbuf
        if progress:
            print(f"\rloaded {n + 1}/{n_leaves} parameter leaves", end="", flush=True)
    if progress:
        print()
    for key, slot in copies:
        main = np.asarray(_leaf(out[slot.collection], slot.path))
        dup = to_ours(slot, ck.read(key), main.shape)
        if not np.array_equal(dup.astype(main.dtype), main):
            warnings.warn(f"{key} differs from {slot.copy_of}; dsv3-jax shares one copy and uses {slot.copy_of}",
                          stacklevel=2)
    if not out["router"]:
        out.pop("router")
    return out, cfg


def iter_hf_tensors(variables: dict, cfg: ModelConfig, dtype: str | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, tensor) for every tensor of the HF layout, MTP copies of embedding and head included."""
    if cfg.fp8_weights:
        raise ValueError("cannot export variables loaded with fp8_weights=True (E4M3 + scale_inv leaves); "
                         "load the checkpoint without fp8_weights to convert it")
    kmap = key_map(cfg)
    for key, slot in kmap.items():
        leaf = _leaf(variables[slot.collection], slot.path)
        idx = tuple(i for i in (slot.layer, slot.expert) if i is not None)
        w = np.asarray(leaf[idx] if idx else leaf)
        keep_f32 = slot.collection == "router" or slot.path[-1] == "gate"
        if dtype is not None and not keep_f32:
            w = w.astype(jnp.dtype(dtype))
        yield key, to_hf(slot, w)


def save_hf(variables: dict, cfg: ModelConfig, out_dir: str | Path, dtype: str | None = None,
            max_shard_bytes: int = 4 << 30) -> Path:
    """Write an HF checkpoint (config.json + safetensors, sharded with an index past ``max_shard_bytes``).

    Written to a temporary directory beside ``out_dir`` and renamed when complete; refuses to overwrite.
    """
    out = Path(out_dir)
    if out.exists():
        raise FileExistsError(f"{out} exists; choose a new directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        # Shards are written as they fill (one shard in RAM at a time), then named "-of-N" once N is known.
        pending: list[tuple[str, np.ndarray]] = []
        written: list[tuple[Path, list[str], int]] = []

        def flush() -> None:
            path = tmp / f"shard-{len(written)}.tmp"
            write_safetensors(path, pending)
            written.append((path, [k for k, _ in pending], sum(w.nbytes for _, w in pending)))
            pending.clear()

        for key, w in iter_hf_tensors(variables, cfg, dtype):
            if pending and sum(x.nbytes for _, x in pending) + w.nbytes > max_shard_bytes:
                flush()
            pending.append((key, w))
        flush()
        if len(written) == 1:
            written[0][0].rename(tmp / "model.safetensors")
        else:
            weight_map = {}
            for i, (path, keys, _) in enumerate(written):
                name = f"model-{i + 1:05d}-of-{len(written):05d}.safetensors"
                path.rename(tmp / name)
                weight_map.update(dict.fromkeys(keys, name))
            total = sum(n for _, _, n in written)
            (tmp / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        hf_cfg = model_config_to_hf(cfg)
        if dtype is not None:
            hf_cfg["torch_dtype"] = dtype
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2))
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
