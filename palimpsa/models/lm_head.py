"""The output head of every causal LM here: logits, or the loss straight from the hidden states."""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import nn

from palimpsa.layers.modules import causal_lm_loss


def causal_lm_head(model: nn.Module, hidden_states: torch.Tensor, labels: Optional[torch.Tensor] = None,
                   shift_labels: Optional[torch.Tensor] = None, skip_logits: Optional[bool] = None,
                   logits_to_keep: Union[int, torch.Tensor] = 0,
                   **loss_kwargs) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(loss, logits) of ``model.lm_head`` on hidden_states [B, T, d].

    ``skip_logits`` (default: training with labels) computes the loss a chunk of tokens at a time from the
    hidden states (:func:`palimpsa.layers.modules.causal_lm_loss`) and returns no logits; otherwise the logits
    [B, T', vocab] of the last ``logits_to_keep`` positions (all when 0) and, with labels, transformers' loss.
    labels / shift_labels / loss_kwargs (``num_items_in_batch``, ...): the ``transformers`` loss contract.
    """
    weight = model.lm_head.weight
    has_labels = labels is not None or shift_labels is not None
    if skip_logits is None:
        skip_logits = model.training and has_labels
    if skip_logits and not has_labels:
        raise ValueError("skip_logits=True needs labels or shift_labels (the loss is then all that is computed)")
    if skip_logits:
        loss = causal_lm_loss(hidden_states.to(weight.dtype), weight, labels, shift_labels,
                              loss_kwargs.get("num_items_in_batch"))
        return loss, None
    keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
    logits = model.lm_head(hidden_states[:, keep].to(weight.dtype))
    loss = None
    if has_labels:
        loss = model.loss_function(logits=logits, labels=labels, vocab_size=model.config.vocab_size,
                                   shift_labels=shift_labels, **loss_kwargs)
    return loss, logits
