"""Input checks shared by the layers (and by the models that pass a padding mask to them)."""

from __future__ import annotations

import torch


def check_has_tokens(hidden_states: torch.Tensor) -> None:
    """Raise a clear error for an empty sequence: hidden_states [B, T, d] must have B >= 1 and T >= 1."""
    if hidden_states.shape[0] == 0 or hidden_states.shape[1] == 0:
        raise ValueError(f"hidden_states must hold at least one token in one sequence (B >= 1, T >= 1), "
                         f"got shape {tuple(hidden_states.shape)}")


def binary_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """The padding mask as a bool tensor, after checking that it holds only 0 (padding) and 1 (token).

    A bool mask passes as it is; any other dtype costs one host sync (skipped inside compiled graphs), so a
    model converts its mask once and its layers see a bool mask.
    """
    if attention_mask.dtype == torch.bool:
        return attention_mask
    if not torch.compiler.is_compiling() and bool(((attention_mask != 0) & (attention_mask != 1)).any()):
        raise ValueError("attention_mask must hold only 1 (token) and 0 (padding); got another value "
                         "(a fractional, negative or NaN entry)")
    return attention_mask != 0
