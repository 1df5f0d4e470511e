"""transformers' Mamba2 as the reference of Meta-Mamba2, across transformers versions.

Meta-Mamba2 normalises the gated scan output over all its channels, as transformers' ``MambaRMSNormGated`` does
up to 5.22.  From 5.23 on, transformers normalises each of the ``n_groups`` groups of channels separately (its
``group_size`` attribute; ``mamba_ssm`` does the same).  With ``n_groups`` = 1 both agree; with more groups the tests
put the reference's norms back to one group, so that they still check everything else (notably the grouping of
B and C in the scan) against transformers.
"""

import inspect

import torch.nn as nn
from transformers.models.mamba2.modeling_mamba2 import MambaRMSNormGated

#: True where transformers' Mamba2 normalises its gated output per group (transformers >= 5.23)
NORMS_PER_GROUP = "group_size" in inspect.signature(MambaRMSNormGated.__init__).parameters


def full_width_gated_norms(module: nn.Module) -> nn.Module:
    """Make every ``MambaRMSNormGated`` of ``module`` normalise over all its channels (in place); returns module."""
    for sub in module.modules():
        if isinstance(sub, MambaRMSNormGated) and hasattr(sub, "group_size"):
            sub.group_size = sub.weight.numel()
    return module


def full_width_gated_norm(hidden_size: int, eps: float) -> MambaRMSNormGated:
    """transformers' gated RMSNorm over all ``hidden_size`` channels, in any version."""
    if NORMS_PER_GROUP:
        return MambaRMSNormGated(hidden_size, group_size=hidden_size, eps=eps)
    return MambaRMSNormGated(hidden_size, eps=eps)
