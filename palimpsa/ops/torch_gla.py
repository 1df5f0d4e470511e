"""The two GLA-shaped pieces of grouped importance, chunked, in plain PyTorch (autograd gives the backward).

Both are gated linear-attention recurrences with one scalar decay per head (alpha_t = exp(g_t)):

* :func:`gla_chunk_torch`: simple gated linear attention, state S [K, Vd] per (virtual) head,
  ``S_t = alpha_t S_{t-1} + k_t v_t^T``, ``o_t = scale * q_t^T S_t``.  Keys and decays may be shared by
  ``G`` consecutive query/value heads (grouped importance runs one virtual head per importance group).
* :func:`importance_scan_torch`: the grouped importance ``iota_t = I0 + J_t`` with
  ``J_t = alpha_t J_{t-1} + (k_t ** 2) outer b_t``, a [G, K] state read out in full at every token.

Inside a chunk of C tokens every decay factor is the exp of the log decays of the tokens it spans, summed per
segment (:mod:`palimpsa.ops.decay`: exact for g = -1e4, and g = -inf is a full reset), so no quantity is ever
divided by a decay; across chunks the state is carried by a short loop.
These are the CPU path and the readable statement of what the Triton kernels in
:mod:`palimpsa.ops.triton.gla` compute.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from palimpsa.ops.decay import log_decay_to_end, segment_log_decay


def pad_time(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad dim 1 (time) of x [N, T, ...] up to a multiple of ``multiple``."""
    pad = (-x.shape[1]) % multiple
    if not pad:
        return x
    return F.pad(x, (0,) * (2 * (x.dim() - 2)) + (0, pad))


def in_chunk_decays(g: torch.Tensor, chunk: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log decays inside each chunk, each summed over its own tokens (:mod:`palimpsa.ops.decay`).

    g: [N, T, H] with T a multiple of ``chunk``.  Returns b [N, NC, C, H] (from the chunk's start: the sum of g
    up to and including t), to_end [N, NC, C, H] (the sum of g after t to the chunk's end) and the causal decay
    matrices D [N, NC, H, C, C], D[t, s] = exp(g_{s+1} + ... + g_t) for s <= t and 0 above the diagonal.
    """
    N, T, H = g.shape
    gc = g.reshape(N, T // chunk, chunk, H)
    D = torch.exp(segment_log_decay(gc.transpose(2, 3)))
    return gc.cumsum(2), log_decay_to_end(gc, dim=2), D


def gla_chunk_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, scale: float,
                    initial_state: Optional[torch.Tensor], chunk: int = 64):
    """Chunked simple gated linear attention with keys and decays shared by groups of heads.

    q: [N, T, HV, K] queries; k: [N, T, HK, K] keys; v: [N, T, HV, Vd] values; g: [N, T, HK] log decays, with
    HV = HK * G (query/value head h * G + j reads key head h); initial_state: [N, HV, K, Vd] or None.
    Returns o [N, T, HV, Vd] and the final state [N, HV, K, Vd], in the dtype of q.
    """
    N, T, HV, K = q.shape
    HK, Vd = k.shape[2], v.shape[-1]
    G = HV // HK
    chunk = min(chunk, T)
    q, k, v, g = (pad_time(x, chunk) for x in (q, k, v, g))
    NC = q.shape[1] // chunk
    b, to_end, D = in_chunk_decays(g, chunk)  # [N, NC, C, HK] (twice), [N, NC, HK, C, C]
    if G > 1:
        k = k.repeat_interleave(G, dim=2)
        b, to_end = b.repeat_interleave(G, dim=3), to_end.repeat_interleave(G, dim=3)
        D = D.repeat_interleave(G, dim=2)
    qc, kc, vc = (x.reshape(N, NC, chunk, HV, -1) for x in (q, k, v))
    # inside the chunk: A[t, s] = (decay from s to t) q_t . k_s for s <= t
    A = torch.einsum("nctha,ncsha->nchts", qc, kc) * D
    o = torch.einsum("nchts,ncshd->ncthd", A, vc)  # [N, NC, C, HV, Vd]
    # across chunks: the state at each chunk's start
    chunk_decay = torch.exp(b[:, :, -1])  # [N, NC, HV]
    writes = torch.einsum("ncsha,ncshd->nchad", kc * torch.exp(to_end)[..., None], vc)  # [N, NC, HV, K, Vd]
    S = q.new_zeros(N, HV, K, Vd) if initial_state is None else initial_state.to(q.dtype)
    starts = []
    for c in range(NC):
        starts.append(S)
        S = chunk_decay[:, c, :, None, None] * S + writes[:, c]
    starts = torch.stack(starts, 1)  # [N, NC, HV, K, Vd]
    o = o + torch.einsum("ncthk,nchkd->ncthd", qc * torch.exp(b)[..., None], starts)
    o = (scale * o).reshape(N, NC * chunk, HV, Vd)[:, :T]
    return o, S


def importance_scan_torch(k: torch.Tensor, g: torch.Tensor, beta: Optional[torch.Tensor], prior: torch.Tensor,
                          initial_excess: Optional[torch.Tensor], groups: int, chunk: int = 64) -> torch.Tensor:
    """Grouped importance at every token: iota [N, T, H, G, K].

    k: [N, T, H, K]; g: [N, T, H]; beta: [N, T, H, G] (>= 0) or None (no writes); prior: [H] (I0);
    initial_excess: J_0 = I_initial - I0, [N, H, G, K], or None (zero).
    iota_t = I0 + J_t,  J_t = alpha_t J_{t-1} + k_t^2 outer beta_t.
    """
    N, T, H, K = k.shape
    G = groups
    dtype = k.dtype
    iota_prior = prior.to(dtype)[None, None, :, None, None]
    if beta is None and initial_excess is None:
        return iota_prior.expand(N, T, H, G, K)
    chunk = min(chunk, T)
    g_p = pad_time(g, chunk)
    NC = g_p.shape[1] // chunk
    b, to_end, D = in_chunk_decays(g_p, chunk)  # [N, NC, C, H] (twice), [N, NC, H, C, C]
    J = k.new_zeros(N, NC, chunk, H, G, K)
    if beta is not None:
        X = (pad_time(k, chunk) ** 2)[..., None, :] * pad_time(beta, chunk)[..., None]  # [N, Tp, H, G, K]
        Xc = X.reshape(N, NC, chunk, H, G, K)
        J = torch.einsum("nchts,ncshgk->ncthgk", D, Xc)
        writes = torch.einsum("ncsh,ncshgk->nchgk", torch.exp(to_end), Xc)  # [N, NC, H, G, K]
    else:
        writes = None
    chunk_decay = torch.exp(b[:, :, -1])  # [N, NC, H]
    state = k.new_zeros(N, H, G, K) if initial_excess is None else initial_excess.to(dtype)
    starts = []
    for c in range(NC):
        starts.append(state)
        state = chunk_decay[:, c, :, None, None] * state
        if writes is not None:
            state = state + writes[:, c]
    starts = torch.stack(starts, 1)  # [N, NC, H, G, K]
    J = J + torch.exp(b)[..., None, None] * starts[:, :, None]
    return (J.reshape(N, NC * chunk, H, G, K)[:, :T] + iota_prior)
