"""``fused_recurrent_palimpsa``: the step path (decoding and short inputs), differentiable."""

from __future__ import annotations

from typing import Optional, Union

import torch

from palimpsa.ops.backends import resolve_backend
from palimpsa.ops.checks import State, prepare_inputs
from palimpsa.ops.grouped import as_per_channel


def fused_recurrent_palimpsa(
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
    backend: str = "auto",
    check_values: bool = True,
):
    """Token-by-token Palimpsa (same math and signature as :func:`palimpsa.ops.naive_palimpsa`).

    Args:
        q, k: [B, T, H, K]; v: [B, T, H, V]; g: [B, T, H] log decay (<= 0).
        beta: importance gate (>= 0): [B, T, H, V], [B, T, H, G] shared by groups of V / G channels, or None.
        prior: prior precision I0 > 0, float or [H] tensor (differentiable).
        scale: read-out scale, default K ** -0.5.
        initial_state: (mu, I), each [N, H, K, V]; default (0, prior).
        output_final_state: also return the final (mu, I), each [N, H, K, V] float32.
        output_variance: also return the posterior output variance [B, T, H, V].
        cu_seqlens: [N + 1] offsets of packed sequences (B == 1).
        backend: "auto" (Triton on CUDA, PyTorch elsewhere), "torch" or "triton".
        check_values: reject NaN/inf in beta, g, a tensor prior and the initial state, and beta < 0, g > 0,
            prior <= 0, I <= 0 (one device sync for all); callers whose gates are valid by construction (the
            layers) pass False.  g = -inf is valid: alpha = 0, a full reset of the state to (0, I0).

    Returns:
        (o, final_state), or (o, variance, final_state) when ``output_variance``.
    """
    x = prepare_inputs(q, k, v, g, beta, prior, scale, initial_state, cu_seqlens,
                       check_values=check_values and not torch.compiler.is_compiling())
    x = as_per_channel(x)  # token by token, a shared gate costs no less than one per channel
    which = resolve_backend(backend, q.device, q.dtype)
    if which == "triton":
        from palimpsa.ops.triton import fused_recurrent_palimpsa_triton

        o, var, final = fused_recurrent_palimpsa_triton(x, output_final_state, output_variance)
    else:
        from palimpsa.ops.torch_recurrent import fused_recurrent_palimpsa_torch

        o, var, final = fused_recurrent_palimpsa_torch(x, output_final_state, output_variance)
    return (o, var, final) if output_variance else (o, final)
