#!/usr/bin/env bash
# Set everything up, then run the main job on its embedded default.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
palimpsa mqar "$@"
