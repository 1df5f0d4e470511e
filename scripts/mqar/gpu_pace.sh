#!/usr/bin/env bash
# Why MQAR steps are slow on a GPU: one device command on a machine of two GPUs (or one: GPU 1 is then skipped).
#
#   OUT=$OUT bash scripts/mqar/gpu_pace.sh        # from the repository root
#
# GPU 0: `python -m palimpsa.mqar.pace` at the paper's state (K=16, V=32) and at a quarter of it (K=8, V=16),
# every model eager and compiled, one process at a time on GPU 0 (GPU 1's job runs beside it and shares the CPUs),
# with the kernels that take the most device time; then
# four processes of palimpsa_g1 at once on the same GPU (what time-slicing costs a sweep that runs several).
# GPU 1 (when there is one): the Gluon sweep variants of the per-channel op, checked against float64 and then
# timed with their peak memory (scripts/gpu_gluon_fwd_check.py).
# Output in $OUT: pace_full.md, pace_quarter.md, pace_contend4.md, pace.log, gluon_variants.md and .log.
set -u
export PYTHONPATH=${PYTHONPATH:-.}
OUT=${OUT:?set OUT to the folder that comes back}
mkdir -p "$OUT"
GLUON=
if [ "$(nvidia-smi -L 2> /dev/null | wc -l)" -ge 2 ]; then
    CUDA_VISIBLE_DEVICES=1 timeout 420 python scripts/gpu_gluon_fwd_check.py --shapes 760M-like,170M-like \
        --check-shapes 760M-like,170M-like --variants gluon-8,gluon-16-w2,gluon-8-w2,gluon-8-w4 \
        --out "$OUT/gluon_variants.md" > "$OUT/gluon_variants.log" 2>&1 &
    GLUON=$!
fi
export CUDA_VISIBLE_DEVICES=0
timeout 200 python -m palimpsa.mqar.pace --compile --out "$OUT/pace_full.md" > /dev/null 2> "$OUT/pace.log"
timeout 120 python -m palimpsa.mqar.pace --compile --head-k-dim 8 --head-v-dim 16 --out "$OUT/pace_quarter.md" \
    > /dev/null 2>> "$OUT/pace.log"
SCRATCH=$(mktemp -d)
PIDS=()
for i in 0 1 2 3; do
    timeout 120 python -m palimpsa.mqar.pace --models palimpsa_g1 --steps 60 --top 0 --out "$SCRATCH/contend_$i.md" \
        > /dev/null 2>> "$OUT/pace.log" &
    PIDS+=($!)
done
wait "${PIDS[@]}"
{ echo "# palimpsa_g1 (K=16, V=32), four processes at once on one GPU"; echo
  for i in 0 1 2 3; do echo "process $i: $(grep '^| palimpsa_g1' "$SCRATCH/contend_$i.md")"; done; } > "$OUT/pace_contend4.md"
rm -rf "$SCRATCH"
[ -n "$GLUON" ] && wait "$GLUON"
cat "$OUT/pace_full.md" "$OUT/pace_quarter.md" "$OUT/pace_contend4.md"
[ -n "$GLUON" ] && tail -n 20 "$OUT/gluon_variants.log"
tail -n 5 "$OUT/pace.log"
