"""input_ids that are not an integer tensor are refused with a clear TypeError (not an AttributeError)."""

import pytest
import torch

from palimpsa.models import MetaMamba2Config, MetaMamba2ForCausalLM, PalimpsaConfig, PalimpsaForCausalLM

MODELS = {
    "palimpsa": lambda: PalimpsaForCausalLM(PalimpsaConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1,
                                                           num_heads=2, head_dim=8, hidden_ratio=0)),
    "meta_mamba2": lambda: MetaMamba2ForCausalLM(MetaMamba2Config(vocab_size=32, hidden_size=16, num_hidden_layers=1,
                                                                  num_heads=2, head_dim=16, state_size=8, expand=2,
                                                                  n_groups=1)),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_input_ids_must_be_an_integer_tensor(name):
    model = MODELS[name]().eval()
    with pytest.raises(TypeError, match=r"input_ids must be a torch.LongTensor \[B, T\].*got a list"):
        model(input_ids=[[1, 2, 3]])
    with pytest.raises(TypeError, match="input_ids must be an integer tensor.*float32"):
        model(input_ids=torch.ones(1, 3))
    assert model(input_ids=torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 32)
