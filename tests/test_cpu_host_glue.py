"""scripts/cpu_host_glue.py: the GPU path's glue runs on the CPU with every Triton launch stubbed, and is timed."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("triton")  # the script stubs Triton's launches, so it needs Triton installed (the CPU wheel)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_glue_of_every_variant_is_timed():
    """--per-channel: the grouped variants and the per-channel op on its sm_90 path (CUDA walk and sweep, their
    launches stubbed) in one run."""
    command = [sys.executable, os.path.join(ROOT, "scripts", "cpu_host_glue.py"), "--iters", "3", "--per-channel"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT},
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    times = dict(re.findall(r"^(.+?): (\d+) us of host glue", result.stdout, re.M))
    assert set(times) == {"grouped G=1", "NotPalimpsa", "per-channel"} and all(int(t) > 0 for t in times.values())
    # it took the CUDA path: the walk forward, the sweep backward
    assert re.search(r"^per-channel: .*; 2 CUDA kernels a fwd\+bwd\)$", result.stdout, re.M), result.stdout
