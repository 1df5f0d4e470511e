#!/usr/bin/env bash
# Set everything up, then lint (ruff, configured in pyproject.toml) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
python -m ruff check .
python -m pytest -q tests "$@"
