#!/usr/bin/env bash
# Nsight Compute on the per-channel op's default kernels: why the reverse sweep runs at a fraction of its floor.
#
#   OUT=$OUT bash scripts/gpu_ncu_ops.sh        # from the repository root, on a GPU machine with ncu (Firecracker)
#
# For each shape in SHAPES (default 760M-like, 170M-like): one bf16 fwd+bwd of the op on its default path
# (`palimpsa bench ops`'s inputs), run twice; ncu profiles the second run's launches of the kernels named in KERNELS
# (default: the CUDA and Gluon reverse sweeps and output kernels, the Gluon local-adjoint pass and the chunk-state
# kernel) with the sections that say what bounds it: speed of light, occupancy, launch statistics, scheduler and
# warp-state statistics (stall reasons), memory workload, instruction statistics, and source counters (the SASS
# lines with the most stalls).  Clocks are left alone (--clock-control none).
# Output in $OUT: ncu_<shape>.txt (ncu's details page per kernel) and ncu.log.  Each shape is stopped after
# SHAPE_TIMEOUT_S (250) seconds; both shapes took 68-72 s on an H200.  `python -m palimpsa.bench.ncu_summary
# $OUT/ncu_<shape>.txt --shape <shape>` turns a page into one table of costs per element-token.
set -u
export PYTHONPATH=${PYTHONPATH:-.}
OUT=${OUT:?set OUT to the folder that comes back}
SHAPES=${SHAPES:-760M-like 170M-like}
KERNELS=${KERNELS:-palimpsa_sweep|palimpsa_output|unit_bwd_gluon_kernel|unit_local_adjoint_gluon_kernel|chunk_output_gluon_kernel|chunk_states_kernel}
NCU=${NCU:-ncu}
SHAPE_TIMEOUT_S=${SHAPE_TIMEOUT_S:-250}  # per shape: two shapes stay inside one 600 s device command
mkdir -p "$OUT"
command -v "$NCU" > /dev/null || { echo "ncu not found (set NCU)" | tee "$OUT/ncu.log"; exit 1; }
for shape in $SHAPES; do
    timeout "$SHAPE_TIMEOUT_S" "$NCU" --clock-control none --profile-from-start off --kernel-name "regex:^($KERNELS)$" \
        --section SpeedOfLight --section Occupancy --section LaunchStats --section SchedulerStats \
        --section WarpStateStats --section MemoryWorkloadAnalysis --section InstructionStats \
        --section SourceCounters --print-summary none \
        python3 -m palimpsa.bench.one_step --shape "$shape" --repeats 2 > "$OUT/ncu_$shape.txt" 2>> "$OUT/ncu.log"
    echo "$shape: rc $?" >> "$OUT/ncu.log"
done
tail -n 5 "$OUT/ncu.log"
for shape in $SHAPES; do grep -E "^  [a-z_]+kernel|Duration|Achieved Occupancy|Issue Slots Busy|No Eligible|Registers Per" \
    "$OUT/ncu_$shape.txt" | head -n 40; done
