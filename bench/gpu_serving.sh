#!/usr/bin/env bash
# One device call: the decode benchmarks of BENCHMARKS.md (bench config, 6 layers, bf16 weights, no MTP), ours at
# several batch sizes and decode chunks, then (unless SKIP_PEER) HF transformers `generate` on the same GPU.
#   bash bench/gpu_serving.sh            # results in $OUT (JSON + logs)
set -uo pipefail
source bench/gpu_setup.sh
M="model.num_hidden_layers=6 model.num_nextn_predict_layers=0 model.param_dtype=bfloat16"
S="--config configs/bench_1gpu.yaml --prompt-len 512 --tokens 128"
run() { local name=$1; shift; timeout "${LIMIT:-200}" python3 bench/serving.py $S --json "$OUT/$name.json" "$@" \
  2>&1 | grep -v -E "Autotuning cache miss|^WARNING:absl" | tee "$OUT/$name.log" | grep -E "RESULT|device|Error"; }
run serve_chunk8 --batches 1,32,64 --decode-chunk 8 $M
run serve_chunk1 --batches 1 --decode-chunk 1 $M
run serve_chunk8_p2048 --batches 32 --decode-chunk 8 --prompt-len 2048 $M
if [ -z "${SKIP_PEER:-}" ]; then
  for b in 1 32 64; do timeout 120 python3 .peers/hf_peer_decode.py 6 $b 512 128 2>&1 | tee "$OUT/hf_decode_$b.log" \
    | grep -E "RESULT|Error"; done
fi
