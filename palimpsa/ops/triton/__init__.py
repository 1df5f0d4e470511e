"""Triton kernels of the Palimpsa op (CUDA; CPU through ``TRITON_INTERPRET=1`` for tests).

- ``chunk_palimpsa_triton``: chunk-boundary states by matmuls, outputs in parallel over chunks, backward
  by per-chunk recomputation (``chunk_state.py``, ``chunk_fwd.py``, ``chunk_bwd.py``).
- ``fused_recurrent_palimpsa_triton``: one program walks each sequence (decoding prefill, short inputs).
- ``palimpsa_step_triton``: one decoding step on a cached state, in place (``step.py``).

All take the checked inputs of :func:`palimpsa.ops.checks.prepare_inputs`; autograd and torch.compile
support live in ``function.py``.
"""

from palimpsa.ops.triton.function import (chunk_palimpsa_triton, fused_recurrent_palimpsa_triton,
                                          palimpsa_step_triton)

__all__ = ["chunk_palimpsa_triton", "fused_recurrent_palimpsa_triton", "palimpsa_step_triton"]
