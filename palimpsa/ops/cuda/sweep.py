"""The per-channel op's reverse sweep in CUDA C++ (``sweep.cu``), compiled at run time by NVRTC.

It is a drop-in for ``chunk_bwd_gluon.unit_bwd_gluon_kernel``: same buffers, same units of chunks, same results
(checked against the float64 reference on the GPU by ``scripts/gpu_gluon_fwd_check.py --variants cuda``).  Each
thread holds K / 16 adjacent key rows of 2 value columns (16 lanes over K) or, where K is a multiple of 32, the key
rows lane + 32 i of 4 value columns (32 lanes over K, :func:`lanes_over_k`); a block of ``warps`` warps covers 4 * warps
value columns of one head and unit (see the source's header for what the C++ does that the Gluon source cannot).
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from palimpsa.ops.cuda.nvrtc import (MAX_SHARED_BYTES, SHARED_PER_SM, SHARED_RESERVED_PER_BLOCK, aligned16, dtype_code,
                                     load_kernel)

SEGMENT = 16
# key size -> (warps per block, tokens per segment) with 32 lanes over K, where an H200 checked them against float64
# and measured them faster than the pick of block_warps with SEGMENT (results/bench/README.md, seventeenth session:
# fwd+bwd d64 2.63 -> 2.45 ms, d128 5.37 -> 4.55); at K = 96 (760M-like) 8 warps of 16-token segments stay (12 of 8:
# 10.34 -> 10.52 ms)
BLOCKS_TUNED = {64: (16, 8), 128: (8, 8)}
# the same with the compact shared memory (COMPACT_KEY_SIZES below): 16-token segments fit there, and were faster on an
# H200 (results/bench/compact_h200_ed54c0e.md, eighteenth session: fwd+bwd d64 2.445 -> 2.365 ms, d128 4.506 -> 4.372,
# both with dq/dk pairs); at K = 96, 12 warps of 16-token segments were slower than 8 without it (10.250 against
# 10.026 ms), and so were 8 with it (10.277)
BLOCKS_TUNED_COMPACT = {64: (16, 16), 128: (8, 16)}
# whether a sub-block's checkpoint holds its state after its first token (kernel_config(bwd_sweep_ck_first=...)):
# checked against float64 on an H200 at the four benchmark shapes and on the varlen batches (K = 96), and faster there
# by 0-0.5 % (results/bench/ckfirst_h200_febd5fa.md: 760M-like fwd+bwd 10.336 -> 10.288 ms)
CHECKPOINT_AFTER_FIRST = True
# with 32 lanes over K: the key sizes where the sweep's shared memory is compact by default (sweep.cu's PCOMPACT: the
# dv and dbeta sums 2 tokens at a time, no checkpoint slot for a segment's last sub-block;
# kernel_config(bwd_sweep_compact=...)), and whether dq and dk go to memory as pairs (PPAIRS: one interleaved buffer,
# one vector atomic add a row; kernel_config(bwd_sweep_pairs=...)).  Both checked against float64 on an H200 at the
# four benchmark shapes and on the varlen batches; pairs took the 760M-like fwd+bwd from 10.281 to 10.026 ms
# (results/bench/compact_h200_ed54c0e.md)
COMPACT_KEY_SIZES = (64, 128)
PAIRS = True


def default_compact(K: int) -> bool:
    """Whether the sweep's shared memory is compact by default at key size K (:data:`COMPACT_KEY_SIZES`)."""
    return K in COMPACT_KEY_SIZES


def lanes_over_k(K: int, wanted: Optional[int] = None) -> int:
    """The sweep's lanes over K (sweep.cu's PKLANES): ``wanted`` (16 or 32; None: 32 where K is a multiple of 32, else
    16)."""
    if wanted not in (None, 16, 32):
        raise ValueError(f"the CUDA sweep runs 16 or 32 lanes over K, got {wanted!r}")
    if wanted == 32 and K % 32:
        raise ValueError(f"32 lanes over K need K a multiple of 32, got K = {K}")
    if wanted is None:
        return 32 if K % 32 == 0 else 16
    return wanted


def start_in_slot(chunk: int, segment: int, key_lanes: int, compact: bool) -> bool:
    """Whether the sweep keeps each chunk's start state in its last checkpoint slot instead of a buffer of its own
    (sweep.cu's PSTARTSLOT): with the compact shared memory and one segment a chunk."""
    return compact and key_lanes == 32 and segment == chunk


def shared_bytes(K: int, V: int, warps: int, chunk: int, segment: int = SEGMENT, has_dvar: bool = False,
                 dqk_tokens: int = 2, key_lanes: int = 16, compact: bool = False) -> int:
    """Dynamic shared memory of one block (the layout in sweep.cu's header; ``compact``: its PCOMPACT, 32 lanes over K
    only)."""
    elements = K // 8  # a thread's: K / 16 rows of 2 columns, or K / 32 rows of 4
    nq = 4 if has_dvar else 3
    bv = 4 * warps
    sums = 16 * 33 + 4 * dqk_tokens * K if key_lanes == 16 else (16 if compact else 32) * 36
    slots = segment // 4 - (1 if compact else 0)
    start = 0 if start_in_slot(chunk, segment, key_lanes, compact) else 2 * elements * 32
    per_warp = slots * 2 * elements * 32 + start + sums
    return 4 * (2 * chunk * K + chunk * nq * bv + 4 * chunk + warps * per_warp)


def dqk_tokens(K: int, V: int, warps: int, chunk: int, has_dvar: bool, wanted: Optional[int]) -> int:
    """Tokens whose dq and dk the sweep sums at a time (sweep.cu's PDQK): ``wanted`` (2 or 4; None: 2, what the
    GPU checks and timings ran) where a block of ``warps`` warps still fits in shared memory with it, else 2."""
    if wanted not in (None, 2, 4):
        raise ValueError(f"dq and dk are summed per 2 or 4 tokens, got {wanted!r}")
    if wanted == 4 and shared_bytes(K, V, warps, chunk, has_dvar=has_dvar, dqk_tokens=4) <= MAX_SHARED_BYTES:
        return 4
    return 2


def block_warps(K: int, V: int, chunk: int, has_dvar: bool = True, key_lanes: int = 16,
                blocks: int = 1, segment: int = SEGMENT, compact: bool = False) -> Optional[int]:
    """Warps per block for key size K and value size V: the most (8, 4, 2 or 1) whose 4 * warps value columns
    divide V and of whose blocks ``blocks`` fit a multiprocessor's shared memory; None when the sweep cannot run (K
    not a multiple of 16 or above 128)."""
    if K % 16 or not 16 <= K <= 128:
        return None
    for warps in (8, 4, 2, 1):
        smem = shared_bytes(K, V, warps, chunk, segment, has_dvar=has_dvar, key_lanes=key_lanes, compact=compact)
        fits = smem <= MAX_SHARED_BYTES and blocks * (smem + SHARED_RESERVED_PER_BLOCK) <= SHARED_PER_SM
        if V % (4 * warps) == 0 and fits:
            return warps
    return None


def kernel_defines(K: int, V: int, H: int, chunk: int, unit_chunks: int, warps: int, dtype: torch.dtype,
                   has_dvar: bool, has_init: bool, varlen: bool, segment: int = SEGMENT,
                   g_dtype: Optional[torch.dtype] = None, do_dtype: Optional[torch.dtype] = None,
                   aligned: bool = True, dqk: int = 2, lanes: int = 16, blocks: int = 1,
                   ck_first: bool = False, compact: bool = False, pairs: bool = False) -> Dict[str, int]:
    """sweep.cu's compile-time parameters (see its header); ``dtype`` is q's (and k, v, beta's), ``g_dtype`` and
    ``do_dtype`` those of g and of the output gradients (default: ``dtype``); ``aligned``: every staged input
    allows 16-byte vector loads (:func:`palimpsa.ops.cuda.nvrtc.aligned16`); ``dqk``: tokens whose dq and dk are
    summed at a time (:func:`dqk_tokens`, with 16 lanes over K); ``lanes``: lanes over K (:func:`lanes_over_k`);
    ``blocks``: blocks a multiprocessor is to hold (its launch bounds); ``ck_first``: each sub-block's checkpoint
    holds its state after its first token (three states rebuilt a sub-block instead of four); ``compact``, ``pairs``:
    sweep.cu's PCOMPACT and PPAIRS (32 lanes over K only)."""
    if (compact or pairs) and lanes != 32:
        raise ValueError("the sweep's compact shared memory and dq/dk pairs need 32 lanes over K")
    defines = dict(PK=K, PV=V, PH=H, PC=chunk, PU=unit_chunks, PWARPS=warps, PSEG=segment, PDQK=dqk, PKLANES=lanes,
                   PBLOCKS=blocks, PCKFIRST=ck_first, PCOMPACT=compact, PPAIRS=pairs,
                   PSTARTSLOT=start_in_slot(chunk, segment, lanes, compact), PIN=dtype_code(dtype, "q"),
                   PG=dtype_code(g_dtype or dtype, "g"), PDO=dtype_code(do_dtype or dtype, "do"), PDVAR=has_dvar,
                   PINIT=has_init, PVARLEN=varlen, PALIGNED=aligned,
                   PSHARED_BYTES=shared_bytes(K, V, warps, chunk, segment, has_dvar, dqk, lanes, compact))
    return defines


def tuned_blocks(K: int, V: int, chunk: int, has_dvar: bool, lanes: int,
                 compact: bool = False) -> Optional[Tuple[int, int]]:
    """(warps per block, tokens per segment) of :data:`BLOCKS_TUNED` (``compact``: :data:`BLOCKS_TUNED_COMPACT`) for
    key size K with ``lanes`` lanes over K, where 4 * warps divides V and the block fits in shared memory; else None."""
    table = BLOCKS_TUNED_COMPACT if compact else BLOCKS_TUNED
    if lanes != 32 or K not in table:
        return None
    warps, segment = table[K]
    fits = shared_bytes(K, V, warps, chunk, segment, has_dvar, 2, lanes, compact) <= MAX_SHARED_BYTES
    return (warps, segment) if V % (4 * warps) == 0 and fits else None


def block_layout(K: int, V: int, chunk: int, has_dvar: bool, key_lanes: Optional[int] = None,
                 blocks: Optional[int] = None, warps: Optional[int] = None,
                 segment: Optional[int] = None, compact: bool = False) -> Tuple[int, int, int, int]:
    """(lanes over K, warps per block, tokens per segment, blocks per multiprocessor) of the sweep for the options of
    :func:`launch_sweep`; ValueError where they cannot run.  ``compact``: the compact shared memory (PCOMPACT) where
    the lanes over K are 32 (it then sizes the blocks, and picks from :data:`BLOCKS_TUNED_COMPACT`)."""
    if blocks not in (None, 1, 2):
        raise ValueError(f"the CUDA sweep's blocks per multiprocessor must be 1 or 2, got {blocks!r}")
    untuned = (warps, segment, blocks) == (None, None, None)
    blocks = blocks or 1
    if segment not in (None, 4, 8, 16, 32):
        raise ValueError(f"the CUDA sweep's segment must be 4, 8, 16 or 32 tokens, got {segment!r}")
    lanes = lanes_over_k(K, key_lanes) if K % 16 == 0 else 16
    compact = compact and lanes == 32
    tuned = tuned_blocks(K, V, chunk, has_dvar, lanes, compact) if untuned else None
    segment = segment or SEGMENT
    if warps is not None:
        smem = shared_bytes(K, V, warps, chunk, segment, has_dvar, 2, lanes, compact)
        if warps not in (1, 2, 4, 6, 8, 12, 16) or V % (4 * warps) or smem > MAX_SHARED_BYTES:
            raise ValueError(f"the CUDA sweep cannot run {warps!r} warps a block at K = {K}, V = {V} (4 * warps must "
                             f"divide V, warps one of 1, 2, 4, 6, 8, 12, 16, and {smem} bytes of shared memory fit "
                             f"{MAX_SHARED_BYTES})")
    elif tuned is not None:
        warps, segment = tuned
    else:
        warps = block_warps(K, V, chunk, has_dvar, lanes, blocks, segment, compact)
    if warps is None and (lanes, blocks) != (16, 1):  # what was asked for does not fit: 16 lanes over K, one block
        lanes, blocks = 16, 1
        warps = block_warps(K, V, chunk, has_dvar, segment=segment)
    if warps is None:
        raise ValueError(f"the CUDA sweep needs K a multiple of 16 up to 128 and V a multiple of 4, got K = {K}, "
                         f"V = {V}")
    return lanes, warps, segment, blocks


def uses_pairs(K: int, V: int, chunk: int, has_dvar: bool, wanted: Optional[bool] = None, **layout) -> bool:
    """Whether the sweep adds dq and dk as pairs into one interleaved buffer (``wanted``; None: :data:`PAIRS`): only
    where its layout (:func:`block_layout` with the options ``layout``) has 32 lanes over K."""
    wanted = PAIRS if wanted is None else bool(wanted)
    return wanted and block_layout(K, V, chunk, has_dvar, **layout)[0] == 32


def launch_sweep(q, k, v, g, beta, prior, h_mean, h_imp, adj_mean, adj_imp, mu0, imp0, do, dvar, dq, dk, dv, dbeta,
                 dg_part, dg_anchor, dprior_part, dmu0, dimp0, cu_seqlens, unit_indices, chunk_offsets, scale: float,
                 T: int, NU: int, chunk: int, unit_chunks: int, has_init: bool, varlen: bool,
                 dqk: Optional[int] = None, key_lanes: Optional[int] = None, blocks: Optional[int] = None,
                 warps: Optional[int] = None, segment: Optional[int] = None,
                 ck_first: Optional[bool] = None, compact: Optional[bool] = None, pairs: Optional[bool] = None) -> None:
    """Run the sweep over NU units on q's device; arguments as ``unit_bwd_gluon_kernel``'s (q, k [B*T, H, K],
    v, beta, do, dvar [B*T, H, V], g [B*T, H]; k, v, beta, dv, dbeta of q's dtype, g, do and dvar of any
    of bfloat16, float16, float32; dq, dk float32 zero-initialised; dprior_part [V / 4, NU, H]); dvar None without
    a variance gradient.  dg comes as terms (sweep.cu's header): dg_part [B*T, H] per token and dg_anchor [NC, H]
    per chunk of ``chunk`` tokens, both float32 zero-initialised; ``chunk_bwd.dg_from_token_terms`` sums them.
    ``dqk``: tokens whose dq and dk are summed at a time, as :func:`dqk_tokens` allows (None: 2; 16 lanes over K
    only); ``key_lanes``: lanes over K (:func:`lanes_over_k`; None: 32 where K allows); ``blocks``: blocks a
    multiprocessor is to hold (1 or 2: the warps per block follow, :func:`block_warps`; None: 1); ``warps``: warps
    per block instead (4 * warps must divide V, and the block fit in shared memory); ``segment``: tokens per segment
    (4, 8, 16 or 32: a warp keeps segment / 4 sub-block states in shared memory; None: :data:`SEGMENT`).  With none
    of blocks, warps and segment given, :func:`tuned_blocks` where it applies.  ``ck_first``: the sub-blocks'
    checkpoints after their first tokens (None: :data:`CHECKPOINT_AFTER_FIRST`).  ``compact``: the compact shared
    memory (None: :func:`default_compact`; 32 lanes over K only).  ``pairs``: dq and dk are the two halves of one zeroed
    float32 buffer [B*T, H, K, 2] (``dq = buf[..., 0]``, ``dk = buf[..., 1]``, :func:`uses_pairs`), added to as
    pairs."""
    K, V, H = q.shape[-1], v.shape[-1], q.shape[-2]
    has_dvar = dvar is not None
    compact = default_compact(K) if compact is None else bool(compact)
    lanes, warps, segment, blocks = block_layout(K, V, chunk, has_dvar, key_lanes, blocks, warps, segment, compact)
    compact = compact and lanes == 32
    pairs = bool(pairs)
    if pairs and (lanes != 32 or dq.stride(-1) != 2 or dk.data_ptr() != dq.data_ptr() + 4
                  or dq.stride() != dk.stride()):
        raise ValueError("dq/dk pairs need 32 lanes over K and dq, dk the two halves of one [..., K, 2] float32 buffer")
    if has_dvar and dvar.dtype != do.dtype:
        dvar = dvar.to(do.dtype)
    for name, x in (("k", k), ("v", v), ("beta", beta), ("dv", dv), ("dbeta", dbeta)):
        if x.dtype != q.dtype:
            raise TypeError(f"the CUDA sweep needs {name} in q's dtype {q.dtype}, got {x.dtype}")
    dqk = dqk_tokens(K, V, warps, chunk, has_dvar, dqk) if lanes == 16 else 2
    defines = kernel_defines(K, V, H, chunk, unit_chunks, warps, q.dtype, has_dvar, has_init, varlen, segment,
                             g_dtype=g.dtype, do_dtype=do.dtype, aligned=aligned16(K, V, q, k, v, beta, do, dvar),
                             dqk=dqk, lanes=lanes, blocks=blocks,
                             ck_first=CHECKPOINT_AFTER_FIRST if ck_first is None else bool(ck_first),
                             compact=compact, pairs=pairs)
    smem = shared_bytes(K, V, warps, chunk, segment, has_dvar=has_dvar, dqk_tokens=dqk, key_lanes=lanes,
                        compact=compact)
    kernel = load_kernel("sweep.cu", defines, "palimpsa_sweep", smem, q.device)
    kernel((V // (4 * warps), NU, H), 32 * warps,
           (q, k, v, g, beta, prior, h_mean, h_imp, adj_mean, adj_imp, mu0, imp0, do, dvar, dq, dk, dv, dbeta,
            dg_part, dg_anchor, dprior_part, dmu0, dimp0, cu_seqlens, unit_indices, chunk_offsets, float(scale), int(T),
            int(NU)))
