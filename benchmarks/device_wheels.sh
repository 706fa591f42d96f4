#!/usr/bin/env bash
# What benchmarks/gpu_check.py needs on a lent GPU machine and the machine lacks, gathered here before the
# run (nothing can be fetched there; see the device tool's README and KINDS.md): its image runs Python 3.12
# with torch, torchvision, accelerate, transformers, huggingface_hub, numpy, scipy, scikit-learn, pyarrow,
# pyyaml, safetensors, tqdm, pillow, matplotlib, attrs, einops, msgpack, ninja and psutil. Missing:
# diffusers (the nets), lpips, jsonschema and its three dependencies, importlib_metadata (for diffusers),
# DeepSpeed with hjson and pydantic, and faiss. A faiss with GPU support does
# not fit the 64 MiB a run may carry (faiss-cuda's CUDA 13 wheel is 106 MB; faiss-gpu-cu12 needs CUDA 12
# libraries the image lacks), so faiss-cpu travels and the search section says it ran on the CPU.
# Writes .whl/ (wheels) and benchmarks/third_party/edm (NVlabs/edm's training code, for edm_reference),
# both git-ignored; prints their size against the 64 MiB limit.
#
#   bash benchmarks/device_wheels.sh [EDM_SOURCE]   # EDM_SOURCE: a git clone or mirror of NVlabs/edm
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir -p .whl
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl \
  "diffusers>=0.30" "lpips==0.1.4" "jsonschema>=4.20" jsonschema-specifications referencing rpds-py \
  importlib_metadata "faiss-cpu>=1.9" hjson
# pydantic with the pydantic-core, typing-extensions and typing-inspection it names (for DeepSpeed)
python3 -m pip download --quiet --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "pydantic>=2"
# DeepSpeed (the zero2 section) is published as source only: built here into a pure-Python wheel (its
# CUDA ops compile on first use, with the machine's nvcc and ninja); its setup.py imports torch.
"${PYTHON:-.venv/bin/python}" -m pip wheel --quiet --no-deps --no-build-isolation -w .whl "deepspeed>=0.15"
edm_source=${1:-https://github.com/NVlabs/edm}
if [ ! -f benchmarks/third_party/edm/training/networks.py ]; then
  rm -rf benchmarks/third_party/edm && mkdir -p benchmarks/third_party
  tmp=$(mktemp -d)
  git clone --quiet "$edm_source" "$tmp/edm"
  # the code only: its docs/ (2 MB of figures) would count against the carry limit
  mkdir -p benchmarks/third_party/edm
  git -C "$tmp/edm" archive HEAD training torch_utils dnnlib LICENSE.txt | tar -x -C benchmarks/third_party/edm
  git -C "$tmp/edm" rev-parse HEAD > benchmarks/third_party/edm/COMMIT
  rm -rf "$tmp"
fi
total=$(( $(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1) + $(du -sb .whl benchmarks/third_party/edm | awk '{s += $1} END {print s}') ))
echo "working tree + .whl + edm: $((total / 1024 / 1024)) MiB of 64"
[ "$total" -lt $((64 * 1024 * 1024)) ]
