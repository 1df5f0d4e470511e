"""MetaMamba2 layer: Mamba2 equivalence, decoding cache, padding, packed sequences, gradients."""

import pytest
import torch

from palimpsa.layers import MetaMamba2, MetaMamba2LayerCache
from tests.models.mamba2_reference import full_width_gated_norms

D_MODEL, STATE, HEAD_DIM, GROUPS = 32, 8, 8, 2


def make_layer(metaplasticity=True, seed=0, **kwargs):
    torch.manual_seed(seed)
    layer = MetaMamba2(D_MODEL, state_size=STATE, head_dim=HEAD_DIM, n_groups=GROUPS, expand=2,
                       metaplasticity=metaplasticity, importance_rank=4, **kwargs)
    if metaplasticity:  # make the importance gate matter: larger beta than the default init gives
        with torch.no_grad():
            layer.importance_scale.fill_(2.0)
    return layer.double()


def test_parameter_names_mirror_transformers_mamba2_mixer():
    from transformers import Mamba2Config
    from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer

    cfg = Mamba2Config(hidden_size=D_MODEL, num_heads=8, head_dim=HEAD_DIM, state_size=STATE, n_groups=GROUPS,
                       num_hidden_layers=1)
    ref = Mamba2Mixer(cfg, layer_idx=0)
    ours = MetaMamba2(D_MODEL, state_size=STATE, head_dim=HEAD_DIM, n_groups=GROUPS, importance_rank=4)
    new = set(ours.state_dict()) - set(ref.state_dict())
    assert new == {"importance_down_proj.weight", "importance_up_proj.weight", "importance_scale"}
    for name, tensor in ref.state_dict().items():
        assert ours.state_dict()[name].shape == tensor.shape, name


def test_without_metaplasticity_equals_transformers_mixer():
    from transformers import Mamba2Config
    from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer

    torch.manual_seed(1)
    cfg = Mamba2Config(hidden_size=D_MODEL, num_heads=8, head_dim=HEAD_DIM, state_size=STATE, n_groups=GROUPS,
                       num_hidden_layers=1, chunk_size=8)
    ref = full_width_gated_norms(Mamba2Mixer(cfg, layer_idx=0))  # its scan runs in float32 whatever the parameters
    ours = MetaMamba2(D_MODEL, state_size=STATE, head_dim=HEAD_DIM, n_groups=GROUPS, metaplasticity=False)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 21, D_MODEL)
    out, variance = ours(x)
    assert variance is None
    expected = ref(x)
    assert (out - expected).abs().max() <= 1e-5 * expected.abs().max()


@pytest.mark.parametrize("metaplasticity", [True, False])
def test_decoding_with_left_padding_equals_full_forward(metaplasticity):
    layer = make_layer(metaplasticity)
    B, T, prefill = 3, 11, 6
    x = torch.randn(B, T, D_MODEL, dtype=torch.float64)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, :3] = 0
    mask[2, :5] = 0
    full, full_var = layer(x, attention_mask=mask, output_variance=True)

    cache = layer.new_cache()
    with torch.no_grad():
        outs, vars_ = [], []
        o, v = layer(x[:, :prefill], attention_mask=mask[:, :prefill], cache=cache, output_variance=True)
        outs.append(o)
        vars_.append(v)
        for t in range(prefill, T):  # one token at a time: the in-place step path
            o, v = layer(x[:, t:t + 1], cache=cache, output_variance=True)
            outs.append(o)
            vars_.append(v)
    assert cache.seen_tokens == T
    assert cache.ssm_state[0].shape == (B, 8, STATE, HEAD_DIM)
    # compare only real tokens (padded outputs are not meaningful)
    real = mask.bool()
    torch.testing.assert_close(torch.cat(outs, 1)[real], full[real], rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(torch.cat(vars_, 1)[real], full_var[real], rtol=1e-9, atol=1e-10)


def test_left_padding_leaves_the_state_untouched():
    layer = make_layer(True)
    x = torch.randn(1, 7, D_MODEL, dtype=torch.float64)
    padded = torch.cat([torch.randn(1, 4, D_MODEL, dtype=torch.float64), x], 1)
    mask = torch.tensor([[0] * 4 + [1] * 7])
    out_padded, _ = layer(padded, attention_mask=mask)
    out, _ = layer(x)
    torch.testing.assert_close(out_padded[:, 4:], out, rtol=1e-9, atol=1e-10)


def test_multi_token_continuation_equals_full_forward():
    layer = make_layer(True)
    x = torch.randn(2, 13, D_MODEL, dtype=torch.float64)
    full, _ = layer(x)
    cache = MetaMamba2LayerCache()
    parts = [layer(x[:, a:b], cache=cache)[0] for a, b in ((0, 2), (2, 9), (9, 13))]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-9, atol=1e-10)


def test_cu_seqlens_equals_separate_sequences():
    layer = make_layer(True)
    lengths = [5, 1, 9]
    xs = [torch.randn(1, n, D_MODEL, dtype=torch.float64, requires_grad=True) for n in lengths]
    cu = torch.tensor([0, 5, 6, 15])
    packed, _ = layer(torch.cat(xs, 1), cu_seqlens=cu)
    separate = torch.cat([layer(x)[0] for x in xs], 1)
    torch.testing.assert_close(packed, separate, rtol=1e-9, atol=1e-10)
    w = torch.randn_like(packed)
    g_packed = torch.autograd.grad((packed * w).sum(), xs + [layer.importance_scale])
    g_separate = torch.autograd.grad((separate * w).sum(), xs + [layer.importance_scale])
    for a, b in zip(g_packed, g_separate):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_every_parameter_gets_a_gradient():
    layer = make_layer(True).float()
    out, variance = layer(torch.randn(2, 9, D_MODEL), output_variance=True)
    (out.square().mean() + variance.mean()).backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_metaplasticity_changes_the_output():
    torch.manual_seed(0)
    meta = make_layer(True)
    plain = make_layer(False)
    plain.load_state_dict(meta.state_dict(), strict=False)
    x = torch.randn(1, 12, D_MODEL, dtype=torch.float64)
    assert not torch.allclose(meta(x)[0], plain(x)[0])
    with torch.no_grad():
        meta.importance_scale.fill_(-60.0)  # softplus(-60) ~ 1e-26: beta vanishes, Mamba2 again
    torch.testing.assert_close(meta(x)[0], plain(x)[0], rtol=1e-12, atol=1e-12)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="head_dim"):
        MetaMamba2(32, head_dim=24)
    with pytest.raises(ValueError, match="n_groups"):
        MetaMamba2(32, head_dim=8, n_groups=3)
    with pytest.raises(ValueError, match="mode"):
        MetaMamba2(32, head_dim=8, mode="fast")
    layer = MetaMamba2(32, head_dim=8)
    with pytest.raises(ValueError, match="hidden_states"):
        layer(torch.randn(2, 3, 16))
    with pytest.raises(ValueError, match="attention_mask"):
        layer(torch.randn(2, 3, 32), attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="cu_seqlens"):
        layer(torch.randn(1, 3, 32), cu_seqlens=torch.tensor([0, 3]), cache=layer.new_cache())
    with pytest.raises(ValueError, match="cu_seqlens must start at 0 and end at T=3"):
        layer(torch.randn(1, 3, 32), cu_seqlens=torch.tensor([0, 2]))
    with pytest.raises(TypeError, match="cache"):
        layer(torch.randn(1, 3, 32), cache={})


def test_gated_norm_per_group_normalises_each_group():
    from palimpsa.layers.meta_mamba2 import GatedRMSNorm

    torch.manual_seed(0)
    y, z = torch.randn(3, 5, 12, dtype=torch.float64), torch.randn(3, 5, 12, dtype=torch.float64)
    norm = GatedRMSNorm(12, eps=1e-6, group_size=4).double()
    with torch.no_grad():
        norm.weight.copy_(torch.rand(12))
    h = y * torch.nn.functional.silu(z)
    groups = [g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + 1e-6) for g in h.split(4, dim=-1)]
    torch.testing.assert_close(norm(y, z), norm.weight * torch.cat(groups, -1))
    whole = GatedRMSNorm(12, eps=1e-6).double()
    torch.testing.assert_close(whole(y, z), h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6))
    layer = MetaMamba2(hidden_size=16, state_size=4, head_dim=8, n_groups=2, norm_per_group=True)
    assert layer.norm.group_size == 16  # inner width 32 over 2 groups
    with pytest.raises(ValueError, match="group_size"):
        GatedRMSNorm(12, group_size=5)


def test_depthwise_convolution_is_time_major_and_its_two_paths_agree():
    """The convolution takes and gives [B, T, C] (contiguous, so the op downstream copies nothing); F.conv1d and the
    shifted multiply-adds (compiled blocks, packed sequences) agree, with a decoding prefix too."""
    from palimpsa.layers.meta_mamba2 import causal_depthwise_conv

    torch.manual_seed(0)
    x, weight, bias = torch.randn(1, 9, 6), torch.randn(6, 4), torch.randn(6)
    prefix = torch.randn(1, 6, 3)
    y, new_prefix = causal_depthwise_conv(x, weight, bias, prefix=prefix)
    taps, _ = causal_depthwise_conv(x, weight, bias, cu_seqlens=torch.tensor([0, 9]))
    assert y.shape == (1, 9, 6) and y.is_contiguous() and taps.is_contiguous()
    torch.testing.assert_close(taps, causal_depthwise_conv(x, weight, bias)[0], rtol=1e-5, atol=1e-6)
    full = torch.cat([prefix, x.transpose(1, 2)], dim=-1)  # [B, C, W - 1 + T]
    expected = torch.nn.functional.conv1d(full, weight[:, None], bias, groups=6).transpose(1, 2)
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(new_prefix, x[:, -3:].transpose(1, 2))


@pytest.mark.parametrize("metaplasticity", [True, False])
def test_under_bfloat16_autocast_the_op_gets_bf16_inputs_and_a_float32_decay(metaplasticity, monkeypatch):
    """Under autocast the op receives q, k, v and beta in the projections' bf16 (no float32 [B, T, H, N] or
    [B, T, H, P] copies for it to keep), the log decay in float32; the output stays close to float32's and every
    parameter gets a finite gradient."""
    from palimpsa.layers import meta_mamba2

    seen = {}
    original = meta_mamba2.chunk_palimpsa

    def spy(q, k, v, g, beta, **kwargs):
        seen.update(q=q.dtype, k=k.dtype, v=v.dtype, g=g.dtype, beta=None if beta is None else beta.dtype)
        return original(q, k, v, g, beta, **kwargs)

    monkeypatch.setattr(meta_mamba2, "chunk_palimpsa", spy)
    layer = make_layer(metaplasticity=metaplasticity).float()
    u = torch.randn(2, 12, D_MODEL, generator=torch.Generator().manual_seed(1))
    reference, _ = layer(u)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, variance = layer(u, output_variance=True)
    assert variance.dtype == torch.float32  # as documented, whatever dtype the op computed it in
    assert seen["q"] == seen["k"] == seen["v"] == torch.bfloat16 and seen["g"] == torch.float32
    assert seen["beta"] == (torch.bfloat16 if metaplasticity else None)
    error = (out.float() - reference).norm() / reference.norm()
    assert error < 3e-2, error
    out.float().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters() if p.requires_grad)
