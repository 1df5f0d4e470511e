"""Backward of Palimpsa by per-chunk recomputation (Triton).  Never divides by the decay.

Notation (one head, [K, V] tiles, element-wise unless noted; I = I0 + P, r = 1 / I, mu = M r)::

    direct adjoints of token t (from o_t, var_t):
        DM_t = s q_t do_t^T r_t
        DI_t = -r_t (s q_t do_t^T mu_t + s^2 q_t^2 dvar_t^T r_t)
    accumulated adjoints (reverse gated scans with the forward's decay):
        dM_t = DM_t + alpha_{t+1} dM_{t+1},   dP_t = DI_t + alpha_{t+1} dP_{t+1}
    gradients:
        dq_t = s sum_v do mu + 2 s^2 q sum_v dvar r
        dk_t = sum_v dM_t v_t + 2 k_t sum_v dP_t beta_t,   dv_t = sum_k k_t dM_t,   dbeta_t = sum_k k_t^2 dP_t
        dg_{t+1} = alpha_{t+1} sum_kv (dM_{t+1} M_t + dP_{t+1} P_t)   (the adjoint handed back to the state
                   after token t, times that state: taken directly, so a saturated decay gets its tiny dg with
                   full relative accuracy; dg of a sequence's first token comes from the initial state)
        dI0 = sum_t sum_kv DI_t (- sum dP_0 when an initial state is given)

Work plan (states are recomputed, only chunk-start states and one adjoint pair per unit are stored):
1. ``chunk_states`` recomputes (M, I) at every chunk start (matmuls).
2. The tokens of a sequence are grouped in units of U chunks.  ``unit_local_adjoint_kernel`` walks each
   unit forward from its start state and sums exp(b_t) (DM_t, DI_t), b_t the log decay from the unit's
   start (a running sum, never differenced): the unit's adjoint seen from its start, in parallel over units.
3. ``unit_scan_kernel`` turns those into the adjoint entering each unit from its end (a short reverse scan
   over units, starting from the final-state gradient).
4. ``unit_bwd_kernel`` walks each unit backward: for every sub-block of 4 tokens (last first) it rebuilds
   the sub-block's start state from the chunk-start state by element-wise steps, steps 4 tokens forward
   keeping their states (M, I) in registers, then steps them in reverse accumulating dM, dP and writing all
   gradients.  The backward uses its own chunks of BWD_CHUNK = 32 tokens (the fewest the memory budget
   allows), so rebuilding costs about 2 extra state steps per token.  (Rebuilding sub-block states by
   tensor-core matmuls instead made Triton run the whole sweep in the MMA accumulator layout, with warps
   duplicating work and registers spilling; the element-wise rebuild keeps one layout throughout.)
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from palimpsa.ops.triton.chunk_fwd import forward_step, load_state_part
from palimpsa.ops.triton.chunk_state import chunk_states
from palimpsa.ops.triton.utils import (SequenceLayout, cdiv, interpreting, k_parts, locate_chunk, masked_if,
                                       next_power_of_two, reciprocal, sequence_bounds, state_block, v_block)

BWD_CHUNK = 32


@triton.jit
def direct_adjoints(mu, r, q, do, dvar, HAS_DVAR: tl.constexpr):
    """(DM, DI, do * mu, dvar * r or None) of one token on a state part; q already carries the scale."""
    dm = do[None, :] * mu
    d_mean = (q[:, None] * do[None, :]) * r
    if HAS_DVAR:
        dvr = dvar[None, :] * r
        d_imp = -r * (q[:, None] * dm + (q * q)[:, None] * dvr)
    else:
        dvr = dm
        d_imp = -r * (q[:, None] * dm)
    return d_mean, d_imp, dm, dvr


@triton.jit
def unit_local_adjoint_kernel(
    q, k, v, g, beta, prior, h_mean, h_imp, adj_mean, adj_imp, unit_decay, do, dvar,
    cu_seqlens, unit_indices, unit_offsets, chunk_offsets, scale, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, U: tl.constexpr,
    KA: tl.constexpr, KB: tl.constexpr, BV: tl.constexpr,
    HAS_DVAR: tl.constexpr, IS_VARLEN: tl.constexpr, FAST: tl.constexpr,
):
    """Grid (V blocks, units, H).  adj_*[unit] = sum over the unit of exp(b_t - b_start) (DM_t, DI_t);
    unit_decay[unit, h] = b at the unit's end.  The first unit of each sequence is skipped (not needed)."""
    i_v, i_u, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    HAS_B: tl.constexpr = KB > 0
    W: tl.constexpr = C * U
    i_n, i_w, bos, eos, _base = locate_chunk(i_u, unit_indices, unit_offsets, cu_seqlens, T, W, IS_VARLEN)
    if i_w > 0:
        if IS_VARLEN:
            cbase = tl.load(chunk_offsets + i_n).to(tl.int32)
        else:
            cbase = i_n * tl.cdiv(T, C)
        start = bos + i_w * W
        end = tl.minimum(start + W, eos)
        offs_a = tl.arange(0, KA)
        mask_a = offs_a < K
        offs_v = i_v * BV + tl.arange(0, BV)
        mask_v = offs_v < V
        prior_h = tl.load(prior + i_h).to(tl.float32)
        h_off = ((cbase + i_w * U) * H + i_h).to(tl.int64) * K * V
        mean_a, imp_a = load_state_part(h_mean, h_imp, h_off, offs_a, offs_v, mask_a, mask_v, V, False)
        acc_m_a = tl.zeros([KA, BV], dtype=tl.float32)
        acc_p_a = tl.zeros([KA, BV], dtype=tl.float32)
        if HAS_B:
            offs_b = KA + tl.arange(0, KB)
            mask_b = offs_b < K
            mean_b, imp_b = load_state_part(h_mean, h_imp, h_off, offs_b, offs_v, mask_b, mask_v, V, False)
            acc_m_b = tl.zeros([KB, BV], dtype=tl.float32)
            acc_p_b = tl.zeros([KB, BV], dtype=tl.float32)
        b_acc = tl.sum(tl.zeros([1], dtype=tl.float32), 0)
        for t in range(start, end):
            tok_h = tl.cast(t, tl.int64) * H + i_h
            g_t = tl.load(g + tok_h).to(tl.float32)
            alpha = tl.exp(g_t)
            relax = (1.0 - alpha) * prior_h
            b_acc += g_t
            weight = tl.exp(b_acc)
            v_t = tl.load(v + tok_h * V + offs_v, mask=mask_v, other=0.0).to(tl.float32)
            beta_t = tl.load(beta + tok_h * V + offs_v, mask=mask_v, other=0.0).to(tl.float32)
            do_t = tl.load(do + tok_h * V + offs_v, mask=mask_v, other=0.0).to(tl.float32)
            if HAS_DVAR:
                dvar_t = tl.load(dvar + tok_h * V + offs_v, mask=mask_v, other=0.0).to(tl.float32)
            else:
                dvar_t = do_t
            q_a = tl.load(q + tok_h * K + offs_a, mask=mask_a, other=0.0).to(tl.float32) * scale
            k_a = tl.load(k + tok_h * K + offs_a, mask=mask_a, other=0.0).to(tl.float32)
            mean_a, imp_a, r_a = forward_step(mean_a, imp_a, k_a, v_t, beta_t, alpha, relax, FAST)
            dm_a, di_a, _dm, _dvr = direct_adjoints(mean_a * r_a, r_a, q_a, do_t, dvar_t, HAS_DVAR)
            acc_m_a += weight * dm_a
            acc_p_a += weight * di_a
            if HAS_B:
                q_b = tl.load(q + tok_h * K + offs_b, mask=mask_b, other=0.0).to(tl.float32) * scale
                k_b = tl.load(k + tok_h * K + offs_b, mask=mask_b, other=0.0).to(tl.float32)
                mean_b, imp_b, r_b = forward_step(mean_b, imp_b, k_b, v_t, beta_t, alpha, relax, FAST)
                dm_b, di_b, _dm, _dvr = direct_adjoints(mean_b * r_b, r_b, q_b, do_t, dvar_t, HAS_DVAR)
                acc_m_b += weight * dm_b
                acc_p_b += weight * di_b
        a_off = (i_u * H + i_h).to(tl.int64) * K * V
        tl.store(adj_mean + a_off + offs_a[:, None] * V + offs_v[None, :], acc_m_a,
                 mask=mask_a[:, None] & mask_v[None, :])
        tl.store(adj_imp + a_off + offs_a[:, None] * V + offs_v[None, :], acc_p_a,
                 mask=mask_a[:, None] & mask_v[None, :])
        if HAS_B:
            tl.store(adj_mean + a_off + offs_b[:, None] * V + offs_v[None, :], acc_m_b,
                     mask=mask_b[:, None] & mask_v[None, :])
            tl.store(adj_imp + a_off + offs_b[:, None] * V + offs_v[None, :], acc_p_b,
                     mask=mask_b[:, None] & mask_v[None, :])
        if i_v == 0:
            tl.store(unit_decay + i_u * H + i_h, b_acc)


@triton.jit
def unit_scan_kernel(
    prior, adj_mean, adj_imp, unit_decay, final_mu, final_imp, dmu_final, dimp_final, extra_dprior,
    cu_seqlens, unit_offsets, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, W: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_DFINAL: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """Grid (V blocks, K blocks, N * H).  In place: adj_*[unit] <- adjoint of (M, P) entering the unit
    from its end (the final-state gradient for the last unit).  extra_dprior: the final state's share of
    dI0, per program."""
    i_v, i_k, i_nh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h = i_nh // H, i_nh % H
    bos, eos = sequence_bounds(i_n, cu_seqlens, T, IS_VARLEN)
    NU = tl.cdiv(eos - bos, W)
    if IS_VARLEN:
        ubase = tl.load(unit_offsets + i_n).to(tl.int32)
    else:
        ubase = i_n * NU
    offs_k = i_k * BK + tl.arange(0, BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    mask = (offs_k < K)[:, None] & (offs_v < V)[None, :]
    tile = offs_k[:, None] * V + offs_v[None, :]
    adj_m = tl.zeros([BK, BV], dtype=tl.float32)
    adj_p = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_DFINAL:
        f_off = i_nh.to(tl.int64) * K * V
        mu = tl.load(final_mu + f_off + tile, mask=mask, other=0.0)
        imp = tl.load(final_imp + f_off + tile, mask=mask, other=1.0)
        dmu = tl.load(dmu_final + f_off + tile, mask=mask, other=0.0).to(tl.float32)
        dimp = tl.load(dimp_final + f_off + tile, mask=mask, other=0.0).to(tl.float32)
        r = 1.0 / imp
        adj_m = dmu * r
        adj_p = dimp - dmu * mu * r
        slot = (i_k * tl.num_programs(0) + i_v) * tl.num_programs(2) + i_nh
        tl.store(extra_dprior + slot, tl.sum(tl.sum(adj_p, 1), 0))
    for uu in range(0, NU):
        u = NU - 1 - uu
        a_off = ((ubase + u) * H + i_h).to(tl.int64) * K * V
        local_m = tl.load(adj_mean + a_off + tile, mask=masked_if(mask, u > 0), other=0.0)
        local_p = tl.load(adj_imp + a_off + tile, mask=masked_if(mask, u > 0), other=0.0)
        decay = tl.exp(tl.load(unit_decay + (ubase + u) * H + i_h, mask=u > 0, other=0.0))
        tl.store(adj_mean + a_off + tile, adj_m, mask=mask)
        tl.store(adj_imp + a_off + tile, adj_p, mask=mask)
        adj_m = local_m + decay * adj_m
        adj_p = local_p + decay * adj_p


@triton.jit
def token_forward(mean_a, imp_a, mean_b, imp_b, k, v, g, beta, prior_h, t, valid, i_h, offs_a, mask_a,
                  offs_b, mask_b, offs_v, mask_v, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                  HAS_B: tl.constexpr):
    """Advance both state parts (M, I) by token t (a no-op when not ``valid``); returns the new states."""
    tok_h = tl.cast(t, tl.int64) * H + i_h
    alpha = tl.exp(tl.load(g + tok_h, mask=valid, other=0.0).to(tl.float32))
    relax = (1.0 - alpha) * prior_h
    v_t = tl.load(v + tok_h * V + offs_v, mask=masked_if(mask_v, valid), other=0.0).to(tl.float32)
    beta_t = tl.load(beta + tok_h * V + offs_v, mask=masked_if(mask_v, valid), other=0.0).to(tl.float32)
    k_a = tl.load(k + tok_h * K + offs_a, mask=masked_if(mask_a, valid), other=0.0).to(tl.float32)
    imp_a = alpha * imp_a + ((k_a * k_a)[:, None] * beta_t[None, :] + relax)
    mean_a = alpha * mean_a + k_a[:, None] * v_t[None, :]
    if HAS_B:
        k_b = tl.load(k + tok_h * K + offs_b, mask=masked_if(mask_b, valid), other=0.0).to(tl.float32)
        imp_b = alpha * imp_b + ((k_b * k_b)[:, None] * beta_t[None, :] + relax)
        mean_b = alpha * mean_b + k_b[:, None] * v_t[None, :]
    return mean_a, imp_a, mean_b, imp_b


@triton.jit
def token_backward_part(mean, imp, adj_m, adj_p, sdi, q, k, v_t, beta_t, do_t, dvar_t, prior_h, scale,
                        HAS_DVAR: tl.constexpr, FAST: tl.constexpr):
    """Reverse step of one token on one state part, (mean, imp) = (M_t, I_t) its state after the token.

    Returns the adjoints handed to the previous token (before the decay), the running sum of DI, and the
    partial gradients: dv, dbeta (over this part's K rows), dk, dq (this part's rows), and this part's
    share of dg of the *next* token, sum_kv (adj_m M_t + adj_p P_t) with the adjoints that token handed back.
    """
    dg_next = tl.sum(tl.sum(adj_m * mean + adj_p * (imp - prior_h), 1), 0)
    r = reciprocal(imp, FAST)
    d_mean, d_imp, dm, dvr = direct_adjoints(mean * r, r, q, do_t, dvar_t, HAS_DVAR)
    if HAS_DVAR:
        dq = tl.sum(scale * dm + (2.0 * scale * q)[:, None] * dvr, 1)
    else:
        dq = tl.sum(scale * dm, 1)
    total_m = d_mean + adj_m
    total_p = d_imp + adj_p
    dv = tl.sum(k[:, None] * total_m, 0)
    dbeta = tl.sum((k * k)[:, None] * total_p, 0)
    dk = tl.sum(total_m * v_t[None, :] + (2.0 * k)[:, None] * (total_p * beta_t[None, :]), 1)
    return total_m, total_p, sdi + d_imp, dv, dbeta, dk, dq, dg_next


@triton.jit
def token_backward(mean_a, imp_a, mean_b, imp_b, adj_m_a, adj_p_a, adj_m_b, adj_p_b, sdi_a, sdi_b,
                   q, k, v, g, beta, do, dvar, dq, dk, dv, dbeta, dg_part, prior_h, scale, t, valid, eos, i_v,
                   i_h, offs_a, mask_a, offs_b, mask_b, offs_v, mask_v, NTOK,
                   H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, HAS_B: tl.constexpr,
                   HAS_DVAR: tl.constexpr, FAST: tl.constexpr):
    """Reverse step of token t on both parts, (mean, imp) its states after the token; writes its gradients
    and (this V block's share of) dg of token t + 1, returns the adjoints for token t - 1."""
    tok_h = tl.cast(t, tl.int64) * H + i_h
    alpha = tl.exp(tl.load(g + tok_h, mask=valid, other=0.0).to(tl.float32))
    mv = masked_if(mask_v, valid)
    ma = masked_if(mask_a, valid)
    v_t = tl.load(v + tok_h * V + offs_v, mask=mv, other=0.0).to(tl.float32)
    beta_t = tl.load(beta + tok_h * V + offs_v, mask=mv, other=0.0).to(tl.float32)
    do_t = tl.load(do + tok_h * V + offs_v, mask=mv, other=0.0).to(tl.float32)
    if HAS_DVAR:
        dvar_t = tl.load(dvar + tok_h * V + offs_v, mask=mv, other=0.0).to(tl.float32)
    else:
        dvar_t = do_t
    q_a = tl.load(q + tok_h * K + offs_a, mask=ma, other=0.0).to(tl.float32) * scale
    k_a = tl.load(k + tok_h * K + offs_a, mask=ma, other=0.0).to(tl.float32)
    total_m_a, total_p_a, sdi_a, dv_t, dbeta_t, dk_a, dq_a, dg_next = token_backward_part(
        mean_a, imp_a, adj_m_a, adj_p_a, sdi_a, q_a, k_a, v_t, beta_t, do_t, dvar_t, prior_h, scale, HAS_DVAR,
        FAST)
    tl.atomic_add(dq + tok_h * K + offs_a, dq_a, mask=ma, sem="relaxed")
    tl.atomic_add(dk + tok_h * K + offs_a, dk_a, mask=ma, sem="relaxed")
    adj_m_a = alpha * total_m_a
    adj_p_a = alpha * total_p_a
    if HAS_B:
        mb = masked_if(mask_b, valid)
        q_b = tl.load(q + tok_h * K + offs_b, mask=mb, other=0.0).to(tl.float32) * scale
        k_b = tl.load(k + tok_h * K + offs_b, mask=mb, other=0.0).to(tl.float32)
        total_m_b, total_p_b, sdi_b, dv_b, dbeta_b, dk_b, dq_b, dg_next_b = token_backward_part(
            mean_b, imp_b, adj_m_b, adj_p_b, sdi_b, q_b, k_b, v_t, beta_t, do_t, dvar_t, prior_h, scale,
            HAS_DVAR, FAST)
        tl.atomic_add(dq + tok_h * K + offs_b, dq_b, mask=mb, sem="relaxed")
        tl.atomic_add(dk + tok_h * K + offs_b, dk_b, mask=mb, sem="relaxed")
        adj_m_b = alpha * total_m_b
        adj_p_b = alpha * total_p_b
        dv_t += dv_b
        dbeta_t += dbeta_b
        dg_next += dg_next_b
    tl.store(dv + tok_h * V + offs_v, dv_t.to(dv.dtype.element_ty), mask=mv)
    tl.store(dbeta + tok_h * V + offs_v, dbeta_t.to(dbeta.dtype.element_ty), mask=mv)
    tl.store(dg_part + i_v * NTOK * H + tok_h + H, dg_next, mask=valid & (t + 1 < eos))
    return adj_m_a, adj_p_a, adj_m_b, adj_p_b, sdi_a, sdi_b


@triton.jit
def advance(mean_a, imp_a, mean_b, imp_b, k, v, g, beta, prior_h, t_start, t_end, i_h, offs_a, mask_a,
            offs_b, mask_b, offs_v, mask_v, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
            HAS_B: tl.constexpr):
    """Advance both state parts over tokens [t_start, t_end) (no reciprocal needed)."""
    for t in range(t_start, t_end):
        tok_h = tl.cast(t, tl.int64) * H + i_h
        alpha = tl.exp(tl.load(g + tok_h).to(tl.float32))
        relax = (1.0 - alpha) * prior_h
        v_t = tl.load(v + tok_h * V + offs_v, mask=mask_v, other=0.0).to(tl.float32)
        beta_t = tl.load(beta + tok_h * V + offs_v, mask=mask_v, other=0.0).to(tl.float32)
        k_a = tl.load(k + tok_h * K + offs_a, mask=mask_a, other=0.0).to(tl.float32)
        imp_a = alpha * imp_a + ((k_a * k_a)[:, None] * beta_t[None, :] + relax)
        mean_a = alpha * mean_a + k_a[:, None] * v_t[None, :]
        if HAS_B:
            k_b = tl.load(k + tok_h * K + offs_b, mask=mask_b, other=0.0).to(tl.float32)
            imp_b = alpha * imp_b + ((k_b * k_b)[:, None] * beta_t[None, :] + relax)
            mean_b = alpha * mean_b + k_b[:, None] * v_t[None, :]
    return mean_a, imp_a, mean_b, imp_b


@triton.jit
def unit_bwd_kernel(
    q, k, v, g, beta, prior, h_mean, h_imp, adj_mean, adj_imp, mu0, imp0, do, dvar,
    dq, dk, dv, dbeta, dg_part, dprior, dmu0, dimp0,
    cu_seqlens, unit_indices, unit_offsets, chunk_offsets, scale, T, NTOK,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, U: tl.constexpr,
    KA: tl.constexpr, KB: tl.constexpr, BV: tl.constexpr,
    HAS_INIT: tl.constexpr, HAS_DVAR: tl.constexpr, IS_VARLEN: tl.constexpr, FAST: tl.constexpr,
):
    """Grid (V blocks, units, H): the reverse sweep over one unit.

    Chunks of C tokens (last first) split into segments of 16 tokens (last first) and sub-blocks of 4
    tokens (last first).  A sub-block's start state is rebuilt from the chunk-start state by element-wise
    steps (on average 2 per token for C = 32); its 4 tokens are stepped forward keeping their states (M, I),
    then in reverse.  dq, dk: float32 accumulators [B*T, H, K] (atomic adds over V blocks); dv, dbeta:
    [B*T, H, V]; dg_part: [NV, B*T, H], zero-initialised (dg per V block); dprior: [NV, units, H];
    dmu0, dimp0: [N, H, K, V].
    """
    i_v, i_u, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    HAS_B: tl.constexpr = KB > 0
    W: tl.constexpr = C * U
    SEG: tl.constexpr = 16
    S: tl.constexpr = 4
    i_n, i_w, bos, eos, _base = locate_chunk(i_u, unit_indices, unit_offsets, cu_seqlens, T, W, IS_VARLEN)
    if IS_VARLEN:
        cbase = tl.load(chunk_offsets + i_n).to(tl.int32)
    else:
        cbase = i_n * tl.cdiv(T, C)
    n_chunks = tl.cdiv(eos - bos, C)
    c_first = i_w * U
    c_count = tl.minimum(c_first + U, n_chunks) - c_first
    prior_h = tl.load(prior + i_h).to(tl.float32)
    offs_a = tl.arange(0, KA)
    mask_a = offs_a < K
    offs_v = i_v * BV + tl.arange(0, BV)
    mask_v = offs_v < V
    if HAS_B:
        offs_b = KA + tl.arange(0, KB)
        mask_b = offs_b < K
    else:  # placeholders, never used
        offs_b = offs_a
        mask_b = mask_a
    a_off = (i_u * H + i_h).to(tl.int64) * K * V
    adj_m_a = tl.load(adj_mean + a_off + offs_a[:, None] * V + offs_v[None, :],
                      mask=mask_a[:, None] & mask_v[None, :], other=0.0)
    adj_p_a = tl.load(adj_imp + a_off + offs_a[:, None] * V + offs_v[None, :],
                      mask=mask_a[:, None] & mask_v[None, :], other=0.0)
    sdi_a = tl.zeros([KA, BV], dtype=tl.float32)
    if HAS_B:
        adj_m_b = tl.load(adj_mean + a_off + offs_b[:, None] * V + offs_v[None, :],
                          mask=mask_b[:, None] & mask_v[None, :], other=0.0)
        adj_p_b = tl.load(adj_imp + a_off + offs_b[:, None] * V + offs_v[None, :],
                          mask=mask_b[:, None] & mask_v[None, :], other=0.0)
        sdi_b = tl.zeros([KB, BV], dtype=tl.float32)
    else:
        adj_m_b = adj_m_a
        adj_p_b = adj_p_a
        sdi_b = sdi_a

    for cc in range(0, c_count):
        i_c = c_first + c_count - 1 - cc  # chunks of the unit, last first
        cs = bos + i_c * C
        n_tok = tl.minimum(C, eos - cs)
        h_off = ((cbase + i_c) * H + i_h).to(tl.int64) * K * V
        n_seg = tl.cdiv(n_tok, SEG)
        for ss in range(0, n_seg):
            seg = n_seg - 1 - ss  # segments of the chunk, last first
            seg_start = cs + seg * SEG
            seg_tok = tl.minimum(SEG, n_tok - seg * SEG)
            mean_sa, imp_sa = load_state_part(h_mean, h_imp, h_off, offs_a, offs_v, mask_a, mask_v, V, False)
            if HAS_B:
                mean_sb, imp_sb = load_state_part(h_mean, h_imp, h_off, offs_b, offs_v, mask_b, mask_v, V, False)
            else:
                mean_sb = mean_sa
                imp_sb = imp_sa
            mean_sa, imp_sa, mean_sb, imp_sb = advance(
                mean_sa, imp_sa, mean_sb, imp_sb, k, v, g, beta, prior_h, cs, seg_start, i_h,
                offs_a, mask_a, offs_b, mask_b, offs_v, mask_v, H, K, V, HAS_B)
            n_sub = tl.cdiv(seg_tok, S)
            for jj in range(0, n_sub):
                s = (n_sub - 1 - jj) * S  # sub-blocks of the segment, last first
                t0 = seg_start + s
                mean_a, imp_a, mean_b, imp_b = advance(
                    mean_sa, imp_sa, mean_sb, imp_sb, k, v, g, beta, prior_h, seg_start, t0, i_h,
                    offs_a, mask_a, offs_b, mask_b, offs_v, mask_v, H, K, V, HAS_B)
                # four tokens forward, keeping the states (M, I) after each
                mean_a, imp_a, mean_b, imp_b = token_forward(
                    mean_a, imp_a, mean_b, imp_b, k, v, g, beta, prior_h, t0, s < seg_tok, i_h,
                    offs_a, mask_a, offs_b, mask_b, offs_v, mask_v, H, K, V, HAS_B)
                m0_a, i0_a, m0_b, i0_b = mean_a, imp_a, mean_b, imp_b
                mean_a, imp_a, mean_b, imp_b = token_forward(
                    mean_a, imp_a, mean_b, imp_b, k, v, g, beta, prior_h, t0 + 1, s + 1 < seg_tok, i_h,
                    offs_a, mask_a, offs_b, mask_b, offs_v, mask_v, H, K, V, HAS_B)
                m1_a, i1_a, m1_b, i1_b = mean_a, imp_a, mean_b, imp_b
                mean_a, imp_a, mean_b, imp_b = token_forward(
                    mean_a, imp_a, mean_b, imp_b, k, v, g, beta, prior_h, t0 + 2, s + 2 < seg_tok, i_h,
                    offs_a, mask_a, offs_b, mask_b, offs_v, mask_v, H, K, V, HAS_B)
                m2_a, i2_a, m2_b, i2_b = mean_a, imp_a, mean_b, imp_b
                mean_a, imp_a, mean_b, imp_b = token_forward(
                    mean_a, imp_a, mean_b, imp_b, k, v, g, beta, prior_h, t0 + 3, s + 3 < seg_tok, i_h,
                    offs_a, mask_a, offs_b, mask_b, offs_v, mask_v, H, K, V, HAS_B)
                m3_a, i3_a, m3_b, i3_b = mean_a, imp_a, mean_b, imp_b
                # the same four tokens in reverse
                adj_m_a, adj_p_a, adj_m_b, adj_p_b, sdi_a, sdi_b = token_backward(
                    m3_a, i3_a, m3_b, i3_b, adj_m_a, adj_p_a, adj_m_b, adj_p_b, sdi_a, sdi_b,
                    q, k, v, g, beta, do, dvar, dq, dk, dv, dbeta, dg_part, prior_h, scale, t0 + 3,
                    s + 3 < seg_tok, eos, i_v, i_h, offs_a, mask_a, offs_b, mask_b, offs_v, mask_v, NTOK,
                    H, K, V, HAS_B, HAS_DVAR, FAST)
                adj_m_a, adj_p_a, adj_m_b, adj_p_b, sdi_a, sdi_b = token_backward(
                    m2_a, i2_a, m2_b, i2_b, adj_m_a, adj_p_a, adj_m_b, adj_p_b, sdi_a, sdi_b,
                    q, k, v, g, beta, do, dvar, dq, dk, dv, dbeta, dg_part, prior_h, scale, t0 + 2,
                    s + 2 < seg_tok, eos, i_v, i_h, offs_a, mask_a, offs_b, mask_b, offs_v, mask_v, NTOK,
                    H, K, V, HAS_B, HAS_DVAR, FAST)
                adj_m_a, adj_p_a, adj_m_b, adj_p_b, sdi_a, sdi_b = token_backward(
                    m1_a, i1_a, m1_b, i1_b, adj_m_a, adj_p_a, adj_m_b, adj_p_b, sdi_a, sdi_b,
                    q, k, v, g, beta, do, dvar, dq, dk, dv, dbeta, dg_part, prior_h, scale, t0 + 1,
                    s + 1 < seg_tok, eos, i_v, i_h, offs_a, mask_a, offs_b, mask_b, offs_v, mask_v, NTOK,
                    H, K, V, HAS_B, HAS_DVAR, FAST)
                adj_m_a, adj_p_a, adj_m_b, adj_p_b, sdi_a, sdi_b = token_backward(
                    m0_a, i0_a, m0_b, i0_b, adj_m_a, adj_p_a, adj_m_b, adj_p_b, sdi_a, sdi_b,
                    q, k, v, g, beta, do, dvar, dq, dk, dv, dbeta, dg_part, prior_h, scale, t0,
                    s < seg_tok, eos, i_v, i_h, offs_a, mask_a, offs_b, mask_b, offs_v, mask_v, NTOK,
                    H, K, V, HAS_B, HAS_DVAR, FAST)

    # adjoints now refer to the state before the unit's first token
    dprior_sum = tl.sum(tl.sum(sdi_a, 1), 0)
    if HAS_B:
        dprior_sum += tl.sum(tl.sum(sdi_b, 1), 0)
    if HAS_INIT:
        if i_w == 0:
            s_off = (i_n * H + i_h).to(tl.int64) * K * V
            tile_a = offs_a[:, None] * V + offs_v[None, :]
            m_a = mask_a[:, None] & mask_v[None, :]
            mu_init = tl.load(mu0 + s_off + tile_a, mask=m_a, other=0.0)
            imp_init = tl.load(imp0 + s_off + tile_a, mask=m_a, other=0.0)
            tl.store(dmu0 + s_off + tile_a, adj_m_a * imp_init, mask=m_a)
            tl.store(dimp0 + s_off + tile_a, adj_m_a * mu_init + adj_p_a, mask=m_a)
            dprior_sum -= tl.sum(tl.sum(adj_p_a, 1), 0)
            # dg of the first token: the adjoint it handed back times the initial (M, P) (zero without one)
            dg_first = tl.sum(tl.sum(adj_m_a * (mu_init * imp_init) + adj_p_a * (imp_init - prior_h), 1), 0)
            if HAS_B:
                tile_b = offs_b[:, None] * V + offs_v[None, :]
                m_b = mask_b[:, None] & mask_v[None, :]
                mu_init = tl.load(mu0 + s_off + tile_b, mask=m_b, other=0.0)
                imp_init = tl.load(imp0 + s_off + tile_b, mask=m_b, other=0.0)
                tl.store(dmu0 + s_off + tile_b, adj_m_b * imp_init, mask=m_b)
                tl.store(dimp0 + s_off + tile_b, adj_m_b * mu_init + adj_p_b, mask=m_b)
                dprior_sum -= tl.sum(tl.sum(adj_p_b, 1), 0)
                dg_first += tl.sum(tl.sum(adj_m_b * (mu_init * imp_init) + adj_p_b * (imp_init - prior_h), 1), 0)
            tl.store(dg_part + i_v * NTOK * H + tl.cast(bos, tl.int64) * H + i_h, dg_first)
    tl.store(dprior + (i_v * tl.num_programs(1) + i_u) * H + i_h, dprior_sum)


@triton.jit
def dg_sum_kernel(terms, anchors, dg, cu_seqlens, chunk_indices, T, H: tl.constexpr, C: tl.constexpr,
                  BH: tl.constexpr, IS_VARLEN: tl.constexpr):
    """One chunk of C tokens and BH heads: dg = the reverse cumulative sum of the chunk's terms plus its anchor."""
    i_c, i_hb = tl.program_id(0), tl.program_id(1)
    if IS_VARLEN:
        i_n = tl.load(chunk_indices + 2 * i_c).to(tl.int32)
        j = tl.load(chunk_indices + 2 * i_c + 1).to(tl.int32)
    else:
        i_n = i_c // tl.cdiv(T, C)
        j = i_c % tl.cdiv(T, C)
    bos, eos = sequence_bounds(i_n, cu_seqlens, T, IS_VARLEN)
    tok = bos + j * C + tl.arange(0, C)
    offs_h = i_hb * BH + tl.arange(0, BH)
    mask = (tok < eos)[:, None] & (offs_h < H)[None, :]
    ptr = tok.to(tl.int64)[:, None] * H + offs_h[None, :]
    x = tl.load(terms + ptr, mask=mask, other=0.0)
    anchor = tl.load(anchors + i_c * H + offs_h, mask=offs_h < H, other=0.0)
    tl.store(dg + ptr, tl.cumsum(x, 0, reverse=True) + anchor[None, :], mask=mask)


def dg_from_token_terms(terms: torch.Tensor, anchors: torch.Tensor, layout: SequenceLayout, B: int, T: int,
                        chunk_size: int) -> torch.Tensor:
    """dg [B, T, H] float32 from the CUDA sweep's terms (sweep.cu's header): for token t in chunk c (of
    ``chunk_size`` tokens of its sequence), dg_t = the sum of the per-token terms c_s over s from t to the chunk's
    end, plus the chunk's anchor (the sum over every later token, and the final state's share).  One launch.

    terms: c [B * T, H] float32; anchors: [NC, H] float32, one per chunk in ``layout.chunk_table`` order (chunks of
    sequence n after those of sequences before it).
    """
    H = terms.shape[-1]
    dg = torch.empty(B, T, H, device=terms.device, dtype=torch.float32)
    BH = min(next_power_of_two(H), 64)
    chunk_indices, _ = layout.chunk_table(chunk_size)
    dg_sum_kernel[(layout.num_chunks(chunk_size), cdiv(H, BH))](
        terms, anchors, dg, layout.cu32, chunk_indices, T, H=H, C=chunk_size, BH=BH, IS_VARLEN=layout.varlen,
    )
    return dg


def default_unit_chunks(layout: SequenceLayout, H: int, num_v_blocks: int, chunk_size: int,
                        target_programs: int = 2048) -> int:
    """Chunks per backward unit: units long enough to skip the local-adjoint pass where the grid is
    already large, short enough to fill the GPU (about ``target_programs`` programs)."""
    total_tokens = layout.B * layout.T
    per_unit_row = H * num_v_blocks
    want_units = max(1, cdiv(target_programs, per_unit_row))
    tokens_per_unit = max(chunk_size, total_tokens // want_units)
    return max(1, min(tokens_per_unit // chunk_size, cdiv(layout.max_length(), chunk_size)))


@triton.jit
def split_pairs_kernel(pairs, first, second, n, BLOCK: tl.constexpr):
    """first[i], second[i] = pairs[2 i], pairs[2 i + 1] for i < n, in the outputs' dtype."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    a = tl.load(pairs + 2 * offs, mask=mask)
    b = tl.load(pairs + 2 * offs + 1, mask=mask)
    tl.store(first + offs, a.to(first.dtype.element_ty), mask=mask)
    tl.store(second + offs, b.to(second.dtype.element_ty), mask=mask)


def split_pairs(pairs: torch.Tensor, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """The two halves of a contiguous float32 buffer [..., 2] as separate contiguous tensors [...] of ``dtype``, in
    one pass over it (the CUDA sweep's dq and dk pairs)."""
    if not pairs.is_contiguous() or pairs.shape[-1] != 2:
        raise ValueError(f"split_pairs needs a contiguous [..., 2] buffer, got shape {tuple(pairs.shape)}")
    first = torch.empty(pairs.shape[:-1], device=pairs.device, dtype=dtype)
    second = torch.empty_like(first)
    n = first.numel()
    if n:
        block = 1024
        split_pairs_kernel[(cdiv(n, block),)](pairs, first, second, n, BLOCK=block)
    return first, second


def _zeroed_views(device, *shapes) -> Tuple[torch.Tensor, ...]:
    """Float32 tensors of ``shapes``, all zero: views into one buffer, so that one fill (one launch) zeroes them."""
    sizes = [math.prod(shape) for shape in shapes]
    buffer = torch.zeros(sum(sizes), device=device, dtype=torch.float32)
    return tuple(part.view(shape) for part, shape in zip(buffer.split(sizes), shapes))


def chunk_bwd(
    q, k, v, g, beta, prior, scale: float, initial_state, layout: SequenceLayout,
    do: torch.Tensor, dvar: Optional[torch.Tensor], dfinal: Optional[Tuple[torch.Tensor, torch.Tensor]],
    unit_chunks: Optional[int] = None, block_v: int = 16, num_warps: Optional[int] = None,
    target_programs: int = 2048, sweep: str = "triton", lanes_k: int = 8, sweep_warps: int = 1, sweep_stage: int = 0,
    sweep_maxnreg: Optional[int] = None, sweep_unroll: int = 1, sweep_cols: int = 1, sweep_inputs: bool = False,
    sweep_dqk: Optional[int] = None, sweep_key_lanes: Optional[int] = None, sweep_blocks: Optional[int] = None,
    sweep_block_warps: Optional[int] = None, sweep_segment: Optional[int] = None,
    sweep_ck_first: Optional[bool] = None, sweep_compact: Optional[bool] = None, sweep_pairs: Optional[bool] = None,
):
    """Gradients of the Palimpsa op.

    q, k [B, T, H, K]; v, beta [B, T, H, V]; g [B, T, H]; prior [H] float32; do, dvar [B, T, H, V];
    dfinal: gradients of the final (mu, I), each [N, H, K, V], or None.
    Returns dq, dk, dv, dg, dbeta (dtypes of the inputs), dprior [H] float32, and (dmu0, dI0) or None.
    ``sweep``: the reverse sweep's kernel, "triton" (``unit_bwd_kernel``, ``block_v`` columns per program) or
    "gluon" (``unit_bwd_gluon_kernel``, ``sweep_warps`` warps of ``sweep_cols`` * 32 / ``lanes_k`` columns each per
    program;
    ``sweep_stage`` 1: a sub-block's states in shared memory instead of registers, 2: its first states too;
    ``sweep_maxnreg``: a cap on its registers per thread, on a GPU; ``sweep_unroll``: tokens per iteration of its
    state-rebuilding loops; ``sweep_cols``: value columns each of its threads holds; ``sweep_inputs``: each chunk's
    per-token inputs staged in shared memory); ``sweep_dqk``: the CUDA sweep's tokens whose dq and dk are summed at a
    time (``palimpsa.ops.cuda.sweep.dqk_tokens``), ``sweep_key_lanes`` its lanes over K
    (``palimpsa.ops.cuda.sweep.lanes_over_k``), ``sweep_blocks`` its blocks per multiprocessor, ``sweep_block_warps``
    and ``sweep_segment`` its warps per block and tokens per segment, ``sweep_ck_first`` where its sub-blocks'
    checkpoints are taken, ``sweep_compact`` its compact shared memory, ``sweep_pairs`` dq and dk added as pairs.
    ``target_programs`` sizes the units (:func:`default_unit_chunks`), counted with the running sweep's own value
    blocks.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    N = layout.N
    dev = q.device
    C = BWD_CHUNK
    KA, KB = k_parts(K)
    BV = v_block(V, block_v)
    if num_warps is None:  # about 6 state elements per thread and tile: the sweep keeps ~15 tiles live
        num_warps = 4 if (KA + KB) * BV <= 1024 else 8
    NV = cdiv(V, BV)
    if sweep == "cuda":  # its threads hold K / 16 rows of 2 columns: the units, dprior and the local-adjoint pass
        lanes_k, sweep_cols, sweep_warps = 16, 2, 1  # are those of the Gluon sweep with that layout
    if sweep in ("gluon", "cuda") and (lanes_k > KA or 0 < KB < lanes_k):
        raise ValueError(f"bwd_lanes_k ({lanes_k}) must not exceed the key rows of each part of K = {K} ({KA}"
                         + (f" and {KB}" if KB else "") + "): every lane of a column holds at least one row")
    if sweep in ("gluon", "cuda"):  # its own V blocks: the buffers per V block below follow them, and so do the units
        from palimpsa.ops.triton.chunk_bwd_gluon import gluon_sweep_block_v

        NV = cdiv(V, gluon_sweep_block_v(lanes_k, sweep_warps, sweep_cols))
    U = unit_chunks if unit_chunks is not None else default_unit_chunks(layout, H, NV, C, target_programs)
    W = U * C
    fast = not interpreting()
    has_dfinal = dfinal is not None
    states, final = chunk_states(k, v, g, beta, prior, initial_state, layout, C, True, has_dfinal)
    h_mean, h_imp = states
    unit_indices, unit_offsets = layout.chunk_table(W)
    _, chunk_offsets = layout.chunk_table(C)
    NU = layout.num_chunks(W)
    # the adjoints entering each unit from its end: zero when every sequence is one unit and no final state has a
    # gradient (then they come from the fill below, and no scan over units runs)
    scan_units = NU > N or has_dfinal
    if scan_units:
        adj_mean = torch.empty(NU, H, K, V, device=dev, dtype=torch.float32)
        adj_imp = torch.empty_like(adj_mean)
        unit_decay = torch.empty(NU, H, device=dev, dtype=torch.float32)
    dvar_arg = dvar if dvar is not None else do
    if NU > N and sweep in ("gluon", "cuda"):
        from palimpsa.ops.triton.chunk_bwd_gluon import gluon_sweep_block_v, unit_local_adjoint_gluon_kernel

        unit_local_adjoint_gluon_kernel[(cdiv(V, gluon_sweep_block_v(lanes_k, 1, sweep_cols)), NU, H)](
            q, k, v, g, beta, prior, h_mean, h_imp, adj_mean, adj_imp, unit_decay, do, dvar_arg,
            layout.cu32, unit_indices, unit_offsets, chunk_offsets, scale, T,
            H=H, K=K, V=V, C=C, U=U, KA=KA, KB=KB, LANES_K=lanes_k, VCOLS=sweep_cols, HAS_DVAR=dvar is not None,
            IS_VARLEN=layout.varlen, num_warps=1,
        )
    elif NU > N:
        unit_local_adjoint_kernel[(NV, NU, H)](
            q, k, v, g, beta, prior, h_mean, h_imp, adj_mean, adj_imp, unit_decay, do, dvar_arg,
            layout.cu32, unit_indices, unit_offsets, chunk_offsets, scale, T,
            H=H, K=K, V=V, C=C, U=U, KA=KA, KB=KB, BV=BV, HAS_DVAR=dvar is not None, IS_VARLEN=layout.varlen,
            FAST=fast, num_warps=num_warps,
        )
    BKs, BVs = state_block(K), state_block(V)
    n_scan = cdiv(K, BKs) * cdiv(V, BVs)
    NTOK = B * T
    # the buffers the kernels add into, zeroed by one fill: dq, dk [B, T, H, K] (float32 inputs get them back as they
    # are, and the outputs of a custom op may not share storage: two fills then), dg per V block (the Gluon and CUDA
    # sweeps add every block's share into one) [*, B * T, H], dg's anchors per chunk (CUDA sweep) [NC, H], the
    # final state's dprior shares [n_scan, N, H], and the zero adjoints entering the units [2, NU, H, K, V] where no
    # scan over units runs
    dg_parts = 1 if sweep in ("gluon", "cuda") else NV
    n_anchors = layout.num_chunks(C) if sweep == "cuda" else 0
    sums = ((dg_parts, NTOK, H), (n_anchors, H), (n_scan, N, H)) + (() if scan_units else ((2, NU, H, K, V),))
    pairs = False
    if sweep == "cuda":
        from palimpsa.ops.cuda import sweep as cuda_sweep

        pairs = cuda_sweep.uses_pairs(K, V, C, dvar is not None, sweep_pairs, key_lanes=sweep_key_lanes,
                                      blocks=sweep_blocks, warps=sweep_block_warps, segment=sweep_segment,
                                      compact=cuda_sweep.default_compact(K) if sweep_compact is None else sweep_compact)
    dqk = None
    if pairs:  # dq and dk interleaved in one buffer: (dq, dk) of a key row adjacent
        dqk, dg_part, dg_anchor, extra_dprior, *adj = _zeroed_views(dev, (B, T, H, K, 2), *sums)
        dq, dk = dqk[..., 0], dqk[..., 1]
    elif q.dtype == torch.float32:
        dq, dk = (torch.zeros(B, T, H, K, device=dev, dtype=torch.float32) for _ in range(2))
        dg_part, dg_anchor, extra_dprior, *adj = _zeroed_views(dev, *sums)
    else:
        dq, dk, dg_part, dg_anchor, extra_dprior, *adj = _zeroed_views(dev, (B, T, H, K), (B, T, H, K), *sums)
    if scan_units:
        f_mu, f_imp = final if has_dfinal else (adj_mean, adj_mean)
        d_mu, d_imp = dfinal if has_dfinal else (adj_mean, adj_mean)
        unit_scan_kernel[(cdiv(V, BVs), cdiv(K, BKs), N * H)](
            prior, adj_mean, adj_imp, unit_decay, f_mu, f_imp, d_mu, d_imp, extra_dprior,
            layout.cu32, unit_offsets, T, H=H, K=K, V=V, W=W, BK=BKs, BV=BVs,
            HAS_DFINAL=has_dfinal, IS_VARLEN=layout.varlen, num_warps=4,
        )
    else:
        adj_mean, adj_imp = adj[0].unbind(0)

    dv = torch.empty(B, T, H, V, device=dev, dtype=v.dtype)
    dbeta = torch.empty(B, T, H, V, device=dev, dtype=beta.dtype)
    dprior_part = torch.empty(NV, NU, H, device=dev, dtype=torch.float32)
    has_init = initial_state is not None
    if has_init:
        mu0, imp0 = initial_state
        dmu0 = torch.empty(N, H, K, V, device=dev, dtype=torch.float32)
        dimp0 = torch.empty_like(dmu0)
    else:
        mu0 = imp0 = dmu0 = dimp0 = adj_mean
    if sweep == "cuda":
        from palimpsa.ops.cuda.sweep import launch_sweep

        launch_sweep(q, k, v, g, beta, prior, h_mean, h_imp, adj_mean, adj_imp, mu0, imp0, do, dvar,
                     dq, dk, dv, dbeta, dg_part, dg_anchor, dprior_part, dmu0, dimp0, layout.cu32, unit_indices,
                     chunk_offsets, scale, T, NU, C, U, has_init, layout.varlen, dqk=sweep_dqk,
                     key_lanes=sweep_key_lanes, blocks=sweep_blocks, warps=sweep_block_warps,
                     segment=sweep_segment, ck_first=sweep_ck_first, compact=sweep_compact, pairs=pairs)
    elif sweep == "gluon":
        from palimpsa.ops.triton.chunk_bwd_gluon import unit_bwd_gluon_kernel

        unit_bwd_gluon_kernel[(NV, NU, H)](
            q, k, v, g, beta, prior, h_mean, h_imp, adj_mean, adj_imp, mu0, imp0, do, dvar_arg,
            dq, dk, dv, dbeta, dg_part, dprior_part, dmu0, dimp0,
            layout.cu32, unit_indices, unit_offsets, chunk_offsets, scale, T, NTOK,
            H=H, K=K, V=V, C=C, U=U, KA=KA, KB=KB, LANES_K=lanes_k, VCOLS=sweep_cols, WARPS=sweep_warps,
            STAGE=sweep_stage,
            UNROLL=sweep_unroll, INPUTS=sweep_inputs, HAS_INIT=has_init, HAS_DVAR=dvar is not None,
            IS_VARLEN=layout.varlen,
            num_warps=sweep_warps,
            **({} if sweep_maxnreg is None or not fast else dict(maxnreg=sweep_maxnreg)),
        )
    else:
        unit_bwd_kernel[(NV, NU, H)](
            q, k, v, g, beta, prior, h_mean, h_imp, adj_mean, adj_imp, mu0, imp0, do, dvar_arg,
            dq, dk, dv, dbeta, dg_part, dprior_part, dmu0, dimp0,
            layout.cu32, unit_indices, unit_offsets, chunk_offsets, scale, T, NTOK,
            H=H, K=K, V=V, C=C, U=U, KA=KA, KB=KB, BV=BV,
            HAS_INIT=has_init, HAS_DVAR=dvar is not None, IS_VARLEN=layout.varlen, FAST=fast,
            num_warps=num_warps,
        )

    if sweep == "cuda":
        dg = dg_from_token_terms(dg_part[0], dg_anchor, layout, B, T, C)
    else:
        dg = dg_part.sum(0).reshape(B, T, H)
    dprior = dprior_part.sum((0, 1))
    if has_dfinal:  # the final state's share (written by the scan over units only then)
        dprior = dprior + extra_dprior.sum((0, 1))
    dinit = (dmu0, dimp0) if has_init else None
    if dqk is not None:  # the halves of one buffer become separate dense tensors (float32's too: no shared storage)
        dq, dk = split_pairs(dqk, q.dtype)
    return (dq.to(q.dtype), dk.to(k.dtype), dv, dg.to(g.dtype), dbeta, dprior, dinit)
