#!/usr/bin/env bash
# The GPU check pack, one call of at most 8 minutes on one H100 (docs/gpu-check.md):
#   scripts/gpu-check.sh [--out DIR] [--smoke] [--stages env tests ...]
# Runs from the repository root with this checkout's .venv where there is one, else the machine's python3 (a GPU
# node's own PyTorch + Triton). Writes DIR/report.json and DIR/report.md after every stage. --smoke (also chosen
# where no GPU is visible) runs every stage at toy sizes on the CPU, the kernels in Triton's interpreter.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" -m hpc_gan.gpucheck "$@"
