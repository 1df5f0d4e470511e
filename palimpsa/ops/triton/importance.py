"""The grouped importance scan on a GPU (Triton), fused with what the grouped path needs from it: the rescaled
query q~ = q / iota [N, T, H, G, K], the variance's sum_k q^2 / iota, the last importance; and the backward.

Same function as :func:`palimpsa.ops.torch_gla.importance_scan_torch` followed by the division::

    iota_t = I0 + J_t,   J_t = alpha_t J_{t-1} + (k_t ** 2) beta_t[j]      (one [K] row per group j)

Forward, token by token inside each chunk (one warp per chunk and block of 32 key channels, float32 throughout:
the importance is a denominator): every chunk at once sums what it adds to J (``_scan_fwd_sums``); one short walk
over the chunks gives J at every chunk's start (``_chain``); then every chunk at once walks from its start and
writes q / iota and the variance's sum (``_scan_fwd``).  iota itself is never stored: only J at each chunk's
start, from which the backward recomputes the chunk's iota exactly as the forward made it.

Backward, with the adjoint lambda_t = d iota_t + alpha_{t+1} lambda_{t+1}, where d iota = -dq~ q / iota^2 (and
the variance's term), in three kernels, token by token inside each chunk (one warp per chunk and block of 32
key channels; no [C, C] decay matrices): every chunk at once recomputes J from its start, forms dq and d iota and
walks its own adjoint back to what it sends to the chunk before (``_scan_bwd_local``); one short walk over the
chunks in reverse chains these (``_chain``); then every chunk at once walks lambda back with what came in
from later chunks and forms dbeta_t[j] = sum_k lambda k^2, dk_t = 2 k beta_t[j] lambda and
dg_t = sum_k lambda_t alpha_t J_{t-1} (``_scan_bwd``).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from palimpsa.ops.torch_gla import pad_time


@triton.jit
def _chain(sums, totals, init, out, NC, K: tl.constexpr, BK: tl.constexpr, HAS_INIT: tl.constexpr,
           REVERSE: tl.constexpr):
    """The chunk-to-chunk recurrence x <- x exp(total_c) + sums_c, one program per (sequence, head, group) and BK
    key channels, over the chunks in order (forward: x is J; out[c] is J at chunk c's start, out[NC] after the
    last) or from the last (REVERSE: x is the adjoint; out[c + 1] is what comes into chunk c from later tokens,
    out[NC] the gradient of the last J or 0, out[0] the adjoint of the initial J)."""
    i_nhg, i_k = tl.program_id(0), tl.program_id(1)
    offs_k = i_k * BK + tl.arange(0, BK)
    mask_k = offs_k < K
    x = tl.zeros([BK], dtype=tl.float32)
    if HAS_INIT:
        x += tl.load(init + i_nhg * K + offs_k, mask=mask_k, other=0.0)
    base = (i_nhg * (NC + 1)).to(tl.int64) * K
    tl.store(out + base + (NC if REVERSE else 0) * K + offs_k, x, mask=mask_k)
    for i in range(NC):
        c = NC - 1 - i if REVERSE else i
        total = tl.load(totals + i_nhg * NC + c)
        x = x * tl.exp(total) + tl.load(sums + (i_nhg * NC + c).to(tl.int64) * K + offs_k, mask=mask_k, other=0.0)
        tl.store(out + base + (c if REVERSE else c + 1) * K + offs_k, x, mask=mask_k)


@triton.jit
def _scan_fwd_sums(k, g, beta, sums, totals, T, NC,
                   H: tl.constexpr, G: tl.constexpr, K: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
                   HAS_BETA: tl.constexpr):
    """Per chunk (all in parallel), token by token from J = 0: the chunk's own contribution to J at its end
    (``sums``) and its total log decay (``totals``)."""
    i_nhg, i_k, c = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h, i_j = i_nhg // (H * G), (i_nhg // G) % H, i_nhg % G
    offs_k = i_k * BK + tl.arange(0, BK)
    mask_k = offs_k < K
    chunk = (i_nhg * NC + c).to(tl.int64)
    J = tl.zeros([BK], dtype=tl.float32)
    total = tl.sum(tl.zeros([1], dtype=tl.float32), 0)  # a float32 scalar (g may be -inf: not g * 0)
    for i in range(C):
        row = (i_n * T + c * C + i) * H + i_h
        g_t = tl.load(g + row)
        total += g_t
        J = J * tl.exp(g_t)
        if HAS_BETA:
            k_t = tl.load(k + row.to(tl.int64) * K + offs_k, mask=mask_k, other=0.0).to(tl.float32)
            J += k_t * k_t * tl.load(beta + row.to(tl.int64) * G + i_j)
    tl.store(sums + chunk * K + offs_k, J, mask=mask_k)
    tl.store(totals + chunk, total, mask=i_k == 0)


@triton.jit
def _scan_fwd(q, k, g, beta, prior, q_tilde, var_part, starts, T, NC,
              H: tl.constexpr, G: tl.constexpr, K: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
              HAS_BETA: tl.constexpr, WITH_VAR: tl.constexpr):
    """Per chunk (all in parallel), token by token from J at the chunk's start: q~ = q / iota and this key block's
    part of sum_k q^2 / iota (the variance); iota itself is never stored."""
    i_nhg, i_k, c = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h, i_j = i_nhg // (H * G), (i_nhg // G) % H, i_nhg % G
    part_at = (i_k * tl.num_programs(0)).to(tl.int64) * T  # this K block's slice of var_part
    offs_k = i_k * BK + tl.arange(0, BK)
    mask_k = offs_k < K
    J = tl.load(starts + (i_nhg * (NC + 1) + c).to(tl.int64) * K + offs_k, mask=mask_k, other=0.0)
    prior_h = tl.load(prior + i_h)
    for i in range(C):
        row = (i_n * T + c * C + i) * H + i_h
        tok = row.to(tl.int64) * G + i_j
        J = J * tl.exp(tl.load(g + row))
        if HAS_BETA:
            k_t = tl.load(k + row.to(tl.int64) * K + offs_k, mask=mask_k, other=0.0).to(tl.float32)
            J += k_t * k_t * tl.load(beta + tok)
        q_t = tl.load(q + row.to(tl.int64) * K + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        q_over = q_t / (J + prior_h)
        tl.store(q_tilde + tok * K + offs_k, q_over.to(q_tilde.dtype.element_ty), mask=mask_k)
        if WITH_VAR:  # masked key channels have q = 0
            tl.store(var_part + part_at + tok, tl.sum(q_t * q_over, 0))


@triton.jit
def _scan_bwd_local(q, k, g, beta, prior, starts, d_q_tilde, d_var, dq_part, J_buf, d_iota_buf, sums, totals,
                    d_prior_part, T, NC,
                    H: tl.constexpr, G: tl.constexpr, K: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
                    HAS_BETA: tl.constexpr, WITH_VAR: tl.constexpr):
    """Per chunk (all in parallel), token by token: J_t again from the chunk's start (kept in ``J_buf``), dq and
    d iota (``dq_part``, ``d_iota_buf``), then the chunk's own adjoint walked back with nothing coming in from
    later chunks, whose value at the first token times alpha of that token is what the chunk sends back to the
    chunk before (``sums``); the chunk's total log decay (``totals``) and this block's part of d prior."""
    i_nhg, i_k, c = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h, i_j = i_nhg // (H * G), (i_nhg // G) % H, i_nhg % G
    offs_k = i_k * BK + tl.arange(0, BK)
    mask_k = offs_k < K
    chunk = (i_nhg * NC + c).to(tl.int64)
    J = tl.load(starts + (i_nhg * (NC + 1) + c).to(tl.int64) * K + offs_k, mask=mask_k, other=0.0)
    prior_h = tl.load(prior + i_h)
    total = tl.sum(tl.zeros([1], dtype=tl.float32), 0)  # a float32 scalar (g may be -inf: not g * 0)
    d_prior = tl.zeros([BK], dtype=tl.float32)
    for i in range(C):
        row = (i_n * T + c * C + i) * H + i_h  # token, head
        tok = row.to(tl.int64) * G + i_j  # token, head, group
        g_t = tl.load(g + row)
        total += g_t
        J = J * tl.exp(g_t)
        if HAS_BETA:
            k_t = tl.load(k + row.to(tl.int64) * K + offs_k, mask=mask_k, other=0.0).to(tl.float32)
            J += k_t * k_t * tl.load(beta + tok)
        tl.store(J_buf + tok * K + offs_k, J, mask=mask_k)
        inv = 1.0 / (J + prior_h)
        q_t = tl.load(q + row.to(tl.int64) * K + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        dq_t = tl.load(d_q_tilde + tok * K + offs_k, mask=mask_k, other=0.0).to(tl.float32) * inv
        d_iota_t = -dq_t * q_t * inv
        if WITH_VAR:  # d_var is already scaled by scale^2
            d_sq = tl.load(d_var + tok) * inv
            dq_t += 2.0 * q_t * d_sq
            d_iota_t -= d_sq * q_t * q_t * inv
        tl.store(dq_part + tok * K + offs_k, dq_t, mask=mask_k)
        tl.store(d_iota_buf + tok * K + offs_k, d_iota_t, mask=mask_k)
        d_prior += d_iota_t
    tl.debug_barrier()
    back = tl.zeros([BK], dtype=tl.float32)  # alpha_{t+1} lambda_{t+1}, this chunk's tokens only
    for i in range(C):
        row = (i_n * T + c * C + C - 1 - i) * H + i_h
        tok = row.to(tl.int64) * G + i_j
        lam = tl.load(d_iota_buf + tok * K + offs_k, mask=mask_k, other=0.0) + back
        back = lam * tl.exp(tl.load(g + row))
    tl.store(sums + chunk * K + offs_k, back, mask=mask_k)
    tl.store(totals + chunk, total, mask=i_k == 0)
    tl.store(d_prior_part + (i_k * tl.num_programs(0) * NC + chunk) * BK + tl.arange(0, BK), d_prior)


@triton.jit
def _scan_bwd(k, g, beta, starts, J_buf, d_iota_buf, carries, d_beta, d_k, d_g, T, NC,
              H: tl.constexpr, G: tl.constexpr, K: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
              HAS_BETA: tl.constexpr):
    """Per chunk (all in parallel), token by token from the last, with the adjoint coming in from later chunks
    (``carries``): lambda_t = d iota_t + alpha_{t+1} lambda_{t+1}, then dbeta_t[j] = sum_k lambda k^2,
    dk_t = 2 k beta_t[j] lambda (per group) and this key block's part of dg_t = sum_k lambda_t alpha_t J_{t-1}
    (a product of the adjoint and the state: no difference, so dg keeps its accuracy where a decay saturates)."""
    i_nhg, i_k, c = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h, i_j = i_nhg // (H * G), (i_nhg // G) % H, i_nhg % G
    part_at = (i_k * tl.num_programs(0)).to(tl.int64) * T  # this K block's slice of the partial sums
    offs_k = i_k * BK + tl.arange(0, BK)
    mask_k = offs_k < K
    start = tl.load(starts + (i_nhg * (NC + 1) + c).to(tl.int64) * K + offs_k, mask=mask_k, other=0.0)
    back = tl.load(carries + (i_nhg * (NC + 1) + c + 1).to(tl.int64) * K + offs_k, mask=mask_k, other=0.0)
    for i in range(C):
        t = c * C + C - 1 - i
        row = (i_n * T + t) * H + i_h
        tok = row.to(tl.int64) * G + i_j
        lam = tl.load(d_iota_buf + tok * K + offs_k, mask=mask_k, other=0.0) + back
        alpha = tl.exp(tl.load(g + row))
        first = i == C - 1  # J_{t-1} of the chunk's first token is J at the chunk's start
        J_prev = tl.load(J_buf + (tok - H * G) * K + offs_k, mask=mask_k & (i < C - 1), other=0.0)
        J_prev = tl.where(first, start, J_prev)
        tl.store(d_g + part_at + i_nhg.to(tl.int64) * T + t, tl.sum(lam * alpha * J_prev, 0))
        if HAS_BETA:
            k_t = tl.load(k + row.to(tl.int64) * K + offs_k, mask=mask_k, other=0.0).to(tl.float32)
            tl.store(d_beta + part_at + tok, tl.sum(lam * k_t * k_t, 0))
            tl.store(d_k + tok * K + offs_k, 2.0 * k_t * lam * tl.load(beta + tok), mask=mask_k)
        back = lam * alpha


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
        meta = dict(H=H, G=G, K=K, C=chunk, BK=BK, HAS_BETA=beta is not None)
        grid = (N * H * G, NK, NC)
        sums, totals = torch.empty(N * H * G, NC, K, **f32), torch.empty(N * H * G, NC, **f32)
        _scan_fwd_sums[grid](k, g, beta, sums, totals, T, NC, num_warps=1, **meta)
        _chain[(N * H * G, NK)](sums, totals, excess0, starts, NC, K=K, BK=BK, HAS_INIT=excess0 is not None,
                                REVERSE=False)
        _scan_fwd[grid](q, k, g, beta, prior, q_tilde, var_part, starts, T, NC, WITH_VAR=with_variance, num_warps=1,
                        **meta)
        variance = (scale ** 2) * var_part.sum(0) if with_variance else None
        iota_last = starts[:, NC].reshape(N, H, G, K) + prior[None, :, None, None]
        ctx.save_for_backward(q, k, g, beta, prior, excess0, starts)
        ctx.meta, ctx.scale, ctx.has_init = meta, scale, excess0 is not None
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
        NC = T // meta["C"]
        dq_part = torch.empty(N, T, H, G, K, **f32)
        J_buf, d_iota_buf = torch.empty_like(dq_part), torch.empty_like(dq_part)
        d_beta = torch.empty(NK, *beta.shape, **f32) if beta is not None else None
        d_k = torch.empty(N, T, H, G, K, **f32) if beta is not None else None
        d_g = torch.empty(NK, N, H, G, T, **f32)
        d_prior_part = torch.empty(NK, N * H * G, NC, BK, **f32)
        sums, totals = torch.empty(N * H * G, NC, K, **f32), torch.empty(N * H * G, NC, **f32)
        carries = torch.empty(N * H * G, NC + 1, K, **f32)
        grid = (N * H * G, NK, NC)
        _scan_bwd_local[grid](q, k, g, beta, prior, starts, d_q_tilde, d_var, dq_part, J_buf, d_iota_buf, sums, totals,
                              d_prior_part, T, NC, WITH_VAR=d_var is not None, num_warps=1, **meta)
        _chain[(N * H * G, NK)](sums, totals, d_last, carries, NC, K=K, BK=BK, HAS_INIT=d_last is not None,
                                REVERSE=True)
        _scan_bwd[grid](k, g, beta, starts, J_buf, d_iota_buf, carries, d_beta, d_k, d_g, T, NC, num_warps=1,
                        **meta)
        d_excess0 = carries[:, 0].reshape(N, H, G, K) if ctx.has_init else None
        dq = dq_part.sum(3) if G > 1 else dq_part[:, :, :, 0]
        dk = (d_k.sum(3) if G > 1 else d_k[:, :, :, 0]) if d_k is not None else None
        dg = d_g.sum((0, 3)).transpose(1, 2)  # [N, T, H]
        d_prior = d_prior_part.reshape(NK, N, H, G, NC, BK).sum((0, 1, 3, 4, 5))
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
