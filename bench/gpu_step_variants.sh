#!/usr/bin/env bash
# One device call comparing variants of the BF16 bench step with the HF peer in the same lease (issue 20):
#   bash bench/gpu_step_variants.sh LAYERS 'name|ENV=V ...|override ...' ...
# e.g. bash bench/gpu_step_variants.sh 13 'base||' 'cast_inside||train.experts_cast_ahead=false' 'unroll4||model.scan_unroll=4'
# Every variant runs bench/train.py on configs/bench_1gpu.yaml (seq 4096 × 2, MTP off, BF16 moments, remat full
# unless the overrides say otherwise) for 8 steps; then the HF peer (bench/peers/hf_peer_train.py) when PEER=1
# (default). Results: $OUT/train_<name>.json/.log, $OUT/hf_peer.log and a summary line per run; carry .whl.
set -uo pipefail
LAYERS=${1:-13}; shift
source bench/gpu_setup.sh
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
F="Autotuning cache miss|^WARNING:absl"
nvidia-smi --query-gpu=name --format=csv,noheader
for spec in "$@"; do
  IFS='|' read -r name envs overrides <<<"$spec"
  # shellcheck disable=SC2086
  env $envs timeout "${LIMIT:-150}" python3 bench/train.py --config configs/bench_1gpu.yaml --layers "$LAYERS" \
    --seq 4096 --mb 2 --mtp 0 --steps 8 --json "$OUT/train_$name.json" model.remat=full \
    train.moments_dtype=bfloat16 $overrides 2>&1 | grep -v -E "$F" > "$OUT/train_$name.log"
  python3 - "$OUT/train_$name.json" "$name" <<'PY'
import json, sys, pathlib
p = pathlib.Path(sys.argv[1])
if p.exists():
    r = json.loads(p.read_text())
    print(f"VARIANT {sys.argv[2]:24s} step {r.get('step_ms', float('nan')):7.1f} ms  MFU {r.get('mfu')}  peak {r.get('peak_mem_gib')} GiB")
else:
    print(f"VARIANT {sys.argv[2]:24s} no result")
PY
  [ -f "$OUT/train_$name.json" ] || tail -5 "$OUT/train_$name.log"
done
if [ "${PEER:-1}" = 1 ]; then
  timeout 120 python3 bench/peers/hf_peer_train.py "$LAYERS" 4096 2 2>&1 | tee "$OUT/hf_peer.log" | grep RESULT
fi
