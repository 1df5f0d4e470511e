#!/bin/bash
# One device call (<= 600 s): every Triton path against the float64 reference on the GPU, in parallel processes
# (the reference is a per-token Python loop that leaves the GPU mostly idle), before any timing counts.
#   per channel (scripts/gpu_ops_check.py): 760M-like | d128 | 170M-like + varlen | d64
#   grouped / NotPalimpsa (scripts/gpu_grouped_check.py): 760M-like G = 1 | 760M-like G = 4, None |
#   170M-like + varlen | d64 + d128 (each case also as a training step runs it)
#   then the GLA kernels alone at narrow value widths (scripts/gpu_gla_blocks_check.py)
# A summary of PASS/FAIL lines lands in $OUT/check_summary.txt, the per-process logs in $OUT/check_logs.tgz.
#   OUT=/some/dir bash scripts/gpu_check_all.sh         (from the repository root)
# PER_CHANNEL=0 skips the per-channel checks (when only the grouped / GLA-shaped kernels changed); QUICK=1 checks
# the grouped path at G = 1 (760M-like, 170M-like + varlen, d64) and G = 4 (760M-like) only, without the GLA width
# check (when only the importance scan changed).
set -u
: "${OUT:?set OUT}"
T0=$SECONDS
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
LIMIT=${LIMIT:-400}  # per parallel process; the width check after them takes up to 150 s more
{
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
    echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo 'no git HEAD here')"
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} 2>&1 | tee "$OUT/check_summary.txt"

per_channel() {  # name, then gpu_ops_check.py arguments (its trailing 170M-like table without fla is not used)
    local name=$1
    shift
    timeout "$LIMIT" python3 scripts/gpu_ops_check.py "$@" --shapes 170M-like --no-fla \
        --out "/tmp/chk/$name/ops.md" --log-dir "/tmp/chk/$name" >"$OUT/check_$name.log" 2>&1
    echo "process $name rc=$? after $((SECONDS - T0)) s" >>"$OUT/check_$name.log"
}
grouped() {  # name, then gpu_grouped_check.py arguments
    local name=$1
    shift
    timeout "$LIMIT" python3 scripts/gpu_grouped_check.py "$@" >"$OUT/check_$name.log" 2>&1
    echo "process $name rc=$? after $((SECONDS - T0)) s" >>"$OUT/check_$name.log"
}
mkdir -p /tmp/chk
if [ "${PER_CHANNEL:-1}" != 0 ]; then
    per_channel pc760 --check-shapes 760M-like --no-varlen &
    per_channel pc128 --check-shapes d128 --no-varlen &
    per_channel pc170 --check-shapes 170M-like &
    per_channel pc64 --check-shapes d64 --no-varlen &
fi
if [ "${QUICK:-0}" = 1 ]; then
    grouped g760a --shapes 760M-like --groups 1 --no-varlen &
    grouped g760b --shapes 760M-like --groups 4 --no-varlen &
    grouped g170 --shapes 170M-like --groups 1 &
    grouped gsmall --shapes d64 --groups 1 --no-varlen &
    wait
else
    grouped g760a --shapes 760M-like --groups 1 --no-varlen &
    grouped g760b --shapes 760M-like --groups 4,none --no-varlen &
    grouped g170 --shapes 170M-like &
    grouped gsmall --shapes d64,d128 --no-varlen &
    wait
    # the GLA kernels alone at narrow value widths and shared keys (one subprocess per case, 12 at a time)
    timeout 150 python3 scripts/gpu_gla_blocks_check.py >"$OUT/check_gla_blocks.log" 2>&1
    echo "process gla_blocks rc=$? after $((SECONDS - T0)) s" >>"$OUT/check_gla_blocks.log"
fi
grep -h -E "PASS|FAIL|CRASH| ok$|ALL|SOME|rc=" "$OUT"/check_*.log | cut -c1-200 | tee -a "$OUT/check_summary.txt"
echo "total $((SECONDS - T0)) s" | tee -a "$OUT/check_summary.txt"
# at most 8 files come back from a device call: the per-process logs travel as one archive
(cd "$OUT" && tar czf check_logs.tgz check_*.log && rm -f check_*.log)
