#!/usr/bin/env bash
# Run HERE (CPU, network to PyPI), in the repository root: the GPU check's CPU rehearsal in
# a virtual environment shaped like the GPU image where that can be had on a CPU host:
# the image's huggingface-hub, tokenizers, accelerate and safetensors (KINDS.md's pip list),
# the carried transformers and modelopt (constraints.txt), and without PyAV, fastapi,
# starlette and uvicorn, which the image lacks and prepare_wheels.sh does not carry.
# Not Python 3.12 with torch 2.11: PyPI has only the CUDA build of that torch for Linux
# (GBs with its nvidia-* libraries), so this uses the host's Python and the pinned CPU torch.
# CI runs the same script in its own environment (tests/test_gpu_check_script.py).
set -euo pipefail
VENV="${VENV:-/tmp/omniquant-gpu-rehearsal}"
python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q -c constraints.txt -e ".[dev]"
"$VENV/bin/python" -m pip install -q --no-deps --force-reinstall \
  huggingface-hub==1.33.0 tokenizers==0.23.2 accelerate==1.15.0 safetensors==0.8.0
"$VENV/bin/python" -m pip uninstall -q -y av fastapi starlette uvicorn
OMP_NUM_THREADS=1 "$VENV/bin/python" -m benchmarks.gpu.gpu_check --device cpu --scale tiny --samples 1 \
  --out "${OUT:-/tmp/omniquant-gpu-rehearsal-out}/rehearsal.json" --work /tmp/omniquant-gpu-rehearsal-work "$@"
