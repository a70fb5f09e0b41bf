#!/usr/bin/env bash
# One device call: BF16 and FP8 training of the bench architecture (4 layers, seq 2048, 4 sequences/step) from
# the same init and data with train.py, then bench/fp8_gap.py. Needs a tokenizer.json at $TOK (default
# .tok/bpe4096.json: the 4096-token BPE train.py caches for configs/tiny.yaml; carry it).
#   bash bench/gpu_fp8_gap.sh [STEPS]       # results in $OUT
set -uo pipefail
STEPS=${1:-300}; TOK=${TOK:-.tok/bpe4096.json}
source bench/gpu_setup.sh
A="model.num_hidden_layers=4 model.num_nextn_predict_layers=0 data.tokenizer=$TOK data.seq_len=2048
   train.global_batch_size=4 train.steps=$STEPS train.log_every=10 train.eval_every=100 train.checkpoint_every=0
   train.moments_dtype=bfloat16 model.remat=full"
for p in bf16 fp8; do
  timeout -s KILL "${LIMIT:-240}" python3 train.py --config configs/bench_1gpu.yaml $A train.precision=$p \
    run_dir=/tmp/gap_$p 2>&1 | grep -v -E "Autotuning cache miss|^WARNING:absl" > "$OUT/gap_$p.log"
  tail -n 3 "$OUT/gap_$p.log"; cp /tmp/gap_$p/metrics.jsonl "$OUT/gap_${p}_metrics.jsonl"
done
python3 bench/fp8_gap.py /tmp/gap_bf16 /tmp/gap_fp8 --png "$OUT/fp8_gap.png" --json "$OUT/fp8_gap.json"
