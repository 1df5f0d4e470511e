"""Gated DeltaNet: the chunked and recurrent PyTorch delta rule against a token loop written here, and the
layer against the same loop fed by its own projections (and against fla's naive reference when installed)."""

import pytest
import torch
import torch.nn.functional as F

from palimpsa.layers.gated_deltanet import (GatedDeltaNet, chunk_gated_delta_rule_torch, l2_normalize,
                                            recurrent_gated_delta_rule_torch)


def delta_rule_loop(q, k, v, g, beta, scale, S):
    """S_t = a_t S_{t-1} + k_t beta_t (v_t - a_t S_{t-1}^T k_t)^T;  o_t = scale S_t^T q_t  (per batch, head).

    q, k [B, T, H, K]; v [B, T, H, V]; g, beta [B, T, H]; S [B, H, K, V].  Returns o [B, T, H, V], final S.
    """
    B, T, H, _ = q.shape
    rows, finals = [], []
    for b in range(B):
        heads, head_states = [], []
        for h in range(H):
            state, outputs = S[b, h], []
            for t in range(T):
                decayed = torch.exp(g[b, t, h]) * state
                prediction = decayed.T @ k[b, t, h]
                state = decayed + beta[b, t, h] * torch.outer(k[b, t, h], v[b, t, h] - prediction)
                outputs.append(scale * state.T @ q[b, t, h])
            heads.append(torch.stack(outputs))
            head_states.append(state)
        rows.append(torch.stack(heads, dim=1))
        finals.append(torch.stack(head_states))
    return torch.stack(rows), torch.stack(finals)


def random_inputs(B=2, T=37, H=2, K=5, V=3, strong_decay=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=gen, dtype=torch.float64)
    k = l2_normalize(torch.randn(B, T, H, K, generator=gen, dtype=torch.float64))
    v = torch.randn(B, T, H, V, generator=gen, dtype=torch.float64)
    g = -torch.rand(B, T, H, generator=gen, dtype=torch.float64) * (5.0 if strong_decay else 0.2)
    beta = torch.rand(B, T, H, generator=gen, dtype=torch.float64)
    S0 = torch.randn(B, H, K, V, generator=gen, dtype=torch.float64)
    return q, k, v, g, beta, S0


@pytest.mark.parametrize("chunk_size", [1, 8, 16, 64])
@pytest.mark.parametrize("strong_decay", [False, True])
def test_chunk_and_recurrent_match_the_loop(chunk_size, strong_decay):
    q, k, v, g, beta, S0 = random_inputs(strong_decay=strong_decay)
    ref_o, ref_S = delta_rule_loop(q, k, v, g, beta, 0.3, S0)
    o, S = chunk_gated_delta_rule_torch(q, k, v, g, beta, scale=0.3, initial_state=S0, output_final_state=True,
                                        chunk_size=chunk_size)
    torch.testing.assert_close(o, ref_o, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(S, ref_S, rtol=1e-10, atol=1e-10)
    o2, S2 = recurrent_gated_delta_rule_torch(q, k, v, g, beta, scale=0.3, initial_state=S0, output_final_state=True)
    torch.testing.assert_close(o2, ref_o, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(S2, ref_S, rtol=1e-10, atol=1e-10)


def test_chunk_gradients_match_the_loop():
    inputs = [x.requires_grad_() for x in random_inputs(B=1, T=21, H=2, K=4, V=3)]
    weights = torch.randn(1, 21, 2, 3, dtype=torch.float64)
    o, _ = chunk_gated_delta_rule_torch(*inputs[:5], initial_state=inputs[5], chunk_size=8)
    grads = torch.autograd.grad((o * weights).sum(), inputs)
    ref, _ = delta_rule_loop(*inputs[:5], 4 ** -0.5, inputs[5])
    ref_grads = torch.autograd.grad((ref * weights).sum(), inputs)
    for name, a, b in zip("q k v g beta S0".split(), grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=name)


def test_float32_and_zero_initial_state():
    q, k, v, g, beta, _ = (x.float() for x in random_inputs(T=70))
    ref, _ = delta_rule_loop(*(x.double() for x in (q, k, v, g, beta)), 5 ** -0.5, torch.zeros(2, 2, 5, 3,
                                                                                                 dtype=torch.float64))
    o, state = chunk_gated_delta_rule_torch(q, k, v, g, beta)
    assert o.dtype == torch.float32 and state is None
    torch.testing.assert_close(o.double(), ref, rtol=1e-4, atol=1e-5)


def test_layer_matches_the_loop_on_its_own_projections():
    torch.manual_seed(0)
    layer = GatedDeltaNet(hidden_size=12, num_heads=2, head_k_dim=4, head_v_dim=6, backend="torch").double()
    u = torch.randn(2, 19, 12, dtype=torch.float64)
    out, variance = layer(u)
    assert out.shape == (2, 19, 12) and variance is None

    def conv(proj, conv_layer):  # causal depthwise conv + SiLU, written out
        x = F.pad(proj(u).transpose(1, 2), (conv_layer.weight.shape[-1] - 1, 0))
        return F.silu(F.conv1d(x, conv_layer.weight, groups=x.shape[1]).transpose(1, 2))

    q = l2_normalize(conv(layer.q_proj, layer.q_conv1d).view(2, 19, 2, 4))
    k = l2_normalize(conv(layer.k_proj, layer.k_conv1d).view(2, 19, 2, 4))
    v = conv(layer.v_proj, layer.v_conv1d).view(2, 19, 2, 6)
    beta = torch.sigmoid(layer.b_proj(u))
    g = -layer.A_log.exp() * F.softplus(layer.a_proj(u) + layer.dt_bias)
    o, _ = delta_rule_loop(q, k, v, g, beta, 4 ** -0.5, torch.zeros(2, 2, 4, 6, dtype=torch.float64))
    o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + layer.o_norm.eps) * layer.o_norm.weight
    o = o * F.silu(layer.g_proj(u).view(2, 19, 2, 6))
    torch.testing.assert_close(out, layer.o_proj(o.reshape(2, 19, 12)), rtol=1e-9, atol=1e-9)


def test_layer_packed_sequences_equal_separate_calls():
    torch.manual_seed(1)
    layer = GatedDeltaNet(hidden_size=8, num_heads=2, backend="torch").double()
    a, b = torch.randn(1, 5, 8, dtype=torch.float64), torch.randn(1, 9, 8, dtype=torch.float64)
    packed, _ = layer(torch.cat([a, b], dim=1), cu_seqlens=torch.tensor([0, 5, 14]))
    torch.testing.assert_close(packed, torch.cat([layer(a)[0], layer(b)[0]], dim=1), rtol=1e-10, atol=1e-10)


def test_layer_parameter_names_follow_fla():
    layer = GatedDeltaNet(hidden_size=16, num_heads=2)
    names = set(dict(layer.named_parameters()))
    assert names == {"q_proj.weight", "k_proj.weight", "v_proj.weight", "a_proj.weight", "b_proj.weight",
                     "q_conv1d.weight", "k_conv1d.weight", "v_conv1d.weight", "A_log", "dt_bias",
                     "g_proj.weight", "o_norm.weight", "o_proj.weight"}
    assert layer.recurrent_state_shape() == (2, 8, 16)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="backend"):
        GatedDeltaNet(16, backend="cuda")
    q, k, v, g, beta, _ = random_inputs()
    with pytest.raises(ValueError, match="beta"):
        chunk_gated_delta_rule_torch(q, k, v, g, beta[..., None])
    with pytest.raises(ValueError, match="hidden_states"):
        GatedDeltaNet(16, backend="torch")(torch.randn(1, 3, 8))


def test_matches_fla_naive_reference():
    naive = pytest.importorskip("fla.ops.gated_delta_rule.naive")
    q, k, v, g, beta, S0 = random_inputs(T=40)
    o, S = chunk_gated_delta_rule_torch(q, k, v, g, beta, initial_state=S0, output_final_state=True, chunk_size=16)
    # fla's reference takes [B, T, H, ...] (fla >= 0.2) and returns (o, final_state)
    ref_o, ref_S = naive.naive_recurrent_gated_delta_rule(q, k, v, beta, g, initial_state=S0, output_final_state=True)
    torch.testing.assert_close(o, ref_o.to(o.dtype), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(S, ref_S.to(S.dtype), rtol=1e-6, atol=1e-6)
