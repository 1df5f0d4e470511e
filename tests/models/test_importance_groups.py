"""Models with grouped importance (``importance_groups`` = G < V): the same function as the per-channel model
whose gate rows are repeated over each group, through forward, cached decoding, save/load and conversion."""

from __future__ import annotations

import pytest
import torch

from palimpsa.convert import convert_checkpoint, mamba2_to_meta_mamba2, notpalimpsa_to_palimpsa
from palimpsa.convert.checkpoint import relative_logits_change
from palimpsa.models import MetaMamba2ForCausalLM, PalimpsaForCausalLM
from tests.convert.test_convert import tiny_mamba2, tiny_notpalimpsa
from tests.models.test_meta_mamba2_model import tiny_model as tiny_meta_mamba2
from tests.models.test_palimpsa_model import VOCAB, tiny_model, tokens


def _copy_with_repeated_gates(grouped, per_channel, value_dim):
    """Load ``grouped``'s weights into ``per_channel``, each gate row repeated over its group of channels."""
    state = grouped.state_dict()
    for name, weight in list(state.items()):
        if name.endswith("importance_up_proj.weight"):
            heads_times_groups = weight.shape[0]
            per_channel_rows = per_channel.state_dict()[name].shape[0]
            repeat = per_channel_rows // heads_times_groups
            state[name] = weight.repeat_interleave(repeat, dim=0)
            assert state[name].shape[0] == per_channel_rows and per_channel_rows % value_dim == 0
    per_channel.load_state_dict(state)


@pytest.mark.parametrize("groups", [1, 3])
def test_palimpsa_model_with_groups_equals_repeated_per_channel_gates(groups):
    grouped = tiny_model(importance_groups=groups, importance_scale_init=2.0)  # V = 12
    per_channel = tiny_model(importance_scale_init=2.0)
    _copy_with_repeated_gates(grouped, per_channel, 12)
    ids = tokens()
    torch.testing.assert_close(grouped(ids).logits, per_channel(ids).logits)


def test_grouped_palimpsa_cached_decoding_equals_the_full_forward():
    model, ids = tiny_model(importance_groups=1), tokens(T=10)
    full = model(ids).logits
    out = model(ids[:, :4], use_cache=True)
    cache, steps = out.past_key_values, [out.logits]
    for t in range(4, ids.shape[1]):
        out = model(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full)


def test_grouped_palimpsa_save_and_load(tmp_path):
    model = tiny_model(dtype=torch.float32, importance_groups=2)
    model.save_pretrained(tmp_path)
    loaded = PalimpsaForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.importance_groups == 2
    ids = tokens()
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def test_meta_mamba2_with_groups_equals_repeated_per_channel_gates():
    grouped = tiny_meta_mamba2(importance_groups=2)  # head_dim 8
    per_channel = tiny_meta_mamba2()
    _copy_with_repeated_gates(grouped, per_channel, 8)
    ids = tokens(B=2, T=11)
    torch.testing.assert_close(grouped(ids).logits, per_channel(ids).logits)


def test_bad_group_counts_raise():
    with pytest.raises(ValueError, match="importance_groups"):
        tiny_model(importance_groups=5)  # V = 12
    with pytest.raises(ValueError, match="importance_groups"):
        tiny_meta_mamba2(importance_groups=3)  # head_dim 8


def test_conversion_to_grouped_importance_preserves_logits(tmp_path):
    source = tiny_notpalimpsa()
    converted = notpalimpsa_to_palimpsa(source, importance_groups=1)
    assert converted.config.importance_groups == 1
    assert relative_logits_change(source, converted, VOCAB, length=48) <= 1e-5
    mamba2 = tiny_mamba2()
    meta = mamba2_to_meta_mamba2(mamba2, importance_groups=4)
    assert isinstance(meta, MetaMamba2ForCausalLM) and meta.config.importance_groups == 4
    assert relative_logits_change(mamba2, meta, VOCAB) <= 1e-5
    source.save_pretrained(tmp_path / "src")
    report = convert_checkpoint("palimpsa", tmp_path / "src", tmp_path / "dst", importance_groups=2)
    assert report["relative_logits_change"] <= 1e-5
