"""Turn a trained model without metaplasticity into its metaplastic twin, keeping its function.

Both conversions of this package (Mamba2 -> Meta-Mamba2, NotPalimpsa -> Palimpsa) copy every weight of the source
and add, per layer, the importance gate beta = sigmoid(W_up W_down u) * softplus(c) * (dt or s): parameters
``importance_down_proj`` [r, d], ``importance_up_proj`` [H*V, r] and ``importance_scale`` c [H].

Why c starts at a large negative value (and not at "beta = 0"):
    An exactly function-preserving conversion needs beta = 0.  But beta >= 0 is a smooth function of the new
    parameters, so beta = 0 is a minimum of beta and every gradient through it vanishes there: fine-tuning could
    never switch metaplasticity on.  So beta starts tiny but nonzero: c = CONVERTED_IMPORTANCE_SCALE, i.e.
    softplus(c) ~ exp(c).  The importance then moves away from its prior 1 by a relative amount of order
    softplus(c) (times |k|^2 / A, bounded for the models we measured), far below the 1e-5 relative logits
    tolerance, while every new parameter has a nonzero gradient, proportional to softplus(c) (d softplus / dc =
    sigmoid(c) ~ softplus(c) too).  The gradients are small in absolute terms: an optimiser that normalises
    them (Adam/AdamW) still takes steps of normal size once they exceed its epsilon (1e-8 by default), which is
    why the default is not pushed lower than it needs to be; W_up and W_down keep a random (nonzero) init so
    that each one's gradient, which goes through the other, is nonzero too.
"""

from __future__ import annotations

import math
from typing import Dict, Iterable, Tuple

import torch
import torch.nn as nn

# softplus(-12) = 6.1e-6: see the module docstring and results/convert/ for the measured logits change.
CONVERTED_IMPORTANCE_SCALE = -12.0

GATE_PARAMETER_SUFFIXES = ("importance_down_proj.weight", "importance_up_proj.weight", "importance_scale")


def is_gate_parameter(name: str) -> bool:
    """True for the parameters a conversion adds (the importance gate of a layer)."""
    return name.endswith(GATE_PARAMETER_SUFFIXES)


def check_scale(importance_scale: float) -> float:
    """Validate the initial c of the converted gate: a finite float."""
    if isinstance(importance_scale, bool) or not isinstance(importance_scale, (int, float)) \
            or not math.isfinite(importance_scale):
        raise ValueError(f"importance_scale must be a finite float (the initial c of softplus(c)), "
                         f"got {importance_scale!r}")
    return float(importance_scale)


def copy_weights_and_init_gate(source: nn.Module, target: nn.Module, importance_scale: float) -> None:
    """Copy every tensor of ``source`` into ``target`` and set each gate's c to ``importance_scale``.

    Raises ValueError when a source tensor has no place in the target, has the wrong shape, or when the target
    has parameters other than the gate that the source cannot fill.
    """
    source_state = source.state_dict()
    target_state = target.state_dict()
    unexpected = sorted(set(source_state) - set(target_state))
    missing = sorted(k for k in set(target_state) - set(source_state) if not is_gate_parameter(k))
    if unexpected or missing:
        raise ValueError(f"the source's weights do not match the target architecture: "
                         f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}, "
                         f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    for name, tensor in source_state.items():
        if tensor.shape != target_state[name].shape:
            raise ValueError(f"weight {name} has shape {tuple(tensor.shape)}, expected "
                             f"{tuple(target_state[name].shape)} from the config")
    with torch.no_grad():
        target.load_state_dict(source_state, strict=False)
        for name, param in target.named_parameters():
            if name.endswith("importance_scale"):
                param.fill_(importance_scale)


@torch.no_grad()
def relative_logits_change(source: nn.Module, target: nn.Module, vocab_size: int, batch: int = 2,
                           length: int = 64, seed: int = 0) -> float:
    """max |logits_target - logits_source| / max |logits_source| on random tokens [batch, length]."""
    device = next(source.parameters()).device
    ids = torch.randint(0, vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed)).to(device)
    was_training = (source.training, target.training)
    source.eval()
    target.eval()
    expected = source(ids, use_cache=False).logits.double()
    got = target(ids, use_cache=False).logits.double()
    source.train(was_training[0])
    target.train(was_training[1])
    return float((got - expected).abs().max() / expected.abs().max())


def gate_gradients(model: nn.Module, input_ids: torch.Tensor) -> Dict[str, float]:
    """Largest |gradient| of every gate parameter for the next-token loss on ``input_ids`` [B, T]."""
    model.zero_grad(set_to_none=True)
    loss = model(input_ids, labels=input_ids, use_cache=False).loss
    loss.backward()
    grads = {name: (0.0 if p.grad is None else float(p.grad.abs().max()))
             for name, p in model.named_parameters() if is_gate_parameter(name)}
    model.zero_grad(set_to_none=True)
    return grads


def gate_parameters(model: nn.Module) -> Iterable[Tuple[str, nn.Parameter]]:
    """The (name, parameter) pairs a conversion added."""
    return [(n, p) for n, p in model.named_parameters() if is_gate_parameter(n)]
