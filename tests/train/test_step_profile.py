"""``palimpsa train --profile-step N``: that one step under the profiler, summarised into OUT_DIR/profile_step.json."""

from __future__ import annotations

import json

import pytest

from palimpsa.train import train
from palimpsa.train.step_profile import PROFILE_NAME
from tests.train.corpus import stand_in_config
from tests.train.tiny_model import tiny_factory


def test_the_named_step_is_profiled_and_written(corpus, tmp_path):
    config = stand_in_config(corpus, tmp_path / "run", max_steps=3, profile_step=2)
    train(config, model_factory=tiny_factory)
    summary = json.loads((tmp_path / "run" / PROFILE_NAME).read_text())
    assert summary["step"] == 2 and summary["clock"] == "CPU"
    assert summary["total_ms"] > 0  # the CPU operators of a forward, backward and AdamW step
    assert "kernels" not in summary  # kernel kinds exist on a GPU only


def test_no_profile_unless_asked(corpus, tmp_path):
    train(stand_in_config(corpus, tmp_path / "run", max_steps=2), model_factory=tiny_factory)
    assert not (tmp_path / "run" / PROFILE_NAME).exists()


@pytest.mark.parametrize("bad", [0, -1, 2.0, True, "2"])
def test_profile_step_must_be_a_positive_integer(corpus, tmp_path, bad):
    with pytest.raises(ValueError, match="profile_step"):
        stand_in_config(corpus, tmp_path / "run", profile_step=bad)
