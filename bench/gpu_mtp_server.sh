#!/usr/bin/env bash
# One device call: MTP speculative decoding vs plain decode on a model trained with MTP (CKPT: a params
# checkpoint with its tokenizer.json, e.g. the tiny config trained by train.py and saved with
# dsv3_jax.params_io.save_variables; carry it), prompts cut from a stdlib source file; then the HTTP server under
# 64 concurrent streaming clients (bench architecture at 6 layers, random weights).
#   bash bench/gpu_mtp_server.sh [CKPT]      # results in $OUT
# The device has no HTTP stack: carry .whl built with the server's wheels too, e.g.
#   bash ../shared/gpu/wheels.sh .whl fastapi starlette uvicorn h11 click anyio sniffio openai httpx httpcore \
#     distro jiter idna certifi tqdm typing_extensions annotated-doc opentelemetry-api httpx2 httpcore2 truststore
set -uo pipefail
CKPT=${1:-runs/tiny_mtp_params}
source bench/gpu_setup.sh
TXT=$(python3 -c 'import json.decoder as m; print(m.__file__)')
C="--checkpoint $CKPT --batches 1,8 --tokens 256 --prompt-len 64 --max-len 384 --prompt-text $TXT"
q() { grep -v -E "Autotuning cache miss|^WARNING:absl" | tee "$OUT/$1.log" | grep -E "RESULT|MTP|note|Error"; }
timeout 90 python3 bench/serving.py $C --decode-chunk 1 --json "$OUT/mtp_plain1.json" 2>&1 | q mtp_plain1
timeout 90 python3 bench/serving.py $C --decode-chunk 8 --json "$OUT/mtp_plain8.json" 2>&1 | q mtp_plain8
timeout 90 python3 bench/serving.py $C --speculative --json "$OUT/mtp_spec.json" 2>&1 | q mtp_spec
timeout 90 python3 bench/serving.py $C --speculative --decode-chunk 8 --json "$OUT/mtp_spec8.json" 2>&1 | q mtp_spec8
timeout 150 python3 bench/server_load.py --config configs/bench_1gpu.yaml --clients 64 --slots 32 --tokens 128 \
  --json "$OUT/server_load.json" model.num_hidden_layers=6 model.num_nextn_predict_layers=0 \
  model.param_dtype=bfloat16 2>&1 | q server_load
