#!/usr/bin/env bash
# One-command set-up: installs PyTorch (the CPU build on a machine without CUDA) and then
# mor-platform with its dev tools into the active Python environment.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_VERSION=${MOR_TORCH_VERSION:-2.13.0}

if "$PY" -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '$TORCH_VERSION' else 1)" 2>/dev/null; then
  echo "torch $TORCH_VERSION already installed"
elif command -v nvidia-smi >/dev/null 2>&1; then
  # A CUDA machine: PyPI's default Linux wheel is the CUDA build.
  "$PY" -m pip install "torch==$TORCH_VERSION"
else
  # No GPU: prefer a CPU wheel already on disk (pip's find-links), else PyTorch's CPU index.
  "$PY" -m pip install --no-index "torch==$TORCH_VERSION" 2>/dev/null \
    || "$PY" -m pip install "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu
fi
"$PY" -m pip install -e ".[dev]"
