"""Extreme decays: a full reset (g = -inf), a strong forget (g = -1e4) and saturated decays (g <= -30).

The chunked and recurrent paths must match the token-by-token recurrence there too: no NaN, float32 accuracy
at 1e-5, and a decay gradient that is accurate token by token (it is tiny, e^g, at a saturated decay).
"""

import pytest
import torch

from palimpsa.ops import chunk_palimpsa, fused_recurrent_palimpsa, naive_palimpsa
from palimpsa.ops.decay import log_decay_to_end, segment_log_decay

NAMES = ("o", "var", "mu", "I", "dq", "dk", "dv", "dg", "dbeta", "dprior", "dmu0", "dI0")
T, H, K, V, CHUNK = 40, 2, 8, 6, 16


def make_inputs(seed=0):
    """float64 inputs [1, T, H, *] with an initial state; g in [-0.5, 0]."""
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    u = lambda *s: torch.rand(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    return dict(q=r(1, T, H, K), k=r(1, T, H, K) / K ** 0.5, v=r(1, T, H, V), g=-0.5 * u(1, T, H),
                beta=u(1, T, H, V), prior=u(H) + 0.5, mu0=0.3 * r(1, H, K, V), imp0=u(1, H, K, V) + 0.5)


def run(fn, inputs, dtype, **kwargs):
    """Every output and every gradient of a fixed random projection of them, as a dict."""
    x = {n: t.detach().to(dtype).requires_grad_() for n, t in inputs.items()}
    o, var, (mu, imp) = fn(x["q"], x["k"], x["v"], x["g"], x["beta"], prior=x["prior"],
                           initial_state=(x["mu0"], x["imp0"]), output_final_state=True, output_variance=True,
                           **kwargs)
    gen = torch.Generator().manual_seed(1)
    outs = (o, var, mu, imp)
    loss = sum((t.double() * torch.randn(t.shape, generator=gen, dtype=torch.float64)).sum() for t in outs)
    loss.backward()
    grads = [x[n].grad for n in ("q", "k", "v", "g", "beta", "prior", "mu0", "imp0")]
    return dict(zip(NAMES, [t.detach() for t in outs] + grads))


def assert_matches_naive(fn, inputs, dtype, tol, **kwargs):
    ref = run(naive_palimpsa, inputs, torch.float64)
    got = run(fn, inputs, dtype, **kwargs)
    for name in NAMES:
        assert torch.isfinite(got[name]).all(), f"{name} has non-finite values"
        err = ((got[name].double() - ref[name]).norm() / ref[name].norm()).item()
        assert err < tol, f"{name}: relative error {err:.1e} >= {tol:.0e}"
    return got, ref


PATHS = [(chunk_palimpsa, dict(chunk_size=CHUNK)), (fused_recurrent_palimpsa, {})]
PATH_IDS = ["chunk", "fused_recurrent"]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)], ids=["f64", "f32"])
@pytest.mark.parametrize("fn,kwargs", PATHS, ids=PATH_IDS)
def test_full_reset_matches_naive(fn, kwargs, dtype, tol):
    """g = -inf (alpha = 0) at the first token, inside a chunk, at a chunk's first and last tokens, twice in a row."""
    inputs = make_inputs()
    inputs["g"][0, [0, 5, 15, 16, 17, 33], 0] = float("-inf")
    inputs["g"][0, 20, 1] = float("-inf")
    assert_matches_naive(fn, inputs, dtype, tol, backend="torch", **kwargs)


@pytest.mark.parametrize("fn,kwargs", PATHS, ids=PATH_IDS)
def test_strong_forget_is_float32_accurate(fn, kwargs):
    """g = -1e4 at one token: the small decays after it are not lost in a large cumulative sum."""
    inputs = make_inputs(seed=1)
    inputs["g"][0, 5, :] = -1e4
    assert_matches_naive(fn, inputs, torch.float32, 1e-5, backend="torch", **kwargs)


@pytest.mark.parametrize("fn,kwargs", PATHS, ids=PATH_IDS)
def test_saturated_decay_gradient_is_accurate(fn, kwargs):
    """g <= -30: dg = alpha <dS, S_prev> is ~e^-30 and must keep its float32 relative accuracy."""
    inputs = make_inputs(seed=2)
    saturated = torch.zeros(1, T, H, dtype=torch.bool)
    saturated[0, [3, 9, 15, 16, 30, 31]] = True
    inputs["g"] = torch.where(saturated, inputs["g"] - 35.0, inputs["g"])
    got, ref = assert_matches_naive(fn, inputs, torch.float32, 1e-5, backend="torch", **kwargs)
    rel = (got["dg"].double() - ref["dg"]).abs() / ref["dg"].abs()
    assert ref["dg"][saturated].abs().max() < 1e-10  # the true values are tiny ...
    assert rel[saturated].max() < 1e-4  # ... and still accurate


def test_log_decay_to_end():
    g = -torch.rand(3, 9, dtype=torch.float64)
    expected = g.flip(1).cumsum(1).flip(1) - g  # fine in float64 with moderate values
    assert torch.allclose(log_decay_to_end(g, 1), expected)
    assert torch.allclose(log_decay_to_end(g.T, 0), expected.T)
    g[0, 4] = float("-inf")
    g[1, 4] = -1e4
    g32 = log_decay_to_end(g.float(), 1)
    assert torch.isneginf(g32[0, :4]).all() and torch.isfinite(g32[0, 4:]).all()
    assert torch.equal(g32[0, 4:], log_decay_to_end(g[0:1, 4:].float(), 1)[0])
    # after the strong forget the sums see only their own (small) terms: exact to float32 rounding
    assert torch.allclose(g32[1, 4:].double(), expected[1, 4:], rtol=1e-6, atol=0)
    assert log_decay_to_end(g[:, :1], 1).eq(0).all()


def test_segment_log_decay():
    g = -torch.rand(2, 7, dtype=torch.float64)
    b = g.cumsum(-1)
    causal = torch.ones(7, 7, dtype=torch.bool).tril()
    expected = (b[..., :, None] - b[..., None, :]).masked_fill(~causal, float("-inf"))
    assert torch.allclose(segment_log_decay(g), expected)
    g[0, 3] = float("-inf")
    L = segment_log_decay(g.float())
    assert not torch.isnan(L).any()
    assert torch.isneginf(L[0, 3:, :3]).all() and torch.isfinite(L[0, 3:, 3:].tril()).all()
