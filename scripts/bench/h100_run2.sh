#!/bin/bash
# Second H100 call (<= 600 s), after h100_run.sh's table did not finish in 420 s: our kernels alone at the
# four shapes (and the decoding step), then fla's kernels shape by shape, saved after each kernel.
#   bench2.log, ops_h100_ours.{md,json}, fla_rows.json   under $OUT
set -u
: "${OUT:?set OUT}"
T0=$SECONDS
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1 TRITON_PRINT_AUTOTUNING=1
LOG=$OUT/bench2.log
{ nvidia-smi --query-gpu=name,driver_version,compute_mode --format=csv
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo 'no git HEAD here')"; } 2>&1 | tee "$LOG"
set -o pipefail
echo "== ours: python3 scripts/gpu_ops_check.py --skip-check --no-fla --out \$OUT/ops_h100_ours.md" | tee -a "$LOG"
timeout 200 python3 scripts/gpu_ops_check.py --skip-check --no-fla --out "$OUT/ops_h100_ours.md" --log-dir /tmp/bl 2>&1 | tee -a "$LOG"
echo "ours rc=$? after $((SECONDS - T0)) s" | tee -a "$LOG"
left=$((592 - (SECONDS - T0)))
echo "== fla: python3 scripts/bench/fla_rows.py \$OUT/fla_rows.json 760M-like 170M-like d64 d128 ($left s left)" | tee -a "$LOG"
timeout "$left" python3 scripts/bench/fla_rows.py "$OUT/fla_rows.json" 760M-like 170M-like d64 d128 2>&1 | tee -a "$LOG"
echo "fla rc=$? after $((SECONDS - T0)) s" | tee -a "$LOG"
