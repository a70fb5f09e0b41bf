#!/usr/bin/env bash
# Device calls for issue 7 (FP8 ≥1.3× the BF16 step, loss gap <0.25%). Each fits one 10-minute call:
#   bash bench/gpu_fp8_step.sh steps [LAYERS]   # FP8 paths vs the emulation and FP32 on one layer's shapes, then
#                                               # the step BF16 vs FP8 at 6 layers and at LAYERS (default 13)
#   bash bench/gpu_fp8_step.sh profile          # device time per kernel of the 6-layer FP8 step and BF16 step
#   bash bench/gpu_fp8_step.sh check [LAYERS]   # after a jax/dependency change: the FP8 paths, then BF16 vs FP8 at
#                                               # LAYERS only (the Mosaic kernels still run and keep the speed-up)
#   bash bench/gpu_fp8_step.sh gap [STEPS]      # the BF16-vs-FP8 loss-gap run (bench/gpu_fp8_gap.sh; carry .tok)
#   bash bench/gpu_fp8_step.sh quant [LAYERS]   # the fused quantisation kernels vs XLA, a profiled 6-layer FP8 step
#                                               # (trace + optimised HLO in $OUT/prof_fp8.tgz), the steps as `steps`
#   bash bench/gpu_fp8_step.sh wk [LAYERS]      # warps sweep; the fused weight quantiser on vs off at 6 layers
#                                               # (DSV3_FP8_WEIGHT_KERNEL), then LAYERS with the faster, and BF16
# Results in $OUT; carry .whl.
set -uo pipefail
WHAT=${1:-steps}
source bench/gpu_setup.sh
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
R="model.remat=full train.moments_dtype=bfloat16"
run() { local name=$1; shift; timeout "${LIMIT:-150}" python3 bench/train.py --config configs/bench_1gpu.yaml \
  --seq 4096 --mb 2 --mtp 0 --steps 8 --json "$OUT/$name.json" "$@" $R 2>&1 \
  | grep -v -E "Autotuning cache miss|^WARNING:absl" | tee "$OUT/$name.log" | grep -E "RESULT|Error|error" | tail -3; }
nvidia-smi --query-gpu=name --format=csv,noheader
case "$WHAT" in
  steps)
    LAYERS=${2:-13}
    timeout 120 python3 bench/fp8_paths.py 2>&1 | grep -v -E "Autotuning cache miss|^WARNING:absl" \
      | tee "$OUT/fp8_paths.log" | grep -E "RESULT|Error|error" | tail -8
    run train_L6_bf16 --layers 6
    run train_L6_fp8 --layers 6 train.precision=fp8
    run train_L${LAYERS}_bf16 --layers "$LAYERS"
    run train_L${LAYERS}_fp8 --layers "$LAYERS" train.precision=fp8 ;;
  check)
    LAYERS=${2:-13}
    python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
    timeout 120 python3 bench/fp8_paths.py 2>&1 | grep -v -E "Autotuning cache miss|^WARNING:absl" \
      | tee "$OUT/fp8_paths.log" | grep -E "RESULT|Error|error" | tail -8
    run train_L${LAYERS}_bf16 --layers "$LAYERS"
    run train_L${LAYERS}_fp8 --layers "$LAYERS" train.precision=fp8 ;;
  profile)
    LIMIT=240 run prof_L6_fp8 --layers 6 --profile /tmp/prof_fp8 train.precision=fp8
    LIMIT=240 run prof_L6_bf16 --layers 6 --profile /tmp/prof_bf16 ;;
  quant)
    LAYERS=${2:-13}
    timeout 120 python3 bench/kernels.py --only fp8_quant --json "$OUT/kernels_fp8_quant.json" 2>&1 \
      | grep -v -E "Autotuning cache miss|^WARNING:absl" | tail -12
    XLA_FLAGS="--xla_dump_to=/tmp/hlo_fp8" LIMIT=240 run prof_L6_fp8 --layers 6 --profile /tmp/prof_fp8 \
      train.precision=fp8
    mkdir -p /tmp/pf && find /tmp/hlo_fp8 -name "*train_core*after_optimizations.txt" -exec cp {} /tmp/pf/ \; \
      && find /tmp/prof_fp8 -name "*.trace.json.gz" -exec cp {} /tmp/pf/ \; && tar czf "$OUT/prof_fp8.tgz" -C /tmp/pf .
    run train_L6_bf16 --layers 6
    run train_L${LAYERS}_fp8 --layers "$LAYERS" train.precision=fp8
    run train_L${LAYERS}_bf16 --layers "$LAYERS" ;;
  wk)  # the fused weight-quantisation kernel on/off at 6 layers, then LAYERS with the faster and BF16
    LAYERS=${2:-13}
    timeout 150 python3 bench/kernels.py --only fp8_quant --json "$OUT/kernels_fp8_quant.json" 2>&1 \
      | grep -v -E "Autotuning cache miss|^WARNING:absl" | tail -16
    DSV3_FP8_WEIGHT_KERNEL=1 run train_L6_fp8_wk1 --layers 6 train.precision=fp8
    DSV3_FP8_WEIGHT_KERNEL=0 run train_L6_fp8_wk0 --layers 6 train.precision=fp8
    WK=$(python3 -c "import json;a,b=(json.load(open('$OUT/train_L6_fp8_wk%d.json'%i))['step_ms'] for i in (0,1));print(int(b<a))")
    echo "weight kernel: $WK"
    DSV3_FP8_WEIGHT_KERNEL=$WK run train_L${LAYERS}_fp8_wk$WK --layers "$LAYERS" train.precision=fp8
    run train_L${LAYERS}_bf16 --layers "$LAYERS" ;;
  gap)
    LIMIT=${GAP_LIMIT:-190} bash bench/gpu_fp8_gap.sh "${2:-600}" ;;
  *) echo "usage: bash bench/gpu_fp8_step.sh steps|check|profile|quant|wk|gap [N]" >&2; exit 2 ;;
esac
