"""Input validation and normalisation shared by every Palimpsa backend.

Every public op calls :func:`prepare_inputs` first, so all backends see the same, already checked,
arguments and raise the same errors for bad input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

State = Tuple[torch.Tensor, torch.Tensor]


@dataclass
class PreparedInputs:
    """Checked arguments of a Palimpsa op.

    q, k: [B, T, H, K]; v: [B, T, H, V]; beta: [B, T, H, G] (G divides V; G = V is one gate per value
    channel) or None (no metaplasticity); g: [B, T, H]; prior: [H] in the state dtype;
    initial_state: (mu, I) each [N, H, K, V] or None; cu_seqlens: int64 [N + 1] or None.
    groups: G (1 when beta is None).  prior_is_one: the prior was given as the number 1 (known without a device
    sync: the rescaled query of NotPalimpsa is then q itself).
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    g: torch.Tensor
    beta: Optional[torch.Tensor]
    prior: torch.Tensor
    prior_requires_grad: bool
    scale: float
    initial_state: Optional[State]
    cu_seqlens: Optional[torch.Tensor]
    state_dtype: torch.dtype
    groups: int
    prior_is_one: bool = False

    @property
    def per_channel(self) -> bool:
        """True when beta has one gate per value channel (G = V, the paper's model)."""
        return self.beta is not None and self.groups == self.v.shape[-1]

    @property
    def num_sequences(self) -> int:
        return self.q.shape[0] if self.cu_seqlens is None else self.cu_seqlens.numel() - 1


def state_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """States are float32 whatever the inputs, float64 when the inputs are float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_tensor(name: str, x, ndim: int, shape_doc: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {shape_doc}, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float16/bfloat16/float32/float64), got {x.dtype}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have shape {shape_doc}, got {tuple(x.shape)}")


def check_cu_seqlens(cu_seqlens, total: int, batch: int = 1, check_values: bool = True) -> torch.Tensor:
    """Check the offsets of packed sequences and return them as int64 (on their own device).

    cu_seqlens: [N + 1] integer offsets of N sequences packed into one row of ``total`` tokens (``batch`` must be
    1).  ``check_values``: also that they start at 0, end at ``total`` and strictly increase, which reads them
    on the host (one device sync when they are on a GPU; a model checks once per forward, its layers not again).
    """
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.dtype.is_floating_point \
            or cu_seqlens.dtype == torch.bool:
        raise TypeError("cu_seqlens must be a 1-D integer tensor [N + 1] of sequence offsets")
    if batch != 1:
        raise ValueError(f"cu_seqlens requires packed inputs with batch size B == 1, got B={batch}")
    if cu_seqlens.numel() < 2:
        raise ValueError("cu_seqlens must hold at least two offsets [0, ..., T]")
    cu = cu_seqlens.to(dtype=torch.long)
    if check_values:
        first, last = cu[0].item(), cu[-1].item()
        if first != 0 or last != total:
            raise ValueError(f"cu_seqlens must start at 0 and end at T={total}, got {first}..{last}")
        if bool((cu[1:] <= cu[:-1]).any()):
            raise ValueError("cu_seqlens must be strictly increasing (every sequence non-empty)")
    return cu


def prepare_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    prior: Union[float, torch.Tensor] = 1.0,
    scale: Optional[float] = None,
    initial_state: Optional[State] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    check_values: bool = True,
) -> PreparedInputs:
    """Validate the arguments of a Palimpsa op and bring them to a canonical form.

    Shapes: q, k [B, T, H, K]; v [B, T, H, V]; beta [B, T, H, G] with G dividing V (G = V: per channel) or
    None (beta = 0, no metaplasticity); g [B, T, H]; prior float or [H];
    initial_state (mu, I) each [N, H, K, V]; cu_seqlens [N + 1] integer with B == 1.
    ``check_values`` scans beta, g, a tensor prior and the initial state for non-finite or out-of-range
    values (:func:`check_gate_values`, one host sync for all of them) and the values of cu_seqlens
    (:func:`check_cu_seqlens`); it is skipped only inside compiled graphs, where data-dependent checks would
    break the graph, and by layers whose model has checked them.  g = -inf (alpha = 0, a full reset) is valid.
    """
    _check_tensor("q", q, 4, "[B, T, H, K]")
    _check_tensor("k", k, 4, "[B, T, H, K]")
    _check_tensor("v", v, 4, "[B, T, H, V]")
    _check_tensor("g", g, 3, "[B, T, H]")
    if beta is not None:
        _check_tensor("beta", beta, 4, "[B, T, H, G] (G importance groups dividing V)")
    B, T, H, K = q.shape
    V = v.shape[-1]
    if k.shape != q.shape:
        raise ValueError(f"k must have the shape of q {tuple(q.shape)} ([B, T, H, K]), got {tuple(k.shape)}")
    if v.shape[:3] != (B, T, H):
        raise ValueError(f"v must have shape [B, T, H, V] = [{B}, {T}, {H}, V], got {tuple(v.shape)}")
    if g.shape != (B, T, H):
        raise ValueError(f"g must have shape [B, T, H] = [{B}, {T}, {H}], got {tuple(g.shape)}")
    if K == 0 or V == 0 or H == 0:
        raise ValueError(f"head sizes must be positive: got H={H}, K={K}, V={V}")
    if T == 0 or B == 0:
        raise ValueError(f"q must hold at least one token in one sequence, got shape {tuple(q.shape)}")
    groups = 1
    if beta is not None:
        groups = beta.shape[-1]
        if beta.shape[:3] != (B, T, H) or groups < 1 or V % groups:
            raise ValueError(f"beta must have shape [B, T, H, G] = [{B}, {T}, {H}, G] with G dividing V={V} "
                             f"(G = V: one gate per value channel), got {tuple(beta.shape)}")
    dtype = q.dtype
    for name, x in (("k", k), ("v", v), ("beta", beta)):
        if x is not None and x.dtype != dtype:
            raise TypeError(f"{name} must have the dtype of q ({dtype}), got {x.dtype}")
    for name, x in (("k", k), ("v", v), ("g", g), ("beta", beta)):
        if x is not None and x.device != q.device:
            raise ValueError(f"{name} is on {x.device} but q is on {q.device}")
    sdtype = state_dtype_for(dtype)

    if cu_seqlens is not None:
        cu_seqlens = check_cu_seqlens(cu_seqlens, T, B, check_values).to(device=q.device)
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1

    if isinstance(prior, torch.Tensor):
        if prior.dim() == 0:
            prior = prior.reshape(1).expand(H)
        if prior.shape != (H,):
            raise ValueError(f"prior must be a positive float or a tensor of shape [H] = [{H}], got {tuple(prior.shape)}")
        if not prior.dtype.is_floating_point:
            raise TypeError(f"prior must be a floating tensor, got {prior.dtype}")
        prior_requires_grad = prior.requires_grad
        prior_t = prior.to(device=q.device, dtype=sdtype)
    else:
        try:
            if isinstance(prior, (str, bytes, bool)):  # float("1") and float(True) would pass
                raise TypeError
            prior_f = float(prior)
        except (TypeError, ValueError):
            raise TypeError(f"prior must be a positive float or a [H] tensor, got {type(prior).__name__}") from None
        if not prior_f > 0 or prior_f != prior_f or prior_f == float("inf"):
            raise ValueError(f"prior must be a finite float > 0 (the prior precision I0), got {prior_f}")
        prior_requires_grad = False
        prior_t = torch.full((H,), prior_f, device=q.device, dtype=sdtype)

    if scale is None:
        scale = K ** -0.5
    scale = float(scale)

    if initial_state is not None:
        if not isinstance(initial_state, (tuple, list)) or len(initial_state) != 2:
            raise TypeError("initial_state must be a pair (mu, I) of tensors [N, H, K, V]")
        mu0, imp0 = initial_state
        for name, x in (("initial_state[0] (mu)", mu0), ("initial_state[1] (I)", imp0)):
            if not isinstance(x, torch.Tensor) or x.shape != (N, H, K, V):
                shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                raise ValueError(f"{name} must have shape [N, H, K, V] = [{N}, {H}, {K}, {V}], got {shape}")
            if not x.dtype.is_floating_point:
                raise TypeError(f"{name} must be a floating tensor, got {x.dtype}")
        initial_state = (mu0.to(device=q.device, dtype=sdtype), imp0.to(device=q.device, dtype=sdtype))

    if check_values:
        check_gate_values(g, beta, prior_t if isinstance(prior, torch.Tensor) else None, initial_state,
                          state_name="initial_state")

    return PreparedInputs(q, k, v, g, beta, prior_t, prior_requires_grad, scale, initial_state, cu_seqlens, sdtype,
                          groups, prior_is_one=not isinstance(prior, torch.Tensor) and prior_f == 1.0)


def check_gate_values(g: torch.Tensor, beta: Optional[torch.Tensor], prior: Optional[torch.Tensor] = None,
                      state: Optional[State] = None, state_name: str = "state") -> None:
    """Raise a ValueError naming the first argument that holds a bad value; one host sync for all of them.

    g: log decays, <= 0 or -inf (a full reset), never NaN or +inf; beta: importance gates, finite and >= 0
    (None: no gates); prior: a tensor prior precision, finite and > 0; state: (mu, I) with mu finite and I
    finite and > 0.  Any shapes (the ops' [B, T, H, ...] tensors or a decoding step's [B, H, ...]).
    Every condition is reduced on the device and the flags come back together, so the checks cost one
    synchronisation whatever their number.
    """
    checks = [(torch.isnan(g), "g (the log decay) must be <= 0 (or -inf, a full reset); got NaN"),
              (g > 0, "g (the log decay) must be <= 0 everywhere; got a positive entry")]
    if beta is not None:
        checks += [(~torch.isfinite(beta), "beta (the importance gate) must be finite; got NaN or inf"),
                   (beta < 0, "beta (the importance gate) must be >= 0 everywhere; got a negative entry")]
    if prior is not None:
        checks += [(~torch.isfinite(prior), "prior (the prior precision I0) must be finite; got NaN or inf"),
                   (prior <= 0, "prior must be > 0 (it is the prior precision I0), got a non-positive entry")]
    if state is not None:
        mu, imp = state
        checks += [(~torch.isfinite(mu), f"{state_name}[0] (the mean mu) must be finite; got NaN or inf"),
                   (~torch.isfinite(imp), f"{state_name}[1] (the importance I) must be finite; got NaN or inf"),
                   (imp <= 0, f"{state_name}[1] (the importance I) must be > 0 everywhere")]
    failed = torch.stack([bad.any().to(g.device) for bad, _ in checks]).tolist()
    for bad, (_, message) in zip(failed, checks):
        if bad:
            raise ValueError(message)
