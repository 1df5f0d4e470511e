#!/bin/bash
# One device call (<= 600 s): check the kernels against the float64 reference, then time them beside fla.
#   1. scripts/gpu_check_all.sh (PER_CHANNEL=0 by default here: the grouped / GLA-shaped checks), and at the same
#      time fla's autotuning for the timed shapes, one process per shape (`palimpsa bench ops` on that shape alone;
#      its timings are thrown away: the checks share the GPU then, lightly: their float64 reference is a per-token
#      loop that leaves the GPU mostly idle);
#   2. then, on a quiet GPU with every kernel compiled and autotuned, `palimpsa bench ops` on all those shapes:
#      $OUT/ops.md and $OUT/ops.json;
#   3. PROFILE=1: scripts/gpu_profile_ops.py, each variant's kernels ($OUT/profile_ops.md);
#   4. fla's autotune results into $OUT/autotune_cache.tgz (carry .tritoncache with the next call to reuse them).
#   OUT=/some/dir bash scripts/gpu_check_then_ops.sh      (from the repository root; fla on PYTHONPATH)
# Overrides: SHAPES (760M-like,170M-like), FLA_KERNELS (simple_gla), PER_CHANNEL (0), WARM_LIMIT (330 s),
# BENCH_LIMIT (what is left of 575 s),
# LIMIT (per check process, 300 s).
set -u
: "${OUT:?set OUT}"
T0=$SECONDS
SHAPES=${SHAPES:-760M-like,170M-like}
FLA_KERNELS=${FLA_KERNELS:-simple_gla}
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/triton-cache}
mkdir -p "$TRITON_CACHE_DIR" /tmp/warm
[ -f .tritoncache/autotune_cache.tgz ] && tar xzf .tritoncache/autotune_cache.tgz -C "$TRITON_CACHE_DIR"
for shape in ${SHAPES//,/ }; do
    timeout "${WARM_LIMIT:-330}" python3 -m palimpsa bench ops --shapes "$shape" --fla-kernels "$FLA_KERNELS" \
        --fla-bypass-check --no-decode >"/tmp/warm/$shape.log" 2>&1 &
done
LIMIT=${LIMIT:-300} PER_CHANNEL=${PER_CHANNEL:-0} bash scripts/gpu_check_all.sh
wait
echo "checks and warm-up done after $((SECONDS - T0)) s" | tee -a "$OUT/check_summary.txt"
tail -n 3 /tmp/warm/*.log >>"$OUT/check_summary.txt" 2>&1
BENCH_LIMIT=${BENCH_LIMIT:-$((575 - (SECONDS - T0)))}  # what is left of a 600 s call
timeout "$BENCH_LIMIT" python3 -m palimpsa bench ops --shapes "$SHAPES" --fla-kernels "$FLA_KERNELS" \
    --fla-bypass-check --out "$OUT/ops.md" 2>&1 | tail -n 40
echo "bench rc=${PIPESTATUS[0]} after $((SECONDS - T0)) s"
if [ "${PROFILE:-0}" = 1 ]; then
    timeout $((590 - (SECONDS - T0))) python3 scripts/gpu_profile_ops.py --shapes "$SHAPES" --fla-bypass-check \
        --out "$OUT/profile_ops.md" >/dev/null 2>"$OUT/profile_ops.err"
    echo "profile rc=$? after $((SECONDS - T0)) s"
fi
(cd "$TRITON_CACHE_DIR" && find . -name '*.autotune.json' | tar czf "$OUT/autotune_cache.tgz" -T -)
