"""The Gated DeltaNet baseline LM: packed sequences by right padding, save/load, bad padding refused."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("palimpsa.layers.gated_deltanet")

from palimpsa.models.gated_deltanet import GatedDeltaNetForCausalLM, run_per_sequence  # noqa: E402
from palimpsa.train.models import build_model  # noqa: E402


def test_run_per_sequence_is_each_sequence_alone():
    torch.manual_seed(0)
    mixer = torch.nn.GRU(4, 4, batch_first=True)  # any causal mixer returning (output, state)
    hidden = torch.randn(1, 12, 4)
    cu_seqlens = torch.tensor([0, 5, 6, 12], dtype=torch.int32)
    got = run_per_sequence(mixer, hidden, cu_seqlens)
    want = torch.cat([mixer(hidden[:, a:b])[0] for a, b in ((0, 5), (5, 6), (6, 12))], 1)
    torch.testing.assert_close(got, want)


def test_save_load_round_trip_and_right_padding(tmp_path):
    torch.manual_seed(0)
    model = build_model("gated-deltanet-tiny", 64).eval()
    assert isinstance(model, GatedDeltaNetForCausalLM)
    ids = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        logits = model(ids).logits
        model.save_pretrained(tmp_path)
        reloaded = GatedDeltaNetForCausalLM.from_pretrained(tmp_path).eval()
        torch.testing.assert_close(reloaded(ids).logits, logits)
        mask = torch.ones(2, 10, dtype=torch.long)
        mask[1, 7:] = 0
        torch.testing.assert_close(model(ids, attention_mask=mask).logits[1, :7], model(ids[1:, :7]).logits[0])
        mask[0, 0] = 0
        with pytest.raises(ValueError, match="right padding"):
            model(ids, attention_mask=mask)
