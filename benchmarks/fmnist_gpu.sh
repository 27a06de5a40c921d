#!/usr/bin/env bash
# Fashion-MNIST at GPU scale, the whole recipe (configs/fashion_mnist_gpu.py): public
# pretraining and DP fine-tuning (epsilon 10) in one training command, then 10,000 samples and
# their evaluation (downstream CNN on the real test set, label consistency).
#
#   bash benchmarks/fmnist_gpu.sh            # one GPU; sized for < 10 minutes on an H200
#   bash benchmarks/fmnist_gpu.sh --smoke    # the same chain, tiny (`:smoke`), on the CPU
#
# Environment:
#   FMNIST_DIR  folder with the four Fashion-MNIST IDX .gz files (default: the loader's search,
#               e.g. Debian's /usr/share/datasets/fashion-mnist); nothing is downloaded.
#   WORKDIR     run folder (default runs/fmnist_gpu, or runs/fmnist_gpu_smoke with --smoke);
#               rerunning resumes every step.
#   OUT         if set, the reports, grids and timings are copied there.
#   PYTHON      interpreter (default python3). Needs jax, flax, optax, orbax, ml_collections,
#               absl, dp_accounting, numpy, pillow; no TensorFlow (tensorboard is optional),
#               no scikit-learn (the label classifier is the CNN). Wheels of
#               missing pure-python packages may be carried in .whl/ at the repository root:
#               they are installed with --no-index into a temporary folder.
# Prints the wall time of each command and writes them to $WORKDIR/timings.txt.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
variant=""
if [[ "${1:-}" == "--smoke" ]]; then
  variant=":smoke"
  export JAX_PLATFORMS=cpu
  # The smoke run checks the plumbing, not speed: XLA's cheap LLVM pipeline compiles faster.
  export XLA_FLAGS="${XLA_FLAGS:+${XLA_FLAGS} }--xla_backend_optimization_level=0"
elif [[ $# -gt 0 ]]; then
  echo "usage: $0 [--smoke]" >&2
  exit 2
fi
WORKDIR="${WORKDIR:-runs/fmnist_gpu${variant:+_smoke}}"
export PYTHONPATH="${REPO_ROOT}${PYTHONPATH:+:${PYTHONPATH}}"
export PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"

shopt -s nullglob
wheels=("${REPO_ROOT}"/.whl/*.whl)
shopt -u nullglob
if (( ${#wheels[@]} )); then
  site="$(mktemp -d)"
  "${PYTHON}" -m pip install --quiet --no-index --no-deps --target "${site}" "${wheels[@]}"
  export PYTHONPATH="${PYTHONPATH}:${site}"
fi

args=(--config="${REPO_ROOT}/configs/fashion_mnist_gpu.py${variant}" --workdir="${WORKDIR}")
if [[ -n "${FMNIST_DIR:-}" ]]; then
  args+=(--config.data.data_dir="${FMNIST_DIR}")
fi
mkdir -p "${WORKDIR}"
for mode in train sample evaluate; do
  start=$(date +%s)
  "${PYTHON}" -m jaxdpdm.main "${args[@]}" --mode="${mode}"
  seconds=$(( $(date +%s) - start ))
  echo "fmnist_gpu: ${mode} took ${seconds} s" | tee -a "${WORKDIR}/timings.txt"
done

if [[ -n "${OUT:-}" ]]; then
  mkdir -p "${OUT}"
  for f in privacy_report.json privacy_report.txt grid_final.png samples_grid.png \
           timings.txt eval/report.json eval/summary.txt pretrain/grid_final.png; do
    if [[ -f "${WORKDIR}/${f}" ]]; then cp "${WORKDIR}/${f}" "${OUT}/${f//\//_}"; fi
  done
fi
