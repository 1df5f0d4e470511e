"""The lean training path: the chunked linear cross-entropy and the compilable element-wise blocks (CPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from palimpsa.layers.modules import (
    ShortConvolution,
    causal_conv_taps,
    causal_lm_loss,
    linear_cross_entropy,
    set_compiled_blocks,
)


def _inputs(N=37, d=16, vocab=50, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, d, generator=gen, dtype=dtype, requires_grad=True)
    weight = (0.3 * torch.randn(vocab, d, generator=gen, dtype=dtype)).requires_grad_()
    targets = torch.randint(0, vocab, (N,), generator=gen)
    targets[::5] = -100
    return hidden, weight, targets


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("chunk_rows", [1, 8, 1000])
def test_chunked_loss_equals_the_plain_loss_values_and_gradients(dtype, reduction, chunk_rows):
    hidden, weight, targets = _inputs(dtype=dtype)
    chunked = linear_cross_entropy(hidden, weight, targets, reduction=reduction, chunk_rows=chunk_rows)
    plain = F.cross_entropy(hidden @ weight.T, targets, ignore_index=-100, reduction=reduction)
    got = torch.autograd.grad(3.0 * chunked, (hidden, weight))
    want = torch.autograd.grad(3.0 * plain, (hidden, weight))
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(chunked, plain, **tol)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **tol)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("autocast", [False, True])
def test_compiled_chunked_loss_equals_the_plain_loss(backend, autocast):
    """The chunk's softmax compiled (as on CUDA with compiled blocks): same loss and gradients as the plain
    cross-entropy, in float32 and under bf16 autocast (matmuls in bf16, softmax in float32); the last chunk is
    shorter, and a pass without gradients (evaluation) takes the loss-only branch."""
    from torch._dynamo.utils import counters

    hidden, weight, targets = _inputs(N=45)
    torch._dynamo.reset()
    counters.clear()
    set_compiled_blocks(True, devices=("cpu",), backend=backend)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            chunked = linear_cross_entropy(hidden, weight, targets, chunk_rows=16)
            got = torch.autograd.grad(chunked, (hidden, weight))
            with torch.no_grad():
                no_grad = linear_cross_entropy(hidden, weight, targets, chunk_rows=16)
    finally:
        set_compiled_blocks(False)
    assert counters["stats"]["unique_graphs"] >= 2  # the chunk's loss with and without its gradient, compiled
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        plain = F.cross_entropy((hidden @ weight.T).float(), targets, ignore_index=-100)
    want = torch.autograd.grad(plain, (hidden, weight))
    tol = dict(rtol=2e-2, atol=2e-3) if autocast else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(chunked, plain, **tol)
    torch.testing.assert_close(no_grad, chunked)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.float(), w.float(), **tol)


def test_chunked_loss_with_only_weight_needing_gradients():
    hidden, weight, targets = _inputs()
    hidden = hidden.detach()
    (g,) = torch.autograd.grad(linear_cross_entropy(hidden, weight, targets), (weight,))
    (w,) = torch.autograd.grad(F.cross_entropy(hidden @ weight.T, targets), (weight,))
    torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_causal_lm_loss_shifts_labels_and_sums_with_num_items():
    B, T, d, vocab = 2, 9, 8, 30
    hidden = torch.randn(B, T, d, dtype=torch.float64)
    weight = torch.randn(vocab, d, dtype=torch.float64)
    labels = torch.randint(0, vocab, (B, T))
    labels[0, :3] = -100
    logits = hidden @ weight.T
    mean = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
    torch.testing.assert_close(causal_lm_loss(hidden, weight, labels=labels), mean)
    targets = F.pad(labels[:, 1:], (0, 1), value=-100)
    total = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")
    torch.testing.assert_close(causal_lm_loss(hidden, weight, shift_labels=targets, num_items_in_batch=1), total)
    torch.testing.assert_close(causal_lm_loss(hidden, weight, shift_labels=targets, num_items_in_batch=4),
                               total / 4)


def test_chunked_loss_rejects_bad_inputs():
    hidden, weight, targets = _inputs()
    with pytest.raises(ValueError, match="targets must be in"):
        linear_cross_entropy(hidden, weight, torch.full_like(targets, 50))
    with pytest.raises(ValueError, match="targets must have shape"):
        linear_cross_entropy(hidden, weight, targets[:-1])
    with pytest.raises(ValueError, match="must agree on d"):
        linear_cross_entropy(hidden, weight[:, :-1], targets)
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(hidden, weight, targets, reduction="none")
    with pytest.raises(ValueError, match="chunk_rows"):
        linear_cross_entropy(hidden, weight, targets, chunk_rows=0)
    with pytest.raises(ValueError, match="exactly one of labels"):
        causal_lm_loss(hidden[None], weight)


@pytest.mark.parametrize("bias", [False, True])
def test_shifted_tap_convolution_equals_conv1d(bias):
    torch.manual_seed(0)
    conv = ShortConvolution(6, kernel_size=4, bias=bias)
    x = torch.randn(2, 11, 6)
    y, _ = conv(x)
    full = torch.cat([x.new_zeros(2, 3, 6), x], dim=1)
    taps = causal_conv_taps(full, conv.weight[:, 0], conv.bias, None, "silu")
    torch.testing.assert_close(taps, y, rtol=1e-6, atol=1e-6)
    assert taps.is_contiguous()  # time-major: the op downstream takes it without a copy


def test_compiled_blocks_leave_cpu_tensors_on_plain_pytorch():
    torch.manual_seed(0)
    conv = ShortConvolution(6, kernel_size=4)
    x = torch.randn(2, 11, 6)
    before = conv(x)[0]
    set_compiled_blocks(True)
    try:
        after = conv(x)[0]  # CPU: same code, no compiler involved
    finally:
        set_compiled_blocks(False)
    assert torch.equal(before, after)
    with pytest.raises(TypeError):
        set_compiled_blocks(1)


def _loss_and_grads(model, tokens):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["palimpsa", "meta_mamba2"])
def test_compiled_blocks_equal_the_plain_blocks(family):
    """Whole decoder blocks through torch.compile (on the CPU here, the op's PyTorch path traced with them): same
    loss and gradients, and one compiled graph shared by every layer (no recompilation per layer)."""
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    if family == "palimpsa":
        from palimpsa.models.palimpsa import PalimpsaConfig, PalimpsaForCausalLM

        model = PalimpsaForCausalLM(PalimpsaConfig(vocab_size=64, hidden_size=32, num_heads=2, num_hidden_layers=3,
                                                   importance_groups=1))
    else:
        from palimpsa.models.meta_mamba2 import MetaMamba2Config, MetaMamba2ForCausalLM

        model = MetaMamba2ForCausalLM(MetaMamba2Config(vocab_size=64, hidden_size=32, state_size=8, head_dim=8,
                                                       num_heads=8, num_hidden_layers=3, n_groups=1))
    tokens = torch.randint(0, 64, (2, 24))
    loss, grads = _loss_and_grads(model, tokens)
    counters.clear()
    set_compiled_blocks(True, devices=("cpu",))
    try:
        with torch._dynamo.config.patch(error_on_recompile=True):  # layers 2 and 3 must reuse layer 1's graphs
            compiled_loss, compiled_grads = _loss_and_grads(model, tokens)
    finally:
        set_compiled_blocks(False)
    assert counters["stats"]["unique_graphs"] > 0, "the blocks did not go through torch.compile"
    torch.testing.assert_close(compiled_loss, loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == compiled_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_compiled_blocks_take_packed_batches_of_any_document_count():
    """Packed training batches (cu_seqlens of varying length): same loss and gradients as the plain blocks, and at
    most one recompilation (the document count becomes a dynamic size instead of one graph per value)."""
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    from palimpsa.models.palimpsa import PalimpsaConfig, PalimpsaForCausalLM

    torch.manual_seed(0)
    model = PalimpsaForCausalLM(PalimpsaConfig(vocab_size=64, hidden_size=32, num_heads=2, num_hidden_layers=2,
                                               importance_groups=1))
    tokens = torch.randint(0, 64, (1, 30))
    packs = [torch.tensor([0, 30]), torch.tensor([0, 11, 30]), torch.tensor([0, 5, 17, 30]),
             torch.tensor([0, 3, 9, 20, 30])]

    def loss_and_grads(cu):
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=tokens, cu_seqlens=cu, shift_labels=tokens, num_items_in_batch=1).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    plain = [loss_and_grads(cu) for cu in packs]
    counters.clear()
    set_compiled_blocks(True, devices=("cpu",), backend="aot_eager")  # tracing and partitioning, no codegen
    try:
        compiled = [loss_and_grads(cu) for cu in packs[:2]]  # the second count makes that size dynamic
        graphs = counters["stats"]["unique_graphs"]
        with torch._dynamo.config.patch(error_on_recompile=True):
            compiled += [loss_and_grads(cu) for cu in packs[2:]]
    finally:
        set_compiled_blocks(False)
    assert graphs > 0 and counters["stats"]["unique_graphs"] == graphs
    for (loss, grads), (c_loss, c_grads) in zip(plain, compiled):
        torch.testing.assert_close(c_loss, loss, rtol=1e-5, atol=1e-6)
        for grad, c_grad in zip(grads, c_grads):
            torch.testing.assert_close(c_grad, grad, rtol=1e-4, atol=1e-6)


def test_recomputed_in_backward_keeps_only_the_inputs_inside_a_compiled_function():
    """Inside torch.compile the wrapped element-wise chain is recomputed in the backward: its float32
    intermediates are not kept (fewer bytes saved), and the gradients do not change."""
    from palimpsa.layers.modules import recomputed_in_backward

    def chain(x):
        h = torch.nn.functional.silu(x.float())
        return (h / h.norm(dim=-1, keepdim=True)).to(x.dtype)

    def saved_bytes_and_grad(wrap):
        torch._dynamo.reset()
        x = torch.randn(8, 64, 32, generator=torch.Generator().manual_seed(0)).bfloat16().requires_grad_()
        seen = {}

        def pack(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        f = torch.compile(lambda x: (wrap(chain, x) * 2).float().sum(), backend="aot_eager")
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = f(x)
        out.backward()
        return sum(seen.values()), x.grad

    kept, grad = saved_bytes_and_grad(lambda fn, x: fn(x))
    recomputed, grad_recomputed = saved_bytes_and_grad(recomputed_in_backward)
    assert recomputed < kept
    torch.testing.assert_close(grad_recomputed, grad)



@pytest.mark.parametrize("overrides", [{"importance_groups": 1}, {"metaplasticity": False}])
def test_compiled_block_hands_the_op_contiguous_inputs(monkeypatch, overrides):
    """In a compiled block (training), q, k and v reach the op time-major and contiguous: a channel-major
    convolution output would make the op copy each of them, forward and backward (measured on an H200: 7 copies
    of a [B, T, H, V] tensor per layer, 32 ms of a 283 ms 760M training step)."""
    import palimpsa.layers.palimpsa as palimpsa_layer
    from palimpsa.models.palimpsa.configuration_palimpsa import PalimpsaConfig
    from palimpsa.models.palimpsa.modeling_palimpsa import PalimpsaForCausalLM

    seen = []
    op = palimpsa_layer.chunk_palimpsa

    def spy(q, k, v, g, beta, **kwargs):
        seen.append({name: t.is_contiguous() for name, t in (("q", q), ("k", k), ("v", v))})
        return op(q, k, v, g, beta, **kwargs)

    monkeypatch.setattr(palimpsa_layer, "chunk_palimpsa", spy)
    torch.manual_seed(0)
    config = PalimpsaConfig(vocab_size=64, hidden_size=64, num_hidden_layers=1, num_heads=2, head_dim=16,
                            expand_v=2, importance_rank=4, **overrides)
    model = PalimpsaForCausalLM(config)
    ids = torch.randint(0, 64, (2, 32))
    torch._dynamo.reset()
    set_compiled_blocks(True, devices=("cpu",), backend="aot_eager")
    try:
        model(input_ids=ids, labels=ids).loss.backward()
    finally:
        set_compiled_blocks(False)
    assert seen == [{"q": True, "k": True, "v": True}]
