"""The cache keyword and output field, whichever name the installed transformers uses (see palimpsa.models._compat)."""

import pytest
import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

from palimpsa.models import (MetaMamba2Cache, MetaMamba2Config, MetaMamba2ForCausalLM, PalimpsaCache, PalimpsaConfig,
                             PalimpsaForCausalLM)
from palimpsa.models._compat import CACHE_FIELD, output_cache, resolve_cache_kwarg


def tiny_models():
    torch.manual_seed(0)
    palimpsa = PalimpsaForCausalLM(PalimpsaConfig(vocab_size=32, hidden_size=16, num_hidden_layers=2, num_heads=2,
                                                  head_dim=8, hidden_ratio=2))
    meta_mamba2 = MetaMamba2ForCausalLM(MetaMamba2Config(vocab_size=32, hidden_size=16, num_heads=4, head_dim=8,
                                                         state_size=8, n_groups=2, num_hidden_layers=2,
                                                         chunk_size=8, importance_rank=4))
    return [(palimpsa.eval(), PalimpsaCache), (meta_mamba2.eval(), MetaMamba2Cache)]


def test_cache_field_is_the_one_of_transformers_outputs():
    assert CACHE_FIELD in CausalLMOutputWithPast.__dataclass_fields__
    assert CACHE_FIELD in ("cache", "past_key_values")


@pytest.mark.parametrize("index", [0, 1])
def test_every_cache_keyword_continues_the_same_state(index):
    model, cache_class = tiny_models()[index]
    ids = torch.randint(0, 32, (2, 9), generator=torch.Generator().manual_seed(1))
    keywords = ["cache", "past_key_values"] + (["cache_params"] if cache_class is MetaMamba2Cache else [])
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        for keyword in keywords:
            out = model(ids[:, :5], use_cache=True)
            cache = output_cache(out)
            assert isinstance(cache, cache_class) and out[CACHE_FIELD] is cache
            step = model(ids[:, 5:], **{keyword: cache})
            assert output_cache(step) is cache
            torch.testing.assert_close(torch.cat([out.logits, step.logits], 1), full)


def test_two_different_caches_are_refused():
    assert resolve_cache_kwarg() is None
    a, b = object(), object()
    assert resolve_cache_kwarg(a, a) is a and resolve_cache_kwarg(past_key_values=b) is b
    with pytest.raises(ValueError, match="once"):
        resolve_cache_kwarg(a, b)
    with pytest.raises(ValueError, match="once"):
        resolve_cache_kwarg(cache=a, cache_params=b)
