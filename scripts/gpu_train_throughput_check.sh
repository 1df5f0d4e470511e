#!/usr/bin/env bash
# `palimpsa train` against `palimpsa bench train` on one GPU: does the trainer run as fast as the benchmark says?
#   1. a corpus (the standard library of this machine's Python, byte-level: scripts/make_stdlib_corpus.py);
#   2. `palimpsa train` (compiled blocks: its default on CUDA) of the 760M model for STEPS steps, B = 4 x T = 4096,
#      logging tokens/s every LOG_EVERY steps (the first interval, which compiles, is left out of the comparison);
#   3. `palimpsa bench train` of the same model with the trainer's vocabulary (--vocab-size);
#   4. the two tokens/s side by side in $OUT/throughput_check.md (the target: within 10 %);
#   5. scripts/gpu_train_fastpath_check.py on FASTPATH_MODELS: the compiled fast path's loss and gradients
#      against the plain path ($OUT/fastpath_check.{json,log}; each model compiles twice, about a minute).
#
#   bash scripts/gpu_train_throughput_check.sh OUT_DIR        (from the repository root; about 4-5 minutes)
# Overrides: MODEL (bench name: palimpsa-g1, notpalimpsa or palimpsa; default palimpsa-g1), SIZE (760m), BATCH (4),
# SEQ_LEN (4096), STEPS (25), LOG_EVERY (5), DEVICE (cuda), PYTHON (python3), MAX_FILES (corpus files, all),
# FASTPATH_MODELS (palimpsa-g1,notpalimpsa; empty skips the check).
# CPU smoke test: DEVICE=cpu SIZE=tiny BATCH=1 SEQ_LEN=64 STEPS=4 LOG_EVERY=1 MAX_FILES=20 \
#   bash scripts/gpu_train_throughput_check.sh /tmp/throughput
set -euo pipefail
OUT=${1:?usage: gpu_train_throughput_check.sh OUT_DIR}
MODEL=${MODEL:-palimpsa-g1}
SIZE=${SIZE:-760m}
BATCH=${BATCH:-4}
SEQ_LEN=${SEQ_LEN:-4096}
STEPS=${STEPS:-25}
LOG_EVERY=${LOG_EVERY:-5}
DEVICE=${DEVICE:-cuda}
PYTHON=${PYTHON:-python3}
FASTPATH_MODELS=${FASTPATH_MODELS-palimpsa-g1,notpalimpsa}
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1
case "$MODEL" in
    palimpsa) overrides='{}' ;;
    palimpsa-g1) overrides='{"importance_groups": 1}' ;;
    notpalimpsa) overrides='{"metaplasticity": false}' ;;
    *) echo "MODEL must be palimpsa, palimpsa-g1 or notpalimpsa, got '$MODEL'" >&2; exit 2 ;;
esac
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
rm -rf "$OUT/run" "$OUT/bench"

status=0
$PYTHON scripts/make_stdlib_corpus.py "$OUT/corpus.jsonl" ${MAX_FILES:+--max-files $MAX_FILES} > /dev/null
$PYTHON -m palimpsa train --model "palimpsa-$SIZE" --model-overrides "$overrides" --data "$OUT/corpus.jsonl" \
    --seq-len "$SEQ_LEN" --batch-size "$BATCH" --max-steps "$STEPS" --warmup-steps 2 --log-every "$LOG_EVERY" \
    --device "$DEVICE" --precision bf16 --no-progress --no-export-hf --no-resume --out-dir "$OUT/run" \
    > "$OUT/train.log" 2>&1 || { tail -n 20 "$OUT/train.log"; exit 1; }
vocab=$($PYTHON -c "
from palimpsa.train.models import padded_vocab_size
from palimpsa.train.tokenizer import load_tokenizer
print(padded_vocab_size(len(load_tokenizer('byte'))))")
$PYTHON -m palimpsa bench train --sizes "$SIZE" --models "$MODEL" --batch "$BATCH" --seq-len "$SEQ_LEN" \
    --vocab-size "$vocab" --device "$DEVICE" --no-profile --out "$OUT/bench" > "$OUT/bench.log" 2>&1 \
    || { tail -n 20 "$OUT/bench.log"; exit 1; }
compare=0
$PYTHON - "$OUT" "$MODEL" "$SIZE" "$LOG_EVERY" > "$OUT/throughput_check.md" <<'EOF' || compare=1
"""The trainer's tokens/s (every logged interval after the first) against the benchmark's, in one table."""
import json
import statistics
import sys
from pathlib import Path

from palimpsa.train.metrics import read_metrics

out, model, size, log_every = Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
records = [r for r in read_metrics(out / "run" / "metrics.jsonl") if "tokens_per_s" in r]
train = [r["tokens_per_s"] for r in records[1:]]  # the first interval includes the compilation
bench = json.loads((out / "bench" / "train_bench.json").read_text())
row = bench["rows"][0]
print(f"# `palimpsa train` against `palimpsa bench train`: {model} {size}, {bench['environment'].get('device')}\n")
print("| | tokens/s | detail |\n|---|---|---|")
if not train or "tokens_per_s" not in row:
    print(f"| - | - | no comparison: {len(train)} timed train intervals, bench status {row['status']} |")
    sys.exit(1)
median = statistics.median(train)
print(f"| palimpsa train (compiled blocks) | {median:.0f} | median of {len(train)} intervals of {log_every} steps "
      f"(min {min(train):.0f}, max {max(train):.0f}) |")
print(f"| palimpsa bench train | {row['tokens_per_s']:.0f} | median step {1e3 * row['step_s']:.1f} ms, "
      f"peak {row.get('peak_memory_gb', float('nan')):.1f} GB, vocabulary {bench['settings']['vocab_size']} |")
ratio = median / row["tokens_per_s"]
print(f"\ntrain / bench = {ratio:.3f} ({'within' if abs(ratio - 1) <= 0.10 else 'NOT within'} 10 %)")
sys.exit(0 if abs(ratio - 1) <= 0.10 else 1)
EOF
cat "$OUT/throughput_check.md"
if [ "$DEVICE" != cpu ] && [ -n "$FASTPATH_MODELS" ]; then  # last: it compiles every model twice (minutes)
    $PYTHON scripts/gpu_train_fastpath_check.py --models "$FASTPATH_MODELS" --out "$OUT" 2>&1 \
        | tee "$OUT/fastpath_check.log" | grep -v -i warn || status=1
fi
exit $(( status | compare ))
