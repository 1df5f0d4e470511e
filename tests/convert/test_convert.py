"""Metaplastic conversion: function preservation, nonzero gradients for the new gate, CLI, errors."""


import pytest
import torch
from transformers import AutoModelForCausalLM, Mamba2Config, Mamba2ForCausalLM

import palimpsa.models  # noqa: F401  (registers the Auto classes)
from palimpsa.cli import main as cli_main
from palimpsa.convert import (convert_checkpoint, gate_gradients, mamba2_to_meta_mamba2, notpalimpsa_to_palimpsa,
                              relative_logits_change)
from palimpsa.models import MetaMamba2ForCausalLM, PalimpsaConfig, PalimpsaForCausalLM
from tests.models.mamba2_reference import NORMS_PER_GROUP, full_width_gated_norms

VOCAB = 48


def tiny_mamba2(head_dim=8, n_groups=2, tied=False, seed=0, full_width_norms=True, **overrides):
    """A random Mamba2; with full_width_norms its gated norms run over all channels, as Meta-Mamba2's default
    (this only changes something on transformers >= 5.23 with n_groups > 1, see tests/models/mamba2_reference.py;
    the change does not survive save_pretrained, so saved sources use n_groups=1)."""
    torch.manual_seed(seed)
    config = Mamba2Config(vocab_size=VOCAB, hidden_size=32, num_heads=64 // head_dim, head_dim=head_dim,
                          state_size=8, n_groups=n_groups, num_hidden_layers=2, tie_word_embeddings=tied,
                          **overrides)
    model = Mamba2ForCausalLM(config).eval()
    return full_width_gated_norms(model) if full_width_norms else model


def tiny_notpalimpsa(seed=0, metaplasticity=False):
    torch.manual_seed(seed)
    config = PalimpsaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_heads=2, head_dim=8,
                            expand_v=2, metaplasticity=metaplasticity, hidden_ratio=2)
    return PalimpsaForCausalLM(config).eval()


def tokens(batch=2, length=24, seed=1):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def assert_every_gate_element_has_a_gradient(model):
    grads = gate_gradients(model.train(), tokens())
    assert len(grads) == 3 * model.config.num_hidden_layers
    assert all(g > 0 for g in grads.values()), grads
    for name, p in model.named_parameters():
        p.grad = None
    loss = model(tokens(), labels=tokens(), use_cache=False).loss
    loss.backward()
    for name, p in model.named_parameters():
        if "importance" in name:
            assert bool((p.grad != 0).all()), f"{name} has zero gradient entries"


@pytest.mark.parametrize("head_dim,n_groups,tied", [(8, 2, False), (16, 4, True), (32, 2, True)])
def test_mamba2_conversion_preserves_logits_and_every_gate_parameter_gets_a_gradient(head_dim, n_groups, tied):
    source = tiny_mamba2(head_dim, n_groups, tied)
    converted = mamba2_to_meta_mamba2(source)
    assert isinstance(converted, MetaMamba2ForCausalLM) and converted.config.metaplasticity
    assert converted.config.tie_word_embeddings == tied
    assert relative_logits_change(source, converted, VOCAB, length=48) <= 1e-5
    # the gate is live: a large scale does change the function
    assert relative_logits_change(source, mamba2_to_meta_mamba2(source, importance_scale=3.0), VOCAB) > 1e-4
    assert_every_gate_element_has_a_gradient(converted)


def test_mamba2_conversion_copies_every_source_weight():
    source = tiny_mamba2()
    converted = mamba2_to_meta_mamba2(source)
    target_state = converted.state_dict()
    for name, tensor in source.state_dict().items():
        assert torch.equal(target_state[name], tensor), name


def test_cli_round_trip_with_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    src, dst = tmp_path / "mamba2", tmp_path / "meta"
    source = tiny_mamba2(n_groups=1, tied=True)
    source.save_pretrained(src)
    vocab = {f"t{i}": i for i in range(VOCAB)}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")))
    tokenizer.save_pretrained(src)
    assert cli_main(["convert", "mamba2", str(src), str(dst)]) == 0
    loaded = AutoModelForCausalLM.from_pretrained(dst).eval()
    assert type(loaded) is MetaMamba2ForCausalLM
    assert relative_logits_change(source, loaded, VOCAB) <= 1e-5
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (dst / name).read_bytes() == (src / name).read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directory left


def test_notpalimpsa_conversion_preserves_logits_and_every_gate_parameter_gets_a_gradient(tmp_path):
    source = tiny_notpalimpsa()
    converted = notpalimpsa_to_palimpsa(source)
    assert isinstance(converted, PalimpsaForCausalLM) and converted.config.metaplasticity
    assert relative_logits_change(source, converted, VOCAB, length=48) <= 1e-5
    assert_every_gate_element_has_a_gradient(converted)
    source.save_pretrained(tmp_path / "src")
    report = convert_checkpoint("palimpsa", tmp_path / "src", tmp_path / "dst")
    assert report["relative_logits_change"] <= 1e-5
    assert type(AutoModelForCausalLM.from_pretrained(tmp_path / "dst")) is PalimpsaForCausalLM


def snapshot(path):
    return {p.relative_to(path): p.read_bytes() for p in path.rglob("*") if p.is_file()}


def test_bad_sources_raise_and_leave_dst_untouched(tmp_path):
    from safetensors.torch import load_file, save_file

    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("existing output")
    before = snapshot(dst)

    good = tmp_path / "good"
    tiny_mamba2(n_groups=1).save_pretrained(good)
    weights = load_file(good / "model.safetensors")

    def variant(name, state=None, **config_overrides):
        path = tmp_path / name
        tiny_mamba2(n_groups=1, **config_overrides).config.save_pretrained(path)
        save_file(weights if state is None else state, path / "model.safetensors", metadata={"format": "pt"})
        return path

    missing = dict(weights)
    missing.pop("backbone.layers.1.mixer.D")
    misshaped = {**weights, "backbone.layers.0.mixer.dt_bias": torch.zeros(3)}
    not_mamba2 = tmp_path / "notpalimpsa"
    tiny_notpalimpsa().save_pretrained(not_mamba2)
    no_config = tmp_path / "empty"
    no_config.mkdir()
    cases = [
        (not_mamba2, "not a Mamba2 checkpoint"),
        (no_config, "no config.json"),
        (variant("missing", missing), "missing"),
        (variant("misshaped", misshaped), "dt_bias"),
        (variant("gelu", hidden_act="gelu"), "hidden_act"),
    ]
    for src, message in cases:
        with pytest.raises(ValueError, match=message):
            convert_checkpoint("mamba2", src, dst, overwrite=True)
        assert cli_main(["convert", "mamba2", str(src), str(dst), "--overwrite"]) == 2
    # a conversion that would change the logits too much is refused too
    with pytest.raises(ValueError, match="tolerance"):
        convert_checkpoint("mamba2", good, dst, importance_scale=3.0, tolerance=1e-7, overwrite=True)
    # an existing DST is never replaced without overwrite
    with pytest.raises(FileExistsError):
        convert_checkpoint("mamba2", good, dst)
    assert snapshot(dst) == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_a_mamba2_as_installed_converts_with_its_own_gated_norm():
    """transformers >= 5.23 normalises Mamba2's gated output per group (n_groups > 1); the converted model
    follows whichever the source does."""
    source = tiny_mamba2(n_groups=2, full_width_norms=False)
    converted = mamba2_to_meta_mamba2(source)
    assert converted.config.norm_per_group == NORMS_PER_GROUP
    assert relative_logits_change(source, converted, VOCAB) <= 1e-5


def test_bad_arguments_raise():
    with pytest.raises(TypeError, match="Mamba2ForCausalLM"):
        mamba2_to_meta_mamba2(tiny_notpalimpsa())
    with pytest.raises(TypeError):
        mamba2_to_meta_mamba2(42)
    with pytest.raises(ValueError, match="importance_scale"):
        mamba2_to_meta_mamba2(tiny_mamba2(), importance_scale=float("nan"))
    with pytest.raises(ValueError, match="already metaplastic"):
        notpalimpsa_to_palimpsa(tiny_notpalimpsa(metaplasticity=True))
    with pytest.raises(ValueError, match="kind"):
        convert_checkpoint("gpt2", "x", "y")


def test_auto_scale_is_lowered_until_the_gate_effect_is_within_the_bound():
    from palimpsa.convert.metaplastic import gate_effect

    source = tiny_mamba2(seed=3)
    loose = mamba2_to_meta_mamba2(source)
    strict = mamba2_to_meta_mamba2(source, max_gate_effect=1e-10)
    assert loose.config.importance_scale_init == -12.0  # a tiny random model needs no lowering
    assert strict.config.importance_scale_init < -12.0
    assert gate_effect(strict, VOCAB) <= 1e-10 < gate_effect(loose, VOCAB)
    scales = [p for n, p in strict.named_parameters() if n.endswith("importance_scale")]
    assert all(bool((p == strict.config.importance_scale_init).all()) for p in scales)
    assert_every_gate_element_has_a_gradient(strict)


def test_missing_source_directory_is_named(tmp_path):
    from palimpsa.convert import mamba2_to_meta_mamba2

    with pytest.raises(FileNotFoundError, match="no such directory"):
        mamba2_to_meta_mamba2(str(tmp_path / "missing" / "model"))
