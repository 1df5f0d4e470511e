"""Check the chunk-state kernel's launches (blocks, warps, pipelining stages, register cap) on a GPU against a
float64 reference, then time each one that passed.

    PYTHONPATH=. python scripts/gpu_state_tuning.py [--shapes 760M-like,170M-like,d64,d128] [--out FILE.md]
        [--variants default,bk128-bv32-w8,...] [--limit 540] [--chunk 64]

A variant "bkA-bvB-wW[-sS][-rR]" launches ``chunk_state.chunk_states_kernel`` with blocks of A key rows and B
value columns, W warps, S software-pipelining stages (Triton's default without "-s") and a cap of R registers
per thread (none without "-r"); "default" is the package's launch for that key size (``config.state_tuning``).
--chunk 32 times the kernel as the backward calls it (``chunk_bwd.BWD_CHUNK``: twice the states, walked in twice
the steps); the forward calls it with chunks of 64, the default.
Without --variants a grid of blocks (32-128 rows, 32-64 columns, no wider than the next power of two of K and V),
4 and 8 warps, default and 1 stages and a 128-register cap at 4 warps is tried.

1. Correctness, per variant and shape (bf16 inputs as ``palimpsa bench ops`` makes them): every chunk-start
   state (M and I) and the final state (mu and I) against ``torch_chunk._chunk_boundary_states`` in float64 on
   the same bf16-rounded inputs, relative to each tensor's largest entry, limit 1e-4 (the kernel's split bf16
   products are accurate to ~2^-16); and on a varlen batch (three sequences, one shorter than a chunk) against
   the default launch's states, limit 1e-5.  Triton 3.6 has known Hopper miscompilations: a timing counts only
   when its variant passed here.
2. Timing of the variants that passed: the states of one forward (``triton.testing.do_bench`` median) and the
   bandwidth that makes of the bytes the kernel moves (its inputs as often as its blocks read them, the states
   written once).
Everything is printed as it goes and, with --out, written as markdown.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from palimpsa.bench import ops as bench  # noqa: E402
from palimpsa.ops.torch_chunk import _chunk_boundary_states, _to_chunks  # noqa: E402
from palimpsa.ops.triton.chunk_state import chunk_states  # noqa: E402
from palimpsa.ops.triton.config import StateTuning, kernel_config, state_tuning  # noqa: E402
from palimpsa.ops.triton.utils import SequenceLayout, next_power_of_two  # noqa: E402

C = 64


def parse_variant(name: str):
    """StateTuning of a variant name, None for "default"."""
    if name == "default":
        return None
    match = re.fullmatch(r"bk(\d+)-bv(\d+)-w(\d)(?:-s(\d))?(?:-r(\d+))?", name)
    if not match:
        raise ValueError(f"unknown variant {name!r}: expected default or bk<rows>-bv<cols>-w<warps>[-s<stages>]"
                         "[-r<registers>]")
    return StateTuning(int(match[1]), int(match[2]), int(match[3]), int(match[4]) if match[4] else None,
                       int(match[5]) if match[5] else None)


def variant_name(tune: StateTuning) -> str:
    name = f"bk{tune.block_k}-bv{tune.block_v}-w{tune.num_warps}"
    name += f"-s{tune.num_stages}" if tune.num_stages else ""
    return name + (f"-r{tune.maxnreg}" if tune.maxnreg else "")


def grid_variants(K: int, V: int):
    """The default grid of launches for key size K and value size V."""
    names = ["default"]
    blocks_k = sorted({min(b, next_power_of_two(K)) for b in (32, 64, 128)})
    blocks_v = sorted({min(b, next_power_of_two(V)) for b in (32, 64)})
    for bk, bv, warps, stages in itertools.product(blocks_k, blocks_v, (4, 8), (None, 1)):
        names.append(variant_name(StateTuning(bk, bv, warps, stages)))
    for bk, bv in itertools.product(blocks_k, blocks_v):
        names.append(variant_name(StateTuning(bk, bv, 4, None, 128)))
    return list(dict.fromkeys(names))


def run_states(inputs, prior, layout, tune, store_final=True):
    k, v, g, beta = inputs["k"], inputs["v"], inputs["g"], inputs["beta"]
    with kernel_config(state_tuning=tune):
        return chunk_states(k, v, g, beta, prior, None, layout, C, True, store_final)


def reference_states(inputs, prior):
    """float64 chunk-start (M, I) [N * NC, H, K, V] and final (mu, I) [N, H, K, V]."""
    k, v, g, beta = (inputs[n].double() for n in ("k", "v", "g", "beta"))
    N, T, H, K = k.shape
    V = v.shape[-1]
    zeros = torch.zeros(N, H, K, V, device=k.device, dtype=torch.float64)
    M, J, M_T, J_T = _chunk_boundary_states(*(_to_chunks(x, C) for x in (k, v, beta, g)), zeros, zeros)
    prior = prior.double()[None, None, :, None, None]
    starts = (M.transpose(0, 1).reshape(-1, H, K, V), (J + prior).transpose(0, 1).reshape(-1, H, K, V))
    imp_T = J_T + prior[0]
    return starts, (M_T / imp_T, imp_T)


def relative_error(x, ref) -> float:
    return ((x.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def moved_bytes(shape, tune: StateTuning) -> int:
    """Bytes the kernel moves: k once per value block, v and beta once per key block, M and I written once."""
    B, T, H, K, V = shape.B, shape.T, shape.H, shape.K, shape.V
    n_k, n_v = -(-K // tune.block_k), -(-V // tune.block_v)
    tokens = B * T * H
    return tokens * (K * 2 * n_v + 2 * V * 2 * n_k + 4 * n_k * n_v) + 2 * 4 * (B * T // C) * H * K * V


def main(argv=None) -> int:
    import triton

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="760M-like,170M-like,d64,d128")
    parser.add_argument("--variants", default=None, help="comma-separated; default: a grid per shape")
    parser.add_argument("--limit", type=float, default=540.0, help="start no variant after this many seconds")
    parser.add_argument("--chunk", type=int, default=64, choices=(16, 32, 64, 128),
                        help="chunk size: 64 as the forward calls the kernel, 32 as the backward does")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    global C
    C = args.chunk
    start = time.time()
    lines = [f"Chunk-state kernel launches, chunks of {C}; {torch.cuda.get_device_name()}, {bench.environment()}", "",
             "| shape | variant | worst error (of M, I, final mu, I; varlen) | ms | GB/s |", "|---|---|---|---|---|"]

    def emit(line):
        print(line, flush=True)
        lines.append(line)
        if args.out:
            with open(args.out + ".tmp", "w") as handle:
                handle.write("\n".join(lines) + "\n")
            os.replace(args.out + ".tmp", args.out)

    for shape_name in args.shapes.split(","):
        shape = bench.shape_by_name(shape_name)
        inputs = bench.make_inputs(shape, torch.bfloat16, "cuda")
        prior = torch.full((shape.H,), 0.5, device="cuda", dtype=torch.float32)
        layout = SequenceLayout(shape.B, shape.T, None, inputs["k"].device)
        (ref_m, ref_i), (ref_mu, ref_imp) = reference_states(inputs, prior)
        cut = {n: x[:1, :3 * C + 2 * C + 17].reshape(1, -1, *x.shape[2:]) for n, x in inputs.items()}
        cu = torch.tensor([0, 3 * C, 3 * C + 2 * C, 3 * C + 2 * C + 17], device="cuda", dtype=torch.int32)
        varlen = SequenceLayout(1, cu[-1].item(), cu, inputs["k"].device)
        with kernel_config(state_tuning=None):
            expected_varlen = run_states(cut, prior, varlen, None)
        variants = args.variants.split(",") if args.variants else grid_variants(shape.K, shape.V)
        for name in variants:
            if time.time() - start > args.limit:
                emit(f"| {shape.name} | {name} | not run: --limit {args.limit:.0f} s reached | | |")
                continue
            tune = parse_variant(name)
            shown = state_tuning(shape.K, shape.V, args.chunk) if tune is None else tune
            try:
                (m, i), (mu, imp) = run_states(inputs, prior, layout, tune)
                worst = max(relative_error(x, r) for x, r in ((m, ref_m), (i, ref_i), (mu, ref_mu), (imp, ref_imp)))
                (vm, vi), (vmu, vimp) = run_states(cut, prior, varlen, tune)
                (em, ei), (emu, eimp) = expected_varlen
                worst_varlen = max(relative_error(x, r.double()) for x, r in
                                   ((vm, em), (vi, ei), (vmu, emu), (vimp, eimp)))
            except Exception as error:  # a launch the compiler or the GPU refuses is reported, not fatal
                emit(f"| {shape.name} | {name} | failed: {type(error).__name__}: {str(error)[:80]} | | |")
                continue
            ok = worst <= 1e-4 and worst_varlen <= 1e-5
            if not ok:
                emit(f"| {shape.name} | {name} | FAILED {worst:.1e}; {worst_varlen:.1e} | | |")
                continue
            del m, i, mu, imp
            ms = triton.testing.do_bench(lambda: run_states(inputs, prior, layout, tune, store_final=False))
            gbs = moved_bytes(shape, shown) / ms / 1e6
            label = name if tune is not None else f"default ({variant_name(shown)})"
            emit(f"| {shape.name} | {label} | {worst:.1e}; {worst_varlen:.1e} | {ms:.3f} | {gbs:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
