"""The CUDA reverse sweep's SASS without a GPU: its loops and what they issue.

    python -m palimpsa.bench.cuda_sass [--shape 760M-like] [--key-lanes 16|32] [--ck-first on|off] [--compact on|off]
        [--pairs on|off] [--warps W] [--segment S] [--scaled-only]

Compiles ``palimpsa/ops/cuda/sweep.cu`` with NVRTC for sm_90 at a benchmark shape's K, V and H (bf16 inputs, no
variance, no initial state: what ``palimpsa bench ops`` times), with the warps and segment length that
``sweep.block_layout`` picks, disassembles it with the cuobjdump of Triton's wheel and prints, for each loop (a
backward branch and the instructions it spans; an outer loop's count includes its inner loops'), its instructions by
kind.  The sub-block loop of a chunk body is the one with 4 x E reciprocals (MUFU: 4 tokens of E state elements a
thread).  ``--scaled-only`` compiles the kernel with its scaled chunk body in place of the direct one too, so that
each loop appears once (the counts quoted in results/bench/README.md were taken so).  Static counts: a loop's body
runs once per iteration, but code under a branch inside it (the chunk's anchor, the partial last sub-block) is
counted as if it always ran.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import tempfile
from typing import Dict, List, Optional, Tuple

KINDS = ("FFMA", "FMUL", "FADD", "MUFU", "LDS", "STS", "REDG", "SHFL", "BAR")


def sweep_cubin(K: int, V: int, H: int, key_lanes: Optional[int] = None, ck_first: Optional[bool] = None,
                scaled_only: bool = False, compact: Optional[bool] = None, pairs: Optional[bool] = None,
                warps: Optional[int] = None, segment: Optional[int] = None) -> Tuple[bytes, int, int, Dict[str, int]]:
    """(cubin, registers, spill-store bytes, defines) of the sweep for bf16 inputs without variance or initial state,
    compiled for sm_90 with the launch's choices of layout, warps and segment (``key_lanes``, ``ck_first``,
    ``compact``, ``pairs``, ``warps``, ``segment``: as ``launch_sweep``'s)."""
    import torch

    from palimpsa.ops.cuda import nvrtc, sweep

    compact = sweep.default_compact(K) if compact is None else compact
    lanes, warps, segment, blocks = sweep.block_layout(K, V, 32, False, key_lanes, warps=warps, segment=segment,
                                                       compact=compact)
    compact = compact and lanes == 32
    pairs = (sweep.PAIRS if pairs is None else pairs) and lanes == 32
    first = sweep.CHECKPOINT_AFTER_FIRST if ck_first is None else ck_first
    defines = sweep.kernel_defines(K, V, H, 32, 64, warps, torch.bfloat16, False, False, False, segment,
                                   g_dtype=torch.float32, lanes=lanes, blocks=blocks, ck_first=first, compact=compact,
                                   pairs=pairs)
    source = nvrtc.kernel_source("sweep.cu", defines)
    if scaled_only:
        direct = "run_chunk(Scaled<false>{});"
        if direct not in source:
            raise RuntimeError("sweep.cu no longer calls run_chunk(Scaled<false>{}): update --scaled-only")
        source = source.replace(direct, "run_chunk(Scaled<true>{});")
    cubin, log = nvrtc.compile_cubin(source, "palimpsa_sweep", 90, ["-Xptxas=-v"])
    registers = int(re.search(r"Used (\d+) registers", log)[1])
    spills = int(re.search(r"(\d+) bytes spill stores", log)[1])
    return cubin, registers, spills, defines


def sass(cubin: bytes) -> List[Tuple[int, str, str]]:
    """(address, opcode, operands) of every instruction, from the cuobjdump in Triton's wheel."""
    from palimpsa.bench.sass import _tool

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "sweep.cubin")
        with open(path, "wb") as handle:
            handle.write(cubin)
        text = subprocess.run([_tool("cuobjdump"), "-sass", path], capture_output=True, text=True,
                              check=True).stdout
    out = []
    for line in text.splitlines():
        match = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);", line)
        if match:
            out.append((int(match[1], 16), match[2], match[3]))
    return out


def loops(instructions: List[Tuple[int, str, str]]) -> List[Tuple[int, int, collections.Counter]]:
    """(first address, last address, opcode counts) of every loop: a branch back to an address at or before it."""
    found = []
    for address, opcode, operands in instructions:
        if not opcode.startswith("BRA"):
            continue
        target = re.search(r"0x([0-9a-f]+)", operands)
        if target and int(target[1], 16) <= address:
            start = int(target[1], 16)
            body = collections.Counter(op for a, op, _ in instructions if start <= a <= address)
            found.append((start, address, body))
    return found


def kind_counts(body: collections.Counter) -> Dict[str, int]:
    """Instructions of a loop body by kind (KINDS by their opcode's first part, the rest as "other")."""
    counts = {kind: 0 for kind in KINDS}
    other = 0
    for opcode, n in body.items():
        kind = opcode.split(".")[0]
        if kind in counts:
            counts[kind] += n
        else:
            other += n
    counts["other"] = other
    return counts


def main(argv=None) -> int:
    from palimpsa.bench import ops as bench

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="760M-like", help="a benchmark shape's name (palimpsa bench ops)")
    parser.add_argument("--key-lanes", type=int, choices=(16, 32), default=None,
                        help="the sweep's lanes over K (default: 32 where K allows)")
    parser.add_argument("--ck-first", choices=("on", "off"), default=None,
                        help="sub-block checkpoints after their first token (default: the sweep's)")
    parser.add_argument("--compact", choices=("on", "off"), default=None,
                        help="compact shared memory (default: the sweep's; 32 lanes over K only)")
    parser.add_argument("--pairs", choices=("on", "off"), default=None,
                        help="dq and dk added as pairs (default: the sweep's; 32 lanes over K only)")
    parser.add_argument("--warps", type=int, default=None, help="warps per block (default: the sweep's pick)")
    parser.add_argument("--segment", type=int, default=None, help="tokens per segment (default: the sweep's pick)")
    parser.add_argument("--scaled-only", action="store_true",
                        help="the scaled chunk body in place of the direct one too (each loop appears once)")
    args = parser.parse_args(argv)
    shape = bench.shape_by_name(args.shape)
    ck_first = None if args.ck_first is None else args.ck_first == "on"
    on = {None: None, "on": True, "off": False}
    cubin, registers, spills, defines = sweep_cubin(shape.K, shape.V, shape.H, args.key_lanes, ck_first,
                                                    args.scaled_only, on[args.compact], on[args.pairs], args.warps,
                                                    args.segment)
    elements = (defines["PK"] // defines["PKLANES"]) * (defines["PKLANES"] // 8)
    print(f"palimpsa_sweep at {shape.name} (K = {shape.K}, V = {shape.V}): {defines['PKLANES']} lanes over K, "
          f"{elements} state elements a thread, {defines['PWARPS']} warps a block, {defines['PSEG']}-token segments, "
          f"checkpoints {'after' if defines['PCKFIRST'] else 'before'} a sub-block's first token"
          f"{', compact shared memory' if defines['PCOMPACT'] else ''}{', dq/dk pairs' if defines['PPAIRS'] else ''}"
          f"{', scaled body only' if args.scaled_only else ''}; {registers} registers, {spills} bytes of spill stores")
    print()
    print("| loop (addresses) | instructions | " + " | ".join(KINDS) + " | other |")
    print("|---|---|" + "---|" * (len(KINDS) + 1))
    for start, end, body in loops(sass(cubin)):
        counts = kind_counts(body)
        print(f"| {start:#x}-{end:#x} | {sum(body.values())} | " + " | ".join(str(counts[k]) for k in KINDS)
              + f" | {counts['other']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
