"""Small building blocks shared by the layers and models: short convolution, norms, MLP, a layer cache.

The norms compute in float32 (float64 for float64 inputs) and return the input dtype.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

ACTIVATIONS = {None: None, "silu": F.silu, "swish": F.silu}


def positions_in_sequences(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Offset of every packed token inside its own sequence.

    cu_seqlens: [N + 1] offsets (0 = cu_seqlens[0] < ... < cu_seqlens[N] = total). Returns [total] int64.
    """
    positions = torch.arange(total, device=cu_seqlens.device)
    sequence_of_token = torch.searchsorted(cu_seqlens, positions, right=True) - 1
    return positions - cu_seqlens[sequence_of_token]


class ShortConvolution(nn.Conv1d):
    """Causal depthwise 1-D convolution over time (kernel W), with an optional activation and a decoding state.

    The weight has ``nn.Conv1d``'s depthwise layout [C, 1, W]; output t sees inputs t - W + 1 .. t.  The
    decoding state is the last W - 1 inputs, [B, C, W - 1]; zeros stand for "nothing before".

    Args:
        channels: C, the number of channels (one filter each).
        kernel_size: W >= 1.
        bias: add a per-channel bias.
        activation: None, "silu" or "swish" (applied after the convolution).
    """

    def __init__(self, channels: int, kernel_size: int = 4, bias: bool = False, activation: Optional[str] = "silu"):
        if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1:
            raise ValueError(f"kernel_size must be a positive int, got {kernel_size!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(k for k in ACTIVATIONS if k)} or None, got {activation!r}")
        super().__init__(channels, channels, kernel_size, groups=channels, padding=0, bias=bias)
        self.activation = activation

    def forward(
        self,
        x: torch.Tensor,
        state: Optional[torch.Tensor] = None,
        output_final_state: bool = False,
        cu_seqlens: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Convolve x along time.

        Args:
            x: [B, T, C] inputs.
            state: [B, C, W - 1] the inputs that precede x (a decoding state); zeros when None.
            output_final_state: also return the last W - 1 inputs, [B, C, W - 1], for the next call.
            cu_seqlens: [N + 1] offsets of packed sequences (B == 1): no tap reaches across a boundary.
                Cannot be combined with ``state`` or ``output_final_state``.

        Returns:
            (y [B, T, C] in the dtype of x, final_state [B, C, W - 1] or None).
        """
        if x.dim() != 3 or x.shape[-1] != self.in_channels:
            raise ValueError(f"x must have shape [B, T, C={self.in_channels}], got {tuple(x.shape)}")
        B, T, C = x.shape
        W = self.kernel_size[0]
        if cu_seqlens is not None and (state is not None or output_final_state):
            raise ValueError("cu_seqlens cannot be combined with a convolution state (state / output_final_state)")
        if state is not None and state.shape != (B, C, W - 1):
            raise ValueError(f"state must have shape [B, C, W - 1] = [{B}, {C}, {W - 1}], got {tuple(state.shape)}")
        past = x.new_zeros(B, C, W - 1) if state is None else state.to(x.dtype)
        full = torch.cat([past, x.transpose(1, 2)], dim=-1)  # [B, C, W - 1 + T]
        if cu_seqlens is None:
            y = F.conv1d(full, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype),
                         groups=C)
        else:
            # output t uses input t - s (weight tap W - 1 - s) only when that input is in t's own sequence
            offset = positions_in_sequences(cu_seqlens.to(x.device, torch.long), T)
            weight = self.weight[:, 0].to(x.dtype)  # [C, W]
            y = torch.zeros(B, C, T, device=x.device, dtype=x.dtype)
            for s in range(W):
                shifted = full[..., W - 1 - s: W - 1 - s + T]
                y = y + shifted * weight[:, W - 1 - s, None] * (offset >= s).to(x.dtype)
            if self.bias is not None:
                y = y + self.bias.to(x.dtype)[:, None]
        y = y.transpose(1, 2)
        if self.activation is not None:
            y = ACTIVATIONS[self.activation](y)
        final_state = full[..., full.shape[-1] - (W - 1):].contiguous() if output_final_state else None
        return y, final_state


class RMSNorm(nn.Module):
    """RMSNorm over the last dimension: ``weight * x / sqrt(mean(x^2) + eps)``.  x: [..., D] -> [..., D]."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fp = torch.promote_types(x.dtype, torch.float32)
        h = x.to(fp)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.to(fp) * h).to(x.dtype)


class GatedRMSNorm(nn.Module):
    """RMSNorm over the last dimension with a swish (SiLU) gate.  x, gate: [..., D] -> [..., D] (dtype of x).

    ``norm_before_gate=True`` (Palimpsa, Gated DeltaNet): ``weight * rms_normalise(x) * silu(gate)``.
    ``norm_before_gate=False`` (Mamba2): ``weight * rms_normalise(x * silu(gate))``.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, norm_before_gate: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        self.norm_before_gate = norm_before_gate

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        fp = torch.promote_types(x.dtype, torch.float32)
        h, swish = x.to(fp), F.silu(gate.to(fp))
        if not self.norm_before_gate:
            h = h * swish
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.norm_before_gate:
            h = h * swish
        return (self.weight.to(fp) * h).to(x.dtype)


def swiglu_intermediate_size(hidden_size: int, hidden_ratio: float) -> int:
    """Width of a SwiGLU MLP with the parameters of a ``hidden_ratio`` x MLP: 2/3 of it, rounded up to 256.

    (The convention of flash-linear-attention's ``GatedMLP``, which the paper's models use.)
    """
    width = int(hidden_size * hidden_ratio * 2 / 3)
    return 256 * math.ceil(width / 256)


class SwiGLUMLP(nn.Module):
    """``down(silu(gate(x)) * up(x))``, no biases.  x: [..., d] -> [..., d].

    Args:
        hidden_size: d.
        hidden_ratio: sets the width through :func:`swiglu_intermediate_size` when intermediate_size is None.
        intermediate_size: explicit width.
    """

    def __init__(self, hidden_size: int, hidden_ratio: float = 4, intermediate_size: Optional[int] = None):
        super().__init__()
        if intermediate_size is None:
            intermediate_size = swiglu_intermediate_size(hidden_size, hidden_ratio)
        if intermediate_size < 1:
            raise ValueError(f"intermediate_size must be positive, got {intermediate_size}")
        self.intermediate_size = intermediate_size
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class RecurrentLayerCache:
    """Decoding state of one recurrent layer, updated in place by the layer's forward.

    Attributes:
        conv_states: name -> [B, C, W - 1], the last inputs of each short convolution.
        recurrent_state: (mu, I), each [B, H, K, V] float32, or None before the first token.
        seen_tokens: number of positions absorbed so far (padding included).

    The batch methods (``reorder_cache``, ``batch_select_indices``, ``batch_repeat_interleave``, ``reset``) are
    the ones ``transformers``' ``Cache`` calls on its layers during ``generate()``.
    """

    is_compileable = False
    supports_early_init = False
    is_croppable = False
    is_sliding = False

    def __init__(self) -> None:
        self.conv_states: Dict[str, torch.Tensor] = {}
        self.recurrent_state: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
        self.seen_tokens = 0

    def __repr__(self) -> str:
        shape = None if self.recurrent_state is None else tuple(self.recurrent_state[0].shape)
        return f"{self.__class__.__name__}(seen_tokens={self.seen_tokens}, state={shape})"

    @property
    def has_previous_state(self) -> bool:
        return self.seen_tokens > 0

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.conv_states = {name: fn(x) for name, x in self.conv_states.items()}
        if self.recurrent_state is not None:
            self.recurrent_state = (fn(self.recurrent_state[0]), fn(self.recurrent_state[1]))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Keep batch rows ``beam_idx`` [B'] in that order (beam search)."""
        self._map(lambda x: x.index_select(0, beam_idx.to(x.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep batch rows ``indices`` [B']."""
        self._map(lambda x: x[indices.to(x.device)])

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat every batch row ``repeats`` times ([B, ...] -> [B * repeats, ...])."""
        self._map(lambda x: x.repeat_interleave(repeats, dim=0))

    def reset(self) -> None:
        """Forget everything (the next call starts a new sequence)."""
        self.conv_states, self.recurrent_state, self.seen_tokens = {}, None, 0

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a recurrent state cannot be rolled back: crop() is not supported")

    def get_seq_length(self) -> int:
        return self.seen_tokens

    def get_max_length(self) -> int:
        return -1  # no limit: the state has a fixed size whatever the length

    def offload(self) -> None:
        self._map(lambda x: x.to("cpu", non_blocking=True))

    def prefetch(self) -> None:  # states are used where they are
        pass
