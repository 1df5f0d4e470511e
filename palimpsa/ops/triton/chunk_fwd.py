"""Palimpsa outputs, in parallel over chunks (Triton).

Every program owns one (chunk, head, V block): it loads the chunk-start state (M, I) as a [K, BV] tile
(two power-of-two row parts when K is not one) and steps through the chunk's tokens in registers::

    I = alpha I + (1 - alpha) I0 + k^2 beta^T;   M = alpha M + k v^T;   r = 1 / I
    o = scale * sum_k q M r;                      var = scale^2 * sum_k q^2 r

The same kernel walks a whole sequence from its initial state when ``RECURRENT`` (the fused recurrent
path), then also writes the final (mu, I).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from palimpsa.ops.triton.utils import (SequenceLayout, cdiv, interpreting, k_parts, locate_chunk, masked_if,
                                       reciprocal, sequence_bounds, v_block)


@triton.jit
def load_state_part(mean_ptr, imp_ptr, off, offs_k, offs_v, mask_k, mask_v, V: tl.constexpr, IS_MU: tl.constexpr):
    """Load a [BKx, BV] part of a state pair; returns (M, I).  ``IS_MU``: the first tensor holds mu, not M."""
    tile = offs_k[:, None] * V + offs_v[None, :]
    mask = mask_k[:, None] & mask_v[None, :]
    first = tl.load(mean_ptr + off + tile, mask=mask, other=0.0).to(tl.float32)
    imp = tl.load(imp_ptr + off + tile, mask=mask, other=1.0).to(tl.float32)
    if IS_MU:
        first = first * imp
    return first, imp


@triton.jit
def forward_step(mean, imp, k, v, beta, alpha, relax, FAST: tl.constexpr):
    """One token on a state part: returns the new (M, I) and r = 1 / I.  relax = (1 - alpha) * I0."""
    imp = alpha * imp + ((k * k)[:, None] * beta[None, :] + relax)
    mean = alpha * mean + k[:, None] * v[None, :]
    return mean, imp, reciprocal(imp, FAST)


@triton.jit
def load_token(q, k, v, g, beta, t, valid, i_h, offs_a, mask_a, offs_v, mask_v, H: tl.constexpr, K: tl.constexpr,
               V: tl.constexpr):
    """Inputs of token t as float32 (zeros when not ``valid``): g, v, beta, and part A of q, k."""
    tok_h = tl.cast(t, tl.int64) * H + i_h
    g_t = tl.load(g + tok_h, mask=valid, other=0.0).to(tl.float32)
    v_t = tl.load(v + tok_h * V + offs_v, mask=masked_if(mask_v, valid), other=0.0).to(tl.float32)
    beta_t = tl.load(beta + tok_h * V + offs_v, mask=masked_if(mask_v, valid), other=0.0).to(tl.float32)
    q_t = tl.load(q + tok_h * K + offs_a, mask=masked_if(mask_a, valid), other=0.0).to(tl.float32)
    k_t = tl.load(k + tok_h * K + offs_a, mask=masked_if(mask_a, valid), other=0.0).to(tl.float32)
    return g_t, v_t, beta_t, q_t, k_t


@triton.jit
def load_token_keys(q, k, t, valid, i_h, offs, mask, H: tl.constexpr, K: tl.constexpr):
    """q and k of token t on the key rows ``offs`` (float32, zeros when not ``valid``)."""
    tok_h = tl.cast(t, tl.int64) * H + i_h
    q_t = tl.load(q + tok_h * K + offs, mask=masked_if(mask, valid), other=0.0).to(tl.float32)
    k_t = tl.load(k + tok_h * K + offs, mask=masked_if(mask, valid), other=0.0).to(tl.float32)
    return q_t, k_t


@triton.jit
def chunk_fwd_kernel(
    q, k, v, g, beta, prior, h_mean, h_imp, mu0, imp0, o, var, final_mu, final_imp,
    cu_seqlens, chunk_indices, chunk_offsets, scale, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
    KA: tl.constexpr, KB: tl.constexpr, BV: tl.constexpr,
    RECURRENT: tl.constexpr, HAS_INIT: tl.constexpr, STORE_FINAL: tl.constexpr, HAS_VAR: tl.constexpr,
    IS_VARLEN: tl.constexpr, FAST: tl.constexpr,
):
    """Grid (V blocks, chunks or sequences, H).  o, var: [B*T, H, V] in the input dtype."""
    i_v, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    HAS_B: tl.constexpr = KB > 0
    if RECURRENT:
        i_n = i_c
        start, end = sequence_bounds(i_n, cu_seqlens, T, IS_VARLEN)
    else:
        i_n, i_w, bos, eos, base = locate_chunk(i_c, chunk_indices, chunk_offsets, cu_seqlens, T, C, IS_VARLEN)
        start = bos + i_w * C
        end = tl.minimum(start + C, eos)
    offs_a = tl.arange(0, KA)
    mask_a = offs_a < K
    offs_v = i_v * BV + tl.arange(0, BV)
    mask_v = offs_v < V
    if HAS_B:
        offs_b = KA + tl.arange(0, KB)
        mask_b = offs_b < K
    prior_h = tl.load(prior + i_h).to(tl.float32)

    if RECURRENT:
        st_off = (i_n * H + i_h).to(tl.int64) * K * V
        if HAS_INIT:
            mean_a, imp_a = load_state_part(mu0, imp0, st_off, offs_a, offs_v, mask_a, mask_v, V, True)
            if HAS_B:
                mean_b, imp_b = load_state_part(mu0, imp0, st_off, offs_b, offs_v, mask_b, mask_v, V, True)
        else:
            mean_a = tl.zeros([KA, BV], dtype=tl.float32)
            imp_a = tl.zeros([KA, BV], dtype=tl.float32) + prior_h
            if HAS_B:
                mean_b = tl.zeros([KB, BV], dtype=tl.float32)
                imp_b = tl.zeros([KB, BV], dtype=tl.float32) + prior_h
    else:
        h_off = (i_c * H + i_h).to(tl.int64) * K * V
        mean_a, imp_a = load_state_part(h_mean, h_imp, h_off, offs_a, offs_v, mask_a, mask_v, V, False)
        if HAS_B:
            mean_b, imp_b = load_state_part(h_mean, h_imp, h_off, offs_b, offs_v, mask_b, mask_v, V, False)

    # token t's inputs are loaded one iteration ahead, so their latency overlaps token t - 1's arithmetic
    g_n, v_n, beta_n, q_an, k_an = load_token(q, k, v, g, beta, start, start < end, i_h, offs_a, mask_a, offs_v,
                                              mask_v, H, K, V)
    if HAS_B:
        q_bn, k_bn = load_token_keys(q, k, start, start < end, i_h, offs_b, mask_b, H, K)
    for t in range(start, end):
        tok_h = tl.cast(t, tl.int64) * H + i_h
        g_t = g_n
        v_t = v_n
        beta_t = beta_n
        q_a = q_an * scale
        k_a = k_an
        g_n, v_n, beta_n, q_an, k_an = load_token(q, k, v, g, beta, t + 1, t + 1 < end, i_h, offs_a, mask_a, offs_v,
                                                  mask_v, H, K, V)
        if HAS_B:
            q_b = q_bn * scale
            k_b = k_bn
            q_bn, k_bn = load_token_keys(q, k, t + 1, t + 1 < end, i_h, offs_b, mask_b, H, K)
        alpha = tl.exp(g_t)
        relax = (1.0 - alpha) * prior_h
        mean_a, imp_a, r_a = forward_step(mean_a, imp_a, k_a, v_t, beta_t, alpha, relax, FAST)
        o_t = tl.sum(q_a[:, None] * mean_a * r_a, 0)
        if HAS_VAR:
            var_t = tl.sum((q_a * q_a)[:, None] * r_a, 0)
        if HAS_B:
            mean_b, imp_b, r_b = forward_step(mean_b, imp_b, k_b, v_t, beta_t, alpha, relax, FAST)
            o_t += tl.sum(q_b[:, None] * mean_b * r_b, 0)
            if HAS_VAR:
                var_t += tl.sum((q_b * q_b)[:, None] * r_b, 0)
        tl.store(o + tok_h * V + offs_v, o_t.to(o.dtype.element_ty), mask=mask_v)
        if HAS_VAR:
            tl.store(var + tok_h * V + offs_v, var_t.to(var.dtype.element_ty), mask=mask_v)

    if STORE_FINAL:
        st_off = (i_n * H + i_h).to(tl.int64) * K * V
        tile_a = offs_a[:, None] * V + offs_v[None, :]
        mask_av = mask_a[:, None] & mask_v[None, :]
        tl.store(final_mu + st_off + tile_a, mean_a / imp_a, mask=mask_av)
        tl.store(final_imp + st_off + tile_a, imp_a, mask=mask_av)
        if HAS_B:
            tile_b = offs_b[:, None] * V + offs_v[None, :]
            mask_bv = mask_b[:, None] & mask_v[None, :]
            tl.store(final_mu + st_off + tile_b, mean_b / imp_b, mask=mask_bv)
            tl.store(final_imp + st_off + tile_b, imp_b, mask=mask_bv)


def fwd_output(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, prior: torch.Tensor,
    scale: float, layout: SequenceLayout, output_variance: bool,
    states: Optional[Tuple[torch.Tensor, torch.Tensor]] = None, chunk_size: int = 64,
    initial_state: Optional[Tuple[torch.Tensor, torch.Tensor]] = None, output_final_state: bool = False,
    block_v: int = 32, num_warps: int = 4,
):
    """Outputs of the op from chunk-start ``states`` (chunk path) or, when ``states`` is None, by walking
    each whole sequence from ``initial_state`` (fused recurrent path; then the final state may be stored).

    q, k [B, T, H, K]; v, beta [B, T, H, V]; g [B, T, H]; prior [H] float32.
    Returns o [B, T, H, V] (dtype of q), var or None, (final_mu, final_imp) or None.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    recurrent = states is None
    KA, KB = k_parts(K)
    BV = v_block(V, block_v)
    o = torch.empty(B, T, H, V, device=q.device, dtype=q.dtype)
    var = torch.empty_like(o) if output_variance else o
    store_final = recurrent and output_final_state
    if store_final:
        final_mu = torch.empty(layout.N, H, K, V, device=q.device, dtype=torch.float32)
        final_imp = torch.empty_like(final_mu)
    else:
        final_mu = final_imp = o
    if recurrent:
        n_programs = layout.N
        chunk_indices = chunk_offsets = None
        h_mean = h_imp = o
    else:
        n_programs = layout.num_chunks(chunk_size)
        chunk_indices, chunk_offsets = layout.chunk_table(chunk_size)
        h_mean, h_imp = states
    mu0, imp0 = initial_state if initial_state is not None else (o, o)
    grid = (cdiv(V, BV), n_programs, H)
    chunk_fwd_kernel[grid](
        q, k, v, g, beta, prior, h_mean, h_imp, mu0, imp0, o, var, final_mu, final_imp,
        layout.cu32, chunk_indices, chunk_offsets, scale, T,
        H=H, K=K, V=V, C=chunk_size, KA=KA, KB=KB, BV=BV,
        RECURRENT=recurrent, HAS_INIT=initial_state is not None, STORE_FINAL=store_final,
        HAS_VAR=output_variance, IS_VARLEN=layout.varlen, FAST=not interpreting(), num_warps=num_warps,
    )
    final = (final_mu, final_imp) if store_final else None
    return o, (var if output_variance else None), final
