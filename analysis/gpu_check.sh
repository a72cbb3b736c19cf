#!/usr/bin/env bash
# GPU checks in one go (about 3-5 minutes): the CPU/GPU agreement tests, then the quick benchmark on CUDA.
#   bash analysis/gpu_check.sh [OUT_DIR]   (default: evalab bench's own, a new folder under ~/.cache/evalab/bench)
# Runs from a checkout without installing evalab (PYTHON defaults to python3).
set -euo pipefail
if [ $# -gt 0 ]; then set -- --out "$1"; fi
py="${PYTHON:-python3}"
export PYTHONPATH="$(cd "$(dirname "$0")/.." && pwd)${PYTHONPATH:+:$PYTHONPATH}"
"$py" -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py
"$py" -m evalab bench --quick --device cuda "$@"
