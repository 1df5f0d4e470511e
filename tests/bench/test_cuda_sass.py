"""palimpsa.bench.cuda_sass: the CUDA sweep's loops counted from its SASS, without a GPU (NVRTC, and the cuobjdump
in Triton's wheel)."""

from __future__ import annotations

import re

import pytest

from palimpsa.bench import cuda_sass


def test_the_sub_block_loop_issues_one_reciprocal_per_element_and_token(capsys):
    from palimpsa.ops.cuda import nvrtc

    try:
        nvrtc.nvrtc_library()
    except OSError as err:
        pytest.skip(f"NVRTC not installed: {err}")
    assert cuda_sass.main(["--shape", "170M-like", "--scaled-only"]) == 0
    out = capsys.readouterr().out
    assert "16 lanes over K, 6 state elements a thread" in out and "scaled body only" in out
    rows = [line.split(" | ") for line in out.splitlines() if re.match(r"\| 0x", line)]
    mufu = [int(row[2 + cuda_sass.KINDS.index("MUFU")]) for row in rows]
    # the sub-block loop (4 tokens x 6 elements: 24 reciprocals) appears once in each of the two copies of the scaled
    # body, and so in the loops around it; no loop holds a reciprocal that is not the reverse step's
    assert mufu.count(24) >= 2 and all(m % 24 == 0 or m > 48 for m in mufu), mufu
    totals = {int(row[1]) for row, m in zip(rows, mufu) if m == 24}
    assert min(totals) > 24 * 13  # at least the reverse step's 13 instructions per element-token


def test_loops_are_backward_branches_and_kinds_add_up():
    instructions = [(0x10, "FFMA", "R1, R2, R3, R4"), (0x20, "MUFU.RCP", "R5, R6"),
                    (0x30, "IADD3", "R7, R7, 0x1, RZ"), (0x40, "BRA", "0x10"), (0x50, "BRA", "0x80")]
    (start, end, body), = cuda_sass.loops(instructions)  # the forward branch is no loop
    assert (start, end) == (0x10, 0x40)
    counts = cuda_sass.kind_counts(body)
    assert counts["FFMA"] == 1 and counts["MUFU"] == 1 and counts["other"] == 2 and sum(counts.values()) == 4
