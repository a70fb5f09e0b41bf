#!/usr/bin/env bash
# One device call: install the GPU wheels, then run the kernel and train-step benchmarks and the HF peer in the
# same lease. Results land in $OUT (JSON + logs); the HF peer script travels in .peers/ (carry it; copied from ../shared/peers). bench/report.py turns them into BENCHMARKS.md here.
#   bash bench/gpu_suite.sh [LAYERS] [SEQ] [MB]
set -uo pipefail
LAYERS=${1:-6}; SEQ=${2:-4096}; MB=${3:-2}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())" | tee -a "$OUT/gpu.txt"
python3 bench/kernels.py --json "$OUT/kernels.json" 2>&1 | tee "$OUT/kernels.log" | grep -E "^(device|op|[A-Za-z])" | tail -60
python3 bench/train.py --config configs/bench_1gpu.yaml --layers "$LAYERS" --seq "$SEQ" --mb "$MB" --mtp 0 \
  --json "$OUT/train_ours_mtp0.json" 2>&1 | tee "$OUT/train_ours.log" | grep -E "RESULT|Error|error" | tail -5
[ -n "${SKIP_PEER:-}" ] || python3 .peers/hf_peer_train.py "$LAYERS" "$SEQ" "$MB" 2>&1 | tee "$OUT/train_hf.log" | grep -E "RESULT|Error" | tail -3
