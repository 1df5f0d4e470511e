"""Packed batches: the loss of documents packed with cu_seqlens equals the loss of each document alone."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from palimpsa.train.data import PackedStream, collate_packs
from palimpsa.train.loop import packed_logits, packed_loss_sum, summed_token_loss
from palimpsa.train.models import build_model
from tests.train.tiny_model import tiny_factory

VOCAB = 64
HAVE_GDN = importlib.util.find_spec("palimpsa.layers.gated_deltanet") is not None
MODELS = ["stand-in", "palimpsa-tiny", "notpalimpsa-tiny", "meta-mamba2-tiny",
          pytest.param("gated-deltanet-tiny", marks=pytest.mark.skipif(not HAVE_GDN, reason="no GatedDeltaNet layer"))]


class _Docs:
    def __init__(self, docs):
        self.docs = docs

    def documents(self, start=0):
        return iter(self.docs[start:])


def _model(name):
    torch.manual_seed(0)
    if name == "stand-in":
        return tiny_factory(VOCAB)
    overrides = {"metaplasticity": False} if name == "notpalimpsa-tiny" else {}
    return build_model(name.replace("notpalimpsa", "palimpsa"), VOCAB, overrides)


@pytest.mark.parametrize("name", MODELS)
def test_packed_loss_equals_per_document_loss(name):
    model = _model(name)
    rng = np.random.default_rng(1)
    docs = [rng.integers(0, VOCAB, size=n).astype(np.int64) for n in (9, 23, 5, 40, 14)]
    stream = PackedStream(_Docs(docs), lambda d: d, seq_len=30)
    batch = collate_packs([stream.next_pack() for _ in range(2)])  # documents 2 and 4 are split across the packs
    packed_out = packed_logits(model, batch)
    packed = summed_token_loss(packed_out, batch.targets)
    packed.backward()
    packed_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    # what the training loop computes (the models' chunked loss, without logits) is the same loss and gradients
    lean = packed_loss_sum(model, batch)
    lean.backward()
    torch.testing.assert_close(lean, packed, rtol=1e-5, atol=1e-5)
    for got, want in zip((p.grad for p in model.parameters()), packed_grads):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-5)
    model.zero_grad()

    bounds = batch.cu_seqlens.tolist()
    assert bounds == [0, 9, 30, 32, 37, 60]  # 9 | 21 of 23 || 2 of 23 | 5 | 23 of 40
    pieces = [model(input_ids=batch.input_ids[:, a:b]).logits for a, b in zip(bounds[:-1], bounds[1:])]
    separate_out = torch.cat(pieces, 1)
    separate = summed_token_loss(separate_out, batch.targets)
    separate.backward()
    torch.testing.assert_close(packed_out, separate_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed, separate, rtol=1e-5, atol=1e-5)
    for got, want in zip(packed_grads, (p.grad for p in model.parameters())):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-5)

    # without the boundaries tokens see the previous documents: the logits change (the test has teeth)
    with torch.no_grad():
        leaky_out = model(input_ids=batch.input_ids).logits
    noise = (packed_out - separate_out).abs().max()
    assert (leaky_out - separate_out).abs().max() > 10 * noise + 1e-5
