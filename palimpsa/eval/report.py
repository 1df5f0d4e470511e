"""Evaluation reports: the harness's results as JSON and markdown, with a paper-style summary row."""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Tuple

from palimpsa.eval.harness import PAPER_METRICS


# numeric entries of a task's results that are counts, not metrics
NOT_METRICS = ("sample_len",)


def _metric(task_results: Dict[str, Any], metric: str):
    """The value of ``metric`` whatever the harness's filter suffix (``acc,none``)."""
    for key, value in task_results.items():
        if key.partition(",")[0] == metric and not isinstance(value, str):
            return value
    return None


def summary_rows(results: Dict[str, Any]) -> List[Tuple[str, str, float]]:
    """(task, metric, value) for each task: the paper's metric where known, else every numeric metric."""
    rows = []
    for task, task_results in results["results"].items():
        metrics = PAPER_METRICS.get(task)
        if metrics is None:
            metrics = sorted({k.partition(",")[0] for k, v in task_results.items()
                              if isinstance(v, (int, float)) and "_stderr" not in k and k not in NOT_METRICS})
        for metric in metrics:
            value = _metric(task_results, metric)
            if value is not None:
                rows.append((task, metric, float(value)))
    return rows


def markdown_summary(results: Dict[str, Any]) -> str:
    """A markdown table: task | metric | value."""
    lines = ["| task | metric | value |", "|---|---|---|"]
    lines += [f"| {task} | {metric} | {value:.4f} |" for task, metric, value in summary_rows(results)]
    return "\n".join(lines) + "\n"


def _json_default(value):
    try:
        return value.item()  # numpy / torch scalars
    except AttributeError:
        return str(value)


def write_report(results: Dict[str, Any], out_dir: str, name: str = "lm_eval") -> Dict[str, str]:
    """Write ``<name>.json`` (the harness's results) and ``<name>.md`` (summary + the harness's table),
    each atomically; return their paths."""
    os.makedirs(out_dir, exist_ok=True)
    kept = {k: results[k] for k in ("results", "versions", "n-shot", "higher_is_better", "n-samples", "config",
                                    "configs", "group_subtasks") if k in results}
    paths = {"json": os.path.join(out_dir, f"{name}.json"), "markdown": os.path.join(out_dir, f"{name}.md")}
    table = ""
    try:
        from lm_eval.utils import make_table

        table = "\n## lm-eval table\n\n" + make_table(results) + "\n"
    except ImportError:
        pass
    texts = {"json": json.dumps(kept, indent=2, default=_json_default) + "\n",
             "markdown": "# Evaluation\n\n" + markdown_summary(results) + table}
    for kind, path in paths.items():
        temporary = f"{path}.tmp.{os.getpid()}"
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.write(texts[kind])
        os.replace(temporary, path)
    return paths
