"""Variance AUROC and the summary table's selection rule (lr chosen on validation, never on test)."""

import itertools
import json

import torch

from palimpsa.mqar.report import format_table, summarize, variance_auroc, write_report


def pairwise_auroc(scores, positive):
    pos = [s for s, p in zip(scores, positive) if p]
    neg = [s for s, p in zip(scores, positive) if not p]
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_auroc_matches_pairwise_count_with_ties():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 6, (60,), generator=gen).float()  # many ties
    positive = torch.rand(60, generator=gen) < 0.3
    assert abs(variance_auroc(scores, positive) - pairwise_auroc(scores.tolist(), positive.tolist())) < 1e-12
    assert variance_auroc(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([False, False, True])) == 1.0
    assert variance_auroc(torch.tensor([1.0, 2.0]), torch.tensor([True, True])) is None


def record(model, lr, seed, val, test, auroc=None):
    return dict(model=model, seq_len=64, num_kv_pairs=8, d_model=32, lr=lr, seed=seed, val_accuracy=val,
                test_accuracy=test, state_bytes=1024, steps=100, device="cpu", variance_auroc=auroc)


def test_summary_picks_lr_on_validation_and_averages_seeds():
    results = [
        record("palimpsa", 1e-3, 0, val=0.9, test=0.5, auroc=0.7),
        record("palimpsa", 1e-2, 0, val=0.8, test=0.99, auroc=0.9),  # better test, worse validation: not chosen
        record("palimpsa", 1e-3, 1, val=0.1, test=0.2, auroc=0.6),
        record("palimpsa", 1e-2, 1, val=0.7, test=0.6, auroc=None),
        record("attention", 1e-3, 0, val=1.0, test=1.0),
    ]
    rows = {r["model"]: r for r in summarize(results)}
    palimpsa = rows["palimpsa"]
    assert palimpsa["lrs"] == [1e-3, 1e-2] and palimpsa["seeds"] == 2
    assert abs(palimpsa["test_mean"] - 0.55) < 1e-12 and abs(palimpsa["test_std"] - 0.0707106781) < 1e-8
    assert palimpsa["auroc_mean"] == 0.7 and palimpsa["auroc_n"] == 1
    table = format_table(list(rows.values()))
    assert "| palimpsa | 64 | 8 | 32 | ? | ? | 1,024 | 55.0% ± 7.1 | 2 |" in table


def test_a_run_finished_later_leaves_the_unfinished_table(tmp_path):
    done = dict(record("palimpsa", 1e-3, 0, val=0.9, test=0.8), run_id="a", best_step=100)
    cut = dict(record("palimpsa", 1e-3, 0, val=0.1, test=0.1), run_id="a", planned_steps=200)
    still_cut = dict(record("palimpsa", 1e-2, 0, val=0.2, test=0.3), run_id="b", planned_steps=200)
    (tmp_path / "results.jsonl").write_text(json.dumps(done) + "\n")
    cut_again = dict(still_cut, steps=150)  # the same run, stopped by a second budget
    (tmp_path / "unfinished.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (cut, still_cut, cut_again)))
    write_report(tmp_path / "results.jsonl", tmp_path)
    stopped = (tmp_path / "summary.md").read_text().split("## Runs stopped by the time budget")[1].split("##")[0]
    assert "| 0.01 | 0 | 150 / 200 |" in stopped and "100 / 200" not in stopped and "| 0.001 |" not in stopped
