"""One table from Nsight Compute's details pages (``scripts/gpu_ncu_ops.sh``): what each kernel of the op costs
per element-token, and what bounds it.

    python -m palimpsa.bench.ncu_summary results/bench/ncu_h200_a213077/ncu_760M-like.txt --shape 760M-like

For every kernel launch in the file: its duration, registers, spills (local-memory requests), achieved occupancy,
the schedulers' issue rate (instructions per scheduler and cycle; 1.0 is the most an SM's 4 schedulers can
issue), the thread-instructions and FP32 thread-instructions per element-token (B T H K V of the shape), the
time the kernel would take issuing every cycle ("issue floor": its instructions at one per scheduler per
cycle, at the clock ncu measured) and the largest stall ncu names.  An element-token is one (k, v) state element
at one token: the unit of the op's floors (:meth:`palimpsa.bench.ops.Shape.floor_ms`).
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from palimpsa.bench.ops import shape_by_name

SCHEDULERS_PER_SM = 4
_LAUNCH = re.compile(r"^  (\w+) \(([\d, ]+)\)x\(([\d, ]+)\), Context")
_METRIC = re.compile(r"^    (\S.*?)\s{2,}(\S+(?:/\S+)?)?\s+([\d,\.]+)\s*$")
_FP32 = re.compile(r"executes (\d+) fused and (\d+) non-fused FP32 instructions")
_STALL = re.compile(r"spends ([\d\.]+) cycles being stalled (.*?) This stall type represents about ([\d\.]+)%",
                    re.S)


@dataclass
class Launch:
    """One kernel launch's metrics, as ncu printed them (units dropped, numbers as floats)."""
    name: str
    grid: str
    block: str
    metrics: Dict[str, float] = field(default_factory=dict)
    units: Dict[str, str] = field(default_factory=dict)
    fp32: Optional[int] = None
    stall: str = ""


def parse(text: str) -> List[Launch]:
    """Every kernel launch of an ncu details page (``ncu --print-summary none`` output)."""
    launches: List[Launch] = []
    body: List[str] = []
    for line in text.splitlines() + [""]:
        head = _LAUNCH.match(line)
        if head or not line.startswith("  "):
            if launches and body:
                _finish(launches[-1], "\n".join(body))
                body = []
        if head:
            launches.append(Launch(head.group(1), f"({head.group(2)})", f"({head.group(3)})"))
            continue
        if launches:
            body.append(line)
            metric = _METRIC.match(line)
            if metric and metric.group(1) not in launches[-1].metrics:
                name = metric.group(1).strip()
                launches[-1].metrics[name] = float(metric.group(3).replace(",", ""))
                launches[-1].units[name] = metric.group(2) or ""
    return launches


def _finish(launch: Launch, body: str) -> None:
    flat = " ".join(body.split())
    fp32 = _FP32.search(flat)
    if fp32:
        launch.fp32 = int(fp32.group(1)) + int(fp32.group(2))
    stalls = [(float(share), " ".join(what.split())) for _cycles, what, share in _STALL.findall(flat)]
    if stalls:
        share, what = max(stalls)
        what = re.sub(r"^(waiting )?(for |on )?", "", what).split(".")[0]
        launch.stall = f"{what} ({share:.0f} %)"


def duration_ms(launch: Launch) -> float:
    unit = launch.units.get("Duration", "ms")
    scale = {"ms": 1.0, "us": 1e-3, "usecond": 1e-3, "msecond": 1.0, "s": 1e3}.get(unit, 1.0)
    return launch.metrics["Duration"] * scale


def row(launch: Launch, elements: float) -> Dict[str, object]:
    """The table's numbers for one launch; ``elements`` = B T H K V."""
    m = launch.metrics
    instructions = m.get("Executed Instructions", 0.0)  # warp-level
    sms = m.get("# SMs", 132.0)
    clock_hz = m.get("SM Frequency", 1.98) * 1e9
    return {
        "kernel": launch.name, "grid": launch.grid, "block": launch.block, "ms": duration_ms(launch),
        "registers": int(m.get("Registers Per Thread", 0)),
        "spill_requests": int(m.get("Local Memory Spilling Requests", 0)),
        "occupancy": m.get("Achieved Occupancy", 0.0),
        "issue_rate": m.get("Issued Warp Per Scheduler", 0.0),
        "instr_per_element": 32 * instructions / elements,
        "fp32_per_element": None if launch.fp32 is None else 32 * launch.fp32 / elements,
        "issue_floor_ms": 1e3 * instructions / (SCHEDULERS_PER_SM * sms * clock_hz),
        "stall": launch.stall,
    }


def table(rows: List[Dict[str, object]]) -> str:
    lines = ["| kernel | grid x block | ms | registers | spill requests | occupancy | issue rate | instructions "
             "per element-token | FP32 per element-token | issue floor ms | largest stall |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        fp32 = "" if r["fp32_per_element"] is None else f"{r['fp32_per_element']:.1f}"
        lines.append(f"| `{r['kernel']}` | {r['grid']}x{r['block']} | {r['ms']:.3f} | {r['registers']} | "
                     f"{r['spill_requests']:,} | {r['occupancy']:.1f} % | {r['issue_rate']:.2f} | "
                     f"{r['instr_per_element']:.1f} | {fp32} | {r['issue_floor_ms']:.3f} | {r['stall']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("details", type=Path, help="an ncu details page (scripts/gpu_ncu_ops.sh's ncu_<shape>.txt)")
    parser.add_argument("--shape", required=True, help="the benchmark shape it profiled (palimpsa bench ops)")
    args = parser.parse_args(argv)
    if not args.details.is_file():
        parser.error(f"details: no such file {args.details}")
    try:
        shape = shape_by_name(args.shape)
    except (KeyError, ValueError) as error:
        parser.error(f"--shape: {error}")
    launches = parse(args.details.read_text())
    if not launches:
        parser.error(f"details: no kernel launch found in {args.details} (is it ncu's details page?)")
    elements = float(shape.B * shape.T * shape.H * shape.K * shape.V)
    print(f"{args.shape}: {elements:.3e} element-tokens; floors (palimpsa bench ops) fwd {shape.floor_ms('fwd'):.3f} "
          f"ms, fwd+bwd {shape.floor_ms('fwd_bwd'):.3f} ms\n")
    print(table([row(launch, elements) for launch in launches]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
