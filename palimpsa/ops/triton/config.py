"""Launch parameters of the Palimpsa Triton kernels (defaults chosen on an H100; see results/bench/)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Iterator, NamedTuple, Optional


class SweepTuning(NamedTuple):
    """How the Gluon reverse sweep runs at one key size: lanes per value column, value columns per thread, stage,
    register cap (None: the compiler's choice), unroll, the programs its units are sized for (counted with its
    own value blocks), and whether a chunk's per-token inputs are staged in shared memory (see
    :class:`KernelConfig`)."""

    lanes_k: int
    cols: int
    stage: int
    maxnreg: Optional[int]
    unroll: int
    target_programs: int
    inputs: bool = False


class StateTuning(NamedTuple):
    """How the chunk-state kernel (``chunk_state.chunk_states_kernel``) runs: key rows and value columns per
    program (each a power of two >= 16; a block wider than K or V is masked), warps, software-pipelining stages
    of its loop over chunks (None: Triton's default) and a register cap per thread (None: the compiler's
    choice)."""

    block_k: int
    block_v: int
    num_warps: int = 4
    num_stages: Optional[int] = None
    maxnreg: Optional[int] = None


@dataclasses.dataclass
class KernelConfig:
    """fwd_*: the output kernel; bwd_*: the reverse sweep (None: chosen from the tile size or the key size).

    fwd_backend: which output kernel the chunk path runs: "triton" (``chunk_fwd_kernel``), "gluon"
    (``chunk_output_gluon_kernel``, the same computation with the state laid out for barrier-free sums over
    K), "cuda" (``palimpsa/ops/cuda/output.cu``, CUDA C++ compiled at run time by NVRTC) or "auto"
    (:func:`palimpsa.ops.triton.function.output_kernel`: CUDA, else Gluon, where each was checked and measured
    faster, Triton elsewhere).  The default comes from the environment variable PALIMPSA_FWD_BACKEND, else "auto".
    fwd_walk: whether the CUDA output kernel walks whole sequences from the initial state (True; no chunk-start
    states are computed, see ``palimpsa/ops/cuda/output.cu``) or runs the chunks in parallel from chunk-start states
    (False); None: :func:`palimpsa.ops.triton.function.walk_forward` decides where it was measured faster.
    fwd_cols: value columns each thread of the Gluon output kernel holds (1 or 2; 4 * fwd_cols lanes share a
    column); None: :data:`OUTPUT_TUNED` by key size, else 1.
    fwd_inputs: True stages each chunk's q and k rows in shared memory (float32, once per chunk, by all the
    program's warps) for the Gluon output kernel's tokens to read there, instead of every thread loading and
    converting its rows of every token (``chunk_fwd_gluon.chunk_output_gluon_kernel``'s INPUTS); None:
    :data:`OUTPUT_INPUTS` by key size.
    bwd_backend: the backward's reverse sweep, "triton" (``unit_bwd_kernel``), "gluon"
    (``unit_bwd_gluon_kernel``: the same sweep, one warp per program, no reduction across warps), "cuda"
    (``palimpsa/ops/cuda/sweep.cu``: the same sweep in CUDA C++, its own fixed layout; the settings below are the
    Gluon sweep's) or "auto" (:func:`palimpsa.ops.triton.function.sweep_kernel`), default from
    PALIMPSA_BWD_BACKEND, else "auto".  The Gluon sweep's layout and schedule:

    * bwd_lanes_k: lanes of a warp that share one value column (each holds K / bwd_lanes_k key rows);
    * bwd_cols: value columns each thread holds (1, 2 or 4; a program owns bwd_cols * 32 / bwd_lanes_k *
      bwd_warps columns): two columns per thread share the per-row work and the shuffles of the sums over V;
    * bwd_warps: warps per program, side by side over the value columns (1: no reduction crosses warps; more:
      fewer atomic adds of dq and dk, sums over V through shared memory; on an H200 1.35-1.6x slower at
      760M-like);
    * bwd_stage: 0 keeps a 4-token sub-block's states in registers, 1 in shared memory, 2 also the states at the
      sub-blocks' starts, from one forward pass per segment (2.25 forward steps per token instead of 3);
    * bwd_maxnreg: a cap on registers per thread (0: the compiler's choice; 128 allows twice the warps per
      multiprocessor);
    * bwd_unroll: tokens per iteration of the loops that rebuild a state by stepping forward (1, 2 or 4);
    * bwd_target_programs: the backward walks each sequence in units of whole chunks, sized to give about this
      many programs (counted with the sweep's own value blocks); the first unit of a sequence needs no
      local-adjoint pass, so fewer, longer units skip that pass where the GPU is full without them.  None: the
      Triton sweep 2048, the Gluon sweep by key size;
    * bwd_inputs: True stages each chunk's per-token inputs (q, k, v, beta, do, the decay) in shared memory once,
      float32, so that the sweep's forward and reverse steps read them there instead of waiting on global loads
      (``chunk_bwd_gluon._stage_inputs``).

    None (the default of bwd_lanes_k, bwd_cols, bwd_stage, bwd_maxnreg, bwd_unroll, bwd_target_programs and
    bwd_inputs) takes them from
    :data:`SWEEP_TUNED` by key size, where an H200 checked them against float64 and measured them faster
    (``results/bench/README.md``); at other key sizes, or when lanes, columns or warps are set by hand, the unset
    ones are 8 lanes, 1 column, stage 0, no cap, unroll 1, 8192 programs (about the units of the Triton sweep's
    2048 programs of four times wider value blocks), inputs not staged.  The Gluon sweep adds dq, dk and dg
    atomically over its value blocks, so they may differ in the last bits from run to run.

    bwd_dqk_tokens: the CUDA sweep's tokens whose dq and dk are summed over lanes at a time: 2 (None, the default that
    the GPU checks and records ran) or 4 (a sub-block's four reverse steps in one stretch of code, for the compiler to
    interleave; 3 kB more shared memory a warp at K = 96, so it falls back to 2 where a block would not fit).  Both
    passed the H200's float64 checks at every benchmark shape; 4 was no faster there (results/bench/README.md,
    sixteenth session: 760M-like fwd+bwd 11.35 against 11.33 ms).

    bwd_key_lanes: the CUDA sweep's lanes over K: 16 (each thread K / 16 adjacent key rows of 2 value columns, dq and
    dk summed over a warp's two column lanes in shared memory) or 32 (each thread the rows lane + 32 i of 4 value
    columns: dq and dk go straight to memory, K a multiple of 32).  None: 32 where K allows it, else 16.

    bwd_sweep_blocks: the CUDA sweep's blocks a multiprocessor is to hold, 1 or 2 (the warps per block follow the
    shared memory; two blocks stage their chunks' inputs at different times).  None: 1.

    bwd_sweep_warps, bwd_sweep_segment: the CUDA sweep's warps per block (1, 2, 4, 6, 8, 12 or 16; 4 * warps must
    divide V) and tokens per segment (4, 8, 16 or 32: each warp keeps segment / 4 sub-block states in shared memory,
    so shorter segments let more warps fit, at the cost of more forward steps).  None: as the sweep picks them.

    bwd_sweep_ck_first: whether the CUDA sweep's sub-block checkpoints hold the state after each sub-block's first
    token (one forward step fewer a sub-block, one more a segment); None: ``palimpsa.ops.cuda.sweep``'s default.

    bwd_sweep_compact: with 32 lanes over K, whether the CUDA sweep's shared memory is compact (the dv and dbeta sums
    of a sub-block collected 2 tokens at a time, and no checkpoint slot for a segment's last sub-block, whose states
    come from the pass's registers), so that more warps or longer segments fit a block; None: the sweep's default by
    key size (``palimpsa.ops.cuda.sweep.default_compact``).  With ``bwd_sweep_segment=32`` (one segment a chunk) each
    chunk's start state also moves into a checkpoint slot (``palimpsa.ops.cuda.sweep.start_in_slot``): compiled and
    sized here, not yet checked against float64 on a GPU (results/bench/README.md, eighteenth session).

    bwd_sweep_pairs: with 32 lanes over K, whether the CUDA sweep adds dq and dk into one interleaved buffer, one
    vector atomic add per key row and token instead of two; None: ``palimpsa.ops.cuda.sweep.PAIRS``.

    state_tuning: the chunk-state kernel's blocks, warps, stages and register cap (:class:`StateTuning`; None:
    :func:`state_tuning` by key and chunk size).  The environment variables are read when this module is imported.
    """

    fwd_backend: str = dataclasses.field(default_factory=lambda: os.environ.get("PALIMPSA_FWD_BACKEND", "auto"))
    bwd_backend: str = dataclasses.field(default_factory=lambda: os.environ.get("PALIMPSA_BWD_BACKEND", "auto"))
    fwd_walk: Optional[bool] = None
    fwd_cols: Optional[int] = None
    fwd_inputs: Optional[bool] = None
    bwd_lanes_k: Optional[int] = None
    bwd_cols: Optional[int] = None
    bwd_warps: int = 1
    bwd_stage: Optional[int] = None
    bwd_maxnreg: Optional[int] = None
    bwd_unroll: Optional[int] = None
    fwd_block_v: int = 32
    fwd_num_warps: int = 4
    bwd_block_v: int = 16
    bwd_num_warps: Optional[int] = 4
    bwd_target_programs: Optional[int] = None
    bwd_inputs: Optional[bool] = None
    bwd_dqk_tokens: Optional[int] = None
    bwd_key_lanes: Optional[int] = None
    bwd_sweep_blocks: Optional[int] = None
    bwd_sweep_warps: Optional[int] = None
    bwd_sweep_segment: Optional[int] = None
    bwd_sweep_ck_first: Optional[bool] = None
    bwd_sweep_compact: Optional[bool] = None
    bwd_sweep_pairs: Optional[bool] = None
    state_tuning: Optional[StateTuning] = None


FWD_BACKENDS = ("auto", "triton", "gluon", "cuda")
# key size -> the Gluon sweep's tuning, where an H200 checked it against float64 and measured it faster than the
# untuned one (results/bench/README.md, seventh session: gluon_cols_h200_72b5391.md)
# (units of whole sequences at 170M-like and 760M-like: 4.89 -> 4.45 and 31.6 -> 27.5 ms fwd+bwd; at d64 the units
# of 8192 programs stay: 5.91 against 6.60 ms, gluon_units_h200_f1fd6c9.md)
# (each chunk's inputs staged in shared memory, stage 0, no cap: 27.19 -> 23.77 ms at 760M-like and 4.99 -> 4.10 at
# 170M-like, eighth session: gluon_inputs_h200_8f4296b.md; at d64 with units of whole sequences 5.44 -> 3.84,
# gluon_inputs_d64_h200_fc95a63.md)
UNTUNED_SWEEP = SweepTuning(lanes_k=8, cols=1, stage=0, maxnreg=None, unroll=1, target_programs=8192, inputs=False)
SWEEP_TUNED = {48: SweepTuning(16, 2, 0, None, 4, 1536, True), 64: SweepTuning(16, 2, 0, None, 4, 1536, True),
               96: SweepTuning(16, 2, 0, None, 4, 1536, True),
               # one column per thread: two spill 528 bytes at K = 128 (eight rows a thread already); ninth session,
               # gluon_d128_h200_5c7d085.md: d128 fwd+bwd 15.40 (Triton sweep) -> 11.45 ms; checked against float64
               # at d128 in the tenth session (gluon_d128_check_h200_eb446bb.md)
               128: SweepTuning(16, 1, 0, None, 4, 1536, True)}
TRITON_TARGET_PROGRAMS = 2048  # the Triton sweep's units (its value blocks of 16 columns)
# key size -> value columns per thread of the Gluon output kernel, where an H200 checked it against float64 and
# measured it faster than 1 (gluon_f2_h200_1fa1530.md: forward 3.666 -> 3.403 ms at 760M-like, 0.815 -> 0.731 at d64)
OUTPUT_TUNED = {48: 2, 64: 2, 96: 2, 128: 2}
# key sizes at which the Gluon output kernel stages each chunk's q and k rows in shared memory, where an H200 checked
# it against float64 and measured it faster (tenth session, gluon_fi_h200_eb446bb.md: forward 3.443 -> 2.781 ms at
# 760M-like, 0.665 -> 0.609 at 170M-like, 0.724 -> 0.661 at d64; eleventh session at K = 128 with two columns, once its
# staged reads were free of bank conflicts: d128 1.349 (Triton output kernel) -> 1.193, gluon_d128_fwd_h200_e721f0d.md)
OUTPUT_INPUTS = frozenset({48, 64, 96, 128})
BWD_BACKENDS = ("auto", "triton", "gluon", "cuda")
# (key size, chunk size) -> the chunk-state kernel's launch, where an H200 checked it against float64 and measured it
# fastest of a grid of blocks, warps, stages and register caps.  Chunks of 64 (the forward's): tenth session,
# state_tuning_h200_463e541.md, untuned -> tuned, ms: 760M-like 0.561 -> 0.516, 170M-like 0.216 -> 0.096, d64 0.124 ->
# 0.107, d128 0.237 -> 0.195.  Chunks of 32 (the backward's): eleventh session, state_tuning_c32_h200_e721f0d.md,
# the chunk-64 launch -> the fastest: 760M-like 0.795 -> 0.725, d128 0.315 -> 0.298 (170M-like and d64 keep the
# chunk-64 launch, within 3 % of the fastest: state_tuning's fallback).
STATE_TUNED = {(48, 64): StateTuning(64, 32), (64, 64): StateTuning(64, 32), (96, 64): StateTuning(64, 64),
               (128, 64): StateTuning(64, 32), (96, 32): StateTuning(64, 32), (128, 32): StateTuning(32, 64)}
CONFIG = KernelConfig()


def _check_choice(changes: dict, name: str, allowed: tuple) -> None:
    """ValueError unless changes[name] is absent, None or one of the integers ``allowed`` (a bool is refused)."""
    value = changes.get(name)
    if value is not None and (isinstance(value, bool) or value not in allowed):
        choices = ", ".join(str(a) for a in (None,) + allowed[:-1])
        raise ValueError(f"{name} must be {choices} or {allowed[-1]}, got {value!r}")


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
    if changes.get("bwd_lanes_k") not in (None, 1, 2, 4, 8, 16, 32):
        raise ValueError(f"bwd_lanes_k must be a power of two from 1 to 32, got {changes['bwd_lanes_k']!r}")
    if changes.get("bwd_warps", 1) not in (1, 2, 4, 8):
        raise ValueError(f"bwd_warps must be 1, 2, 4 or 8, got {changes['bwd_warps']!r}")
    if not isinstance(changes.get("fwd_walk", False), (bool, type(None))):
        raise ValueError(f"fwd_walk must be None (auto), True or False, got {changes['fwd_walk']!r}")
    for name, allowed in (("bwd_dqk_tokens", (2, 4)), ("bwd_key_lanes", (16, 32)), ("bwd_sweep_blocks", (1, 2)),
                          ("bwd_sweep_warps", (1, 2, 4, 6, 8, 12, 16)), ("bwd_sweep_segment", (4, 8, 16, 32))):
        _check_choice(changes, name, allowed)
    for name in ("bwd_sweep_ck_first", "bwd_sweep_compact", "bwd_sweep_pairs"):
        if not isinstance(changes.get(name, False), (bool, type(None))):
            raise ValueError(f"{name} must be None, True or False, got {changes[name]!r}")
    cols = changes.get("bwd_cols")
    if cols is not None and (isinstance(cols, bool) or cols not in (1, 2, 4)):
        raise ValueError(f"bwd_cols must be None (by key size), 1, 2 or 4, got {changes['bwd_cols']!r}")
    cols = changes.get("fwd_cols")
    if cols is not None and (isinstance(cols, bool) or cols not in (1, 2)):
        raise ValueError(f"fwd_cols must be None (by key size), 1 or 2, got {changes['fwd_cols']!r}")
    stage = changes.get("bwd_stage")
    if stage is not None and (isinstance(stage, bool) or stage not in (0, 1, 2)):
        raise ValueError(f"bwd_stage must be None (by key size), 0, 1 or 2, got {changes['bwd_stage']!r}")
    maxnreg = changes.get("bwd_maxnreg")
    if maxnreg is not None and (isinstance(maxnreg, bool) or not isinstance(maxnreg, int)
                                or not (maxnreg == 0 or 24 <= maxnreg <= 255)):
        raise ValueError(f"bwd_maxnreg must be None (by key size), 0 (no cap) or a whole number from 24 to 255, "
                         f"got {maxnreg!r}")
    programs = changes.get("bwd_target_programs")
    if programs is not None and (isinstance(programs, bool) or not isinstance(programs, int) or programs < 1):
        raise ValueError(f"bwd_target_programs must be None (by sweep and key size) or a positive whole number, "
                         f"got {programs!r}")
    if changes.get("fwd_inputs") is not None and not isinstance(changes["fwd_inputs"], bool):
        raise ValueError(f"fwd_inputs must be None (by key size), True or False, got {changes['fwd_inputs']!r}")
    tuning = changes.get("state_tuning")
    if tuning is not None and not _valid_state_tuning(tuning):
        raise ValueError(f"state_tuning must be None (by key and chunk size) or a StateTuning of power-of-two "
                         f"blocks >= 16, 1, 2, 4 or 8 warps, stages None or >= 1 and a register cap None or 24 "
                         f"to 255, got {tuning!r}")
    inputs = changes.get("bwd_inputs")
    if inputs is not None and not isinstance(inputs, bool):
        raise ValueError(f"bwd_inputs must be None (by key size), True or False, got {inputs!r}")
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


def sweep_tuning(K: int) -> SweepTuning:
    """The Gluon sweep's lanes, columns, stage, register cap (None: no cap), unroll, target programs and input
    staging at key size K: CONFIG's
    values where set, else :data:`SWEEP_TUNED`'s for K (measured with one warp per program); when the lanes, the
    columns or the warps are set by hand, or K was not measured, the unset ones come from :data:`UNTUNED_SWEEP`."""
    by_hand = CONFIG.bwd_lanes_k is not None or CONFIG.bwd_cols is not None or CONFIG.bwd_warps != 1
    base = UNTUNED_SWEEP if by_hand else SWEEP_TUNED.get(K, UNTUNED_SWEEP)
    mine = (CONFIG.bwd_lanes_k, CONFIG.bwd_cols, CONFIG.bwd_stage, CONFIG.bwd_maxnreg, CONFIG.bwd_unroll,
            CONFIG.bwd_target_programs, CONFIG.bwd_inputs)
    chosen = SweepTuning(*(value if value is not None else default for value, default in zip(mine, base)))
    return chosen._replace(maxnreg=chosen.maxnreg or None)


def output_columns(K: int) -> int:
    """Value columns per thread of the Gluon output kernel at key size K: CONFIG.fwd_cols, else
    :data:`OUTPUT_TUNED`'s for K, else 1."""
    return CONFIG.fwd_cols if CONFIG.fwd_cols is not None else OUTPUT_TUNED.get(K, 1)


def output_inputs(K: int) -> bool:
    """Whether the Gluon output kernel stages each chunk's q and k rows in shared memory at key size K:
    CONFIG.fwd_inputs, else whether K is in :data:`OUTPUT_INPUTS`."""
    return CONFIG.fwd_inputs if CONFIG.fwd_inputs is not None else K in OUTPUT_INPUTS


def _valid_state_tuning(tuning) -> bool:
    """Whether ``tuning`` is a :class:`StateTuning` the chunk-state kernel can run."""
    def whole(x):
        return isinstance(x, int) and not isinstance(x, bool)

    if not isinstance(tuning, StateTuning):
        return False
    blocks_ok = all(whole(b) and b >= 16 and b & (b - 1) == 0 for b in (tuning.block_k, tuning.block_v))
    return (blocks_ok and tuning.num_warps in (1, 2, 4, 8) and whole(tuning.num_warps)
            and (tuning.num_stages is None or (whole(tuning.num_stages) and tuning.num_stages >= 1))
            and (tuning.maxnreg is None or (whole(tuning.maxnreg) and 24 <= tuning.maxnreg <= 255)))


def state_tuning(K: int, V: int, chunk_size: int = 64) -> StateTuning:
    """The chunk-state kernel's launch at key size K, value size V and chunk size C: CONFIG.state_tuning where set,
    else :data:`STATE_TUNED` for (K, C), else for (K, 64) (a chunk size not measured), else blocks of up to 64 rows
    and columns (``utils.state_block``), 4 warps."""
    from palimpsa.ops.triton.utils import state_block

    if CONFIG.state_tuning is not None:
        return CONFIG.state_tuning
    untuned = StateTuning(state_block(K), state_block(V))
    return STATE_TUNED.get((K, chunk_size), STATE_TUNED.get((K, 64), untuned))
