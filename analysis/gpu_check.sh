#!/usr/bin/env bash
# GPU checks in one go (about 5-8 minutes): every test marked gpu, then the quick benchmark on CUDA.
#   bash analysis/gpu_check.sh [OUT_DIR]   (default: evalab bench's own, a new folder under ~/.cache/evalab/bench)
# Runs from a checkout without installing evalab (PYTHON defaults to python3).
# The gpu tests cover every estimator in the registry (defaults, shared_noise=False where it exists, and the
# variants listed in tests/test_gpu.py): forward agreement with the CPU, autograd gradients, the Monte-Carlo
# engine with noise drawn on the device (same seed, same numbers), the noise budget at 72 heads, gradient_gap
# and model_gap (all-MiniLM-L6-v2 on CUDA, skipped without the model packages); tests marked gpu elsewhere
# (e.g. fitting learned maps) join automatically.
set -euo pipefail
if [ $# -gt 0 ]; then set -- --out "$1"; fi
py="${PYTHON:-python3}"
root="$(cd "$(dirname "$0")/.." && pwd)"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
cd "$root"
"$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: nothing to check')"
"$py" -m pytest -m gpu -q -p no:cacheprovider -rs tests
"$py" -m evalab bench --quick --device cuda "$@"
