"""Moving between packed variable-length sequences ([1, T_total, ...] with cu_seqlens) and a padded batch."""

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
