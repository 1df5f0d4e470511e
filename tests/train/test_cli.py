"""``palimpsa train`` end to end on CPU with a real model preset: metrics, checkpoint and HF export."""

from __future__ import annotations

import json
import os

import torch

from palimpsa.cli import main
from palimpsa.train.metrics import read_metrics
from tests.train.corpus import write_corpus


def test_train_cli_exports_a_loadable_model(tmp_path, capsys):
    corpus = write_corpus(str(tmp_path / "corpus"))
    run_config = tmp_path / "run.json"
    run_config.write_text(json.dumps({"model": "palimpsa-tiny", "seq_len": 64, "batch_size": 2}))
    out = tmp_path / "run"
    code = main(["train", "--config", str(run_config), "--data", corpus, "--max-steps", "3", "--warmup-steps", "1",
                 "--log-every", "1", "--out-dir", str(out), "--device", "cpu", "--no-progress",
                 "--model-overrides", '{"metaplasticity": false}'])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["final_step"] == 3
    records = read_metrics(str(out / "metrics.jsonl"))
    assert [r["step"] for r in records] == [1, 2, 3] and records[-1]["tokens"] == 3 * 2 * 64
    assert os.path.exists(out / "checkpoint.pt")

    from palimpsa.eval.loading import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(str(out), device="cpu")
    assert model.config.metaplasticity is False and model.config.vocab_size == 320
    assert tokenizer.eos_token_id == model.config.eos_token_id == 256
    saved = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, saved[name], msg=name)
