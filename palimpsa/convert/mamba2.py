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
    importance_groups: Optional[int] = None,
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
        importance_groups: importance gates per head and token (default: one per value channel).
        seed: seed of the random init of the gates' low-rank projections (the global RNG is left untouched).
        max_gate_effect: bound of the "auto" calibration (relative change of the logits on random tokens).

    Returns:
        A ``MetaMamba2ForCausalLM`` (metaplasticity on) on the source's device and dtype, in eval mode.

    Raises:
        TypeError / ValueError: not a Mamba2, missing or mis-shaped weights, or options Meta-Mamba2 does not
        support (for example ``hidden_act`` other than "silu").  The gated norm follows the source's: over all
        channels or per group (see :func:`source_norm_per_group`).
    """
    importance_scale = check_scale(importance_scale)
    initial_scale = AUTO_SCALE_START if importance_scale == "auto" else importance_scale
    mamba2 = load_checkpoint(source, Mamba2ForCausalLM, "mamba2", "Mamba2")
    overrides = dict(metaplasticity=True, importance_scale_init=initial_scale,
                     norm_per_group=source_norm_per_group(mamba2))
    if importance_rank is not None:
        overrides["importance_rank"] = importance_rank
    if importance_groups is not None:
        overrides["importance_groups"] = importance_groups
    config = MetaMamba2Config.from_mamba2_config(mamba2.config, **overrides)
    parameter = next(mamba2.parameters())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MetaMamba2ForCausalLM(config)
    model.to(device=parameter.device, dtype=parameter.dtype)
    copy_weights_and_init_gate(mamba2, model, importance_scale, max_gate_effect)
    return model.eval()


def source_norm_per_group(mamba2: Mamba2ForCausalLM) -> bool:
    """Whether the source's gated RMSNorm normalises per group of channels (True) or over all of them.

    ``transformers`` up to 5.22 normalises over all channels; from 5.23 on (as ``mamba_ssm``) each of the
    ``n_groups`` groups separately.  Meta-Mamba2 does either (``norm_per_group``).  Raises ValueError for any
    other grouping, or layers that disagree.
    """
    kinds = set()
    for i, layer in enumerate(mamba2.backbone.layers):
        norm = layer.mixer.norm
        width = norm.weight.numel()
        group_size = getattr(norm, "group_size", None) or width
        per_group = width // mamba2.config.n_groups
        if group_size not in (width, per_group):
            raise ValueError(f"layer {i} of the Mamba2 source normalises groups of {group_size} channels; "
                             f"Meta-Mamba2 supports all {width} channels or n_groups groups of {per_group}")
        kinds.add(group_size == per_group and per_group != width)
    if len(kinds) > 1:
        raise ValueError("the Mamba2 source's layers normalise their gated outputs in different ways")
    return kinds.pop() if kinds else False
