"""Summaries of MQAR results: the table, the plots and the variance AUROC.

Selection rule: for each (model, seq_len, num_kv_pairs, d_model) and seed, the learning rate with the best
*validation* accuracy is kept; the table reports the mean and standard deviation over seeds of those runs'
*test* accuracy (the test set never chooses anything).
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path
from statistics import mean, stdev
from typing import Iterable, Optional

import torch

from palimpsa.io import atomic_write, atomic_write_text, read_json_lines
from palimpsa.mqar.models import METAPLASTIC_MODELS, parse_model_name

GROUP_KEYS = ("model", "seq_len", "num_kv_pairs", "d_model")


def variance_auroc(scores: torch.Tensor, positive: torch.Tensor) -> Optional[float]:
    """Area under the ROC curve of ``scores`` for detecting ``positive`` (e.g. a wrong answer).

    scores: [M] float; positive: [M] bool.  The Mann-Whitney statistic with ties counted half: the
    probability that a random positive scores higher than a random negative.  None when either class is
    empty (the AUROC is undefined, e.g. at 100% accuracy).
    """
    scores = torch.as_tensor(scores, dtype=torch.float64).flatten()
    positive = torch.as_tensor(positive, dtype=torch.bool).flatten()
    if scores.shape != positive.shape:
        raise ValueError(f"scores and positive must have the same length, got {scores.numel()} and {positive.numel()}")
    n_pos = int(positive.sum())
    n_neg = positive.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    # average ranks (1-based) with ties sharing the mean rank
    sorted_scores, order = torch.sort(scores)
    ranks = torch.empty_like(scores)
    unique, inverse, counts = torch.unique_consecutive(sorted_scores, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    mean_rank = ends - (counts.double() - 1) / 2
    ranks[order] = mean_rank[inverse]
    rank_sum = ranks[positive].sum().item()
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def load_results(path: str | os.PathLike) -> list[dict]:
    """The records of a results.jsonl file ([] if it does not exist)."""
    return read_json_lines(path)


def _mean_std(values: list[float]) -> tuple[float, float]:
    return mean(values), (stdev(values) if len(values) > 1 else 0.0)


# run settings that do not split a row: what is selected over (lr), averaged over (seed), or only shapes how
# long a run may take (its steps are reported)
NOT_GROUPING = ("lr", "seed", "time_limit_s", "max_steps")


def _group_key(record: dict) -> tuple:
    """The row a record belongs to: GROUP_KEYS plus every other setting of its config (so runs that differ in,
    e.g., heads or batch size never share a row)."""
    config = record.get("config", {})
    rest = tuple(sorted((k, json.dumps(v)) for k, v in config.items() if k not in NOT_GROUPING + GROUP_KEYS))
    return tuple(record[k] for k in GROUP_KEYS) + rest


def _state_shape(record: dict) -> str:
    """'H×K×V' of a recurrent model's per-layer state ('KV cache' for attention; '?' without a config)."""
    config = record.get("config")
    if not config:
        return "?"
    if record["model"] == "attention":
        return "KV cache"
    heads = config["num_heads"]
    key = config.get("head_k_dim") or config["d_model"] // heads
    value = config.get("head_v_dim") or 2 * key
    return f"{heads}×{key}×{value}"


def _value_dim(record: dict) -> Optional[int]:
    """V of a record's model (None without a config)."""
    config = record.get("config")
    if not config:
        return None
    key = config.get("head_k_dim") or config["d_model"] // config["num_heads"]
    return config.get("head_v_dim") or 2 * key


def _importance_groups(record: dict) -> Optional[int]:
    """G of a metaplastic model's record (records written before grouped importance existed were all G = V);
    None for the other models."""
    if "importance_groups" in record:
        return record["importance_groups"]
    base, groups = parse_model_name(record["model"])
    if base not in METAPLASTIC_MODELS:
        return None
    return groups or _value_dim(record)


def _format_groups(record: dict) -> str:
    """The table's G cell: "1", "4", "16 (= V)" for one gate per value channel, "—" without an importance ("?"
    for a metaplastic model whose record has no config)."""
    groups = record["importance_groups"]
    if groups is None:
        return "?" if parse_model_name(record["model"])[0] in METAPLASTIC_MODELS else "—"
    return f"{groups} (= V)" if groups == record["value_dim"] else str(groups)


def chosen_runs(results: Iterable[dict]) -> dict[tuple, list[dict]]:
    """{row key: the chosen run of each seed}: per row (see ``_group_key``) and seed, the run with the best
    validation accuracy (ties go to the smaller lr, then the earlier record), in seed order."""
    by_group_seed: dict = defaultdict(list)
    for r in results:
        by_group_seed[(_group_key(r), r["seed"])].append(r)
    groups: dict = defaultdict(list)
    for (group, _seed), runs in sorted(by_group_seed.items(), key=lambda kv: (str(kv[0][0]), kv[0][1])):
        chosen = max(runs, key=lambda r: (r["val_accuracy"] if r["val_accuracy"] is not None else -1.0, -r["lr"]))
        groups[group].append(chosen)
    return dict(groups)


def summarize(results: Iterable[dict]) -> list[dict]:
    """One row per (model, seq_len, num_kv_pairs, d_model, other settings): best lr per seed on validation,
    test mean/std over seeds.

    Row keys: the group keys, state_shape, importance_groups (G; None without an importance), value_dim, state_bytes,
    seeds, lrs (the chosen lr of each seed), test_mean, test_std,
    val_mean, steps_mean, auroc_mean / auroc_std (None unless some chosen run has a variance AUROC),
    auroc_n (how many seeds had one).
    """
    rows = []
    for chosen in chosen_runs(results).values():
        test_mean, test_std = _mean_std([r["test_accuracy"] for r in chosen])
        aurocs = [r["variance_auroc"] for r in chosen if r.get("variance_auroc") is not None]
        auroc_mean, auroc_std = _mean_std(aurocs) if aurocs else (None, None)
        rows.append({
            **{k: chosen[0][k] for k in GROUP_KEYS},
            "state_shape": _state_shape(chosen[0]),
            "importance_groups": _importance_groups(chosen[0]),
            "value_dim": _value_dim(chosen[0]),
            "state_bytes": chosen[0]["state_bytes"],
            "seeds": len(chosen),
            "lrs": [r["lr"] for r in chosen],
            "test_mean": test_mean,
            "test_std": test_std,
            "val_mean": mean(r["val_accuracy"] or 0.0 for r in chosen),
            "steps_mean": mean(r["steps"] for r in chosen),
            "auroc_mean": auroc_mean,
            "auroc_std": auroc_std,
            "auroc_n": len(aurocs),
            "device": ", ".join(sorted({r["device"] for r in chosen})),
        })
    model_order = {"palimpsa": 0, "notpalimpsa": 1, "meta_mamba2": 2, "mamba2": 3, "gated_deltanet": 4,
                   "attention": 5}
    rows.sort(key=lambda r: (r["seq_len"], r["num_kv_pairs"], r["d_model"],
                             model_order.get(parse_model_name(r["model"])[0], 99), -(r["importance_groups"] or 0),
                             r["model"], r["state_bytes"]))
    return rows


def format_table(rows: list[dict]) -> str:
    """The summary as a markdown table."""
    header = ("| model | L | kv pairs | d_model | state H×K×V | importance groups G | state bytes/layer | "
              "test accuracy (mean ± std) | seeds | chosen lr per seed | mean steps | variance AUROC (wrong answers) |")
    lines = [header, "|" + "---|" * 12]
    for r in rows:
        auroc = "—" if r["auroc_mean"] is None else f"{r['auroc_mean']:.3f} ± {r['auroc_std']:.3f} (n={r['auroc_n']})"
        lrs = ", ".join(f"{lr:g}" for lr in r["lrs"])
        lines.append(f"| {r['model']} | {r['seq_len']} | {r['num_kv_pairs']} | {r['d_model']} | {r['state_shape']} | "
                     f"{_format_groups(r)} | {r['state_bytes']:,} | "
                     f"{100 * r['test_mean']:.1f}% ± {100 * r['test_std']:.1f} | {r['seeds']} | {lrs} | "
                     f"{r['steps_mean']:.0f} | {auroc} |")
    return "\n".join(lines) + "\n"


def _series(rows: list[dict], x_key: str, split_key: str):
    """{split value: {(model, d_model or None): [(x, mean, std)]}} sorted by x."""
    out: dict = defaultdict(lambda: defaultdict(list))
    sizes = {(r["d_model"], r["state_shape"]) for r in rows if r["model"] != "attention"}
    for r in rows:
        size = r["model"] if r["model"] == "attention" else f"{r['model']} ({r['state_shape']})"
        label = (r["model"] if len(sizes) <= 1 else size) + ("" if len({r["d_model"] for r in rows}) == 1
                                                             else f" d={r['d_model']}")
        out[r[split_key] if split_key else None][label].append((r[x_key], r["test_mean"], r["test_std"]))
    for panel in out.values():
        for label in panel:
            panel[label].sort()
    return out


def plot_accuracy_vs_seq_len(rows: list[dict], path: str | os.PathLike) -> None:
    """PNG: test accuracy (mean ± std over seeds) against sequence length, one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = _series(rows, "seq_len", None)[None]
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, points in sorted(series.items()):
        xs, ys, es = zip(*points)
        ax.errorbar(xs, [100 * y for y in ys], yerr=[100 * e for e in es], marker="o", capsize=3, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length L")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(-2, 102)
    ax.set_title("MQAR: accuracy vs sequence length")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save_figure(fig, path)


def _state_entries(shape: str) -> Optional[int]:
    """H * K * V of an 'H×K×V' state shape (None for 'KV cache' or '?')."""
    parts = shape.split("×")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        return None
    return int(parts[0]) * int(parts[1]) * int(parts[2])


def plot_accuracy_vs_state_size(rows: list[dict], path: str | os.PathLike) -> None:
    """PNG: test accuracy against the recurrent state's shape H×K×V (log of its entries), one panel per (L, kv),
    one line per model.  Models of the same shape share an x position (moved slightly apart) whatever their
    bytes (the metaplastic ones store I beside mu: twice the bytes, given in the table); attention is a dotted
    reference line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = sorted({(r["seq_len"], r["num_kv_pairs"]) for r in rows})
    fig, axes = plt.subplots(1, len(settings), figsize=(5 * len(settings), 4), squeeze=False)
    for ax, (L, kv) in zip(axes[0], settings):
        panel: dict = defaultdict(list)
        ticks: dict = defaultdict(set)
        for r in rows:
            if (r["seq_len"], r["num_kv_pairs"]) != (L, kv):
                continue
            if r["model"] == "attention":
                ax.axhline(100 * r["test_mean"], linestyle=":", color="gray", label="attention (KV cache)")
                continue
            entries = _state_entries(r["state_shape"])
            if entries is not None:  # records without a config have no known shape
                panel[r["model"]].append((entries, r["test_mean"], r["test_std"]))
                ticks[entries].add(r["state_shape"])
        for i, (label, points) in enumerate(sorted(panel.items())):
            xs, ys, es = zip(*sorted(points))
            dodge = 2 ** (0.05 * (i - (len(panel) - 1) / 2))  # side by side, so the error bars stay apart
            ax.errorbar([x * dodge for x in xs], [100 * y for y in ys], yerr=[100 * e for e in es], marker="o",
                        capsize=3, label=label)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(ticks), ["\n".join(sorted(ticks[x])) for x in sorted(ticks)])
        ax.minorticks_off()
        if len(ticks) == 1:
            x = next(iter(ticks))
            ax.set_xlim(x / 2, x * 2)
        ax.set_xlabel("recurrent state per layer, H×K×V")
        ax.set_ylabel("test accuracy (%)")
        ax.set_ylim(-2, 102)
        ax.set_title(f"L={L}, {kv} key-value pairs")
        ax.grid(alpha=0.3)
        if panel or ax.lines:  # records without a config have no shape to plot
            ax.legend(fontsize=8)
    fig.tight_layout()
    _save_figure(fig, path)


def plot_learning_curves(results: Iterable[dict], path: str | os.PathLike) -> None:
    """PNG: validation accuracy against training step of every chosen run (the table's runs), one panel per
    (L, kv pairs, d_model, state shape), one colour per model and one line style per seed.  Shows whether runs
    were still learning when they stopped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: dict = defaultdict(list)
    for chosen in chosen_runs(results).values():
        for r in chosen:
            if r.get("history"):
                panels[(r["seq_len"], r["num_kv_pairs"], r["d_model"], _state_shape(r))].append(r)
    keys = sorted(panels)
    fig, axes = plt.subplots(1, max(len(keys), 1), figsize=(5.5 * max(len(keys), 1), 4), squeeze=False)
    models = sorted({r["model"] for runs in panels.values() for r in runs})
    colours = {m: f"C{i}" for i, m in enumerate(models)}
    styles = ["-", "--", ":", "-."]
    for ax, key in zip(axes[0], keys):
        seeds = sorted({r["seed"] for r in panels[key]})
        for r in sorted(panels[key], key=lambda r: (r["model"], r["seed"])):
            steps, _loss, val = zip(*r["history"])
            ax.plot(steps, [100 * v for v in val], color=colours[r["model"]],
                    linestyle=styles[seeds.index(r["seed"]) % len(styles)],
                    label=f"{r['model']} s{r['seed']} lr {r['lr']:g}")
        L, kv, d_model, shape = key
        ax.set_xlabel("training step")
        ax.set_ylabel("validation accuracy (%)")
        ax.set_ylim(-2, 102)
        ax.set_title(f"L={L}, {kv} pairs, d_model {d_model}, state {shape}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    _save_figure(fig, path)


def _save_figure(fig, path) -> None:
    import matplotlib.pyplot as plt

    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    finally:
        plt.close(fig)


def format_runs(results: list[dict]) -> str:
    """A markdown table of every run (one line each), marking the runs the summary table chose."""
    chosen = {id(r) for runs in chosen_runs(results).values() for r in runs}
    lines = ["| model | L | kv pairs | d_model | state H×K×V | lr | seed | steps | best step | val accuracy | "
             "test accuracy | chosen |", "|" + "---|" * 12]
    for r in sorted(results, key=lambda r: (r["seq_len"], r["num_kv_pairs"], r["d_model"], _state_shape(r),
                                            r["model"], r["seed"], r["lr"])):
        val = "—" if r["val_accuracy"] is None else f"{100 * r['val_accuracy']:.1f}%"
        lines.append(f"| {r['model']} | {r['seq_len']} | {r['num_kv_pairs']} | {r['d_model']} | {_state_shape(r)} | "
                     f"{r['lr']:g} | {r['seed']} | {r['steps']} | {r.get('best_step', '—')} | {val} | "
                     f"{100 * r['test_accuracy']:.1f}% | {'yes' if id(r) in chosen else ''} |")
    return "\n".join(lines) + "\n"


def format_unfinished(records: list[dict]) -> str:
    """A markdown table of runs stopped by a sweep's time budget (their schedule did not finish)."""
    lines = ["| model | L | kv pairs | d_model | state H×K×V | lr | seed | steps done / planned | "
             "val accuracy | test accuracy |", "|" + "---|" * 10]
    for r in sorted(records, key=lambda r: (r["seq_len"], r["model"], r["lr"], r["seed"])):
        lines.append(f"| {r['model']} | {r['seq_len']} | {r['num_kv_pairs']} | {r['d_model']} | {_state_shape(r)} | "
                     f"{r['lr']:g} | {r['seed']} | {r['steps']} / {r['planned_steps']} | "
                     f"{100 * (r['val_accuracy'] or 0):.1f}% | {100 * r['test_accuracy']:.1f}% |")
    return "\n".join(lines) + "\n"


def write_report(results_path: str | os.PathLike, out_dir: str | os.PathLike) -> tuple[str, list[Path]]:
    """Read results.jsonl, write summary.md and the plots (accuracy vs state shape, the chosen runs' validation
    accuracy vs step, and accuracy vs sequence length when there are several lengths) into out_dir; return
    (table, written paths).

    Runs listed in an ``unfinished.jsonl`` beside results.jsonl (stopped by a sweep's time budget, and not
    finished since) get their own table in summary.md and never enter the main table or the plots.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = load_results(results_path)
    rows = summarize(results)
    table = format_table(rows)
    finished = {r.get("run_id") for r in results}
    # a run stopped by a time budget and finished by a later call is no longer unfinished
    latest = {}  # a run stopped by several budgets: its last stop
    for r in load_results(Path(results_path).with_name("unfinished.jsonl")):
        latest[r.get("run_id", id(r))] = r
    unfinished = [r for key, r in latest.items() if key not in finished]
    written = []
    if rows:
        summary = out_dir / "summary.md"
        extra = ("" if not unfinished else "\n## Runs stopped by the time budget (not in the table above)\n\n"
                 "Their learning-rate schedule did not finish; shown for what they reached.\n\n"
                 + format_unfinished(unfinished))
        atomic_write_text(summary, "# MQAR results\n\nBest learning rate per model, setting and seed chosen on "
                          "validation accuracy; test accuracy mean ± std over seeds.\n\n" + table + extra
                          + "\n## Every run\n\n" + format_runs(results))
        written.append(summary)
        if len({r["seq_len"] for r in rows}) > 1:  # one length would be a single point
            plot_accuracy_vs_seq_len(rows, out_dir / "accuracy_vs_seq_len.png")
            written.append(out_dir / "accuracy_vs_seq_len.png")
        plot_accuracy_vs_state_size(rows, out_dir / "accuracy_vs_state_size.png")
        plot_learning_curves(results, out_dir / "accuracy_vs_step.png")
        written += [out_dir / "accuracy_vs_state_size.png", out_dir / "accuracy_vs_step.png"]
    return table, written
