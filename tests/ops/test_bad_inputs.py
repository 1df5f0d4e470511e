"""Bad input raises a clear error that names the argument."""

import pytest
import torch

from palimpsa.ops import chunk_palimpsa, fused_recurrent_palimpsa, naive_palimpsa, palimpsa_step

B, T, H, K, V = 1, 6, 2, 3, 4


def good():
    return dict(q=torch.randn(B, T, H, K), k=torch.randn(B, T, H, K), v=torch.randn(B, T, H, V),
                g=-torch.rand(B, T, H), beta=torch.rand(B, T, H, V))


def with_value(x, value):
    """x with one entry set to value (NaN or inf)."""
    x = x.clone()
    x.view(-1)[x.numel() // 2] = value
    return x


CASES = [
    ("q", dict(q=torch.randn(B, T, H)), ValueError, "q must have shape"),
    ("k", dict(k=torch.randn(B, T, H, K + 1)), ValueError, "k must have the shape of q"),
    ("v", dict(v=torch.randn(B, T + 1, H, V)), ValueError, "v must have shape"),
    ("beta shape", dict(beta=torch.rand(B, T, H, V + 1)), ValueError, "beta must have shape .B, T, H, G."),
    ("g shape", dict(g=torch.zeros(B, T, H, 1)), ValueError, "g must have shape"),
    ("dtype", dict(k=torch.randn(B, T, H, K, dtype=torch.float64)), TypeError, "k must have the dtype of q"),
    ("int", dict(q=torch.ones(B, T, H, K, dtype=torch.long)), TypeError, "q must be a floating tensor"),
    ("negative beta", dict(beta=-torch.rand(B, T, H, V)), ValueError, "beta"),
    ("positive g", dict(g=torch.rand(B, T, H) + 0.1), ValueError, "g (the log decay)"),
    ("prior zero", dict(prior=0.0), ValueError, "prior"),
    ("prior negative tensor", dict(prior=torch.tensor([1.0, -1.0])), ValueError, "prior"),
    ("prior shape", dict(prior=torch.ones(3)), ValueError, "prior"),
    ("K zero", dict(q=torch.randn(B, T, H, 0), k=torch.randn(B, T, H, 0)), ValueError, "head sizes"),
    ("V zero", dict(v=torch.randn(B, T, H, 0), beta=torch.rand(B, T, H, 0)), ValueError, "head sizes"),
    ("cu_seqlens B>1", dict(q=torch.randn(2, T, H, K), k=torch.randn(2, T, H, K), v=torch.randn(2, T, H, V),
                            g=-torch.rand(2, T, H), beta=torch.rand(2, T, H, V), cu_seqlens=torch.tensor([0, 6])),
     ValueError, "B == 1"),
    ("cu_seqlens order", dict(cu_seqlens=torch.tensor([0, 4, 3, 6])), ValueError, "strictly increasing"),
    ("cu_seqlens end", dict(cu_seqlens=torch.tensor([0, 4])), ValueError, "end at T"),
    ("cu_seqlens float", dict(cu_seqlens=torch.tensor([0.0, 6.0])), TypeError, "cu_seqlens"),
    ("initial state shape", dict(initial_state=(torch.zeros(B, H, K, V), torch.ones(B, H, K))), ValueError,
     "initial_state[1]"),
    ("initial importance", dict(initial_state=(torch.zeros(B, H, K, V), torch.zeros(B, H, K, V))), ValueError,
     "importance"),
    ("backend", dict(backend="cuda-magic"), ValueError, "backend"),
    ("NaN beta", dict(beta=with_value(torch.rand(B, T, H, V), float("nan"))), ValueError, "beta (the importance gate)"),
    ("inf beta", dict(beta=with_value(torch.rand(B, T, H, V), float("inf"))), ValueError, "beta (the importance gate)"),
    ("NaN g", dict(g=with_value(-torch.rand(B, T, H), float("nan"))), ValueError, "g (the log decay)"),
    ("+inf g", dict(g=with_value(-torch.rand(B, T, H), float("inf"))), ValueError, "g (the log decay)"),
    ("prior inf tensor", dict(prior=torch.tensor([1.0, float("inf")])), ValueError, "prior"),
    ("prior NaN tensor", dict(prior=torch.tensor([float("nan"), 1.0])), ValueError, "prior"),
    ("initial importance inf", dict(initial_state=(torch.zeros(B, H, K, V),
                                                   with_value(torch.ones(B, H, K, V), float("inf")))),
     ValueError, "initial_state[1] (the importance I)"),
    ("initial importance NaN", dict(initial_state=(torch.zeros(B, H, K, V),
                                                   with_value(torch.ones(B, H, K, V), float("nan")))),
     ValueError, "initial_state[1] (the importance I)"),
    ("initial mean NaN", dict(initial_state=(with_value(torch.zeros(B, H, K, V), float("nan")),
                                             torch.ones(B, H, K, V))), ValueError, "initial_state[0] (the mean mu)"),
]


@pytest.mark.parametrize("fn", [chunk_palimpsa, fused_recurrent_palimpsa, naive_palimpsa])
@pytest.mark.parametrize("name,override,exc,message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises(fn, name, override, exc, message):
    kwargs = good()
    kwargs.update(override)
    with pytest.raises(exc, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                       .replace("]", r"\]")):
        fn(**kwargs)


def test_step_bad_state():
    q = torch.randn(1, H, K)
    with pytest.raises(ValueError, match="state"):
        palimpsa_step(q, q, torch.randn(1, H, V), torch.zeros(1, H), torch.rand(1, H, V),
                      (torch.zeros(1, H, K, V), torch.ones(1, H, K, V + 1)))


@pytest.mark.parametrize("override,message", [
    (dict(g=torch.ones(1, H)), "g"), (dict(beta=-torch.ones(1, H, V)), "beta"), (dict(prior=0.0), "prior"),
    (dict(prior=torch.tensor([1.0, -2.0])), "prior"), (dict(v=torch.randn(1, H, V, dtype=torch.float64)), "v"),
])
def test_step_bad_values(override, message):
    args = dict(q=torch.randn(1, H, K), k=torch.randn(1, H, K), v=torch.randn(1, H, V), g=torch.zeros(1, H),
                beta=torch.rand(1, H, V), prior=1.0)
    args.update(override)
    state = (torch.zeros(1, H, K, V), torch.ones(1, H, K, V))
    with pytest.raises((ValueError, TypeError), match=message):
        palimpsa_step(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("g"), args.pop("beta"), state, **args)
    assert torch.equal(state[1], torch.ones(1, H, K, V))  # nothing written


def test_check_values_false_skips_only_the_sign_checks():
    kwargs = good()
    kwargs["beta"] = -kwargs["beta"]
    chunk_palimpsa(**kwargs, check_values=False)  # no sign check, no sync
    kwargs["q"] = torch.randn(B, T, H)
    with pytest.raises(ValueError, match="q must have shape"):
        chunk_palimpsa(**kwargs, check_values=False)  # shapes are still checked


@pytest.mark.parametrize("fn", [chunk_palimpsa, fused_recurrent_palimpsa])
def test_value_checks_cost_one_sync(fn, monkeypatch):
    """Every value check (gates, prior tensor, initial state) reads back from the device once, together."""
    reads = []
    for name in ("__bool__", "item", "tolist", "__int__", "__float__"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _f=original, _n=name: reads.append(_n) or _f(self, *a))
    kwargs = good()
    kwargs.update(prior=torch.tensor([1.0, 2.0]), initial_state=(torch.zeros(B, H, K, V), torch.ones(B, H, K, V)))
    fn(**kwargs)
    assert reads == ["tolist"]
    reads.clear()
    fn(**kwargs, check_values=False)
    assert reads == []


@pytest.mark.parametrize("chunk_size", [0, -16, 2.5, True, "64"])
def test_bad_chunk_size_raises(chunk_size):
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        chunk_palimpsa(**good(), chunk_size=chunk_size)


@pytest.mark.parametrize("override,message", [
    (dict(state=(torch.zeros(1, H, K, V), torch.zeros(1, H, K, V))), "state[1] (the importance I) must be > 0"),
    (dict(state=(torch.zeros(1, H, K, V), -torch.ones(1, H, K, V))), "state[1] (the importance I) must be > 0"),
    (dict(state=(torch.zeros(1, H, K, V), with_value(torch.ones(1, H, K, V), float("inf")))), "state[1]"),
    (dict(state=(with_value(torch.zeros(1, H, K, V), float("nan")), torch.ones(1, H, K, V))), "state[0]"),
    (dict(g=with_value(torch.zeros(1, H), float("nan"))), "g (the log decay)"),
    (dict(beta=with_value(torch.rand(1, H, V), float("inf"))), "beta (the importance gate)"),
    (dict(prior=torch.tensor([1.0, float("nan")])), "prior"),
])
def test_step_non_finite_or_bad_state_raises(override, message):
    args = dict(q=torch.randn(1, H, K), k=torch.randn(1, H, K), v=torch.randn(1, H, V), g=torch.zeros(1, H),
                beta=torch.rand(1, H, V), state=(torch.zeros(1, H, K, V), torch.ones(1, H, K, V)))
    args.update(override)
    before = [t.clone() for t in args["state"]]
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                       .replace("]", r"\]")):
        palimpsa_step(**args)
    for a, b in zip(args["state"], before):  # nothing written
        assert torch.equal(a.nan_to_num(), b.nan_to_num())


def test_step_accepts_a_full_reset():
    """g = -inf (alpha = 0) resets the state to (0, I0) before the token's write."""
    k = torch.randn(1, H, K)
    v, beta = torch.randn(1, H, V), torch.rand(1, H, V)
    state = (torch.randn(1, H, K, V), torch.rand(1, H, K, V) + 0.5)
    palimpsa_step(k, k, v, torch.full((1, H), float("-inf")), beta, state, prior=2.0)
    imp = 2.0 + (k * k)[..., None] * beta[:, :, None, :]
    assert torch.allclose(state[1], imp)
    assert torch.allclose(state[0], k[..., None] * v[:, :, None, :] / imp)
