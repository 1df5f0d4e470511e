#!/bin/bash
# One H100 device call (<= 600 s): the benchmark table of scripts/gpu_ops_check.py with the GPU to itself,
# then the same script's correctness checks, one process per shape group in parallel (the float64
# reference is a per-token Python loop, so one process leaves the GPU mostly idle; run one after the
# other the checks alone took 386 s for commit ec363a0). Everything lands under $OUT:
#   bench.log, ops_h100.{md,json}          table (run with --skip-check)
#   gpu_ops_check.{log,json}                checks of all four shapes and the varlen batch, merged
# Run from the repository root with the fla wheels in .whl/:  OUT=/some/dir bash scripts/bench/h100_run.sh
set -u
: "${OUT:?set OUT}"
T0=$SECONDS
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1
LOG=$OUT/bench.log
{
    nvidia-smi --query-gpu=name,driver_version,compute_mode --format=csv
    echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo 'no git HEAD here')"
    echo "== benchmark: python3 scripts/gpu_ops_check.py --skip-check --out \$OUT/ops_h100.md ($(date -u +%T))"
} 2>&1 | tee "$LOG"
set -o pipefail
timeout 420 python3 scripts/gpu_ops_check.py --skip-check --out "$OUT/ops_h100.md" --log-dir /tmp/benchlog 2>&1 | tee -a "$LOG"
echo "bench rc=$? after $((SECONDS - T0)) s" | tee -a "$LOG"

left=$((588 - (SECONDS - T0)))
echo "== checks, $left s left" | tee -a "$LOG"
mkdir -p /tmp/chk
check() {  # name, then gpu_ops_check.py arguments; its trailing table (170M-like, no fla) is not reported
    local name=$1
    shift
    timeout "$left" python3 scripts/gpu_ops_check.py "$@" --shapes 170M-like --no-fla \
        --out "/tmp/chk/$name/ops.md" --log-dir "/tmp/chk/$name" >"/tmp/chk/$name.log" 2>&1
    echo "process $name rc=$? after $((SECONDS - T0)) s" >>"/tmp/chk/$name.log"
}
if nvidia-smi --query-gpu=compute_mode --format=csv,noheader | grep -q '^Default'; then
    groups=(a b c d)
    check a --check-shapes 760M-like --no-varlen &
    check b --check-shapes d128 --no-varlen &
    check c --check-shapes 170M-like &  # then the varlen batch
    check d --check-shapes d64 --no-varlen &
    wait
else  # one process may hold the GPU: all checks in one
    groups=(all)
    check all --check-shapes all
fi
for name in "${groups[@]}"; do
    echo "== process $name"
    cat "/tmp/chk/$name.log"
done >"$OUT/gpu_ops_check.log"
python3 - "${groups[@]}" <<'EOF'
import json, os, sys
merged = {"environment": None, "check": {}, "processes": {}}
for name in sys.argv[1:]:
    path = f"/tmp/chk/{name}/gpu_ops_check.json"
    if not os.path.exists(path):
        merged["processes"][name] = "no report (stopped before its checks ended)"
        continue
    report = json.load(open(path))
    merged["environment"] = merged["environment"] or report.get("environment")
    check = report.get("check", {})
    merged["processes"][name] = {"all_ok": check.get("all_ok"), "cases": [k for k in check if k != "all_ok"]}
    merged["check"].update({k: v for k, v in check.items() if k != "all_ok"})
merged["check"]["all_ok"] = all(isinstance(p, dict) and p["all_ok"] for p in merged["processes"].values())
json.dump(merged, open(os.path.join(os.environ["OUT"], "gpu_ops_check.json"), "w"), indent=1)
print("checks all_ok:", merged["check"]["all_ok"], {k: (v["all_ok"] if isinstance(v, dict) else v) for k, v in merged["processes"].items()})
EOF
grep -h -E "worst|failing|=>|rc=" "$OUT/gpu_ops_check.log"
echo "total $((SECONDS - T0)) s"
