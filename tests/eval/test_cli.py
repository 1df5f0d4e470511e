"""``palimpsa eval`` end to end: a saved model, a local task, loss by position; files written."""

from __future__ import annotations

import json

import pytest

from palimpsa.cli import main
from tests.eval.helpers import TASKS_DIR, tiny_model_and_tokenizer


def test_eval_cli_writes_results_and_plot(tmp_path, capsys):
    pytest.importorskip("lm_eval")
    pytest.importorskip("accelerate")
    model, tokenizer = tiny_model_and_tokenizer()
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    docs = tmp_path / "long.txt"
    docs.write_text("a long document " * 8)
    out = tmp_path / "eval"
    code = main(["eval", str(tmp_path / "model"), "--tasks", "palimpsa_tiny_choice", "--include-path", TASKS_DIR,
                 "--limit", "4", "--device", "cpu", "--out", str(out), "--position-loss-data", str(docs),
                 "--position-length", "64"])
    assert code == 0
    results = json.loads((out / "lm_eval.json").read_text())
    assert results["n-samples"]["palimpsa_tiny_choice"]["effective"] == 4
    assert "| palimpsa_tiny_choice | acc |" in (out / "lm_eval.md").read_text()
    position = json.loads((out / "position_loss.json").read_text())
    assert position["num_documents"] == 1 and len(position["loss"]) == 63
    assert (out / "position_loss.png").stat().st_size > 0
    assert "palimpsa_tiny_choice" in capsys.readouterr().out


def test_eval_cli_rejects_a_directory_without_a_model(tmp_path, capsys):
    assert main(["eval", str(tmp_path), "--tasks", "wikitext"]) == 2
    assert "neither a Hugging Face model directory" in capsys.readouterr().err
