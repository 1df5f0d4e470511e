"""NotPalimpsa (a Palimpsa model without metaplasticity) -> Palimpsa, function-preserving.

See :mod:`palimpsa.convert.metaplastic` for why the new gates start tiny but nonzero.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from palimpsa.convert.loading import Source, load_checkpoint
from palimpsa.convert.metaplastic import (AUTO_SCALE_START, CONVERTED_IMPORTANCE_SCALE, DEFAULT_MAX_GATE_EFFECT,
                                         check_scale, copy_weights_and_init_gate)


def notpalimpsa_to_palimpsa(
    source: Source,
    importance_rank: Optional[int] = None,
    importance_scale: Union[float, str] = CONVERTED_IMPORTANCE_SCALE,
    seed: int = 0,
    importance_groups: Optional[int] = None,
    max_gate_effect: float = DEFAULT_MAX_GATE_EFFECT,
):
    """Turn on metaplasticity in a trained NotPalimpsa model without changing its outputs.

    Args:
        source: a ``PalimpsaForCausalLM`` with ``metaplasticity=False``, a directory holding one, or a Hub id.
        importance_rank: rank r of the new importance gates (default: the source config's).
        importance_scale: initial c of the gates' softplus(c) factor (tiny beta, nonzero gradients), or "auto"
            (calibrated as in :func:`palimpsa.convert.mamba2_to_meta_mamba2`).
        importance_groups: importance gates per head and token (default: one per value channel).
        seed: seed of the random init of the gates' low-rank projections (the global RNG is left untouched).
        max_gate_effect: bound of the "auto" calibration (relative change of the logits on random tokens).

    Returns:
        A ``PalimpsaForCausalLM`` with metaplasticity on, on the source's device and dtype, in eval mode.

    Raises:
        TypeError / ValueError: not a Palimpsa checkpoint, already metaplastic, missing or mis-shaped weights.
    """
    from palimpsa.models.palimpsa import PalimpsaConfig, PalimpsaForCausalLM

    importance_scale = check_scale(importance_scale)
    initial_scale = AUTO_SCALE_START if importance_scale == "auto" else importance_scale
    notpalimpsa = load_checkpoint(source, PalimpsaForCausalLM, PalimpsaConfig.model_type, "NotPalimpsa")
    if notpalimpsa.config.metaplasticity:
        raise ValueError("the source is already metaplastic (config.metaplasticity is True); "
                         "only a NotPalimpsa model (metaplasticity=False) can be converted")
    values = notpalimpsa.config.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "auto_map"):
        values.pop(key, None)
    values.update(metaplasticity=True, importance_scale_init=initial_scale)
    if importance_rank is not None:
        values["importance_rank"] = importance_rank
    if importance_groups is not None:
        values["importance_groups"] = importance_groups
    config = PalimpsaConfig(**values)
    parameter = next(notpalimpsa.parameters())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = PalimpsaForCausalLM(config)
    model.to(device=parameter.device, dtype=parameter.dtype)
    copy_weights_and_init_gate(notpalimpsa, model, importance_scale, max_gate_effect)
    return model.eval()
