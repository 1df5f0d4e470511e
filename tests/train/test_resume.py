"""The loop on CPU: it learns, its checkpoints resume exactly, and it refuses to resume a different run."""

from __future__ import annotations

import os
import shutil

import pytest

from palimpsa.train import TrainConfig, train
from palimpsa.train.metrics import read_metrics
from tests.train.corpus import stand_in_config
from tests.train.tiny_model import tiny_factory


def _config(data_dir, out_dir, **overrides):
    return stand_in_config(data_dir, out_dir, **{**dict(grad_accum=2, max_steps=8), **overrides})


def test_stop_and_resume_gives_the_same_losses(corpus, tmp_path):
    straight = train(_config(corpus, tmp_path / "straight"), model_factory=tiny_factory)
    assert straight.steps == list(range(1, 9))
    assert straight.losses[-1] < straight.losses[0]  # it learns something

    split = tmp_path / "split"
    first = train(_config(corpus, split, stop_at_step=3), model_factory=tiny_factory)
    assert first.final_step == 3
    shutil.copy(split / "checkpoint.pt", tmp_path / "step3.pt")
    train(_config(corpus, split, stop_at_step=5), model_factory=tiny_factory)
    # a crash after step 5's records but before its checkpoint: the run resumes from step 3 again
    shutil.copy(tmp_path / "step3.pt", split / "checkpoint.pt")
    second = train(_config(corpus, split, save_every=2), model_factory=tiny_factory)
    assert second.steps == list(range(4, 9))
    assert first.losses + second.losses == straight.losses  # bit-for-bit on CPU

    logged = read_metrics(os.path.join(tmp_path / "split", "metrics.jsonl"))
    assert [r["step"] for r in logged] == list(range(1, 9))
    assert [r["loss"] for r in logged] == straight.losses
    assert all(r["tokens"] == r["step"] * 2 * 2 * 32 and r["tokens_per_s"] > 0 for r in logged)
    assert not [name for name in os.listdir(tmp_path / "split") if ".tmp" in name]


def test_resume_refuses_a_run_with_other_data(corpus, tmp_path):
    train(_config(corpus, tmp_path / "run", max_steps=1), model_factory=tiny_factory)
    with pytest.raises(ValueError, match="seq_len"):
        train(_config(corpus, tmp_path / "run", max_steps=2, seq_len=16), model_factory=tiny_factory)


def test_gradient_accumulation_equals_one_big_batch(corpus, tmp_path):
    accumulated = train(_config(corpus, tmp_path / "a", batch_size=1, grad_accum=4, max_steps=3),
                        model_factory=tiny_factory)
    big = train(_config(corpus, tmp_path / "b", batch_size=4, grad_accum=1, max_steps=3), model_factory=tiny_factory)
    assert accumulated.losses == pytest.approx(big.losses, rel=1e-5)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="seq_len"):
        TrainConfig(seq_len=1)
    with pytest.raises(ValueError, match="parallel"):
        TrainConfig(parallel="zero3")
    with pytest.raises(ValueError, match="min_lr_ratio"):
        TrainConfig(min_lr_ratio=2.0)
    with pytest.raises(ValueError, match="unknown TrainConfig fields"):
        TrainConfig.from_dict({"learning_rate": 1e-3})


def test_time_limit_stops_with_a_checkpoint_and_resumes(corpus, tmp_path):
    stopped = train(_config(corpus, tmp_path / "t", time_limit_s=1e-9), model_factory=tiny_factory)
    assert stopped.final_step == 1 and stopped.steps == [1]  # the limit is checked after each step
    resumed = train(_config(corpus, tmp_path / "t", max_steps=3), model_factory=tiny_factory)
    assert resumed.steps == [2, 3]


def test_tensorboard_asked_but_missing_raises(corpus, tmp_path):
    try:
        import torch.utils.tensorboard  # noqa: F401
        pytest.skip("tensorboard is installed")
    except ImportError:
        pass
    with pytest.raises(ImportError, match="tensorboard"):
        train(_config(corpus, tmp_path / "tb", tensorboard=True, max_steps=1), model_factory=tiny_factory)
