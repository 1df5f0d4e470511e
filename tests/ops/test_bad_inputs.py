"""Bad input raises a clear error that names the argument."""

import pytest
import torch

from palimpsa.ops import chunk_palimpsa, fused_recurrent_palimpsa, naive_palimpsa, palimpsa_step

B, T, H, K, V = 1, 6, 2, 3, 4


def good():
    return dict(q=torch.randn(B, T, H, K), k=torch.randn(B, T, H, K), v=torch.randn(B, T, H, V),
                g=-torch.rand(B, T, H), beta=torch.rand(B, T, H, V))


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
