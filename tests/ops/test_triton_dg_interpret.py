"""The CUDA sweep's dg: per-token terms c_t and per-chunk anchors, summed within each chunk (sweep.cu's header).

The terms and anchors are computed here from their definitions by a float64 per-token recurrence (forward states,
then the adjoints in reverse), so that the identity and ``dg_from_token_terms``'s Triton kernel (run by Triton's
interpreter here: chunks, varlen, initial state, variance, final-state gradient) are checked against autograd through
``naive_palimpsa`` on any machine; the CUDA sweep's own terms are checked on the GPU (scripts/gpu_ops_check.py).
"""

from __future__ import annotations

import pytest
import torch

from palimpsa.ops.naive import naive_palimpsa
from palimpsa.ops.triton.chunk_bwd import dg_from_token_terms
from palimpsa.ops.triton.utils import SequenceLayout
from tests.ops.helpers import make_inputs, named_leaves, rel_err, run_with_grads


def terms_and_anchors(inputs, weights, bounds, scale, chunk, with_final):
    """(c [tokens, H], anchors [chunks, H]) in float64 from the definitions: c_t = <G_t, (M_t, P_t)> - <lambda_t,
    (k_t v_t, k_t^2 beta_t)>, and per chunk <Lambda, (M_end, P_end)> with Lambda the adjoints entering it from after
    its end (from the final state's gradient after a sequence's last token)."""
    flat = lambda x: x.detach().reshape(-1, *x.shape[2:])  # noqa: E731  [B, T, ...] -> [B * T, ...]
    q, k, v, g, beta = (flat(inputs[n]) for n in ("q", "k", "v", "g", "beta"))
    do, dvar = flat(weights[0]), flat(weights[1])
    prior = inputs["prior"].detach().view(-1, 1, 1)
    mu0, imp0 = (x.detach() for x in inputs["initial_state"])
    c = torch.zeros(q.shape[0], q.shape[1], dtype=torch.float64)
    anchors = []
    for n, (bos, eos) in enumerate(bounds):
        M, P = mu0[n] * imp0[n], imp0[n] - prior
        states = []
        for t in range(bos, eos):
            a = g[t].exp().view(-1, 1, 1)
            P = a * P + k[t, :, :, None] ** 2 * beta[t, :, None, :]
            M = a * M + k[t, :, :, None] * v[t, :, None, :]
            states.append((M, P))
        if with_final:  # the final (mu, I)'s gradients as adjoints of (M, P)
            imp = P + prior
            dmu, dimp = weights[2][n], weights[3][n]
            lam_m, lam_p = dmu / imp, dimp - dmu * M / imp ** 2
        else:
            lam_m, lam_p = torch.zeros_like(M), torch.zeros_like(P)
        seq_anchors = {}
        for t in reversed(range(bos, eos)):
            M, P = states[t - bos]
            if (t - bos) % chunk == chunk - 1 or t == eos - 1:  # a chunk's last token: Lambda before its terms
                seq_anchors[(t - bos) // chunk] = (lam_m * M + lam_p * P).sum((1, 2))
            imp = P + prior
            x = scale * q[t, :, :, None] / imp
            gm = x * do[t, :, None, :]
            gp = -gm * M / imp - x * x * dvar[t, :, None, :]
            lam_m, lam_p = lam_m + gm, lam_p + gp
            c[t] = ((gm * M + gp * P).sum((1, 2)) - (lam_m * k[t, :, :, None] * v[t, :, None, :]).sum((1, 2))
                    - (lam_p * k[t, :, :, None] ** 2 * beta[t, :, None, :]).sum((1, 2)))
            a = g[t].exp().view(-1, 1, 1)
            lam_m, lam_p = a * lam_m, a * lam_p
        anchors.extend(seq_anchors[i] for i in range(len(seq_anchors)))
    return c, torch.stack(anchors)


@pytest.mark.parametrize("varlen", [False, True])
@pytest.mark.parametrize("with_final", [False, True])
def test_dg_from_token_terms_matches_autograd(varlen, with_final):
    B, T, H, K, V = (1, 41, 3, 4, 3) if varlen else (2, 23, 3, 4, 3)  # 3 heads: a masked head block
    chunk = 8  # 23 tokens: a partial last chunk; the packed sequences 7, 1 and 33 tokens long
    inputs = make_inputs(B, T, H, K, V, gate=(-3.0, 0.0), seed=3)
    if varlen:  # three packed sequences, one initial state each
        cu = torch.tensor([0, 7, 8, 41])
        inputs["initial_state"] = tuple(torch.cat([x.detach()] * 3).requires_grad_() for x in inputs["initial_state"])
        bounds = [(0, 7), (7, 8), (8, 41)]
    else:
        cu = None
        bounds = [(b * T, (b + 1) * T) for b in range(B)]
    _, grads, weights = run_with_grads(naive_palimpsa, inputs, final=with_final,
                                       **(dict(cu_seqlens=cu) if varlen else {}))
    c, anchors = terms_and_anchors(inputs, weights, bounds, K ** -0.5, chunk, with_final)
    layout = SequenceLayout(B, T, cu, torch.device("cpu"))
    assert anchors.shape[0] == layout.num_chunks(chunk)
    dg = dg_from_token_terms(c.float(), anchors.float(), layout, B, T, chunk)
    ref = dict(zip([n for n, _ in named_leaves(inputs)], grads))["dg"]
    assert dg.dtype == torch.float32 and dg.shape == ref.shape
    assert rel_err(dg, ref) < 1e-5, rel_err(dg, ref)
    # each chunk needs its own anchor: shifted by one chunk, dg is off
    assert rel_err(dg_from_token_terms(c.float(), anchors.float().roll(1, 0), layout, B, T, chunk), ref) > 1e-3
