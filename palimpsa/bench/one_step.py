"""One bf16 forward+backward of the per-channel op at a benchmark shape, ``--repeats`` times, synchronised: a
process for a profiler to wrap (``scripts/gpu_ncu_ops.sh`` runs Nsight Compute on it).

    python -m palimpsa.bench.one_step --shape 760M-like [--repeats 2] [--device cuda]

Inputs are ``palimpsa bench ops``'s (seed 0); the op runs its default path.  On CUDA the last repeat runs between
``cudaProfilerStart`` and ``cudaProfilerStop`` (a profiler started with ``--profile-from-start off`` sees that
repeat only, after the kernels have been compiled and tuned).  Prints the seconds each repeat took.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Optional

import torch

from palimpsa.bench import ops as bench


def fwd_bwd(shape: bench.Shape, device: str, dtype: torch.dtype = torch.bfloat16, tokens: Optional[int] = None,
            batch: Optional[int] = None) -> None:
    """One forward and backward of ``bench.palimpsa_forward`` on fresh inputs of ``shape`` (``tokens`` and
    ``batch`` override its T and B)."""
    inputs = bench.make_inputs(shape, dtype, device, T=tokens, B=batch)
    leaves = {n: x.detach().requires_grad_(n in ("q", "k", "v", "g", "beta")) for n, x in inputs.items()}
    o = bench.palimpsa_forward(**leaves)
    o.backward(torch.ones_like(o))


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="760M-like", help="a benchmark shape name (palimpsa bench ops)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--tokens", type=int, default=None, help="T instead of the shape's (a quick run)")
    parser.add_argument("--batch", type=int, default=None, help="B instead of the shape's")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    shape = bench.shape_by_name(args.shape)
    cuda = args.device.startswith("cuda")
    for i in range(args.repeats):
        last = i == args.repeats - 1
        if cuda:
            torch.cuda.synchronize()
            if last:
                torch.cuda.profiler.start()
        started = time.perf_counter()
        fwd_bwd(shape, args.device, getattr(torch, args.dtype), args.tokens, args.batch)
        if cuda:
            torch.cuda.synchronize()
            if last:
                torch.cuda.profiler.stop()
        print(f"{shape.name} repeat {i}: {time.perf_counter() - started:.3f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
