"""Where the op's time goes, kernel by kernel: one fwd+bwd of each variant under the PyTorch profiler (CUDA).

For each shape (default 760M-like and 170M-like) and variant (grouped G = 1, NotPalimpsa, fla's chunk_simple_gla
when importable, and the per-channel op unless --no-per-channel): 3 warm-up fwd+bwd, then 5 profiled ones; prints
per kernel its device time per fwd+bwd (ms), its launches per fwd+bwd and the operator that launched it, most
expensive first, and the total.
Same inputs as ``palimpsa bench ops`` (bf16, seed 0).

    PYTHONPATH=. python scripts/gpu_profile_ops.py [--shapes 760M-like,170M-like] [--fla-bypass-check]
        [--out profile_ops.md]
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from palimpsa.bench import ops as bench
from palimpsa.bench.breakdown import top_kernels
from palimpsa.bench.fla_compat import fla_available, hopper_check_bypassed

REPEATS = 5


def kernel_table(forward, inputs, grad_names):
    """[(kernel name, ms per fwd+bwd, launches per fwd+bwd, the operator that launched it)], most time first."""
    leaves = {n: x.detach().clone().requires_grad_(n in grad_names) for n, x in inputs.items()}
    do = torch.randn_like(forward(**leaves).detach())

    def fwd_bwd():
        forward(**leaves).backward(do)
        for x in leaves.values():
            x.grad = None

    for _ in range(3):
        fwd_bwd()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        for _ in range(REPEATS):
            fwd_bwd()
        torch.cuda.synchronize()
    return [(name, ms / REPEATS, calls / REPEATS, launcher)
            for name, ms, calls, launcher in top_kernels(prof.events(), count=1000)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="760M-like,170M-like")
    parser.add_argument("--fla-bypass-check", action="store_true")
    parser.add_argument("--no-per-channel", action="store_true")
    parser.add_argument("--out", default=None, help="also write the tables here (markdown)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("gpu_profile_ops.py needs a CUDA GPU")
    lines = [f"Kernels of one fwd+bwd, device ms (mean of {REPEATS}); {torch.cuda.get_device_name()}, "
             f"{bench.environment()}", ""]
    for name in args.shapes.split(","):
        shape = bench.shape_by_name(name.strip())
        inputs = bench.make_inputs(shape, torch.bfloat16, "cuda")
        for label, forward, grads, variant_inputs in bench.op_variants(fla_available(), not args.no_per_channel):
            try:
                with hopper_check_bypassed(args.fla_bypass_check):
                    rows = kernel_table(forward, variant_inputs(inputs), grads)
            except Exception as err:  # noqa: BLE001 - a refused or failing variant is reported, the rest go on
                lines += [f"## {shape.name}, {label}: failed ({type(err).__name__}: {str(err)[:100]})", ""]
                continue
            lines += [f"## {shape.name}, {label}: {sum(r[1] for r in rows):.3f} ms", "",
                      "| kernel | ms | launches | launched by |", "|---|---|---|---|"]
            lines += [f"| `{kernel}` | {ms:.3f} | {calls:g} | {launcher} |"
                      for kernel, ms, calls, launcher in rows[:14]]
            lines.append("")
            print("\n".join(lines[-(len(rows[:14]) + 4):]), flush=True)
        del inputs
        torch.cuda.empty_cache()
    if args.out:
        bench.write_atomic(args.out, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
