"""The CUDA sweep's dg: per-token terms c_t, then a reverse cumulative sum over each sequence (sweep.cu's header).

The terms are computed here from a float64 per-token recurrence and the reference's own dv and dbeta, so that the
identity and ``dg_from_token_terms`` (varlen, initial state, variance, final-state gradient) are checked against
autograd through ``naive_palimpsa`` on any machine; the kernel's share of c_t is checked on the GPU
(scripts/gpu_ops_check.py).
"""

from __future__ import annotations

import pytest
import torch

from palimpsa.ops.naive import naive_palimpsa
from palimpsa.ops.triton.chunk_bwd import dg_from_token_terms
from palimpsa.ops.triton.utils import SequenceLayout
from tests.ops.helpers import make_inputs, named_leaves, rel_err, run_with_grads


def token_terms(inputs, grads, weights, bounds, scale):
    """c [tokens, H] float64: -<dvar, var> - I0 sum(dI local) - <v, dv> - <beta, dbeta> per token and head, the batch
    rows (or packed sequences) given by ``bounds`` over the flattened tokens."""
    flat = lambda x: x.detach().reshape(-1, *x.shape[2:])  # noqa: E731  [B, T, ...] -> [B * T, ...]
    q, k, v, g, beta = (flat(inputs[n]) for n in ("q", "k", "v", "g", "beta"))
    grad = dict(zip([n for n, _ in named_leaves(inputs)], grads))
    dv, dbeta, do, dvar = flat(grad["dv"]), flat(grad["dbeta"]), flat(weights[0]), flat(weights[1])
    prior = inputs["prior"].detach().view(-1, 1, 1)
    mu0, imp0 = (x.detach() for x in inputs["initial_state"])
    c = torch.zeros(q.shape[0], q.shape[1], dtype=torch.float64)
    for n, (bos, eos) in enumerate(bounds):
        M, P = mu0[n] * imp0[n], imp0[n] - prior
        for t in range(bos, eos):
            a = g[t].exp().view(-1, 1, 1)
            P = a * P + k[t, :, :, None] ** 2 * beta[t, :, None, :]
            M = a * M + k[t, :, :, None] * v[t, :, None, :]
            imp = P + prior
            x = scale * q[t, :, :, None] / imp
            di = -x * do[t, :, None, :] * M / imp - x * x * dvar[t, :, None, :]
            var = (scale ** 2 * q[t, :, :, None] ** 2 / imp).sum(1)
            c[t] = (-(dvar[t] * var).sum(-1) - prior.view(-1) * di.sum((1, 2)) - (v[t] * dv[t]).sum(-1)
                    - (beta[t] * dbeta[t]).sum(-1))
    return c


@pytest.mark.parametrize("varlen", [False, True])
@pytest.mark.parametrize("with_final", [False, True])
def test_dg_from_token_terms_matches_autograd(varlen, with_final):
    B, T, H, K, V = (1, 41, 2, 4, 3) if varlen else (2, 23, 2, 4, 3)
    inputs = make_inputs(B, T, H, K, V, gate=(-3.0, 0.0), seed=3)
    if varlen:  # three packed sequences, one initial state each
        cu = torch.tensor([0, 7, 8, 41])
        inputs["initial_state"] = tuple(torch.cat([x.detach()] * 3).requires_grad_() for x in inputs["initial_state"])
        bounds = [(7 * 0, 7), (7, 8), (8, 41)]
    else:
        cu = None
        bounds = [(b * T, (b + 1) * T) for b in range(B)]
    outs, grads, weights = run_with_grads(naive_palimpsa, inputs, final=with_final,
                                          **(dict(cu_seqlens=cu) if varlen else {}))
    c = token_terms(inputs, grads, weights, bounds, K ** -0.5)
    final = dfinal = None
    if with_final:
        final, dfinal = (outs[2].detach(), outs[3].detach()), (weights[2], weights[3])
    layout = SequenceLayout(B, T, cu, torch.device("cpu"))
    prior = inputs["prior"].detach().float()
    dg = dg_from_token_terms(c.float(), layout, B, T, prior, final, dfinal)
    ref = dict(zip([n for n, _ in named_leaves(inputs)], grads))["dg"]
    assert dg.dtype == torch.float32 and dg.shape == ref.shape
    assert rel_err(dg, ref) < 1e-5, rel_err(dg, ref)
    if with_final:  # the final state's term matters: without it dg is off
        assert rel_err(dg_from_token_terms(c.float(), layout, B, T, prior), ref) > 1e-3
