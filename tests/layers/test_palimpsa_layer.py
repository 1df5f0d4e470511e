"""The Palimpsa layer (spec 4.1) and its building blocks."""

import math

import pytest
import torch
import torch.nn.functional as F

import palimpsa.layers.palimpsa as palimpsa_layer_module
from palimpsa.layers import Palimpsa, RecurrentLayerCache
from palimpsa.layers.modules import GatedRMSNorm, RMSNorm, ShortConvolution, SwiGLUMLP, swiglu_intermediate_size

D_MODEL, HEADS, K, V = 24, 2, 8, 6


def make_layer(seed=0, **kwargs):
    torch.manual_seed(seed)
    options = dict(num_heads=HEADS, head_k_dim=K, head_v_dim=V, importance_rank=4)
    options.update(kwargs)
    layer = Palimpsa(D_MODEL, **options).double()
    with torch.no_grad():  # make every parameter matter (the default D = 1 and c = init are too regular)
        layer.D.uniform_(0.5, 1.5)
    return layer


def inputs(B=2, T=19, seed=1):
    torch.manual_seed(seed)
    return torch.randn(B, T, D_MODEL, dtype=torch.float64)


# ---------------------------------------------------------------- building blocks

def test_short_convolution_matches_torch_conv1d_and_continues_from_its_state():
    torch.manual_seed(0)
    conv = ShortConvolution(5, kernel_size=4, bias=True, activation=None).double()
    x = torch.randn(2, 11, 5, dtype=torch.float64)
    reference = F.conv1d(x.transpose(1, 2), conv.weight, conv.bias, padding=3, groups=5)[..., :11].transpose(1, 2)
    y, _ = conv(x)
    torch.testing.assert_close(y, reference)
    first, state = conv(x[:, :6], output_final_state=True)
    second, _ = conv(x[:, 6:], state=state)
    torch.testing.assert_close(torch.cat([first, second], 1), reference)


def test_short_convolution_does_not_cross_packed_boundaries():
    torch.manual_seed(0)
    conv = ShortConvolution(3, kernel_size=4).double()
    x = torch.randn(1, 9, 3, dtype=torch.float64)
    packed, _ = conv(x, cu_seqlens=torch.tensor([0, 2, 9]))
    alone = torch.cat([conv(x[:, :2])[0], conv(x[:, 2:])[0]], 1)
    torch.testing.assert_close(packed, alone)


def test_norms_match_independent_implementations():
    from tests.models.mamba2_reference import full_width_gated_norm

    torch.manual_seed(0)
    x, gate = torch.randn(3, 4, 10), torch.randn(3, 4, 10)
    torch.testing.assert_close(RMSNorm(10, eps=1e-5)(x), F.rms_norm(x, (10,), eps=1e-5))
    gate_first = GatedRMSNorm(10, eps=1e-6, norm_before_gate=False)
    torch.testing.assert_close(gate_first(x, gate), full_width_gated_norm(10, eps=1e-6)(x, gate))
    norm_first = GatedRMSNorm(10, eps=1e-6, norm_before_gate=True)
    torch.testing.assert_close(norm_first(x, gate), F.rms_norm(x, (10,), eps=1e-6) * F.silu(gate))


def test_swiglu_width_follows_the_two_thirds_rule():
    assert swiglu_intermediate_size(768, 4) == 2048
    assert swiglu_intermediate_size(1024, 4) == 2816
    assert SwiGLUMLP(8, hidden_ratio=4).intermediate_size == 256


# ---------------------------------------------------------------- the layer

def test_parameters_and_initialisation_follow_the_spec():
    layer = Palimpsa(64, num_heads=4)
    assert (layer.head_k_dim, layer.head_v_dim, layer.importance_rank) == (16, 16, 4)
    for name in ("A_log", "dt_bias", "D", "importance_scale"):
        assert getattr(layer, name).shape == (4,), name
    assert torch.equal(layer.prior, torch.ones(4)) and "prior" in dict(layer.named_buffers())
    assert "prior" not in dict(layer.named_parameters())
    A = layer.A_log.exp()
    assert bool(((A > 0) & (A <= 16)).all())
    dt = F.softplus(layer.dt_bias)
    assert bool(((dt >= 1e-4 * 0.999) & (dt <= 0.1 * 1.001)).all())
    assert torch.equal(layer.D, torch.ones(4)) and torch.equal(layer.importance_scale, torch.ones(4))


def test_output_shapes_dtype_and_gradients_reach_every_parameter():
    layer = make_layer().float()
    u = inputs().float().requires_grad_()
    y, variance = layer(u, output_variance=True)
    assert y.shape == u.shape and y.dtype == torch.float32
    assert variance.shape == (2, 19, HEADS, V) and bool((variance > 0).all())
    (y.square().sum() + variance.sum()).backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_without_metaplasticity_beta_is_none_and_the_layer_is_gated_linear_attention(monkeypatch):
    """NotPalimpsa: no importance gate (beta = None: the op's gated-linear-attention path), so the op is
    (1 / prior) x simple gated linear attention."""
    layer = make_layer(metaplasticity=False)
    assert layer.importance_up_proj is None and layer.importance_scale is None
    layer.prior.fill_(2.5)
    u = inputs()
    palimpsa_out, _ = layer(u)

    seen_beta, seen_prior = [], []

    def gated_linear_attention(q, k, v, g, beta, prior, output_variance=False, **_):
        """S_t = exp(g_t) S_{t-1} + k_t v_t^T;  o_t = K^-1/2 q_t S_t / prior."""
        seen_beta.append(beta)
        seen_prior.append(prior)
        prior = torch.as_tensor(prior, dtype=q.dtype).expand(q.shape[2])
        S = torch.zeros(q.shape[0], q.shape[2], q.shape[3], v.shape[3], dtype=q.dtype)
        outputs = []
        for t in range(q.shape[1]):
            S = g[:, t].exp()[..., None, None] * S + k[:, t, :, :, None] * v[:, t, :, None, :]
            outputs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], S) * q.shape[-1] ** -0.5 / prior[:, None])
        return (torch.stack(outputs, 1), None) + ((None,) if output_variance else ())

    monkeypatch.setattr(palimpsa_layer_module, "chunk_palimpsa", gated_linear_attention)
    gla_out, _ = layer(u)
    assert seen_beta and seen_beta[0] is None
    torch.testing.assert_close(palimpsa_out, gla_out)
    # in training the layer divides q by the prior itself and hands the op the number 1 (its rescaled query is
    # then q, no copy); with the variance (or a cache) the op gets the prior, which both need
    assert seen_prior[0] == 1.0 and not isinstance(seen_prior[0], torch.Tensor)
    layer(u, output_variance=True)
    assert seen_prior[-1] is layer.prior


def test_metaplasticity_changes_the_output():
    u = inputs()
    on, _ = make_layer()(u)
    layer_off = make_layer(metaplasticity=False)
    state = {k: v for k, v in make_layer().state_dict().items() if not k.startswith("importance")}
    layer_off.load_state_dict(state)
    off, _ = layer_off(u)
    assert (on - off).abs().max() > 1e-3


@pytest.mark.parametrize("prefill", [1, 6])
def test_prefill_chunks_then_token_by_token_decoding_equal_the_full_forward(prefill):
    layer, u = make_layer(), inputs()
    with torch.no_grad():
        full, full_var = layer(u, output_variance=True)
        cache = RecurrentLayerCache()
        outs, variances = [], []
        # a prefill, a second multi-token chunk (continues conv and state), then one token at a time
        pieces = [(0, prefill), (prefill, prefill + 3)] + [(t, t + 1) for t in range(prefill + 3, u.shape[1])]
        for start, end in pieces:
            o, var = layer(u[:, start:end], cache=cache, output_variance=True)
            outs.append(o)
            variances.append(var)
    torch.testing.assert_close(torch.cat(outs, 1), full)
    torch.testing.assert_close(torch.cat(variances, 1), full_var)
    assert cache.seen_tokens == u.shape[1]
    assert cache.recurrent_state[0].shape == (2, HEADS, K, V)


def test_left_padding_gives_the_unpadded_outputs_and_state():
    layer, u = make_layer(), inputs(B=2, T=15)
    pad = 5
    padded = u.clone()
    padded[1, :pad] = torch.randn(pad, D_MODEL, dtype=torch.float64) * 3  # garbage the layer must ignore
    mask = torch.ones(2, 15, dtype=torch.long)
    mask[1, :pad] = 0
    with torch.no_grad():
        cache = RecurrentLayerCache()
        out, _ = layer(padded, attention_mask=mask, cache=cache)
        alone_cache = RecurrentLayerCache()
        alone, _ = layer(u[1:, pad:], cache=alone_cache)
        step, _ = layer(u[1:, :1], cache=alone_cache)
        padded_step, _ = layer(u[:, :1], cache=cache, attention_mask=torch.ones(2, 16))
    torch.testing.assert_close(out[1, pad:], alone[0])
    torch.testing.assert_close(cache.recurrent_state[1][1], alone_cache.recurrent_state[1][0])
    torch.testing.assert_close(padded_step[1], step[0])


def test_padded_tokens_leave_an_existing_state_unchanged():
    layer, u = make_layer(), inputs(B=2, T=9)
    with torch.no_grad():
        cache = RecurrentLayerCache()
        layer(u[:, :6], cache=cache)
        before = tuple(s.clone() for s in cache.recurrent_state)
        layer(u[:, 6:8], cache=cache, attention_mask=torch.zeros(2, 2))  # a chunk of padding
        layer(u[:, 8:], cache=cache, attention_mask=torch.zeros(2, 1))  # a padded decoding step
    torch.testing.assert_close(cache.recurrent_state, before, rtol=0, atol=0)


def test_cu_seqlens_equals_running_each_sequence_alone():
    layer, u = make_layer(), inputs(B=1, T=19)
    cu = torch.tensor([0, 3, 4, 19])
    packed, packed_var = layer(u, cu_seqlens=cu, output_variance=True)
    pieces = [layer(u[:, a:b], output_variance=True) for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())]
    torch.testing.assert_close(packed, torch.cat([p[0] for p in pieces], 1))
    torch.testing.assert_close(packed_var, torch.cat([p[1] for p in pieces], 1))


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="num_heads"):
        Palimpsa(10, num_heads=3)
    with pytest.raises(ValueError, match="importance_rank"):
        Palimpsa(16, num_heads=2, importance_rank=0)
    with pytest.raises(TypeError, match="metaplasticity"):
        Palimpsa(16, num_heads=2, metaplasticity="yes")
    layer = make_layer()
    with pytest.raises(ValueError, match="hidden_states"):
        layer(torch.randn(2, 5, D_MODEL + 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="attention_mask"):
        layer(inputs(T=5), attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="batch size 1"):
        layer(inputs(B=2, T=5), cu_seqlens=torch.tensor([0, 2, 5]))
    with pytest.raises(ValueError, match="cu_seqlens cannot"):
        layer(inputs(B=1, T=5), cu_seqlens=torch.tensor([0, 2, 5]), cache=RecurrentLayerCache())
    with pytest.raises(ValueError, match="cu_seqlens must start at 0 and end at T=5"):
        layer(inputs(B=1, T=5), cu_seqlens=torch.tensor([0, 2, 4]))  # the op is told not to check: the layer does
    with pytest.raises(ValueError, match="cu_seqlens must be strictly increasing"):
        layer(inputs(B=1, T=5), cu_seqlens=torch.tensor([0, 2, 2, 5]))
    with pytest.raises(TypeError, match="cache"):
        layer(inputs(T=5), cache={})


def test_default_importance_rank_is_ceil_d_over_16():
    assert Palimpsa(40, num_heads=2).importance_rank == math.ceil(40 / 16)


def test_layer_runs_under_bfloat16_autocast():
    """Under autocast the projections are bf16 while F.normalize returns float32: the op still gets one dtype."""
    from palimpsa.layers import Palimpsa

    torch.manual_seed(0)
    layer = Palimpsa(hidden_size=32, num_heads=2)
    u = torch.randn(2, 10, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = layer(u)
    out.float().sum().backward()
    assert torch.isfinite(out.float()).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters() if p.requires_grad)
