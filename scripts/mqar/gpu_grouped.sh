#!/usr/bin/env bash
# MQAR with grouped importance on one GPU (G in {1, 4, V} against NotPalimpsa), in one device command that ends by WALL_S seconds.
#
#   OUT=$OUT bash scripts/mqar/gpu_grouped.sh          # from the repository root; PYTHONPATH defaults to .
#
# What it runs: MQAR at (L=256, 64 key-value pairs), d_model 128, 2 layers, 8 heads, with the paper preset's data
# and optimiser (vocabulary 8,192; 100k training, 1k validation and 3k test examples; AdamW, warm-up then cosine),
# at two state sizes, each one sweep of 24 runs:
#   full     the paper's state: 8 heads of K=16, V=32;
#   quarter  a quarter of it: 8 heads of K=8, V=16 (the "capacity" setting of results/mqar/gpu3);
# models palimpsa (G = V, one importance gate per value channel), palimpsa_g4, palimpsa_g1 and notpalimpsa;
# lr {4.64e-3, 1e-2}; seeds {0, 1, 2}.  The lr is chosen per model, state and seed on validation accuracy.
#
# How the 48 runs fit: both sweeps start together, every run on the one GPU at once, time-sliced (MPS=1 tries the
# MPS daemon first; it is off by default: MPS limits the clients per GPU, 48 in NVIDIA's documentation of Volta
# MPS, and the H200 of results/mqar/gpu4 did not start it).  Batch 64, not the paper's 128: it halves the
# work per step and the activation memory of 48 processes sharing the card.
# MEASURED (results/mqar/gpu5_grouped, H200): about 6.7 GB per process, so 48 do not fit in 140 GB (the quarter sweep
# ran out of memory), and 19 runs sharing the card took 1.3 s per step: run one state size per call (STATES=...).  Each sweep trains
# its runs in lockstep (`--equal-steps`): a run waits while it is more than 5 steps ahead of the slowest, so the
# GPU time a cheap model leaves goes to the dear ones; after timing steps 100-200, every run fits its length into
# its time limit and the sweep's budget, and the runs of a sweep agree on the smallest of these lengths.  So the
# four models of one state size train the same number of steps (the two state sizes may differ).  The warm-up
# lasts 200 steps, so the agreed length changes no learning rate already used, and a run repeats exactly with
# --max-steps set to its steps.  Validation every 100 steps; the test set is scored once, with the best validated
# weights.
#
# Expected pace.  results/mqar/gpu3 ran 20 runs at L=256, batch 128, time-sliced on an H100: a per-channel run
# (palimpsa) cost 18.7 ms of GPU per step at full state and
# 11.8 ms at quarter state (0.37 and 0.24 s per step with 20 runs sharing); results/mqar/gpu4 ran L=512 on an H200
# at the same cost per token (0.60-0.76 s per step with 20 runs).  palimpsa_g1, palimpsa_g4 and notpalimpsa run
# on the GLA-shaped path (any V / G), not yet timed in MQAR.  Taking batch 64 at 0.6x the cost of batch 128 and the GLA path at 0.75x
# the per-channel one, a lockstep round of the 24 full-state runs costs 0.235 s of GPU and one of the quarter-state
# runs 0.149 s; each sweep holds half the processes, so about 0.47 s per step for a full-state run and 0.30 s for
# a quarter-state run: about 770 and 1,200 steps in the ~360 s of training each run gets (below).  Bounds: 0.34-0.9
# s per step at full state (1,060-400 steps) and 0.21-0.56 s at quarter state (1,700-640 steps), from "batch 64
# costs half and the GLA path half" to "batch 64 costs as much as 128 and the GLA path as much as per channel".
# The steps actually run and the seconds per step are in results.jsonl and at the end of summary.md.
#
# Phases (seconds from the start; the times are estimates):
#   0-5      machine and software into the log;
#   5-70     the op's Triton backend checked against the PyTorch one inside every model at both state sizes, 8
#            checks in parallel (`python -m palimpsa.mqar.backend_check`, each at most CHECK_TIMEOUT_S): loss,
#            gradients and the evaluation passes.  It also compiles every kernel the runs use, so that 48 processes
#            do not compile at once.  A model whose check fails runs its op on PyTorch (`--torch-op-for`);
#   70-495   the two sweeps, --time-budget ending at WALL_S - REPORT_S (a run still going then is scored at its best
#            validation and goes to unfinished.jsonl); every run's time limit is that budget less SLACK_S, against
#            a pace that slows after it was timed (the runs start 15-30 s into the budget; each fits ~360 s of
#            steps and validations, and its test pass, into what is left);
#   495-510  the report.  A watchdog interrupts the sweeps 20 s after their budget and kills them 15 s later, so
#            the command ends by about WALL_S + 10 s at worst.
#
# Output in $OUT (flat, at most 8 files):
#   summary.md          the table of finished runs (palimpsa mqar --report-only over both sweeps), the table of runs
#                       cut short by the budget if any, and the steps, pace and op backend of each state size
#   results.jsonl       every finished run (both sweeps), with its validation history
#   session.log         machine, checks, backends, sweep logs, GPU memory and utilisation every 15 s, timings
#   accuracy_vs_step.png, accuracy_vs_state_size.png   from the report
#   unfinished.jsonl    runs cut short by the budget (only when there are some)
#   grouped.tar.gz      everything: per-sweep results, progress (every validation as it happened), errors, checks
# Whatever finished is reported, whatever else happened; the command exits 1 only when no run finished.
#
# One process per state size instead (WORKERS=1, optionally MAX_STEPS=N): each sweep runs its runs one after another
# in one process, so the GPU is never time-sliced between CUDA contexts (the suspect in gpu5_grouped's 1.3 s per
# step: each of 19 processes waited for its turn on the card at every synchronisation); no lockstep then, each run
# gets an equal share of the budget as its time limit, and MAX_STEPS caps every run at the same length (a run that
# reaches its time limit first ends shorter: summary.md's steps say so).  Keep the runs per call few (SEEDS=0).
# WORKERS=N (1 < N < runs) runs N at a time.
# Overrides (environment): MODELS, LRS, SEEDS, SETTING (L:KV), D_MODEL, NUM_HEADS, STATES ("name:K:V ..."), BATCH,
# WARMUP, EVAL_EVERY, WORKERS (every run at once), MAX_STEPS (the preset's epochs), EXTRA_ARGS (added to both
# sweeps), WALL_S (530), REPORT_S (35), SLACK_S (35),
# GPUS (unset: every process sees every GPU; "0 1": the i-th state size's checks and sweep see only the i-th GPU of
# the list, cycling, through CUDA_VISIBLE_DEVICES: on a machine of two GPUs each state size has its own),
# CHECK (1; 0 skips the checks), CHECK_TIMEOUT_S (120), MPS (0), DEVICE (cuda), PYTHON (python), WORK (scratch
# folder, emptied first; default runs/mqar/gpu_grouped).
# A CPU smoke test (about 3 minutes on 2 cores; the checks fail there, so every op runs on PyTorch):
#   OUT=/tmp/grouped_out WORK=/tmp/grouped_work DEVICE=cpu WALL_S=200 REPORT_S=30 SLACK_S=30 SEEDS=0 LRS=1e-2 \
#     SETTING=32:4 D_MODEL=16 NUM_HEADS=2 STATES="full:8:16 quarter:4:8" BATCH=8 \
#     EXTRA_ARGS="--vocab-size 64 --num-train 512 --num-validation 32 --num-test 32" bash scripts/mqar/gpu_grouped.sh
set -u
export PYTHONPATH=${PYTHONPATH:-.} PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
OUT=${OUT:?set OUT to the folder that comes back}
WORK=${WORK:-runs/mqar/gpu_grouped}
PYTHON=${PYTHON:-python}
DEVICE=${DEVICE:-cuda}
MODELS=${MODELS:-palimpsa palimpsa_g4 palimpsa_g1 notpalimpsa}
LRS=${LRS:-4.64e-3 1e-2}
SEEDS=${SEEDS:-0 1 2}
SETTING=${SETTING:-256:64}
D_MODEL=${D_MODEL:-128}
NUM_HEADS=${NUM_HEADS:-8}
STATES=${STATES:-full:16:32 quarter:8:16}
BATCH=${BATCH:-64}
WARMUP=${WARMUP:-200}
EVAL_EVERY=${EVAL_EVERY:-100}
EXTRA_ARGS=${EXTRA_ARGS:-}
WORKERS=${WORKERS:-}
MAX_STEPS=${MAX_STEPS:-}
WALL_S=${WALL_S:-530}
REPORT_S=${REPORT_S:-35}
SLACK_S=${SLACK_S:-35}
CHECK=${CHECK:-1}
CHECK_TIMEOUT_S=${CHECK_TIMEOUT_S:-120}
MPS=${MPS:-0}
GPUS=${GPUS:-}
declare -A GPU_ENV  # state size -> the CUDA_VISIBLE_DEVICES setting of its processes (none when GPUS is unset)
read -r -a GPU_LIST <<< "$GPUS"
i=0
for state in $STATES; do
    name=${state%%:*}
    GPU_ENV[$name]=${GPU_LIST[@]+CUDA_VISIBLE_DEVICES=${GPU_LIST[$(( i % ${#GPU_LIST[@]} ))]}}
    i=$(( i + 1 ))
done

case "$WORK" in ""|/|.|..) echo "WORK must name a scratch folder, got '$WORK'" >&2; exit 2;; esac
count_words() { set -- $1; echo $#; }
RUNS=$(( $(count_words "$MODELS") * $(count_words "$LRS") * $(count_words "$SEEDS") ))
WORKERS=${WORKERS:-$RUNS}
if ! [[ "$WORKERS" =~ ^[1-9][0-9]*$ ]] || [ "$WORKERS" -gt "$RUNS" ]; then
    echo "WORKERS must be a whole number from 1 to $RUNS (the runs per state size), got '$WORKERS'" >&2; exit 2
fi
if [ -n "$MAX_STEPS" ] && ! [[ "$MAX_STEPS" =~ ^[1-9][0-9]*$ ]]; then
    echo "MAX_STEPS must be a positive whole number, got '$MAX_STEPS'" >&2; exit 2
fi
rm -rf "$WORK"
mkdir -p "$OUT" "$WORK/checks"
LOG="$WORK/session.log"
log() { echo "[$(printf '%4d' "$SECONDS") s] $*" | tee -a "$LOG"; }

# ---- machine and software
log "start $(date -u)"
{ nvidia-smi --query-gpu=name,memory.total,driver_version,compute_mode --format=csv 2>&1 || true
  echo "cpus: $(nproc)"; git rev-parse HEAD 2>/dev/null || echo "commit: unknown (no .git)"
  "$PYTHON" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" 2>&1
} >> "$LOG"
if [ "$MPS" = 1 ]; then
    export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
    mkdir -p /tmp/mps-pipe /tmp/mps-log
    if nvidia-cuda-mps-control -d >> "$LOG" 2>&1 && timeout 60 "$PYTHON" -c \
        "import torch; assert (torch.ones(2, device='cuda') + 1).sum().item() == 4" >> "$LOG" 2>&1; then
        log "MPS: on"
    else
        echo quit | nvidia-cuda-mps-control >> "$LOG" 2>&1
        unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
        log "MPS: off (the daemon did not start or a client failed; time-sliced)"
    fi
else
    log "MPS: not tried (time-sliced)"
fi
MONITOR=
if command -v nvidia-smi > /dev/null; then
    while :; do  # (its output goes nowhere else: a lingering sleep must not hold the command's output open)
        nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader >> "$WORK/gpu.log" 2>&1
        sleep 15
    done > /dev/null 2>&1 &
    MONITOR=$!
fi

# ---- checks: the op's Triton backend against PyTorch inside every model, at every state size
declare -A TORCH_FOR
for state in $STATES; do
    IFS=: read -r name K V <<< "$state"
    TORCH_FOR[$name]=""
done
if [ "$CHECK" = 1 ]; then
    IFS=: read -r L KV <<< "$SETTING"
    CHECK_PIDS=()
    for state in $STATES; do
        IFS=: read -r name K V <<< "$state"
        for model in $MODELS; do
            env ${GPU_ENV[$name]} OMP_NUM_THREADS=2 timeout "$CHECK_TIMEOUT_S" "$PYTHON" -m palimpsa.mqar.backend_check --models "$model" \
                --device "$DEVICE" --seq-len "$L" --num-kv-pairs "$KV" --batch 2 --d-model "$D_MODEL" \
                --num-heads "$NUM_HEADS" --head-k-dim "$K" --head-v-dim "$V" > "$WORK/checks/${name}_$model.log" 2>&1 &
            CHECK_PIDS+=($!)
        done
    done
    wait "${CHECK_PIDS[@]}"  # (not a bare wait: the GPU monitor runs in the background until the end)
    for state in $STATES; do
        IFS=: read -r name K V <<< "$state"
        for model in $MODELS; do
            result=$(grep -h "^$model: " "$WORK/checks/${name}_$model.log" | tail -n 1)
            if ! grep -q -- "-> ok" <<< "$result"; then
                TORCH_FOR[$name]="${TORCH_FOR[$name]} $model"
                result="${result:-no result (timed out or crashed: $(tail -n 1 "$WORK/checks/${name}_$model.log"))}"
            fi
            echo "check $name $model: $result" >> "$LOG"
        done
        log "checks $name done; op on PyTorch for:${TORCH_FOR[$name]:- none}"
    done
    BACKEND=triton
else
    BACKEND=auto
    log "checks skipped (CHECK=0): op backend auto"
fi

# ---- the sweeps: all runs at once (default), or WORKERS at a time
BUDGET=$(( WALL_S - REPORT_S - SECONDS ))
TIME_LIMIT=$(( BUDGET - SLACK_S ))
if [ "$WORKERS" -eq "$RUNS" ]; then  # every run at once, in lockstep: the runs of a state size agree on one length
    SCHEDULE=(--equal-steps)
else  # runs one after another in each worker: each gets its share of the budget as its time limit
    ROUNDS=$(( (RUNS + WORKERS - 1) / WORKERS ))
    TIME_LIMIT=$(( BUDGET / ROUNDS - SLACK_S / ROUNDS ))
    SCHEDULE=()
fi
[ -n "$MAX_STEPS" ] && SCHEDULE+=(--max-steps "$MAX_STEPS")
if [ "$TIME_LIMIT" -lt 30 ]; then
    log "only $BUDGET s left for the sweeps ($TIME_LIMIT s per run): not started"
else
    log "sweeps: $RUNS runs per state size, $WORKERS at a time, budget $BUDGET s, time limit $TIME_LIMIT s per run"
    PIDS=()
    declare -A SWEEP_OF
    for state in $STATES; do
        IFS=: read -r name K V <<< "$state"
        torch_for=${TORCH_FOR[$name]}
        setsid env ${GPU_ENV[$name]} "$PYTHON" -m palimpsa mqar --preset paper --out "$WORK/$name" --devices "$DEVICE" \
            --models $MODELS --settings "$SETTING" --d-models "$D_MODEL" --num-heads "$NUM_HEADS" \
            --head-k-dim "$K" --head-v-dim "$V" --lrs $LRS --seeds $SEEDS --batch-size "$BATCH" \
            --warmup-steps "$WARMUP" --eval-every "$EVAL_EVERY" --time-limit-s "$TIME_LIMIT" --time-budget "$BUDGET" \
            --workers-per-device "$WORKERS" ${SCHEDULE[@]+"${SCHEDULE[@]}"} --no-checkpoints --no-progress --op-backend "$BACKEND" \
            ${torch_for:+--torch-op-for $torch_for} $EXTRA_ARGS > "$WORK/$name.log" 2>&1 &
        PIDS+=($!)
        SWEEP_OF[$!]=$name
        log "sweep $name: pid $!${GPU_ENV[$name]:+ (${GPU_ENV[$name]})}, process group $(ps -o pgid= -p $! 2> /dev/null | tr -d ' ')"
    done
    HARD=$(( SECONDS + BUDGET + 20 ))
    while [ $SECONDS -lt $HARD ] && kill -0 "${PIDS[@]}" 2> /dev/null; do sleep 2; done
    for pid in "${PIDS[@]}"; do  # each sweep leads its own process group (setsid): its workers go with it
        if kill -0 "$pid" 2> /dev/null; then
            log "sweep ${SWEEP_OF[$pid]} still running 20 s after its budget: interrupted"
            kill -INT -- "-$pid" 2> /dev/null
        fi
    done
    for _ in $(seq 15); do kill -0 "${PIDS[@]}" 2> /dev/null || break; sleep 1; done
    for pid in "${PIDS[@]}"; do
        kill -0 "$pid" 2> /dev/null && { log "sweep ${SWEEP_OF[$pid]} killed"; kill -KILL -- "-$pid"; }
    done
    wait "${PIDS[@]}" 2> /dev/null
    log "sweeps ended"
fi
[ -n "$MONITOR" ] && kill "$MONITOR" 2> /dev/null

# ---- report: both sweeps' finished runs in one table; runs cut short in their own
mkdir -p "$WORK/all" "$WORK/unfinished"
: > "$WORK/all/results.jsonl"
: > "$WORK/unfinished/results.jsonl"
for state in $STATES; do
    name=${state%%:*}
    cat "$WORK/$name/results.jsonl" >> "$WORK/all/results.jsonl" 2> /dev/null
    cat "$WORK/$name/unfinished.jsonl" >> "$WORK/unfinished/results.jsonl" 2> /dev/null
done
"$PYTHON" -m palimpsa mqar --report-only --out "$WORK/all" > "$WORK/report.log" 2>&1 || log "report failed (report.log)"
if [ -s "$WORK/unfinished/results.jsonl" ]; then
    "$PYTHON" -m palimpsa mqar --report-only --out "$WORK/unfinished" >> "$WORK/report.log" 2>&1
    cp "$WORK/unfinished/results.jsonl" "$OUT/unfinished.jsonl"
fi
"$PYTHON" - "$WORK" $STATES > "$WORK/steps.md" 2>> "$LOG" <<'EOF'
"""Per state size: how many runs finished, their steps and pace, and the op backend of each model."""
import json, pathlib, sys
work = pathlib.Path(sys.argv[1])
print("## Steps and pace (scripts/mqar/gpu_grouped.sh)\n")
for state in sys.argv[2:]:
    name = state.split(":")[0]
    def records(file):
        path = work / name / file
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    done, cut = records("results.jsonl"), records("unfinished.jsonl")
    line = f"- {name} ({state}): {len(done)} runs finished, {len(cut)} cut short by the budget"
    if done:
        steps = sorted({r["steps"] for r in done})
        pace = [r["seconds_per_step"] for r in done if r["seconds_per_step"]]
        backends = sorted({(r["model"], r["op_backend"]) for r in done})
        line += (f"; steps {steps[0]}" + (f"-{steps[-1]}" if len(steps) > 1 else "")
                 + f" (planned {sorted({r['planned_steps'] for r in done})}, lockstep groups of "
                 f"{sorted({r['lockstep_runs'] for r in done}, key=str)})"
                 + (f"; {min(pace):.3f}-{max(pace):.3f} s per step" if pace else "")
                 + f"; {min(r['seconds'] for r in done):.0f}-{max(r['seconds'] for r in done):.0f} s per run"
                 + "; op backend " + ", ".join(f"{m} {b}" for m, b in backends))
    print(line)
EOF
cat "$WORK/steps.md" >> "$LOG"

# ---- into $OUT: the summary, the records, the log, the plots, and everything in one archive
{ for sweep in $STATES; do name=${sweep%%:*}; echo "== sweep $name (last lines)"; tail -n 25 "$WORK/$name.log" 2> /dev/null
      [ -f "$WORK/$name/errors.log" ] && { echo "== $name errors.log (head)"; head -c 4000 "$WORK/$name/errors.log"; }; done
  echo "== checks"; for f in "$WORK"/checks/*.log; do [ -f "$f" ] && { echo "-- $f"; tail -n 3 "$f"; }; done
  echo "== GPU (time, utilisation, memory)"; cat "$WORK/gpu.log" 2> /dev/null
  echo "== report"; cat "$WORK/report.log"; } >> "$LOG"
{ if [ -s "$WORK/all/summary.md" ]; then cat "$WORK/all/summary.md"; else echo "# No finished runs"; fi
  if [ -s "$WORK/unfinished/summary.md" ]; then
      echo; echo "# Runs cut short by the time budget (scored with their best validated weights)"; echo
      sed 's/^#/##/' "$WORK/unfinished/summary.md"
  fi
  echo; cat "$WORK/steps.md"; } > "$OUT/summary.md"
cp "$WORK/all/results.jsonl" "$OUT/results.jsonl"
for plot in accuracy_vs_step.png accuracy_vs_state_size.png; do
    [ -f "$WORK/all/$plot" ] && cp "$WORK/all/$plot" "$OUT/$plot"
done
log "done"
cp "$LOG" "$OUT/session.log"
tar -czf "$OUT/grouped.tar.gz" --exclude='*.lock' -C "$(dirname "$WORK")" "$(basename "$WORK")" 2>> "$OUT/session.log"
ls -la "$OUT"
sed '/^## Every run/,$d' "$WORK/all/summary.md" 2> /dev/null  # the table, in the command's own output
cat "$WORK/steps.md"
[ -s "$OUT/results.jsonl" ]
