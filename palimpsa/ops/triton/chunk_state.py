"""Chunk-boundary states of Palimpsa by matrix products (Triton).

Write I = I0 + P.  Both the precision-weighted mean M and P are gated linear-attention states with the
same scalar decay alpha_t = exp(g_t):  M_t = alpha_t M_{t-1} + k_t v_t^T,  P_t = alpha_t P_{t-1} + k_t^2 beta_t^T.
Over one chunk of C tokens, with G the whole chunk's decay and D_t the decay from after token t to the
chunk's end::

    M_end = G M_start + (k * D[:, None])^T @ v        # [K, C] @ [C, V]
    P_end = G P_start + (k^2 * D[:, None])^T @ beta

log D_t = g_{t+1} + ... + g_C is summed from the following tokens' log decays (a reverse cumulative sum),
never as a difference b_C - b_t of cumulative sums: that difference loses the small log decays after a
large one in float32 and is NaN after g = -inf (see palimpsa/ops/decay.py).

so the states at every chunk start come from two small matmuls per chunk (tensor cores), walking the
chunks of one sequence in order.  Only these chunk-start states are written: (M, I) per chunk.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from palimpsa.ops.triton.config import state_tuning
from palimpsa.ops.triton.utils import SequenceLayout, cdiv, log_decay_to_end, sequence_bounds


@triton.jit
def chunk_dot(a, b, DOT_BF16: tl.constexpr):
    """a^T @ b for float32 tiles a [C, BK], b [C, BV], accurate to about float32.

    ``DOT_BF16`` (bf16 inputs, so b holds bf16 values exactly): a is split into a bf16 head and a bf16
    remainder, two bf16 matmuls with float32 accumulation (relative error ~2^-16; a single bf16 rounding
    of a, ~2^-9, is amplified by the cancellations in the decay gradient).  Otherwise 3xTF32.
    """
    if DOT_BF16:
        b16 = tl.cast(b, tl.bfloat16)
        a_hi = tl.cast(a, tl.bfloat16)
        a_lo = tl.cast(a - tl.cast(a_hi, tl.float32), tl.bfloat16)
        return tl.dot(tl.trans(a_hi), b16) + tl.dot(tl.trans(a_lo), b16)
    else:
        return tl.dot(tl.trans(a), b, input_precision="tf32x3")


@triton.jit
def chunk_states_kernel(
    k, v, g, beta, prior, mu0, imp0, h_mean, h_imp, final_mu, final_imp, cu_seqlens, chunk_offsets,
    T, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_INIT: tl.constexpr, STORE_STATES: tl.constexpr, STORE_FINAL: tl.constexpr, IS_VARLEN: tl.constexpr,
    DOT_BF16: tl.constexpr,
):
    """One program per (V block, K block, sequence * head); walks that sequence's chunks in order.

    h_mean, h_imp: [NC, H, K, V] float32, the state (M, I) before each chunk's first token.
    final_mu, final_imp: [N, H, K, V] float32, (mu, I) after the sequence's last token.
    """
    i_v, i_k, i_nh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h = i_nh // H, i_nh % H
    bos, eos = sequence_bounds(i_n, cu_seqlens, T, IS_VARLEN)
    NT = tl.cdiv(eos - bos, C)
    if IS_VARLEN:
        base = tl.load(chunk_offsets + i_n).to(tl.int32)
    else:
        base = i_n * NT
    offs_k = i_k * BK + tl.arange(0, BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    mask_k = offs_k < K
    mask_v = offs_v < V
    mask_kv = mask_k[:, None] & mask_v[None, :]
    tile = offs_k[:, None] * V + offs_v[None, :]
    prior_h = tl.load(prior + i_h).to(tl.float32)
    if HAS_INIT:
        mu = tl.load(mu0 + i_nh * K * V + tile, mask=mask_kv, other=0.0).to(tl.float32)
        imp = tl.load(imp0 + i_nh * K * V + tile, mask=mask_kv, other=1.0).to(tl.float32)
        mean = mu * imp
        excess = imp - prior_h  # P = I - I0
    else:
        mean = tl.zeros([BK, BV], dtype=tl.float32)
        excess = tl.zeros([BK, BV], dtype=tl.float32)

    offs_c = tl.arange(0, C)
    for i_c in range(0, NT):
        if STORE_STATES:
            h_off = ((base + i_c) * H + i_h).to(tl.int64) * K * V
            tl.store(h_mean + h_off + tile, mean, mask=mask_kv)
            tl.store(h_imp + h_off + tile, excess + prior_h, mask=mask_kv)
        tok = bos + i_c * C + offs_c
        mask_t = tok < eos
        tok_h = tok.to(tl.int64) * H + i_h
        g_c = tl.load(g + tok_h, mask=mask_t, other=0.0).to(tl.float32)
        weight = tl.exp(log_decay_to_end(g, tok_h, (offs_c + 1 < C) & (tok + 1 < eos), H))
        k_c = tl.load(k + tok_h[:, None] * K + offs_k[None, :], mask=mask_t[:, None] & mask_k[None, :],
                      other=0.0).to(tl.float32)
        v_c = tl.load(v + tok_h[:, None] * V + offs_v[None, :], mask=mask_t[:, None] & mask_v[None, :],
                      other=0.0).to(tl.float32)
        beta_c = tl.load(beta + tok_h[:, None] * V + offs_v[None, :], mask=mask_t[:, None] & mask_v[None, :],
                         other=0.0).to(tl.float32)
        kw = k_c * weight[:, None]
        decay = tl.exp(tl.sum(g_c, 0))
        mean = decay * mean + chunk_dot(kw, v_c, DOT_BF16)
        excess = decay * excess + chunk_dot(kw * k_c, beta_c, DOT_BF16)
    if STORE_FINAL:
        imp = excess + prior_h
        tl.store(final_mu + i_nh * K * V + tile, mean / imp, mask=mask_kv)
        tl.store(final_imp + i_nh * K * V + tile, imp, mask=mask_kv)


def chunk_states(
    k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, prior: torch.Tensor,
    initial_state: Optional[Tuple[torch.Tensor, torch.Tensor]], layout: SequenceLayout, chunk_size: int,
    store_states: bool = True, store_final: bool = False,
):
    """Chunk-start states and (optionally) the final state; launched as ``config.state_tuning(K, V, chunk_size)`` says.

    k [B, T, H, K]; v, beta [B, T, H, V]; g [B, T, H]; prior [H] float32; initial_state (mu, I) [N, H, K, V].
    Returns (h_mean, h_imp) each [NC, H, K, V] float32 (None unless ``store_states``) and
    (final_mu, final_imp) each [N, H, K, V] float32 (None unless ``store_final``).
    """
    B, T, H, K = k.shape
    V = v.shape[-1]
    N = layout.N
    NC = layout.num_chunks(chunk_size)
    dev = k.device
    if store_states:
        h_mean = torch.empty(NC, H, K, V, device=dev, dtype=torch.float32)
        h_imp = torch.empty(NC, H, K, V, device=dev, dtype=torch.float32)
    else:
        h_mean = h_imp = torch.empty(1, device=dev, dtype=torch.float32)
    if store_final:
        final_mu = torch.empty(N, H, K, V, device=dev, dtype=torch.float32)
        final_imp = torch.empty(N, H, K, V, device=dev, dtype=torch.float32)
    else:
        final_mu = final_imp = h_mean
    _, chunk_offsets = layout.chunk_table(chunk_size)
    mu0, imp0 = initial_state if initial_state is not None else (h_mean, h_mean)
    tune = state_tuning(K, V, chunk_size)
    BK, BV = tune.block_k, tune.block_v
    launch = {"num_warps": tune.num_warps}
    if tune.num_stages is not None:
        launch["num_stages"] = tune.num_stages
    if tune.maxnreg is not None:
        launch["maxnreg"] = tune.maxnreg
    grid = (cdiv(V, BV), cdiv(K, BK), N * H)
    chunk_states_kernel[grid](
        k, v, g, beta, prior, mu0, imp0, h_mean, h_imp, final_mu, final_imp, layout.cu32, chunk_offsets,
        T, H=H, K=K, V=V, C=chunk_size, BK=BK, BV=BV,
        HAS_INIT=initial_state is not None, STORE_STATES=store_states, STORE_FINAL=store_final,
        IS_VARLEN=layout.varlen, DOT_BF16=k.dtype == torch.bfloat16, **launch,
    )
    states = (h_mean, h_imp) if store_states else None
    final = (final_mu, final_imp) if store_final else None
    return states, final
