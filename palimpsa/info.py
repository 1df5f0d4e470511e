"""``palimpsa info``: versions and the backends available on this machine."""

from __future__ import annotations

import importlib
import os
import platform

from palimpsa.ops.backends import triton_available


def _version(name: str) -> str:
    try:
        return getattr(importlib.import_module(name), "__version__", "installed")
    except ImportError:
        return "not installed"


def _nvrtc() -> str:
    """NVRTC's version (it compiles the CUDA C++ kernels at run time), or why it is missing."""
    from palimpsa.ops.cuda.nvrtc import nvrtc_version

    try:
        major, minor = nvrtc_version()
    except OSError as err:
        return f"not found ({err})"
    return f"{major}.{minor} (the CUDA C++ kernels run where they were measured faster: sm_90, K = 48-128)"


def collect_info() -> dict:
    """A dict of versions, devices and the backend each op uses by default here."""
    import torch

    import palimpsa

    cuda = torch.cuda.is_available()
    return {
        "palimpsa": palimpsa.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "triton": _version("triton"),
        "fla (flash-linear-attention)": _version("fla"),
        "lm_eval": _version("lm_eval"),
        "nvrtc": _nvrtc(),
        "cuda": f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}" if cuda else "not available",
        "cpu threads": str(torch.get_num_threads()),
        "backend on CPU tensors": "torch (chunked PyTorch, exact)",
        "backend on CUDA tensors": ("triton" if triton_available() else "torch (install triton for the fast path)")
        if cuda else "n/a (no CUDA device)",
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "0"),
    }


def run_info(args) -> int:
    info = collect_info()
    width = max(len(k) for k in info)
    for key, value in info.items():
        print(f"{key:<{width}}  {value}")
    return 0


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("info", help="versions and available backends")
    parser.set_defaults(func=run_info)
