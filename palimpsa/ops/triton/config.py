"""Launch parameters of the Palimpsa Triton kernels (defaults chosen on an H100; see results/bench/)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Iterator, Optional, Tuple


@dataclasses.dataclass
class KernelConfig:
    """fwd_*: the output kernel; bwd_*: the reverse sweep (None: chosen from the tile size).

    fwd_backend: which output kernel the chunk path runs: "triton" (``chunk_fwd_kernel``), "gluon"
    (``chunk_output_gluon_kernel``, the same computation with the state laid out for barrier-free sums over
    K) or "auto" (:func:`palimpsa.ops.triton.function.resolve_backend`: Gluon where it was checked and measured
    faster, Triton elsewhere).  The default comes from the environment variable PALIMPSA_FWD_BACKEND, else "auto".
    bwd_backend: the backward's reverse sweep, "triton" (``unit_bwd_kernel``), "gluon"
    (``unit_bwd_gluon_kernel``: the same sweep, one warp per program, no reduction across warps) or "auto",
    default from PALIMPSA_BWD_BACKEND, else "auto"; bwd_lanes_k: lanes of a warp that share one value column in
    the Gluon sweep (each holds K / bwd_lanes_k key rows; the warp owns 32 / bwd_lanes_k columns); bwd_warps:
    warps per program of the Gluon sweep, side by side over the value columns (1: no reduction crosses warps;
    more: fewer atomic adds of dq and dk, sums over V through shared memory; checked in the CPU interpreter and
    compiled for sm_90; on an H200 1.35-1.6x slower at 760M-like); bwd_cols: value columns each thread of the
    Gluon sweep holds (1, 2 or 4: the program's columns are bwd_cols * 32 / bwd_lanes_k * bwd_warps); bwd_stage: 1 keeps
    the Gluon sweep's
    per-token states of a 4-token sub-block in shared memory instead of registers (at 760M-like under Triton 3.6
    no spills instead of 400 bytes, still 255 registers), 2: also the states at the sub-blocks' starts, from one
    forward pass per segment, 0: registers; bwd_maxnreg: a cap on the Gluon sweep's registers per thread (0: the
    compiler's choice; 128 allows twice the warps per multiprocessor at the price of spills); bwd_unroll: tokens
    per iteration of the Gluon sweep's loops that rebuild a state by stepping forward (1, 2 or 4; more lets their
    loads issue together).  None (the default of all three) takes them from :data:`SWEEP_TUNED` by key size,
    where an H200 checked and measured them (``results/bench/README.md``, sixth session): at K = 48 stage 2 with
    a cap of 168 registers made the 170M-like fwd+bwd 1.2x faster, and unrolling by 4 another 7 %; at K = 96
    every staged or capped variant was slower, and unrolling by 4 made it 8 % faster.  Other key sizes, and
    lanes or warps other than the defaults, run stage 0, no cap, unroll 1.  The Gluon sweep adds dq, dk and dg
    atomically over its value blocks, so they may differ in the last bits from run to run.  The environment
    variables are read when this module is imported.
    """

    fwd_backend: str = dataclasses.field(default_factory=lambda: os.environ.get("PALIMPSA_FWD_BACKEND", "auto"))
    bwd_backend: str = dataclasses.field(default_factory=lambda: os.environ.get("PALIMPSA_BWD_BACKEND", "auto"))
    bwd_lanes_k: int = 8
    bwd_warps: int = 1
    bwd_cols: int = 1
    bwd_stage: Optional[int] = None
    bwd_maxnreg: Optional[int] = None
    bwd_unroll: Optional[int] = None
    fwd_block_v: int = 32
    fwd_num_warps: int = 4
    bwd_block_v: int = 16
    bwd_num_warps: Optional[int] = 4
    bwd_target_programs: int = 2048  # backward units are sized to give about this many programs


FWD_BACKENDS = ("auto", "triton", "gluon")
# key size -> (bwd_stage, bwd_maxnreg, bwd_unroll) of the Gluon sweep, where a GPU checked them and measured them
# faster than (0, 0, 1)
SWEEP_TUNED = {48: (2, 168, 4), 96: (0, 0, 4)}
BWD_BACKENDS = ("auto", "triton", "gluon")
CONFIG = KernelConfig()


@contextlib.contextmanager
def kernel_config(**changes) -> Iterator[KernelConfig]:
    """Temporarily change launch parameters (benchmarks and tuning): ``with kernel_config(fwd_block_v=64):``."""
    unknown = set(changes) - {f.name for f in dataclasses.fields(KernelConfig)}
    if unknown:
        raise ValueError(f"unknown kernel config fields {sorted(unknown)}")
    if changes.get("fwd_backend", "auto") not in FWD_BACKENDS:
        raise ValueError(f"fwd_backend must be one of {FWD_BACKENDS}, got {changes['fwd_backend']!r}")
    if changes.get("bwd_backend", "auto") not in BWD_BACKENDS:
        raise ValueError(f"bwd_backend must be one of {BWD_BACKENDS}, got {changes['bwd_backend']!r}")
    if changes.get("bwd_lanes_k", 8) not in (1, 2, 4, 8, 16, 32):
        raise ValueError(f"bwd_lanes_k must be a power of two from 1 to 32, got {changes['bwd_lanes_k']!r}")
    if changes.get("bwd_warps", 1) not in (1, 2, 4, 8):
        raise ValueError(f"bwd_warps must be 1, 2, 4 or 8, got {changes['bwd_warps']!r}")
    cols = changes.get("bwd_cols", 1)
    if isinstance(cols, bool) or cols not in (1, 2, 4):
        raise ValueError(f"bwd_cols must be 1, 2 or 4, got {changes['bwd_cols']!r}")
    stage = changes.get("bwd_stage")
    if stage is not None and (isinstance(stage, bool) or stage not in (0, 1, 2)):
        raise ValueError(f"bwd_stage must be None (by key size), 0, 1 or 2, got {changes['bwd_stage']!r}")
    maxnreg = changes.get("bwd_maxnreg")
    if maxnreg is not None and (isinstance(maxnreg, bool) or not isinstance(maxnreg, int)
                                or not (maxnreg == 0 or 24 <= maxnreg <= 255)):
        raise ValueError(f"bwd_maxnreg must be None (by key size), 0 (no cap) or a whole number from 24 to 255, "
                         f"got {maxnreg!r}")
    unroll = changes.get("bwd_unroll")
    if unroll is not None and (isinstance(unroll, bool) or unroll not in (1, 2, 4)):
        raise ValueError(f"bwd_unroll must be None (by key size), 1, 2 or 4, got {changes['bwd_unroll']!r}")
    saved = dataclasses.replace(CONFIG)
    for name, value in changes.items():
        setattr(CONFIG, name, value)
    try:
        yield CONFIG
    finally:
        for field in dataclasses.fields(KernelConfig):
            setattr(CONFIG, field.name, getattr(saved, field.name))


def sweep_tuning(K: int) -> Tuple[int, Optional[int], int]:
    """(stage, register cap or None, unroll) of the Gluon sweep at key size K: CONFIG's values where set, else
    :data:`SWEEP_TUNED`'s for K, measured with the default 8 lanes per column and one warp per program (with other
    lanes or warps, and at other key sizes: stage 0, no cap, unroll 1)."""
    measured = CONFIG.bwd_lanes_k == 8 and CONFIG.bwd_warps == 1 and CONFIG.bwd_cols == 1
    tuned = SWEEP_TUNED.get(K, (0, 0, 1)) if measured else (0, 0, 1)
    stage, maxnreg, unroll = (mine if mine is not None else default for mine, default in
                              zip((CONFIG.bwd_stage, CONFIG.bwd_maxnreg, CONFIG.bwd_unroll), tuned))
    return stage, (maxnreg or None), unroll
