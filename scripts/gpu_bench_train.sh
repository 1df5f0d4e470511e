#!/usr/bin/env bash
# `palimpsa bench train` on one GPU, the 760M and 170M training-step comparison (about 6-8 minutes on one H200, compile included):
#   1. 760m, B=4 x T=4096, every model (Palimpsa, NotPalimpsa, Meta-Mamba2, our Gated DeltaNet, fla's when
#      importable), 2 warm-up + 5 timed steps and one profiled step each;
#   2. 170m, the same batch, the same models.
# fla's Hopper backward refusal is bypassed for timing (rows marked "timing only, numerics unchecked"); set
# FLA_BYPASS= to leave it on (the table then says "refused").  Models run one after another in one process,
# each freed before the next; peak memory is per model.
#
#   bash scripts/gpu_bench_train.sh "$OUT"        (writes $OUT/bench-760m/ and $OUT/bench-170m/)
# MODELS=palimpsa-g1,notpalimpsa,fla-gated-deltanet (say) limits the models; SIZES_170= skips the 170m run.
# CPU smoke test of this script: DEVICE=cpu SIZES_760=tiny SIZES_170=tiny BATCH=1 SEQ_LEN=64 STEPS=1 WARMUP=0 \
#   bash scripts/gpu_bench_train.sh /tmp/bench
set -euo pipefail
OUT=${1:?usage: gpu_bench_train.sh OUT_DIR}
PYTHON=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
BATCH=${BATCH:-4}
SEQ_LEN=${SEQ_LEN:-4096}
STEPS=${STEPS:-5}
WARMUP=${WARMUP:-2}
SIZES_760=${SIZES_760-760m}
SIZES_170=${SIZES_170-170m}
MODELS=${MODELS:-all}
FLA_BYPASS=${FLA_BYPASS---fla-bypass-check}
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)  # absolute: save_autotune below writes there from another directory
# fla's autotuning takes 33-80 s per kernel and shape: reuse the results of an earlier call when they travel
# with this one (carry .tritoncache), and hand this call's back in $OUT for the next
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/triton-cache}
mkdir -p "$TRITON_CACHE_DIR" && TRITON_CACHE_DIR=$(cd "$TRITON_CACHE_DIR" && pwd)
if [ -f .tritoncache/autotune_cache.tgz ]; then
    mkdir -p "$TRITON_CACHE_DIR" && tar xzf .tritoncache/autotune_cache.tgz -C "$TRITON_CACHE_DIR"
fi
save_autotune() {
    (cd "$TRITON_CACHE_DIR" && find . -name '*.autotune.json' | tar czf "$OUT/autotune_cache.tgz" -T -) || true
}
trap save_autotune EXIT
$PYTHON - <<'PY' | tee "$OUT/versions.txt"
import importlib, platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
for name in ("triton", "transformers", "fla"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as err:  # noqa: BLE001  (the record says why a package is missing)
        print(name, "not importable:", err)
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0))
PY
status=0
for run in "760:$SIZES_760" "170:$SIZES_170"; do
    name=${run%%:*}; sizes=${run#*:}
    [ -n "$sizes" ] || continue
    start=$(date +%s)
    $PYTHON -m palimpsa bench train --sizes "$sizes" --models "$MODELS" --batch "$BATCH" --seq-len "$SEQ_LEN" \
        --steps "$STEPS" --warmup "$WARMUP" --device "$DEVICE" $FLA_BYPASS --out "$OUT/bench-${name}m" \
        2> >(tee "$OUT/bench-${name}m.log" >&2) || status=$?
    echo "bench ${name}m: $(( $(date +%s) - start )) s (exit $status)"
done
exit $status
