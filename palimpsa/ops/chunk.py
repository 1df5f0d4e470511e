"""``chunk_palimpsa``: the training path (chunk-parallel, exact, memory-light backward)."""

from __future__ import annotations

import dataclasses
import numbers
from typing import Optional, Union

import torch

from palimpsa.ops.backends import on_device, resolve_backend
from palimpsa.ops.checks import State, prepare_inputs
from palimpsa.ops.grouped import as_per_channel, can_run_grouped, grouped_palimpsa
from palimpsa.ops.varlen import reset_at_sequence_starts


# Under torch.compile the grouped path is one graph break: its kernels run as written, and its host-side
# bookkeeping (varlen lengths) is not traced, which would recompile for every new number of packed sequences.


def _grouped_on_inputs_device(x, *args, **kwargs):
    """grouped_palimpsa with CUDA's current device set to the inputs' (its Triton kernels launch there)."""
    with on_device(x.q.device):
        return grouped_palimpsa(x, *args, **kwargs)


# a graph break under torch.compile: the grouped path runs as written, with its own device guard
_grouped_outside_compile = torch.compiler.disable(_grouped_on_inputs_device)


def chunk_palimpsa(
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
    chunk_size: Optional[int] = None,
):
    """Chunk-parallel Palimpsa (same math and signature as :func:`palimpsa.ops.naive_palimpsa`).

    Args:
        q, k: [B, T, H, K]; v: [B, T, H, V]; g: [B, T, H] log decay (<= 0).
        beta: importance gate (>= 0), [B, T, H, V] (one per value channel, the paper's model), or
            [B, T, H, G] shared by groups of V / G consecutive channels (G dividing V; exact, and for G < V
            it runs as gated linear attention on tensor cores), or None (no metaplasticity: NotPalimpsa).
        prior: prior precision I0 > 0, float or [H] tensor (differentiable).
        scale: read-out scale, default K ** -0.5.
        initial_state: (mu, I), each [N, H, K, V]; default (0, prior).
        output_final_state: also return the final (mu, I), each [N, H, K, V] float32.
        output_variance: also return the posterior output variance [B, T, H, V].
        cu_seqlens: [N + 1] offsets of packed sequences (B == 1).  Without initial or final states (training)
            the packed row runs as one sequence with a full reset at each sequence's first token (exact; no
            padding and no host sync); with them, each sequence runs from its own state.
        backend: "auto" (Triton on CUDA, PyTorch elsewhere), "torch" or "triton".
        check_values: reject NaN/inf in beta, g, a tensor prior and the initial state, and beta < 0, g > 0,
            prior <= 0, I <= 0 (one device sync for all); callers whose gates are valid by construction (the
            layers) pass False.  g = -inf is valid: alpha = 0, a full reset of the state to (0, I0).
        chunk_size: tokens per chunk, a positive integer (backend default when None; the Triton backend
            takes a power of two in [16, 256]).

    Returns:
        (o, final_state), or (o, variance, final_state) when ``output_variance``.
    """
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive integer (or None for the default), got {chunk_size!r}")
    x = prepare_inputs(q, k, v, g, beta, prior, scale, initial_state, cu_seqlens,
                       check_values=check_values and not torch.compiler.is_compiling())
    which = resolve_backend(backend, q.device, q.dtype)
    if x.cu_seqlens is not None and x.initial_state is None and not output_final_state:
        # packed sequences from the default state (training): one row, each sequence's first token a full reset
        x = dataclasses.replace(x, g=reset_at_sequence_starts(x.g, x.cu_seqlens), cu_seqlens=None)
    if not x.per_channel:
        if can_run_grouped(x):
            o, var, final = _grouped_outside_compile(x, output_final_state, output_variance, chunk_size,
                                                     use_triton=which == "triton")
            return (o, var, final) if output_variance else (o, final)
        x = as_per_channel(x)  # see can_run_grouped: run per channel
    if which == "triton":
        from palimpsa.ops.triton import chunk_palimpsa_triton

        o, var, final = chunk_palimpsa_triton(x, output_final_state, output_variance, chunk_size)
    else:
        from palimpsa.ops.torch_chunk import chunk_palimpsa_torch

        o, var, final = chunk_palimpsa_torch(x, output_final_state, output_variance, chunk_size)
    return (o, var, final) if output_variance else (o, final)
