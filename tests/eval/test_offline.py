"""``palimpsa eval`` without network: the shipped tasks by default, the paper's suite refused in one line."""

from __future__ import annotations

import json
import time

import pytest

from palimpsa.cli import main
from palimpsa.eval import harness
from tests.eval.helpers import tiny_model_and_tokenizer


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("run") / "model"
    model, tokenizer = tiny_model_and_tokenizer()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_expand_tasks():
    assert harness.expand_tasks(["local"]) == list(harness.LOCAL_TASKS)
    assert harness.expand_tasks(["paper", "piqa", "local"]) == list(harness.PAPER_TASKS) + list(harness.LOCAL_TASKS)
    assert harness.expand_tasks(["none"]) == []
    with pytest.raises(ValueError, match="none"):
        harness.expand_tasks(["none", "piqa"])


def test_default_tasks_run_offline_and_write_beside_the_model(saved_model, monkeypatch, capsys):
    pytest.importorskip("lm_eval")
    pytest.importorskip("accelerate")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(harness, "hub_reachable", lambda timeout=3.0: pytest.fail("the hub was asked"))
    assert main(["eval", str(saved_model), "--limit", "2", "--device", "cpu"]) == 0
    results = json.loads((saved_model / "eval" / "lm_eval.json").read_text())
    assert set(results["results"]) == set(harness.LOCAL_TASKS)
    printed = capsys.readouterr().out
    assert "| palimpsa_tiny_rolling | bits_per_byte |" in printed and "sample_len" not in printed


def test_tasks_none_skips_the_harness(saved_model, tmp_path, monkeypatch):
    monkeypatch.setattr(harness, "evaluate_with_harness", lambda *a, **k: pytest.fail("the harness ran"))
    docs = tmp_path / "long.txt"
    docs.write_text("a long document " * 8)
    out = tmp_path / "out"
    assert main(["eval", str(saved_model), "--tasks", "none", "--position-loss-data", str(docs),
                 "--position-length", "32", "--out", str(out), "--device", "cpu"]) == 0
    assert (out / "position_loss.json").exists() and not (out / "lm_eval.json").exists()
    assert main(["eval", str(saved_model), "--tasks", "none"]) == 2


def test_paper_tasks_without_network_fail_fast_in_one_line(saved_model, monkeypatch, capsys):
    pytest.importorskip("lm_eval")
    pytest.importorskip("accelerate")
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(harness, "hub_reachable", lambda timeout=3.0: False)
    started = time.perf_counter()
    assert main(["eval", str(saved_model), "--tasks", "paper", "--device", "cpu"]) == 2
    assert time.perf_counter() - started < 10  # no indexing of the harness's own tasks, no download retries
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("palimpsa eval: error: the tasks ['wikitext',")
    assert "--tasks local" in err and "HF_DATASETS_OFFLINE=1" in err


def test_hub_reachable_is_quick_and_false_for_an_unreachable_endpoint(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    started = time.perf_counter()
    assert harness.hub_reachable(timeout=2.0) is False
    assert time.perf_counter() - started < 3


def test_uncached_data_in_offline_mode_says_what_to_do(monkeypatch):
    lm_eval = pytest.importorskip("lm_eval")
    pytest.importorskip("accelerate")

    def offline(**kwargs):
        raise ConnectionError("Couldn't reach 'baber/piqa' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(lm_eval, "simple_evaluate", offline)
    model, tokenizer = tiny_model_and_tokenizer()
    with pytest.raises(harness.HubUnreachableError, match="baber/piqa.*--tasks local"):
        harness.evaluate_with_harness(model, tokenizer)
