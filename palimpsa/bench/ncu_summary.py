"""One table from Nsight Compute's details pages (``scripts/gpu_ncu_ops.sh``): what each kernel of the op costs
per element-token, and what bounds it.

    python -m palimpsa.bench.ncu_summary results/bench/ncu_h200_0d01c06/ncu_760M-like.txt --shape 760M-like

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
_LAUNCH = re.compile(r"^  (\S.*?) \(([\d, ]+)\)x\(([\d, ]+)\), Context")
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
    """Every kernel launch of an ncu details page (``ncu --print-summary none`` output): a launch is its header
    line and every line up to the next header."""
    launches: List[Launch] = []
    body: List[str] = []
    for line in text.splitlines():
        head = _LAUNCH.match(line)
        if head:
            if launches:
                _finish(launches[-1], body)
            launches.append(Launch(head.group(1), f"({head.group(2)})", f"({head.group(3)})"))
            body = []
        elif launches:
            body.append(line)
    if launches:
        _finish(launches[-1], body)
    return launches


def _finish(launch: Launch, body: List[str]) -> None:
    for line in body:
        metric = _METRIC.match(line)
        if metric:
            name = metric.group(1).strip()
            if name not in launch.metrics:  # (a name printed twice keeps its first value)
                launch.metrics[name] = float(metric.group(3).replace(",", ""))
                launch.units[name] = metric.group(2) or ""
    flat = " ".join(" ".join(body).split())
    fp32 = _FP32.search(flat)
    if fp32:
        launch.fp32 = int(fp32.group(1)) + int(fp32.group(2))
    stalls = [(float(share), " ".join(what.split())) for _cycles, what, share in _STALL.findall(flat)]
    if stalls:
        share, what = max(stalls)
        what = re.sub(r"^(waiting )?(for |on )?", "", what).split(".")[0]
        launch.stall = f"{what} ({share:.0f} %)"


_TIME_MS = {"ns": 1e-6, "nsecond": 1e-6, "us": 1e-3, "usecond": 1e-3, "ms": 1.0, "msecond": 1.0, "s": 1e3,
            "second": 1e3}
_FREQUENCY_HZ = {"Ghz": 1e9, "GHz": 1e9, "cycle/nsecond": 1e9, "Mhz": 1e6, "MHz": 1e6, "cycle/usecond": 1e6}


def _metric(launch: Launch, name: str) -> float:
    if name not in launch.metrics:
        raise ValueError(f"{launch.name}: ncu printed no {name!r} (profile with scripts/gpu_ncu_ops.sh's sections)")
    return launch.metrics[name]


def _scaled(launch: Launch, name: str, scales: Dict[str, float]) -> float:
    value, unit = _metric(launch, name), launch.units.get(name, "")
    if unit not in scales:
        raise ValueError(f"{launch.name}: {name!r} in unknown unit {unit!r} (known: {sorted(scales)})")
    return value * scales[unit]


def duration_ms(launch: Launch) -> float:
    return _scaled(launch, "Duration", _TIME_MS)


def row(launch: Launch, elements: float) -> Dict[str, object]:
    """The table's numbers for one launch; ``elements`` = B T H K V."""
    instructions = _metric(launch, "Executed Instructions")  # warp-level
    sms = _metric(launch, "# SMs")
    clock_hz = _scaled(launch, "SM Frequency", _FREQUENCY_HZ)
    return {
        "kernel": launch.name, "grid": launch.grid, "block": launch.block, "ms": duration_ms(launch),
        "registers": int(_metric(launch, "Registers Per Thread")),
        "spill_requests": int(launch.metrics.get("Local Memory Spilling Requests", 0)),  # (absent: none)
        "occupancy": _metric(launch, "Achieved Occupancy"),
        "issue_rate": _metric(launch, "Issued Warp Per Scheduler"),
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
    elements = float(shape.elements)
    try:
        rows = [row(launch, elements) for launch in launches]
    except ValueError as error:
        parser.error(f"details: {error}")
    print(f"{args.shape}: {elements:.3e} element-tokens; floors (palimpsa bench ops) fwd {shape.floor_ms('fwd'):.3f} "
          f"ms, fwd+bwd {shape.floor_ms('fwd_bwd'):.3f} ms\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
