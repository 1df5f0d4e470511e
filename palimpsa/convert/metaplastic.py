"""Turn a trained model without metaplasticity into its metaplastic twin, keeping its function.

Both conversions of this package (Mamba2 -> Meta-Mamba2, NotPalimpsa -> Palimpsa) copy every weight of the source
and add, per layer, the importance gate beta = sigmoid(W_up W_down u) * softplus(c) * (dt or s): parameters
``importance_down_proj`` [r, d], ``importance_up_proj`` [H*V, r] and ``importance_scale`` c [H].

Why c starts at a large negative value (and not at "beta = 0"):
    An exactly function-preserving conversion needs beta = 0.  But beta >= 0 is a smooth function of the new
    parameters, so beta = 0 is a minimum of beta and every gradient through it vanishes there: fine-tuning could
    never switch metaplasticity on.  So beta starts tiny but nonzero: softplus(c) ~ exp(c).  The importance then
    moves away from its prior 1 by a relative amount of order softplus(c) times |k|^2 / A summed over the memory
    span, which depends on the trained model (a tiny random model tolerates c = -4, the trained MQAR model of
    results/convert moved its logits by 1e-5 already at c = -12).  So c is calibrated per model
    (``importance_scale="auto"``): starting at c = -12 it is lowered in steps of 4 (each divides beta by e^4 = 55)
    until the gate's own effect on the logits of random tokens (the same model with beta = 0 exactly as reference)
    is at most ``max_gate_effect`` = 1e-6, a tenth of the 1e-5 tolerance, leaving room for other inputs and
    longer contexts.  Every new parameter still gets a nonzero gradient.  W_up and W_down keep a random, nonzero
    init, so that each one's gradient, which goes through the other, is nonzero too.

What that means for fine-tuning:
    The gate's gradients are proportional to softplus(c) (d softplus / dc = sigmoid(c) ~ softplus(c) as well),
    about 1e-13 to 1e-9 in our measurements: below AdamW's default eps = 1e-8, which then scales the steps down by
    the same factor, and the gate would stay off.  Give the gate parameters their own AdamW group with a tiny eps
    (1e-16) so that Adam normalises them, and a larger learning rate: c then moves by about lr per step in log
    space (beta grows by exp(lr) per step).  scripts/convert_evidence.py does exactly that.
"""

from __future__ import annotations

import math
from typing import Dict, Iterable, Tuple, Union

import torch
import torch.nn as nn

# Calibration of the initial gate scale c (see the module docstring).
AUTO_SCALE_START = -12.0  # softplus(-12) = 6.1e-6
AUTO_SCALE_STEP = 4.0
AUTO_SCALE_FLOOR = -60.0  # softplus(-60) = 8.8e-27: below that the gradients would underflow in float32
DEFAULT_MAX_GATE_EFFECT = 1e-6
CONVERTED_IMPORTANCE_SCALE = "auto"
GATE_OFF_SCALE = -1e4  # softplus(-1e4) == 0 exactly: beta = 0, the source's function

GATE_PARAMETER_SUFFIXES = ("importance_down_proj.weight", "importance_up_proj.weight", "importance_scale")


def is_gate_parameter(name: str) -> bool:
    """True for the parameters a conversion adds (the importance gate of a layer)."""
    return name.endswith(GATE_PARAMETER_SUFFIXES)


def check_scale(importance_scale) -> Union[float, str]:
    """Validate the initial c of the converted gate: "auto" or a finite float."""
    if importance_scale == "auto":
        return importance_scale
    if isinstance(importance_scale, bool) or not isinstance(importance_scale, (int, float)) \
            or not math.isfinite(importance_scale):
        raise ValueError(f"importance_scale must be 'auto' or a finite float (the initial c of softplus(c)), "
                         f"got {importance_scale!r}")
    return float(importance_scale)


@torch.no_grad()
def set_gate_scale(model: nn.Module, value: float) -> None:
    """Set every gate's c (``importance_scale`` [H]) to ``value``."""
    for name, param in model.named_parameters():
        if name.endswith("importance_scale"):
            param.fill_(value)


def random_tokens(vocab_size: int, batch: int, length: int, seed: int, device) -> torch.Tensor:
    """[batch, length] uniform token ids from a private generator (the global RNG is untouched)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, length), generator=gen).to(device)


@torch.no_grad()
def gate_effect(model: nn.Module, vocab_size: int, batch: int = 2, length: int = 256, seed: int = 0) -> float:
    """The gates' own effect on the logits: max |logits - logits(beta = 0)| / max |logits(beta = 0)|.

    Measured on random tokens [batch, length] with the same model and its gates switched off exactly as the
    reference, so implementation differences do not count.  The model's gate scales are restored.
    """
    ids = random_tokens(vocab_size, batch, length, seed, next(model.parameters()).device)
    scales = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("importance_scale")}
    was_training = model.training
    model.eval()
    with_gates = model(ids, use_cache=False).logits.double()
    set_gate_scale(model, GATE_OFF_SCALE)
    without = model(ids, use_cache=False).logits.double()
    for name, param in model.named_parameters():
        if name in scales:
            param.copy_(scales[name])
    model.train(was_training)
    return float((with_gates - without).abs().max() / without.abs().max())


def calibrate_gate_scale(model: nn.Module, vocab_size: int, max_gate_effect: float = DEFAULT_MAX_GATE_EFFECT,
                         start: float = AUTO_SCALE_START) -> Tuple[float, float]:
    """Set every gate's c to the largest of start, start - 4, start - 8, ... whose ``gate_effect`` is at most
    ``max_gate_effect``; return (c, its effect).  Raises ValueError when even c = -60 moves the logits more."""
    if not max_gate_effect > 0:
        raise ValueError(f"max_gate_effect must be > 0, got {max_gate_effect!r}")
    scale = start
    while scale >= AUTO_SCALE_FLOOR:
        set_gate_scale(model, scale)
        effect = gate_effect(model, vocab_size)
        if effect <= max_gate_effect:
            return scale, effect
        scale -= AUTO_SCALE_STEP
    raise ValueError(f"no gate scale c >= {AUTO_SCALE_FLOOR} keeps the gates' effect on the logits below "
                     f"{max_gate_effect:g}; pass an explicit importance_scale")


def copy_weights_and_init_gate(source: nn.Module, target: nn.Module, importance_scale,
                               max_gate_effect: float = DEFAULT_MAX_GATE_EFFECT) -> float:
    """Copy every tensor of ``source`` into ``target`` and set each gate's c: ``importance_scale``, or the
    calibrated value when it is "auto" (see :func:`calibrate_gate_scale`).  Returns c.

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
    if importance_scale == "auto":
        importance_scale, _ = calibrate_gate_scale(target, target.config.vocab_size, max_gate_effect)
    set_gate_scale(target, importance_scale)
    target.config.importance_scale_init = importance_scale
    return importance_scale


@torch.no_grad()
def relative_logits_change(source: nn.Module, target: nn.Module, vocab_size: int, batch: int = 2,
                           length: int = 64, seed: int = 0) -> float:
    """max |logits_target - logits_source| / max |logits_source| on random tokens [batch, length]."""
    ids = random_tokens(vocab_size, batch, length, seed, next(source.parameters()).device)
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
