"""scripts/summarize_lm_grouped.py: labels, parameters, state sizes and the per-model means of a runs folder."""

from __future__ import annotations

import importlib.util
import json
import math
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_script():
    spec = importlib.util.spec_from_file_location("summarize_lm_grouped",
                                                  os.path.join(ROOT, "scripts", "summarize_lm_grouped.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write_run(runs, name, overrides, val_losses):
    run = runs / name
    (run / "model").mkdir(parents=True)
    config = {"model_type": "palimpsa", "vocab_size": 320, "hidden_size": 32, "num_hidden_layers": 2,
              "num_heads": 2, "head_dim": 8, "hidden_ratio": 2, "metaplasticity": True, **overrides}
    (run / "model" / "config.json").write_text(json.dumps(config))
    records = [{"step": 10 * (i + 1), "loss": 2.0 - 0.1 * i, "tokens": 1000 * (i + 1), "tokens_per_s": 500.0 + i,
                "elapsed_s": 2.0 * (i + 1), "val_loss": value} for i, value in enumerate(val_losses)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_summary_of_a_runs_folder(tmp_path, monkeypatch):
    script = _load_script()
    runs = tmp_path / "runs"
    _write_run(runs, "palimpsa-gv-seed0", {}, [2.0, 1.5])
    _write_run(runs, "palimpsa-gv-seed1", {}, [2.0, 1.7])
    _write_run(runs, "palimpsa-g1-seed0", {"importance_groups": 1}, [2.0, 1.4])
    _write_run(runs, "notpalimpsa-seed0", {"metaplasticity": False}, [2.0, 1.8])
    (runs / "notes-without-seed").mkdir()  # not a run: skipped

    loaded = script.load_runs(str(runs))
    assert sorted(loaded) == ["notpalimpsa-seed0", "palimpsa-g1-seed0", "palimpsa-gv-seed0", "palimpsa-gv-seed1"]
    labels = {name: run["label"] for name, run in loaded.items()}
    assert labels["palimpsa-gv-seed0"] == "G = V" and labels["palimpsa-g1-seed0"] == "G = 1"
    assert labels["notpalimpsa-seed0"] == "NotPalimpsa"
    # state per layer H * K * (V + G) float32: G = V = 8, G = 1, none without metaplasticity
    assert loaded["palimpsa-gv-seed0"]["state_bytes"] == 2 * (2 * 8 * 16 * 4)
    assert loaded["palimpsa-g1-seed0"]["state_bytes"] == 2 * (2 * 8 * 9 * 4)
    assert loaded["notpalimpsa-seed0"]["state_bytes"] == 2 * (2 * 8 * 8 * 4)
    assert loaded["palimpsa-gv-seed0"]["params"] > loaded["palimpsa-g1-seed0"]["params"] \
        > loaded["notpalimpsa-seed0"]["params"] > 0

    lines = script.summary_lines(loaded)
    means = {line.split("|")[1].strip(): line for line in lines if line.startswith("| ") and "±" in line}
    assert means["G = V"].split("|")[3].strip() == "1.6000 ± 0.1000"
    assert means["G = 1"].split("|")[6].strip() == "-0.2000"
    assert means["NotPalimpsa"].split("|")[5].strip() == f"{math.exp(1.8):.4f}"

    out = tmp_path / "summary"
    monkeypatch.setattr("sys.argv", ["summarize_lm_grouped.py", str(runs), str(out)])
    assert script.main() == 0
    assert (out / "summary.md").read_text().count("| G = V | ") == 3
    again = tmp_path / "again"  # the runs.json it wrote is enough to summarise again
    monkeypatch.setattr("sys.argv", ["summarize_lm_grouped.py", str(out / "runs.json"), str(again)])
    assert script.main() == 0
    assert (again / "summary.md").read_text() == (out / "summary.md").read_text()


def test_an_unfinished_run_is_an_error(tmp_path):
    script = _load_script()
    _write_run(tmp_path, "palimpsa-gv-seed0", {}, [2.0])
    os.remove(tmp_path / "palimpsa-gv-seed0" / "model" / "config.json")
    with pytest.raises(SystemExit, match="did not finish"):
        script.load_runs(str(tmp_path))
