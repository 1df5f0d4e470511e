"""fla (flash-linear-attention) as a benchmark baseline: whether it is installed, and its Hopper check.

fla 0.6 refuses the backward of its gated chunk kernels on Hopper GPUs with Triton >= 3.4 and < 3.7.1
(``chunk_bwd_dqkwg`` raises, citing its issue 640: that Triton miscompiles a kernel of it there).  For *timing
only*, :func:`hopper_check_bypassed` lets that backward run; its numbers are then unchecked, and every table
that uses it must say so.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from palimpsa.layers.gated_deltanet import fla_available

__all__ = ["TIMING_ONLY_NOTE", "fla_available", "hopper_check_bypassed", "is_hopper_refusal"]

TIMING_ONLY_NOTE = "timing only, numerics unchecked (fla's Hopper check bypassed)"


@contextlib.contextmanager
def hopper_check_bypassed(enabled: bool = True) -> Iterator[bool]:
    """Inside, fla's gated backward runs on Hopper whatever the Triton version.  Yields whether it patched."""
    if not enabled or not fla_available():
        yield False
        return
    import fla.ops.common.chunk_o as chunk_o

    if not hasattr(chunk_o, "IS_NVIDIA_HOPPER"):
        yield False
        return
    saved = chunk_o.IS_NVIDIA_HOPPER
    chunk_o.IS_NVIDIA_HOPPER = False
    try:
        yield bool(saved)
    finally:
        chunk_o.IS_NVIDIA_HOPPER = saved


def is_hopper_refusal(error: BaseException) -> bool:
    """Whether ``error`` is that refusal (fla's RuntimeError from ``chunk_bwd_dqkwg`` citing its issue 640)."""
    text = str(error)
    return "chunk_bwd_dqkwg" in text and ("#640" in text or "incorrect results" in text)
