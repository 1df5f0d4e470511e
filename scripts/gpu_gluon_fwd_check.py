"""Check the Gluon kernels of the per-channel op on a GPU against the float64 reference, then time them beside
the Triton ones.

    PYTHONPATH=. python scripts/gpu_gluon_fwd_check.py [--shapes 760M-like,170M-like,d64,d128] [--out FILE.md]
        [--variants gluon-fwd,gluon-8,gluon-16] [--no-check]

Variants (``palimpsa.ops.triton.config.kernel_config`` settings): "triton" (the Triton kernels), "gluon-fwd" (the
Gluon output kernel, Triton backward), "gluon-L" (both Gluon kernels, the reverse sweep with L lanes per value
column: 32 / L columns per one-warp program), "gluon-L-wW" (the same with W warps per sweep program, side by
side over the value columns), "-cN" (each sweep thread holds N adjacent value columns: N * 32 / L per warp,
``bwd_cols``); a suffix "-s1" keeps a sub-block's states in shared memory (``bwd_stage``), "-rR" caps the sweep at
R registers per thread (``bwd_maxnreg``), "-uN" rebuilds states N tokens per loop iteration (``bwd_unroll``) and a
final "-i" stages each chunk's inputs in shared memory (``bwd_inputs``), e.g. "gluon-16-c2-s0-u4-i"; without them
the sweep runs 1 column, stage 0, no cap, unroll 1, inputs from global memory and units sized for 8192 programs.
A "gluon-L" variant's output kernel takes its columns per thread by key size
(``OUTPUT_TUNED``: 2 at K = 48, 64, 96 since 1fa1530) unless "-f1" is given, so its forward times differ from
runs before that commit.  "default" runs the package's defaults (the sweep's layout, schedule and units by key
size, ``palimpsa.ops.triton.config.SWEEP_TUNED``).  Any variant may end in "-fN" (N value columns per
thread of the output kernel, ``fwd_cols``), "-fi" or "-fg" (its q and k rows staged in shared memory or read
from global memory, ``fwd_inputs``; without either, ``OUTPUT_INPUTS`` by key size: staged at K = 48, 64, 96 since
the tenth session) and
"-tN" (``bwd_target_programs``, which sizes the backward's units: "-t1" makes each sequence one unit, so that no
local-adjoint pass runs), e.g. "default-f1-t1" or "default-fi", "-qN" (the CUDA sweep's tokens whose dq and dk are
summed at a time, ``bwd_dqk_tokens``: "default-q4"), "-kN" (the CUDA sweep's lanes over K, ``bwd_key_lanes``:
"default-k16"), "-bN" (its blocks per multiprocessor, ``bwd_sweep_blocks``: "default-b2"), "-wN" and "-gN" (its
warps per block and tokens per segment, ``bwd_sweep_warps``, ``bwd_sweep_segment``: "default-w12-g8"), "-a1" or
"-a0" (its sub-blocks' checkpoints after their first tokens, or before: ``bwd_sweep_ck_first``), "-m1" or "-m0" (its
compact shared memory, ``bwd_sweep_compact``), "-p1" or "-p0" (dq and dk added as pairs, ``bwd_sweep_pairs``), and then
"-walk" or "-nowalk" (the CUDA output kernel walking whole sequences from the initial state, or not: ``fwd_walk``),
e.g. "default-walk".

1. Correctness, per variant, with ``scripts/gpu_ops_check.py``'s ``check_case``: at every shape and on a varlen
   batch (once more with saturated decays and full resets at some tokens, and for the default and CUDA variants once
   more with the forward walking the sequences), bf16 and float32, the chunk and
   fused-recurrent forwards (outputs, variance, final states) over the whole shape and every gradient on a slice
   (batch 0, heads 0-1), against ``naive_palimpsa`` in float64;
   limits float32 1e-4, bf16 2e-2.  Triton 3.6 has known Hopper miscompilations: a timing counts only when its
   variant passed here.
2. Timing of the variants that passed: the op's forward and forward+backward (bf16, as ``palimpsa bench ops``
   times them: no initial state or variance), ``triton.testing.do_bench`` medians.
Everything is printed as it goes and, with --out, written as markdown.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_ops_check import bf16_exact, check_case, extra_inputs, walk_runs  # noqa: E402

from palimpsa.bench import ops as bench  # noqa: E402
from palimpsa.ops.triton.config import kernel_config  # noqa: E402


def variant_config(name: str) -> dict:
    """kernel_config settings of a variant name (see the module docstring); a trailing "-fN" sets the output
    kernel's value columns per thread (``fwd_cols``), "-fi" stages its q and k rows in shared memory and "-fg"
    reads them from global memory (``fwd_inputs``), "-tN" the backward's target program count, which sizes its units
    (``bwd_target_programs``: 1 makes every sequence one unit, so no local-adjoint pass runs), and "-qN" the CUDA
    sweep's tokens whose dq and dk are summed at a time (``bwd_dqk_tokens``, 2 or 4) and "-kN" its lanes over K
    (``bwd_key_lanes``, 16 or 32)."""
    extra = {}
    while True:
        if name.endswith(("-walk", "-nowalk")):  # the CUDA output kernel walking whole sequences, or not (fwd_walk)
            extra["fwd_walk"] = name.endswith("-walk")
            name = name[:name.rindex("-")]
            continue
        if name.endswith(("-fi", "-fg")):  # the output kernel's q and k rows staged in shared memory, or not
            extra["fwd_inputs"] = name.endswith("-fi")
            name = name[:-3]
            continue
        match = re.fullmatch(r"(.+)-([ftqkbwgamp])(\d+)", name)
        if not match:
            break
        name = match[1]
        key = {"f": "fwd_cols", "t": "bwd_target_programs", "q": "bwd_dqk_tokens",
               "k": "bwd_key_lanes", "b": "bwd_sweep_blocks", "w": "bwd_sweep_warps",
               "g": "bwd_sweep_segment", "a": "bwd_sweep_ck_first", "m": "bwd_sweep_compact",
               "p": "bwd_sweep_pairs"}[match[2]]
        extra[key] = bool(int(match[3])) if match[2] in "amp" else int(match[3])
    if name == "triton":
        return dict(fwd_backend="triton", bwd_backend="triton", **extra)
    if name == "default":
        return extra
    if name == "cuda":  # the CUDA C++ kernels (palimpsa/ops/cuda/): output kernel and reverse sweep
        return dict(fwd_backend="cuda", bwd_backend="cuda", **extra)
    if name == "cuda-bwd":  # the CUDA C++ reverse sweep, the default output kernel
        return dict(bwd_backend="cuda", **extra)
    if name == "gluon-default":  # both Gluon kernels at their tuned settings (the defaults before the CUDA kernels)
        return dict(fwd_backend="gluon", bwd_backend="gluon", **extra)
    if name == "gluon-fwd":
        return dict(fwd_backend="gluon", bwd_backend="triton", **extra)
    match = re.fullmatch(r"gluon-(\d+)(?:-w(\d+))?(?:-c(\d))?(?:-s(\d))?(?:-r(\d+))?(?:-u(\d))?(-i)?", name)
    if match:
        return dict(fwd_backend="gluon", bwd_backend="gluon", bwd_lanes_k=int(match[1]),
                    bwd_warps=int(match[2] or 1), bwd_cols=int(match[3] or 1), bwd_stage=int(match[4] or 0),
                    bwd_maxnreg=int(match[5] or 0), bwd_unroll=int(match[6] or 1), bwd_inputs=bool(match[7]),
                    **extra)
    raise ValueError(f"unknown variant {name!r}: expected default, triton, cuda, cuda-bwd, gluon-default, gluon-fwd or "
                     "gluon-<lanes>[-w<warps>][-c<columns>][-s<stage>][-r<max registers>][-u<unroll>][-i], each "
                     "optionally followed by -f<output columns>, -fi or -fg and -t<target programs>")


def check_variant(name: str, shapes) -> bool:
    """check_case at every shape and on a varlen batch (the first shape's head sizes), the latter also with
    saturated decays and full resets at some tokens, under the variant."""
    ok = True
    for shape in shapes:
        x = bf16_exact(bench.make_inputs(shape, torch.float32, "cuda"))
        e = extra_inputs(x, shape.B, torch.float32, seed=1)
        with kernel_config(**variant_config(name)):
            passed, _ = check_case(f"{name} {shape.name}", x, e)
        ok &= passed
    small = bench.Shape("varlen", 1, 700, 4, shapes[0].K, shapes[0].V)
    x = bf16_exact(bench.make_inputs(small, torch.float32, "cuda"))
    cu = torch.tensor([0, 5, 300, 301, 700], device="cuda")
    e = extra_inputs(x, 4, torch.float32, seed=2)
    with kernel_config(**variant_config(name)):
        passed, _ = check_case(f"{name} varlen", x, e, cu=cu)
    ok &= passed
    # extreme decays on that varlen batch: saturated (g = -35) and full resets (g = -inf) at sequence starts and
    # ends, around the backward's chunks of 32, and in runs
    x["g"][0, [0, 4, 5, 31, 32, 33, 64, 299, 300, 301, 302, 303, 450, 699], :] = -35.0
    x["g"][0, [6, 96, 97, 500], :2] = float("-inf")
    with kernel_config(**variant_config(name)):
        passed, _ = check_case(f"{name} varlen, extreme decays", x, e, cu=cu)
    ok &= passed
    config = variant_config(name)
    if config.get("fwd_walk") is None and config.get("fwd_backend", "auto") in ("auto", "cuda") and walk_runs("cuda"):
        # the forward's sequence walk on that batch too ("auto" runs its chunks in parallel: too few warps to walk),
        # so that the walk's scaled chunks and its direct ones (the saturated decays) both run
        with kernel_config(**config, fwd_walk=True):
            passed, _ = check_case(f"{name} varlen, extreme decays, walked", x, e, cu=cu)
        ok &= passed
    return ok


def time_variant(name: str, shape) -> dict:
    inputs = bench.make_inputs(shape, torch.bfloat16, "cuda")
    with kernel_config(**variant_config(name)):
        return bench._measure(bench.palimpsa_forward, inputs, ("q", "k", "v", "g", "beta"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="760M-like,170M-like,d64,d128")
    parser.add_argument("--check-shapes", default="760M-like,170M-like",
                        help="shapes of the correctness checks (the slowest part)")
    parser.add_argument("--variants", default="gluon-8,gluon-16")
    parser.add_argument("--no-check", action="store_true", help="time without checking (never for a record)")
    parser.add_argument("--time-only", default="",
                        help="variants also timed but not checked here (ones a committed run already checked, e.g. "
                             "default); the table marks them")
    parser.add_argument("--out", default=None, help="also write the tables here (markdown)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("gpu_gluon_fwd_check.py needs a CUDA GPU")
    shapes = [bench.shape_by_name(s.strip()) for s in args.shapes.split(",")]
    variants = [v.strip() for v in args.variants.split(",")]
    for name in variants:  # fail fast on a bad name or setting
        with kernel_config(**variant_config(name)):
            pass
    lines = [f"Gluon kernels of the per-channel op; {torch.cuda.get_device_name()}, {bench.environment()}", ""]
    passed = {}
    for name in variants:
        check_shapes = [bench.shape_by_name(s.strip()) for s in args.check_shapes.split(",")]
        passed[name] = True if args.no_check else check_variant(name, check_shapes)
        lines.append(f"- {name}: checks {'skipped' if args.no_check else ('passed' if passed[name] else 'FAILED')}")
        print(lines[-1], flush=True)
    also = [v.strip() for v in args.time_only.split(",") if v.strip()]
    for name in also:
        with kernel_config(**variant_config(name)):
            pass
        lines.append(f"- {name}: timed only (not checked in this run)")
    timed = ["triton"] + [v for v in variants + also if passed.get(v, True) and v != "triton"]
    lines += ["", "The op, bf16, do_bench medians in ms (fwd / fwd+bwd) and the peak memory of one fwd+bwd in MB:", "",
              "| shape | " + " | ".join(timed) + " |", "|---|" + "---|" * len(timed)]
    for shape in shapes:
        cells = []
        for name in timed:
            try:
                r = time_variant(name, shape)
                cells.append(f"{r['fwd_ms']:.3f} / {r['fwd_bwd_ms']:.3f} / {r['peak_mb']:.0f} MB")
            except Exception as err:  # noqa: BLE001 - one variant's failure must not lose the others
                cells.append(f"failed: {type(err).__name__}")
        lines.append(f"| {shape.name} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        bench.write_atomic(args.out, text)
    return 0 if all(passed.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
