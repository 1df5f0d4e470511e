#!/usr/bin/env bash
# Training evidence on a 2-GPU machine, in one go (about 4 minutes on 2 H100s):
#   1. model comparison: Palimpsa, NotPalimpsa (metaplasticity off) and Gated DeltaNet, same data, same
#      batches, same schedule, each capped at COMPARE_TIME_S seconds of wall clock (loss vs tokens);
#   2. throughput: the Palimpsa model on 1 GPU, then on 2 GPUs with DDP and with FSDP2 (torchrun).
# First a check that the model's step on the GPU (Triton op) matches the PyTorch op; no runs if it does not.
# Data: the standard library sources of the machine's Python (scripts/make_stdlib_corpus.py), byte-level.
#
#   bash scripts/gpu_train_evidence.sh OUT_DIR
# Then: python scripts/summarize_train_runs.py OUT_DIR/runs results/train   (also run at the end here)
# CPU smoke test of this script: DEVICE=cpu SIZE=tiny SEQ_LEN=128 BATCH=2 STEPS=6 COMPARE_TIME_S=30 \
#   SCALE_TIME_S=20 LOG_EVERY=1 MAX_FILES=50 bash scripts/gpu_train_evidence.sh /tmp/evidence
set -euo pipefail
OUT=${1:?usage: gpu_train_evidence.sh OUT_DIR}
DEVICE=${DEVICE:-auto}
SIZE=${SIZE:-small}
SEQ_LEN=${SEQ_LEN:-2048}
BATCH=${BATCH:-16}
STEPS=${STEPS:-400}
LR=${LR:-1e-3}
COMPARE_TIME_S=${COMPARE_TIME_S:-55}
SCALE_TIME_S=${SCALE_TIME_S:-25}
LOG_EVERY=${LOG_EVERY:-5}
MAX_FILES=${MAX_FILES:-}
PYTHON=${PYTHON:-python3}
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
mkdir -p "$OUT/runs"

$PYTHON scripts/make_stdlib_corpus.py "$OUT/corpus.jsonl" ${MAX_FILES:+--max-files $MAX_FILES} | tee "$OUT/corpus_stats.json"
common=(--data "$OUT/corpus.jsonl" --seq-len "$SEQ_LEN" --batch-size "$BATCH" --max-steps "$STEPS" --lr "$LR"
        --warmup-steps $((STEPS / 10 + 1)) --log-every "$LOG_EVERY" --device "$DEVICE" --no-progress
        --no-export-hf --no-resume)
train() {  # train GPU NAME ARGS...: one process on one GPU
  local gpu=$1 name=$2; shift 2
  CUDA_VISIBLE_DEVICES=$gpu $PYTHON -m palimpsa train "${common[@]}" --out-dir "$OUT/runs/$name" "$@" \
    > "$OUT/runs/$name.log" 2>&1
}
torchrun2() {  # torchrun2 NAME ARGS...: two processes, one per GPU
  local name=$1; shift
  $PYTHON -m torch.distributed.run --standalone --nproc-per-node 2 -m palimpsa train "${common[@]}" \
    --out-dir "$OUT/runs/$name" "$@" > "$OUT/runs/$name.log" 2>&1
}
status=0
wait_all() { for pid in "$@"; do wait "$pid" || status=1; done; }

echo "== the model's training step on this GPU against the PyTorch backend (stop here if they disagree)"
CUDA_VISIBLE_DEVICES=0 $PYTHON scripts/check_model_backends.py --model "palimpsa-$SIZE" | tee "$OUT/backend_check.json" \
  || { echo "backend check failed: no training runs"; exit 1; }

echo "== comparison, phase 1: Palimpsa (GPU 0) and NotPalimpsa (GPU 1)"
train 0 compare-palimpsa --model "palimpsa-$SIZE" --time-limit-s "$COMPARE_TIME_S" & p1=$!
train 1 compare-notpalimpsa --model "palimpsa-$SIZE" --model-overrides '{"metaplasticity": false}' \
  --time-limit-s "$COMPARE_TIME_S" & p2=$!
wait_all $p1 $p2
echo "== comparison, phase 2: Gated DeltaNet (GPU 0); throughput on 1 GPU (GPU 1)"
train 0 compare-gated-deltanet --model "gated-deltanet-$SIZE" --time-limit-s "$COMPARE_TIME_S" & p1=$!
train 1 scale-1gpu --model "palimpsa-$SIZE" --time-limit-s "$SCALE_TIME_S" & p2=$!
wait_all $p1 $p2
echo "== throughput on 2 GPUs: DDP, then FSDP2"
torchrun2 scale-ddp-2gpu --model "palimpsa-$SIZE" --parallel ddp --time-limit-s "$SCALE_TIME_S" || status=1
torchrun2 scale-fsdp-2gpu --model "palimpsa-$SIZE" --parallel fsdp --time-limit-s "$SCALE_TIME_S" || status=1
for log in "$OUT"/runs/*.log; do echo "== $log"; tail -n 5 "$log"; done
$PYTHON scripts/summarize_train_runs.py "$OUT/runs" "$OUT" || status=1
exit $status
