"""Mixed precision of every trainer: bf16 autocast where asked for, float32 otherwise."""

from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("auto", "bf16", "fp32")


def uses_bf16(precision: str, device: torch.device) -> bool:
    """Whether a run at ``precision`` autocasts to bf16 on ``device``.

    "auto": bf16 on CUDA, float32 on the CPU (CPU bf16 is slow; for debugging only); "bf16": bf16 autocast on any
    device, the CPU included; "fp32" (the MQAR runs' "off"): float32.
    """
    if precision == "auto":
        return device.type == "cuda"
    if precision == "bf16":
        return True
    if precision in ("fp32", "off"):
        return False
    raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")


def autocast_context(device: torch.device, precision: str):
    """A bf16 autocast context on ``device`` when :func:`uses_bf16`, else a no-op context."""
    if uses_bf16(precision, device):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
