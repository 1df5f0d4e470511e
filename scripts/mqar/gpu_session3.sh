#!/usr/bin/env bash
# Third GPU session: long MQAR runs that outlive one device command.
#
#   PYTHONPATH=. OUT=<folder> bash scripts/mqar/gpu_session3.sh start   # check, launch in the background, wait
#   PYTHONPATH=. OUT=<folder> bash scripts/mqar/gpu_session3.sh wait    # wait more, collect what is finished
#
# `start` checks the op's Triton backend inside the MQAR models (which also compiles the kernels once for every
# worker), then launches two sweeps in a new process session, so that they keep running between the device
# commands of one held machine, and waits up to WAIT_S seconds.  `wait` waits until the sweeps end or WAIT_S
# passes.  Both copy the results so far into $OUT.  All runs start at once on the one GPU (shared through MPS
# when the MPS daemon starts, else time-sliced), and every run fits its length into TIME_LIMIT_S seconds.
#
# Sweeps:
#   full      FULL_SETTING (default L=512, 128 pairs), d_model 128, the paper's state; lr FULL_LRS (default
#             {2.15e-3, 4.64e-3}) x seeds {0, 1}.
#   capacity  (skipped with CAPACITY=0) L=256, 64 pairs, d_model 128, a quarter of the paper's state (8 heads of
#             K=8, V=16; Mamba2: state 8, head_dim 16); lr 4.64e-3 x seeds {0, 1}.
#   Both train the models in MODELS (default: Palimpsa, NotPalimpsa, Meta-Mamba2, Mamba2, Gated DeltaNet).
#   extra     (only when EXTRA_MODELS is set) the full sweep's setting for EXTRA_MODELS at lr EXTRA_LRS: lets
#             one machine take one learning rate of a model and another machine the other.
set -u
export PYTHONPATH=${PYTHONPATH:-.} PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
OUT=${OUT:-runs/mqar/gpu3_out}
WORK=runs/mqar/gpu3
TIME_LIMIT_S=${TIME_LIMIT_S:-1500}
BUDGET_S=${BUDGET_S:-1560}
WAIT_S=${WAIT_S:-560}
FULL_SETTING=${FULL_SETTING:-512:128}
FULL_LRS=${FULL_LRS:-2.15e-3 4.64e-3}
MODELS=${MODELS:-palimpsa notpalimpsa meta_mamba2 mamba2 gated_deltanet}
CAPACITY=${CAPACITY:-1}  # 0: run the full-state sweep alone
EXTRA_MODELS=${EXTRA_MODELS:-}
EXTRA_LRS=${EXTRA_LRS:-$FULL_LRS}
SWEEPS="full capacity extra"
mkdir -p "$OUT" "$WORK/full" "$WORK/capacity" "$WORK/extra"
LOG="$WORK/session.log"
started=$(date +%s)

collect() {
    for sweep in $SWEEPS; do
        for name in results unfinished progress; do
            [ -f "$WORK/$sweep/$name.jsonl" ] && cp "$WORK/$sweep/$name.jsonl" "$OUT/${sweep}_$name.jsonl"
        done
    done
    { cat "$LOG"; for sweep in $SWEEPS; do
        [ -f "$WORK/$sweep/errors.log" ] && { echo "== $sweep errors"; cat "$WORK/$sweep/errors.log"; }; done
      echo "== collected $(date -u)"; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv; } \
        > "$OUT/session.log" 2>&1
}

running() { [ -f "$WORK/pid" ] && kill -0 "$(cat "$WORK/pid")" 2>/dev/null; }

if [ "${1:-}" = "start" ]; then
    { date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv;
      python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } >> "$LOG" 2>&1
    # MPS lets the runs' small kernels overlap; without it the GPU time-slices between processes
    export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
    mkdir -p /tmp/mps-pipe /tmp/mps-log
    # (a daemon left by an earlier `start` on the same machine is kept: "already running" is not a failure)
    if command -v nvidia-cuda-mps-control >/dev/null; then nvidia-cuda-mps-control -d >> "$LOG" 2>&1
    else echo "nvidia-cuda-mps-control: not on this machine" >> "$LOG"; fi
    if pgrep -x nvidia-cuda-mps-control >/dev/null \
        && timeout 60 python -c "import torch; assert (torch.ones(2, device='cuda') + 1).sum().item() == 4" >> "$LOG" 2>&1
    then echo "MPS: on" >> "$LOG"
    else echo quit | nvidia-cuda-mps-control >/dev/null 2>&1; unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
         echo "MPS: off (time-sliced)" >> "$LOG"
    fi
    BACKEND=triton
    python -m palimpsa.mqar.backend_check --models palimpsa meta_mamba2 --batch 2 >> "$LOG" 2>&1 || BACKEND=torch
    python -m palimpsa.mqar.backend_check --models palimpsa meta_mamba2 --batch 2 --seq-len 256 --num-kv-pairs 64 \
        --head-k-dim 8 --head-v-dim 16 >> "$LOG" 2>&1 || BACKEND=torch
    echo "op backend: $BACKEND; checks done $(date -u)" >> "$LOG"
    COMMON="--preset paper --op-backend $BACKEND --no-progress --d-models 128 --seeds 0 1 --warmup-steps 200
            --eval-every 250 --time-limit-s $TIME_LIMIT_S --time-budget $BUDGET_S"
    COMMON=$(echo $COMMON)  # one line: it goes into a bash -c string
    setsid nohup bash -c "
        python -m palimpsa mqar $COMMON --models $MODELS --out $WORK/full --settings $FULL_SETTING \
            --lrs $FULL_LRS --workers-per-device 20 >> $WORK/full.log 2>&1 &
        [ $CAPACITY = 1 ] && python -m palimpsa mqar $COMMON --models $MODELS --out $WORK/capacity \
            --settings 256:64 --head-k-dim 8 --head-v-dim 16 --lrs 4.64e-3 --workers-per-device 10 \
            >> $WORK/capacity.log 2>&1 &
        [ -n \"$EXTRA_MODELS\" ] && python -m palimpsa mqar $COMMON --models $EXTRA_MODELS --out $WORK/extra \
            --settings $FULL_SETTING --lrs $EXTRA_LRS --workers-per-device 20 >> $WORK/extra.log 2>&1 &
        wait; date -u >> $LOG; echo sweeps done >> $LOG" < /dev/null > /dev/null 2>&1 &
    echo $! > "$WORK/pid"
    echo "launched $(date -u)" >> "$LOG"
elif [ "${1:-}" != "wait" ]; then
    echo "usage: $0 start|wait" >&2
    exit 2
fi

while running && [ $(( $(date +%s) - started )) -lt "$WAIT_S" ]; do
    sleep 10
done
for sweep in $SWEEPS; do tail -n 3 "$WORK/$sweep.log" >> "$LOG" 2>/dev/null; done
collect
python - "$WORK" <<'EOF'
import json, pathlib, sys
work = pathlib.Path(sys.argv[1])
for sweep in ("full", "capacity", "extra"):
    last = {}
    path = work / sweep / "progress.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            p = json.loads(line)
            last[p["run_id"]] = p
    done = work / sweep / "results.jsonl"
    n_done = len(done.read_text().splitlines()) if done.exists() else 0
    print(f"{sweep}: {n_done} finished; latest validations:")
    for p in sorted(last.values(), key=lambda p: p["model"]):
        print(f"  {p['model']:15s} lr {p['lr']:g} seed {p['seed']} step {p['step']:6d}/{p['planned_steps']:6d} loss {p['loss']:.3f} "
              f"val {p['val_accuracy']:.3f} at {p['seconds']:.0f}s")
EOF
running && echo "sweeps still running" || echo "sweeps finished"
