#!/usr/bin/env bash
# Set everything up, then lint (ruff, configured in pyproject.toml) and run the whole test suite.
# With no arguments, the Triton kernels' interpreter tests then run a second time under the newest Triton
# release (the venv keeps the pinned 3.6.0 that the GPU machine runs), so that a new Triton that breaks the
# kernels shows here.  PALIMPSA_TRITON_NEWEST=0 skips that pass; PALIMPSA_TRITON_NEWEST="triton==X.Y.Z"
# runs it under a given release instead of the newest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
python -m ruff check .
python -m pytest -q tests "$@"
if [ $# -eq 0 ] && [ "${PALIMPSA_TRITON_NEWEST:-triton}" != "0" ] && [ "$(uname -s)" = "Linux" ]; then
  target=.venv/triton-newest
  if pip install -q --disable-pip-version-check --upgrade --target "$target" "${PALIMPSA_TRITON_NEWEST:-triton}"; then
    PYTHONPATH="$PWD/$target${PYTHONPATH:+:$PYTHONPATH}" python -c "import triton; print('interpreter tests under triton', triton.__version__)"
    PYTHONPATH="$PWD/$target${PYTHONPATH:+:$PYTHONPATH}" python -m pytest -q tests/ops/test_triton_*interpret.py tests/ops/test_triton_*compile.py
  else
    echo "the newest triton could not be installed: its interpreter pass is skipped"
  fi
fi
