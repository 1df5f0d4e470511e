"""Summarise the importance-groups LM comparison (scripts/lm_grouped_cpu.sh): tables and loss curves.

Reads ``RUNS_DIR/<name>-seed<S>/`` (``metrics.jsonl`` with ``val_loss`` records, and the exported ``model/config.json``)
or a ``runs.json`` collected earlier, and writes to OUT_DIR:
  runs.json         per run: model label, seed, parameters, recurrent state size and every metric record,
  summary.md        final validation loss / bits per byte / perplexity per run and per model (mean over seeds),
                    tokens seen, wall time, tokens/s, parameters and state size,
  loss_curves.png   validation loss (held-out packs) against tokens, and training loss minus G = V's (same seed).

    python scripts/summarize_lm_grouped.py RUNS_DIR_OR_JSON OUT_DIR

Losses are in nats per byte (byte-level tokenizer); bits per byte = loss / ln 2; perplexity = exp(loss) per byte.
State size per layer and sequence (float32, as ``palimpsa.mqar.recurrent_state_bytes``): the mean, H * K * V
entries, plus the importance, H * K * G (G = V for the paper's model, none without metaplasticity).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys

from palimpsa.io import atomic_write_text

STATE_BYTES_PER_ELEMENT = 4
MODEL_ORDER = ("G = V", "G = 1", "NotPalimpsa")
RUN_NAME = re.compile(r"^(?P<model>.+)-seed(?P<seed>\d+)$")


def model_label(config: dict) -> str:
    """'NotPalimpsa', 'G = V' (importance_groups unset or V) or 'G = <n>'."""
    if not config.get("metaplasticity", True):
        return "NotPalimpsa"
    value_dim = round(config["head_dim"] * config.get("expand_v", 1))
    groups = config.get("importance_groups") or value_dim
    return "G = V" if groups == value_dim else f"G = {groups}"


def describe_model(config: dict) -> dict:
    """Parameters (built on the meta device: no memory) and the recurrent state of one run's exported config."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    import palimpsa.models  # noqa: F401  (registers the model types)

    values = dict(config)
    model_type = values.pop("model_type")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **values))
    heads, key_dim = config["num_heads"], config["head_dim"]
    value_dim = round(key_dim * config.get("expand_v", 1))
    groups = (config.get("importance_groups") or value_dim) if config.get("metaplasticity", True) else 0
    per_layer = heads * key_dim * (value_dim + groups) * STATE_BYTES_PER_ELEMENT
    return {"label": model_label(config), "params": sum(p.numel() for p in model.parameters()),
            "state_bytes_per_layer": per_layer, "state_bytes": per_layer * config["num_hidden_layers"],
            "state_shape": f"{heads}×{key_dim}×({value_dim} + {groups})", "importance_groups": groups,
            "layers": config["num_hidden_layers"], "d_model": config["hidden_size"]}


def load_runs(source: str) -> dict:
    if os.path.isfile(source):
        with open(source, encoding="utf-8") as handle:
            return json.load(handle)
    runs = {}
    for name in sorted(os.listdir(source)):
        metrics = os.path.join(source, name, "metrics.jsonl")
        config = os.path.join(source, name, "model", "config.json")
        match = RUN_NAME.match(name)
        if not (match and os.path.isfile(metrics)):
            continue
        if not os.path.isfile(config):
            raise SystemExit(f"{config} is missing: the run {name} did not finish (no exported model)")
        with open(config, encoding="utf-8") as handle:
            run = describe_model(json.load(handle))
        with open(metrics, encoding="utf-8") as handle:
            run["records"] = [json.loads(line) for line in handle if line.strip()]
        run["seed"] = int(match["seed"])
        runs[name] = run
    return runs


def final(run: dict) -> dict:
    """The run's last record with a validation loss, and its wall time and steady tokens/s."""
    evaluated = [r for r in run["records"] if r.get("val_loss") is not None]
    if not evaluated:
        raise SystemExit(f"a run of {run['label']} (seed {run['seed']}) has no val_loss record")
    last = evaluated[-1]
    speeds = [r["tokens_per_s"] for r in run["records"][1:]]  # the first interval includes start-up
    return {"step": last["step"], "tokens": last["tokens"], "val_loss": last["val_loss"],
            "train_loss": run["records"][-1]["loss"], "wall_s": run["records"][-1]["elapsed_s"],
            "tokens_per_s": statistics.median(speeds) if speeds else None}


def ordered(labels) -> list:
    return sorted(labels, key=lambda label: (MODEL_ORDER.index(label) if label in MODEL_ORDER else 1, label))


def summary_lines(runs: dict) -> list:
    by_model = {}
    for run in runs.values():
        by_model.setdefault(run["label"], []).append(run)
    lines = ["# Importance groups on a small byte-level LM (CPU)", "",
             "Validation: mean next-token loss on the held-out packs at the last step, nats per byte; "
             "bpb = loss / ln 2; ppl = exp(loss) (per byte).", "",
             "| model | seed | steps | tokens (M) | val loss | val bpb | val ppl | last train loss | wall time (s) "
             "| train tokens/s | params | state per layer H×K×(V + G) | state bytes (all layers) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for label in ordered(by_model):
        for run in sorted(by_model[label], key=lambda r: r["seed"]):
            f = final(run)
            speed = f"{f['tokens_per_s']:,.0f}" if f["tokens_per_s"] else "n/a"
            lines.append(f"| {label} | {run['seed']} | {f['step']} | {f['tokens'] / 1e6:.2f} | {f['val_loss']:.4f} | "
                         f"{f['val_loss'] / math.log(2):.4f} | {math.exp(f['val_loss']):.4f} | "
                         f"{f['train_loss']:.4f} | {f['wall_s']:.0f} | {speed} | {run['params']:,} | "
                         f"{run['state_shape']} | {run['state_bytes']:,} |")
    reference = by_model.get("G = V")
    reference_mean = statistics.mean(final(r)["val_loss"] for r in reference) if reference else None
    lines += ["", "Mean over seeds (± half the spread between the best and the worst seed):", "",
              "| model | seeds | val loss | val bpb | val ppl | val loss - G = V's | mean wall time (s) |",
              "|---|---|---|---|---|---|---|"]
    for label in ordered(by_model):
        losses = [final(r)["val_loss"] for r in by_model[label]]
        mean, half = statistics.mean(losses), (max(losses) - min(losses)) / 2
        delta = f"{mean - reference_mean:+.4f}" if reference_mean is not None else "n/a"
        wall = statistics.mean(final(r)["wall_s"] for r in by_model[label])
        lines.append(f"| {label} | {len(losses)} | {mean:.4f} ± {half:.4f} | {mean / math.log(2):.4f} | "
                     f"{math.exp(mean):.4f} | {delta} | {wall:.0f} |")
    return lines


def moving_average(values: list, window: int) -> list:
    """Mean of each value and the ``window - 1`` before it (fewer at the start)."""
    return [statistics.mean(values[max(0, i - window + 1):i + 1]) for i in range(len(values))]


def plot(runs: dict, path: str, window: int = 5) -> None:
    """Left: validation loss against tokens, every run.  Right: training loss minus that of G = V with the same
    seed at the same step (every model sees the same batches, so the batch-to-batch swings cancel), as a moving
    average over ``window`` logged records."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = ordered({run["label"] for run in runs.values()})
    colours = {label: f"C{i}" for i, label in enumerate(labels)}
    styles = ["-", "--", ":", "-."]
    reference = {run["seed"]: {r["step"]: r["loss"] for r in run["records"]}
                 for run in runs.values() if run["label"] == "G = V"}
    figure, (val_axis, diff_axis) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, run in sorted(runs.items(), key=lambda item: (labels.index(item[1]["label"]), item[1]["seed"])):
        evaluated = [r for r in run["records"] if r.get("val_loss") is not None]
        style = dict(color=colours[run["label"]], linestyle=styles[run["seed"] % len(styles)],
                     label=f"{run['label']}, seed {run['seed']}")
        val_axis.plot([r["tokens"] / 1e6 for r in evaluated], [r["val_loss"] for r in evaluated], marker=".",
                      **style)
        same_seed = reference.get(run["seed"], {})
        paired = [r for r in run["records"] if r["step"] in same_seed]
        if paired:
            diffs = moving_average([r["loss"] - same_seed[r["step"]] for r in paired], window)
            diff_axis.plot([r["tokens"] / 1e6 for r in paired], diffs, linewidth=1, **style)
    val_axis.set_title("validation loss (held-out packs)")
    val_axis.set_ylabel("nats per byte")
    diff_axis.set_title("training loss minus G = V's (same seed, same batches)")
    diff_axis.set_ylabel(f"nats per byte (moving mean of {window} records)")
    diff_axis.axhline(0, color="black", linewidth=0.6)
    for axis in (val_axis, diff_axis):
        axis.set_xlabel("training tokens (millions)")
        axis.grid(alpha=0.3)
    val_axis.legend(fontsize=8)
    figure.suptitle("Palimpsa importance groups, byte-level LM on Python stdlib sources (CPU), same tokens")
    figure.tight_layout()
    temporary = f"{path[:-4]}.tmp{os.getpid()}.png"
    figure.savefig(temporary, dpi=120)
    plt.close(figure)
    os.replace(temporary, path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="the runs folder of scripts/lm_grouped_cpu.sh, or a runs.json")
    parser.add_argument("out_dir")
    args = parser.parse_args()
    runs = load_runs(args.source)
    if not runs:
        raise SystemExit(f"no runs (<model>-seed<S>/metrics.jsonl) found in {args.source}")
    os.makedirs(args.out_dir, exist_ok=True)
    atomic_write_text(os.path.join(args.out_dir, "runs.json"), json.dumps(runs, indent=1) + "\n")
    lines = summary_lines(runs)
    try:
        plot(runs, os.path.join(args.out_dir, "loss_curves.png"))
        lines += ["", "![loss curves](loss_curves.png)"]
    except ImportError:
        lines += ["", "(matplotlib missing here: no plot)"]
    atomic_write_text(os.path.join(args.out_dir, "summary.md"), "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
