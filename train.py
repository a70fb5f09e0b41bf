"""Train DeepSeek-V3: ``python train.py --config configs/tiny.yaml [key=value ...]``.

Writes ``run_dir/config.yaml`` (resolved), ``metrics.jsonl``, ``expert_load.jsonl``, ``events/`` (TensorBoard)
and ``checkpoints/``. Running the same command again resumes from the latest complete checkpoint.
SIGTERM/SIGINT: finish the step, save, exit 0. Exit 2: bad config or data setup, run dir in use by another
process, or no intact checkpoint to resume; exit 3: training diverged; exit 4: writing a checkpoint failed (e.g.
disk full; the message names the newest complete checkpoint).
Multi-host: start one process per host with JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID set
(or under SLURM ``srun``); see sharding/distributed.py and the README's Multi-host section.
"""

from __future__ import annotations

import argparse
import importlib
import sys


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                epilog="Overrides are dotted keys, e.g. train.steps=50 model.dtype=bfloat16.")
    p.add_argument("--config", help="YAML config (configs/*.yaml); omitted = the built-in defaults")
    p.add_argument("--data-module", default="dsv3_jax.data",
                   help="module providing the data contract: load_or_train_tokenizer(cfg.data) and "
                        "make_iterator(cfg.data, tokenizer, batch_size, split, shard_index, shard_count)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    return p.parse_args(argv)


def _error(msg: str, code: int) -> int:
    print(f"train.py: error: {msg}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    from dsv3_jax.config import ConfigError, load_config  # light: no JAX yet, so config errors come back fast

    try:
        cfg = load_config(args.config, args.overrides)
        from dsv3_jax.training.schedule import Schedule

        Schedule(cfg)  # batch sizes and run length checked before any data or model work
    except ConfigError as e:
        return _error(str(e), 2)

    if cfg.data.format == "chat" and args.data_module == "dsv3_jax.data":  # SFT: the chat data module
        args.data_module = "dsv3_jax.data.chat"
    try:
        data = importlib.import_module(args.data_module)
    except ModuleNotFoundError as e:
        return _error(f"data module {args.data_module!r} is not available ({e}); pass --data-module", 2)
    # The contract names the loader load_or_train_tokenizer; accept load_tokenizer, its name on the data branch.
    load_tok = getattr(data, "load_or_train_tokenizer", None) or getattr(data, "load_tokenizer", None)
    if load_tok is None or not hasattr(data, "make_iterator"):
        return _error(f"data module {args.data_module!r} lacks load_or_train_tokenizer / make_iterator", 2)

    import jax

    from sharding.distributed import initialize

    try:
        initialize()  # multi-process runs join here, before any other JAX work; a no-op on one process
    except ConfigError as e:  # DistributedError: a partial or malformed launch environment
        return _error(str(e), 2)

    from dsv3_jax.training.checkpoint import CheckpointDamaged, CheckpointSaveError
    from dsv3_jax.training.init_from import resolve_config, source_tokenizer
    from dsv3_jax.training.loop import Diverged, train

    try:
        cfg, src = resolve_config(cfg)  # train.init_from: the model (and tokenizer) of the source weights
        if src is not None and not cfg.data.tokenizer:  # a run that kept no tokenizer.json: its data makes it
            tokenizer = source_tokenizer(src)
        else:
            tokenizer = load_tok(cfg.data)
        if tokenizer.vocab_size > cfg.model.vocab_size:
            raise ConfigError(f"tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size="
                              f"{cfg.model.vocab_size}; raise model.vocab_size or lower data.tokenizer_vocab_size")
    except ValueError as e:  # ConfigError and the data module's errors (DataError is a ValueError)
        return _error(str(e), 2)

    if jax.process_index() == 0:  # the run's tokenizer travels with its weights (serve.py, train.init_from)
        from pathlib import Path

        Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
        if hasattr(tokenizer, "save"):
            tokenizer.save(Path(cfg.run_dir) / "tokenizer.json")

    # The loop passes each process's shard of the batch (shard_index/shard_count; 0 of 1 on a single process).
    def make_train_iter(batch_size: int, shard_index: int = 0, shard_count: int = 1):
        return data.make_iterator(cfg.data, tokenizer, batch_size, split="train", shard_index=shard_index,
                                  shard_count=shard_count)

    def make_eval_iter(batch_size: int, shard_index: int = 0, shard_count: int = 1):
        return data.make_iterator(cfg.data, tokenizer, batch_size, split="validation", shard_index=shard_index,
                                  shard_count=shard_count)

    try:
        result = train(cfg, make_train_iter, make_eval_iter if cfg.train.eval_every > 0 else None)
    except Diverged as e:
        return _error(str(e), 3)
    except (ConfigError, CheckpointDamaged) as e:  # a different model, another writer, no intact checkpoint
        return _error(str(e), 2)
    except CheckpointSaveError as e:  # disk full, ...: one line naming what is intact
        return _error(str(e), 4)
    if jax.process_index() == 0:
        print(f"done: step {result.step}, {result.tokens_seen} tokens, run dir {cfg.run_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
