#!/usr/bin/env bash
# One device call: the FP8 train step against BF16 (issue 7's ≥1.3× target) — the FP8 GEMM paths checked against
# the exact emulation and FP32 on one layer's shapes, the step at 6 layers and at LAYERS (the bench config), and
# (with GAP_STEPS > 0) the short BF16-vs-FP8 loss-gap run of bench/gpu_fp8_gap.sh.
#   GAP_STEPS=200 bash bench/gpu_fp8_step.sh [LAYERS]      # results in $OUT; carry .whl (and .tok for the gap)
set -uo pipefail
LAYERS=${1:-13}
source bench/gpu_setup.sh
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
R="model.remat=full train.moments_dtype=bfloat16"
run() { local name=$1; shift; timeout "${LIMIT:-150}" python3 bench/train.py --config configs/bench_1gpu.yaml \
  --seq 4096 --mb 2 --mtp 0 --steps 8 --json "$OUT/$name.json" "$@" $R 2>&1 \
  | grep -v -E "Autotuning cache miss|^WARNING:absl" | tee "$OUT/$name.log" | grep -E "RESULT|Error|error" | tail -3; }
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 120 python3 bench/fp8_paths.py 2>&1 | grep -v -E "Autotuning cache miss|^WARNING:absl" \
  | tee "$OUT/fp8_paths.log" | grep -E "RESULT|Error|error" | tail -8
run train_L6_bf16 --layers 6
run train_L6_fp8 --layers 6 train.precision=fp8
run train_L${LAYERS}_bf16 --layers "$LAYERS"
run train_L${LAYERS}_fp8 --layers "$LAYERS" train.precision=fp8
if [ "${GAP_STEPS:-0}" -gt 0 ]; then LIMIT=${GAP_LIMIT:-150} bash bench/gpu_fp8_gap.sh "$GAP_STEPS"; fi
