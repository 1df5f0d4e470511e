"""The paper's special cases (its Table 1) as executable checks against independent closed forms."""

import pytest
import torch

from palimpsa.ops import chunk_palimpsa, fused_recurrent_palimpsa, naive_palimpsa
from tests.ops.helpers import make_inputs, rel_err


def simple_gla_quadratic(q, k, v, g, scale):
    """o_t = scale * sum_{s<=t} exp(b_t - b_s) (q_t . k_s) v_s with b = cumsum(g): [B, T, H, V] (no recurrence)."""
    b = g.cumsum(1)  # [B, T, H]
    decay = torch.exp(b[:, :, None] - b[:, None, :])  # [B, T, S, H]
    T = q.shape[1]
    mask = torch.ones(T, T, dtype=torch.bool).tril()[None, :, :, None]
    scores = torch.einsum("bthk,bshk->btsh", q, k) * torch.where(mask, decay, torch.zeros_like(decay))
    return scale * torch.einsum("btsh,bshv->bthv", scores, v)


@pytest.mark.parametrize("fn", [naive_palimpsa, chunk_palimpsa, fused_recurrent_palimpsa])
def test_no_metaplasticity_is_scaled_simple_gla(fn):
    """beta = 0 and initial I = I0: I stays I0 and o = (1 / I0) * simple gated linear attention."""
    x = make_inputs(2, 33, 3, 4, 5, beta_max=0.0, initial_state=False)
    prior = torch.tensor([0.5, 1.0, 3.0], dtype=torch.float64)
    o, var, (mu, imp) = fn(x["q"], x["k"], x["v"], x["g"], x["beta"], prior=prior, output_final_state=True,
                           output_variance=True)
    expected = simple_gla_quadratic(x["q"], x["k"], x["v"], x["g"], 4 ** -0.5) / prior[:, None]
    assert rel_err(o, expected) < 1e-10
    assert torch.allclose(imp, prior[None, :, None, None].expand_as(imp))
    # Variance: scale^2 * |q|^2 / I0.
    expected_var = (x["q"] ** 2).sum(-1, keepdim=True) / 4 / prior[:, None]
    assert rel_err(var, expected_var.expand_as(var)) < 1e-10


def test_linear_attention_when_no_decay():
    x = make_inputs(1, 25, 2, 4, 4, gate=(0.0, 0.0), beta_max=0.0, initial_state=False, prior_tensor=False)
    o, _ = chunk_palimpsa(x["q"], x["k"], x["v"], x["g"], x["beta"], prior=2.0)
    scores = torch.einsum("bthk,bshk->bhts", x["q"], x["k"]).tril()
    expected = 0.5 * torch.einsum("bhts,bshv->bthv", scores, x["v"]) / 2.0
    assert rel_err(o, expected) < 1e-10


def test_mamba2_ssd_special_case():
    """q = C, k = B, v = dt * x, g = -dt * A, scale 1, beta 0, I0 1: the SSD scan y_t = C_t^T h_t."""
    gen = torch.Generator().manual_seed(3)
    Bsz, T, H, N, P = 2, 20, 2, 4, 3
    C = torch.randn(Bsz, T, H, N, generator=gen, dtype=torch.float64)
    Bm = torch.randn(Bsz, T, H, N, generator=gen, dtype=torch.float64)
    x = torch.randn(Bsz, T, H, P, generator=gen, dtype=torch.float64)
    dt = torch.rand(Bsz, T, H, generator=gen, dtype=torch.float64)
    A = torch.tensor([0.5, 2.0], dtype=torch.float64)
    h = torch.zeros(Bsz, H, N, P, dtype=torch.float64)
    ys = []
    for t in range(T):  # Mamba2's own discretisation: h = exp(dt A_neg) h + dt B x^T; y = C^T h
        h = torch.exp(-dt[:, t] * A)[..., None, None] * h + dt[:, t, :, None, None] * Bm[:, t, :, :, None] * x[:, t, :, None, :]
        ys.append(torch.einsum("bhn,bhnp->bhp", C[:, t], h))
    y = torch.stack(ys, 1)
    o, _ = chunk_palimpsa(C, Bm, dt[..., None] * x, -dt * A, torch.zeros_like(x), prior=1.0, scale=1.0)
    assert rel_err(o, y) < 1e-10


def test_strong_forgetting_tends_to_mamba2():
    """I0 much larger than what the writes add: I stays close to I0 and o ~ (1 / I0) * GLA."""
    x = make_inputs(1, 40, 1, 4, 4, gate=(-0.5, -0.3), beta_max=1.0, initial_state=False, prior_tensor=False)
    prior = 1e4
    o, (mu, imp) = chunk_palimpsa(x["q"], x["k"], x["v"], x["g"], x["beta"], prior=prior, output_final_state=True)
    gla = simple_gla_quadratic(x["q"], x["k"], x["v"], x["g"], 0.5) / prior
    assert rel_err(o, gla) < 1e-2
    assert (imp / prior - 1).abs().max() < 1e-2
