"""Convert between HF safetensors checkpoints and dsv3-jax Orbax checkpoints.

    python -m dsv3_jax.convert --hf-dir DIR --out CKPT_DIR [--dtype bfloat16]     # HF → Orbax
    python -m dsv3_jax.convert --checkpoint CKPT_DIR --to-hf OUT_DIR [--dtype bfloat16]  # Orbax → HF

Both directions stream tensor by tensor and write to a temporary directory renamed when complete. The
tokenizer travels along: ``tokenizer.json`` / ``tokenizer_config.json`` beside the source (for a checkpoint, in
it or a parent — a training run dir keeps one) are copied into the output.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from dsv3_jax.hf import CheckpointError, load_hf, save_hf
from dsv3_jax.params_io import load_variables, save_variables

DTYPES = ("float32", "bfloat16")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def copy_tokenizer(src: str | Path, out: str | Path, levels: int = 2) -> Path | None:
    """Copy the first ``tokenizer.json`` in ``src`` or up to ``levels`` parents (and its tokenizer_config.json)
    into ``out``; the file copied, or None when there is none."""
    d = Path(src).expanduser().absolute()
    for p in [d, *d.parents][:levels + 1]:
        if (p / "tokenizer.json").is_file():
            for name in TOKENIZER_FILES:
                if (p / name).is_file():
                    shutil.copyfile(p / name, Path(out) / name)
            return p / "tokenizer.json"
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dsv3_jax.convert", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf-dir", help="HF checkpoint directory (config.json + *.safetensors)")
    src.add_argument("--checkpoint", help="dsv3-jax params checkpoint directory (from --out), or a trainer run dir")
    ap.add_argument("--out", help="output Orbax checkpoint directory (with --hf-dir)")
    ap.add_argument("--to-hf", help="output HF directory (with --checkpoint)")
    ap.add_argument("--dtype", choices=DTYPES, default=None,
                    help="parameter dtype to store (default: float32 for Orbax, as stored for HF export)")
    ap.add_argument("--force", action="store_true", help="overwrite an existing --out")
    ap.add_argument("--allow-extra", action="store_true", help="ignore tensors the model has no place for")
    a = ap.parse_args(argv)
    try:
        if a.hf_dir:
            if not a.out:
                ap.error("--hf-dir needs --out")
            variables, cfg = load_hf(a.hf_dir, dtype=a.dtype or "float32", strict=not a.allow_extra, progress=True)
            out = save_variables(a.out, variables, cfg, overwrite=a.force)
            copy_tokenizer(a.hf_dir, out, levels=0)
            print(f"wrote {out} ({cfg.num_hidden_layers} layers, {cfg.num_nextn_predict_layers} MTP, "
                  f"{cfg.param_dtype})")
        else:
            if not a.to_hf:
                ap.error("--checkpoint needs --to-hf")
            if (Path(a.checkpoint) / "variables").is_dir():
                variables, cfg = load_variables(a.checkpoint)
            else:  # a trainer run dir or its checkpoints/: the latest step's weights
                from dsv3_jax.training.checkpoint import restore_params

                variables, cfg = restore_params(a.checkpoint)
            out = save_hf(variables, cfg.model, a.to_hf, dtype=a.dtype)
            copy_tokenizer(a.checkpoint, out)
            print(f"wrote {out}")
    except (CheckpointError, FileExistsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
