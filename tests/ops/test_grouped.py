"""Grouped importance (beta [B, T, H, G]) and no metaplasticity (beta = None) against the float64 reference.

The reference is ``naive_palimpsa`` with beta repeated over each group of V / G value channels; every output,
the variance, the final state and every gradient (dbeta in the grouped shape) must match it.
"""

from __future__ import annotations

import pytest
import torch

from palimpsa.ops import chunk_palimpsa, fused_recurrent_palimpsa, naive_palimpsa, palimpsa_step
from tests.ops.helpers import assert_close_to_reference, make_inputs


def grouped_inputs(B, T, H, K, V, G, initial="none", seed=0):
    """make_inputs with beta [B, T, H, G]; initial: "none", "grouped" (importance constant per group, no
    gradient) or "grad" (importance constant per group and differentiable)."""
    inputs = make_inputs(B, T, H, K, V, initial_state=False, seed=seed)
    gen = torch.Generator().manual_seed(seed + 7)
    if G is None:
        inputs["beta"] = None
    else:
        inputs["beta"] = (2 * torch.rand(B, T, H, G, generator=gen, dtype=torch.float64)).requires_grad_()
    if initial != "none":
        groups = G or 1
        mu0 = torch.randn(B, H, K, V, generator=gen, dtype=torch.float64).requires_grad_()
        imp0 = (0.5 + torch.rand(B, H, K, groups, generator=gen, dtype=torch.float64))
        imp0 = imp0.repeat_interleave(V // groups, -1).requires_grad_(initial == "grad")
        inputs["initial_state"] = (mu0, imp0)
    return inputs


def _chunk(chunk_size):
    return lambda **kw: chunk_palimpsa(**kw, backend="torch", chunk_size=chunk_size)


@pytest.mark.parametrize("G", [1, 2, 4, 8, None])
@pytest.mark.parametrize("initial", ["none", "grouped", "grad"])
def test_grouped_chunk_matches_reference(G, initial):
    inputs = grouped_inputs(2, 37, 2, 6, 8, G, initial)
    assert_close_to_reference(_chunk(16), naive_palimpsa, inputs, 1e-10)


def test_grouped_beta_gradient_has_grouped_shape():
    inputs = grouped_inputs(1, 9, 2, 4, 8, 2)
    o, _ = chunk_palimpsa(inputs["q"], inputs["k"], inputs["v"], inputs["g"], inputs["beta"], backend="torch")
    (dbeta,) = torch.autograd.grad(o.square().sum(), inputs["beta"])
    assert dbeta.shape == (1, 9, 2, 2)


def test_grouped_varlen_matches_reference():
    inputs = grouped_inputs(1, 50, 2, 4, 8, 2, "grouped")
    cu = torch.tensor([0, 7, 30, 50])
    mu0, imp0 = inputs["initial_state"]
    N = 3
    inputs["initial_state"] = (mu0.detach().repeat(N, 1, 1, 1).requires_grad_(), imp0.detach().repeat(N, 1, 1, 1))
    assert_close_to_reference(lambda **kw: chunk_palimpsa(**kw, backend="torch", chunk_size=8, cu_seqlens=cu),
                              lambda **kw: naive_palimpsa(**kw, cu_seqlens=cu), inputs, 1e-10)


@pytest.mark.parametrize("G", [1, 2, 8, None], ids=["G1", "G2", "per_channel", "none"])
@pytest.mark.parametrize("variance", [False, True])
def test_varlen_from_the_default_state_is_one_row_with_resets(G, variance, monkeypatch):
    """Packed sequences without initial or final states (training) reach the backends as one row, each
    sequence's first token a full reset, not as padded rows: every output and gradient still matches the
    float64 reference per sequence.  Sequences start inside a chunk, on a chunk's first token, and one holds a
    single token.  G = 8 = V is the per-channel path."""
    import palimpsa.ops.chunk as chunk_module
    import palimpsa.ops.torch_chunk as torch_chunk

    seen = []

    def spy(run):
        def wrapped(x, *args, **kwargs):
            seen.append(x.cu_seqlens)
            return run(x, *args, **kwargs)
        return wrapped

    monkeypatch.setattr(chunk_module, "_grouped_outside_compile", spy(chunk_module._grouped_outside_compile))
    monkeypatch.setattr(torch_chunk, "chunk_palimpsa_torch", spy(torch_chunk.chunk_palimpsa_torch))
    inputs = grouped_inputs(1, 50, 2, 4, 8, G)
    cu = torch.tensor([0, 7, 8, 16, 37, 50])
    assert_close_to_reference(lambda **kw: chunk_palimpsa(**kw, backend="torch", chunk_size=8, cu_seqlens=cu),
                              lambda **kw: naive_palimpsa(**kw, cu_seqlens=cu), inputs, 1e-10,
                              variance=variance, final=False)
    assert seen == [None]


def test_initial_importance_varying_inside_a_group_runs_per_channel():
    inputs = grouped_inputs(1, 12, 1, 4, 8, 2, "grouped")
    mu0, imp0 = inputs["initial_state"]
    inputs["initial_state"] = (mu0, imp0.detach() + 0.1 * torch.rand_like(imp0))
    assert_close_to_reference(_chunk(4), naive_palimpsa, inputs, 1e-10)


def test_fused_recurrent_and_step_take_grouped_beta():
    inputs = grouped_inputs(2, 5, 2, 4, 8, 4)
    assert_close_to_reference(fused_recurrent_palimpsa, naive_palimpsa, inputs, 1e-10)
    q, k, v, g, beta = (inputs[n].detach() for n in ("q", "k", "v", "g", "beta"))
    o_ref, (mu_ref, imp_ref) = naive_palimpsa(q, k, v, g, beta, output_final_state=True)
    state = (torch.zeros_like(mu_ref[:, :, :, :]), torch.ones_like(imp_ref))
    for t in range(q.shape[1]):
        o_t = palimpsa_step(q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], state)
        torch.testing.assert_close(o_t, o_ref[:, t])
    torch.testing.assert_close(state[1], imp_ref)


def test_no_metaplasticity_is_gla_over_the_prior():
    inputs = grouped_inputs(2, 20, 2, 4, 6, None)
    q, k, v, g = (inputs[n].detach() for n in ("q", "k", "v", "g"))
    o, _ = chunk_palimpsa(q, k, v, g, None, prior=2.0, backend="torch")
    ref, _ = naive_palimpsa(q, k, v, g, torch.zeros_like(v), prior=2.0)
    torch.testing.assert_close(o, ref)


@pytest.mark.parametrize("variance", [False, True])
def test_no_metaplasticity_with_the_prior_one_uses_q_itself(variance, monkeypatch):
    """prior=1 (a number): the rescaled query is q itself, no copy; the same outputs and gradients as a prior
    tensor of ones, and as the per-token reference."""
    from palimpsa.ops import grouped

    seen = []
    rescaled_query = grouped._rescaled_query

    def spy(q, *args, **kwargs):
        out = rescaled_query(q, *args, **kwargs)
        seen.append(out[0].data_ptr() == q.data_ptr())
        return out

    monkeypatch.setattr(grouped, "_rescaled_query", spy)
    inputs = grouped_inputs(2, 20, 2, 4, 6, None)
    inputs["prior"] = 1.0
    assert_close_to_reference(_chunk(8), naive_palimpsa, inputs, 1e-10, variance=variance)
    assert seen and all(seen)
    inputs["prior"] = torch.ones(2, dtype=torch.float64)
    assert_close_to_reference(_chunk(8), naive_palimpsa, inputs, 1e-10, variance=variance)
    assert not seen[-1]  # a tensor prior: q / prior, a new tensor


@pytest.mark.parametrize("G", [3, 16])
def test_groups_must_divide_value_size(G):
    inputs = grouped_inputs(1, 4, 1, 4, 8, None)
    beta = torch.rand(1, 4, 1, G, dtype=torch.float64)
    with pytest.raises(ValueError, match="G dividing V=8"):
        chunk_palimpsa(inputs["q"], inputs["k"], inputs["v"], inputs["g"], beta)


def _extreme(inputs, kind):
    """Put a full reset (-inf), a strong forget (-1e4) or saturated decays (-35) into inputs["g"]."""
    g = inputs["g"].detach().clone()
    if kind == "reset":
        g[0, [0, 3, 8, 9, 17], 0] = float("-inf")
        g[0, 12, 1] = float("-inf")
    elif kind == "forget":
        g[0, 5, :] = -1e4
    else:
        g[0, [3, 9, 15, 16]] -= 35.0
    inputs["g"] = g.requires_grad_()
    return inputs


def as_float32(inputs):
    """The same leaves in float32 (the prior and initial state included), keeping which need a gradient."""
    def cast(t):
        return t.detach().float().requires_grad_(t.requires_grad)
    return {n: cast(t) if isinstance(t, torch.Tensor) else tuple(map(cast, t)) if isinstance(t, tuple) else t
            for n, t in inputs.items()}


@pytest.mark.parametrize("G", [1, 2, None])
@pytest.mark.parametrize("kind", ["reset", "forget", "saturated"])
def test_extreme_decays_on_the_grouped_path(G, kind):
    """g = -inf (a full reset), -1e4 and g <= -35 on the GLA path itself, every gradient: in float64 against the
    reference, and in float32 within 1e-5 of the token-by-token recurrence in float32 (which sums no decays).
    The path's decays are summed per segment (palimpsa/ops/decay.py), never differenced."""
    inputs = _extreme(grouped_inputs(1, 30, 2, 4, 8, G, "grouped", seed=3), kind)
    assert_close_to_reference(_chunk(8), naive_palimpsa, inputs, 1e-10)
    assert_close_to_reference(_chunk(8), naive_palimpsa, as_float32(inputs), 1e-5)
