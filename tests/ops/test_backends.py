"""Backend choice and the device Triton kernels launch on."""

from __future__ import annotations

import contextlib
import importlib.util

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


def _recording(monkeypatch, module):
    """Replace ``module.on_device`` by one that records the devices it is entered with."""
    from palimpsa.ops import backends

    seen = []

    def recorder(device):
        seen.append(device)
        return backends.on_device(device)

    monkeypatch.setattr(module, "on_device", recorder)
    return seen


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
@pytest.mark.parametrize("groups", [None, 1], ids=["per_channel", "G1"])
def test_triton_paths_set_the_inputs_device(groups, monkeypatch):
    """Forward and backward of the per-channel op (its custom operators) and the grouped path each enter the
    device guard with the inputs' device (the CPU here, under the interpreter)."""
    from palimpsa.ops import chunk as chunk_module
    from palimpsa.ops import chunk_palimpsa
    from palimpsa.ops.triton import function

    seen = _recording(monkeypatch, chunk_module if groups else function)
    gen = torch.Generator().manual_seed(0)
    V = 8
    q, k = torch.randn(1, 8, 1, 16, generator=gen), torch.randn(1, 8, 1, 16, generator=gen) * 0.3
    v = torch.randn(1, 8, 1, V, generator=gen).requires_grad_()
    beta = torch.rand(1, 8, 1, groups or V, generator=gen)
    o, _ = chunk_palimpsa(q, k, v, -torch.rand(1, 8, 1, generator=gen), beta, backend="triton", chunk_size=16)
    o.sum().backward()
    assert seen and all(device == q.device for device in seen)
    if not groups:
        assert len(seen) == 2  # the forward's custom operator, then the backward's


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
