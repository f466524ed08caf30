#!/usr/bin/env bash
# Wheels the accelerator image lacks (it has jax[cuda], flax, optax, orbax, transformers,
# sentence-transformers, peft, torch, but no registry access), downloaded into an ignored folder
# that travels with the working tree (the device tool's `carry`, 64 MiB in all):
#
#   bash benchmarks/device_wheels.sh [python version, default 312: the device image's]   # here
#   pip install --no-index --no-deps device_wheels/*.whl             # there, before the suite
#   python benchmarks/gpu_suite.py
#
# --no-deps: only these packages (their own dependencies are in the image); the import check
# on the device (`python -c "import reasonembed_jax.train"`) names anything still missing.
set -euo pipefail
PY="${1:-312}"
OUT_DIR="$(cd "$(dirname "$0")/.." && pwd)/device_wheels"
mkdir -p "$OUT_DIR"
python3 -m pip download --no-deps --only-binary=:all: --python-version "$PY" \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux_2_28_x86_64 --platform any -d "$OUT_DIR" \
  grain array-record ml-collections tensorboardX bm25s PyStemmer pytrec-eval-terrier \
  absl-py etils simplejson gguf
du -sh "$OUT_DIR"
