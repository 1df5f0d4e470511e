"""Chunked simple gated linear attention on tensor cores (Triton), with keys and decays shared by head groups.

The same function as :func:`palimpsa.ops.torch_gla.gla_chunk_torch`: for every query/value head hv (reading
key head hv // G), with S_t = alpha_t S_{t-1} + k_t v_t^T and o_t = scale * q_t^T S_t.  Grouped importance runs
it on the rescaled queries q / iota (one virtual head per importance group); without metaplasticity it is the
whole op.  Inside a chunk of C tokens every decay factor is the exp of a sum of the log decays of the tokens
it spans (:func:`chunk_log_decays`; written e^{b_t - b_s} below): nothing is ever divided by a decay, and no
cumulative sums are subtracted, so g = -1e4 keeps float32 accuracy and g = -inf (a full reset) is exact.

Kernels (grid in brackets; NC chunks, NK / NV blocks of K / Vd):
  forward   ``_fwd_states`` [NK, NV, N*HV]: chunk-start states h_c, sequential over chunks;
            ``_fwd_output`` [NV, NC, N*HV]: o = scale ((q e^b) h_c + tril(e^{b_t - b_s} q k^T) v).
  backward  ``_bwd_states`` [NK, NV, N*HV]: adjoints of the chunk-end states, sequential in reverse;
            ``_bwd_dv`` [NV, NC, N*HV] and ``_bwd_dqk`` [NK, NC, N*HV]: per-chunk gradients in parallel.
            dg is summed per chunk from the pairs of tokens its decay separates (see ``_bwd_dqk``).
Tiles and chunks are smaller for float32 inputs than for bf16 (:func:`_blocks`).
Transposed products are formed from transposed loaded tiles (never by transposing a matrix-product result,
which Triton 3.6 miscompiles on Hopper when it feeds another product).  On a GPU each kernel's warps and
pipeline stages are chosen by Triton's autotuner, per shape (:func:`_tuned`).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from palimpsa.ops.torch_gla import pad_time
from palimpsa.ops.triton.utils import cdiv, interpreting, next_power_of_two

TUNED_CONFIGS = [triton.Config({}, num_warps=w, num_stages=s) for w in (4, 8) for s in (2, 3)]
# Heads with K * Vd at most this (MQAR's 16 x 32, say) run the first configuration untimed: their tiles are mostly
# padding, there is nothing to choose between, and 48 processes of a sweep would each compile all four.
SMALL_HEAD_ELEMENTS = 32 * 32


def one_config_for_small_heads(configs, named_args, **kwargs):
    """Triton's early_config_prune hook: every configuration, or only the first for small heads."""
    args = {**named_args, **kwargs}
    if args["K"] * args["VD"] <= SMALL_HEAD_ELEMENTS:
        return configs[:1]
    return configs


def tuned(*key: str):
    """Decorator: the kernel with num_warps and num_stages chosen on the GPU by measurement (Triton's autotuner,
    once per value of the ``key`` arguments and the dtypes, the choice kept in Triton's cache directory for later
    processes; the kernel must write its outputs whole, so that timing a configuration changes nothing); the
    kernel as it is under the CPU interpreter."""
    def wrap(kernel):
        if interpreting():
            return kernel
        return triton.autotune(configs=TUNED_CONFIGS, key=list(key), cache_results=True,
                               prune_configs_by={"early_config_prune": one_config_for_small_heads})(kernel)
    return wrap


_tuned = tuned("HK", "HV", "K", "VD", "C", "BK", "BV", "PREC")


@triton.jit
def chunk_log_decays(g, i_n, i_h, c, T, H: tl.constexpr, C: tl.constexpr):
    """Log decays of chunk c of sequence i_n and head i_h (g: [N, T, H] float32), each summed over its own tokens.

    Never a difference of cumulative sums (palimpsa/ops/decay.py says why): exact for g = -1e4, and a -inf
    (a full reset) stays -inf, whose exp is the exact 0.  Returns
      from_start [C]: g_0 + ... + g_t;   to_end [C]: g_{t+1} + ... + g_last;   total: the whole chunk's;
      between [C, C]: [t, s] = g_{s+1} + ... + g_t for s < t (0 elsewhere);   between_t [C, C]: [s, t], the same.
    """
    idx = tl.arange(0, C)
    ptr = g + (i_n * T + c * C + idx) * H + i_h
    g_c = tl.load(ptr)
    g_next = tl.load(ptr + H, mask=idx < C - 1, other=0.0)
    rows, cols = idx[:, None], idx[None, :]
    between = tl.cumsum(tl.where(rows > cols, g_c[:, None], 0.0), 0)
    between_t = tl.cumsum(tl.where(cols > rows, g_c[None, :], 0.0), 1)
    return tl.cumsum(g_c, 0), tl.cumsum(g_next, 0, reverse=True), tl.sum(g_c, 0), between, between_t


@triton.jit
def pairs_around(pairs, C: tl.constexpr, PREC: tl.constexpr = "ieee"):
    """[t] = sum of pairs[r, s] over s < t <= r: pairs [C, C] indexed [reader r, writer s].

    Summed without differences of running sums: a pair's term that does not straddle t is never added and then
    taken away again, so where t's decay saturates (every straddling term ~e^-35) the sum keeps its accuracy.
    PREC: the product's precision ("ieee" for float32 inputs; "tf32" rounds each term to 11 significant bits,
    relatively, which bf16 inputs have already rounded to 8).
    """
    rows, cols = tl.arange(0, C)[:, None], tl.arange(0, C)[None, :]
    earlier = tl.where(rows < cols, 1.0, 0.0)  # [s, t]: s < t
    before = tl.dot(pairs, earlier, input_precision=PREC)  # [r, t]: sum over s < t
    return tl.sum(tl.where(rows >= cols, before, 0.0), 0)


@triton.jit
def written_before(written, C: tl.constexpr):
    """[t] = sum of written[s] over s < t (an exclusive running sum, taken without a difference)."""
    rows, cols = tl.arange(0, C)[:, None], tl.arange(0, C)[None, :]
    return tl.sum(tl.where(cols < rows, written[None, :], 0.0), 1)


@_tuned
@triton.jit
def _fwd_states(k, v, g, h0, hs, hT, T, NC,
                HK: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, VD: tl.constexpr, C: tl.constexpr,
                BK: tl.constexpr, BV: tl.constexpr, HAS_INIT: tl.constexpr, STORE_FINAL: tl.constexpr,
                PREC: tl.constexpr):
    i_k, i_v, i_nh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_hv = i_nh // HV, i_nh % HV
    i_hk = i_hv // (HV // HK)
    offs_k = i_k * BK + tl.arange(0, BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    mask_kv = (offs_k[:, None] < K) & (offs_v[None, :] < VD)
    tile = offs_k[:, None] * VD + offs_v[None, :]
    h = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_INIT:
        h += tl.load(h0 + i_nh * K * VD + tile, mask=mask_kv, other=0.0)
    for c in range(NC):
        tl.store(hs + (i_nh * NC + c).to(tl.int64) * K * VD + tile, h.to(hs.dtype.element_ty), mask=mask_kv)
        _, to_end, total, _, _ = chunk_log_decays(g, i_n, i_hk, c, T, HK, C)
        offs_t = c * C + tl.arange(0, C)
        # k^T [BK, C] straight from memory
        k_t = tl.load(k + ((i_n * T + offs_t[None, :]) * HK + i_hk).to(tl.int64) * K + offs_k[:, None],
                      mask=offs_k[:, None] < K, other=0.0)
        v_c = tl.load(v + ((i_n * T + offs_t[:, None]) * HV + i_hv).to(tl.int64) * VD + offs_v[None, :],
                      mask=offs_v[None, :] < VD, other=0.0)
        v_c = (v_c * tl.exp(to_end)[:, None]).to(k_t.dtype)
        h = h * tl.exp(total) + tl.dot(k_t, v_c, input_precision=PREC)
    if STORE_FINAL:
        tl.store(hT + i_nh * K * VD + tile, h, mask=mask_kv)


@_tuned
@triton.jit
def _fwd_output(q, k, v, g, hs, o, scale, T, NC,
                HK: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, VD: tl.constexpr, C: tl.constexpr,
                BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    i_v, c, i_nh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_hv = i_nh // HV, i_nh % HV
    i_hk = i_hv // (HV // HK)
    offs_t = c * C + tl.arange(0, C)
    offs_v = i_v * BV + tl.arange(0, BV)
    b, _, _, between, _ = chunk_log_decays(g, i_n, i_hk, c, T, HK, C)
    acc = tl.zeros([C, BV], dtype=tl.float32)
    scores = tl.zeros([C, C], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        offs_k = i_k * BK + tl.arange(0, BK)
        q_c = tl.load(q + ((i_n * T + offs_t[:, None]) * HV + i_hv).to(tl.int64) * K + offs_k[None, :],
                      mask=offs_k[None, :] < K, other=0.0)
        k_t = tl.load(k + ((i_n * T + offs_t[None, :]) * HK + i_hk).to(tl.int64) * K + offs_k[:, None],
                      mask=offs_k[:, None] < K, other=0.0)
        h = tl.load(hs + (i_nh * NC + c).to(tl.int64) * K * VD + offs_k[:, None] * VD + offs_v[None, :],
                    mask=(offs_k[:, None] < K) & (offs_v[None, :] < VD), other=0.0)
        acc += tl.dot(q_c, h.to(q_c.dtype), input_precision=PREC)
        scores += tl.dot(q_c, k_t, input_precision=PREC)
    causal = tl.arange(0, C)[:, None] >= tl.arange(0, C)[None, :]
    scores = tl.where(causal, scores * tl.exp(between), 0.0)
    v_c = tl.load(v + ((i_n * T + offs_t[:, None]) * HV + i_hv).to(tl.int64) * VD + offs_v[None, :],
                  mask=offs_v[None, :] < VD, other=0.0)
    acc = acc * tl.exp(b)[:, None] + tl.dot(scores.to(v_c.dtype), v_c, input_precision=PREC)
    tl.store(o + ((i_n * T + offs_t[:, None]) * HV + i_hv).to(tl.int64) * VD + offs_v[None, :],
             (scale * acc).to(o.dtype.element_ty), mask=offs_v[None, :] < VD)


@_tuned
@triton.jit
def _bwd_states(q, g, do, dhT, dhs, dh0, scale, T, NC,
                HK: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, VD: tl.constexpr, C: tl.constexpr,
                BK: tl.constexpr, BV: tl.constexpr, HAS_FINAL_GRAD: tl.constexpr, STORE_INIT_GRAD: tl.constexpr,
                PREC: tl.constexpr):
    """dhs[c] = adjoint of the state at the end of chunk c; dh0 = adjoint of the initial state."""
    i_k, i_v, i_nh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_hv = i_nh // HV, i_nh % HV
    i_hk = i_hv // (HV // HK)
    offs_k = i_k * BK + tl.arange(0, BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    mask_kv = (offs_k[:, None] < K) & (offs_v[None, :] < VD)
    tile = offs_k[:, None] * VD + offs_v[None, :]
    dh = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_FINAL_GRAD:
        dh += tl.load(dhT + i_nh * K * VD + tile, mask=mask_kv, other=0.0)
    for i in range(NC):
        c = NC - 1 - i
        tl.store(dhs + (i_nh * NC + c).to(tl.int64) * K * VD + tile, dh.to(dhs.dtype.element_ty), mask=mask_kv)
        b, _, total, _, _ = chunk_log_decays(g, i_n, i_hk, c, T, HK, C)
        offs_t = c * C + tl.arange(0, C)
        q_t = tl.load(q + ((i_n * T + offs_t[None, :]) * HV + i_hv).to(tl.int64) * K + offs_k[:, None],
                      mask=offs_k[:, None] < K, other=0.0)
        do_c = tl.load(do + ((i_n * T + offs_t[:, None]) * HV + i_hv).to(tl.int64) * VD + offs_v[None, :],
                       mask=offs_v[None, :] < VD, other=0.0)
        q_t = (q_t * (scale * tl.exp(b))[None, :]).to(do_c.dtype)
        dh = dh * tl.exp(total) + tl.dot(q_t, do_c, input_precision=PREC)
    if STORE_INIT_GRAD:
        tl.store(dh0 + i_nh * K * VD + tile, dh, mask=mask_kv)


@_tuned
@triton.jit
def _bwd_dv(q, k, g, do, dhs, dv, scale, T, NC,
            HK: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, VD: tl.constexpr, C: tl.constexpr,
            BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    """dv_s = scale sum_{t >= s} (decay s -> t) (q_t . k_s) do_t + (decay s -> chunk end) k_s^T dh_end."""
    i_v, c, i_nh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_hv = i_nh // HV, i_nh % HV
    i_hk = i_hv // (HV // HK)
    offs_t = c * C + tl.arange(0, C)
    offs_v = i_v * BV + tl.arange(0, BV)
    _, to_end, _, _, between_t = chunk_log_decays(g, i_n, i_hk, c, T, HK, C)
    scores_t = tl.zeros([C, C], dtype=tl.float32)  # [s, t] = k_s . q_t
    k_dh = tl.zeros([C, BV], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        offs_k = i_k * BK + tl.arange(0, BK)
        k_c = tl.load(k + ((i_n * T + offs_t[:, None]) * HK + i_hk).to(tl.int64) * K + offs_k[None, :],
                      mask=offs_k[None, :] < K, other=0.0)
        q_t = tl.load(q + ((i_n * T + offs_t[None, :]) * HV + i_hv).to(tl.int64) * K + offs_k[:, None],
                      mask=offs_k[:, None] < K, other=0.0)
        dh = tl.load(dhs + (i_nh * NC + c).to(tl.int64) * K * VD + offs_k[:, None] * VD + offs_v[None, :],
                     mask=(offs_k[:, None] < K) & (offs_v[None, :] < VD), other=0.0)
        scores_t += tl.dot(k_c, q_t, input_precision=PREC)
        k_dh += tl.dot(k_c, dh.to(k_c.dtype), input_precision=PREC)
    later = tl.arange(0, C)[:, None] <= tl.arange(0, C)[None, :]
    scores_t = tl.where(later, scores_t * tl.exp(between_t), 0.0)
    do_c = tl.load(do + ((i_n * T + offs_t[:, None]) * HV + i_hv).to(tl.int64) * VD + offs_v[None, :],
                   mask=offs_v[None, :] < VD, other=0.0)
    grad = scale * tl.dot(scores_t.to(do_c.dtype), do_c, input_precision=PREC) + k_dh * tl.exp(to_end)[:, None]
    tl.store(dv + ((i_n * T + offs_t[:, None]) * HV + i_hv).to(tl.int64) * VD + offs_v[None, :],
             grad.to(dv.dtype.element_ty), mask=offs_v[None, :] < VD)


@_tuned
@triton.jit
def _bwd_dqk(q, k, v, g, hs, do, dhs, dq, dk, dlogdecay, scale, T, NC,
             HK: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, VD: tl.constexpr, C: tl.constexpr,
             BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    """dq, dk (per query head) and this K block's part of the log-decay gradient dg, chunk by chunk.

    dg_t sums, over every (writer s, reader r) pair with s < t <= r, that pair's term of the loss; so inside the
    chunk it is (a) the in-chunk pairs, (b) in-chunk readers of the chunk-start state, (c) in-chunk writers read
    after the chunk, (d) pairs straddling the whole chunk.  Each is summed directly (no reverse running sum over
    the sequence, whose cancellation loses the small gradients of bf16 inputs).
    """
    i_k, c, i_nh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_hv = i_nh // HV, i_nh % HV
    i_hk = i_hv // (HV // HK)
    offs_t = c * C + tl.arange(0, C)
    offs_k = i_k * BK + tl.arange(0, BK)
    b, to_end, total, between, between_t = chunk_log_decays(g, i_n, i_hk, c, T, HK, C)
    d_scores = tl.zeros([C, C], dtype=tl.float32)  # [t, s] = do_t . v_s
    d_scores_t = tl.zeros([C, C], dtype=tl.float32)  # [s, t] = v_s . do_t
    dq_state = tl.zeros([C, BK], dtype=tl.float32)
    dk_state = tl.zeros([C, BK], dtype=tl.float32)
    straddle = tl.zeros([BK], dtype=tl.float32)  # sum over V of h_start * dh_end, this K block
    for i_v in range(tl.cdiv(VD, BV)):
        offs_v = i_v * BV + tl.arange(0, BV)
        row = ((i_n * T + offs_t[:, None]) * HV + i_hv).to(tl.int64) * VD + offs_v[None, :]
        do_c = tl.load(do + row, mask=offs_v[None, :] < VD, other=0.0)
        v_c = tl.load(v + row, mask=offs_v[None, :] < VD, other=0.0)
        do_t = tl.trans(do_c)  # loaded tiles, transposed in the SM (not an accumulator: fla issue 640)
        v_t = tl.trans(v_c)
        state = (i_nh * NC + c).to(tl.int64) * K * VD + offs_v[:, None] + offs_k[None, :] * VD  # [BV, BK]
        mask_vk = (offs_v[:, None] < VD) & (offs_k[None, :] < K)
        h_t = tl.load(hs + state, mask=mask_vk, other=0.0)
        dh_t = tl.load(dhs + state, mask=mask_vk, other=0.0)
        straddle += tl.sum(h_t.to(tl.float32) * dh_t.to(tl.float32), 0)
        d_scores += tl.dot(do_c, v_t, input_precision=PREC)
        d_scores_t += tl.dot(v_c, do_t, input_precision=PREC)
        dq_state += tl.dot(do_c, h_t.to(do_c.dtype), input_precision=PREC)
        dk_state += tl.dot(v_c, dh_t.to(do_c.dtype), input_precision=PREC)
    rows, cols = tl.arange(0, C)[:, None], tl.arange(0, C)[None, :]
    d_scores = tl.where(rows >= cols, d_scores * tl.exp(between), 0.0)
    d_scores_t = tl.where(rows <= cols, d_scores_t * tl.exp(between_t), 0.0)
    q_ptr = ((i_n * T + offs_t[:, None]) * HV + i_hv).to(tl.int64) * K + offs_k[None, :]
    k_ptr = ((i_n * T + offs_t[:, None]) * HK + i_hk).to(tl.int64) * K + offs_k[None, :]
    q_c = tl.load(q + q_ptr, mask=offs_k[None, :] < K, other=0.0)
    k_c = tl.load(k + k_ptr, mask=offs_k[None, :] < K, other=0.0)
    k_t = tl.trans(k_c)
    dq_state = dq_state * (scale * tl.exp(b))[:, None]
    dk_state = dk_state * tl.exp(to_end)[:, None]
    grad_q = dq_state + scale * tl.dot(d_scores.to(k_c.dtype), k_c, input_precision=PREC)
    grad_k = scale * tl.dot(d_scores_t.to(q_c.dtype), q_c, input_precision=PREC) + dk_state
    tl.store(dq + q_ptr, grad_q, mask=offs_k[None, :] < K)
    tl.store(dk + q_ptr, grad_k, mask=offs_k[None, :] < K)  # per query head; summed over a key head's group
    # (a) pairs inside the chunk: sum over r >= t > s of (scale q_r . k_s) e^{b_r - b_s} (do_r . v_s)
    pairs = tl.where(rows > cols, scale * tl.dot(q_c, k_t, input_precision=PREC) * d_scores, 0.0)  # [r, s]
    part = pairs_around(pairs, C, PREC)
    # (b) readers r >= t of the chunk-start state, (c) writers s < t read after the chunk, (d) pairs straddling
    # the chunk
    read = tl.sum(q_c.to(tl.float32) * dq_state, 1)  # [r]
    written = tl.sum(k_c.to(tl.float32) * dk_state, 1)  # [s]
    part += tl.cumsum(read, 0, reverse=True) + written_before(written, C) + tl.exp(total) * tl.sum(straddle, 0)
    tl.store(dlogdecay + ((i_k * tl.num_programs(2) + i_nh) * T + offs_t).to(tl.int64), part)


def _blocks(K: int, VD: int, dtype: torch.dtype):
    """Tile sizes (BK, BV).

    bf16 / fp16 (tensor cores): 64 x 64, masked where K or Vd is smaller.  On an H200 under Triton 3.6, bf16
    value tiles 16 or 32 wide gave illegal memory accesses (Vd = 12, 16, 24; scripts/gpu_gla_blocks_check.py),
    while 64-wide tiles, masked or not, are exact (Vd = 48, 64).
    float32 ("ieee" products, on the FP32 units): K and Vd rounded up to a power of two, 16 to 32 (with chunks
    of at most 32, :data:`FLOAT32_MAX_CHUNK`).  At 64 x 64 with 64-token chunks these products spill 5-20 kB per
    thread on sm_90 (``_bwd_dqk``: 32 registers and about 20 kB of stack, which made an MQAR step of the grouped
    models 3-9x slower than the per-channel one); at these sizes no kernel spills under Triton 3.6 (24 bytes in
    ``_bwd_dqk`` at K = 96, Vd = 192 under 3.9).
    """
    if dtype == torch.float32:
        return (min(32, max(16, next_power_of_two(K))), min(32, max(16, next_power_of_two(VD))))
    return 64, 64


FLOAT32_MAX_CHUNK = 32


def kernel_chunk(T: int, chunk: int, dtype: torch.dtype) -> int:
    """The chunk the kernels run for a sequence of T tokens when ``chunk`` is asked: a power of two from 16, at
    most T rounded up to a power of two, and at most FLOAT32_MAX_CHUNK for float32 inputs (see :func:`_blocks`)."""
    chunk = max(16, min(chunk, next_power_of_two(T)))
    return min(chunk, FLOAT32_MAX_CHUNK) if dtype == torch.float32 else chunk


def _precision(dtype: torch.dtype) -> str:
    """float32 inputs keep float32 products (the check against float64 needs it); bf16/fp16 use tensor cores."""
    return "ieee" if dtype == torch.float32 else "tf32"


class GLAFunction(torch.autograd.Function):
    """Inputs: q [N, T, HV, K]; k [N, T, HK, K]; v [N, T, HV, Vd] (one dtype); g [N, T, HK] float32;
    h0 [N, HV, K, Vd] float32 or None.  T a multiple of ``chunk``.  Outputs o (dtype of q), final state float32."""

    @staticmethod
    def forward(ctx, q, k, v, g, h0, scale, chunk):
        ctx.set_materialize_grads(False)  # an unused final state's gradient comes as None, not a zero fill to read
        N, T, HV, K = q.shape
        HK, VD = k.shape[2], v.shape[-1]
        NC = T // chunk
        BK, BV = _blocks(K, VD, q.dtype)
        prec = _precision(q.dtype)
        state_dtype = torch.float32 if q.dtype == torch.float32 else q.dtype
        hs = q.new_empty(N, HV, NC, K, VD, dtype=state_dtype)
        hT = q.new_empty(N, HV, K, VD, dtype=torch.float32)
        meta = dict(HK=HK, HV=HV, K=K, VD=VD, C=chunk, BK=BK, BV=BV, PREC=prec)
        _fwd_states[(cdiv(K, BK), cdiv(VD, BV), N * HV)](
            k, v, g, h0, hs, hT, T, NC, HAS_INIT=h0 is not None, STORE_FINAL=True, **meta)
        o = torch.empty_like(v)
        _fwd_output[(cdiv(VD, BV), NC, N * HV)](q, k, v, g, hs, o, scale, T, NC, **meta)
        ctx.save_for_backward(q, k, v, g, h0)
        ctx.scale, ctx.chunk, ctx.has_init = scale, chunk, h0 is not None
        return o, hT

    @staticmethod
    def backward(ctx, do, dhT):
        q, k, v, g, h0 = ctx.saved_tensors
        scale, chunk = ctx.scale, ctx.chunk
        N, T, HV, K = q.shape
        HK, VD = k.shape[2], v.shape[-1]
        NC = T // chunk
        BK, BV = _blocks(K, VD, q.dtype)
        prec = _precision(q.dtype)
        state_dtype = torch.float32 if q.dtype == torch.float32 else q.dtype
        meta = dict(HK=HK, HV=HV, K=K, VD=VD, C=chunk, BK=BK, BV=BV, PREC=prec)
        do = torch.zeros_like(v) if do is None else do.to(v.dtype).contiguous()
        # recompute the chunk-start states (cheaper in memory than keeping them from the forward)
        hs = q.new_empty(N, HV, NC, K, VD, dtype=state_dtype)
        _fwd_states[(cdiv(K, BK), cdiv(VD, BV), N * HV)](
            k, v, g, h0, hs, hs, T, NC, HAS_INIT=h0 is not None, STORE_FINAL=False, **meta)
        has_final_grad = dhT is not None
        dhs = torch.empty_like(hs)
        dh0 = q.new_empty(N, HV, K, VD, dtype=torch.float32) if ctx.has_init else None
        _bwd_states[(cdiv(K, BK), cdiv(VD, BV), N * HV)](
            q, g, do, dhT.contiguous() if has_final_grad else None, dhs, dh0, scale, T, NC,
            HAS_FINAL_GRAD=has_final_grad, STORE_INIT_GRAD=ctx.has_init, **meta)
        dv = torch.empty_like(v)
        _bwd_dv[(cdiv(VD, BV), NC, N * HV)](q, k, g, do, dhs, dv, scale, T, NC, **meta)
        NK = cdiv(K, BK)
        # dq in the dtype of q straight from the kernel (the same rounding as a cast after it); dk too when every
        # key head has one query head, else float32 until its sum over the query heads that share it
        dq = q.new_empty(N, T, HV, K)
        dk_per_query = q.new_empty(N, T, HV, K, dtype=q.dtype if HV == HK else torch.float32)
        dlogdecay = q.new_empty(NK, N * HV, T, dtype=torch.float32)
        _bwd_dqk[(NK, NC, N * HV)](q, k, v, g, hs, do, dhs, dq, dk_per_query, dlogdecay, scale, T, NC, **meta)
        G = HV // HK
        dk = dk_per_query.reshape(N, T, HK, G, K).sum(3) if G > 1 else dk_per_query
        # sums over key blocks and over a key head's query heads; a sum over one term is a view (no launch)
        dg = (dlogdecay[0] if NK == 1 else dlogdecay.sum(0)).reshape(N, HK, G, T)
        dg = (dg[:, :, 0] if G == 1 else dg.sum(2)).transpose(1, 2)  # [N, T, HK]
        return dq.to(q.dtype), dk.to(k.dtype), dv, dg, dh0, None, None


@torch.compiler.disable  # a graph break under torch.compile: the kernels and their autograd run as written
def gla_chunk_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, scale: float,
                     initial_state: Optional[torch.Tensor], chunk: int = 64):
    """Same contract as :func:`palimpsa.ops.torch_gla.gla_chunk_torch` (q, k, v in one float dtype; g float32).

    Returns o [N, T, HV, Vd] in the dtype of q and the final state [N, HV, K, Vd] float32.
    """
    T = q.shape[1]
    chunk = kernel_chunk(T, chunk, q.dtype)
    q, k, v, g = (pad_time(x, chunk).contiguous() for x in (q, k, v, g.float()))
    h0 = initial_state.float().contiguous() if initial_state is not None else None
    o, hT = GLAFunction.apply(q, k, v, g, h0, float(scale), chunk)
    return o[:, :T], hT


_POINTERS = {  # each kernel's pointer arguments that take the input dtype; the rest are float32
    "_fwd_states": "k v hs", "_fwd_output": "q k v hs o", "_bwd_states": "q do dhs", "_bwd_dv": "q k do dhs dv",
    "_bwd_dqk": "q k v hs do dhs dq"}
_FLAGS = {"_fwd_states": dict(HAS_INIT=True, STORE_FINAL=True),
          "_bwd_states": dict(HAS_FINAL_GRAD=True, STORE_INIT_GRAD=True)}


def compile_report(kernel: str, K: int, VD: int, dtype: str = "float32", num_warps: int = 4) -> dict:
    """Compile one kernel for sm_90 (no GPU needed) with the tiles and chunk that ``dtype`` inputs get (a long
    sequence) and the first autotuning configuration's stages, and report its registers and stack bytes (spills):
    {"kernel", "registers", "stack", "BK", "BV", "C"}."""
    from palimpsa.bench.sass import compile_report as compile_for_sm90

    torch_dtype = getattr(torch, dtype)
    fn = globals()[kernel]
    while not isinstance(fn, triton.runtime.JITFunction):  # (under the autotuner)
        fn = fn.fn
    BK, BV = _blocks(K, VD, torch_dtype)
    C = kernel_chunk(4096, 64, torch_dtype)  # a long sequence at the default chunk
    pointer = {"float32": "*fp32", "bfloat16": "*bf16", "float16": "*fp16"}[dtype]
    types = {name: pointer for name in _POINTERS[kernel].split()}
    types.update(scale="fp32", T="i32", NC="i32")
    if kernel == "_bwd_dqk":
        types["dk"] = pointer  # one key head per query head (HK = HV = 1 here): dk in the input dtype
    constexprs = dict(HK=1, HV=1, K=K, VD=VD, C=C, BK=BK, BV=BV, PREC=_precision(torch_dtype),
                      **_FLAGS.get(kernel, {}))
    args = {a: types.get(a, "*fp32") for a in fn.arg_names}  # in order; the constexprs override their entries
    # the first autotuning configuration's stages: what small heads run untimed (see one_config_for_small_heads)
    report = compile_for_sm90(fn, args, num_warps, kernel, constexprs=constexprs,
                              num_stages=TUNED_CONFIGS[0].num_stages)
    return {"kernel": kernel, "registers": report["registers"], "stack": report["stack"], "BK": BK, "BV": BV, "C": C}
