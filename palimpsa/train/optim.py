"""AdamW with decoupled weight decay on matrices only, and a linear-warmup + cosine learning-rate schedule: the
optimiser and schedule of every trainer here (the LM trainer and MQAR runs)."""

from __future__ import annotations

import math

import torch
from torch import nn


def parameter_groups(model: nn.Module, weight_decay: float):
    """Two AdamW groups: matrices (decayed) and vectors/scalars or ``_no_weight_decay`` parameters (not).

    Norm weights, biases and per-head gate parameters (A_log, dt_bias, D: flagged ``_no_weight_decay`` as in
    fla) are not decayed: decaying them would pull gates and scales toward zero, not regularise.
    """
    decay, no_decay = [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        if param.dim() >= 2 and not getattr(param, "_no_weight_decay", False):
            decay.append(param)
        else:
            no_decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas, eps: float = 1e-8, fused: bool = False):
    """AdamW over :func:`parameter_groups`; ``fused``: torch's fused CUDA implementation."""
    return torch.optim.AdamW(parameter_groups(model, weight_decay), lr=lr, betas=tuple(betas), eps=eps, fused=fused)


def warmup_cosine_factor(step: int, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """Learning-rate multiplier at optimizer step ``step`` (0-based): linear warmup to 1, then cosine
    decay to ``min_lr_ratio`` at ``max_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer, warmup_steps: int, max_steps: int, min_lr_ratio: float):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine_factor(step, warmup_steps, max_steps, min_lr_ratio))
