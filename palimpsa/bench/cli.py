"""``palimpsa bench ops`` (the kernels against fla's, on a CUDA GPU), ``palimpsa bench cpu`` (the PyTorch path) and
``palimpsa bench train`` (a full training step of each model, side by side)."""

from __future__ import annotations

import argparse


class DescriptionAndDefaultsFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The description as written, and each option's default after its help."""


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="benchmarks: ops (GPU kernels), cpu (PyTorch path), train (a step)")
    verbs = parser.add_subparsers(dest="bench_verb", metavar="<benchmark>")
    ops = verbs.add_parser("ops", help="time the Palimpsa op against fla's kernels at the benchmark shapes")
    ops.add_argument("--shapes", default="all",
                     help="comma-separated shape names (170M-like, 760M-like, d64, d128) or 'all' (default: all)")
    ops.add_argument("--no-fla", action="store_true", help="skip fla's chunk_simple_gla and chunk_gated_delta_rule")
    ops.add_argument("--fla-kernels", default="simple_gla,gated_delta_rule",
                     help="comma-separated fla kernels to time beside ours: simple_gla, gated_delta_rule "
                          "(default: both)")
    ops.add_argument("--no-decode", action="store_true", help="skip the decoding-step timing")
    ops.add_argument("--no-grouped", action="store_true",
                     help="skip grouped importance (G = 1) and NotPalimpsa on the GLA-shaped path")
    ops.add_argument("--fla-bypass-check", action="store_true",
                     help="time fla's backward even where it refuses this Triton on Hopper (timing only, "
                          "numerics unchecked; the table says so)")
    ops.add_argument("--out", default=None,
                     help="write the table (markdown) here and the numbers beside it (.json) (default: print only)")
    ops.set_defaults(func=run_ops)
    cpu = verbs.add_parser("cpu", help="chunk_palimpsa fwd+bwd on the CPU (per channel, G = 1, NotPalimpsa) against a "
                                       "per-token loop")
    cpu.add_argument("--impl", choices=["all", "chunk", "chunk_g1", "chunk_notpalimpsa", "loop"], default="all",
                     help="time all (the per-channel, G = 1 and NotPalimpsa chunked paths and the per-token loop) or "
                          "one of them, e.g. under a whole-process timer (default: all)")
    cpu.add_argument("--repeats", type=int, default=3, help="timed runs of each; the median is reported (default: 3)")
    cpu.add_argument("--out", default="runs/bench",
                     help="folder for cpu_bench.json / cpu_bench.md (default: runs/bench)")
    cpu.set_defaults(func=run_cpu)
    from palimpsa.bench.train import __doc__ as train_doc, add_arguments

    train = verbs.add_parser("train", help="tokens/s, step time, peak memory and a per-component profile of a full "
                             "training step of each model, side by side", description=train_doc,
                             formatter_class=DescriptionAndDefaultsFormatter)
    add_arguments(train)
    train.set_defaults(func=run_train)
    parser.set_defaults(func=lambda args: parser.print_help() or 2)


def run_ops(args: argparse.Namespace) -> int:
    import torch

    from palimpsa.bench import ops

    if not torch.cuda.is_available():
        raise SystemExit("palimpsa bench ops needs a CUDA GPU")
    shapes = ops.BENCH_SHAPES if args.shapes == "all" else tuple(
        ops.shape_by_name(name.strip()) for name in args.shapes.split(","))
    result = ops.run_benchmark(shapes, with_fla=not args.no_fla, decode=not args.no_decode,
                               grouped=not args.no_grouped, fla_bypass_check=args.fla_bypass_check,
                               fla_kernels=tuple(name.strip() for name in args.fla_kernels.split(",") if name.strip()))
    print(ops.format_table(result), end="")
    if args.out:
        ops.save_result(result, args.out)
    return 0


def run_cpu(args: argparse.Namespace) -> int:
    from palimpsa.bench import cpu

    return cpu.main(["--impl", args.impl, "--repeats", str(args.repeats), "--out", args.out])


def run_train(args: argparse.Namespace) -> int:
    from palimpsa.bench import train

    return train.run(args)
