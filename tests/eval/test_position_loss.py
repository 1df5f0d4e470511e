"""Loss by token position: the per-position mean over long documents, its bins and its plot."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from palimpsa.eval.position_loss import binned, per_position_loss, write_position_loss
from tests.eval.helpers import tiny_model_and_tokenizer


def test_per_position_loss_is_the_mean_over_long_documents(tmp_path):
    model, _ = tiny_model_and_tokenizer()
    rng = np.random.default_rng(0)
    documents = [rng.integers(0, 256, size=n) for n in (40, 10, 33, 50, 32)]  # the 10-token one is skipped
    result = per_position_loss(model, iter(documents), length=32, batch_size=2)
    assert result["num_documents"] == 4 and len(result["loss"]) == 31

    expected = []
    with torch.no_grad():
        for doc in documents:
            if len(doc) < 32:
                continue
            ids = torch.from_numpy(doc[:32].astype(np.int64))[None]
            logits = model(input_ids=ids).logits[0, :-1]
            expected.append(F.cross_entropy(logits, ids[0, 1:], reduction="none"))
    assert result["loss"] == pytest.approx(torch.stack(expected).mean(0).tolist(), rel=1e-5)

    limited = per_position_loss(model, iter(documents), length=32, max_documents=1)
    assert limited["num_documents"] == 1

    paths = write_position_loss(result, str(tmp_path), label="tiny")
    saved = json.loads(open(paths["json"]).read())
    assert saved["loss"] == result["loss"] and (tmp_path / "position_loss.png").stat().st_size > 0


def test_bins_average_positions():
    points = binned([float(i) for i in range(100)], bins=8)  # loss at 1-based position p is p - 1
    assert len(points["position"]) <= 8 and points["position"] == sorted(points["position"])
    assert points["loss"] == sorted(points["loss"])
    assert points["loss"][0] == pytest.approx(0.5)  # the first bin holds positions 1 and 2
    assert points["loss"][-1] > 70


def test_no_long_document_raises():
    model, _ = tiny_model_and_tokenizer()
    with pytest.raises(ValueError, match="at least 64 tokens"):
        per_position_loss(model, iter([np.arange(10)]), length=64)
