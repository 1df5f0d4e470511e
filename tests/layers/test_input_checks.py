"""Layers and models reject an empty sequence and a padding mask that is not 0/1, with clear errors."""

import pytest
import torch

from palimpsa.layers.gated_deltanet import GatedDeltaNet
from palimpsa.layers.meta_mamba2 import MetaMamba2
from palimpsa.layers.palimpsa import Palimpsa
from palimpsa.models import MetaMamba2Config, MetaMamba2ForCausalLM, PalimpsaConfig, PalimpsaForCausalLM

D = 16


def layers():
    torch.manual_seed(0)
    return {"palimpsa": Palimpsa(D, num_heads=2), "meta_mamba2": MetaMamba2(D, state_size=8, head_dim=8),
            "gated_deltanet": GatedDeltaNet(D, num_heads=2, backend="torch")}


def models():
    torch.manual_seed(0)
    return {"palimpsa": PalimpsaForCausalLM(PalimpsaConfig(vocab_size=11, hidden_size=16, num_hidden_layers=2,
                                                           num_heads=2, head_dim=8)),
            "meta_mamba2": MetaMamba2ForCausalLM(MetaMamba2Config(vocab_size=11, hidden_size=16, num_hidden_layers=2,
                                                                  state_size=8, head_dim=8, num_heads=4, n_groups=1))}


@pytest.mark.parametrize("name", ["palimpsa", "meta_mamba2", "gated_deltanet"])
def test_layer_rejects_an_empty_sequence(name):
    with pytest.raises(ValueError, match="at least one token"):
        layers()[name](torch.randn(2, 0, D))


@pytest.mark.parametrize("name", ["palimpsa", "meta_mamba2"])
@pytest.mark.parametrize("bad", [0.5, -1.0, 2.0, float("nan")])
def test_layer_rejects_a_non_binary_mask(name, bad):
    mask = torch.ones(2, 5)
    mask[1, 0] = bad
    with pytest.raises(ValueError, match="attention_mask must hold only 1"):
        layers()[name](torch.randn(2, 5, D), attention_mask=mask)


@pytest.mark.parametrize("name", ["palimpsa", "meta_mamba2"])
def test_layer_takes_binary_masks_of_any_dtype(name):
    layer = layers()[name]
    x = torch.randn(2, 5, D)
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        outs = [layer(x, attention_mask=mask.to(dtype))[0] for dtype in (torch.long, torch.float32, torch.bool)]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


@pytest.mark.parametrize("name", ["palimpsa", "meta_mamba2"])
def test_model_rejects_an_empty_sequence_and_a_non_binary_mask(name):
    model = models()[name].eval()
    with pytest.raises(ValueError, match="at least one token"):
        model(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask must hold only 1"):
        model(torch.ones(1, 4, dtype=torch.long), attention_mask=torch.tensor([[1.0, 0.5, 1.0, 1.0]]))
