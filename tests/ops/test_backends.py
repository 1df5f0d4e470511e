"""Backend choice and the device Triton kernels launch on."""

from __future__ import annotations

import contextlib

import pytest
import torch

from palimpsa.ops.backends import on_device, resolve_backend


def test_auto_picks_torch_on_cpu_and_for_float64():
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    assert resolve_backend("auto", torch.device("cuda"), torch.float64) == "torch"


def test_unknown_backend_is_named():
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("cuda", torch.device("cpu"))


def test_on_device_makes_the_inputs_gpu_current():
    """Inputs on cuda:1 must launch on cuda:1, whichever GPU is current: the guard names their device."""
    guard = on_device(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert isinstance(on_device(torch.device("cpu")), contextlib.nullcontext)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_op_on_the_second_gpu_matches_the_first():
    from palimpsa.ops import chunk_palimpsa

    gen = torch.Generator().manual_seed(0)
    B, T, H, K, V = 1, 64, 2, 16, 16
    inputs = dict(q=torch.randn(B, T, H, K, generator=gen), k=torch.randn(B, T, H, K, generator=gen) * 0.3,
                  v=torch.randn(B, T, H, V, generator=gen), g=-torch.rand(B, T, H, generator=gen),
                  beta=torch.rand(B, T, H, V, generator=gen))
    torch.cuda.set_device(0)
    first, _ = chunk_palimpsa(**{n: t.to("cuda:0") for n, t in inputs.items()})
    second, _ = chunk_palimpsa(**{n: t.to("cuda:1") for n, t in inputs.items()})
    assert second.device == torch.device("cuda:1")
    torch.testing.assert_close(second.cpu(), first.cpu())
