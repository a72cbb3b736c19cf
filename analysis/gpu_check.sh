#!/usr/bin/env bash
# GPU checks in one go (about 3-5 minutes): the CPU/GPU agreement tests, then the quick benchmark on CUDA.
#   bash analysis/gpu_check.sh [OUT_DIR]
set -euo pipefail
out="${1:-bench-cuda}"
python -m pytest -m gpu -q tests/test_gpu.py
evalab bench --quick --device cuda --out "$out"
