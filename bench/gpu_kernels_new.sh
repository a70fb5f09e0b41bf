#!/usr/bin/env bash
# One device call: the kernels written without a GPU, first on the H100 — the block-scaled FP8 Pallas GEMMs
# (DSV3_FP8_GEMM=pallas) and the fused MLA decode attention (model.mla_decode_impl=pallas): kernel tables against
# BF16 / the XLA einsums, then the FP8 step at 6 layers (pallas vs dequant vs BF16) and decode with the kernel.
#   bash bench/gpu_kernels_new.sh            # results in $OUT; carry .whl
set -uo pipefail
source bench/gpu_setup.sh
q() { grep -v -E "Autotuning cache miss|^WARNING:absl" | tee "$OUT/$1.log" | grep -E "RESULT|ERROR|Error|pallas|xla|bf16|step|ms" | cut -c1-400 | tail -40; }
timeout 270 python3 bench/kernels.py --only fp8_sweep --only fp8 --only mla_decode --json "$OUT/kernels_new.json" 2>&1 | q kernels_new
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
T="--layers 6 --seq 4096 --mb 2 --mtp 0 --steps 6 model.remat=full train.moments_dtype=bfloat16"
timeout 150 python3 bench/train.py --json "$OUT/train_L6_bf16.json" $T 2>&1 | q train_L6_bf16
DSV3_FP8_GEMM=pallas timeout 150 python3 bench/train.py --json "$OUT/train_L6_fp8_pallas.json" $T train.precision=fp8 \
  2>&1 | q train_L6_fp8_pallas
[ "${1:-}" = decode ] || exit 0  # decode with the kernel: a second call (bash bench/gpu_kernels_new.sh decode)
S="--config configs/bench_1gpu.yaml --batches 1,32 --tokens 128 --prompt-len 512 --max-len 1024 --decode-chunk 8"
M="model.num_hidden_layers=6 model.num_nextn_predict_layers=0 model.param_dtype=bfloat16"
timeout 120 python3 bench/serving.py $S --json "$OUT/decode_xla.json" $M 2>&1 | q decode_xla
timeout 120 python3 bench/serving.py $S --json "$OUT/decode_pallas.json" $M model.mla_decode_impl=pallas 2>&1 | q decode_pallas
