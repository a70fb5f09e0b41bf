# Sourced by the bench/gpu_*.sh device-call scripts (run from the repo root): $OUT for results, unbuffered
# Python, and the carried wheels (.whl, from ../shared/gpu/wheels.sh) installed and put on PYTHONPATH.
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || exit 1
fi
