"""``python -m palimpsa.bench.sass``: every kernel of the per-channel op, Triton and Gluon, compiles for sm_90 without
a GPU and reports its registers, spills, occupancy and SASS counts (in a subprocess: this session interprets
Triton kernels, see tests/conftest.py)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("triton")

from palimpsa.bench.sass import occupancy  # noqa: E402

KERNELS = ("chunk_states", "chunk_fwd", "unit_local_adjoint", "unit_bwd", "gluon_output", "gluon_local_adjoint",
           "gluon_sweep")


def test_every_kernel_compiles_and_reports_its_resources():
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    done = subprocess.run([sys.executable, "-m", "palimpsa.bench.sass", "--shape", "170M-like", "--gluon"], env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {line.split()[1]: line for line in done.stdout.splitlines() if line.startswith("170M-like")}
    assert set(rows) == set(KERNELS), done.stdout
    for name, line in rows.items():
        registers = int(re.search(r"regs=\s*(\d+)", line).group(1))
        assert 0 < registers <= 255, line
        assert "MUFU=" in line, line  # every kernel takes exponentials or reciprocals
    # the output kernel as the op runs it at K = 48 (config.OUTPUT_INPUTS): each chunk's q and k rows staged in
    # shared memory by all its warps, so a few barriers per chunk guard them; no reduction crosses warps, so none
    # per token
    output = rows["gluon_output"]
    assert "STS=" in output and int(re.search(r"BAR=(\d+)", output).group(1)) <= 4, output
    # the sweep as the op runs it at K = 48 (config.SWEEP_TUNED): a one-warp program that stages each chunk's inputs
    # in shared memory (stores and loads there) and whose only barriers guard those stores: about one per staged
    # quantity and chunk, none per token or per sum
    sweep = rows["gluon_sweep"]
    assert "STS=" in sweep and "LDS=" in sweep, sweep
    assert int(re.search(r"BAR=(\d+)", sweep).group(1)) <= 12, sweep


def test_occupancy_follows_registers_warps_and_shared_memory():
    assert occupancy(32, 4) == 1.0  # 64 warps fit
    assert occupancy(255, 1) == 8 / 64  # 256 registers a thread: 8 warps of 32 threads fill the 65,536
    assert occupancy(128, 4) == 16 / 64
    assert occupancy(168, 4) == 12 / 64  # 168 -> 5,376 a warp: 3 blocks of 4 warps
    assert occupancy(32, 1) == 32 / 64  # one-warp blocks: at most 32 resident
    # shared memory: 228 kB a multiprocessor, 1 kB reserved per block
    assert occupancy(255, 1, 26 * 1024) == 8 / 64  # the 760M-like sweep: registers and 26 kB both allow 8
    assert occupancy(255, 1, 28 * 1024) == 7 / 64  # 28 kB: only 7 fit (the eighth session's first staged sweep)
    assert occupancy(104, 4, 48 * 1024) == 16 / 64  # the staged output kernel: 4 blocks of 48 kB
    assert occupancy(32, 4, 100 * 1024) == 8 / 64  # two blocks of 100 kB, though registers would allow 16
