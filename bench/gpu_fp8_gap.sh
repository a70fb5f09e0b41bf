#!/usr/bin/env bash
# One device call: BF16 and FP8 training of the bench architecture (4 layers, seq 2048, 4 sequences/step) from
# the same init and data with train.py, then a second BF16 run (same seed, same data: the run-to-run noise of
# the GPU's nondeterministic reductions, the yardstick for the FP8 gap), then bench/fp8_gap.py on both pairs.
# Needs a tokenizer.json at $TOK (default .tok/bpe4096.json: the 4096-token BPE train.py caches for
# configs/tiny.yaml; carry it). 600 steps × 3 runs take ~7.5 minutes on an H200.
#   bash bench/gpu_fp8_gap.sh [STEPS]       # results in $OUT; REPEAT=0 skips the second BF16 run
set -uo pipefail
STEPS=${1:-600}; TOK=${TOK:-.tok/bpe4096.json}
source bench/gpu_setup.sh
A="model.num_hidden_layers=4 model.num_nextn_predict_layers=0 data.tokenizer=$TOK data.seq_len=2048
   train.global_batch_size=4 train.steps=$STEPS train.log_every=10 train.eval_every=100 train.checkpoint_every=0
   train.moments_dtype=bfloat16 model.remat=full"
RUNS="bf16:bf16 fp8:fp8"; [ "${REPEAT:-1}" = 1 ] && RUNS="$RUNS bf16b:bf16"
for r in $RUNS; do
  name=${r%%:*}; p=${r##*:}
  timeout -s KILL "${LIMIT:-190}" python3 train.py --config configs/bench_1gpu.yaml $A train.precision=$p \
    run_dir=/tmp/gap_$name 2>&1 | grep -v -E "Autotuning cache miss|^WARNING:absl" > "$OUT/gap_$name.log"
  tail -n 2 "$OUT/gap_$name.log"; cp /tmp/gap_$name/metrics.jsonl "$OUT/gap_${name}_metrics.jsonl"
done
python3 bench/fp8_gap.py /tmp/gap_bf16 /tmp/gap_fp8 --png "$OUT/fp8_gap.png" --json "$OUT/fp8_gap.json"
[ "${REPEAT:-1}" = 1 ] && python3 bench/fp8_gap.py /tmp/gap_bf16 /tmp/gap_bf16b --json "$OUT/bf16_repeat_gap.json"
exit 0
