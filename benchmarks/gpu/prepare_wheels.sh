#!/usr/bin/env bash
# Run HERE (a machine with network), in the repository root: downloads the wheels the GPU
# host lacks (its image has torch, accelerate, safetensors, tokenizers, huggingface-hub,
# numpy, scipy, pillow, pyyaml, typer, rich, requests; Python 3.12, x86-64) into .whl/,
# which git ignores and the device tool carries (carry: [".whl"]). ~35 MB.
set -euo pipefail
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> "$(git rev-parse --git-path info/exclude)"
mkdir -p .whl
PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLAT[@]}" -d .whl \
  transformers==5.23.0 nvidia-modelopt==0.47.0 pydantic==2.13.4 pydantic-core==2.46.4 \
  annotated-types==0.7.0 typing-inspection==0.4.2 omegaconf==2.4.0 antlr4-python3-runtime==4.13.2 \
  pulp==3.3.2 soundfile==0.14.0 cffi==2.0.0 pycparser==3.0
du -sh .whl
