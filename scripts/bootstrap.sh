#!/usr/bin/env bash
# Create (or update) the project's virtual environment and install hpc-gan into it, editable.
# torch==2.13.0 is installed first only where the interpreter has no torch of its own: a GPU machine keeps its
# CUDA build (the venv then sees the interpreter's packages). Usage: scripts/bootstrap.sh [VENV] ; EXTRAS=dev,triton,deepspeed,mpi,dali,plots (default)
set -euo pipefail
VENV=${1:-.venv}
PYTHON=${PYTHON:-python3}
EXTRAS=${EXTRAS:-dev,triton,deepspeed,mpi,dali,plots}
if [ ! -x "$VENV/bin/python" ]; then
  if "$PYTHON" -c "import torch" 2>/dev/null; then
    echo "bootstrap: $PYTHON already has torch $("$PYTHON" -c 'import torch; print(torch.__version__)'); reusing it"
    "$PYTHON" -m venv --system-site-packages "$VENV"
  else
    "$PYTHON" -m venv "$VENV"
  fi
fi
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "bootstrap: installing torch==2.13.0 (CPU build)"
  "$VENV/bin/python" -m pip install -q torch==2.13.0
fi
DS_BUILD_OPS=0 "$VENV/bin/python" -m pip install -q -e ".[$EXTRAS]"  # DeepSpeed: no CUDA ops built at install
echo "bootstrap: $VENV ready (torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)'))"
