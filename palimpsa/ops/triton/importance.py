"""The grouped importance scan on a GPU (Triton): iota [N, T, H, G, K] at every token, and its backward.

Same function as :func:`palimpsa.ops.torch_gla.importance_scan_torch`::

    iota_t = I0 + J_t,   J_t = alpha_t J_{t-1} + (k_t ** 2) beta_t[j]      (one [K] row per group j)

One program per (block of key channels, sequence, head, group) walks the chunks in order; inside a chunk the
scan is one product of the causal decay matrix (exp of the log decays between two tokens, summed per segment:
:func:`palimpsa.ops.triton.gla.chunk_log_decays`) with the chunk's writes (float32 throughout: the importance is
a denominator).  The backward walks the chunks in reverse with the adjoint
lambda_t = d iota_t + alpha_{t+1} lambda_{t+1} (the same product with the transposed decay matrix) and gives
dbeta_t[j] = sum_k lambda k^2, dk_t = 2 k sum_j beta_t[j] lambda[j], and the decay gradient summed per chunk
from the (writer, reader) pairs each decay separates (see ``_scan_bwd``).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from palimpsa.ops.torch_gla import pad_time
from palimpsa.ops.triton.gla import chunk_log_decays, pairs_around, written_before


@triton.jit
def _scan_fwd(k, g, beta, prior, excess0, iota, T, NC,
              H: tl.constexpr, G: tl.constexpr, K: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
              HAS_BETA: tl.constexpr, HAS_INIT: tl.constexpr):
    i_k, i_nhg = tl.program_id(0), tl.program_id(1)
    i_n, i_h, i_j = i_nhg // (H * G), (i_nhg // G) % H, i_nhg % G
    offs_k = i_k * BK + tl.arange(0, BK)
    mask_k = offs_k < K
    rows, cols = tl.arange(0, C)[:, None], tl.arange(0, C)[None, :]
    prior_h = tl.load(prior + i_h)
    excess = tl.zeros([BK], dtype=tl.float32)
    if HAS_INIT:
        excess += tl.load(excess0 + i_nhg * K + offs_k, mask=mask_k, other=0.0)
    for c in range(NC):
        offs_t = c * C + tl.arange(0, C)
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
        out = (((i_n * T + offs_t[:, None]) * H + i_h) * G + i_j).to(tl.int64) * K + offs_k[None, :]
        tl.store(iota + out, J + prior_h, mask=mask_k[None, :])


@triton.jit
def _scan_bwd(k, g, beta, prior, iota, excess0, d_iota, d_beta, d_k, d_g, d_excess0, T, NC,
              H: tl.constexpr, G: tl.constexpr, K: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
              HAS_BETA: tl.constexpr, HAS_INIT: tl.constexpr):
    """Reverse walk over the chunks with the adjoint lambda, one program per (K block, sequence, head, group).

    The adjoint is independent per key channel, so each program takes BK of them (few enough tiles to stay in
    registers); d_beta and d_g, sums over the key channels, get this block's part ([NK, ...], summed after).
    dg_t sums the terms of every (writer s, reader r) pair with s < t <= r, as the GLA backward does: pairs inside
    the chunk, readers of the chunk-start state, writers read after the chunk, pairs straddling the chunk.  Summed
    directly (no reverse running sum), dg keeps its relative accuracy where a decay saturates.
    """
    i_k, i_nhg = tl.program_id(0), tl.program_id(1)
    i_n, i_h, i_j = i_nhg // (H * G), (i_nhg // G) % H, i_nhg % G
    part_at = (i_k * tl.num_programs(1)).to(tl.int64) * T  # this K block's slice of the partial sums d_beta, d_g
    offs_k = i_k * BK + tl.arange(0, BK)
    mask_k = offs_k < K
    rows, cols = tl.arange(0, C)[:, None], tl.arange(0, C)[None, :]
    prior_h = tl.load(prior + i_h)
    carry = tl.zeros([BK], dtype=tl.float32)  # adjoint of J at the end of the chunk, from later tokens
    for i in range(NC):
        c = NC - 1 - i
        offs_t = c * C + tl.arange(0, C)
        b, to_end, total, between, between_t = chunk_log_decays(g, i_n, i_h, c, T, H, C)
        tok = (((i_n * T + offs_t[:, None]) * H + i_h) * G + i_j).to(tl.int64) * K + offs_k[None, :]
        d_iota_c = tl.load(d_iota + tok, mask=mask_k[None, :], other=0.0)
        later = rows <= cols  # [t, r]: r >= t
        lam = tl.dot(tl.where(later, tl.exp(between_t), 0.0), d_iota_c, input_precision="ieee") \
            + tl.exp(to_end)[:, None] * carry[None, :]
        # J at the chunk's start: the last token of the previous chunk, or the initial excess
        start = tl.zeros([BK], dtype=tl.float32)
        if c > 0:
            prev = ((((i_n * T + c * C - 1) * H + i_h) * G + i_j).to(tl.int64)) * K + offs_k
            start += tl.load(iota + prev, mask=mask_k, other=0.0) - prior_h
        elif HAS_INIT:
            start += tl.load(excess0 + i_nhg * K + offs_k, mask=mask_k, other=0.0)
        read = tl.exp(b) * tl.sum(d_iota_c * start[None, :], 1)  # [r]: readers of the chunk-start state
        part = tl.cumsum(read, 0, reverse=True) + tl.exp(total) * tl.sum(carry * start, 0)
        if HAS_BETA:
            k_c = tl.load(k + ((i_n * T + offs_t[:, None]) * H + i_h).to(tl.int64) * K + offs_k[None, :],
                          mask=mask_k[None, :], other=0.0).to(tl.float32)
            k_t = tl.load(k + ((i_n * T + offs_t[None, :]) * H + i_h).to(tl.int64) * K + offs_k[:, None],
                          mask=mask_k[:, None], other=0.0).to(tl.float32)
            beta_c = tl.load(beta + ((i_n * T + offs_t) * H + i_h) * G + i_j)
            k2 = k_c * k_c
            lam_k2 = tl.sum(lam * k2, 1)
            tl.store(d_beta + part_at + ((i_n * T + offs_t) * H + i_h) * G + i_j, lam_k2)
            tl.store(d_k + tok, 2.0 * k_c * lam * beta_c[:, None], mask=mask_k[None, :])
            writes_t = k_t * k_t * beta_c[None, :]  # [BK, s]
            pairs = tl.dot(d_iota_c, writes_t, input_precision="ieee")  # [r, s] = <d iota_r, X_s>
            pairs = tl.where(rows > cols, pairs * tl.exp(between), 0.0)
            written = tl.exp(to_end) * tl.sum(carry[None, :] * k2, 1) * beta_c  # [s]: read after the chunk
            part += pairs_around(pairs, C) + written_before(written, C)
        tl.store(d_g + part_at + (i_nhg * T + offs_t).to(tl.int64), part)
        carry = carry * tl.exp(total) + tl.sum(tl.exp(b)[:, None] * d_iota_c, 0)
    if HAS_INIT:
        tl.store(d_excess0 + i_nhg * K + offs_k, carry, mask=mask_k)


def _key_block(K: int) -> int:
    """Key channels per program: at most 32, so that a program's [C, BK] float32 tiles fit in registers (with the
    whole K = 96 in one program the backward took 43 ms at the 760M-like shape on an H200, 38x the forward)."""
    return max(16, min(32, triton.next_power_of_2(K)))


def _scan_forward(k, g, beta, prior, excess0, groups: int, chunk: int):
    """iota [N, T, H, G, K] float32 and the launch constants.  k [N, T, H, K] (any float dtype: read as float32);
    g [N, T, H] float32; beta [N, T, H, G] float32 or None; prior [H] float32; excess0 [N, H, G, K] or None."""
    N, T, H, K = k.shape
    iota = torch.empty(N, T, H, groups, K, dtype=torch.float32, device=k.device)
    meta = dict(H=H, G=groups, K=K, C=chunk, BK=_key_block(K), HAS_BETA=beta is not None,
                HAS_INIT=excess0 is not None)
    _scan_fwd[(triton.cdiv(K, meta["BK"]), N * H * groups)](k, g, beta, prior, excess0, iota, T, T // chunk, **meta)
    return iota, meta


def _scan_backward(k, g, beta, prior, iota, excess0, d_iota, meta):
    """Gradients of the scan from d_iota [N, T, H, G, K] float32: (dk [N, T, H, K] float32, dg [N, T, H],
    dbeta [N, T, H, G] or None, dprior [H], d_excess0 [N, H, G, K] or None)."""
    N, T, H, K = k.shape
    G = meta["G"]
    d_iota = d_iota.contiguous()
    NK = triton.cdiv(K, meta["BK"])
    f32 = dict(dtype=torch.float32, device=k.device)
    d_beta = torch.empty(NK, *beta.shape, **f32) if beta is not None else None
    d_k = torch.empty(N, T, H, G, K, **f32) if beta is not None else None
    d_g = torch.empty(NK, N, H, G, T, **f32)
    d_excess0 = torch.empty(N, H, G, K, **f32) if meta["HAS_INIT"] else None
    _scan_bwd[(NK, N * H * G)](k, g, beta, prior, iota, excess0, d_iota, d_beta, d_k, d_g, d_excess0, T,
                               T // meta["C"], num_warps=8, **meta)  # 8 warps: its [C, C] tiles in registers
    d_beta = d_beta.sum(0) if d_beta is not None else None
    dk = d_k.sum(3) if d_k is not None else None
    dg = d_g.sum((0, 3)).transpose(1, 2)  # [N, T, H]
    return dk, dg, d_beta, d_iota.sum((0, 1, 3, 4)), d_excess0


class RescaledQueryFunction(torch.autograd.Function):
    """The importance scan and what the grouped path takes from it, keeping no [N, T, H, G, K] tensor for the
    backward (iota is recomputed there: one more forward scan, cheaper than storing it in float32).

    Inputs: q, k [N, T, H, K] (one float dtype); g [N, T, H] float32; beta [N, T, H, G] float32 or None;
    prior [H] float32; excess0 [N, H, G, K] float32 or None; T a multiple of ``chunk``.
    Outputs: q~ = q / iota [N, T, H, G, K] in the dtype of q; the variance scale^2 sum_k q^2 / iota
    [N, T, H, G] float32 (None unless ``with_variance``); iota at the last token [N, H, G, K] float32.
    """

    @staticmethod
    def forward(ctx, q, k, g, beta, prior, excess0, groups, chunk, scale, with_variance):
        iota, meta = _scan_forward(k, g, beta, prior, excess0, groups, chunk)
        qf = q.float()[:, :, :, None, :]
        q_tilde = (qf / iota).to(q.dtype)
        variance = (scale ** 2) * (qf * qf / iota).sum(-1) if with_variance else None
        ctx.save_for_backward(q, k, g, beta, prior, excess0)
        ctx.meta, ctx.scale = meta, scale
        return q_tilde, variance, iota[:, -1].clone()

    @staticmethod
    def backward(ctx, d_q_tilde, d_variance, d_iota_last):
        q, k, g, beta, prior, excess0 = ctx.saved_tensors
        meta = ctx.meta
        iota, _ = _scan_forward(k, g, beta, prior, excess0, meta["G"], meta["C"])
        inv = iota.reciprocal()
        qf = q.float()[:, :, :, None, :]
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        d_iota = torch.zeros_like(inv)
        if d_q_tilde is not None:  # q~ = q / iota
            d_qf = d_q_tilde.float() * inv
            dq += d_qf.sum(3)
            d_iota -= d_qf * qf * inv
        if d_variance is not None:  # var = scale^2 sum_k q^2 / iota
            d_sq = (ctx.scale ** 2) * d_variance[..., None] * inv  # d var / d (q^2), per key channel
            dq += (2.0 * qf * d_sq).sum(3)
            d_iota -= d_sq * qf * qf * inv
        if d_iota_last is not None:
            d_iota[:, -1] += d_iota_last
        dk, dg, d_beta, d_prior, d_excess0 = _scan_backward(k, g, beta, prior, iota, excess0, d_iota, meta)
        return (dq.to(q.dtype), dk.to(k.dtype) if dk is not None else None, dg, d_beta, d_prior, d_excess0,
                None, None, None, None)


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
