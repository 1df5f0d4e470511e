#!/usr/bin/env bash
# Create .venv and install palimpsa with its test extras.
# GPU machine (nvidia-smi works): PyTorch's default (CUDA) build.  CPU-only machine: a CPU build of PyTorch
# (from PyTorch's CPU index when it is reachable, else the pinned release from the default index).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! python -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    pip install -q torch
  elif command -v curl >/dev/null 2>&1 && curl -sfI -m 5 https://download.pytorch.org/whl/cpu/ >/dev/null 2>&1; then
    pip install -q torch --index-url https://download.pytorch.org/whl/cpu
  else
    pip install -q "torch==2.13.0"
  fi
fi
pip install -q -e ".[test]"
# Triton runs the GPU kernels (and, with TRITON_INTERPRET=1, their CPU tests).  Pin the version the kernels
# are checked with where it installs; its absence only skips the interpreter tests.
if [ "$(uname -s)" = "Linux" ] && ! python -c "import triton" >/dev/null 2>&1; then
  pip install -q "triton==3.6.0" || echo "triton could not be installed: its tests will be skipped"
fi
# NVRTC compiles the CUDA C++ kernels at run time.  PyTorch's CUDA builds ship it; on a machine without a GPU the
# tests still compile the kernels for sm_90 with it (no GPU needed), so install NVIDIA's wheel there.
if [ "$(uname -s)" = "Linux" ] && ! python -c "from palimpsa.ops.cuda.nvrtc import nvrtc_library as n; n()" \
    >/dev/null 2>&1; then
  pip install -q "nvidia-cuda-nvrtc-cu12>=12.4" || echo "NVRTC could not be installed: the CUDA compile tests will be skipped"
fi
python -c "import palimpsa, torch; print('palimpsa', palimpsa.__version__, '| torch', torch.__version__)"
