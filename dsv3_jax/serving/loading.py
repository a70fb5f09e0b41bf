"""Find what a server needs: weights + config from a checkpoint or HF directory, and the matching tokenizer.

Weights: ``--checkpoint DIR`` is a params checkpoint (``config.yaml`` + ``variables/``, see ``params_io``) or,
when ``dsv3_jax.training.checkpoint`` exists, a training checkpoint read by its ``restore_params``;
``--hf-dir DIR`` is a Hugging Face DeepSeek-V3 directory (``config.json`` + safetensors).

Tokenizer: ``--tokenizer PATH`` if given; else the first ``tokenizer.json`` in the directory or its parents
(a training run_dir keeps one above its checkpoints); else the default BPE of the config's data section.
A ``tokenizer_config.json`` beside it supplies ``chat_template`` and ``add_bos_token``.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
from pathlib import Path
from typing import Any

from dsv3_jax.config import Config, ModelConfig

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Loaded:
    variables: dict
    model: ModelConfig
    config: Config
    source: Path


def load_model(checkpoint: str | Path | None = None, hf_dir: str | Path | None = None,
               dtype: str | None = None) -> Loaded:
    """Weights and configs from exactly one of ``checkpoint`` / ``hf_dir`` (``dtype`` casts the params)."""
    if (checkpoint is None) == (hf_dir is None):
        raise ValueError("give exactly one of --checkpoint DIR or --hf-dir DIR")
    if hf_dir is not None:
        from dsv3_jax.hf import load_hf

        variables, model = load_hf(hf_dir, dtype=dtype or "float32")
        return Loaded(variables, model, Config(model=model), Path(hf_dir))
    d = Path(checkpoint).expanduser()
    if (d / "config.yaml").exists() and (d / "variables").exists():
        from dsv3_jax.params_io import load_variables

        variables, cfg = load_variables(d, dtype)
        return Loaded(variables, cfg.model, cfg, d)
    try:
        training = importlib.import_module("dsv3_jax.training.checkpoint")
    except ImportError:
        raise FileNotFoundError(f"{d}: not a params checkpoint (expects config.yaml and variables/; write one with "
                                "python -m dsv3_jax.convert) and this install cannot read training checkpoints"
                                ) from None
    variables, cfg = training.restore_params(d)
    if dtype is not None:
        import jax

        variables = {k: v if k == "router" else jax.tree.map(lambda a: a.astype(dtype), v)
                     for k, v in variables.items()}
    return Loaded(variables, cfg.model, cfg, d)


def find_tokenizer_file(start: Path, levels: int = 4) -> Path | None:
    """The first ``tokenizer.json`` in ``start`` or up to ``levels`` parents."""
    d = start.expanduser().absolute()
    for p in [d, *d.parents][:levels + 1]:
        if (p / "tokenizer.json").is_file():
            return p / "tokenizer.json"
    return None


def load_serving_tokenizer(loaded: Loaded, explicit: str | Path | None = None) -> tuple[Any, dict[str, Any]]:
    """→ (Tokenizer, tokenizer_config dict — empty when there is none)."""
    from dsv3_jax.data import Tokenizer, load_tokenizer

    path = Path(explicit) if explicit else find_tokenizer_file(loaded.source)
    if path is None:
        log.info("no tokenizer.json in %s or its parents: using the default BPE of data.source=%s",
                 loaded.source, loaded.config.data.source)
        tok = load_tokenizer(loaded.config.data)
        tok_cfg: dict[str, Any] = {}
    else:
        tok = Tokenizer.from_file(path)
        cfg_file = path.parent / "tokenizer_config.json"
        tok_cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
    if tok.vocab_size > loaded.model.vocab_size:
        log.warning("tokenizer %s has %d ids but the model only %d: prompts with larger ids are refused",
                    tok.name, tok.vocab_size, loaded.model.vocab_size)
    return tok, tok_cfg
