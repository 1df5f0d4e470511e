"""The grouped importance scan on a GPU (Triton), fused with what the grouped path needs from it: the rescaled
query q~ = q / iota [N, T, H, G, K], the variance's sum_k q^2 / iota, the last importance; and the backward.

Same function as :func:`palimpsa.ops.torch_gla.importance_scan_torch` followed by the division::

    iota_t = I0 + J_t,   J_t = alpha_t J_{t-1} + (k_t ** 2) beta_t[j]      (one [K] row per group j)

Every chunk program (one per chunk, (sequence, head, group) and block of up to 32 key channels, float32
throughout: the importance is a denominator) loads its chunk as [C, BK] tiles (q, k, dq~) and [C] rows (g, the
group's beta), one vectorised load each, and runs the in-chunk recurrences as ``tl.associative_scan`` along
time on pairs (a, x) of J <- a J + x, combined as (a1, x1), (a2, x2) -> (a1 a2, a2 x1 + x2).  The scan's ``a``
is the decay from the chunk's start, a product of alphas (never a division or a difference of cumulative
sums: a g = -inf gives an exact 0), so J_t = local_t + A_t J_start.  Where J is needed at every token, the scan
runs on the pairs shifted by one token (g, k and beta loaded a second time, one token earlier, rather than
shifting register tiles), which gives J_{t-1}, then alpha_t J_{t-1} as a product (what dg needs, accurate where a
decay saturates) and J_t = alpha_t J_{t-1} + x_t; the forward and both backward kernels form J this one way.

Forward: every chunk at once scans what it adds to J (``_scan_fwd_sums``); one short walk over the chunks gives
J at every chunk's start (``_chain``); then every chunk at once forms J at each token from its start and writes
q / iota and its key block's part of the variance's sum, a row sum of a [C, BK] tile (``_scan_fwd``).  iota
itself is never stored: only J at each chunk's start, from which the backward recomputes the chunk's iota
exactly as the forward made it.

Backward, with the adjoint lambda_t = d iota_t + alpha_{t+1} lambda_{t+1}, where d iota = -dq~ q / iota^2 (and the
variance's term), in three kernels whose only [N, T, H, G, K] buffers are dq and dk per group (J and d iota are
recomputed, not stored): every chunk at once recomputes J from its start, forms dq and d iota and runs a reverse
scan of (alpha_{t+1}, d iota_t) (g loaded once more, one token later; alpha = 1 on the chunk's last row) for its
own adjoint, whose value at the first token times that token's alpha it sends to the chunk before
(``_scan_bwd_local``); one short walk over the chunks in reverse chains these (``_chain``: what comes into a chunk
already carries alpha of the next chunk's first token); then every chunk at once recomputes J and d iota and the
same reverse scan, adds what came in from later chunks times the scan's product alpha_{t+1} ... alpha_{C-1}, and
forms dbeta_t[j] = sum_k lambda k^2, dk_t = 2 k beta_t[j] lambda and dg_t = sum_k lambda_t alpha_t J_{t-1}, per key
block as row sums of [C, BK] tiles (``_scan_bwd``).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from palimpsa.ops.torch_gla import pad_time
from palimpsa.ops.triton.utils import cdiv, next_power_of_two


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
def _linear(a1, x1, a2, x2):
    """Two steps J <- a J + x composed, (a1, x1) the earlier: the decay over both and what they add.  In a reverse
    scan the first pair is the accumulated later part, so the same function chains the adjoint backwards:
    lambda_t = x_t + a_t lambda_{t+1}, the decay output then being the product a_t ... a_{C-1}."""
    return a1 * a2, a2 * x1 + x2


@triton.jit
def _chunk_rows(i_n, i_h, c, T, H: tl.constexpr, C: tl.constexpr):
    """The chunk's time steps t [C] and their rows of a [N, T, H] tensor (int32, as g is indexed: an index of a
    [N, T, H, G] or [N, T, H, K] tensor is formed from them in int64)."""
    t = c * C + tl.arange(0, C)
    return t, (i_n * T + t) * H + i_h


@triton.jit
def _chunk_states(k, g, beta, row, offs_k, mask_k, start, i_j,
                  H: tl.constexpr, G: tl.constexpr, K: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
                  HAS_BETA: tl.constexpr):
    """The chunk's state at every token from J at its start: alpha_t [C], alpha_t J_{t-1} and J_t [C, BK], and
    k_t [C, BK] (zeros without beta).

    One scan of the pairs shifted by a token, (alpha_{t-1}, x_{t-1}) with (1, 0) on the chunk's first row, gives
    J_{t-1} = local_t + A_t J_start, A_t the scan's product of the alphas before t (an exact 0 after a g = -inf:
    no division by a decay, no difference of cumulative sums); then J_t = alpha_t J_{t-1} + x_t.  dg needs
    alpha_t J_{t-1}, and as a product it keeps its relative accuracy where a decay saturates (J_t - x_t would
    leave float32 noise of x_t there).  The forward and the backward both come through here, so the backward's
    iota is bitwise the forward's."""
    not_first = tl.arange(0, C) > 0
    alpha = tl.exp(tl.load(g + row))
    g_prev = tl.load(g + (row - H), mask=not_first, other=0.0)  # the first row's pair is (1, 0)
    a_prev = tl.broadcast_to(tl.exp(g_prev)[:, None], (C, BK))
    k_t = tl.zeros([C, BK], dtype=tl.float32)
    x = k_t
    x_prev = k_t
    if HAS_BETA:
        tile = row.to(tl.int64)[:, None] * K + offs_k[None, :]
        k_t = tl.load(k + tile, mask=mask_k[None, :], other=0.0).to(tl.float32)
        # the same tile one token earlier (mostly cache hits), so that no register tile is shifted
        k_p = tl.load(k + (tile - H * K), mask=not_first[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
        b_t = tl.load(beta + row.to(tl.int64) * G + i_j)
        b_p = tl.load(beta + (row - H).to(tl.int64) * G + i_j, mask=not_first, other=0.0)
        x = k_t * k_t * b_t[:, None]
        x_prev = k_p * k_p * b_p[:, None]
    decay, local = tl.associative_scan((a_prev, x_prev), 0, _linear)
    aJ_prev = alpha[:, None] * (local + decay * start[None, :])
    return alpha, aJ_prev, aJ_prev + x, k_t


@triton.jit
def _grads_of_iota(q, d_q_tilde, d_var, row, tok, offs_k, mask_k, J, prior_h,
                   K: tl.constexpr, WITH_VAR: tl.constexpr):
    """dq and d iota [C, BK] from the gradients of q~ = q / iota and of the variance's sum_k q^2 / iota (d_var is
    already scaled by scale^2); both 0 on masked key channels (q = dq~ = 0 there)."""
    inv = 1.0 / (J + prior_h)
    q_t = tl.load(q + row.to(tl.int64)[:, None] * K + offs_k[None, :], mask=mask_k[None, :], other=0.0)
    q_t = q_t.to(tl.float32)
    dq = tl.load(d_q_tilde + tok[:, None] * K + offs_k[None, :], mask=mask_k[None, :], other=0.0)
    dq = dq.to(tl.float32) * inv
    d_iota = -dq * q_t * inv
    if WITH_VAR:
        d_sq = tl.load(d_var + tok)[:, None] * inv
        dq += 2.0 * q_t * d_sq
        d_iota -= d_sq * q_t * q_t * inv
    return dq, d_iota


@triton.jit
def _local_adjoint(g, row, d_iota, H: tl.constexpr, C: tl.constexpr, BK: tl.constexpr):
    """The chunk's own adjoint, lambda_t = d iota_t + alpha_{t+1} lambda_{t+1} with nothing from later chunks: a
    reverse scan of (alpha_{t+1}, d iota_t), g loaded a second time one token later so that no register tile is
    shifted.  The last row takes alpha = 1 (log decay 0): what comes in from later chunks (``_chain`` with
    REVERSE) already carries alpha of the next chunk's first token.  Returns (the scan's products
    alpha_{t+1} ... alpha_{C-1}, the factor of what comes in at the chunk's end; the local lambda), [C, BK]."""
    g_next = tl.load(g + (row + H), mask=tl.arange(0, C) < C - 1, other=0.0)
    a_next = tl.broadcast_to(tl.exp(g_next)[:, None], (C, BK))
    return tl.associative_scan((a_next, d_iota), 0, _linear, reverse=True)


@triton.jit
def _scan_fwd_sums(k, g, beta, sums, totals, T, NC,
                   H: tl.constexpr, G: tl.constexpr, K: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
                   HAS_BETA: tl.constexpr):
    """Per chunk (all in parallel), from J = 0: the chunk's own contribution to J at its end (``sums``, the last
    row of a scan of (alpha_t, x_t)) and its total log decay (``totals``)."""
    i_nhg, i_k, c = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h, i_j = i_nhg // (H * G), (i_nhg // G) % H, i_nhg % G
    offs_k = i_k * BK + tl.arange(0, BK)
    mask_k = offs_k < K
    chunk = (i_nhg * NC + c).to(tl.int64)
    _, row = _chunk_rows(i_n, i_h, c, T, H, C)
    g_t = tl.load(g + row)
    if HAS_BETA:
        k_t = tl.load(k + row.to(tl.int64)[:, None] * K + offs_k[None, :], mask=mask_k[None, :], other=0.0)
        k_t = k_t.to(tl.float32)
        x = k_t * k_t * tl.load(beta + row.to(tl.int64) * G + i_j)[:, None]
        a = tl.broadcast_to(tl.exp(g_t)[:, None], (C, BK))
        _, J = tl.associative_scan((a, x), 0, _linear)
        last = tl.arange(0, C)[:, None] == C - 1
        tl.store(sums + chunk * K + offs_k, tl.sum(tl.where(last, J, 0.0), 0), mask=mask_k)
    else:
        tl.store(sums + chunk * K + offs_k, tl.zeros([BK], dtype=tl.float32), mask=mask_k)
    tl.store(totals + chunk, tl.sum(g_t, 0), mask=i_k == 0)


@triton.jit
def _scan_fwd(q, k, g, beta, prior, q_tilde, var_part, starts, T, NC,
              H: tl.constexpr, G: tl.constexpr, K: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
              HAS_BETA: tl.constexpr, WITH_VAR: tl.constexpr):
    """Per chunk (all in parallel), J at every token from J at the chunk's start: q~ = q / iota and this key
    block's part of sum_k q^2 / iota (the variance); iota itself is never stored."""
    i_nhg, i_k, c = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h, i_j = i_nhg // (H * G), (i_nhg // G) % H, i_nhg % G
    part_at = (i_k * tl.num_programs(0)).to(tl.int64) * T  # this K block's slice of var_part
    offs_k = i_k * BK + tl.arange(0, BK)
    mask_k = offs_k < K
    start = tl.load(starts + (i_nhg * (NC + 1) + c).to(tl.int64) * K + offs_k, mask=mask_k, other=0.0)
    _, row = _chunk_rows(i_n, i_h, c, T, H, C)
    tok = row.to(tl.int64) * G + i_j  # token, head, group
    _, _, J, _ = _chunk_states(k, g, beta, row, offs_k, mask_k, start, i_j, H, G, K, C, BK, HAS_BETA)
    q_t = tl.load(q + row.to(tl.int64)[:, None] * K + offs_k[None, :], mask=mask_k[None, :], other=0.0)
    q_t = q_t.to(tl.float32)
    q_over = q_t / (J + tl.load(prior + i_h))
    tl.store(q_tilde + tok[:, None] * K + offs_k[None, :], q_over.to(q_tilde.dtype.element_ty),
             mask=mask_k[None, :])
    if WITH_VAR:  # masked key channels have q = 0
        tl.store(var_part + part_at + tok, tl.sum(q_t * q_over, 1))


@triton.jit
def _scan_bwd_local(q, k, g, beta, prior, starts, d_q_tilde, d_var, dq_part, sums, totals, d_prior_part, T, NC,
                    H: tl.constexpr, G: tl.constexpr, K: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
                    HAS_BETA: tl.constexpr, WITH_VAR: tl.constexpr):
    """Per chunk (all in parallel): J_t again from the chunk's start, dq (``dq_part``) and d iota, then the
    chunk's own adjoint with nothing coming in from later chunks, whose value at the first token times alpha of
    that token is what the chunk sends back to the chunk before (``sums``); the chunk's total log decay
    (``totals``) and this block's part of d prior."""
    i_nhg, i_k, c = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h, i_j = i_nhg // (H * G), (i_nhg // G) % H, i_nhg % G
    offs_k = i_k * BK + tl.arange(0, BK)
    mask_k = offs_k < K
    chunk = (i_nhg * NC + c).to(tl.int64)
    start = tl.load(starts + (i_nhg * (NC + 1) + c).to(tl.int64) * K + offs_k, mask=mask_k, other=0.0)
    _, row = _chunk_rows(i_n, i_h, c, T, H, C)
    tok = row.to(tl.int64) * G + i_j  # token, head, group
    alpha, _, J, _ = _chunk_states(k, g, beta, row, offs_k, mask_k, start, i_j, H, G, K, C, BK, HAS_BETA)
    dq, d_iota = _grads_of_iota(q, d_q_tilde, d_var, row, tok, offs_k, mask_k, J, tl.load(prior + i_h), K,
                                WITH_VAR)
    tl.store(dq_part + tok[:, None] * K + offs_k[None, :], dq.to(dq_part.dtype.element_ty), mask=mask_k[None, :])
    _, lam = _local_adjoint(g, row, d_iota, H, C, BK)
    first = tl.arange(0, C)[:, None] == 0
    tl.store(sums + chunk * K + offs_k, tl.sum(tl.where(first, lam * alpha[:, None], 0.0), 0), mask=mask_k)
    tl.store(totals + chunk, tl.sum(tl.load(g + row), 0), mask=i_k == 0)
    tl.store(d_prior_part + (i_k * tl.num_programs(0) * NC + chunk) * BK + tl.arange(0, BK), tl.sum(d_iota, 0))


@triton.jit
def _scan_bwd(q, k, g, beta, prior, starts, d_q_tilde, d_var, carries, d_beta, d_k, d_g, T, NC,
              H: tl.constexpr, G: tl.constexpr, K: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
              HAS_BETA: tl.constexpr, WITH_VAR: tl.constexpr):
    """Per chunk (all in parallel): J and d iota recomputed from the chunk's start as ``_scan_bwd_local`` made
    them, lambda_t = local lambda_t + (alpha_{t+1} ... alpha_{C-1}) m with m what comes in from later chunks
    (``carries``), then dbeta_t[j] = sum_k lambda k^2, dk_t = 2 k beta_t[j] lambda (per group) and this key
    block's part of dg_t = sum_k lambda_t alpha_t J_{t-1} (a product of the adjoint and the state: no difference,
    so dg keeps its accuracy where a decay saturates)."""
    i_nhg, i_k, c = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h, i_j = i_nhg // (H * G), (i_nhg // G) % H, i_nhg % G
    part_at = (i_k * tl.num_programs(0)).to(tl.int64) * T  # this K block's slice of the partial sums
    offs_k = i_k * BK + tl.arange(0, BK)
    mask_k = offs_k < K
    start = tl.load(starts + (i_nhg * (NC + 1) + c).to(tl.int64) * K + offs_k, mask=mask_k, other=0.0)
    carry = tl.load(carries + (i_nhg * (NC + 1) + c + 1).to(tl.int64) * K + offs_k, mask=mask_k, other=0.0)
    t, row = _chunk_rows(i_n, i_h, c, T, H, C)
    tok = row.to(tl.int64) * G + i_j  # token, head, group
    _, aJ_prev, J, k_t = _chunk_states(k, g, beta, row, offs_k, mask_k, start, i_j, H, G, K, C, BK, HAS_BETA)
    _, d_iota = _grads_of_iota(q, d_q_tilde, d_var, row, tok, offs_k, mask_k, J, tl.load(prior + i_h), K,
                               WITH_VAR)
    decay, lam = _local_adjoint(g, row, d_iota, H, C, BK)
    lam += decay * carry[None, :]
    tl.store(d_g + part_at + i_nhg.to(tl.int64) * T + t, tl.sum(lam * aJ_prev, 1))
    if HAS_BETA:
        tl.store(d_beta + part_at + tok, tl.sum(lam * k_t * k_t, 1))
        b_t = tl.load(beta + tok)
        d_k_t = 2.0 * k_t * lam * b_t[:, None]
        tl.store(d_k + tok[:, None] * K + offs_k[None, :], d_k_t.to(d_k.dtype.element_ty), mask=mask_k[None, :])


def _key_block(K: int) -> int:
    """Key channels per program: at most 32, so that a program's [C, BK] float32 tiles fit in registers (with the
    whole K = 96 in one program the backward took 43 ms at the 760M-like shape on an H200, 38x the forward)."""
    return max(16, min(32, next_power_of_two(K)))


# Warps per chunk program: a [C = 64, BK = 32] float32 tile is 16 registers a thread over 4 warps, and the
# backward keeps about ten such tiles live.
_WARPS = 4


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
        ctx.set_materialize_grads(False)  # unused outputs' gradients come as None, not zero fills to read
        N, T, H, K = k.shape
        G, NC, BK = groups, T // chunk, _key_block(K)
        NK = cdiv(K, BK)
        f32 = dict(dtype=torch.float32, device=k.device)
        q_tilde = torch.empty(N, T, H, G, K, dtype=q.dtype, device=q.device)
        var_part = torch.empty(NK, N, T, H, G, **f32) if with_variance else None
        starts = torch.empty(N * H * G, NC + 1, K, **f32)
        meta = dict(H=H, G=G, K=K, C=chunk, BK=BK, HAS_BETA=beta is not None)
        grid = (N * H * G, NK, NC)
        sums, totals = torch.empty(N * H * G, NC, K, **f32), torch.empty(N * H * G, NC, **f32)
        _scan_fwd_sums[grid](k, g, beta, sums, totals, T, NC, num_warps=_WARPS, **meta)
        _chain[(N * H * G, NK)](sums, totals, excess0, starts, NC, K=K, BK=BK, HAS_INIT=excess0 is not None,
                                REVERSE=False)
        _scan_fwd[grid](q, k, g, beta, prior, q_tilde, var_part, starts, T, NC, WITH_VAR=with_variance,
                        num_warps=_WARPS, **meta)
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
        NK = cdiv(K, BK)
        f32 = dict(dtype=torch.float32, device=k.device)
        d_q_tilde = (torch.zeros(N, T, H, G, K, **f32) if d_q_tilde is None else d_q_tilde.contiguous())
        d_var = ((ctx.scale ** 2) * d_variance.float()).contiguous() if d_variance is not None else None
        d_last = d_iota_last.float().contiguous() if d_iota_last is not None else None
        NC = T // meta["C"]
        # with one group, dq and dk leave the kernels in the inputs' dtype (the same rounding as a cast after
        # them, without the extra pass); with several they are summed over the groups in float32 first
        dq_part = torch.empty(N, T, H, G, K, dtype=q.dtype if G == 1 else torch.float32, device=q.device)
        d_beta = torch.empty(NK, *beta.shape, **f32) if beta is not None else None
        d_k = (torch.empty(N, T, H, G, K, dtype=k.dtype if G == 1 else torch.float32, device=k.device)
               if beta is not None else None)
        d_g = torch.empty(NK, N, H, G, T, **f32)
        d_prior_part = torch.empty(NK, N * H * G, NC, BK, **f32)
        sums, totals = torch.empty(N * H * G, NC, K, **f32), torch.empty(N * H * G, NC, **f32)
        carries = torch.empty(N * H * G, NC + 1, K, **f32)
        grid = (N * H * G, NK, NC)
        with_var = d_var is not None
        _scan_bwd_local[grid](q, k, g, beta, prior, starts, d_q_tilde, d_var, dq_part, sums, totals, d_prior_part,
                              T, NC, WITH_VAR=with_var, num_warps=_WARPS, **meta)
        _chain[(N * H * G, NK)](sums, totals, d_last, carries, NC, K=K, BK=BK, HAS_INIT=d_last is not None,
                                REVERSE=True)
        _scan_bwd[grid](q, k, g, beta, prior, starts, d_q_tilde, d_var, carries, d_beta, d_k, d_g, T, NC,
                        WITH_VAR=with_var, num_warps=_WARPS, **meta)
        d_excess0 = carries[:, 0].reshape(N, H, G, K) if ctx.has_init else None
        dq = dq_part.sum(3) if G > 1 else dq_part[:, :, :, 0]
        dk = (d_k.sum(3) if G > 1 else d_k[:, :, :, 0]) if d_k is not None else None
        # sums over key blocks and groups; a sum over one term is a view (no launch)
        dg = (d_g[0, :, :, 0] if NK == 1 and G == 1 else d_g.sum((0, 3))).transpose(1, 2)  # [N, T, H]
        d_prior = d_prior_part.reshape(NK, N, H, G, NC, BK).sum((0, 1, 3, 4, 5))
        if d_last is not None:
            d_prior = d_prior + d_last.sum((0, 2, 3))
        return (dq.to(q.dtype), dk.to(k.dtype) if dk is not None else None, dg,
                (d_beta[0] if NK == 1 else d_beta.sum(0)) if d_beta is not None else None, d_prior, d_excess0,
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
    chunk = max(16, min(chunk, next_power_of_two(T)))
    q, k = pad_time(q, chunk).contiguous(), pad_time(k, chunk).contiguous()
    g = pad_time(g.float(), chunk).contiguous()
    beta = pad_time(beta.float(), chunk).contiguous() if beta is not None else None
    excess0 = initial_excess.float().contiguous() if initial_excess is not None else None
    q_tilde, variance, iota_last = RescaledQueryFunction.apply(q, k, g, beta, prior.float().contiguous(), excess0,
                                                               groups, chunk, float(scale), with_variance)
    # padded tokens (g = 0, beta = 0) leave the importance unchanged: iota at the padded end is iota at T - 1
    return q_tilde[:, :T], (variance[:, :T] if variance is not None else None), iota_last
