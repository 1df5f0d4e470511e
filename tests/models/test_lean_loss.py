"""The models' lean loss (no logits, chunked cross-entropy from the hidden states) equals the plain loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from palimpsa.train.models import build_model

VOCAB = 96
PRESETS = ["palimpsa-tiny", "meta-mamba2-tiny", "gated-deltanet-tiny"]


def _model(preset, **overrides):
    torch.manual_seed(0)
    return build_model(preset, VOCAB, overrides).double().train()


def _grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("preset", PRESETS)
def test_skip_logits_loss_and_gradients_equal_the_logits_path(preset):
    model = _model(preset)
    ids = torch.randint(0, VOCAB, (2, 19), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, :5] = -100

    lean = model(input_ids=ids, labels=labels)  # training with labels: the lean path by default
    assert lean.logits is None
    lean.loss.backward()
    lean_grads = _grads(model)
    model.zero_grad(set_to_none=True)

    plain = model(input_ids=ids, labels=labels, skip_logits=False)
    assert plain.logits.shape == (2, 19, VOCAB)
    expected = F.cross_entropy(plain.logits[:, :-1].flatten(0, 1).double(), labels[:, 1:].flatten())
    torch.testing.assert_close(plain.loss.double(), expected, rtol=1e-6, atol=1e-6)  # HF's loss: float32
    expected.backward()
    plain_grads = _grads(model)

    torch.testing.assert_close(lean.loss, expected, rtol=1e-10, atol=1e-10)
    assert lean_grads.keys() == plain_grads.keys() and len(lean_grads) == len(list(model.parameters()))
    for name in plain_grads:
        torch.testing.assert_close(lean_grads[name], plain_grads[name], rtol=1e-9, atol=1e-10, msg=name)


@pytest.mark.parametrize("preset", PRESETS)
def test_packed_summed_loss_with_shift_labels(preset):
    """What the training loop calls: packed sequences, targets already shifted, the summed loss."""
    model = _model(preset)
    ids = torch.randint(0, VOCAB, (1, 24), generator=torch.Generator().manual_seed(2))
    cu_seqlens = torch.tensor([0, 10, 24], dtype=torch.int32)
    targets = torch.roll(ids, -1, dims=1)
    targets[0, [9, 23]] = -100
    summed = model(input_ids=ids, cu_seqlens=cu_seqlens, shift_labels=targets, num_items_in_batch=1).loss
    logits = model(input_ids=ids, cu_seqlens=cu_seqlens).logits
    expected = F.cross_entropy(logits.flatten(0, 1).double(), targets.flatten(), reduction="sum")
    torch.testing.assert_close(summed.double(), expected, rtol=1e-10, atol=1e-10)


def test_skip_logits_without_labels_is_refused():
    with pytest.raises(ValueError, match="skip_logits=True needs labels"):
        _model("palimpsa-tiny")(input_ids=torch.zeros(1, 4, dtype=torch.long), skip_logits=True)
