#!/usr/bin/env bash
# Download, on a machine with network access, the wheels that benchmarks/device_check.py installs on a GPU
# machine that lacks them (that machine has no network): pytest, accelerate, diffusers and Pillow with their
# pure-Python dependencies, into .whl/ at the repository root (ignored by git; send it with `carry: [".whl"]`).
# Binary wheels (Pillow, psutil) are fetched for CPython 3.10-3.13 on x86_64 Linux. About 30 MB. (diffusers 0.42
# needs Python >= 3.11: on 3.10 the pipeline tests skip.)
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.whl
mkdir -p "$DEST"
PURE=(
  pytest==9.0.3 pluggy iniconfig pygments exceptiongroup tomli packaging
  accelerate==1.15.0
  diffusers==0.42.1 importlib_metadata zipp requests urllib3 idna certifi charset_normalizer filelock
)
pip download --quiet --no-deps --only-binary=:all: --dest "$DEST" --python-version 3.11 --implementation py \
  --platform any "${PURE[@]}"
for py in 3.10 3.11 3.12 3.13; do
  pip download --quiet --no-deps --only-binary=:all: --dest "$DEST" --python-version "$py" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    pillow psutil
done
ls "$DEST"
du -sh "$DEST"
