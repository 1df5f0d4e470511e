"""``palimpsa convert {mamba2,palimpsa} SRC DST``: make a checkpoint metaplastic without changing its outputs."""

from __future__ import annotations

import argparse
import json

from palimpsa.convert.checkpoint import DEFAULT_TOLERANCE, convert_checkpoint
from palimpsa.convert.metaplastic import CONVERTED_IMPORTANCE_SCALE

DESCRIPTIONS = {
    "mamba2": "a transformers Mamba2ForCausalLM checkpoint -> a Meta-Mamba2 (MetaMamba2ForCausalLM)",
    "palimpsa": "a NotPalimpsa checkpoint (PalimpsaForCausalLM, metaplasticity off) -> a Palimpsa",
}


def scale_argument(text: str):
    """--importance-scale: "auto" or a float."""
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a float, got {text!r}") from None


def run(args: argparse.Namespace) -> int:
    # bad input (ValueError, FileNotFoundError, FileExistsError) is reported by palimpsa.cli.main, in flags
    report = convert_checkpoint(args.kind, args.src, args.dst, importance_rank=args.importance_rank,
                                importance_groups=args.importance_groups,
                                importance_scale=args.importance_scale, verify=not args.no_verify,
                                tolerance=args.tolerance, overwrite=args.overwrite, seed=args.seed)
    print(json.dumps(report, indent=2))
    return 0


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("convert", help="make a Mamba2 / NotPalimpsa checkpoint metaplastic",
                                   description=__doc__)
    kinds = parser.add_subparsers(dest="kind", metavar="<kind>", required=True)
    for kind, description in DESCRIPTIONS.items():
        sub = kinds.add_parser(kind, help=description, description=description)
        sub.add_argument("src", help="source checkpoint: a directory or a Hub id")
        sub.add_argument("dst", help="output directory (written atomically; must not exist unless --overwrite)")
        rank_default = "ceil(hidden_size / 16)" if kind == "mamba2" else "the source's"
        sub.add_argument("--importance-rank", type=int, default=None,
                         help=f"rank r of the new importance gates (default: {rank_default})")
        sub.add_argument("--importance-groups", type=int, default=None,
                         help="importance gates per head and token, each shared by a group of value channels "
                              "(default: one per channel, the paper's model; 1: one per head, the fast path)")
        sub.add_argument("--importance-scale", type=scale_argument, default=CONVERTED_IMPORTANCE_SCALE,
                         help="initial c of the gates' softplus(c) factor, or 'auto' (default): calibrated so "
                              "that the gates move the logits by at most 1e-6")
        sub.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                         help="largest accepted relative change of the logits on random tokens (default: %(default)g)")
        sub.add_argument("--no-verify", action="store_true", help="skip the logits comparison")
        sub.add_argument("--overwrite", action="store_true", help="replace an existing DST")
        sub.add_argument("--seed", type=int, default=0, help="seed of the gates' random projections (default: 0)")
        sub.set_defaults(func=run)
