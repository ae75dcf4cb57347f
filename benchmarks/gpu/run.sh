#!/usr/bin/env bash
# Run ON THE GPU HOST from the repository root (no network): installs the carried wheels
# (benchmarks/gpu/prepare_wheels.sh made them) and runs the GPU check; the JSON lands in
# $OUT (or ./gpu_check_out). Extra arguments go to gpu_check.py (e.g. --layers 13).
# Device tool: run(command="bash benchmarks/gpu/run.sh", carry=[".whl"], timeout_s=600)
set -uo pipefail
OUT_DIR="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT_DIR"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="$PWD:/tmp/site" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
df -h /tmp | tail -1
# 9.5 minutes of the 10-minute command limit; the JSON is rewritten after every step.
timeout 570 python3 -m benchmarks.gpu.gpu_check --out "$OUT_DIR/gpu_check.json" "$@" 2>&1 \
  | tee "$OUT_DIR/gpu_check.log"
