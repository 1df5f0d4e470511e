"""Checks of the models' forward arguments that the layers below cannot make."""

from __future__ import annotations

from typing import Any

import torch


def check_input_ids(input_ids: Any) -> None:
    """Raise TypeError unless ``input_ids`` is None or an integer tensor [B, T] (a list of ids is not converted)."""
    if input_ids is None:
        return
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a torch.LongTensor [B, T] of token ids, got a {type(input_ids).__name__}"
                        " (wrap it: torch.tensor([[...]]))")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids must be an integer tensor of token ids, got {input_ids.dtype}")
