"""Palimpsa outputs in parallel over chunks, written in Gluon (Triton's layout-explicit layer): the per-channel
op's output kernel with the [K, BV] state laid out so that the sum over K of every token needs no shared
memory and no barrier.

Same computation as ``chunk_fwd_kernel`` of :mod:`palimpsa.ops.triton.chunk_fwd` on its chunk path: every
program owns one (chunk, head, block of BV value channels), loads the chunk-start state (M, I) and steps
through the chunk's tokens::

    I = alpha I + (1 - alpha) I0 + k^2 beta^T;   M = alpha M + k v^T;   r = 1 / I
    o = scale * sum_k q M r;                      var = scale^2 * sum_k q^2 r

Why a layout of our own.  Triton's default layout for a [64, 32] tile with 4 warps gives each thread one value
column and each warp a quarter of the key rows, so every token's sum over K crossed warps through shared
memory, and the token's q and k, loaded one element per lane, went through shared memory again to reach the
lanes that hold their rows: six barriers per token (an H200 spent 3.7 ms at the 760M-like shape, 3x the
reciprocal floor).  Here a thread holds KA / LANES consecutive key rows of VCOLS adjacent columns
(``size_per_thread [KA // LANES, VCOLS]``), LANES = 4 * VCOLS lanes share a column group (``threads_per_warp
[LANES, 32 // LANES]``: 8 columns per warp) and the warps split the columns.  VCOLS = 2 (the default at K = 48, 64
and 96, ``config.OUTPUT_TUNED``) converts, scales and squares a token's q and k rows once for two columns:

* the sum over K is a thread-local sum plus log2(LANES) butterfly shuffles, no barrier;
* a thread loads its own rows of q and k as contiguous vectors (the 32 / LANES lanes of a row group read the
  same bytes, served by L1), so no layout conversion is needed;
* per state element and token: the reciprocal (one MUFU instruction) and about six FP32 instructions.

K that is not a power of two (96 = 64 + 32) is held as two row parts A and B, as in the Triton kernel.
Gluon has no CPU interpreter: under ``TRITON_INTERPRET=1`` the same source runs as a plain Triton kernel
(:mod:`palimpsa.ops.triton.gluon_shim`), so the CPU tests check its arithmetic and indexing against the float64
reference; the tests also compile it for sm_90 (barriers, shared memory, reciprocals and shuffles counted),
and ``scripts/gpu_gluon_fwd_check.py`` checks and times it on a GPU.  ``CONFIG.fwd_backend`` chooses it
("auto": on an sm_90 GPU at K = 128, and at K = 48, 64, 96 where NVRTC cannot be loaded; the CUDA C++ output kernel,
palimpsa/ops/cuda/output.cu, was checked and measured faster at those three).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl  # parameter annotations: the interpreter knows only tl.constexpr

from palimpsa.ops.triton.gluon_parts import (allocate_rows, load_rows, load_state, locate_unit, masked_if, reciprocal,
                                             stage_rows)
from palimpsa.ops.triton.gluon_shim import gl, jit
from palimpsa.ops.triton.utils import SequenceLayout, cdiv, k_parts

LANES_PER_COLUMN = gl.constexpr(4)  # default lanes that share one value column (each holds a quarter of the rows)
COLUMNS_PER_WARP = gl.constexpr(8)  # value columns of a warp: 32 lanes / lanes per column * columns per thread
WARP_LANES = gl.constexpr(32)


@jit
def _step(mean, imp, kc, qc, v, beta, alpha, relax, HAS_VAR: tl.constexpr):
    """One token on a state part: the new (M, I), its part of o and of the variance's sum ([BV] each).  kc, qc:
    the token's k and q (times the scale) on the part's key rows, [rows, 1]; v, beta [BV]."""
    imp = alpha * imp + ((kc * kc) * gl.expand_dims(beta, 0) + relax)
    mean = alpha * mean + kc * gl.expand_dims(v, 0)
    r = reciprocal(imp)
    o_part = gl.sum(qc * mean * r, 0)
    var_part = o_part
    if HAS_VAR:
        var_part = gl.sum(qc * qc * r, 0)
    return mean, imp, o_part, var_part


@jit
def _part_rows(q, k, in_rows, j, q_next, k_next, nxt, offs, mask, valid, scale, L: tl.constexpr, K: tl.constexpr,
               C: tl.constexpr, INPUTS: tl.constexpr):
    """A token's q (times the scale) and k on one key part, [rows, 1] in the part's layout L: read from the staged
    chunk (``INPUTS``: its token j, see stage_rows), or formed from the rows loaded one token ahead (q_next, k_next
    [rows]), whose successors (token row ``nxt``) it then loads.  Returns (qc, kc, q_next, k_next)."""
    if INPUTS:
        qc = in_rows.index(j).load(L)
        kc = in_rows.index(C + j).load(L)
    else:
        qc = gl.expand_dims(q_next * scale, 1)
        kc = gl.expand_dims(k_next, 1)
        q_next = load_rows(q, nxt, offs, mask, valid, K)
        k_next = load_rows(k, nxt, offs, mask, valid, K)
    return qc, kc, q_next, k_next


@jit
def chunk_output_gluon_kernel(
    q, k, v, g, beta, prior, h_mean, h_imp, o, var, cu_seqlens, chunk_indices, chunk_offsets, scale, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, KA: tl.constexpr, KB: tl.constexpr,
    NUM_WARPS: tl.constexpr, LANES: tl.constexpr, VCOLS: tl.constexpr, HAS_VAR: tl.constexpr,
    IS_VARLEN: tl.constexpr, INPUTS: tl.constexpr, RA: tl.constexpr, RB: tl.constexpr,
):
    """Grid (V blocks of BV = 8 * NUM_WARPS, chunks, H).  q, k [B*T, H, K]; v, beta [B*T, H, V]; g [B*T, H]
    float32; h_mean, h_imp [chunks, H, K, V] float32 (M and I at every chunk's start); o, var [B*T, H, V].
    LANES lanes share a value column, each holding KA / LANES key rows of VCOLS adjacent columns (LANES = 4 * VCOLS:
    8 columns per warp); two columns per thread share the per-row work (q and k converted, scaled, squared).
    INPUTS: the chunk's q (times the scale) and k rows are staged in shared memory first, float32, by all warps
    together (``gluon_parts.stage_rows``: 48 kB at K = 96), and every token reads its rows there, instead of each
    thread loading and converting its rows of every token from global memory (bf16).  RA, RB: consecutive key
    rows of part A and B a thread holds (``rows_per_thread``)."""
    BV: gl.constexpr = VCOLS * (WARP_LANES // LANES) * NUM_WARPS  # 8 * NUM_WARPS: output_lanes keeps LANES = 4 * VCOLS
    # key rows a thread holds side by side: all of its share (KA / LANES) when they come from global memory; with
    # INPUTS at most 4 (16 bytes), the layout repeating over the rows, so that the eight lanes of a column group
    # read one token's staged rows from shared memory as consecutive 16-byte pieces: with 8 rows (32 bytes) a
    # lane, lanes l and l + 4 of a phase hit the same banks (two-way conflicts on every read at K = 64 and 96)
    LA: gl.constexpr = gl.BlockedLayout([RA, VCOLS], [LANES, WARP_LANES // LANES], [1, NUM_WARPS], [0, 1])
    ROWS_A: gl.constexpr = gl.SliceLayout(1, LA)
    COLS: gl.constexpr = gl.SliceLayout(0, LA)
    HAS_B: gl.constexpr = KB > 0
    i_v = gl.program_id(0)
    i_c = gl.program_id(1)
    i_h = gl.program_id(2)
    # a chunk is a unit of one chunk
    i_n, i_w, bos, eos, _ = locate_unit(i_c, chunk_indices, cu_seqlens, chunk_offsets, T, C, C, IS_VARLEN)
    start = bos + i_w * C
    end = gl.minimum(start + C, eos)

    offs_a = gl.arange(0, KA, layout=ROWS_A)
    mask_a = offs_a < K
    offs_v = i_v * BV + gl.arange(0, BV, layout=COLS)
    mask_v = offs_v < V
    prior_h = gl.load(prior + i_h).to(gl.float32)
    h_off = (i_c * H + i_h).to(gl.int64) * K * V
    mean_a, imp_a = load_state(h_mean, h_imp, h_off, offs_a, offs_v, mask_a, mask_v, V)
    if HAS_B:
        LB: gl.constexpr = gl.BlockedLayout([RB, VCOLS], [LANES, WARP_LANES // LANES], [1, NUM_WARPS], [0, 1])
        ROWS_B: gl.constexpr = gl.SliceLayout(1, LB)
        COLS_B: gl.constexpr = gl.SliceLayout(0, LB)
        offs_b = KA + gl.arange(0, KB, layout=ROWS_B)
        mask_b = offs_b < K
        offs_vb = i_v * BV + gl.arange(0, BV, layout=COLS_B)
        mean_b, imp_b = load_state(h_mean, h_imp, h_off, offs_b, offs_vb, mask_b, offs_vb < V, V)

    if INPUTS:  # the chunk's q and k rows, staged once (see stage_rows); placeholders for the direct loads below
        stage_a, in_a, stage_b, in_b = allocate_rows(C, KA, KB, HAS_B)
        stage_rows(q, k, stage_a, stage_b, start, end - start, i_h, scale, H, K, C, KA, KB, NUM_WARPS, HAS_B)

    # token t's inputs are loaded one iteration ahead, so their latency overlaps token t - 1's arithmetic
    tok_h = start.to(gl.int64) * H + i_h
    valid = start < end
    g_n = gl.load(g + tok_h, mask=valid, other=0.0).to(gl.float32)
    v_n = gl.load(v + tok_h * V + offs_v, mask=masked_if(mask_v, valid), other=0.0).to(gl.float32)
    beta_n = gl.load(beta + tok_h * V + offs_v, mask=masked_if(mask_v, valid), other=0.0).to(gl.float32)
    if INPUTS:  # the rows come from shared memory: placeholders for the ones loaded ahead
        in_a_or_q = in_a
        in_b_or_q = in_b
        q_an = offs_a
        k_an = offs_a
        q_bn = offs_a
        k_bn = offs_a
    else:
        in_a_or_q = q
        in_b_or_q = q
        q_an = load_rows(q, tok_h, offs_a, mask_a, valid, K)
        k_an = load_rows(k, tok_h, offs_a, mask_a, valid, K)
        q_bn = q_an
        k_bn = k_an
        if HAS_B:
            q_bn = load_rows(q, tok_h, offs_b, mask_b, valid, K)
            k_bn = load_rows(k, tok_h, offs_b, mask_b, valid, K)
    for t in range(start, end):
        tok_h = gl.cast(t, gl.int64) * H + i_h
        g_t = g_n
        v_t = v_n
        beta_t = beta_n
        nxt = tok_h + H
        valid = t + 1 < end
        g_n = gl.load(g + nxt, mask=valid, other=0.0).to(gl.float32)
        v_n = gl.load(v + nxt * V + offs_v, mask=masked_if(mask_v, valid), other=0.0).to(gl.float32)
        beta_n = gl.load(beta + nxt * V + offs_v, mask=masked_if(mask_v, valid), other=0.0).to(gl.float32)
        j = t - start
        q_a, k_a, q_an, k_an = _part_rows(q, k, in_a_or_q, j, q_an, k_an, nxt, offs_a, mask_a, valid, scale, LA, K,
                                          C, INPUTS)
        alpha = gl.exp(g_t)
        relax = (1.0 - alpha) * prior_h
        mean_a, imp_a, o_t, var_t = _step(mean_a, imp_a, k_a, q_a, v_t, beta_t, alpha, relax, HAS_VAR)
        if HAS_B:
            q_b, k_b, q_bn, k_bn = _part_rows(q, k, in_b_or_q, j, q_bn, k_bn, nxt, offs_b, mask_b, valid, scale, LB,
                                              K, C, INPUTS)
            # the value columns are spread alike in both parts: these conversions move no data
            mean_b, imp_b, o_b, var_b = _step(mean_b, imp_b, k_b, q_b, gl.convert_layout(v_t, COLS_B),
                                              gl.convert_layout(beta_t, COLS_B), alpha, relax, HAS_VAR)
            o_t += gl.convert_layout(o_b, COLS)
            if HAS_VAR:
                var_t += gl.convert_layout(var_b, COLS)
        gl.store(o + tok_h * V + offs_v, o_t.to(o.dtype.element_ty), mask=mask_v)
        if HAS_VAR:
            gl.store(var + tok_h * V + offs_v, var_t.to(var.dtype.element_ty), mask=mask_v)


def gluon_warps(V: int) -> int:
    """Warps per program: each warp owns 8 value columns; as many as make a block that divides V (at most 4)."""
    for warps in (4, 2, 1):
        if V % (COLUMNS_PER_WARP.value * warps) == 0:
            return warps
    return 1


def fwd_output_gluon(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                     prior: torch.Tensor, scale: float, layout: SequenceLayout, output_variance: bool,
                     states, chunk_size: int = 64, num_warps: Optional[int] = None, cols: int = 1,
                     inputs: bool = False):
    """The chunk path's outputs from chunk-start ``states`` (see ``fwd_output``), by the Gluon kernel.

    q, k [B, T, H, K]; v, beta [B, T, H, V]; g [B, T, H] float32; prior [H] float32; states: (M, I) at every
    chunk's start, [chunks, H, K, V] float32.  Returns o [B, T, H, V] (dtype of q) and var (or None).
    ``cols``: value columns per thread (1 or 2; 4 * cols lanes share a column); ``inputs``: each chunk's q and k
    rows staged in shared memory (see the kernel).
    """
    B, T, H, K = q.shape
    lanes = output_lanes(cols)
    V = v.shape[-1]
    KA, KB = k_parts(K)
    warps = num_warps or gluon_warps(V)
    o = torch.empty(B, T, H, V, device=q.device, dtype=q.dtype)
    var = torch.empty_like(o) if output_variance else o
    chunk_indices, chunk_offsets = layout.chunk_table(chunk_size)
    h_mean, h_imp = states
    grid = (cdiv(V, COLUMNS_PER_WARP.value * warps), layout.num_chunks(chunk_size), H)
    dummy = layout.cu32 if layout.varlen else o
    chunk_output_gluon_kernel[grid](
        q, k, v, g, beta, prior, h_mean, h_imp, o, var, dummy, chunk_indices if layout.varlen else dummy,
        chunk_offsets if layout.varlen else dummy, float(scale), T,
        H=H, K=K, V=V, C=chunk_size, KA=KA, KB=KB, NUM_WARPS=warps, LANES=lanes, VCOLS=cols,
        HAS_VAR=output_variance, IS_VARLEN=layout.varlen, INPUTS=inputs, RA=rows_per_thread(KA, lanes, inputs),
        RB=rows_per_thread(KB, lanes, inputs), num_warps=warps)
    return o, (var if output_variance else None)


def rows_per_thread(rows: int, lanes: int, staged: bool) -> int:
    """Consecutive key rows of a part (``rows`` of them, 0 for an absent part B) that a thread of the output kernel
    holds, ``lanes`` lanes sharing a value column: all of its share, rows / lanes, when they come from global memory;
    at most 4 (16 bytes) when they are ``staged`` in shared memory, the layout then repeating over the rows, so that
    the eight lanes of a column group read a token's rows there as consecutive 16-byte pieces.  With 8 rows (32
    bytes) a lane, lanes l and l + 4 of a phase hit the same banks: two-way conflicts on every read at K = 64 and 96
    (39 % excess shared-memory wavefronts at 760M-like, ``results/bench/ncu_h200_7bb4a53``)."""
    return min(rows // lanes, 4) if staged else rows // lanes


def output_lanes(cols: int) -> int:
    """Lanes per value column of the output kernel for ``cols`` columns per thread (8 columns per warp; every key
    part has at least 16 rows, so each of the at most 8 lanes of a column holds some)."""
    if cols not in (1, 2):
        raise ValueError(f"fwd_cols must be 1 or 2, got {cols!r}")
    return LANES_PER_COLUMN.value * cols


def compile_sm(K: int, V: int, with_variance: bool = False, varlen: bool = False, arch: int = 90, cols: int = 1,
               inputs: bool = False):
    """The kernel compiled for an NVIDIA GPU of compute capability ``arch`` (90: H100/H200) without a GPU, at
    H = 16 heads (Triton's compiled kernel: ``.asm["ptx"]``, ``.asm["cubin"]``, ``.metadata``).  A development
    and test tool: it uses Triton's compiler directly, and it needs a process where TRITON_INTERPRET is off
    (Gluon kernels cannot be interpreted)."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    names = ("q", "k", "v", "g", "beta", "prior", "h_mean", "h_imp", "o", "var", "cu_seqlens", "chunk_indices",
             "chunk_offsets", "scale", "T")
    types = dict(q="*bf16", k="*bf16", v="*bf16", g="*fp32", beta="*bf16", prior="*fp32", h_mean="*fp32",
                 h_imp="*fp32", o="*bf16", var="*bf16", cu_seqlens="*i32", chunk_indices="*i32",
                 chunk_offsets="*i32", scale="fp32", T="i32")
    KA, KB = k_parts(K)
    warps = gluon_warps(V)
    lanes = output_lanes(cols)
    constants = dict(H=16, K=K, V=V, C=64, KA=KA, KB=KB, NUM_WARPS=warps, LANES=lanes, VCOLS=cols,
                     HAS_VAR=with_variance, IS_VARLEN=varlen, INPUTS=inputs, RA=rows_per_thread(KA, lanes, inputs),
                     RB=rows_per_thread(KB, lanes, inputs))
    signature = {name: types[name] for name in names}
    signature.update({name: "constexpr" for name in constants})
    aligned = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(names) if types[name].startswith("*")}
    source = GluonASTSource(chunk_output_gluon_kernel, signature, constants, aligned)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})


def compile_report(K: int, V: int, with_variance: bool = False, varlen: bool = False, arch: int = 90,
                   cols: int = 1, inputs: bool = False) -> dict:
    """Compile the kernel (:func:`compile_sm`) and count what its speed depends on: shared memory bytes,
    barriers, 16-byte shared-memory loads, reciprocals and butterfly shuffles in its PTX (the token loop's, once
    each)."""
    import re

    kernel = compile_sm(K, V, with_variance, varlen, arch, cols, inputs)
    ptx = kernel.asm["ptx"]
    return {"shared": int(kernel.metadata.shared), "barriers": len(re.findall(r"\bbar\.sync|\bbarrier\.", ptx)),
            "shared_vector_loads": len(re.findall(r"\bld\.shared\.v4\.", ptx)),
            "reciprocals": ptx.count("rcp.approx.ftz.f32"), "shuffles": ptx.count("shfl.sync.bfly"),
            "warps": gluon_warps(V), "triton": triton.__version__}
