"""The Palimpsa recurrence, token by token: the ground truth every fast path is tested against.

For one head, with states of shape [K, V] and element-wise operations unless noted::

    alpha_t = exp(g_t)
    I_t  = alpha_t * I_{t-1} + (1 - alpha_t) * I0 + (k_t ** 2) outer beta_t     # importance (precision)
    M_t  = alpha_t * M_{t-1} + k_t outer v_t                                   # precision-weighted mean
    mu_t = M_t / I_t                                                          # posterior mean
    o_t  = scale * q_t @ mu_t                                                 # [V]
    var_t = scale**2 * (q_t ** 2) @ (1 / I_t)                                 # [V], output variance

The initial state is (mu_0, I_0) = (0, I0) unless given.  Gradients come from autograd.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from palimpsa.ops.checks import State, prepare_inputs
from palimpsa.ops.grouped import per_channel_beta


def _naive_one_sequence(q, k, v, g, beta, prior, scale, mu, imp, output_variance):
    """Run the recurrence over one sequence.

    q, k: [T, H, K]; v, beta: [T, H, V]; g: [T, H]; prior: [H]; mu, imp: [H, K, V] (state dtype).
    Returns o [T, H, V], var [T, H, V] or None, and the final (mu, I).
    """
    dtype = mu.dtype
    prior = prior[:, None, None]
    M = mu * imp
    outputs, variances = [], []
    for t in range(q.shape[0]):
        q_t, k_t, v_t, beta_t = (x[t].to(dtype) for x in (q, k, v, beta))
        alpha = torch.exp(g[t].to(dtype))[:, None, None]  # [H, 1, 1]
        imp = alpha * imp + (1 - alpha) * prior + (k_t ** 2)[:, :, None] * beta_t[:, None, :]
        M = alpha * M + k_t[:, :, None] * v_t[:, None, :]
        mu = M / imp
        outputs.append(scale * torch.einsum("hk,hkv->hv", q_t, mu))
        if output_variance:
            variances.append(scale ** 2 * torch.einsum("hk,hkv->hv", q_t ** 2, 1.0 / imp))
    o = torch.stack(outputs)
    var = torch.stack(variances) if output_variance else None
    return o, var, (mu, imp)


def naive_palimpsa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    prior: Union[float, torch.Tensor] = 1.0,
    scale: Optional[float] = None,
    initial_state: Optional[State] = None,
    output_final_state: bool = False,
    output_variance: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
    backend: str = "torch",
    check_values: bool = True,
):
    """Step-by-step Palimpsa recurrence (readable, float64-capable reference).

    Args:
        q, k: [B, T, H, K] queries and keys.
        v: [B, T, H, V] values.
        beta: importance gate (>= 0): [B, T, H, V] per value channel, [B, T, H, G] shared by each group of
            V / G consecutive channels (G dividing V), or None (beta = 0).
        g: [B, T, H] log decay (<= 0).
        prior: prior precision I0 > 0, a float or a [H] tensor.
        scale: read-out scale, default K ** -0.5.
        initial_state: (mu, I), each [N, H, K, V]; default (0, prior).
        output_final_state: return the final (mu, I), each [N, H, K, V].
        output_variance: also return the output variance [B, T, H, V].
        cu_seqlens: [N + 1] offsets of packed sequences (B must be 1).
        backend: accepted for signature parity with the fast ops; only "torch" exists here.
        check_values: reject non-finite or out-of-range gates, prior and initial state (as the fast ops do);
            g = -inf is valid (alpha = 0, a full reset).

    Returns:
        (o, final_state) or (o, variance, final_state); o has the dtype of q; states are float32
        (float64 for float64 inputs); final_state is None unless requested.
    """
    if backend not in ("torch", "auto"):
        raise ValueError(f"naive_palimpsa runs only in PyTorch; backend must be 'torch' or 'auto', got {backend!r}")
    x = prepare_inputs(q, k, v, g, beta, prior, scale, initial_state, cu_seqlens, check_values=check_values)
    beta = per_channel_beta(x)  # a gate shared by a group of channels is that gate repeated over them
    B, T, H, K = q.shape
    V = v.shape[-1]
    if x.cu_seqlens is None:
        bounds = [(b, 0, T) for b in range(B)]
    else:
        cu = x.cu_seqlens.tolist()
        bounds = [(0, cu[n], cu[n + 1]) for n in range(len(cu) - 1)]

    outs, vars_, finals_mu, finals_imp = [], [], [], []
    for n, (b, start, end) in enumerate(bounds):
        if x.initial_state is None:
            mu0 = torch.zeros(H, K, V, dtype=x.state_dtype, device=q.device)
            imp0 = x.prior[:, None, None].expand(H, K, V)
        else:
            mu0, imp0 = x.initial_state[0][n], x.initial_state[1][n]
        sl = slice(start, end)
        o, var, (mu, imp) = _naive_one_sequence(
            q[b, sl], k[b, sl], v[b, sl], g[b, sl], beta[b, sl], x.prior, x.scale, mu0, imp0, output_variance
        )
        outs.append(o)
        vars_.append(var)
        finals_mu.append(mu)
        finals_imp.append(imp)

    if x.cu_seqlens is None:
        o = torch.stack(outs)
        var = torch.stack(vars_) if output_variance else None
    else:
        o = torch.cat(outs)[None]
        var = torch.cat(vars_)[None] if output_variance else None
    o = o.to(q.dtype)
    final_state = (torch.stack(finals_mu), torch.stack(finals_imp)) if output_final_state else None
    if output_variance:
        return o, var.to(q.dtype), final_state
    return o, final_state
