"""Every PyTorch backend against the float64 naive recurrence: outputs, variance, final states, all gradients."""

import functools

import pytest
import torch

from palimpsa.ops import chunk_palimpsa, fused_recurrent_palimpsa, naive_palimpsa, palimpsa_step
from tests.ops.helpers import assert_close_to_reference, make_inputs, rel_err

CHUNK = functools.partial(chunk_palimpsa, backend="torch", chunk_size=16)
RECURRENT = functools.partial(fused_recurrent_palimpsa, backend="torch")


@pytest.mark.parametrize("fn", [CHUNK, RECURRENT], ids=["chunk", "recurrent"])
@pytest.mark.parametrize(
    "B,T,H,K,V",
    [(1, 1, 2, 4, 4), (2, 37, 3, 5, 7), (2, 64, 2, 8, 8), (1, 50, 1, 3, 9)],
    ids=["T1", "T-not-multiple", "T-multiple", "odd-KV"],
)
@pytest.mark.parametrize("initial_state", [True, False], ids=["init", "no-init"])
def test_matches_naive_float64(fn, B, T, H, K, V, initial_state):
    inputs = make_inputs(B, T, H, K, V, initial_state=initial_state, prior_tensor=initial_state)
    assert_close_to_reference(fn, naive_palimpsa, inputs, tol=1e-9)


@pytest.mark.parametrize("gate", [(-10.0, -8.0), (-1e-4, 0.0)], ids=["strong-decay", "almost-no-decay"])
@pytest.mark.parametrize("beta_max", [0.0, 50.0], ids=["beta0", "large-beta"])
def test_gate_and_importance_extremes(gate, beta_max):
    inputs = make_inputs(2, 40, 2, 6, 5, gate=gate, beta_max=beta_max)
    assert_close_to_reference(CHUNK, naive_palimpsa, inputs, tol=1e-9)


def test_default_chunk_size_and_float32():
    inputs = make_inputs(2, 150, 2, 8, 8, dtype=torch.float32)
    ref = make_inputs(2, 150, 2, 8, 8, dtype=torch.float64)
    o32, (mu32, i32) = chunk_palimpsa(**{n: inputs[n] for n in ("q", "k", "v", "g", "beta")},
                                      prior=inputs["prior"], initial_state=inputs["initial_state"],
                                      output_final_state=True)
    o64, (mu64, i64) = naive_palimpsa(**{n: ref[n] for n in ("q", "k", "v", "g", "beta")},
                                      prior=ref["prior"], initial_state=ref["initial_state"], output_final_state=True)
    assert o32.dtype == torch.float32 and mu32.dtype == torch.float32 and i32.dtype == torch.float32
    assert rel_err(o32, o64) < 1e-5 and rel_err(mu32, mu64) < 1e-5 and rel_err(i32, i64) < 1e-5


def test_low_precision_inputs_keep_float32_states():
    inputs = make_inputs(1, 20, 2, 4, 4, dtype=torch.bfloat16, initial_state=False, prior_tensor=False)
    o, (mu, imp) = chunk_palimpsa(**{n: inputs[n] for n in ("q", "k", "v", "g", "beta")}, output_final_state=True)
    assert o.dtype == torch.bfloat16 and mu.dtype == torch.float32 and imp.dtype == torch.float32


@pytest.mark.parametrize("fn", [CHUNK, RECURRENT, naive_palimpsa], ids=["chunk", "recurrent", "naive"])
def test_varlen_equals_separate_sequences(fn):
    lengths = [5, 17, 1, 30]
    H, K, V = 2, 4, 6
    seqs = [make_inputs(1, L, H, K, V, seed=i) for i, L in enumerate(lengths)]
    prior = seqs[0]["prior"]
    packed = {n: torch.cat([s[n].detach() for s in seqs], 1).requires_grad_() for n in ("q", "k", "v", "g", "beta")}
    init = tuple(torch.cat([s["initial_state"][j].detach() for s in seqs]).requires_grad_() for j in range(2))
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)))
    o, var, (mu, imp) = fn(**packed, prior=prior, initial_state=init, output_final_state=True,
                           output_variance=True, cu_seqlens=cu)
    loss = o.square().sum() + var.sum() + mu.square().sum() + imp.sum()
    grads = torch.autograd.grad(loss, list(packed.values()) + list(init))

    start = 0
    for n_seq, (s, L) in enumerate(zip(seqs, lengths)):
        one = {n: packed[n].detach()[:, start:start + L].clone().requires_grad_() for n in packed}
        one_init = tuple(x.detach()[n_seq:n_seq + 1].clone().requires_grad_() for x in init)
        o1, var1, (mu1, imp1) = naive_palimpsa(**one, prior=prior, initial_state=one_init, output_final_state=True,
                                               output_variance=True)
        assert rel_err(o[:, start:start + L], o1) < 1e-10
        assert rel_err(var[:, start:start + L], var1) < 1e-10
        assert rel_err(mu[n_seq], mu1[0]) < 1e-10 and rel_err(imp[n_seq], imp1[0]) < 1e-10
        loss1 = o1.square().sum() + var1.sum() + mu1.square().sum() + imp1.sum()
        g1 = torch.autograd.grad(loss1, list(one.values()) + list(one_init))
        for ga, gb in zip(grads[:5], g1[:5]):
            assert rel_err(ga[:, start:start + L], gb) < 1e-9
        for ga, gb in zip(grads[5:], g1[5:]):
            assert rel_err(ga[n_seq:n_seq + 1], gb) < 1e-9
        start += L


def test_long_sequence_stays_finite_and_exact():
    """T = 16384 with weak decay in float32: finite everywhere, and the end matches the float64 reference."""
    T, H, K, V = 16384, 1, 4, 4
    inputs = make_inputs(1, T, H, K, V, dtype=torch.float32, gate=(-1e-3, 0.0), initial_state=False,
                         prior_tensor=False)
    args = {n: inputs[n].detach() for n in ("q", "k", "v", "g", "beta")}
    o, var, (mu, imp) = chunk_palimpsa(**args, output_final_state=True, output_variance=True)
    assert torch.isfinite(o).all() and torch.isfinite(var).all() and torch.isfinite(mu).all()
    args64 = {n: a.double() for n, a in args.items()}
    o_ref, (mu_ref, imp_ref) = naive_palimpsa(**args64, output_final_state=True)
    assert rel_err(o[:, T - 64:], o_ref[:, T - 64:]) < 1e-4
    assert rel_err(mu, mu_ref) < 1e-4 and rel_err(imp, imp_ref) < 1e-4


def test_long_sequence_gradients_finite():
    T = 4096
    inputs = make_inputs(1, T, 1, 4, 4, dtype=torch.float32, gate=(-1e-3, 0.0))
    o, _ = CHUNK(**{n: inputs[n] for n in ("q", "k", "v", "g", "beta")}, prior=inputs["prior"],
                 initial_state=inputs["initial_state"])
    grads = torch.autograd.grad(o.square().mean(), [inputs[n] for n in ("q", "k", "v", "g", "beta")])
    assert all(torch.isfinite(gr).all() for gr in grads)


def test_decoding_steps_match_naive():
    """palimpsa_step, applied token by token to a cached state, equals the full recurrence."""
    x = make_inputs(2, 12, 3, 4, 5, initial_state=True)
    args = {n: x[n].detach() for n in ("q", "k", "v", "g", "beta")}
    prior = x["prior"].detach()
    o_ref, var_ref, (mu_ref, imp_ref) = naive_palimpsa(**args, prior=prior, initial_state=tuple(
        s.detach() for s in x["initial_state"]), output_final_state=True, output_variance=True)
    state = tuple(s.detach().clone() for s in x["initial_state"])
    outs, vars_ = [], []
    for t in range(12):
        o_t, var_t = palimpsa_step(*(args[n][:, t] for n in ("q", "k", "v", "g", "beta")), state, prior=prior,
                                   output_variance=True)
        outs.append(o_t)
        vars_.append(var_t)
    assert rel_err(torch.stack(outs, 1), o_ref) < 1e-12 and rel_err(torch.stack(vars_, 1), var_ref) < 1e-12
    assert rel_err(state[0], mu_ref) < 1e-12 and rel_err(state[1], imp_ref) < 1e-12
