"""A tiny stand-in causal LM that honours ``cu_seqlens`` (runs in milliseconds on CPU)."""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutput


def segment_starts(cu_seqlens: torch.Tensor, length: int) -> torch.Tensor:
    """[T] index of the first token of the sequence each position belongs to."""
    positions = torch.arange(length, device=cu_seqlens.device)
    segment = torch.searchsorted(cu_seqlens[1:].long(), positions, right=True)
    return cu_seqlens.long()[segment]


class PrefixMeanMixer(nn.Module):
    """Causal token mixer: each position sees the mean of its sequence's prefix (resets at boundaries)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor, cu_seqlens=None) -> torch.Tensor:
        batch, length, _ = x.shape
        if cu_seqlens is None:
            cu_seqlens = torch.tensor([0, length], device=x.device)
        starts = segment_starts(cu_seqlens, length)
        sums = torch.cat([x.new_zeros(batch, 1, x.shape[-1]), x.cumsum(1)], 1)
        positions = torch.arange(length, device=x.device)
        prefix = sums[:, positions + 1] - sums[:, starts]
        count = (positions - starts + 1).to(x.dtype)[None, :, None]
        return x + self.proj(prefix / count)


class TinyBlock(nn.Module):
    """Prefix-mean mixer then a residual MLP."""

    def __init__(self, hidden: int):
        super().__init__()
        self.mixer = PrefixMeanMixer(hidden)
        self.mlp = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, 2 * hidden), nn.GELU(),
                                 nn.Linear(2 * hidden, hidden))

    def forward(self, x: torch.Tensor, cu_seqlens=None) -> torch.Tensor:
        x = self.mixer(x, cu_seqlens)
        return x + self.mlp(x)


class TinyPackedLM(nn.Module):
    """Embedding -> 2 blocks -> tied head.  forward(input_ids, cu_seqlens) -> output with .logits."""

    def __init__(self, vocab_size: int, hidden: int = 16, layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, hidden)
        self.layers = nn.ModuleList(TinyBlock(hidden) for _ in range(layers))
        self.norm = nn.LayerNorm(hidden)

    def forward(self, input_ids, attention_mask=None, cu_seqlens=None, **unused):
        x = self.embed(input_ids)
        for block in self.layers:
            x = block(x, cu_seqlens)
        return CausalLMOutput(logits=self.norm(x) @ self.embed.weight.T)


def tiny_factory(vocab_size: int) -> TinyPackedLM:
    return TinyPackedLM(vocab_size)
