"""One Palimpsa decoding step on a cached (mu, I) state, in place (Triton)."""

from __future__ import annotations

from typing import Tuple, Union

import torch
import triton
import triton.language as tl

from palimpsa.ops.triton.utils import cdiv, interpreting, next_power_of_two


@triton.jit
def step_kernel(
    q, k, v, g, beta, prior, mu, imp, o, var, scale, prior_value,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    PRIOR_IS_TENSOR: tl.constexpr, HAS_VAR: tl.constexpr,
):
    """Grid (V blocks, B * H).  q, k [B, H, K]; v, beta [B, H, V]; g [B, H]; mu, imp [B, H, K, V] float32
    (read and overwritten); o, var [B, H, V]."""
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_h = i_bh % H
    offs_k = tl.arange(0, BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    mask_k = offs_k < K
    mask_v = offs_v < V
    mask = mask_k[:, None] & mask_v[None, :]
    tile = i_bh.to(tl.int64) * K * V + offs_k[:, None] * V + offs_v[None, :]
    if PRIOR_IS_TENSOR:
        prior_h = tl.load(prior + i_h).to(tl.float32)
    else:
        prior_h = prior_value
    alpha = tl.exp(tl.load(g + i_bh).to(tl.float32))
    q_t = tl.load(q + i_bh * K + offs_k, mask=mask_k, other=0.0).to(tl.float32) * scale
    k_t = tl.load(k + i_bh * K + offs_k, mask=mask_k, other=0.0).to(tl.float32)
    v_t = tl.load(v + i_bh * V + offs_v, mask=mask_v, other=0.0).to(tl.float32)
    beta_t = tl.load(beta + i_bh * V + offs_v, mask=mask_v, other=0.0).to(tl.float32)
    mu_t = tl.load(mu + tile, mask=mask, other=0.0)
    imp_t = tl.load(imp + tile, mask=mask, other=1.0)
    mean = alpha * (mu_t * imp_t) + k_t[:, None] * v_t[None, :]
    imp_t = alpha * imp_t + (1.0 - alpha) * prior_h + (k_t * k_t)[:, None] * beta_t[None, :]
    r = 1.0 / imp_t
    mu_t = mean * r
    tl.store(mu + tile, mu_t, mask=mask)
    tl.store(imp + tile, imp_t, mask=mask)
    tl.store(o + i_bh * V + offs_v, tl.sum(q_t[:, None] * mu_t, 0).to(o.dtype.element_ty), mask=mask_v)
    if HAS_VAR:
        tl.store(var + i_bh * V + offs_v, tl.sum((q_t * q_t)[:, None] * r, 0).to(var.dtype.element_ty),
                 mask=mask_v)


def launch_step(q, k, v, g, beta, mu, imp, prior: Union[float, torch.Tensor], scale: float,
                output_variance: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Run the step kernel; returns (o, var) with var == o when not requested.  Shapes as step_kernel."""
    B, H, K = q.shape
    V = v.shape[-1]
    BK = max(16, next_power_of_two(K))
    BV = max(16, min(next_power_of_two(V), 4096 // BK if not interpreting() else 64))
    o = torch.empty(B, H, V, device=q.device, dtype=q.dtype)
    var = torch.empty_like(o) if output_variance else o
    is_tensor = isinstance(prior, torch.Tensor)
    prior_arg = prior if is_tensor else mu
    prior_value = 1.0 if is_tensor else float(prior)
    step_kernel[(cdiv(V, BV), B * H)](
        q, k, v, g, beta, prior_arg, mu, imp, o, var, scale, prior_value,
        H=H, K=K, V=V, BK=BK, BV=BV, PRIOR_IS_TENSOR=is_tensor, HAS_VAR=output_variance, num_warps=4,
    )
    return o, var
