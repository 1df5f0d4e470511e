"""MetaMamba2ForCausalLM: equals transformers' Mamba2 without metaplasticity; cache, generate, save/load."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, Mamba2Config, Mamba2ForCausalLM

from palimpsa.models import MetaMamba2Cache, MetaMamba2Config, MetaMamba2ForCausalLM
from palimpsa.models._compat import output_cache
from tests.models.mamba2_reference import NORMS_PER_GROUP, full_width_gated_norms

VOCAB = 40
TINY = dict(vocab_size=VOCAB, hidden_size=32, num_heads=8, head_dim=8, state_size=8, n_groups=2,
            num_hidden_layers=2, chunk_size=8, pad_token_id=0, bos_token_id=0, eos_token_id=0)


def random_tokens(batch, length, seed=0):
    # tokens >= 1 keep the pad/eos id 0 out of the prompts
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def tiny_model(metaplasticity=True, seed=0, dtype=torch.float64, **overrides):
    torch.manual_seed(seed)
    model = MetaMamba2ForCausalLM(MetaMamba2Config(metaplasticity=metaplasticity, importance_rank=4,
                                                   importance_scale_init=2.0, **{**TINY, **overrides}))
    return model.to(dtype).eval()


@pytest.mark.parametrize("tied,n_groups,as_installed", [(False, 2, False), (True, 2, False), (False, 1, False),
                                                       (False, 2, True), (True, 2, True)])
def test_without_metaplasticity_equals_transformers_mamba2(tied, n_groups, as_installed):
    """as_installed: transformers' Mamba2 as it is (per-group gated norm from 5.23 on) against Meta-Mamba2 with
    the matching norm_per_group; else the reference's norms over all channels against the default."""
    torch.manual_seed(0)
    config = {**TINY, "n_groups": n_groups, "tie_word_embeddings": tied}
    ref = Mamba2ForCausalLM(Mamba2Config(**config)).eval()
    if not as_installed:  # transformers >= 5.23 normalises the gated output per group (see mamba2_reference)
        full_width_gated_norms(ref)
    per_group = as_installed and NORMS_PER_GROUP
    ours = MetaMamba2ForCausalLM(MetaMamba2Config(**config, metaplasticity=False, norm_per_group=per_group)).eval()
    ours.load_state_dict(ref.state_dict())
    ids = random_tokens(2, 23)
    with torch.no_grad():
        expected, got = ref(ids).logits, ours(ids).logits
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()


@pytest.mark.parametrize("metaplasticity", [True, False])
def test_prefill_and_decoding_with_left_padding_equal_full_forward(metaplasticity):
    model = tiny_model(metaplasticity)
    ids = random_tokens(3, 12)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[2, :7] = 0
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        out = model(ids[:, :8], attention_mask=mask[:, :8], use_cache=True)
        cache, steps = output_cache(out), [out.logits]
        assert isinstance(cache, MetaMamba2Cache) and cache.get_seq_length() == 8
        for t in range(8, 12):
            out = model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=cache, use_cache=True)
            steps.append(out.logits)
    real = mask.bool()
    torch.testing.assert_close(torch.cat(steps, 1)[real], full[real], rtol=1e-9, atol=1e-9)


def test_greedy_generate_equals_argmax_of_full_forward():
    model = tiny_model(True)
    ids = random_tokens(2, 6, seed=1)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    ids[0, :2] = 0  # left padding
    new = 7
    with torch.no_grad():
        generated = model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                   do_sample=False)
        assert generated.shape == (2, 6 + new)
        full_mask = torch.cat([mask, torch.ones(2, new, dtype=mask.dtype)], 1)
        logits = model(generated, attention_mask=full_mask).logits
    # every generated token is the argmax of the full forward at the previous position
    torch.testing.assert_close(logits[:, 5:-1].argmax(-1), generated[:, 6:])


def test_generate_keeps_one_cache_and_feeds_one_token_per_step():
    model = tiny_model(True)
    seen = []
    hook = model.backbone.register_forward_pre_hook(lambda m, args, kwargs: seen.append(
        (kwargs["input_ids"].shape[1], kwargs["past_key_values"])), with_kwargs=True)
    with torch.no_grad():
        out = model.generate(random_tokens(1, 5), max_new_tokens=4, min_new_tokens=4, do_sample=False,
                             return_dict_in_generate=True)
    hook.remove()
    assert [n for n, _ in seen] == [5, 1, 1, 1]
    caches = {id(c) for _, c in seen[1:]}
    assert len(caches) == 1 and isinstance(output_cache(out), MetaMamba2Cache)
    assert output_cache(out).get_seq_length() == 8  # the last generated token is never fed back


def test_save_load_round_trip(tmp_path):
    model = tiny_model(True, tie_word_embeddings=True, dtype=torch.float32)
    model.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).model_type == "meta_mamba2"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is MetaMamba2ForCausalLM
    assert loaded.lm_head.weight.data_ptr() == loaded.backbone.embeddings.weight.data_ptr()
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    ids = random_tokens(2, 9)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_cu_seqlens_equals_separate_sequences():
    model = tiny_model(True)
    seqs = [random_tokens(1, n, seed=n) for n in (4, 9, 1)]
    cu = torch.tensor([0, 4, 13, 14])
    with torch.no_grad():
        packed = model(torch.cat(seqs, 1), cu_seqlens=cu, use_cache=False).logits
        separate = torch.cat([model(s).logits for s in seqs], 1)
    torch.testing.assert_close(packed, separate, rtol=1e-9, atol=1e-9)


def test_loss_and_variances():
    model = tiny_model(True)
    ids = random_tokens(2, 10)
    labels = ids.clone()
    labels[:, :3] = -100
    out = model(ids, labels=labels, output_variance=True, output_hidden_states=True)
    expected = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-6, atol=1e-7)  # the loss runs in float32
    assert len(out.variances) == 2 and out.variances[0].shape == (2, 10, 8, 8)
    assert bool((out.variances[0] > 0).all())
    assert len(out.hidden_states) == 3
    out.loss.backward()
    assert model.backbone.layers[0].mixer.importance_scale.grad.abs().sum() > 0


def test_bad_config_and_inputs_raise():
    with pytest.raises(ValueError, match="num_heads \\* head_dim"):
        MetaMamba2Config(**{**TINY, "num_heads": 4})
    with pytest.raises(ValueError, match="n_groups"):
        MetaMamba2Config(**{**TINY, "n_groups": 3})
    with pytest.raises(ValueError, match="hidden_act"):
        MetaMamba2Config(**TINY, hidden_act="gelu")
    model = tiny_model(True)
    with pytest.raises(ValueError, match="exactly one"):
        model()
    with pytest.raises(TypeError, match="MetaMamba2Cache"):
        model(random_tokens(1, 3), past_key_values=object())
    with pytest.raises(ValueError, match="attention_mask"):
        model(random_tokens(2, 3), attention_mask=torch.ones(2, 2))


def test_shipped_170m_config_builds_a_170m_model():
    from pathlib import Path

    import palimpsa

    path = Path(palimpsa.__file__).parent / "configs" / "meta-mamba2-170m.json"
    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert type(model) is MetaMamba2ForCausalLM
    assert 165e6 < sum(p.numel() for p in model.parameters()) < 175e6
