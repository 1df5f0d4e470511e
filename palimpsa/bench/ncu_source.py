"""Where a kernel's warps wait, by SASS opcode: a summary of Nsight Compute's source page.

    python -m palimpsa.bench.ncu_source results/bench/sass_stalls_h200_4644851_760M-like.csv.gz [--top 12]

The input is the CSV that ``KERNEL=... SOURCE=1 scripts/gpu_ncu_stalls.sh`` writes (``ncu --page source --csv``,
gzipped or not): a line naming the kernel, a header, then one row per SASS instruction with its warp-stall samples
per reason (``stall_wait``, ``stall_short_sb``, ...) and how often it executed.  Printed as markdown:

1. each stall reason's share of all samples (``selected`` is a warp issuing: the rest is waiting);
2. per opcode (``FFMA``, ``LDS``, ...; modifiers dropped): its share of the executed instructions and of the
   samples, and the reasons it waits on most;
3. the ``--top`` instructions by samples, with their SASS.

The samples are ncu's "all samples" columns; its "(Not Issued)" columns are a subset of them and are left out.
"""

from __future__ import annotations

import argparse
import collections
import csv
import gzip
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Sequence, Union

EXECUTED = "Instructions Executed"
SOURCE = "Source"
_STALL_PREFIX = "stall_"


@dataclass
class Instruction:
    """One SASS instruction of the source page: its text, executions (warp-level) and stall samples per reason."""
    source: str
    executed: float
    stalls: Dict[str, float] = field(default_factory=dict)

    @property
    def opcode(self) -> str:
        """The opcode without predicate or modifiers: ``@!P0 FFMA.FTZ R1, ...`` -> ``FFMA``."""
        words = self.source.split()
        if words and words[0].startswith("@"):
            words = words[1:]
        return words[0].split(".")[0] if words else "?"

    @property
    def samples(self) -> float:
        return sum(self.stalls.values())


def _number(text: str) -> float:
    text = text.strip().replace(",", "")
    if text in ("", "-"):
        return 0.0
    return float(text)


def read_source_page(path: Union[str, Path]) -> List[Instruction]:
    """The instructions of an ncu source-page CSV (``.csv`` or ``.csv.gz``).  Raises ValueError naming the file
    and what is missing when it is not one."""
    path = Path(path)
    raw = path.read_bytes()
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as err:
            raise ValueError(f"{path}: not a readable gzip file ({err})") from None
    rows = list(csv.reader(io.StringIO(raw.decode("utf-8", errors="replace"))))
    header_at = next((i for i, row in enumerate(rows[:5]) if SOURCE in row and EXECUTED in row), None)
    if header_at is None:
        raise ValueError(f"{path}: no header with {SOURCE!r} and {EXECUTED!r} in its first lines: not an ncu "
                         "source page (ncu --page source --csv)")
    header = rows[header_at]
    stall_columns = [(i, name[len(_STALL_PREFIX):]) for i, name in enumerate(header)
                     if name.startswith(_STALL_PREFIX) and "(Not Issued)" not in name]
    if not stall_columns:
        raise ValueError(f"{path}: the header has no stall_* columns (ncu's warp-state sampling was not collected)")
    at_source, at_executed = header.index(SOURCE), header.index(EXECUTED)
    out = []
    for line, row in enumerate(rows[header_at + 1:], start=header_at + 2):
        if not row or not "".join(row).strip():
            continue
        if len(row) < len(header):
            raise ValueError(f"{path}, line {line}: {len(row)} fields where the header has {len(header)}")
        try:
            out.append(Instruction(row[at_source].strip(), _number(row[at_executed]),
                                   {name: _number(row[i]) for i, name in stall_columns}))
        except ValueError:
            raise ValueError(f"{path}, line {line}: a number was expected in the executed or stall columns") from None
    if not out:
        raise ValueError(f"{path}: no instruction rows after the header")
    return out


def reason_shares(instructions: Sequence[Instruction]) -> Dict[str, float]:
    """Each stall reason's share of all samples, largest first."""
    totals: Dict[str, float] = collections.Counter()
    for ins in instructions:
        totals.update(ins.stalls)
    whole = sum(totals.values()) or 1.0
    return {name: value / whole for name, value in sorted(totals.items(), key=lambda kv: -kv[1]) if value > 0}


def by_opcode(instructions: Sequence[Instruction]) -> List[Dict[str, object]]:
    """Per opcode: its share of executed instructions and of samples, and its samples per reason; largest first."""
    executed: Dict[str, float] = collections.Counter()
    stalls: Dict[str, Dict[str, float]] = collections.defaultdict(collections.Counter)
    for ins in instructions:
        executed[ins.opcode] += ins.executed
        stalls[ins.opcode].update(ins.stalls)
    all_executed = sum(executed.values()) or 1.0
    all_samples = sum(sum(s.values()) for s in stalls.values()) or 1.0
    rows = [dict(opcode=op, executed=executed[op] / all_executed, samples=sum(stalls[op].values()) / all_samples,
                 stalls=dict(stalls[op])) for op in executed]
    return sorted(rows, key=lambda row: -row["samples"])


def _waits(stalls: Dict[str, float], count: int = 3) -> str:
    waiting = {name: value for name, value in stalls.items() if name != "selected" and value > 0}
    whole = sum(stalls.values()) or 1.0
    top = sorted(waiting.items(), key=lambda kv: -kv[1])[:count]
    return ", ".join(f"{name} {value / whole:.0%}" for name, value in top)


def report(instructions: Sequence[Instruction], top: int = 12, opcodes: int = 12) -> str:
    """The three markdown tables of the module's docstring."""
    lines = ["| stall reason | share of samples |", "|---|---|"]
    lines += [f"| {name} | {share:.1%} |" for name, share in reason_shares(instructions).items()]
    lines += ["", "| opcode | executed | samples | waits most on (share of its samples) |", "|---|---|---|---|"]
    for row in by_opcode(instructions)[:opcodes]:
        lines.append(f"| {row['opcode']} | {row['executed']:.1%} | {row['samples']:.1%} | {_waits(row['stalls'])} |")
    whole = sum(ins.samples for ins in instructions) or 1.0
    lines += ["", "| instruction | samples | executed | waits most on |", "|---|---|---|---|"]
    for ins in sorted(instructions, key=lambda i: -i.samples)[:top]:
        text = ins.source.replace("|", "\\|")
        lines.append(f"| `{text}` | {ins.samples / whole:.2%} | {ins.executed:.0f} | {_waits(ins.stalls)} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv", help="an ncu source-page CSV (.csv or .csv.gz), e.g. from gpu_ncu_stalls.sh SOURCE=1")
    parser.add_argument("--top", type=int, default=12, help="instructions to list by samples (default 12)")
    parser.add_argument("--opcodes", type=int, default=12, help="opcodes to list (default 12)")
    args = parser.parse_args(argv)
    if args.top < 0 or args.opcodes < 0:
        parser.error("--top and --opcodes must be >= 0")
    try:
        instructions = read_source_page(args.csv)
    except (OSError, ValueError) as err:
        parser.exit(2, f"error: {err}\n")
    print(report(instructions, args.top, args.opcodes))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
