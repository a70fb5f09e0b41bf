#!/usr/bin/env bash
# One device call: train-step benchmarks of BENCHMARKS.md — the bench config at LAYERS (default 13, the most
# that fits 80 GB), BF16 vs FP8 at 6 layers, and (unless SKIP_PEER) HF transformers' step at LAYERS.
#   bash bench/gpu_train.sh [LAYERS]          # results in $OUT
set -uo pipefail
LAYERS=${1:-13}
source bench/gpu_setup.sh
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
B="--config configs/bench_1gpu.yaml --seq 4096 --mb 2 --mtp 0 --steps 8"
R="model.remat=full train.moments_dtype=bfloat16"
run() { local name=$1; shift; timeout "${LIMIT:-150}" python3 bench/train.py $B --json "$OUT/$name.json" "$@" 2>&1 \
  | grep -v -E "Autotuning cache miss|^WARNING:absl" | tee "$OUT/$name.log" | grep -E "RESULT|Error|error" | tail -3; }
run train_L${LAYERS}_bf16 --layers "$LAYERS" $R
run train_L6_bf16 --layers 6 $R
run train_L6_fp8 --layers 6 $R train.precision=fp8
if [ -z "${SKIP_PEER:-}" ]; then
  timeout 150 python3 .peers/hf_peer_train.py "$LAYERS" 4096 2 2>&1 | tee "$OUT/train_hf_L$LAYERS.log" | grep -E "RESULT|Error" | tail -3
fi
