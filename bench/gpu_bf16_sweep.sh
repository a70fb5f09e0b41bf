#!/usr/bin/env bash
# One device call (~5 min): the Hopper BF16 grouped GEMMs' tiling sweep at the bench shapes (bench/bf16_wgrad_sweep.py:
# the Wgrad's schedules, tiles and depths, then fwd/Dgrad K depth; ends with the DSV3_BF16_* settings of the
# winners), then the row-gather probe for a fused dispatch (bench/mgpu_row_gather_probe.py).
#   bash bench/gpu_bf16_sweep.sh      # results in $OUT (bf16_sweep.json/.log, row_gather.json/.log); carry .whl
# Then try a winner in the step: DSV3_BF16_WGRAD=... bash bench/gpu_bf16.sh 13
set -uo pipefail
source bench/gpu_setup.sh
nvidia-smi --query-gpu=name --format=csv,noheader
F="Autotuning cache miss|^WARNING:absl"
timeout 270 python3 bench/bf16_wgrad_sweep.py --budget 180 --stall 45 --json "$OUT/bf16_sweep.json" 2>&1 \
  | grep -v -E "$F" | tee "$OUT/bf16_sweep.log" | grep -v -E "^\[[0-9]+\]" | tail -90
timeout 90 python3 bench/mgpu_row_gather_probe.py --json "$OUT/row_gather.json" 2>&1 | grep -v -E "$F" \
  | tee "$OUT/row_gather.log" | tail -3
