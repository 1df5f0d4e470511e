"""Token-by-token Palimpsa in PyTorch (the CPU step path).

The recurrent path is the chunked algorithm of :mod:`palimpsa.ops.torch_chunk` with one chunk spanning the
whole sequence: the forward is a single token loop from the initial state (no chunk-boundary products), and
the backward recomputes that loop and walks it backwards.  It suits decoding and short inputs; its backward
keeps the T per-token states of a sequence, so long training sequences belong to ``chunk_palimpsa``.
"""

from __future__ import annotations

from palimpsa.ops.checks import PreparedInputs
from palimpsa.ops.torch_chunk import chunk_palimpsa_torch


def fused_recurrent_palimpsa_torch(x: PreparedInputs, output_final_state: bool, output_variance: bool):
    """Returns o [B, T, H, V], var or None, final (mu, I) [N, H, K, V] or None."""
    T = x.q.shape[1]
    return chunk_palimpsa_torch(x, output_final_state, output_variance, chunk_size=T)
