"""lm-eval through its Python API on two local tasks, checked against the model's own log-likelihoods."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")

from palimpsa.eval.harness import PAPER_TASKS, evaluate_with_harness  # noqa: E402
from palimpsa.eval.report import summary_rows, write_report  # noqa: E402
from tests.eval.helpers import TASKS_DIR, continuation_loglik, tiny_model_and_tokenizer  # noqa: E402


def _rows(name):
    with open(os.path.join(TASKS_DIR, name), encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


@pytest.fixture(scope="module")
def evaluated():
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    model, tokenizer = tiny_model_and_tokenizer()
    results = evaluate_with_harness(model, tokenizer, ["palimpsa_tiny_choice", "palimpsa_tiny_rolling"],
                                    include_path=TASKS_DIR, batch_size=4, max_length=512)
    return model, tokenizer, results


def test_multiple_choice_matches_direct_loglikelihoods(evaluated):
    model, tokenizer, results = evaluated
    correct, correct_norm = [], []
    for row in _rows("tiny_choice.jsonl"):
        context = list(f"Question: {row['question']}\nAnswer:".encode("utf-8"))
        scores = [continuation_loglik(model, context, list((" " + c).encode("utf-8"))) for c in row["choices"]]
        normalised = [s / len(c) for s, c in zip(scores, row["choices"])]
        correct.append(int(np.argmax(scores)) == row["label"])
        correct_norm.append(int(np.argmax(normalised)) == row["label"])
    got = results["results"]["palimpsa_tiny_choice"]
    assert got["acc,none"] == pytest.approx(np.mean(correct))
    assert got["acc_norm,none"] == pytest.approx(np.mean(correct_norm))


def test_rolling_loglikelihood_matches_direct_loss(evaluated):
    model, tokenizer, results = evaluated
    total_nll, total_bytes = 0.0, 0
    for row in _rows("tiny_rolling.jsonl"):
        data = list(row["text"].encode("utf-8"))
        # one window (the documents are shorter than max_length), conditioned on the eos prefix token
        total_nll -= continuation_loglik(model, [tokenizer.eos_token_id], data)
        total_bytes += len(data)
    got = results["results"]["palimpsa_tiny_rolling"]
    assert got["bits_per_byte,none"] == pytest.approx(total_nll / total_bytes / math.log(2), rel=1e-4)
    assert got["byte_perplexity,none"] == pytest.approx(math.exp(total_nll / total_bytes), rel=1e-4)


def test_report_files(evaluated, tmp_path):
    _, _, results = evaluated
    paths = write_report(results, str(tmp_path))
    saved = json.loads(open(paths["json"]).read())
    assert set(saved["results"]) == {"palimpsa_tiny_choice", "palimpsa_tiny_rolling"}
    markdown = open(paths["markdown"]).read()
    for task, metric, value in summary_rows(results):
        assert f"| {task} | {metric} | {value:.4f} |" in markdown


def test_bad_task_lists_raise(evaluated):
    model, tokenizer, _ = evaluated
    with pytest.raises(ValueError, match="unknown lm-eval tasks"):
        evaluate_with_harness(model, tokenizer, ["no_such_task_xyz"], include_path=TASKS_DIR,
                              include_defaults=False)
    with pytest.raises(ValueError, match="non-empty list"):
        evaluate_with_harness(model, tokenizer, "wikitext")
    assert "wikitext" in PAPER_TASKS and "arc_challenge" in PAPER_TASKS
