#!/usr/bin/env bash
# The exact GPU session behind results/mqar/gpu/ (one call of about 3 minutes; runs spread over every GPU):
#   PYTHONPATH=. OUT=<folder> bash scripts/mqar/gpu_session.sh
# 1. checks that the Palimpsa op's Triton backend agrees with the PyTorch one inside the MQAR models
#    (falls back to --op-backend torch if not);
# 2. the paper's setting (L=512, 128 pairs, d_model 128): five models x lr {2.15e-3, 4.64e-3} x seeds {0, 1},
#    40 steps each: far too few to leave chance level; it records the pipeline on the paper's setting and the
#    seconds per step that a full run would take;
# 3. a capacity-limited setting (L=256, 64 pairs, d_model 64, i.e. a quarter of the paper's state), all
#    22 runs in parallel, each fitted into 80 s of the shared GPU (--time-limit-s).
# Results: $OUT/results_paper.jsonl, $OUT/results_capacity.jsonl (+ unfinished_*.jsonl), $OUT/session.log.
set -u
export PYTHONPATH=${PYTHONPATH:-.} PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
OUT=${OUT:-runs/mqar/gpu_out}
WORK=runs/mqar/gpu
mkdir -p "$OUT" "$WORK"
LOG="$OUT/session.log"
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } >> "$LOG" 2>&1

BACKEND=triton
python -m palimpsa.mqar.backend_check --models palimpsa meta_mamba2 >> "$LOG" 2>&1 || BACKEND=torch
echo "op backend: $BACKEND" >> "$LOG"

COMMON="--preset paper --op-backend $BACKEND --warmup-steps 50 --no-progress"
python -m palimpsa mqar $COMMON --out "$WORK/paper" --settings 512:128 --d-models 128 \
    --models palimpsa notpalimpsa meta_mamba2 mamba2 gated_deltanet --lrs 2.15e-3 4.64e-3 --seeds 0 1 \
    --max-steps 40 --warmup-steps 10 --eval-every 20 --workers-per-device 10 --time-budget 45 >> "$LOG" 2>&1

CAPACITY="$COMMON --out $WORK/capacity --settings 256:64 --d-models 64 --seeds 0 1 --eval-every 100 --time-limit-s 80"
python -m palimpsa mqar $CAPACITY --models palimpsa notpalimpsa meta_mamba2 mamba2 gated_deltanet \
    --lrs 2.15e-3 4.64e-3 --workers-per-device 20 --time-budget 105 >> "$LOG" 2>&1 &
python -m palimpsa mqar $CAPACITY --models attention --lrs 2.15e-3 --workers-per-device 2 --time-budget 105 \
    >> "$LOG" 2>&1 &
wait

for name in paper capacity; do
    cp "$WORK/$name/results.jsonl" "$OUT/results_$name.jsonl" 2>/dev/null
    cp "$WORK/$name/unfinished.jsonl" "$OUT/unfinished_$name.jsonl" 2>/dev/null
    cat "$WORK/$name/errors.log" >> "$LOG" 2>/dev/null
done
date -u >> "$LOG"
