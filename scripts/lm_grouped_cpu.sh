#!/usr/bin/env bash
# Small language-model comparison on the CPU of three Palimpsa models that differ only in their importance groups:
#   G = V        the paper's model (one importance gate per value channel; importance_groups left at its default),
#   G = 1        one importance gate per head and token ({"importance_groups": 1}),
#   NotPalimpsa  no importance at all ({"metaplasticity": false}).
# Same byte-level tokens in the same order, same schedule and step budget, same seeds; the validation loss is measured
# on the same held-out packs (documents the training split never sees).  About 30 minutes on 2 idle CPU cores
# (58 on a shared one: results/train/grouped_cpu/CARD.md).
#
#   bash scripts/lm_grouped_cpu.sh --out OUT_DIR
#
# Data: the running Python's standard library sources (scripts/make_stdlib_corpus.py, shuffled with seed 0); the
# last VAL_DOCS documents are held out.  Runs go to OUT_DIR/runs/<name>/ (metrics.jsonl, checkpoint, exported
# model); then scripts/summarize_lm_grouped.py writes OUT_DIR/summary.md, runs.json and loss_curves.png.
# Each seed is a lane (one process at a time per lane, lanes side by side, THREADS torch threads per process).
# Knobs (environment): SEEDS ("0 1"), STEPS (600), SEQ_LEN (512), BATCH (8 packs per step), LR (2e-3),
# EVAL_EVERY (100), EVAL_PACKS (128), VAL_DOCS (64), THREADS (2 / number of seeds, at least 1), PYTHON, and the
# model sizes D_MODEL (128), LAYERS (4), HEADS (4), HEAD_DIM (32; V = K).
# Smoke test (about a minute):
#   SEEDS=0 STEPS=4 SEQ_LEN=64 BATCH=2 EVAL_EVERY=2 EVAL_PACKS=2 bash scripts/lm_grouped_cpu.sh --out /tmp/lmg
set -euo pipefail
usage="usage: bash scripts/lm_grouped_cpu.sh --out OUT_DIR"
[[ $# -eq 2 && $1 == --out ]] || { echo "$usage" >&2; exit 2; }
OUT=$2
SEEDS=${SEEDS:-0 1}
STEPS=${STEPS:-600}
SEQ_LEN=${SEQ_LEN:-512}
BATCH=${BATCH:-8}
LR=${LR:-2e-3}
EVAL_EVERY=${EVAL_EVERY:-100}
EVAL_PACKS=${EVAL_PACKS:-128}
VAL_DOCS=${VAL_DOCS:-64}
D_MODEL=${D_MODEL:-128}
LAYERS=${LAYERS:-4}
HEADS=${HEADS:-4}
HEAD_DIM=${HEAD_DIM:-32}
PYTHON=${PYTHON:-python3}
read -r -a seeds <<< "$SEEDS"
THREADS=${THREADS:-$(( ${#seeds[@]} >= 2 ? 1 : 2 ))}
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1
export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS
mkdir -p "$OUT/data" "$OUT/runs"
started=$(date +%s)

$PYTHON -m palimpsa info > "$OUT/environment.txt"
changes=$(git diff --quiet HEAD 2>/dev/null || echo " (with local changes)")
cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs)
{ echo "commit $(git rev-parse HEAD 2>/dev/null || echo unknown)$changes"
  echo "cpu    $cpu, $(getconf _NPROCESSORS_ONLN) cores, $THREADS torch thread(s) per run"
  echo "date   $(date -u +%Y-%m-%dT%H:%M:%SZ)"; } >> "$OUT/environment.txt"

# Corpus, then the split: the last VAL_DOCS documents (of the shuffled order) are the held-out set.
$PYTHON scripts/make_stdlib_corpus.py "$OUT/data/corpus.jsonl" > "$OUT/corpus_stats.json"
total=$(wc -l < "$OUT/data/corpus.jsonl")
(( total > VAL_DOCS )) || { echo "the corpus has $total documents, not more than VAL_DOCS=$VAL_DOCS" >&2; exit 1; }
head -n $(( total - VAL_DOCS )) "$OUT/data/corpus.jsonl" > "$OUT/data/train.jsonl.tmp"
tail -n "$VAL_DOCS" "$OUT/data/corpus.jsonl" > "$OUT/data/val.jsonl.tmp"
mv "$OUT/data/train.jsonl.tmp" "$OUT/data/train.jsonl"
mv "$OUT/data/val.jsonl.tmp" "$OUT/data/val.jsonl"

cat > "$OUT/model.json" <<EOF
{"model_type": "palimpsa", "hidden_size": $D_MODEL, "num_hidden_layers": $LAYERS, "num_heads": $HEADS,
 "head_dim": $HEAD_DIM, "hidden_ratio": 4, "metaplasticity": true}
EOF
common=(--model "$OUT/model.json" --data "$OUT/data/train.jsonl" --eval-data "$OUT/data/val.jsonl"
        --eval-every "$EVAL_EVERY" --eval-packs "$EVAL_PACKS" --seq-len "$SEQ_LEN" --batch-size "$BATCH"
        --max-steps "$STEPS" --lr "$LR" --warmup-steps $(( STEPS / 10 )) --log-every 10 --device cpu
        --precision fp32 --no-progress --no-resume)
models=("palimpsa-gv" "{}" "palimpsa-g1" '{"importance_groups": 1}' "notpalimpsa" '{"metaplasticity": false}')

lane() {  # lane SEED: the three models one after the other
  local seed=$1 i name
  for (( i = 0; i < ${#models[@]}; i += 2 )); do
    name="${models[i]}-seed$seed"
    echo "== $(date +%H:%M:%S) $name"
    $PYTHON -m palimpsa train "${common[@]}" --seed "$seed" --model-overrides "${models[i + 1]}" \
      --out-dir "$OUT/runs/$name" > "$OUT/runs/$name.log" 2>&1 \
      || { echo "$name failed: $OUT/runs/$name.log"; return 1; }
  done
}
status=0
pids=()
for seed in "${seeds[@]}"; do lane "$seed" & pids+=($!); done
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
$PYTHON scripts/summarize_lm_grouped.py "$OUT/runs" "$OUT" || status=1
echo "== total wall time $(( $(date +%s) - started )) s" | tee -a "$OUT/environment.txt"
exit $status
