"""Summarise training runs: loss curves of the model comparison in one plot, tokens/s for scaling.

Reads ``RUNS_DIR/<run>/metrics.jsonl`` (written by ``palimpsa train``) for every run directory, or a
``train_runs.json`` collected earlier, and writes to OUT_DIR:
  train_runs.json   every run's metric records (inputs of everything below),
  loss_curves.png   training loss against tokens for the comparison runs (``compare-*``),
  summary.md        final losses at equal tokens, and tokens/s of the scaling runs (``scale-*``).

    python scripts/summarize_train_runs.py RUNS_DIR_OR_JSON OUT_DIR [--skip-records 2]

tokens/s of a run = median over its logged intervals after the first ``--skip-records`` (start-up, kernel
compilation and autotuning are not steady state).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys


def load_runs(source: str) -> dict:
    if os.path.isfile(source):
        with open(source, encoding="utf-8") as handle:
            return json.load(handle)
    runs = {}
    for name in sorted(os.listdir(source)):
        path = os.path.join(source, name, "metrics.jsonl")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as handle:
                runs[name] = [json.loads(line) for line in handle if line.strip()]
    return runs


def loss_at_tokens(records, tokens):
    """Loss of the last record at or before ``tokens``."""
    eligible = [r for r in records if r["tokens"] <= tokens]
    return eligible[-1]["loss"] if eligible else None


def steady_tokens_per_s(records, skip):
    values = [r["tokens_per_s"] for r in records[skip:]]
    return statistics.median(values) if values else None


def write_atomic(path: str, text: str) -> None:
    temporary = path + ".tmp"
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(temporary, path)


def plot(runs: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for name, records in runs.items():
        axis.plot([r["tokens"] / 1e6 for r in records], [r["loss"] for r in records],
                  label=name.removeprefix("compare-"))
    axis.set_xlabel("training tokens (millions)")
    axis.set_ylabel("training loss (nats per byte)")
    axis.set_title("Byte-level LM on Python stdlib sources, same data and batches")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    temporary = path[:-4] + ".tmp.png"
    figure.savefig(temporary, dpi=130)
    plt.close(figure)
    os.replace(temporary, path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source")
    parser.add_argument("out_dir")
    parser.add_argument("--skip-records", type=int, default=2)
    args = parser.parse_args()
    runs = load_runs(args.source)
    if not runs:
        raise SystemExit(f"no runs found in {args.source}")
    os.makedirs(args.out_dir, exist_ok=True)
    write_atomic(os.path.join(args.out_dir, "train_runs.json"), json.dumps(runs, indent=1) + "\n")

    compare = {k: v for k, v in runs.items() if k.startswith("compare-") and v}
    scale = {k: v for k, v in runs.items() if k.startswith("scale-") and v}
    lines = ["# Training evidence", ""]
    if compare:
        common = min(records[-1]["tokens"] for records in compare.values())
        lines += [f"## Model comparison (loss at {common / 1e6:.2f}M tokens, the shortest run's end)", "",
                  "| run | steps done | tokens done (M) | loss at common tokens | final loss | steady tokens/s |",
                  "|---|---|---|---|---|---|"]
        for name, records in compare.items():
            tps = steady_tokens_per_s(records, args.skip_records)
            tps_text = f"{tps:,.0f}" if tps else "n/a"
            lines.append(f"| {name.removeprefix('compare-')} | {records[-1]['step']} | "
                         f"{records[-1]['tokens'] / 1e6:.2f} | {loss_at_tokens(records, common):.4f} | "
                         f"{records[-1]['loss']:.4f} | {tps_text} |")
        try:
            plot(compare, os.path.join(args.out_dir, "loss_curves.png"))
            lines += ["", "![loss curves](loss_curves.png)"]
        except ImportError:
            lines += ["", "(matplotlib missing here: no plot)"]
    if scale:
        lines += ["", "## Throughput (steady tokens/s, median over logged intervals after the first "
                  f"{args.skip_records})", "", "| run | steps | tokens/s | tokens/s per GPU |", "|---|---|---|---|"]
        for name, records in scale.items():
            gpus = int(name.rsplit("-", 1)[-1].rstrip("gpu")) if name.endswith("gpu") else 1
            tps = steady_tokens_per_s(records, args.skip_records)
            if tps is None:
                lines.append(f"| {name.removeprefix('scale-')} | {records[-1]['step']} | n/a | n/a |")
            else:
                lines.append(f"| {name.removeprefix('scale-')} | {records[-1]['step']} | {tps:,.0f} | "
                             f"{tps / gpus:,.0f} |")
    write_atomic(os.path.join(args.out_dir, "summary.md"), "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
