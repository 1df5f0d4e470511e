#!/usr/bin/env bash
# Second GPU call (the first, gpu_session.sh, lost its Palimpsa and Meta-Mamba2 runs to two bugs fixed since:
# the op-backend switch and bf16 autocast inside the Palimpsa layer).  About 2.5 minutes:
#   PYTHONPATH=. OUT=<folder> bash scripts/mqar/gpu_session2.sh
# A capacity-limited setting that a d_model-128 model learns quickly at full state (L=256, 64 pairs), with a
# quarter of the paper's state: 8 heads of K=8, V=16 (1,024 entries per layer; Mamba2: state 8, head_dim 16,
# expand 1).  Five recurrent models + attention, lr 2.15e-3, seeds {0, 1}, every run fitted into 90 s of the
# shared GPUs (all 12 at once).  Earlier results are copied in first, so finished runs are skipped.
set -u
export PYTHONPATH=${PYTHONPATH:-.} PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
OUT=${OUT:-runs/mqar/gpu_out}
WORK=runs/mqar/gpu2
mkdir -p "$OUT" "$WORK/capacity_k8"
LOG="$OUT/session.log"
[ -f results/mqar/gpu/call2_results_capacity_k8.jsonl ] && cp results/mqar/gpu/call2_results_capacity_k8.jsonl "$WORK/capacity_k8/results.jsonl"
{ date -u; nvidia-smi --query-gpu=name,memory.total --format=csv; } >> "$LOG" 2>&1

BACKEND=triton
python -m palimpsa.mqar.backend_check --models palimpsa --batch 2 >> "$LOG" 2>&1 || BACKEND=torch
echo "op backend: $BACKEND" >> "$LOG"

RUN="--preset paper --op-backend $BACKEND --no-progress --out $WORK/capacity_k8 --settings 256:64 --d-models 128
     --head-k-dim 8 --head-v-dim 16 --lrs 2.15e-3 --seeds 0 1 --warmup-steps 50 --eval-every 100 --time-limit-s 90"
python -m palimpsa mqar $RUN --models palimpsa notpalimpsa meta_mamba2 mamba2 gated_deltanet \
    --workers-per-device 5 --time-budget 120 >> "$LOG" 2>&1 &
python -m palimpsa mqar $RUN --models attention --workers-per-device 1 --time-budget 120 >> "$LOG" 2>&1 &
wait
cp "$WORK/capacity_k8/results.jsonl" "$OUT/results_capacity_k8.jsonl" 2>/dev/null
cp "$WORK/capacity_k8/unfinished.jsonl" "$OUT/unfinished_capacity_k8.jsonl" 2>/dev/null
cat "$WORK/capacity_k8/errors.log" >> "$LOG" 2>/dev/null
date -u >> "$LOG"
