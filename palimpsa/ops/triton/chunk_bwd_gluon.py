"""The per-channel op's reverse sweep written in Gluon: ``unit_bwd_kernel`` of :mod:`palimpsa.ops.triton.chunk_bwd`
with the [K, BV] state tiles laid out so that no reduction of a token crosses warps.

Same algorithm and outputs as ``unit_bwd_kernel`` (read its docstring and the module's notation first): each
program walks one unit's chunks last first, in segments of 16 tokens and sub-blocks of 4, rebuilding states from
the chunk-start state and stepping 4 tokens forward then in reverse, and every token's reverse step reduces
over K (dv, dbeta), over V (dq, dk, added atomically over the V blocks) and over both (dg).  What changes is the
layout.  Triton's default for a [64, 16] tile with 4 warps split the key rows over warps and the columns over
lanes, so the sums over K went through shared memory with barriers (about 18 per token, at 255 registers with
spills; 39 ms at the 760M-like shape on an H200).  Here one warp owns BV = VCOLS * 32 / LANES_K value columns;
the LANES_K lanes of a column group each hold K / LANES_K consecutive key rows of VCOLS adjacent columns
(``size_per_thread [R // LANES_K, VCOLS]``, ``threads_per_warp [LANES_K, 32 // LANES_K]``, one warp per program):

* sums over K: thread-local, then log2(LANES_K) butterfly shuffles;
* sums over V: thread-local over the VCOLS columns, then log2(32 / LANES_K) butterfly shuffles per key row a
  thread holds (two columns per thread at 16 lanes: one shuffle, against two at 8 lanes of one column);
* no shared memory, no barrier; per-token inputs are loaded straight into the lanes that use them.

The sweep steps the states as (M, P), P = I - I0 the precision above the prior (see ``_forward``).

As for the output kernel, the source runs as plain Triton under the CPU interpreter
(:mod:`palimpsa.ops.triton.gluon_shim`), where the tests check it against the float64 reference;
``CONFIG.bwd_backend`` chooses it ("auto" by default: on an sm_90 GPU at K = 48, 64 or 96, where it was
checked and measured faster).
"""

from __future__ import annotations

import triton.language as tl  # parameter annotations: the interpreter knows only tl.constexpr

from palimpsa.ops.triton.gluon_parts import load_cols, load_rows, load_state, locate_unit, masked_if, reciprocal
from palimpsa.ops.triton.gluon_shim import gl, jit

WARP_LANES = gl.constexpr(32)


@jit
def _forward(mean, exc, k, v, beta, alpha):
    """One token on a state part (no reciprocal): the new (M, P), P = I - I0 the precision above the prior (its
    step has no prior term: one add per element fewer than I's)."""
    kc = gl.expand_dims(k, 1)
    exc = alpha * exc + kc * kc * gl.expand_dims(beta, 0)
    mean = alpha * mean + kc * gl.expand_dims(v, 0)
    return mean, exc


@jit
def _token_forward(mean_a, imp_a, mean_b, imp_b, k, v, g, beta, t, valid, i_h, offs_a, mask_a, offs_b,
                   mask_b, offs_v, mask_v, offs_vb, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                   HAS_B: tl.constexpr):
    """Advance both state parts by token t (a no-op when not ``valid``)."""
    tok_h = gl.cast(t, gl.int64) * H + i_h
    alpha = gl.exp(gl.load(g + tok_h, mask=valid, other=0.0).to(gl.float32))
    mean_a, imp_a = _forward(mean_a, imp_a, load_rows(k, tok_h, offs_a, mask_a, valid, K),
                             load_cols(v, tok_h, offs_v, mask_v, valid, V),
                             load_cols(beta, tok_h, offs_v, mask_v, valid, V), alpha)
    if HAS_B:
        mask_vb = offs_vb < V
        mean_b, imp_b = _forward(mean_b, imp_b, load_rows(k, tok_h, offs_b, mask_b, valid, K),
                                 load_cols(v, tok_h, offs_vb, mask_vb, valid, V),
                                 load_cols(beta, tok_h, offs_vb, mask_vb, valid, V), alpha)
    return mean_a, imp_a, mean_b, imp_b


@jit
def _advance(mean_a, imp_a, mean_b, imp_b, k, v, g, beta, t_start, t_end, i_h, offs_a, mask_a, offs_b,
             mask_b, offs_v, mask_v, offs_vb, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
             HAS_B: tl.constexpr, UNROLL: tl.constexpr):
    """Advance both state parts over tokens [t_start, t_end), UNROLL tokens per loop iteration: their loads do
    not depend on the state, so the compiler can issue them together instead of waiting for each token's."""
    for t in range(t_start, t_end, UNROLL):
        for j in gl.static_range(UNROLL):
            mean_a, imp_a, mean_b, imp_b = _token_forward(
                mean_a, imp_a, mean_b, imp_b, k, v, g, beta, t + j, t + j < t_end, i_h, offs_a, mask_a,
                offs_b, mask_b, offs_v, mask_v, offs_vb, H, K, V, HAS_B)
    return mean_a, imp_a, mean_b, imp_b


@jit
def _backward_part(mean, imp, next_m, next_p, alpha_next, sdi, q, k, v_t, beta_t, do_t, dvar_t, prior_h, scale,
                   HAS_DVAR: tl.constexpr):
    """Reverse step of one token on one state part, (mean, imp) = (M_t, P_t) after the token, P = I - I0 (see
    chunk_bwd.token_backward_part: the same gradients).  q carries the scale already.  The adjoints arrive as the
    next token's totals (next_m, next_p) before its decay alpha_next: the decay goes into the fused multiply-add
    that forms this token's totals, and into dg of the next token after its sum, so no element is multiplied by
    it on its own.  The formulas are arranged for the fewest FP32 instructions per element: DI = -DM * mu, the
    sums over V of dq and dk taken before their per-row factors (scale, 2 q, 2 k)."""
    dg_next = alpha_next * gl.sum(gl.sum(next_m * mean + next_p * imp, 1), 0)
    r = reciprocal(imp + prior_h)
    mu = mean * r
    qc = gl.expand_dims(q, 1)
    do_c = gl.expand_dims(do_t, 0)
    d_mean = (qc * do_c) * r
    if HAS_DVAR:
        dvr = gl.expand_dims(dvar_t, 0) * r
        d_imp = -(d_mean * mu + (qc * qc) * (dvr * r))
        dq = scale * (gl.sum(do_c * mu, 1) + (2.0 * q) * gl.sum(dvr, 1))
    else:
        d_imp = -(d_mean * mu)
        dq = scale * gl.sum(do_c * mu, 1)
    total_m = alpha_next * next_m + d_mean
    total_p = alpha_next * next_p + d_imp
    kc = gl.expand_dims(k, 1)
    dv = gl.sum(kc * total_m, 0)
    dbeta = gl.sum((kc * kc) * total_p, 0)
    dk = gl.sum(total_m * gl.expand_dims(v_t, 0) + (2.0 * kc) * (total_p * gl.expand_dims(beta_t, 0)), 1)
    return total_m, total_p, sdi + d_imp, dv, dbeta, dk, dq, dg_next


@jit
def _load_token(q, k, v, beta, do, dvar, tok_h, offs_k, mask_k, offs_v, mask_v, valid, scale, K: tl.constexpr,
                V: tl.constexpr, HAS_DVAR: tl.constexpr):
    """A token's inputs on one state part, float32: q (times the scale) and k on the key rows ``offs_k``; v,
    beta, do and dvar (do without a variance gradient) on the value columns ``offs_v``."""
    v_t = load_cols(v, tok_h, offs_v, mask_v, valid, V)
    beta_t = load_cols(beta, tok_h, offs_v, mask_v, valid, V)
    do_t = load_cols(do, tok_h, offs_v, mask_v, valid, V)
    dvar_t = do_t
    if HAS_DVAR:
        dvar_t = load_cols(dvar, tok_h, offs_v, mask_v, valid, V)
    q_t = load_rows(q, tok_h, offs_k, mask_k, valid, K) * scale
    k_t = load_rows(k, tok_h, offs_k, mask_k, valid, K)
    return q_t, k_t, v_t, beta_t, do_t, dvar_t


@jit
def _part_token_backward(mean, imp, next_m, next_p, alpha_next, sdi, q, k, v, beta, do, dvar, dq, dk, prior_h, scale,
                         tok_h, valid, offs_k, mask_k, offs_v, mask_v, K: tl.constexpr, V: tl.constexpr,
                         HAS_DVAR: tl.constexpr):
    """Token tok_h's reverse step on one state part (its key rows ``offs_k``, value columns ``offs_v`` in that
    part's layout): loads the token's inputs, adds dq and dk of these rows atomically; returns this token's
    adjoint totals (not yet decayed: see _backward_part), the running sum of DI, and this part's dv, dbeta and
    share of dg."""
    q_t, k_t, v_t, beta_t, do_t, dvar_t = _load_token(q, k, v, beta, do, dvar, tok_h, offs_k, mask_k, offs_v, mask_v,
                                                     valid, scale, K, V, HAS_DVAR)
    total_m, total_p, sdi, dv_t, dbeta_t, dk_t, dq_t, dg_next = _backward_part(
        mean, imp, next_m, next_p, alpha_next, sdi, q_t, k_t, v_t, beta_t, do_t, dvar_t, prior_h, scale, HAS_DVAR)
    rows = masked_if(mask_k, valid)
    gl.atomic_add(dq + tok_h * K + offs_k, dq_t, mask=rows, sem="relaxed")
    gl.atomic_add(dk + tok_h * K + offs_k, dk_t, mask=rows, sem="relaxed")
    return total_m, total_p, sdi, dv_t, dbeta_t, dg_next


@jit
def _token_backward(mean_a, imp_a, mean_b, imp_b, adj_m_a, adj_p_a, adj_m_b, adj_p_b, alpha_next, sdi_a, sdi_b,
                    q, k, v, g, beta, do, dvar, dq, dk, dv, dbeta, dg_part, prior_h, scale, t, valid, eos, i_v,
                    i_h, offs_a, mask_a, offs_b, mask_b, offs_v, mask_v, offs_vb, NTOK, COLS: tl.constexpr,
                    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, HAS_B: tl.constexpr,
                    HAS_DVAR: tl.constexpr):
    """Reverse step of token t on both parts; writes its gradients and this V block's share of dg of token t + 1;
    returns the adjoints for token t - 1 (see chunk_bwd.token_backward) as token t's totals and its decay alpha_t,
    which the step of token t - 1 applies (``alpha_next`` there)."""
    tok_h = gl.cast(t, gl.int64) * H + i_h
    alpha = gl.exp(gl.load(g + tok_h, mask=valid, other=0.0).to(gl.float32))
    adj_m_a, adj_p_a, sdi_a, dv_t, dbeta_t, dg_next = _part_token_backward(
        mean_a, imp_a, adj_m_a, adj_p_a, alpha_next, sdi_a, q, k, v, beta, do, dvar, dq, dk, prior_h, scale, tok_h,
        valid, offs_a, mask_a, offs_v, mask_v, K, V, HAS_DVAR)
    if HAS_B:
        adj_m_b, adj_p_b, sdi_b, dv_b, dbeta_b, dg_next_b = _part_token_backward(
            mean_b, imp_b, adj_m_b, adj_p_b, alpha_next, sdi_b, q, k, v, beta, do, dvar, dq, dk, prior_h, scale,
            tok_h, valid, offs_b, mask_b, offs_vb, offs_vb < V, K, V, HAS_DVAR)
        # the value columns are spread alike in both parts: these conversions move no data
        dv_t += gl.convert_layout(dv_b, COLS)
        dbeta_t += gl.convert_layout(dbeta_b, COLS)
        dg_next += dg_next_b
    mv = masked_if(mask_v, valid)
    gl.store(dv + tok_h * V + offs_v, dv_t.to(dv.dtype.element_ty), mask=mv)
    gl.store(dbeta + tok_h * V + offs_v, dbeta_t.to(dbeta.dtype.element_ty), mask=mv)
    # every V block adds its share of dg into one [B*T, H] buffer (48 blocks at V = 192: per-block partial sums
    # would cost more memory than the Triton sweep's); dq and dk are atomic already, so no order is lost
    gl.atomic_add(dg_part + tok_h + H, dg_next, mask=valid & (t + 1 < eos), sem="relaxed")
    return adj_m_a, adj_p_a, adj_m_b, adj_p_b, alpha, sdi_a, sdi_b


@jit
def _staged_sub_block(mean_a, imp_a, mean_b, imp_b, adj_m_a, adj_p_a, adj_m_b, adj_p_b, alpha_next, sdi_a, sdi_b,
                      staged_m_a, staged_i_a, staged_m_b, staged_i_b, q, k, v, g, beta, do, dvar, dq, dk, dv, dbeta,
                      dg_part, prior_h, scale, t0, s, seg_tok, eos, i_v, i_h, offs_a, mask_a, offs_b, mask_b, offs_v,
                      mask_v, offs_vb, NTOK, LA: tl.constexpr, LB: tl.constexpr, COLS: tl.constexpr,
                      H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, HAS_B: tl.constexpr,
                      HAS_DVAR: tl.constexpr):
    """A sub-block of four tokens from its first token's state: forward, each token's (M, P) stored in shared
    memory, then the reverse steps on the states read back; returns the adjoints for the token before t0."""
    for j in gl.static_range(4):
        mean_a, imp_a, mean_b, imp_b = _token_forward(
            mean_a, imp_a, mean_b, imp_b, k, v, g, beta, t0 + j, s + j < seg_tok, i_h,
            offs_a, mask_a, offs_b, mask_b, offs_v, mask_v, offs_vb, H, K, V, HAS_B)
        staged_m_a.index(j).store(mean_a)
        staged_i_a.index(j).store(imp_a)
        if HAS_B:
            staged_m_b.index(j).store(mean_b)
            staged_i_b.index(j).store(imp_b)
    for jj in gl.static_range(4):
        j = 3 - jj
        m_a = staged_m_a.index(j).load(LA)
        i_a = staged_i_a.index(j).load(LA)
        m_b = m_a
        i_b = i_a
        if HAS_B:
            m_b = staged_m_b.index(j).load(LB)
            i_b = staged_i_b.index(j).load(LB)
        adj_m_a, adj_p_a, adj_m_b, adj_p_b, alpha_next, sdi_a, sdi_b = _token_backward(
            m_a, i_a, m_b, i_b, adj_m_a, adj_p_a, adj_m_b, adj_p_b, alpha_next, sdi_a, sdi_b,
            q, k, v, g, beta, do, dvar, dq, dk, dv, dbeta, dg_part, prior_h, scale, t0 + j,
            s + j < seg_tok, eos, i_v, i_h, offs_a, mask_a, offs_b, mask_b, offs_v, mask_v, offs_vb, NTOK,
            COLS, H, K, V, HAS_B, HAS_DVAR)
    return adj_m_a, adj_p_a, adj_m_b, adj_p_b, alpha_next, sdi_a, sdi_b


@jit
def _direct(mean, imp, k, q, v, beta, do_t, dvar_t, alpha, prior_h, HAS_DVAR: tl.constexpr):
    """One token forward on a state part (M, P = I - I0), then its direct adjoints (DM, DI) from o and the
    variance: returns the new (M, P) and (DM, DI) (see chunk_bwd.direct_adjoints)."""
    mean, imp = _forward(mean, imp, k, v, beta, alpha)
    r = reciprocal(imp + prior_h)
    qc = gl.expand_dims(q, 1)
    d_mean = (qc * gl.expand_dims(do_t, 0)) * r
    if HAS_DVAR:
        d_imp = -(d_mean * (mean * r) + (qc * qc) * ((gl.expand_dims(dvar_t, 0) * r) * r))
    else:
        d_imp = -(d_mean * (mean * r))  # DI = -DM * mu: see _backward_part
    return mean, imp, d_mean, d_imp


@jit
def unit_local_adjoint_gluon_kernel(
    q, k, v, g, beta, prior, h_mean, h_imp, adj_mean, adj_imp, unit_decay, do, dvar,
    cu_seqlens, unit_indices, unit_offsets, chunk_offsets, scale, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, U: tl.constexpr,
    KA: tl.constexpr, KB: tl.constexpr, LANES_K: tl.constexpr, VCOLS: tl.constexpr, HAS_DVAR: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    """``unit_local_adjoint_kernel`` with the sweep's layout (grid (V blocks of VCOLS * 32 / LANES_K, units, H), one
    warp):
    adj_*[unit] = sum over the unit of exp(b_t - b_start) (DM_t, DI_t); unit_decay[unit, h] = b at the unit's
    end.  The first unit of each sequence is skipped (not needed).  Element-wise only: no reduction at all."""
    BV: gl.constexpr = VCOLS * WARP_LANES // LANES_K
    LA: gl.constexpr = gl.BlockedLayout([KA // LANES_K, VCOLS], [LANES_K, WARP_LANES // LANES_K], [1, 1], [0, 1])
    HAS_B: gl.constexpr = KB > 0
    W: gl.constexpr = C * U
    i_v = gl.program_id(0)
    i_u = gl.program_id(1)
    i_h = gl.program_id(2)
    i_n, i_w, bos, eos, cbase = locate_unit(i_u, unit_indices, cu_seqlens, chunk_offsets, T, C, W, IS_VARLEN)
    if i_w > 0:
        start = bos + i_w * W
        end = gl.minimum(start + W, eos)
        offs_a = gl.arange(0, KA, layout=gl.SliceLayout(1, LA))
        mask_a = offs_a < K
        offs_v = i_v * BV + gl.arange(0, BV, layout=gl.SliceLayout(0, LA))
        mask_v = offs_v < V
        prior_h = gl.load(prior + i_h).to(gl.float32)
        h_off = ((cbase + i_w * U) * H + i_h).to(gl.int64) * K * V
        mean_a, imp_a = load_state(h_mean, h_imp, h_off, offs_a, offs_v, mask_a, mask_v, V)
        imp_a -= prior_h  # (M, P): see _forward
        acc_m_a = gl.zeros([KA, BV], gl.float32, layout=LA)
        acc_p_a = gl.zeros([KA, BV], gl.float32, layout=LA)
        if HAS_B:
            LB: gl.constexpr = gl.BlockedLayout([KB // LANES_K, VCOLS], [LANES_K, WARP_LANES // LANES_K], [1, 1],
                                                [0, 1])
            offs_b = KA + gl.arange(0, KB, layout=gl.SliceLayout(1, LB))
            mask_b = offs_b < K
            offs_vb = i_v * BV + gl.arange(0, BV, layout=gl.SliceLayout(0, LB))
            mask_vb = offs_vb < V
            mean_b, imp_b = load_state(h_mean, h_imp, h_off, offs_b, offs_vb, mask_b, mask_vb, V)
            imp_b -= prior_h
            acc_m_b = gl.zeros([KB, BV], gl.float32, layout=LB)
            acc_p_b = gl.zeros([KB, BV], gl.float32, layout=LB)
        # the log decay from the unit's start, a float32 scalar 0 to begin with (g may be -inf: never g * 0)
        b_acc = (start * 0).to(gl.float32)
        # each token's inputs are loaded one token ahead (the loop carries them), so that their loads run while
        # the token before is computed: the pass is otherwise bound by the latency of these loads
        tok_h = gl.cast(start, gl.int64) * H + i_h
        g_n = gl.load(g + tok_h)
        q_an, k_an, v_n, beta_n, do_n, dvar_n = _load_token(q, k, v, beta, do, dvar, tok_h, offs_a, mask_a, offs_v,
                                                           mask_v, True, scale, K, V, HAS_DVAR)
        if HAS_B:
            q_bn, k_bn, v_bn, beta_bn, do_bn, dvar_bn = _load_token(q, k, v, beta, do, dvar, tok_h, offs_b, mask_b,
                                                                   offs_vb, mask_vb, True, scale, K, V, HAS_DVAR)
        for t in range(start, end):
            g_t = g_n.to(gl.float32)
            q_a, k_a, v_t, beta_t, do_t, dvar_t = q_an, k_an, v_n, beta_n, do_n, dvar_n
            if HAS_B:
                q_b, k_b, v_b, beta_b, do_b, dvar_b = q_bn, k_bn, v_bn, beta_bn, do_bn, dvar_bn
            tok_n = gl.cast(t + 1, gl.int64) * H + i_h
            ahead = t + 1 < end
            g_n = gl.load(g + tok_n, mask=ahead, other=0.0)
            q_an, k_an, v_n, beta_n, do_n, dvar_n = _load_token(q, k, v, beta, do, dvar, tok_n, offs_a, mask_a, offs_v,
                                                               mask_v, ahead, scale, K, V, HAS_DVAR)
            if HAS_B:
                q_bn, k_bn, v_bn, beta_bn, do_bn, dvar_bn = _load_token(q, k, v, beta, do, dvar, tok_n, offs_b,
                                                                       mask_b, offs_vb, mask_vb, ahead, scale, K, V,
                                                                       HAS_DVAR)
            alpha = gl.exp(g_t)
            b_acc += g_t
            weight = gl.exp(b_acc)
            mean_a, imp_a, dm_a, di_a = _direct(mean_a, imp_a, k_a, q_a, v_t, beta_t, do_t, dvar_t, alpha, prior_h,
                                                HAS_DVAR)
            acc_m_a += weight * dm_a
            acc_p_a += weight * di_a
            if HAS_B:
                mean_b, imp_b, dm_b, di_b = _direct(mean_b, imp_b, k_b, q_b, v_b, beta_b, do_b, dvar_b, alpha,
                                                    prior_h, HAS_DVAR)
                acc_m_b += weight * dm_b
                acc_p_b += weight * di_b
        a_off = (i_u * H + i_h).to(gl.int64) * K * V
        tile_a = gl.expand_dims(offs_a, 1) * V + gl.expand_dims(offs_v, 0)
        m_a = gl.expand_dims(mask_a, 1) & gl.expand_dims(mask_v, 0)
        gl.store(adj_mean + a_off + tile_a, acc_m_a, mask=m_a)
        gl.store(adj_imp + a_off + tile_a, acc_p_a, mask=m_a)
        if HAS_B:
            tile_b = gl.expand_dims(offs_b, 1) * V + gl.expand_dims(offs_vb, 0)
            m_b = gl.expand_dims(mask_b, 1) & gl.expand_dims(mask_vb, 0)
            gl.store(adj_mean + a_off + tile_b, acc_m_b, mask=m_b)
            gl.store(adj_imp + a_off + tile_b, acc_p_b, mask=m_b)
        if i_v == 0:
            gl.store(unit_decay + i_u * H + i_h, b_acc)


@jit
def unit_bwd_gluon_kernel(
    q, k, v, g, beta, prior, h_mean, h_imp, adj_mean, adj_imp, mu0, imp0, do, dvar,
    dq, dk, dv, dbeta, dg_part, dprior, dmu0, dimp0,
    cu_seqlens, unit_indices, unit_offsets, chunk_offsets, scale, T, NTOK,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, U: tl.constexpr,
    KA: tl.constexpr, KB: tl.constexpr, LANES_K: tl.constexpr, VCOLS: tl.constexpr, WARPS: tl.constexpr,
    STAGE: tl.constexpr, UNROLL: tl.constexpr, HAS_INIT: tl.constexpr, HAS_DVAR: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """Grid (V blocks of BV = VCOLS * 32 / LANES_K * WARPS, units, H), WARPS warps each side by side over the
    value columns, each thread holding VCOLS adjacent columns of K / LANES_K key rows: the reverse sweep over one
    unit.  VCOLS = 2 halves the rows a thread holds for the same registers, so that per-row work (a token's q and k
    converted and squared) and the shuffles of the sums over V are shared by two columns.  With one warp no
    reduction of a token crosses warps; with more, the sums over V (dq, dk, dg) go through shared memory, and WARPS
    times fewer blocks add dq and dk atomically.  Buffers
    as ``unit_bwd_kernel``'s: dq, dk float32 [B*T, H, K] (atomic adds over V blocks); dv, dbeta [B*T, H, V];
    dg_part [1, B*T, H] zero-initialised (every V block adds into it atomically); dprior [NV, units, H]; dmu0,
    dimp0 [N, H, K, V].  STAGE = 1 keeps the states (M, P) after each of a sub-block's four tokens in shared memory
    between its forward and reverse steps, instead of in registers (each thread reads back what it wrote, K-fastest
    so that a thread's rows go as 16-byte vectors without bank conflicts; the compiler still puts a few barriers per
    sub-block, cheap in a one-warp program): no spills at 760M-like under Triton 3.6, where the registers path
    spills 400 bytes.  STAGE = 2 also keeps the state at each sub-block's
    start, from one forward pass over the segment, instead of stepping again from the segment's start for every
    sub-block: 2.25 forward steps per token instead of 3 (chunks of 32: the segment's start 0.5, the sub-block
    starts 0.75 instead of 1.5, the sub-block 1).  UNROLL (1, 2 or 4): tokens per iteration of the loops that
    rebuild a state by stepping forward (2 of the 3 forward steps per token at stage 0), so that those tokens'
    loads are issued together."""
    BV: gl.constexpr = VCOLS * WARP_LANES // LANES_K * WARPS
    LA: gl.constexpr = gl.BlockedLayout([KA // LANES_K, VCOLS], [LANES_K, WARP_LANES // LANES_K], [1, WARPS],
                                        [0, 1])
    ROWS_A: gl.constexpr = gl.SliceLayout(1, LA)
    COLS: gl.constexpr = gl.SliceLayout(0, LA)
    HAS_B: gl.constexpr = KB > 0
    W: gl.constexpr = C * U
    SEG: gl.constexpr = 16
    i_v = gl.program_id(0)
    i_u = gl.program_id(1)
    i_h = gl.program_id(2)
    i_n, i_w, bos, eos, cbase = locate_unit(i_u, unit_indices, cu_seqlens, chunk_offsets, T, C, W, IS_VARLEN)
    n_chunks = gl.cdiv(eos - bos, C)
    c_first = i_w * U
    c_count = gl.minimum(c_first + U, n_chunks) - c_first
    prior_h = gl.load(prior + i_h).to(gl.float32)
    offs_a = gl.arange(0, KA, layout=ROWS_A)
    mask_a = offs_a < K
    offs_v = i_v * BV + gl.arange(0, BV, layout=COLS)
    mask_v = offs_v < V
    a_off = (i_u * H + i_h).to(gl.int64) * K * V
    adj_m_a, adj_p_a = load_state(adj_mean, adj_imp, a_off, offs_a, offs_v, mask_a, mask_v, V)
    adj_p_a = gl.where(gl.expand_dims(mask_a, 1) & gl.expand_dims(mask_v, 0), adj_p_a, 0.0)
    sdi_a = gl.zeros([KA, BV], gl.float32, layout=LA)
    if HAS_B:
        LB: gl.constexpr = gl.BlockedLayout([KB // LANES_K, VCOLS], [LANES_K, WARP_LANES // LANES_K], [1, WARPS],
                                            [0, 1])
        offs_b = KA + gl.arange(0, KB, layout=gl.SliceLayout(1, LB))
        mask_b = offs_b < K
        offs_vb = i_v * BV + gl.arange(0, BV, layout=gl.SliceLayout(0, LB))
        mask_vb = offs_vb < V
        adj_m_b, adj_p_b = load_state(adj_mean, adj_imp, a_off, offs_b, offs_vb, mask_b, mask_vb, V)
        adj_p_b = gl.where(gl.expand_dims(mask_b, 1) & gl.expand_dims(mask_vb, 0), adj_p_b, 0.0)
        sdi_b = gl.zeros([KB, BV], gl.float32, layout=LB)
    else:  # placeholders, never used
        offs_b = offs_a
        mask_b = mask_a
        offs_vb = offs_v
        adj_m_b = adj_m_a
        adj_p_b = adj_p_a
        sdi_b = sdi_a
    # the carried adjoints are the totals of the token after the unit with its decay already applied
    alpha_next = (i_h * 0 + 1).to(gl.float32)
    if STAGE:
        STAGED: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0, 1])
        staged_m_a = gl.allocate_shared_memory(gl.float32, [4, KA, BV], STAGED)
        staged_i_a = gl.allocate_shared_memory(gl.float32, [4, KA, BV], STAGED)
        if HAS_B:
            staged_m_b = gl.allocate_shared_memory(gl.float32, [4, KB, BV], STAGED)
            staged_i_b = gl.allocate_shared_memory(gl.float32, [4, KB, BV], STAGED)
        if STAGE == 2:  # the states at the segment's sub-block starts
            start_m_a = gl.allocate_shared_memory(gl.float32, [SEG // 4, KA, BV], STAGED)
            start_i_a = gl.allocate_shared_memory(gl.float32, [SEG // 4, KA, BV], STAGED)
            if HAS_B:
                start_m_b = gl.allocate_shared_memory(gl.float32, [SEG // 4, KB, BV], STAGED)
                start_i_b = gl.allocate_shared_memory(gl.float32, [SEG // 4, KB, BV], STAGED)

    for cc in range(0, c_count):
        i_c = c_first + c_count - 1 - cc  # chunks of the unit, last first
        cs = bos + i_c * C
        n_tok = gl.minimum(C, eos - cs)
        h_off = ((cbase + i_c) * H + i_h).to(gl.int64) * K * V
        n_seg = gl.cdiv(n_tok, SEG)
        for ss in range(0, n_seg):
            seg = n_seg - 1 - ss  # segments of the chunk, last first
            seg_start = cs + seg * SEG
            seg_tok = gl.minimum(SEG, n_tok - seg * SEG)
            mean_sa, imp_sa = load_state(h_mean, h_imp, h_off, offs_a, offs_v, mask_a, mask_v, V)
            imp_sa -= prior_h  # the sweep steps (M, P), P = I - I0: see _forward
            mean_sb = mean_sa
            imp_sb = imp_sa
            if HAS_B:
                mean_sb, imp_sb = load_state(h_mean, h_imp, h_off, offs_b, offs_vb, mask_b, offs_vb < V, V)
                imp_sb -= prior_h
            mean_sa, imp_sa, mean_sb, imp_sb = _advance(
                mean_sa, imp_sa, mean_sb, imp_sb, k, v, g, beta, cs, seg_start, i_h,
                offs_a, mask_a, offs_b, mask_b, offs_v, mask_v, offs_vb, H, K, V, HAS_B, UNROLL)
            n_sub = gl.cdiv(seg_tok, 4)
            if STAGE == 2:  # one pass over the segment keeps every sub-block's first state
                for j in range(0, n_sub):
                    start_m_a.index(j).store(mean_sa)
                    start_i_a.index(j).store(imp_sa)
                    if HAS_B:
                        start_m_b.index(j).store(mean_sb)
                        start_i_b.index(j).store(imp_sb)
                    if j + 1 < n_sub:
                        mean_sa, imp_sa, mean_sb, imp_sb = _advance(
                            mean_sa, imp_sa, mean_sb, imp_sb, k, v, g, beta, seg_start + 4 * j,
                            seg_start + 4 * j + 4, i_h, offs_a, mask_a, offs_b, mask_b, offs_v, mask_v, offs_vb, H, K,
                            V, HAS_B, UNROLL)
            for jj in range(0, n_sub):
                s = (n_sub - 1 - jj) * 4  # sub-blocks of 4 tokens, last first
                t0 = seg_start + s
                if STAGE == 2:
                    mean_a = start_m_a.index(n_sub - 1 - jj).load(LA)
                    imp_a = start_i_a.index(n_sub - 1 - jj).load(LA)
                    mean_b = mean_a
                    imp_b = imp_a
                    if HAS_B:
                        mean_b = start_m_b.index(n_sub - 1 - jj).load(LB)
                        imp_b = start_i_b.index(n_sub - 1 - jj).load(LB)
                else:
                    mean_a, imp_a, mean_b, imp_b = _advance(
                        mean_sa, imp_sa, mean_sb, imp_sb, k, v, g, beta, seg_start, t0, i_h,
                        offs_a, mask_a, offs_b, mask_b, offs_v, mask_v, offs_vb, H, K, V, HAS_B, UNROLL)
                if STAGE:
                    adj_m_a, adj_p_a, adj_m_b, adj_p_b, alpha_next, sdi_a, sdi_b = _staged_sub_block(
                        mean_a, imp_a, mean_b, imp_b, adj_m_a, adj_p_a, adj_m_b, adj_p_b, alpha_next, sdi_a, sdi_b,
                        staged_m_a, staged_i_a, staged_m_b if HAS_B else staged_m_a,
                        staged_i_b if HAS_B else staged_i_a, q, k, v, g, beta, do, dvar, dq, dk, dv, dbeta, dg_part,
                        prior_h, scale, t0, s, seg_tok, eos, i_v, i_h, offs_a, mask_a, offs_b, mask_b, offs_v,
                        mask_v, offs_vb, NTOK, LA, LB if HAS_B else LA, COLS, H, K, V, HAS_B, HAS_DVAR)
                else:
                    # four tokens forward, keeping the states (M, P) after each
                    m0_a, i0_a, m0_b, i0_b = _token_forward(
                        mean_a, imp_a, mean_b, imp_b, k, v, g, beta, t0, s < seg_tok, i_h,
                        offs_a, mask_a, offs_b, mask_b, offs_v, mask_v, offs_vb, H, K, V, HAS_B)
                    m1_a, i1_a, m1_b, i1_b = _token_forward(
                        m0_a, i0_a, m0_b, i0_b, k, v, g, beta, t0 + 1, s + 1 < seg_tok, i_h,
                        offs_a, mask_a, offs_b, mask_b, offs_v, mask_v, offs_vb, H, K, V, HAS_B)
                    m2_a, i2_a, m2_b, i2_b = _token_forward(
                        m1_a, i1_a, m1_b, i1_b, k, v, g, beta, t0 + 2, s + 2 < seg_tok, i_h,
                        offs_a, mask_a, offs_b, mask_b, offs_v, mask_v, offs_vb, H, K, V, HAS_B)
                    m3_a, i3_a, m3_b, i3_b = _token_forward(
                        m2_a, i2_a, m2_b, i2_b, k, v, g, beta, t0 + 3, s + 3 < seg_tok, i_h,
                        offs_a, mask_a, offs_b, mask_b, offs_v, mask_v, offs_vb, H, K, V, HAS_B)
                    # the same four tokens in reverse
                    adj_m_a, adj_p_a, adj_m_b, adj_p_b, alpha_next, sdi_a, sdi_b = _token_backward(
                        m3_a, i3_a, m3_b, i3_b, adj_m_a, adj_p_a, adj_m_b, adj_p_b, alpha_next, sdi_a, sdi_b,
                        q, k, v, g, beta, do, dvar, dq, dk, dv, dbeta, dg_part, prior_h, scale, t0 + 3,
                        s + 3 < seg_tok, eos, i_v, i_h, offs_a, mask_a, offs_b, mask_b, offs_v, mask_v, offs_vb, NTOK,
                        COLS, H, K, V, HAS_B, HAS_DVAR)
                    adj_m_a, adj_p_a, adj_m_b, adj_p_b, alpha_next, sdi_a, sdi_b = _token_backward(
                        m2_a, i2_a, m2_b, i2_b, adj_m_a, adj_p_a, adj_m_b, adj_p_b, alpha_next, sdi_a, sdi_b,
                        q, k, v, g, beta, do, dvar, dq, dk, dv, dbeta, dg_part, prior_h, scale, t0 + 2,
                        s + 2 < seg_tok, eos, i_v, i_h, offs_a, mask_a, offs_b, mask_b, offs_v, mask_v, offs_vb, NTOK,
                        COLS, H, K, V, HAS_B, HAS_DVAR)
                    adj_m_a, adj_p_a, adj_m_b, adj_p_b, alpha_next, sdi_a, sdi_b = _token_backward(
                        m1_a, i1_a, m1_b, i1_b, adj_m_a, adj_p_a, adj_m_b, adj_p_b, alpha_next, sdi_a, sdi_b,
                        q, k, v, g, beta, do, dvar, dq, dk, dv, dbeta, dg_part, prior_h, scale, t0 + 1,
                        s + 1 < seg_tok, eos, i_v, i_h, offs_a, mask_a, offs_b, mask_b, offs_v, mask_v, offs_vb, NTOK,
                        COLS, H, K, V, HAS_B, HAS_DVAR)
                    adj_m_a, adj_p_a, adj_m_b, adj_p_b, alpha_next, sdi_a, sdi_b = _token_backward(
                        m0_a, i0_a, m0_b, i0_b, adj_m_a, adj_p_a, adj_m_b, adj_p_b, alpha_next, sdi_a, sdi_b,
                        q, k, v, g, beta, do, dvar, dq, dk, dv, dbeta, dg_part, prior_h, scale, t0,
                        s < seg_tok, eos, i_v, i_h, offs_a, mask_a, offs_b, mask_b, offs_v, mask_v, offs_vb, NTOK,
                        COLS, H, K, V, HAS_B, HAS_DVAR)

    # the first token's totals times its decay: the adjoints of the state before the unit's first token
    adj_m_a = alpha_next * adj_m_a
    adj_p_a = alpha_next * adj_p_a
    if HAS_B:
        adj_m_b = alpha_next * adj_m_b
        adj_p_b = alpha_next * adj_p_b
    dprior_sum = gl.sum(gl.sum(sdi_a, 1), 0)
    if HAS_B:
        dprior_sum += gl.sum(gl.sum(sdi_b, 1), 0)
    if HAS_INIT:
        if i_w == 0:
            s_off = (i_n * H + i_h).to(gl.int64) * K * V
            tile_a = gl.expand_dims(offs_a, 1) * V + gl.expand_dims(offs_v, 0)
            m_a = gl.expand_dims(mask_a, 1) & gl.expand_dims(mask_v, 0)
            mu_init = gl.load(mu0 + s_off + tile_a, mask=m_a, other=0.0)
            imp_init = gl.load(imp0 + s_off + tile_a, mask=m_a, other=0.0)
            gl.store(dmu0 + s_off + tile_a, adj_m_a * imp_init, mask=m_a)
            gl.store(dimp0 + s_off + tile_a, adj_m_a * mu_init + adj_p_a, mask=m_a)
            dprior_sum -= gl.sum(gl.sum(adj_p_a, 1), 0)
            # dg of the first token: the adjoint it handed back times the initial (M, P) (zero without one)
            dg_first = gl.sum(gl.sum(adj_m_a * (mu_init * imp_init) + adj_p_a * (imp_init - prior_h), 1), 0)
            if HAS_B:
                tile_b = gl.expand_dims(offs_b, 1) * V + gl.expand_dims(offs_vb, 0)
                m_b = gl.expand_dims(mask_b, 1) & gl.expand_dims(offs_vb < V, 0)
                mu_init_b = gl.load(mu0 + s_off + tile_b, mask=m_b, other=0.0)
                imp_init_b = gl.load(imp0 + s_off + tile_b, mask=m_b, other=0.0)
                gl.store(dmu0 + s_off + tile_b, adj_m_b * imp_init_b, mask=m_b)
                gl.store(dimp0 + s_off + tile_b, adj_m_b * mu_init_b + adj_p_b, mask=m_b)
                dprior_sum -= gl.sum(gl.sum(adj_p_b, 1), 0)
                dg_first += gl.sum(gl.sum(adj_m_b * (mu_init_b * imp_init_b) + adj_p_b * (imp_init_b - prior_h), 1), 0)
            gl.atomic_add(dg_part + gl.cast(bos, gl.int64) * H + i_h, dg_first, sem="relaxed")
    gl.store(dprior + (i_v * gl.num_programs(1) + i_u) * H + i_h, dprior_sum)


def gluon_sweep_block_v(lanes_k: int, warps: int = 1, cols: int = 1) -> int:
    """Value columns per program of the Gluon sweep: the lanes of a warp not spent on key rows, times the columns
    each thread holds, times the warps."""
    if lanes_k not in (1, 2, 4, 8, 16, 32):
        raise ValueError(f"bwd_lanes_k must be a power of two from 1 to 32, got {lanes_k}")
    if warps not in (1, 2, 4, 8):
        raise ValueError(f"bwd_warps must be 1, 2, 4 or 8, got {warps}")
    if cols not in (1, 2, 4):
        raise ValueError(f"bwd_cols must be 1, 2 or 4, got {cols}")
    return cols * 32 // lanes_k * warps


def compile_sm(K: int, V: int, lanes_k: int = 8, with_variance: bool = False, arch: int = 90,
               kernel: str = "sweep", warps: int = 1, stage: int = 0, maxnreg=None, unroll: int = 1, cols: int = 1):
    """The sweep (``kernel="sweep"``, ``warps`` warps per program) or the local-adjoint pass (``"local"``, one
    warp) compiled for an NVIDIA GPU of compute capability ``arch`` without a GPU, at H = 16 heads (Triton's
    compiled kernel).  A development and test tool, run with TRITON_INTERPRET off (see
    chunk_fwd_gluon.compile_sm)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    from palimpsa.ops.triton.utils import k_parts

    names = ("q", "k", "v", "g", "beta", "prior", "h_mean", "h_imp", "adj_mean", "adj_imp", "mu0", "imp0", "do",
             "dvar", "dq", "dk", "dv", "dbeta", "dg_part", "dprior", "dmu0", "dimp0", "cu_seqlens", "unit_indices",
             "unit_offsets", "chunk_offsets", "scale", "T", "NTOK")
    types = {n: "*bf16" for n in ("q", "k", "v", "beta", "do", "dvar", "dv", "dbeta")}
    types.update({n: "*i32" for n in ("cu_seqlens", "unit_indices", "unit_offsets", "chunk_offsets")})
    types.update(scale="fp32", T="i32", NTOK="i32")
    types.update({n: "*fp32" for n in names if n not in types})
    KA, KB = k_parts(K)
    constants = dict(H=16, K=K, V=V, C=32, U=4, KA=KA, KB=KB, LANES_K=lanes_k, VCOLS=cols, WARPS=warps, STAGE=stage,
                     UNROLL=unroll,
                     HAS_INIT=False,
                     HAS_DVAR=with_variance, IS_VARLEN=False)
    if kernel == "local":
        names = ("q", "k", "v", "g", "beta", "prior", "h_mean", "h_imp", "adj_mean", "adj_imp", "unit_decay", "do",
                 "dvar", "cu_seqlens", "unit_indices", "unit_offsets", "chunk_offsets", "scale", "T")
        types["unit_decay"] = "*fp32"
        constants = {n: constants[n] for n in ("H", "K", "V", "C", "U", "KA", "KB", "LANES_K", "VCOLS", "HAS_DVAR",
                                               "IS_VARLEN")}
    elif kernel != "sweep":
        raise ValueError(f"kernel must be 'sweep' or 'local', got {kernel!r}")
    signature = {name: types[name] for name in names}
    signature.update({name: "constexpr" for name in constants})
    aligned = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(names) if types[name].startswith("*")}
    fn = unit_local_adjoint_gluon_kernel if kernel == "local" else unit_bwd_gluon_kernel
    source = GluonASTSource(fn, signature, constants, aligned)
    num_warps = 1 if kernel == "local" else warps
    options = {"num_warps": num_warps, **({} if maxnreg is None else {"maxnreg": maxnreg})}
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def compile_report(K: int, V: int, lanes_k: int = 8, with_variance: bool = False, arch: int = 90,
                   kernel: str = "sweep", warps: int = 1, stage: int = 0, maxnreg=None, unroll: int = 1,
                   cols: int = 1) -> dict:
    """Compile (:func:`compile_sm`) and count, in the PTX, shared memory bytes, barriers, reciprocals, shuffles
    and atomic adds; from the SASS, registers and stack (spill) bytes."""
    import re

    import triton

    from palimpsa.bench.sass import resource_report

    compiled = compile_sm(K, V, lanes_k, with_variance, arch, kernel, warps, stage, maxnreg, unroll, cols)
    ptx = compiled.asm["ptx"]
    resources = resource_report(compiled, 1 if kernel == "local" else warps, kernel)
    return {"shared": int(compiled.metadata.shared), "barriers": len(re.findall(r"\bbar\.sync|\bbarrier\.", ptx)),
            "reciprocals": ptx.count("rcp.approx.ftz.f32"), "shuffles": ptx.count("shfl.sync"),
            "atomics": len(re.findall(r"\batom\.|\bred\.", ptx)), "registers": resources["registers"],
            "stack": resources["stack"], "triton": triton.__version__}
