"""Pick the backend that runs a Palimpsa op.  Nothing else in the package knows which backend runs."""

from __future__ import annotations

import contextlib
import importlib.util
import os

import torch

BACKENDS = ("auto", "torch", "triton")


def triton_available() -> bool:
    """True when Triton imports (it runs on CUDA, or on the CPU with TRITON_INTERPRET=1)."""
    return importlib.util.find_spec("triton") is not None


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype = torch.float32) -> str:
    """Map ``backend`` ("auto", "torch" or "triton"), the inputs' device and dtype to "torch" or "triton".

    "auto" picks Triton for CUDA tensors when Triton is installed, PyTorch everywhere else and for float64
    (the Triton kernels compute in float32).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        use_triton = device.type == "cuda" and dtype != torch.float64 and triton_available()
        return "triton" if use_triton else "torch"
    if backend == "triton":
        if dtype == torch.float64:
            raise TypeError("backend='triton' computes in float32: pass float16/bfloat16/float32 inputs, "
                            "or backend='torch' for float64")
        if not triton_available():
            raise RuntimeError("backend='triton' needs the triton package: pip install 'palimpsa[triton]'")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1), got device {device}")
    return backend


def on_device(device: torch.device):
    """A context in which ``device`` is CUDA's current device (a null context for other devices).

    Triton launches a kernel on the current device, whatever device its tensors are on: inputs on ``cuda:1``
    while ``cuda:0`` is current would run on the wrong GPU.  The Triton paths enter it where their kernels are
    launched: inside the per-channel op's forward and backward implementations (which eager code calls through an
    autograd.Function and compiled graphs through custom operators) and inside the grouped path, which runs outside
    any compiled graph.
    """
    if device.type != "cuda":
        return contextlib.nullcontext()
    return torch.cuda.device(device)
