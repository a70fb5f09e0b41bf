#!/usr/bin/env bash
# Device call for issue 20 (BF16 step vs HF transformers on one H100), fits one 10-minute call (~9 min worst case):
#   bash bench/gpu_bf16.sh [LAYERS]   # default 13 (the bench config)
# 1. the kernel table: the Hopper BF16 grouped GEMMs (fwd, Dgrad, Wgrad) vs tokamax and XLA ragged_dot at the
#    bench expert shapes (bench/kernels.py --only bf16_mgpu);
# 2. the BF16 step at LAYERS: tokamax (today's path), then moe_impl=mgpu (the new kernels, experts padded to
#    128 rows), then the HF peer (bench/peers/hf_peer_train.py, if the lead copied it into the repo), then mgpu
#    with each layer casting its experts in each pass (train.experts_cast_ahead=false; the default casts them once,
#    ahead of the layer scan).
# Results in $OUT (kernels_bf16.json/.log, train_*.json/.log, hf_peer.log); carry .whl.
set -uo pipefail
LAYERS=${1:-13}
source bench/gpu_setup.sh
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
R="model.remat=full train.moments_dtype=bfloat16"
F="Autotuning cache miss|^WARNING:absl"
run() { local name=$1; shift; timeout "${LIMIT:-130}" python3 bench/train.py --config configs/bench_1gpu.yaml \
  --seq 4096 --mb 2 --mtp 0 --steps 8 --json "$OUT/$name.json" "$@" $R 2>&1 \
  | grep -v -E "$F" | tee "$OUT/$name.log" | grep -E "RESULT|Error|error" | tail -3; }
nvidia-smi --query-gpu=name --format=csv,noheader
python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
timeout 100 python3 bench/kernels.py --only bf16_mgpu --iters 10 --json "$OUT/kernels_bf16.json" 2>&1 \
  | grep -v -E "$F" | tee "$OUT/kernels_bf16.log" | grep -E "^BF16|^device|Error" | tail -40
DSV3_BF16_GEMM=tokamax run train_L${LAYERS}_bf16 --layers "$LAYERS"  # the tokamax path
run train_L${LAYERS}_bf16_mgpu --layers "$LAYERS" model.moe_impl=mgpu
if [ -f bench/peers/hf_peer_train.py ]; then
  timeout 100 python3 bench/peers/hf_peer_train.py "$LAYERS" 4096 2 2>&1 | tee "$OUT/hf_peer.log" | tail -4
else
  echo "bench/peers/hf_peer_train.py absent: HF peer not run"
fi
LIMIT=${AHEAD_LIMIT:-80} run train_L${LAYERS}_bf16_mgpu_inside --layers "$LAYERS" train.experts_cast_ahead=false \
  model.moe_impl=mgpu
python3 - "$OUT" "$LAYERS" <<'PY'
import json, sys, pathlib
out, L = pathlib.Path(sys.argv[1]), sys.argv[2]
for n in ("bf16", "bf16_mgpu", "bf16_mgpu_inside"):
    p = out / f"train_L{L}_{n}.json"
    if p.exists():
        r = json.loads(p.read_text())
        print(f"{n:18s} step {r.get('step_ms', float('nan')):8.1f} ms  MFU {r.get('mfu')}  peak {r.get('peak_mem_gib')} GiB")
    else:
        print(f"{n:18s} (no result)")
PY
