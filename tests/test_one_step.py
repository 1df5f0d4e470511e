"""``python -m palimpsa.bench.one_step`` (the process scripts/gpu_ncu_ops.sh profiles), on the CPU interpreter."""

from __future__ import annotations

import importlib.util

import pytest

from palimpsa.bench import one_step


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_one_step_runs_each_repeat(capsys):
    assert one_step.main(["--shape", "170M-like", "--tokens", "4", "--batch", "1", "--repeats", "1",
                          "--device", "cpu", "--dtype", "float32"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["170M-like repeat 0"]


def test_bad_repeats_is_an_error():
    with pytest.raises(SystemExit):
        one_step.main(["--repeats", "0", "--device", "cpu"])
