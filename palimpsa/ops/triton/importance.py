"""The grouped importance scan on a GPU (Triton), fused with what the grouped path needs from it: the rescaled
query q~ = q / iota [N, T, H, G, K], the variance's sum_k q^2 / iota, the last importance; and the backward.

Same function as :func:`palimpsa.ops.torch_gla.importance_scan_torch` followed by the division::

    iota_t = I0 + J_t,   J_t = alpha_t J_{t-1} + (k_t ** 2) beta_t[j]      (one [K] row per group j)

One program per (block of key channels, sequence, head, group) walks the chunks in order; inside a chunk the
scan is one product of the causal decay matrix (exp of the log decays between two tokens, summed per segment:
:func:`palimpsa.ops.triton.gla.chunk_log_decays`) with the chunk's writes (float32 throughout: the importance is
a denominator).  iota itself is never stored: only J at each chunk's start, from which the backward recomputes
the chunk's iota exactly as the forward made it.  The backward walks the chunks in reverse with the adjoint
lambda_t = d iota_t + alpha_{t+1} lambda_{t+1} (the same product with the transposed decay matrix), where
d iota = -dq~ q / iota^2 (and the variance's term), and gives dq = dq~ / iota, dbeta_t[j] = sum_k lambda k^2,
dk_t = 2 k sum_j beta_t[j] lambda[j], and the decay gradient summed per chunk from the (writer, reader) pairs
each decay separates (see ``_scan_bwd``).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from palimpsa.ops.torch_gla import pad_time
from palimpsa.ops.triton.gla import chunk_log_decays, pairs_around, written_before


@triton.jit
def _scan_fwd(q, k, g, beta, prior, excess0, q_tilde, var_part, starts, T, NC,
              H: tl.constexpr, G: tl.constexpr, K: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
              HAS_BETA: tl.constexpr, HAS_INIT: tl.constexpr, WITH_VAR: tl.constexpr):
    """Chunks in order: iota of every token (never stored), q~ = q / iota, this block's part of
    sum_k q^2 / iota (the variance) and J at every chunk's start (``starts``; index NC: after the last)."""
    i_nhg, i_k = tl.program_id(0), tl.program_id(1)  # N H G on the axis without the 65535 limit
    i_n, i_h, i_j = i_nhg // (H * G), (i_nhg // G) % H, i_nhg % G
    part_at = (i_k * tl.num_programs(0)).to(tl.int64) * T  # this K block's slice of var_part
    offs_k = i_k * BK + tl.arange(0, BK)
    mask_k = offs_k < K
    rows, cols = tl.arange(0, C)[:, None], tl.arange(0, C)[None, :]
    prior_h = tl.load(prior + i_h)
    excess = tl.zeros([BK], dtype=tl.float32)  # J at the chunk's start
    if HAS_INIT:
        excess += tl.load(excess0 + i_nhg * K + offs_k, mask=mask_k, other=0.0)
    for c in range(NC):
        offs_t = c * C + tl.arange(0, C)
        tl.store(starts + (i_nhg * (NC + 1) + c).to(tl.int64) * K + offs_k, excess, mask=mask_k)
        b, to_end, total, between, _ = chunk_log_decays(g, i_n, i_h, c, T, H, C)
        J = tl.exp(b)[:, None] * excess[None, :]
        if HAS_BETA:
            k_c = tl.load(k + ((i_n * T + offs_t[:, None]) * H + i_h).to(tl.int64) * K + offs_k[None, :],
                          mask=mask_k[None, :], other=0.0).to(tl.float32)
            beta_c = tl.load(beta + ((i_n * T + offs_t) * H + i_h) * G + i_j)
            writes = k_c * k_c * beta_c[:, None]
            decay = tl.where(rows >= cols, tl.exp(between), 0.0)
            J += tl.dot(decay, writes, input_precision="ieee")
            excess = excess * tl.exp(total) + tl.sum(tl.exp(to_end)[:, None] * writes, 0)
        else:
            excess = excess * tl.exp(total)
        iota = J + prior_h
        q_c = tl.load(q + ((i_n * T + offs_t[:, None]) * H + i_h).to(tl.int64) * K + offs_k[None, :],
                      mask=mask_k[None, :], other=0.0).to(tl.float32)
        out = (((i_n * T + offs_t[:, None]) * H + i_h) * G + i_j).to(tl.int64) * K + offs_k[None, :]
        tl.store(q_tilde + out, (q_c / iota).to(q_tilde.dtype.element_ty), mask=mask_k[None, :])
        if WITH_VAR:  # masked key channels have q = 0
            tl.store(var_part + part_at + ((i_n * T + offs_t) * H + i_h) * G + i_j, tl.sum(q_c * q_c / iota, 1))
    tl.store(starts + (i_nhg * (NC + 1) + NC).to(tl.int64) * K + offs_k, excess, mask=mask_k)


@triton.jit
def _scan_bwd(q, k, g, beta, prior, starts, excess0, d_q_tilde, d_var, d_iota_last, dq_part, d_beta, d_k, d_g,
              d_prior_part, d_excess0, T, NC,
              H: tl.constexpr, G: tl.constexpr, K: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
              HAS_BETA: tl.constexpr, HAS_INIT: tl.constexpr, WITH_VAR: tl.constexpr, HAS_LAST: tl.constexpr):
    """Chunks in reverse: iota recomputed from the chunk's start (as the forward made it), the gradients of
    q~ = q / iota and of the variance give dq (per group) and d iota, then the adjoint walk of the scan,
    lambda_t = d iota_t + alpha_{t+1} lambda_{t+1}, one program per (K block, sequence, head, group).

    The adjoint is independent per key channel, so each program takes BK of them (few enough tiles to stay in
    registers); d_beta, d_g and d_prior, sums over the key channels, get this block's part (summed after).
    dg_t sums the terms of every (writer s, reader r) pair with s < t <= r, as the GLA backward does: pairs inside
    the chunk, readers of the chunk-start state, writers read after the chunk, pairs straddling the chunk.  Summed
    directly (no reverse running sum), dg keeps its relative accuracy where a decay saturates.
    """
    i_nhg, i_k = tl.program_id(0), tl.program_id(1)  # N H G on the axis without the 65535 limit
    i_n, i_h, i_j = i_nhg // (H * G), (i_nhg // G) % H, i_nhg % G
    part_at = (i_k * tl.num_programs(0)).to(tl.int64) * T  # this K block's slice of the partial sums d_beta, d_g
    offs_k = i_k * BK + tl.arange(0, BK)
    mask_k = offs_k < K
    rows, cols = tl.arange(0, C)[:, None], tl.arange(0, C)[None, :]
    prior_h = tl.load(prior + i_h)
    carry = tl.zeros([BK], dtype=tl.float32)  # adjoint of J at the end of the chunk, from later tokens
    if HAS_LAST:  # the gradient of the last importance (the final state) is one of J at the very end
        carry += tl.load(d_iota_last + i_nhg * K + offs_k, mask=mask_k, other=0.0)
    d_prior = tl.zeros([BK], dtype=tl.float32)
    for i in range(NC):
        c = NC - 1 - i
        offs_t = c * C + tl.arange(0, C)
        b, to_end, total, between, between_t = chunk_log_decays(g, i_n, i_h, c, T, H, C)
        tok = (((i_n * T + offs_t[:, None]) * H + i_h) * G + i_j).to(tl.int64) * K + offs_k[None, :]
        start = tl.load(starts + (i_nhg * (NC + 1) + c).to(tl.int64) * K + offs_k, mask=mask_k, other=0.0)
        J = tl.exp(b)[:, None] * start[None, :]
        if HAS_BETA:
            k_c = tl.load(k + ((i_n * T + offs_t[:, None]) * H + i_h).to(tl.int64) * K + offs_k[None, :],
                          mask=mask_k[None, :], other=0.0).to(tl.float32)
            beta_c = tl.load(beta + ((i_n * T + offs_t) * H + i_h) * G + i_j)
            k2 = k_c * k_c
            decay = tl.where(rows >= cols, tl.exp(between), 0.0)
            J += tl.dot(decay, k2 * beta_c[:, None], input_precision="ieee")
        inv = 1.0 / (J + prior_h)
        q_c = tl.load(q + ((i_n * T + offs_t[:, None]) * H + i_h).to(tl.int64) * K + offs_k[None, :],
                      mask=mask_k[None, :], other=0.0).to(tl.float32)
        dq_c = tl.load(d_q_tilde + tok, mask=mask_k[None, :], other=0.0).to(tl.float32) * inv
        d_iota_c = -dq_c * q_c * inv
        if WITH_VAR:  # d_var is already scaled by scale^2
            d_sq = tl.load(d_var + ((i_n * T + offs_t) * H + i_h) * G + i_j)[:, None] * inv
            dq_c += 2.0 * q_c * d_sq
            d_iota_c -= d_sq * q_c * q_c * inv
        tl.store(dq_part + tok, dq_c, mask=mask_k[None, :])
        d_prior += tl.sum(d_iota_c, 0)
        later = rows <= cols  # [t, r]: r >= t
        lam = tl.dot(tl.where(later, tl.exp(between_t), 0.0), d_iota_c, input_precision="ieee") \
            + tl.exp(to_end)[:, None] * carry[None, :]
        read = tl.exp(b) * tl.sum(d_iota_c * start[None, :], 1)  # [r]: readers of the chunk-start state
        part = tl.cumsum(read, 0, reverse=True) + tl.exp(total) * tl.sum(carry * start, 0)
        if HAS_BETA:
            k_t = tl.load(k + ((i_n * T + offs_t[None, :]) * H + i_h).to(tl.int64) * K + offs_k[:, None],
                          mask=mask_k[:, None], other=0.0).to(tl.float32)
            tl.store(d_beta + part_at + ((i_n * T + offs_t) * H + i_h) * G + i_j, tl.sum(lam * k2, 1))
            tl.store(d_k + tok, 2.0 * k_c * lam * beta_c[:, None], mask=mask_k[None, :])
            writes_t = k_t * k_t * beta_c[None, :]  # [BK, s]
            pairs = tl.dot(d_iota_c, writes_t, input_precision="ieee")  # [r, s] = <d iota_r, X_s>
            pairs = tl.where(rows > cols, pairs * tl.exp(between), 0.0)
            written = tl.exp(to_end) * tl.sum(carry[None, :] * k2, 1) * beta_c  # [s]: read after the chunk
            part += pairs_around(pairs, C) + written_before(written, C)
        tl.store(d_g + part_at + (i_nhg * T + offs_t).to(tl.int64), part)
        carry = carry * tl.exp(total) + tl.sum(tl.exp(b)[:, None] * d_iota_c, 0)
    tl.store(d_prior_part + (i_k * tl.num_programs(0) + i_nhg) * BK + tl.arange(0, BK), d_prior)
    if HAS_INIT:
        tl.store(d_excess0 + i_nhg * K + offs_k, carry, mask=mask_k)


def _key_block(K: int) -> int:
    """Key channels per program: at most 32, so that a program's [C, BK] float32 tiles fit in registers (with the
    whole K = 96 in one program the backward took 43 ms at the 760M-like shape on an H200, 38x the forward)."""
    return max(16, min(32, triton.next_power_of_2(K)))


class RescaledQueryFunction(torch.autograd.Function):
    """The importance scan and what the grouped path takes from it, in one kernel each way: iota is never stored
    (the backward recomputes it chunk by chunk from the J saved at chunk starts, [N H G, NC + 1, K]).

    Inputs: q, k [N, T, H, K] (one float dtype); g [N, T, H] float32; beta [N, T, H, G] float32 or None;
    prior [H] float32; excess0 [N, H, G, K] float32 or None; T a multiple of ``chunk``.
    Outputs: q~ = q / iota [N, T, H, G, K] in the dtype of q; the variance scale^2 sum_k q^2 / iota
    [N, T, H, G] float32 (None unless ``with_variance``); iota at the last token [N, H, G, K] float32.
    """

    @staticmethod
    def forward(ctx, q, k, g, beta, prior, excess0, groups, chunk, scale, with_variance):
        N, T, H, K = k.shape
        G, NC, BK = groups, T // chunk, _key_block(K)
        NK = triton.cdiv(K, BK)
        f32 = dict(dtype=torch.float32, device=k.device)
        q_tilde = torch.empty(N, T, H, G, K, dtype=q.dtype, device=q.device)
        var_part = torch.empty(NK, N, T, H, G, **f32) if with_variance else None
        starts = torch.empty(N * H * G, NC + 1, K, **f32)
        meta = dict(H=H, G=G, K=K, C=chunk, BK=BK, HAS_BETA=beta is not None, HAS_INIT=excess0 is not None)
        _scan_fwd[(N * H * G, NK)](q, k, g, beta, prior, excess0, q_tilde, var_part, starts, T, NC,
                                   WITH_VAR=with_variance, **meta)
        variance = (scale ** 2) * var_part.sum(0) if with_variance else None
        iota_last = starts[:, NC].reshape(N, H, G, K) + prior[None, :, None, None]
        ctx.save_for_backward(q, k, g, beta, prior, excess0, starts)
        ctx.meta, ctx.scale = meta, scale
        return q_tilde, variance, iota_last

    @staticmethod
    def backward(ctx, d_q_tilde, d_variance, d_iota_last):
        q, k, g, beta, prior, excess0, starts = ctx.saved_tensors
        meta = ctx.meta
        N, T, H, K = k.shape
        G, BK = meta["G"], meta["BK"]
        NK = triton.cdiv(K, BK)
        f32 = dict(dtype=torch.float32, device=k.device)
        d_q_tilde = (torch.zeros(N, T, H, G, K, **f32) if d_q_tilde is None else d_q_tilde.contiguous())
        d_var = ((ctx.scale ** 2) * d_variance.float()).contiguous() if d_variance is not None else None
        d_last = d_iota_last.float().contiguous() if d_iota_last is not None else None
        dq_part = torch.empty(N, T, H, G, K, **f32)
        d_beta = torch.empty(NK, *beta.shape, **f32) if beta is not None else None
        d_k = torch.empty(N, T, H, G, K, **f32) if beta is not None else None
        d_g = torch.empty(NK, N, H, G, T, **f32)
        d_prior_part = torch.empty(NK, N * H * G, BK, **f32)
        d_excess0 = torch.empty(N, H, G, K, **f32) if meta["HAS_INIT"] else None
        _scan_bwd[(N * H * G, NK)](q, k, g, beta, prior, starts, excess0, d_q_tilde, d_var, d_last, dq_part,
                                   d_beta, d_k, d_g, d_prior_part, d_excess0, T, T // meta["C"],
                                   WITH_VAR=d_var is not None, HAS_LAST=d_last is not None,
                                   num_warps=8, **meta)  # 8 warps: its [C, C] tiles in registers
        dq = dq_part.sum(3) if G > 1 else dq_part[:, :, :, 0]
        dk = (d_k.sum(3) if G > 1 else d_k[:, :, :, 0]) if d_k is not None else None
        dg = d_g.sum((0, 3)).transpose(1, 2)  # [N, T, H]
        d_prior = d_prior_part.reshape(NK, N, H, G, BK).sum((0, 1, 3, 4))
        if d_last is not None:
            d_prior = d_prior + d_last.sum((0, 2, 3))
        return (dq.to(q.dtype), dk.to(k.dtype) if dk is not None else None, dg,
                d_beta.sum(0) if d_beta is not None else None, d_prior, d_excess0, None, None, None, None)


@torch.compiler.disable  # a graph break under torch.compile: the kernels and their autograd run as written
def rescaled_query_triton(q: torch.Tensor, k: torch.Tensor, g: torch.Tensor, beta: Optional[torch.Tensor],
                          prior: torch.Tensor, initial_excess: Optional[torch.Tensor], groups: int, chunk: int,
                          scale: float, with_variance: bool):
    """q / iota per group, the variance's per-group factor and the last importance (see RescaledQueryFunction).

    q, k: [N, T, H, K] (one float dtype); g [N, T, H]; beta [N, T, H, G] or None; prior [H];
    initial_excess: J_0 = I_initial - I0 [N, H, G, K] or None.  Returns (q~ [N, T, H, G, K] in the dtype of q,
    variance [N, T, H, G] float32 or None, iota_T [N, H, G, K] float32).
    """
    T = q.shape[1]
    chunk = max(16, min(chunk, triton.next_power_of_2(T)))
    q, k = pad_time(q, chunk).contiguous(), pad_time(k, chunk).contiguous()
    g = pad_time(g.float(), chunk).contiguous()
    beta = pad_time(beta.float(), chunk).contiguous() if beta is not None else None
    excess0 = initial_excess.float().contiguous() if initial_excess is not None else None
    q_tilde, variance, iota_last = RescaledQueryFunction.apply(q, k, g, beta, prior.float().contiguous(), excess0,
                                                               groups, chunk, float(scale), with_variance)
    # padded tokens (g = 0, beta = 0) leave the importance unchanged: iota at the padded end is iota at T - 1
    return q_tilde[:, :T], (variance[:, :T] if variance is not None else None), iota_last
