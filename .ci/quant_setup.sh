#!/usr/bin/env bash
# What the quantization tests (tests/test_quantization.py) need on a fresh CPU machine: the `quantization` extra,
# torchao. torchao declares no runtime dependencies, so installing it never replaces the torch already installed;
# 0.18.0 is the release tested with torch 2.13.0 (CPU): int8 weight-only runs on the CPU, int4 weight-only needs CUDA.
# Run from anywhere, after torch and the package are installed. Prints the version it ends with.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"

"$PYTHON" -m pip install --quiet -e ".[quantization]"
"$PYTHON" -c 'import torch, torchao; from torchao.quantization import Int8WeightOnlyConfig; print("quantization setup: torchao", torchao.__version__, "torch", torch.__version__)' 2>&1 | tail -n 1
