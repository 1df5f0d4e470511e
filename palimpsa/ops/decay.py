"""Decays inside a chunk, summed without subtracting cumulative sums (every chunked path uses these).

A chunked linear-attention path needs, for tokens s <= t of a chunk, the decay between them,
``exp(g_{s+1} + ... + g_t)`` (the log decays g are <= 0).  The textbook form ``exp(b_t - b_s)`` with
``b = cumsum(g)`` goes wrong in float32 in two ways:

- one large |g| (a strong forget, g = -1e4) makes b_t and b_s both large, and their difference loses the
  small log decays after it (float32 keeps about 7 digits of b: at |b| = 1e4 the difference is off by ~1e-3,
  so the decay is off by ~1e-3 relative);
- g = -inf (a full reset, alpha = 0) gives -inf - (-inf) = NaN.

The helpers below sum the log decays *of the segment itself* (a suffix sum, or a masked cumulative sum per
segment), so each sum is as accurate as its own terms, and -inf stays -inf (exp gives the exact 0; no log
decay is ever floored).  Cumulative decays from the chunk start, ``exp(b_t)``, and the whole chunk's decay,
``exp(b_C)``, take no difference and are safe as they are.

The Triton kernels follow the same rule: they sum the *following* tokens' log decays in reverse
(``tl.cumsum(g_next, 0, reverse=True)``, see ``palimpsa/ops/triton/chunk_state.py``).
"""

from __future__ import annotations

import torch


def log_decay_to_end(g: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Log decay from just after token t to the end of its chunk: ``sum_{s > t} g_s`` along ``dim``.

    g: log decays with the chunk's tokens along ``dim`` (any other dimensions).  Returns a tensor of the same
    shape; 0 at the last token.  ``exp`` of it weighs token t's write in the chunk-end state.
    """
    C = g.shape[dim]
    following = g.narrow(dim, 1, C - 1)  # g_{t+1}, ..., g_{C-1}
    to_end = following.flip(dim).cumsum(dim).flip(dim)  # sum_{s >= t+1} g_s, summed from the end
    return torch.cat([to_end, torch.zeros_like(g.narrow(dim, 0, 1))], dim)


def segment_log_decay(g: torch.Tensor) -> torch.Tensor:
    """Log decays between every pair of tokens of a chunk (the masked "segment sum" of Mamba2's SSD).

    g: [..., C] log decays (tokens last).  Returns L [..., C, C] with ``L[..., t, s] = g_{s+1} + ... + g_t``
    for s <= t (0 on the diagonal) and -inf for s > t, so ``exp(L)`` is the chunk's causal decay matrix.
    Every entry sums its own segment only (memory O(C^2) per chunk).
    """
    C = g.shape[-1]
    causal = torch.ones(C, C, dtype=torch.bool, device=g.device).tril()
    strictly_lower = causal.tril(-1)
    terms = g[..., :, None].expand(*g.shape, C).masked_fill(~strictly_lower, 0.0)  # [.., r, s] = g_r if r > s
    L = terms.cumsum(-2)  # [.., t, s] = sum over r <= t of the terms = g_{s+1} + ... + g_t
    return L.masked_fill(~causal, float("-inf"))
