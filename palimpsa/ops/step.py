"""``palimpsa_step``: one decoding step that updates a cached (mu, I) state in place."""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from palimpsa.ops.backends import resolve_backend
from palimpsa.ops.checks import check_gate_values


def _check_step_inputs(q, k, v, g, beta, state):
    for name, x, nd, doc in (("q", q, 3, "[B, H, K]"), ("k", k, 3, "[B, H, K]"), ("v", v, 3, "[B, H, V]"),
                             ("g", g, 2, "[B, H]"), ("beta", beta, 3, "[B, H, G] (G dividing V)")):
        if not isinstance(x, torch.Tensor) or x.dim() != nd:
            raise ValueError(f"{name} must be a tensor of shape {doc}, got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    B, H, K = q.shape
    V = v.shape[-1]
    if k.shape != q.shape or v.shape[:2] != (B, H) or beta.shape[:2] != (B, H) or V % beta.shape[-1] \
            or g.shape != (B, H):
        raise ValueError(f"inconsistent step shapes: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, "
                         f"g {tuple(g.shape)}, beta {tuple(beta.shape)}")
    if not isinstance(state, (tuple, list)) or len(state) != 2:
        raise TypeError("state must be a pair (mu, I) of float tensors [B, H, K, V]")
    for name, s in (("state[0] (mu)", state[0]), ("state[1] (I)", state[1])):
        if not isinstance(s, torch.Tensor) or s.shape != (B, H, K, V):
            raise ValueError(f"{name} must have shape [B, H, K, V] = [{B}, {H}, {K}, {V}]")
        if s.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"{name} must be float32 (or float64), got {s.dtype}")
    for name, x in (("q", q), ("k", k), ("v", v), ("g", g), ("beta", beta)):
        if not x.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating tensor, got {x.dtype}")
        if x.device != state[0].device:
            raise ValueError(f"{name} is on {x.device} but the state is on {state[0].device}")
    for name, x in (("k", k), ("v", v), ("beta", beta)):
        if x.dtype != q.dtype:
            raise TypeError(f"{name} must have the dtype of q ({q.dtype}), got {x.dtype}")


def _check_step_values(g, beta, prior, state, num_heads):
    """Finite gates, g <= 0, beta >= 0, prior > 0 and a finite state with I > 0 (skipped inside compiled graphs);
    one host sync for all of them."""
    if torch.compiler.is_compiling():
        return
    if isinstance(prior, (str, bytes, bool)) or not isinstance(prior, (int, float, torch.Tensor)):
        raise TypeError(f"prior must be a positive float or a [H] tensor, got {type(prior).__name__}")
    if isinstance(prior, torch.Tensor):
        if prior.numel() not in (1, num_heads):
            raise ValueError(f"prior must be a positive float or a tensor of shape [H] = [{num_heads}], "
                             f"got {tuple(prior.shape)}")
    elif not (float(prior) > 0 and float(prior) != float("inf")):
        raise ValueError(f"prior must be finite and > 0 (the prior precision I0), got {prior}")
    check_gate_values(g, beta, prior if isinstance(prior, torch.Tensor) else None, state, state_name="state")


@torch.no_grad()
def palimpsa_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: Tuple[torch.Tensor, torch.Tensor],
    prior: Union[float, torch.Tensor] = 1.0,
    scale: Optional[float] = None,
    output_variance: bool = False,
    backend: str = "auto",
    check_values: bool = True,
):
    """Advance the cached state by one token, in place (inference only, no autograd).

    Args:
        q, k: [B, H, K]; v: [B, H, V]; g: [B, H] log decay.
        beta: importance gate [B, H, V], or [B, H, G] shared by groups of V / G channels, or None (zero).
        state: (mu, I), each [B, H, K, V] float32, overwritten with the new state.
        prior: float or [H] tensor; scale: default K ** -0.5.
        check_values: check that g <= 0 (-inf: a full reset), beta >= 0, prior > 0 and the state's I > 0,
            all finite (one device sync); callers whose gates are valid by construction (the layers) pass
            False.

    Returns:
        o [B, H, V] in the dtype of q, or (o, variance) when ``output_variance``.
    """
    if beta is None:
        beta = torch.zeros_like(v)
    _check_step_inputs(q, k, v, g, beta, state)
    if beta.shape[-1] != v.shape[-1]:  # a gate shared by a group of channels: repeat it over them
        beta = beta.repeat_interleave(v.shape[-1] // beta.shape[-1], dim=-1)
    if check_values:
        _check_step_values(g, beta, prior, state, q.shape[1])
    mu, imp = state
    K = q.shape[-1]
    scale = K ** -0.5 if scale is None else float(scale)
    if resolve_backend(backend, q.device, state[0].dtype) == "triton":
        from palimpsa.ops.triton import palimpsa_step_triton

        return palimpsa_step_triton(q, k, v, g, beta, state, prior, scale, output_variance)
    dtype = mu.dtype
    if isinstance(prior, torch.Tensor):
        prior = prior.to(dtype).reshape(-1)[None, :, None, None]
    alpha = torch.exp(g.to(dtype))[..., None, None]  # [B, H, 1, 1]
    kf, vf, bf, qf = (x.to(dtype) for x in (k, v, beta, q))
    M = mu * imp
    imp.mul_(alpha).add_((1 - alpha) * prior).add_((kf * kf)[..., :, None] * bf[..., None, :])
    M.mul_(alpha).add_(kf[..., :, None] * vf[..., None, :])
    torch.div(M, imp, out=mu)
    o = scale * torch.einsum("bhk,bhkv->bhv", qf, mu)
    if output_variance:
        var = scale ** 2 * torch.einsum("bhk,bhkv->bhv", qf * qf, imp.reciprocal())
        return o.to(q.dtype), var.to(q.dtype)
    return o.to(q.dtype)
