"""Mamba2 (``transformers`` format) -> Meta-Mamba2, function-preserving (see :mod:`palimpsa.convert.metaplastic`)."""

from __future__ import annotations

from typing import Optional, Union

import torch
from transformers import Mamba2ForCausalLM

from palimpsa.convert.loading import Source, load_checkpoint
from palimpsa.convert.metaplastic import (AUTO_SCALE_START, CONVERTED_IMPORTANCE_SCALE, DEFAULT_MAX_GATE_EFFECT,
                                         check_scale, copy_weights_and_init_gate)
from palimpsa.models.meta_mamba2 import MetaMamba2Config, MetaMamba2ForCausalLM


def mamba2_to_meta_mamba2(
    source: Source,
    importance_rank: Optional[int] = None,
    importance_scale: Union[float, str] = CONVERTED_IMPORTANCE_SCALE,
    seed: int = 0,
    max_gate_effect: float = DEFAULT_MAX_GATE_EFFECT,
) -> MetaMamba2ForCausalLM:
    """Make a trained Mamba2 metaplastic without changing its outputs.

    Args:
        source: a ``transformers`` ``Mamba2ForCausalLM``, a directory holding one, or a Hub id.
        importance_rank: rank r of the new importance gates (default ceil(hidden_size / 16)).
        importance_scale: initial c of the gates' softplus(c) factor, or "auto": the largest of -12, -16, ...
            whose effect on the logits is at most ``max_gate_effect`` (see :mod:`palimpsa.convert.metaplastic`),
            so the logits stay within 1e-5 (relative, fp32) of the source while every new parameter gets a
            nonzero gradient.  The value used is stored as ``config.importance_scale_init``.
        seed: seed of the random init of the gates' low-rank projections (the global RNG is left untouched).
        max_gate_effect: bound of the "auto" calibration (relative change of the logits on random tokens).

    Returns:
        A ``MetaMamba2ForCausalLM`` (metaplasticity on) on the source's device and dtype, in eval mode.

    Raises:
        TypeError / ValueError: not a Mamba2, missing or mis-shaped weights, or options Meta-Mamba2 does not
        support (for example ``hidden_act`` other than "silu", or a gated norm per group: see
        :func:`check_full_width_gated_norm`).
    """
    importance_scale = check_scale(importance_scale)
    initial_scale = AUTO_SCALE_START if importance_scale == "auto" else importance_scale
    mamba2 = load_checkpoint(source, Mamba2ForCausalLM, "mamba2", "Mamba2")
    check_full_width_gated_norm(mamba2)
    overrides = dict(metaplasticity=True, importance_scale_init=initial_scale)
    if importance_rank is not None:
        overrides["importance_rank"] = importance_rank
    config = MetaMamba2Config.from_mamba2_config(mamba2.config, **overrides)
    parameter = next(mamba2.parameters())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MetaMamba2ForCausalLM(config)
    model.to(device=parameter.device, dtype=parameter.dtype)
    copy_weights_and_init_gate(mamba2, model, importance_scale, max_gate_effect)
    return model.eval()


def check_full_width_gated_norm(mamba2: Mamba2ForCausalLM) -> None:
    """Raise ValueError when the source's gated RMSNorm normalises per group of channels.

    Meta-Mamba2 normalises the gated scan output over all its channels, as ``transformers`` up to 5.22 does
    (``MambaRMSNormGated`` without ``group_size``).  From 5.23 on, ``transformers``' Mamba2 normalises each of the
    ``n_groups`` groups separately (as ``mamba_ssm``); with ``n_groups`` > 1 that is another function, which no
    Meta-Mamba2 reproduces, so the conversion could not preserve the logits.  With ``n_groups`` = 1 both agree.
    """
    for i, layer in enumerate(mamba2.backbone.layers):
        norm = layer.mixer.norm
        width = norm.weight.numel()
        group_size = getattr(norm, "group_size", width)
        if group_size != width:
            raise ValueError(
                f"layer {i} of the Mamba2 source normalises its gated output per group ({width // group_size} groups "
                f"of {group_size} channels, as transformers >= 5.23 does for n_groups > 1); Meta-Mamba2 normalises "
                f"over all {width} channels, so this conversion cannot preserve the function (n_groups = 1 works)")
