"""Grouped importance: the exact Palimpsa op as gated linear attention with a rescaled query (spec 5.2).

When the importance gate beta_t is shared by a group of V / G consecutive value channels ([B, T, H, G]), the
importance I is shared by them too (given an initial importance that is constant within each group), and for
group j::

    iota_t[j, k] = alpha_t iota_{t-1}[j, k] + (1 - alpha_t) I0 + k_t[k]^2 beta_t[j]         a [G, K] scan
    M_t          = alpha_t M_{t-1} + k_t v_t^T                                            the GLA state
    o_t[v]       = scale * sum_k (q_t[k] / iota_t[j, k]) M_t[k, v]         for v in group j
    var_t[v]     = scale^2 * sum_k q_t[k]^2 / iota_t[j, k]

So the output is simple gated linear attention (tensor-core friendly) run on one *virtual head* per
(head, group), whose query is q~_t = q_t / iota_t[j] and whose values are the group's channels; keys and decays
are shared by a head's groups.  Without metaplasticity (beta = None, no initial importance) iota = I0 and this
is plain GLA divided by the prior.  Gradients: the two pieces are differentiable (PyTorch autograd on the CPU;
hand-written Triton backwards on CUDA) and the division by iota between them is left to autograd.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from palimpsa.ops.checks import PreparedInputs
from palimpsa.ops.varlen import pad_sequences, unpad_sequences


def expand_groups(x: torch.Tensor, value_dim: int) -> torch.Tensor:
    """Repeat a per-group tensor [..., G] over its V / G value channels: [..., V]."""
    return x.repeat_interleave(value_dim // x.shape[-1], dim=-1)


def per_channel_beta(x: PreparedInputs) -> torch.Tensor:
    """beta as the per-channel ops take it, [B, T, H, V] (zeros when beta is None)."""
    V = x.v.shape[-1]
    if x.beta is None:
        return torch.zeros_like(x.v)
    return x.beta if x.beta.shape[-1] == V else expand_groups(x.beta, V)


def as_per_channel(x: PreparedInputs) -> PreparedInputs:
    """The same inputs with beta expanded to one gate per value channel [B, T, H, V] (exact, any path)."""
    if x.per_channel:
        return x
    return dataclasses.replace(x, beta=per_channel_beta(x), groups=x.v.shape[-1])


def can_run_grouped(x: PreparedInputs) -> bool:
    """True when the grouped path computes the op exactly, gradients included.

    It needs an initial importance constant within each value group (a device sync to check, when an initial
    state is given) and not requiring a gradient: the grouped path sees one importance per group, so it could
    give only the group's summed gradient, not each channel's.  Otherwise the op runs per channel.
    """
    if x.initial_state is None:
        return True
    imp = x.initial_state[1]
    if imp.requires_grad and torch.is_grad_enabled():
        return False
    N, H, K, V = imp.shape
    G = x.groups
    grouped = imp.reshape(N, H, K, G, V // G)
    return bool((grouped == grouped[..., :1]).all())


def _gla(q, k, v, g, scale, initial_state, chunk, use_triton):
    if use_triton:
        from palimpsa.ops.triton.gla import gla_chunk_triton

        return gla_chunk_triton(q, k, v, g, scale, initial_state, chunk)
    from palimpsa.ops.torch_gla import gla_chunk_torch

    return gla_chunk_torch(q, k, v, g, scale, initial_state, chunk)


def _rescaled_query(q, k, g, beta, prior, excess0, groups, chunk, scale, with_variance, use_triton,
                    prior_is_one=False):
    """q~ = q / iota per group [N, T, H, G, K] (dtype of q), the variance's per-group factor
    scale^2 sum_k q^2 / iota [N, T, H, G] (or None) and iota at the last token [N, H, G, K].

    On CUDA one autograd function that recomputes iota in its backward (no [N, T, H, G, K] float32 tensor kept
    per layer); on the CPU the PyTorch scan under autograd.  Without metaplasticity iota is the prior itself,
    and q~ is q itself (no copy) when the prior is known to be 1 (``prior_is_one``).
    """
    N, T, H, K = q.shape
    sdtype = g.dtype
    if beta is None and excess0 is None:
        # no metaplasticity: iota = I0; scaling by its reciprocal keeps no float32 copy of q for the backward
        inv_prior = (1.0 / prior)[:, None]  # [H, 1]
        q_scaled = q if prior_is_one else (q.to(sdtype) * inv_prior).to(q.dtype)
        q_tilde = q_scaled[:, :, :, None, :].expand(N, T, H, groups, K)
        variance = None
        if with_variance:
            variance = ((scale ** 2) * (q.to(sdtype) ** 2 * inv_prior).sum(-1))[..., None].expand(N, T, H, groups)
        return q_tilde, variance, prior.to(sdtype)[None, :, None, None].expand(N, H, groups, K)
    if use_triton:
        from palimpsa.ops.triton.importance import rescaled_query_triton

        return rescaled_query_triton(q, k, g, beta, prior, excess0, groups, chunk, scale, with_variance)
    from palimpsa.ops.torch_gla import importance_scan_torch

    iota = importance_scan_torch(k.to(sdtype), g, beta, prior, excess0, groups, chunk)  # [N, T, H, G, K]
    qf = q.to(sdtype)[:, :, :, None, :]
    variance = (scale ** 2) * torch.einsum("nthgk,nthgk->nthg", qf * qf, 1.0 / iota) if with_variance else None
    return (qf / iota).to(q.dtype), variance, iota[:, -1]


def grouped_palimpsa(x: PreparedInputs, output_final_state: bool, output_variance: bool,
                     chunk_size: Optional[int], use_triton: bool):
    """Run the grouped path on checked inputs (beta [B, T, H, G] with G < V, or None).

    Returns o [B, T, H, V] (dtype of q), var [B, T, H, V] or None, final (mu, I) [N, H, K, V] or None.
    """
    sdtype = x.state_dtype
    work_dtype = x.q.dtype if use_triton else sdtype  # the kernels take bf16/fp16 operands for tensor cores
    q, k, v = (t.to(work_dtype) for t in (x.q, x.k, x.v))
    g = x.g.to(sdtype)
    beta = x.beta.to(sdtype) if x.beta is not None else None
    lengths = None
    if x.cu_seqlens is not None:  # initial or final states per sequence (else chunk_palimpsa made it one row)
        lengths = (x.cu_seqlens[1:] - x.cu_seqlens[:-1]).tolist()
        padded = pad_sequences((q, k, v, g) + ((beta,) if beta is not None else ()), lengths)
        q, k, v, g = padded[:4]
        beta = padded[4] if beta is not None else None
    N, T, H, K = q.shape
    V = v.shape[-1]
    G = x.groups
    Vg = V // G
    chunk = int(chunk_size or 64)
    prior = x.prior

    M0 = excess0 = None
    if x.initial_state is not None:
        mu0, imp0 = x.initial_state
        M0 = (mu0 * imp0).reshape(N, H, K, G, Vg).permute(0, 1, 3, 2, 4).reshape(N, H * G, K, Vg)
        excess0 = imp0.reshape(N, H, K, G, Vg)[..., 0].transpose(2, 3) - prior[:, None, None]  # [N, H, G, K]

    q_tilde, var_groups, iota_T = _rescaled_query(q, k, g, beta, prior, excess0, G, chunk, x.scale,
                                                  output_variance, use_triton, x.prior_is_one)
    o, M_T = _gla(q_tilde.reshape(N, T, H * G, K), k, v.reshape(N, T, H * G, Vg), g, x.scale,
                  M0.to(sdtype) if M0 is not None else None, chunk, use_triton)
    o = o.reshape(N, T, H, V)
    var = expand_groups(var_groups, V) if output_variance else None
    if lengths is not None:
        o = unpad_sequences(o, lengths)
        var = unpad_sequences(var, lengths) if var is not None else None
    final = None
    if output_final_state:
        # iota_T [N, H, G, K]; padding (g = 0, no writes) leaves the state unchanged
        imp_T = expand_groups(iota_T.transpose(2, 3), V)  # [N, H, K, V]
        M = M_T.to(sdtype).reshape(N, H, G, K, Vg).permute(0, 1, 3, 2, 4).reshape(N, H, K, V)
        final = (M / imp_T, imp_T)
    return o.to(x.q.dtype), (var.to(x.q.dtype) if var is not None else None), final

