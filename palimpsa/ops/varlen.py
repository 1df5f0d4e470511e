"""Packed variable-length sequences ([1, T_total, ...] with cu_seqlens): to and from a padded batch, or one row
with a full reset at each sequence's first token."""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch


def _positions(lengths: Sequence[int], t_max: int, device) -> torch.Tensor:
    """Flat indices into an [N * t_max] padded layout of every packed token, in packed order: [T_total]."""
    lengths_t = torch.as_tensor(lengths, device=device)
    seq = torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths_t)
    starts = torch.cumsum(lengths_t, 0) - lengths_t
    offset = torch.arange(seq.numel(), device=device) - starts[seq]
    return seq * t_max + offset


def pad_sequences(tensors: Sequence[torch.Tensor], lengths: List[int]) -> Tuple[torch.Tensor, ...]:
    """[1, T_total, *D] packed tensors -> [N, T_max, *D] zero-padded at the end of each sequence."""
    t_max = max(lengths)
    out = []
    for x in tensors:
        pos = _positions(lengths, t_max, x.device)
        padded = x.new_zeros(len(lengths) * t_max, *x.shape[2:]).index_put((pos,), x[0])
        out.append(padded.reshape(len(lengths), t_max, *x.shape[2:]))
    return tuple(out)


def unpad_sequences(x: torch.Tensor, lengths: List[int]) -> torch.Tensor:
    """[N, T_max, *D] padded tensor -> [1, T_total, *D] packed."""
    N, t_max = x.shape[:2]
    pos = _positions(lengths, t_max, x.device)
    return x.reshape(N * t_max, *x.shape[2:])[pos][None]


def reset_at_sequence_starts(g: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """g [1, T, H] with -inf (alpha = 0, a full reset) at the first token of every packed sequence.

    From the default state (mu = 0, I = I0) a sequence's first token gives M = k v^T and I = I0 + k^2 beta
    whatever its own decay, which is what the reset gives after any earlier tokens: so the packed row run as one
    sequence is the op on each sequence, exactly, outputs and gradients (the replaced decays get a zero
    gradient, as they have no effect; the prior's gradient through the reset is the initial state's).  No
    padding, and no host sync: the offsets stay on the device.
    """
    starts = torch.zeros(g.shape[1], dtype=torch.bool, device=g.device)
    starts[cu_seqlens[:-1]] = True
    return g.masked_fill(starts[None, :, None], float("-inf"))
