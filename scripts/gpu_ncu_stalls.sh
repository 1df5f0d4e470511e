#!/usr/bin/env bash
# Nsight Compute stall reasons of one kernel of the per-channel op: where its warps wait between instructions.
#
#   OUT=$OUT bash scripts/gpu_ncu_stalls.sh      # from the repository root, on a GPU machine with ncu
#
# For each shape in SHAPES (default 760M-like; commas or spaces between shapes): one bf16 fwd+bwd on the default path (palimpsa.bench.one_step), run
# twice; ncu profiles the second run's launch of KERNEL (default the Gluon reverse sweep) and reads, per stall
# reason, the warps stalled for it per issued instruction (smsp__average_warps_issue_stalled_<reason>_per_issue_active),
# beside the issue rate and occupancy.  Their sum is the cycles between two instructions of one warp (ncu's "Warp
# Cycles Per Issued Instruction"): "wait" is a fixed-latency dependency (an ALU result), "short_scoreboard" shared
# memory or MUFU, "long_scoreboard" global memory, "math_pipe_throttle" a full pipe, "not_selected" another warp
# issued (no loss).  Output: $OUT/stalls_<shape>.txt.  SOURCE=1 also samples the stalls per SASS instruction (ncu's
# SourceCounters section) and writes them as $OUT/sass_<shape>.csv.gz (ncu's source page: one row per instruction),
# which `python -m palimpsa.bench.ncu_source FILE` sums by stall reason and by opcode.
set -u
export PYTHONPATH=${PYTHONPATH:-.}
OUT=${OUT:?set OUT to the folder that comes back}
SHAPES=${SHAPES:-760M-like}
SHAPES=${SHAPES//,/ }  # "760M-like,170M-like" or "760M-like 170M-like"
KERNEL=${KERNEL:-unit_bwd_gluon_kernel}
NCU=${NCU:-ncu}
mkdir -p "$OUT"
command -v "$NCU" > /dev/null || { echo "ncu not found (set NCU)" | tee "$OUT/stalls.log"; exit 1; }
reasons="barrier branch_resolving dispatch_stall drain imc_miss lg_throttle long_scoreboard math_pipe_throttle membar
mio_throttle misc no_instruction not_selected selected short_scoreboard sleeping tex_throttle wait"
metrics="sm__warps_active.avg.pct_of_peak_sustained_active,smsp__issue_active.avg.per_cycle_active,gpu__time_duration.sum"
metrics="$metrics,smsp__average_warp_latency_per_inst_issued.ratio,launch__registers_per_thread"
for reason in $reasons; do metrics="$metrics,smsp__average_warps_issue_stalled_${reason}_per_issue_active.ratio"; done
for shape in $SHAPES; do
    extra=()
    [ "${SOURCE:-0}" = 1 ] && extra=(--section SourceCounters --import-source no -o "/tmp/stalls_$shape" -f)
    timeout 250 "$NCU" --clock-control none --profile-from-start off --kernel-name "regex:^($KERNEL)$" --launch-count 1 \
        --metrics "$metrics" --print-summary none "${extra[@]}" \
        python3 -m palimpsa.bench.one_step --shape "$shape" --repeats 2 > "$OUT/stalls_$shape.txt" 2>> "$OUT/stalls.log"
    echo "$shape: rc $?" >> "$OUT/stalls.log"
    if [ "${SOURCE:-0}" = 1 ]; then
        "$NCU" -i "/tmp/stalls_$shape.ncu-rep" --page raw --print-summary none --metrics "$metrics" \
            > "$OUT/stalls_$shape.txt" 2>> "$OUT/stalls.log"
        "$NCU" -i "/tmp/stalls_$shape.ncu-rep" --page source --csv --print-source sass 2>> "$OUT/stalls.log" \
            | gzip > "$OUT/sass_$shape.csv.gz"
        echo "$shape source page: rc ${PIPESTATUS[0]}" >> "$OUT/stalls.log"
    fi
    grep -E "stalled|issue_active|warps_active|duration|latency|registers" "$OUT/stalls_$shape.txt" | sort -k3 -n -r | head -n 30
done
