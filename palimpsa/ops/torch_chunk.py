"""Chunk-parallel Palimpsa in plain PyTorch (the CPU training path), exact, with a hand-written backward.

Notation (one head, states [K, V]): the importance is split as I_t = I0 + J_t, where
J_t = alpha_t J_{t-1} + k_t^2 outer beta_t.  Both J and M_t = alpha_t M_{t-1} + k_t outer v_t are gated
linear-attention states with the same scalar decay; only the read-out mu_t = M_t / I_t divides.

Forward
  1. chunk-boundary states by matrix products: M_end = G_C M_start + K^T diag(D_t) V (same for J), with
     D_t the decay from after token t to the chunk's end, summed per segment (palimpsa.ops.decay: never a
     difference of cumulative sums, so g = -1e4 or -inf stay exact); a scan over chunks is the only
     sequential part;
  2. outputs: every chunk starts from its chunk-start state and steps through its tokens; all chunks step
     together, so one Python step serves T / C tokens.
  Only the chunk-start (M, J) are kept for the backward: memory O(T (K + V) + (T / C) K V).

Backward
  3. per chunk (in parallel, a cache-sized block of chunks at a time, which also bounds memory): recompute the chunk's states forward
     from its stored start, then walk the chunk backwards with a *local* adjoint that starts at zero at the
     chunk's end; this gives every local gradient and the adjoint reaching the chunk's start;
  4. a reverse scan over chunk boundaries gives the adjoint that enters each chunk from the future;
  5. its effect on each token is rank-structured and is added with matrix products.
  The decay gradient is taken directly, token by token: with A_{t-1} = alpha_t dS_t the adjoint that token t
  hands back to the state before it,
      dg_t = alpha_t <dS_t, S_{t-1}> = <A_{t-1}, M_{t-1}> + <A^J_{t-1}, J_{t-1}>,
  from the recomputed states in step 3, plus the future's share in step 5,
      D_{t-1..C} <carry, S_{t-1}> = G_C <carry, S_start> + sum_{s < t} D_s <carry, k_s v_s^T> (+ J terms).
  Every term is a product of decays and states, so a saturated decay (alpha_t ~ 0) gets a tiny dg with full
  relative accuracy (a reverse cumulative sum of O(1) terms would leave float32 noise), and no state is ever
  rebuilt by dividing by the decay.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from palimpsa.ops.checks import PreparedInputs
from palimpsa.ops.decay import log_decay_to_end
from palimpsa.ops.varlen import pad_sequences, unpad_sequences

DEFAULT_CHUNK_SIZE = 64
# The token loops step a block of chunks at a time; a block's state tensor holds about this many elements,
# small enough to stay in cache (fewer, larger blocks mean fewer Python steps but more memory traffic).
STEP_ELEMENTS = int(os.environ.get("PALIMPSA_STEP_ELEMENTS", 1 << 16))


def _chunk_blocks(num_chunks: int, elements_per_chunk: int):
    """Split range(num_chunks) into contiguous (start, stop) blocks of about STEP_ELEMENTS state elements."""
    per_block = max(1, STEP_ELEMENTS // max(1, elements_per_chunk))
    return [(c0, min(num_chunks, c0 + per_block)) for c0 in range(0, num_chunks, per_block)]


def _to_chunks(x: torch.Tensor, chunk: int) -> torch.Tensor:
    """[N, T, H, *D] -> [C, NC, N, H, *D] (token-in-chunk major, then chunk, contiguous)."""
    N, T, H = x.shape[:3]
    x = x.reshape(N, T // chunk, chunk, H, *x.shape[3:])
    perm = (2, 1, 0, 3) + tuple(range(4, x.dim()))
    return x.permute(*perm).contiguous()


def _from_chunks(x: torch.Tensor) -> torch.Tensor:
    """[C, NC, N, H, *D] -> [N, T, H, *D], contiguous: outputs and gradients leave the op in the layout they came
    in (a strided gradient breaks a traced ``view`` upstream: AOTAutograd's backward of a layer's projection)."""
    C, NC, N, H = x.shape[:4]
    perm = (2, 1, 0, 3) + tuple(range(4, x.dim()))
    return x.permute(*perm).reshape(N, NC * C, H, *x.shape[4:]).contiguous()


def _chunk_boundary_states(k, v, beta, g, M0, J0):
    """Chunk-start states by matrix products and a scan over chunks.

    k: [C, NC, N, H, K]; v, beta: [C, NC, N, H, V]; g: [C, NC, N, H] log decays; M0, J0: [N, H, K, V].
    Returns M_starts, J_starts [NC, N, H, K, V] and the final M, J [N, H, K, V].
    """
    to_end = torch.exp(log_decay_to_end(g, 0))[..., None]  # [C, NC, N, H, 1]
    kw = (k * to_end).permute(1, 2, 3, 4, 0)  # [NC, N, H, K, C]
    k2w = (k * k * to_end).permute(1, 2, 3, 4, 0)
    U_M = kw @ v.permute(1, 2, 3, 0, 4)  # [NC, N, H, K, V]
    U_J = k2w @ beta.permute(1, 2, 3, 0, 4)
    chunk_decay = torch.exp(g.sum(0))[..., None, None]  # [NC, N, H, 1, 1]
    M_starts, J_starts = [], []
    M, J = M0, J0
    for c in range(U_M.shape[0]):
        M_starts.append(M)
        J_starts.append(J)
        M = chunk_decay[c] * M + U_M[c]
        J = chunk_decay[c] * J + U_J[c]
    return torch.stack(M_starts), torch.stack(J_starts), M, J


def _chunk_outputs(q, k, v, beta, alpha, M_starts, J_starts, prior, scale, output_variance):
    """Step a block of chunks through their tokens together.

    q, k: [C, P, K]; v, beta: [C, P, V]; alpha: [C, P]; M_starts, J_starts: [P, K, V]; prior: [P, 1, 1]
    (P = chunks x sequences x heads).  Returns o [C, P, V] and var [C, P, V] or None.
    (Outer products and matrix-vector products are written as broadcast multiplies and reductions: on the
    CPU they beat batched GEMM calls at these tiny sizes.)
    """
    M = M_starts.clone()
    J = J_starts.clone()
    imp = torch.empty_like(M)
    mu = torch.empty_like(M)
    k2 = k * k
    outputs = torch.empty_like(v)
    variances = torch.empty_like(v) if output_variance else None
    for t in range(q.shape[0]):
        a = alpha[t][:, None, None]
        M.mul_(a).addcmul_(k[t][:, :, None], v[t][:, None, :])
        J.mul_(a).addcmul_(k2[t][:, :, None], beta[t][:, None, :])
        torch.add(J, prior, out=imp)
        torch.div(M, imp, out=mu)
        torch.bmm(q[t][:, None, :], mu, out=outputs[t][:, None, :])
        if output_variance:
            torch.bmm((q[t] * q[t])[:, None, :], imp.reciprocal_(), out=variances[t][:, None, :])
    outputs.mul_(scale)
    if output_variance:
        variances.mul_(scale * scale)
    return outputs, variances


def _chunk_local_backward(q, k, v, beta, alpha, do, dvar, M_start, J_start, prior, scale):
    """Recompute one block of chunks and walk it backwards with a zero adjoint at each chunk's end.

    Shapes as in :func:`_chunk_outputs`; do: [C, P, V] (the output gradient); dvar: [C, P, V] or None.
    Returns dq, dk [C, P, K]; dv, dbeta [C, P, V]; dg [C, P] (the chunk-local part of the decay gradient);
    dprior [P]; and the local adjoints reaching the chunk start, dM_start and dJ_start [P, K, V].
    """
    C, P = alpha.shape
    Ms, Js = [], []
    M, J = M_start, J_start
    k2 = k * k
    for t in range(C):
        a = alpha[t][:, None, None]
        M = torch.mul(M, a).addcmul_(k[t][:, :, None], v[t][:, None, :])
        J = torch.mul(J, a).addcmul_(k2[t][:, :, None], beta[t][:, None, :])
        Ms.append(M)
        Js.append(J)

    dq, dk = torch.empty_like(q), torch.empty_like(k)
    dv, dbeta = torch.empty_like(v), torch.empty_like(beta)
    dg = torch.empty_like(alpha)
    neg_dprior_t = torch.empty_like(alpha)
    dM = torch.zeros_like(M_start)
    dJ = torch.zeros_like(J_start)
    s2 = scale * scale
    for t in reversed(range(C)):
        M = Ms[t]
        r_imp = (Js[t] + prior).reciprocal_()
        dmu_r = torch.mul((scale * q[t])[:, :, None], do[t][:, None, :]).mul_(r_imp)  # = dM_direct = dmu / I
        dM.add_(dmu_r)
        neg_d_imp = dmu_r.mul_(M)  # dmu * M / I
        if dvar is not None:
            neg_d_imp.addcmul_(torch.mul((s2 * q[t] * q[t])[:, :, None], dvar[t][:, None, :]), r_imp)
        neg_d_imp.mul_(r_imp)  # minus the direct gradient w.r.t. I_t (= w.r.t. J_t)
        dJ.sub_(neg_d_imp)
        dq_t = scale * (M * r_imp * do[t][:, None, :]).sum(-1)
        if dvar is not None:
            dq_t.addcmul_(2 * s2 * q[t], (r_imp * dvar[t][:, None, :]).sum(-1))
        dq[t] = dq_t
        dk[t] = (dM * v[t][:, None, :]).sum(-1) + 2 * k[t] * (dJ * beta[t][:, None, :]).sum(-1)
        torch.bmm(k[t][:, None, :], dM, out=dv[t][:, None, :])
        torch.bmm(k2[t][:, None, :], dJ, out=dbeta[t][:, None, :])
        neg_dprior_t[t] = neg_d_imp.sum((1, 2))
        a = alpha[t][:, None, None]
        dM.mul_(a)  # now the adjoint handed to the state before token t
        dJ.mul_(a)
        M_before, J_before = (Ms[t - 1], Js[t - 1]) if t > 0 else (M_start, J_start)
        dg[t] = _inner(dM, M_before) + _inner(dJ, J_before)  # = alpha_t <dS_t, S_{t-1}>
    return dq, dk, dv, dbeta, dg, -neg_dprior_t.sum(0), dM, dJ


def _inner(x, y):
    """<x, y> over the state dimensions: x, y [P, K, V] -> [P]."""
    return (x * y).sum((1, 2))


class ChunkPalimpsaFunction(torch.autograd.Function):
    """Exact chunked Palimpsa on (M, J) states; inputs already in the state dtype, T a multiple of C.

    Inputs: q, k [N, T, H, K]; v, beta [N, T, H, V]; g [N, T, H]; prior [H]; M0, J0 [N, H, K, V].
    Outputs: o [N, T, H, V]; var [N, T, H, V] (empty when not asked); M_T, J_T [N, H, K, V].
    """

    @staticmethod
    def forward(ctx, q, k, v, g, beta, prior, M0, J0, scale, chunk, output_variance):
        N, T, H, K = q.shape
        qc, kc, vc, bc = (_to_chunks(x, chunk) for x in (q, k, v, beta))
        gc = _to_chunks(g, chunk)  # [C, NC, N, H]
        M_starts, J_starts, M_T, J_T = _chunk_boundary_states(kc, vc, bc, gc, M0, J0)
        C, NC = qc.shape[:2]
        V = v.shape[-1]
        alpha_c = gc.exp()
        outs, variances = [], []
        for c0, c1 in _chunk_blocks(NC, N * H * K * V):
            P = (c1 - c0) * N * H
            prior_p = prior.reshape(1, 1, H).expand(c1 - c0, N, H).reshape(P, 1, 1)
            o_blk, var_blk = _chunk_outputs(
                qc[:, c0:c1].reshape(C, P, K), kc[:, c0:c1].reshape(C, P, K), vc[:, c0:c1].reshape(C, P, V),
                bc[:, c0:c1].reshape(C, P, V), alpha_c[:, c0:c1].reshape(C, P),
                M_starts[c0:c1].reshape(P, K, V), J_starts[c0:c1].reshape(P, K, V), prior_p, scale, output_variance,
            )
            outs.append(o_blk.reshape(C, c1 - c0, N, H, V))
            variances.append(var_blk.reshape(C, c1 - c0, N, H, V) if output_variance else None)
        o = _from_chunks(torch.cat(outs, 1))
        var = _from_chunks(torch.cat(variances, 1)) if output_variance else o.new_empty(0)
        ctx.save_for_backward(q, k, v, g, beta, prior, M_starts, J_starts, M_T, J_T)
        ctx.scale, ctx.chunk, ctx.output_variance = scale, chunk, output_variance
        return o, var, M_T, J_T

    @staticmethod
    def backward(ctx, do, dvar, dM_T, dJ_T):
        q, k, v, g, beta, prior, M_starts, J_starts, M_T, J_T = ctx.saved_tensors
        scale, chunk = ctx.scale, ctx.chunk
        N, T, H, K = q.shape
        V = v.shape[-1]
        qc, kc, vc, bc = (_to_chunks(x, chunk) for x in (q, k, v, beta))
        gc = _to_chunks(g, chunk)
        C, NC = qc.shape[:2]
        do_c = _to_chunks(do if do is not None else torch.zeros_like(v), chunk)
        dvar_c = _to_chunks(dvar, chunk) if (ctx.output_variance and dvar is not None) else None
        dM_T = torch.zeros_like(M_T) if dM_T is None else dM_T
        dJ_T = torch.zeros_like(J_T) if dJ_T is None else dJ_T

        # Local backward, a block of chunks at a time.
        grads = {name: [] for name in ("dq", "dk", "dv", "dbeta", "dg", "dprior", "dM", "dJ")}
        for c0, c1 in _chunk_blocks(NC, N * H * K * V):
            P = (c1 - c0) * N * H
            flat = lambda x, d: x[:, c0:c1].reshape(C, P, d)  # noqa: E731
            prior_p = prior.reshape(1, 1, H).expand(c1 - c0, N, H).reshape(P, 1, 1)
            out = _chunk_local_backward(
                flat(qc, K), flat(kc, K), flat(vc, V), flat(bc, V), gc[:, c0:c1].exp().reshape(C, P),
                flat(do_c, V), flat(dvar_c, V) if dvar_c is not None else None,
                M_starts[c0:c1].reshape(P, K, V), J_starts[c0:c1].reshape(P, K, V), prior_p, scale,
            )
            for name, value in zip(grads, out):
                grads[name].append(value)
        shape_tok = (C, NC, N, H)
        dq = torch.cat(grads["dq"], 1).reshape(*shape_tok, K)
        dk = torch.cat(grads["dk"], 1).reshape(*shape_tok, K)
        dv = torch.cat(grads["dv"], 1).reshape(*shape_tok, V)
        dbeta = torch.cat(grads["dbeta"], 1).reshape(*shape_tok, V)
        dg = torch.cat(grads["dg"], 1).reshape(*shape_tok)
        dprior = torch.cat(grads["dprior"]).reshape(NC, N, H).sum((0, 1))
        dM_local = torch.cat(grads["dM"]).reshape(NC, N, H, K, V)
        dJ_local = torch.cat(grads["dJ"]).reshape(NC, N, H, K, V)

        # Adjoint entering each chunk from its end (later chunks and the final state).
        chunk_decay = torch.exp(gc.sum(0))[..., None, None]  # [NC, N, H, 1, 1]
        carry_M, carry_J = [None] * NC, [None] * NC
        cM, cJ = dM_T, dJ_T
        for c in reversed(range(NC)):
            carry_M[c], carry_J[c] = cM, cJ
            cM = dM_local[c] + chunk_decay[c] * cM
            cJ = dJ_local[c] + chunk_decay[c] * cJ
        dM0, dJ0 = cM, cJ
        carry_M = torch.stack(carry_M)  # [NC, N, H, K, V]
        carry_J = torch.stack(carry_J)

        # Its effect on every token: adjoint_t += D_t * carry, D_t the decay from after t to the chunk's end.
        to_end = torch.exp(log_decay_to_end(gc, 0))[..., None]  # [C, NC, N, H, 1]
        k2 = kc * kc
        k_carry = torch.einsum("cxnhk,xnhkv->cxnhv", kc, carry_M) * to_end
        carry_v = torch.einsum("xnhkv,cxnhv->cxnhk", carry_M, vc) * to_end
        k2_carry = torch.einsum("cxnhk,xnhkv->cxnhv", k2, carry_J) * to_end
        carry_b = torch.einsum("xnhkv,cxnhv->cxnhk", carry_J, bc) * to_end
        dv = dv + k_carry
        dbeta = dbeta + k2_carry
        dk = dk + carry_v + 2 * kc * carry_b
        # Decay gradient, the carry's share: G_C <carry, S_start> + sum_{s < t} D_s <carry, k_s v_s^T> (+ J).
        start_share = chunk_decay[..., 0, 0] * ((carry_M * M_starts).sum((-1, -2))
                                                + (carry_J * J_starts).sum((-1, -2)))
        writes = (k_carry * vc).sum(-1) + (k2_carry * bc).sum(-1)  # [C, NC, N, H]
        earlier_writes = torch.cat([torch.zeros_like(writes[:1]), writes[:-1].cumsum(0)])
        dg = dg + start_share + earlier_writes
        return (_from_chunks(dq), _from_chunks(dk), _from_chunks(dv), _from_chunks(dg), _from_chunks(dbeta), dprior,
                dM0, dJ0, None, None, None)


def chunk_palimpsa_torch(
    x: PreparedInputs, output_final_state: bool, output_variance: bool, chunk_size: Optional[int] = None
):
    """Run the chunked PyTorch path on checked inputs.

    Returns o [B, T, H, V] (dtype of q), var or None, and the final (mu, I) [N, H, K, V] or None.
    """
    sdtype = x.state_dtype
    q, k, v, g, beta = (t.to(sdtype) for t in (x.q, x.k, x.v, x.g, x.beta))
    lengths = None
    if x.cu_seqlens is not None:
        lengths = (x.cu_seqlens[1:] - x.cu_seqlens[:-1]).tolist()
        q, k, v, g, beta = pad_sequences((q, k, v, g, beta), lengths)
    N, T, H, K = q.shape
    V = v.shape[-1]
    chunk = DEFAULT_CHUNK_SIZE if chunk_size is None else int(chunk_size)
    if chunk < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}")
    chunk = min(chunk, T)
    pad = (-T) % chunk
    if pad:
        # Padded steps have no decay (g = 0) and write nothing (k = beta = 0): the state passes unchanged.
        q, k, v, beta = (torch.nn.functional.pad(t, (0, 0, 0, 0, 0, pad)) for t in (q, k, v, beta))
        g = torch.nn.functional.pad(g, (0, 0, 0, pad))
    prior = x.prior
    if x.initial_state is None:
        M0 = q.new_zeros(N, H, K, V)
        J0 = q.new_zeros(N, H, K, V)
    else:
        mu0, imp0 = x.initial_state
        M0 = mu0 * imp0
        J0 = imp0 - prior[:, None, None]
    o, var, M_T, J_T = ChunkPalimpsaFunction.apply(q, k, v, g, beta, prior, M0, J0, x.scale, chunk, output_variance)
    o = o[:, :T].contiguous()
    var = var[:, :T] if output_variance else None
    if lengths is not None:
        o = unpad_sequences(o, lengths)
        var = unpad_sequences(var, lengths) if output_variance else None
    final = None
    if output_final_state:
        imp_T = J_T + prior[:, None, None]
        final = (M_T / imp_T, imp_T)
    o = o.to(x.q.dtype)
    var = var.to(x.q.dtype) if output_variance else None
    return o, var, final
