#!/usr/bin/env bash
# One prepared GPU check of jaxdpdm (see benchmarks/gpu_check.py for what it checks):
#
#   bash benchmarks/gpu_check.sh            # full run: one GPU, < 8 minutes on an H200
#   bash benchmarks/gpu_check.sh --smoke    # tiny preset on CPU, < 60 s on a quiet machine
#   bash benchmarks/gpu_check.sh --conv     # only the two conv implementations, K = 4 and 32
#                                           # (89M UNet; K = 4 part ~7 min, --budget-s=900 for all)
#
# Needs python3 with jax (CUDA), flax, optax, numpy, scipy, etils; no TensorFlow and no network.
# jaxdpdm is used from this checkout (PYTHONPATH), not installed. dp_accounting (only for the
# accounting section) is taken from the environment, else from wheels carried in .whl/ at the
# repository root, installed with --no-index into a temporary folder: nothing is downloaded.
# Results: a table on stdout and $OUT/gpu_check.json when OUT is set. Exit status: the check's.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
export PYTHONPATH="${REPO_ROOT}${PYTHONPATH:+:${PYTHONPATH}}"
export PYTHONUNBUFFERED=1
# Per-example gradients of the 89M-parameter UNet want most of the GPU; JAX takes 75% by default.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"

if ! "${PYTHON}" -c "import dp_accounting" >/dev/null 2>&1; then
  shopt -s nullglob
  wheels=("${REPO_ROOT}"/.whl/*.whl)
  shopt -u nullglob
  if (( ${#wheels[@]} )); then
    site="$(mktemp -d)"
    # --no-deps: the carried wheels are the whole set; anything missing shows up as a failed
    # import below, and the check then skips its accounting section instead of failing.
    if "${PYTHON}" -m pip install --quiet --no-index --no-deps --target "${site}" "${wheels[@]}"; then
      export PYTHONPATH="${PYTHONPATH}:${site}"
    fi
    "${PYTHON}" -c "import dp_accounting" >/dev/null 2>&1 \
      || echo "gpu_check: dp_accounting unusable from .whl/; the accounting section is skipped" >&2
  else
    echo "gpu_check: dp_accounting not installed and no .whl/ wheels; accounting is skipped" >&2
  fi
fi

exec "${PYTHON}" "${REPO_ROOT}/benchmarks/gpu_check.py" "$@"
