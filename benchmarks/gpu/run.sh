#!/usr/bin/env bash
# Run ON THE GPU HOST from the repository root (no network): installs the carried wheels
# (benchmarks/gpu/prepare_wheels.sh made them) and runs the GPU check; the JSON and the log
# land in $OUT (or ./gpu_check_out). Extra arguments go to gpu_check.py (e.g. --layers 6,
# or --steps nvfp4_compare,quantize/nvfp4_omni for a rerun of some steps).
# The steps' budgets add up to at most 6 minutes (printed first); the check stops starting
# steps at 540 s and the command is cut at 570 s, inside the 10-minute limit, so a rerun
# fits the 15 minutes of device time on the still-warm machine.
# Device tool: run(command="bash benchmarks/gpu/run.sh", carry=[".whl"], timeout_s=600)
set -uo pipefail
OUT_DIR="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT_DIR"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || { echo "gpu_check: installing the carried wheels failed (run prepare_wheels.sh here)"; exit 1; }
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 MAX_JOBS="$(nproc)"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
df -h /tmp | tail -1  # the pre-flight acts on it (lowers --layers); printed for the log
timeout 570 python3 -m benchmarks.gpu.gpu_check --out "$OUT_DIR/gpu_check.json" --deadline-s 540 "$@" 2>&1 \
  | tee "$OUT_DIR/gpu_check.log"
