#!/usr/bin/env bash
# One device call: the BF16 bench step (13 layers) profiled op by op, with XLA's optimized HLO of the step dumped
# (to name the profile's fusions), then the plain step again and the HF peer in the same lease (issue 20):
#   bash bench/gpu_prof_dump.sh [override ...]
# Results: $OUT/train_prof.log (PROFILE lines), $OUT/hlo.tgz (*after_optimizations.txt, buffer assignment),
# $OUT/train_base.json, $OUT/hf_peer.log. DUMP=0 skips the HLO dump; VARIANTS=0 stops after the profile (then run
# bench/gpu_step_variants.sh for the plain step, other variants and the peer). Carry .whl.
set -uo pipefail
source bench/gpu_setup.sh
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
DUMP_FLAGS="--xla_dump_to=/tmp/hlo --xla_dump_hlo_module_re=.*train_core.*"
[ "${DUMP:-1}" = 1 ] || DUMP_FLAGS=""
XLA_FLAGS="$DUMP_FLAGS" timeout "${LIMIT:-200}" \
  python3 bench/train.py --config configs/bench_1gpu.yaml --layers 13 --seq 4096 --mb 2 --mtp 0 --steps 8 \
  --json "$OUT/train_prof.json" --profile /tmp/prof model.remat=full train.moments_dtype=bfloat16 "$@" 2>&1 \
  | grep -v -E "Autotuning cache miss|^WARNING:absl" > "$OUT/train_prof.log"
grep RESULT "$OUT/train_prof.log"
if [ "${DUMP:-1}" = 1 ]; then
  (cd /tmp/hlo && tar czf "$OUT/hlo.tgz" $(ls | grep -E "after_optimizations.txt$|buffer-assignment.txt$" | head -6))
  ls -la "$OUT/hlo.tgz"
fi
[ "${VARIANTS:-1}" = 1 ] && LIMIT=150 bash bench/gpu_step_variants.sh 13 "base||$*"
