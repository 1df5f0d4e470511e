"""The Hugging Face Palimpsa model: decoding cache, generate(), save/load, Auto classes, packing, configs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

import palimpsa  # noqa: F401  (registers the Auto classes)
from palimpsa.models import PalimpsaCache, PalimpsaConfig, PalimpsaForCausalLM, PalimpsaModel
from palimpsa.models._compat import output_cache, resolve_cache_kwarg

VOCAB = 37
SHIPPED_CONFIGS = Path(palimpsa.__file__).parent / "configs"


def tiny_config(**overrides):
    options = dict(vocab_size=VOCAB, hidden_size=24, num_hidden_layers=2, num_heads=2, head_dim=8, expand_v=1.5,
                   importance_rank=4, hidden_ratio=2, pad_token_id=0)
    options.update(overrides)
    return PalimpsaConfig(**options)


def tiny_model(seed=0, dtype=torch.float64, **overrides):
    torch.manual_seed(seed)
    model = PalimpsaForCausalLM(tiny_config(**overrides)).to(dtype).eval()
    with torch.no_grad():  # larger weights than the LM init so that every token matters in the comparisons
        for block in model.model.layers:
            block.mixer.o_proj.weight.normal_(0, 0.3)
            block.mixer.D.uniform_(0.5, 1.5)
    return model


def tokens(B=2, T=13, seed=1):
    torch.manual_seed(seed)
    return torch.randint(1, VOCAB, (B, T))


def test_loss_is_the_shifted_cross_entropy_ignoring_minus_100():
    model, ids = tiny_model(), tokens()
    labels = ids.clone()
    labels[0, :4] = -100
    out = model(ids, labels=labels)
    expected = F.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-6, atol=1e-6)  # the HF loss runs in float32
    assert out.logits.shape == (2, 13, VOCAB)
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("left_padding", [0, 4])
def test_prefill_then_token_by_token_decoding_equals_the_full_forward(left_padding):
    model, ids = tiny_model(), tokens(T=14)
    mask = torch.ones_like(ids)
    if left_padding:
        mask[1, :left_padding] = 0
        ids[1, :left_padding] = 0
    with torch.no_grad():
        full = model(ids, attention_mask=mask, use_cache=False).logits
        prefill = 6
        out = model(ids[:, :prefill], attention_mask=mask[:, :prefill], use_cache=True)
        cache, logits = output_cache(out), [out.logits]
        assert isinstance(cache, PalimpsaCache) and cache.get_seq_length() == prefill
        for t in range(prefill, ids.shape[1]):
            out = model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=cache)
            logits.append(out.logits)
    torch.testing.assert_close(torch.cat(logits, 1), full)
    if left_padding:  # the padded row gives the logits of the unpadded sequence
        with torch.no_grad():
            alone = model(ids[1:, left_padding:], use_cache=False).logits
        torch.testing.assert_close(full[1, left_padding:], alone[0])


def test_greedy_generate_uses_the_cache_and_equals_argmax_decoding():
    model = tiny_model(dtype=torch.float32)
    prompt = tokens(T=5)
    mask = torch.ones_like(prompt)
    prompt[1, :2], mask[1, :2] = 0, 0  # left padding
    lengths, caches = [], []

    def record(module, args, kwargs):
        lengths.append(kwargs["input_ids"].shape[1])
        # generate() passes the cache as past_key_values (transformers 5.17) or cache (later releases)
        caches.append(resolve_cache_kwarg(kwargs.get("cache"), kwargs.get("past_key_values")))

    hook = model.register_forward_pre_hook(record, with_kwargs=True)
    generated = model.generate(prompt, attention_mask=mask, max_new_tokens=6, do_sample=False, eos_token_id=None)
    hook.remove()
    assert lengths == [5] + [1] * 5  # one prefill, then one token per step
    assert caches[0] is None and isinstance(caches[1], PalimpsaCache)
    assert all(cache is caches[1] for cache in caches[1:])  # the prefill's cache, carried through every step
    sequence, sequence_mask = prompt, mask
    with torch.no_grad():
        for _ in range(6):
            logits = model(sequence, attention_mask=sequence_mask, use_cache=False).logits
            sequence = torch.cat([sequence, logits[:, -1].argmax(-1, keepdim=True)], 1)
            sequence_mask = torch.cat([sequence_mask, torch.ones_like(mask[:, :1])], 1)
    assert torch.equal(generated, sequence)


def test_save_and_load_round_trip_exactly_also_through_the_auto_classes(tmp_path):
    model, ids = tiny_model(dtype=torch.float32, metaplasticity=True), tokens()
    with torch.no_grad():
        model.model.layers[0].mixer.prior.fill_(1.5)  # buffers round-trip too
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        expected = model(ids).logits
    for loader in (PalimpsaForCausalLM, AutoModelForCausalLM):
        loaded = loader.from_pretrained(tmp_path).eval()
        assert type(loaded) is PalimpsaForCausalLM
        assert loaded.lm_head.weight is loaded.model.embeddings.weight
        original, restored = model.state_dict(), loaded.state_dict()
        assert original.keys() == restored.keys()
        for name in original:
            assert torch.equal(original[name], restored[name]), name
        with torch.no_grad():
            assert torch.equal(loaded(ids).logits, expected)
    restored_config = AutoConfig.from_pretrained(tmp_path).to_dict()
    restored_config.pop("_name_or_path")
    assert restored_config == {k: v for k, v in model.config.to_dict().items() if k != "_name_or_path"}


def test_auto_classes_know_palimpsa():
    options = {k: v for k, v in tiny_config().to_diff_dict().items() if k != "model_type"}
    config = AutoConfig.for_model("palimpsa", **options)
    assert isinstance(config, PalimpsaConfig)
    assert type(AutoModel.from_config(config)) is PalimpsaModel
    assert type(AutoModelForCausalLM.from_config(config)) is PalimpsaForCausalLM


def test_importing_palimpsa_alone_registers_the_auto_classes():
    code = ("import palimpsa, transformers as t; c = t.AutoConfig.for_model('palimpsa', vocab_size=11, hidden_size=16, "
            "num_hidden_layers=1, num_heads=2, head_dim=8); print(type(t.AutoModelForCausalLM.from_config(c)).__name__)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "PalimpsaForCausalLM"


def test_packed_sequences_equal_separate_sequences():
    model, ids = tiny_model(), tokens(B=1, T=16)
    cu_seqlens = torch.tensor([0, 5, 6, 16])
    with torch.no_grad():
        packed = model(ids, cu_seqlens=cu_seqlens).logits
        alone = [model(ids[:, a:b]).logits for a, b in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())]
    torch.testing.assert_close(packed, torch.cat(alone, 1))
    with pytest.raises(ValueError, match="cu_seqlens"):
        model(ids, cu_seqlens=cu_seqlens, use_cache=True)
    with pytest.raises(ValueError, match="cu_seqlens must be strictly increasing"):
        model(ids, cu_seqlens=torch.tensor([0, 5, 5, 16]))


def test_variances_and_the_notpalimpsa_ablation():
    model, ids = tiny_model(metaplasticity=False, hidden_ratio=0), tokens()
    assert all(block.mlp is None and block.mixer.importance_up_proj is None for block in model.model.layers)
    out = model(ids, output_variance=True)
    assert len(out.variances) == 2 and out.variances[0].shape == (2, 13, 2, 12)
    # without metaplasticity the importance stays at the prior (1): variance = scale^2 * |q|^2 = 1/K (q unit norm)
    torch.testing.assert_close(out.variances[0], torch.full_like(out.variances[0], 1 / 8))


def test_bad_configs_raise_clear_errors():
    with pytest.raises(ValueError, match="hidden_size"):
        PalimpsaConfig(hidden_size=0)
    with pytest.raises(ValueError, match="expand_v"):
        PalimpsaConfig(head_dim=8, expand_v=1.3)
    with pytest.raises(ValueError, match="metaplasticity"):
        PalimpsaConfig(metaplasticity="yes")
    with pytest.raises(ValueError, match="hidden_ratio"):
        PalimpsaConfig(hidden_ratio=-1)
    with pytest.raises(ValueError, match="num_heads"):
        PalimpsaConfig(num_heads=2.5)
    model = tiny_model()
    with pytest.raises(ValueError, match="exactly one of input_ids"):
        model()
    with pytest.raises(TypeError, match="PalimpsaCache"):
        model(tokens(), past_key_values=object())


@pytest.mark.parametrize("name, millions", [("palimpsa-170m", 170), ("palimpsa-340m", 340), ("palimpsa-760m", 760),
                                                    ("palimpsa-760m-g1", 760)])
def test_shipped_configs_have_their_nominal_size(name, millions):
    path = SHIPPED_CONFIGS / f"{name}.json"
    config = PalimpsaConfig.from_pretrained(path)
    assert json.loads(path.read_text())["model_type"] == "palimpsa"
    with torch.device("meta"):  # count parameters without allocating them
        model = PalimpsaForCausalLM(config)
    count = sum(p.numel() for p in model.parameters())  # the tied embedding counts once
    assert abs(count / 1e6 - millions) / millions < 0.05, count
