"""The MQAR model zoo: shapes, the small-forgetting initialisation, state sizes, variance output."""


import pytest
import torch

from palimpsa.mqar.models import (MODEL_NAMES, VARIANCE_MODELS, MQARModel, MQARModelConfig, palimpsa_op_backend,
                                  recurrent_state_bytes, small_forgetting_init)

TINY = dict(vocab_size=64, d_model=16, num_heads=2)


def test_small_forgetting_init_values():
    A_log, dt_bias = torch.zeros(8), torch.zeros(8)
    small_forgetting_init(A_log, dt_bias)
    torch.testing.assert_close(A_log.exp(), torch.linspace(0.01, 0.16, 8))
    dt = torch.nn.functional.softplus(dt_bias)
    torch.testing.assert_close(dt[[0, -1]], torch.tensor([0.1, 0.001]))
    ratios = dt[1:] / dt[:-1]
    torch.testing.assert_close(ratios, torch.full_like(ratios, 0.01 ** (1 / 7)))  # a log-ramp


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_model_runs_and_is_initialised(name):
    torch.manual_seed(0)
    model = MQARModel(MQARModelConfig(name, **TINY))
    x = torch.randint(64, (2, 12))
    logits = model(x)
    assert logits.shape == (2, 12, 64)
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[0, 3], mask[1, 7] = True, True
    selected, variance = model(x, positions=mask, output_variance=True)
    torch.testing.assert_close(selected, logits[mask], rtol=1e-5, atol=1e-5)
    index = torch.tensor([[3], [7]])  # the same positions as an index (no device sync on the GPU)
    by_index, variance_by_index = model(x, positions=index, output_variance=True)
    torch.testing.assert_close(by_index, selected)
    if variance is not None:
        torch.testing.assert_close(variance_by_index, variance)
    with pytest.raises(ValueError, match="positions"):
        model(x, positions=torch.tensor([3, 7]))
    mixers = [block.mixer for block in model.blocks]
    if name in VARIANCE_MODELS:
        assert variance is not None and variance.shape[0] == 2 and (variance > 0).all()
    else:
        assert variance is None
    if name != "attention":
        for mixer in mixers:
            torch.testing.assert_close(mixer.A_log.exp(), torch.linspace(0.01, 0.16, mixer.A_log.numel()))


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_state_bytes_match_the_layers(name):
    config = MQARModelConfig(name, **TINY)
    mixer = MQARModel(config).blocks[0].mixer
    if name == "attention":
        expected = 2 * 100 * 16
    elif name in ("meta_mamba2", "mamba2"):
        expected = mixer.num_heads * mixer.ssm_state_size * mixer.head_dim * (2 if mixer.metaplasticity else 1)
    else:
        heads, keys, values = mixer.num_heads, mixer.head_k_dim, mixer.head_v_dim
        expected = heads * keys * values * (2 if getattr(mixer, "metaplasticity", False) else 1)
    assert recurrent_state_bytes(config, seq_len=100) == 4 * expected


def test_paper_configuration_sizes():
    # d_model 128, 8 heads: K = 16, V = 32 per head for Palimpsa; state 16, head_dim 32, 8 groups for Mamba2
    model = MQARModel(MQARModelConfig("meta_mamba2"))
    mixer = model.blocks[0].mixer
    assert (mixer.num_heads, mixer.ssm_state_size, mixer.head_dim, mixer.n_groups, mixer.importance_rank) == \
        (8, 16, 32, 8, 8)
    palimpsa = MQARModel(MQARModelConfig("palimpsa")).blocks[0].mixer
    assert (palimpsa.num_heads, palimpsa.head_k_dim, palimpsa.head_v_dim, palimpsa.importance_rank) == (8, 16, 32, 8)
    assert recurrent_state_bytes(MQARModelConfig("palimpsa"), 512) == 2 * 8 * 16 * 32 * 4


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_model_trains_under_bf16_autocast(name):
    model = MQARModel(MQARModelConfig(name, **TINY))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(torch.randint(64, (2, 8)))
    logits.float().square().mean().backward()
    assert torch.isfinite(model.embedding.weight.grad).all()


def test_op_backend_switch_reaches_the_op(monkeypatch):
    import palimpsa.ops.chunk as chunk_module

    asked = []
    real = chunk_module.resolve_backend

    def recording(backend, *args, **kwargs):
        asked.append(backend)
        return real(backend, *args, **kwargs)

    monkeypatch.setattr(chunk_module, "resolve_backend", recording)
    model = MQARModel(MQARModelConfig("palimpsa", **TINY))
    x = torch.randint(64, (1, 6))
    reference = model(x)
    with palimpsa_op_backend("torch"):
        forced = model(x)
    assert asked == ["auto", "auto", "torch", "torch"]  # two layers, without then with the switch
    assert chunk_module.resolve_backend is recording  # restored on exit
    torch.testing.assert_close(forced, reference)
    with pytest.raises(ValueError, match="op backend"):
        with palimpsa_op_backend("cuda"):
            pass


def test_bad_configs_raise():
    with pytest.raises(ValueError, match="model name"):
        MQARModelConfig("transformer")
    with pytest.raises(ValueError, match="multiple of num_heads"):
        MQARModelConfig("palimpsa", d_model=30, num_heads=8)
