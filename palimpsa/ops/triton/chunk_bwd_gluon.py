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

* sums over K: thread-local over each key part's rows, both parts (K = 96 is 64 + 32 rows) added, then
  log2(LANES_K) butterfly shuffles, one reduction per quantity and token (``_lane_sums``);
* sums over V: thread-local over the VCOLS columns, then log2(32 / LANES_K) butterfly shuffles per key row a
  thread holds (two columns per thread at 16 lanes: one shuffle, against two at 8 lanes of one column);
* no shared memory, no barrier in the token steps; per-token inputs are loaded straight into the lanes that use
  them, or (``INPUTS``, the default where measured faster) staged per chunk in shared memory once and read there by
  every forward and reverse step of the chunk (``_stage_inputs``).

The sweep steps the states as (M, P), P = I - I0 the precision above the prior (see ``_forward``).

As for the output kernel, the source runs as plain Triton under the CPU interpreter
(:mod:`palimpsa.ops.triton.gluon_shim`), where the tests check it against the float64 reference;
``CONFIG.bwd_backend`` chooses it ("auto" runs it on an sm_90 GPU at K = 48, 64, 96 or 128 only where NVRTC cannot be
loaded: the CUDA C++ sweep, palimpsa/ops/cuda/sweep.cu, the same algorithm, was checked and measured faster there).
"""

from __future__ import annotations

import triton.language as tl  # parameter annotations: the interpreter knows only tl.constexpr

from palimpsa.ops.triton.gluon_parts import (allocate_rows, load_cols, load_rows, load_state, locate_unit, masked_if,
                                             reciprocal, shared_view, stage_rows)
from palimpsa.ops.triton.gluon_shim import gl, jit

WARP_LANES = gl.constexpr(32)


@jit
def _forward(mean, exc, kc, vc, betac, decay):
    """One token on a state part (no reciprocal): the new (M, P), P = I - I0 the precision above the prior (its
    step has no prior term: one add per element fewer than I's).  The token's inputs come as broadcast tiles:
    kc [rows, 1], vc, betac and the decay [1, BV]."""
    exc = decay * exc + kc * kc * betac
    mean = decay * mean + kc * vc
    return mean, exc


@jit
def _stage_cols(ptr, dst, tok_h, tok_ok, offs, mask, V: tl.constexpr):
    """The value columns ``offs`` of a [tokens * H, V] tensor at the rows tok_h ([C]), float32, into ``dst``
    [C, 1, BV]; one store."""
    x = gl.load(ptr + gl.expand_dims(tok_h * V, 1) + gl.expand_dims(offs, 0),
                mask=gl.expand_dims(tok_ok, 1) & gl.expand_dims(mask, 0), other=0.0)
    dst.store(gl.expand_dims(x.to(gl.float32), 1))


@jit
def _stage_inputs(q, k, v, g, beta, do, dvar, in_a, in_b, in_c, cs, n_tok, i_v, i_h, scale, H: tl.constexpr,
                  K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, KA: tl.constexpr, KB: tl.constexpr,
                  BV: tl.constexpr, WARPS: tl.constexpr, HAS_B: tl.constexpr, HAS_DVAR: tl.constexpr):
    """A chunk's per-token inputs into shared memory once, float32, in the tiles the steps use, so that every
    forward and reverse step of the chunk reads them there (``INPUTS``) instead of waiting on global loads:
    in_a [2 C, KA, 1] and in_b [2 C, KB, 1] hold q (times the scale; row j) and k (row C + j) of the chunk's token
    j on the two key parts, in_c [4 C, 1, BV] holds v, beta, do and the decay exp(g) (repeated over the columns;
    rows j, C + j, 2 C + j, 3 C + j), and with a variance gradient [8 C, 1, BV] (a power of two) also dvar (row
    4 C + j): 26 kB per program at 760M-like, so that eight one-warp programs fit a multiprocessor.  Tokens at or
    after n_tok are zeros (decay 1), as the masked loads of the direct path give.  Each quantity is one store of
    the whole chunk: the compiler puts a barrier before each (and between a chunk's reads and the next chunk's
    stores), not one per token."""
    stage_rows(q, k, in_a, in_b, cs, n_tok, i_h, scale, H, K, C, KA, KB, WARPS, HAS_B)
    L3C: gl.constexpr = gl.BlockedLayout([1, 1, 1], [32, 1, 1], [WARPS, 1, 1], [2, 1, 0])
    COLS2: gl.constexpr = gl.SliceLayout(1, L3C)
    tok = gl.arange(0, C, layout=gl.SliceLayout(1, COLS2))
    tok_h = gl.cast(cs + tok, gl.int64) * H + i_h
    tok_ok = tok < n_tok
    offs = i_v * BV + gl.arange(0, BV, layout=gl.SliceLayout(0, COLS2))
    _stage_cols(v, in_c.slice(0, C), tok_h, tok_ok, offs, offs < V, V)
    _stage_cols(beta, in_c.slice(C, C), tok_h, tok_ok, offs, offs < V, V)
    _stage_cols(do, in_c.slice(2 * C, C), tok_h, tok_ok, offs, offs < V, V)
    if HAS_DVAR:
        _stage_cols(dvar, in_c.slice(4 * C, C), tok_h, tok_ok, offs, offs < V, V)
    alpha = gl.exp(gl.load(g + tok_h, mask=tok_ok, other=0.0).to(gl.float32))
    in_c.slice(3 * C, C).store(gl.expand_dims(gl.expand_dims(alpha, 1) + gl.zeros([C, BV], gl.float32, COLS2), 1))


@jit
def _part_inputs(q, k, v, g, beta, do, dvar, in_rows, in_c, j, tok_h, offs_k, mask_k, offs_v, mask_v, valid, scale,
                 L: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BACKWARD: tl.constexpr, WITH_DECAY: tl.constexpr,
                 HAS_DVAR: tl.constexpr, INPUTS: tl.constexpr):
    """A token's inputs on one state part (layout L) as float32 broadcast tiles: (qc, kc) [rows, 1] on the key
    rows ``offs_k`` (q times the scale), (vc, betac, doc, dvarc, decay) [1, BV] on the value columns ``offs_v``
    (decay = exp(g), one value repeated), read from the staged chunk (``INPUTS``: its token j, see
    _stage_inputs) or from global memory (zeros and decay 1 when not ``valid``).  A forward step
    (not ``BACKWARD``) needs only k, v, beta and the decay; the others are then placeholders, as is dvarc without
    a variance gradient and the decay without ``WITH_DECAY``.  One function for all of a part's inputs: the CPU
    interpreter pays for every call of a helper."""
    if INPUTS:
        C: gl.constexpr = in_rows.shape[0] // 2
        kc = in_rows.index(C + j).load(L)
        vc = in_c.index(j).load(L)
        betac = in_c.index(C + j).load(L)
        decay = vc
        if WITH_DECAY:
            decay = in_c.index(3 * C + j).load(L)
        qc = kc
        doc = vc
        dvarc = vc
        if BACKWARD:
            qc = in_rows.index(j).load(L)
            doc = in_c.index(2 * C + j).load(L)
            if HAS_DVAR:
                dvarc = in_c.index(4 * C + j).load(L)
    else:
        kc = gl.expand_dims(load_rows(k, tok_h, offs_k, mask_k, valid, K), 1)
        vc = gl.expand_dims(load_cols(v, tok_h, offs_v, mask_v, valid, V), 0)
        betac = gl.expand_dims(load_cols(beta, tok_h, offs_v, mask_v, valid, V), 0)
        decay = vc
        if WITH_DECAY:
            alpha = gl.exp(gl.load(g + tok_h, mask=valid, other=0.0).to(gl.float32))
            decay = gl.expand_dims(gl.where(mask_v, alpha, alpha), 0)
        qc = kc
        doc = vc
        dvarc = vc
        if BACKWARD:
            qc = gl.expand_dims(load_rows(q, tok_h, offs_k, mask_k, valid, K) * scale, 1)
            doc = gl.expand_dims(load_cols(do, tok_h, offs_v, mask_v, valid, V), 0)
            if HAS_DVAR:
                dvarc = gl.expand_dims(load_cols(dvar, tok_h, offs_v, mask_v, valid, V), 0)
    return qc, kc, vc, betac, doc, dvarc, decay


@jit
def _token_forward(mean_a, imp_a, mean_b, imp_b, k, v, g, beta, in_a, in_b, in_c, t, cs, valid, i_h, offs_a, mask_a,
                   offs_b, mask_b, offs_v, mask_v, offs_vb, LA: tl.constexpr, LB: tl.constexpr, H: tl.constexpr,
                   K: tl.constexpr, V: tl.constexpr, HAS_B: tl.constexpr, INPUTS: tl.constexpr):
    """Advance both state parts by token t of the chunk starting at cs (a no-op when not ``valid``)."""
    tok_h = gl.cast(t, gl.int64) * H + i_h
    j = t - cs
    _q, kc, vc, betac, _do, _dvar, decay = _part_inputs(k, k, v, g, beta, v, v, in_a, in_c, j, tok_h, offs_a, mask_a,
                                                        offs_v, mask_v, valid, 1.0, LA, K, V, False, True, False,
                                                        INPUTS)
    mean_a, imp_a = _forward(mean_a, imp_a, kc, vc, betac, decay)
    if HAS_B:
        _q, kc, vc, betac, _do, _dvar, _decay = _part_inputs(k, k, v, g, beta, v, v, in_b, in_c, j, tok_h, offs_b,
                                                             mask_b, offs_vb, offs_vb < V, valid, 1.0, LB, K, V, False,
                                                             False, False, INPUTS)
        mean_b, imp_b = _forward(mean_b, imp_b, kc, vc, betac, gl.convert_layout(decay, LB))
    return mean_a, imp_a, mean_b, imp_b


@jit
def _advance(mean_a, imp_a, mean_b, imp_b, k, v, g, beta, in_a, in_b, in_c, t_start, t_end, cs, i_h, offs_a, mask_a,
             offs_b, mask_b, offs_v, mask_v, offs_vb, LA: tl.constexpr, LB: tl.constexpr, H: tl.constexpr,
             K: tl.constexpr, V: tl.constexpr, HAS_B: tl.constexpr, UNROLL: tl.constexpr, INPUTS: tl.constexpr):
    """Advance both state parts over tokens [t_start, t_end) of the chunk starting at cs, UNROLL tokens per loop
    iteration: their loads do not depend on the state, so the compiler can issue them together instead of
    waiting for each token's."""
    for t in range(t_start, t_end, UNROLL):
        for j in gl.static_range(UNROLL):
            mean_a, imp_a, mean_b, imp_b = _token_forward(
                mean_a, imp_a, mean_b, imp_b, k, v, g, beta, in_a, in_b, in_c, t + j, cs, t + j < t_end, i_h,
                offs_a, mask_a, offs_b, mask_b, offs_v, mask_v, offs_vb, LA, LB, H, K, V, HAS_B, INPUTS)
    return mean_a, imp_a, mean_b, imp_b


@jit
def _lane_sums(x, ROWS: tl.constexpr, LANES_K: tl.constexpr, VCOLS: tl.constexpr, WARPS: tl.constexpr):
    """A state part's [ROWS, BV] tile summed over the key rows each thread holds: [LANES_K, BV], lane i of a
    column group holding the sum of its ROWS / LANES_K rows, and no data exchanged between lanes (the reshape
    splits the rows as the layout already does).  Both key parts give the same layout (the conversion moves
    nothing), so their sums are added before the butterflies over the lanes: one reduction over K per token, not
    one per part."""
    BV: gl.constexpr = VCOLS * WARP_LANES // LANES_K * WARPS
    L3: gl.constexpr = gl.BlockedLayout([1, ROWS // LANES_K, VCOLS], [LANES_K, 1, WARP_LANES // LANES_K],
                                        [1, 1, WARPS], [1, 0, 2])
    LANES: gl.constexpr = gl.SliceLayout(1, gl.BlockedLayout([1, 1, VCOLS], [LANES_K, 1, WARP_LANES // LANES_K],
                                                             [1, 1, WARPS], [1, 0, 2]))
    part = gl.sum(gl.convert_layout(gl.reshape(x, [LANES_K, ROWS // LANES_K, BV]), L3), 1)
    return gl.convert_layout(part, LANES)


@jit
def _backward_part(mean, imp, next_m, next_p, decay_next, qc, kc, vc, betac, doc, dvarc, prior_h, scale,
                   ROWS: tl.constexpr, LANES_K: tl.constexpr, VCOLS: tl.constexpr, WARPS: tl.constexpr,
                   HAS_DVAR: tl.constexpr):
    """Reverse step of one token on one state part of ROWS key rows, (mean, imp) = (M_t, P_t) after the token,
    P = I - I0 (see chunk_bwd.token_backward_part: the same gradients); the token's inputs as broadcast tiles, qc
    and kc [rows, 1] (q times the scale), vc, betac, doc, dvarc [1, BV].  The adjoints arrive as the next token's
    totals (next_m, next_p) before its decay (decay_next, [1, BV]): the decay goes into the fused multiply-add that
    forms this token's totals, and into dg of the next token after its sum, so no element is multiplied by it on
    its own.  The formulas are arranged for the fewest FP32 instructions per element: DI = -DM * mu, dq's scale
    after its sum over V.  The sums over K (dv, dbeta, and the next token's dg before its sum over V and its decay)
    come back per lane (``_lane_sums``, [LANES_K, BV]), for the caller to add over both parts before reducing."""
    dg_next = _lane_sums(next_m * mean + next_p * imp, ROWS, LANES_K, VCOLS, WARPS)
    r = reciprocal(imp + prior_h)
    mu = mean * r
    d_mean = (qc * doc) * r
    if HAS_DVAR:
        dvr = dvarc * r
        d_imp = -(d_mean * mu + (qc * qc) * (dvr * r))
        dq = scale * gl.sum(doc * mu + (2.0 * qc) * dvr, 1)
    else:
        d_imp = -(d_mean * mu)
        dq = scale * gl.sum(doc * mu, 1)
    total_m = decay_next * next_m + d_mean
    total_p = decay_next * next_p + d_imp
    dv = _lane_sums(kc * total_m, ROWS, LANES_K, VCOLS, WARPS)
    dbeta = _lane_sums((kc * kc) * total_p, ROWS, LANES_K, VCOLS, WARPS)
    dk = gl.sum(total_m * vc + (2.0 * kc) * (total_p * betac), 1)
    return total_m, total_p, _lane_sums(d_imp, ROWS, LANES_K, VCOLS, WARPS), dv, dbeta, dk, dq, dg_next


@jit
def _part_token_backward(mean, imp, next_m, next_p, decay_next, q, k, v, beta, do, dvar, dq, dk, in_rows, in_c,
                         j, prior_h, scale, tok_h, valid, offs_k, mask_k, offs_v, mask_v, L: tl.constexpr,
                         K: tl.constexpr, V: tl.constexpr, ROWS: tl.constexpr, LANES_K: tl.constexpr,
                         VCOLS: tl.constexpr, WARPS: tl.constexpr, HAS_DVAR: tl.constexpr, INPUTS: tl.constexpr):
    """Token tok_h's reverse step on one state part (its key rows ``offs_k``, value columns ``offs_v`` in that
    part's layout L): loads the token's inputs, adds dq and dk of these rows atomically; returns this token's
    adjoint totals (not yet decayed: see _backward_part), and this part's sum of DI (for dprior), dv, dbeta and
    share of dg, each per lane (see _lane_sums)."""
    qc, kc, vc, betac, doc, dvarc, _decay = _part_inputs(q, k, v, q, beta, do, dvar, in_rows, in_c, j, tok_h, offs_k,
                                                         mask_k, offs_v, mask_v, valid, scale, L, K, V, True, False,
                                                         HAS_DVAR, INPUTS)
    total_m, total_p, di_t, dv_t, dbeta_t, dk_t, dq_t, dg_next = _backward_part(
        mean, imp, next_m, next_p, decay_next, qc, kc, vc, betac, doc, dvarc, prior_h, scale, ROWS, LANES_K,
        VCOLS, WARPS, HAS_DVAR)
    rows = masked_if(mask_k, valid)
    gl.atomic_add(dq + tok_h * K + offs_k, dq_t, mask=rows, sem="relaxed")
    gl.atomic_add(dk + tok_h * K + offs_k, dk_t, mask=rows, sem="relaxed")
    return total_m, total_p, di_t, dv_t, dbeta_t, dg_next


@jit
def _token_backward(mean_a, imp_a, mean_b, imp_b, adj_m_a, adj_p_a, adj_m_b, adj_p_b, alpha_next, sdi,
                    q, k, v, g, beta, do, dvar, dq, dk, dv, dbeta, dg_part, in_a, in_b, in_c, prior_h, scale, t, cs,
                    valid, eos, i_v, i_h, offs_a, mask_a, offs_b, mask_b, offs_v, mask_v, offs_vb, NTOK,
                    LA: tl.constexpr, LB: tl.constexpr, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                    HAS_B: tl.constexpr, HAS_DVAR: tl.constexpr, INPUTS: tl.constexpr, KA: tl.constexpr,
                    KB: tl.constexpr, LANES_K: tl.constexpr, VCOLS: tl.constexpr, WARPS: tl.constexpr):
    """Reverse step of token t (of the chunk starting at cs) on both parts; writes its gradients and this V
    block's share of dg of token t + 1; returns the adjoints for token t - 1 (see chunk_bwd.token_backward) as
    token t's totals and its decay alpha_t on the value columns, which the step of token t - 1 applies
    (``alpha_next`` there), and the running sum of DI per lane (``sdi``, [LANES_K, BV])."""
    tok_h = gl.cast(t, gl.int64) * H + i_h
    j = t - cs
    COLS: gl.constexpr = gl.SliceLayout(0, LA)
    if INPUTS:
        alpha = in_c.index(3 * (in_a.shape[0] // 2) + j).load(LA)
    else:
        alpha = gl.exp(gl.load(g + tok_h, mask=valid, other=0.0).to(gl.float32))
        alpha = gl.expand_dims(gl.where(mask_v, alpha, alpha), 0)
    adj_m_a, adj_p_a, di_t, dv_t, dbeta_t, dg_next = _part_token_backward(
        mean_a, imp_a, adj_m_a, adj_p_a, alpha_next, q, k, v, beta, do, dvar, dq, dk, in_a, in_c, j, prior_h,
        scale, tok_h, valid, offs_a, mask_a, offs_v, mask_v, LA, K, V, KA, LANES_K, VCOLS, WARPS, HAS_DVAR, INPUTS)
    if HAS_B:
        adj_m_b, adj_p_b, di_b, dv_b, dbeta_b, dg_next_b = _part_token_backward(
            mean_b, imp_b, adj_m_b, adj_p_b, gl.convert_layout(alpha_next, LB), q, k, v, beta, do, dvar,
            dq, dk, in_b, in_c, j, prior_h, scale, tok_h, valid, offs_b, mask_b, offs_vb, offs_vb < V, LB, K, V,
            KB, LANES_K, VCOLS, WARPS, HAS_DVAR, INPUTS)
        # both parts' sums per lane share a layout: added before the butterflies over the lanes
        di_t += di_b
        dv_t += dv_b
        dbeta_t += dbeta_b
        dg_next += dg_next_b
    # the sums over the lanes of K (the value columns end spread as COLS: these conversions move no data)
    dv_t = gl.convert_layout(gl.sum(dv_t, 0), COLS)
    dbeta_t = gl.convert_layout(gl.sum(dbeta_t, 0), COLS)
    dg_next = gl.sum(gl.sum(gl.expand_dims(gl.convert_layout(gl.sum(dg_next, 0), COLS), 0) * alpha_next, 1), 0)
    mv = masked_if(mask_v, valid)
    gl.store(dv + tok_h * V + offs_v, dv_t.to(dv.dtype.element_ty), mask=mv)
    gl.store(dbeta + tok_h * V + offs_v, dbeta_t.to(dbeta.dtype.element_ty), mask=mv)
    # every V block adds its share of dg into one [B*T, H] buffer (48 blocks at V = 192: per-block partial sums
    # would cost more memory than the Triton sweep's); dq and dk are atomic already, so no order is lost
    gl.atomic_add(dg_part + tok_h + H, dg_next, mask=valid & (t + 1 < eos), sem="relaxed")
    return adj_m_a, adj_p_a, adj_m_b, adj_p_b, alpha, sdi + di_t


@jit
def _staged_sub_block(mean_a, imp_a, mean_b, imp_b, adj_m_a, adj_p_a, adj_m_b, adj_p_b, alpha_next, sdi,
                      staged_m_a, staged_i_a, staged_m_b, staged_i_b, q, k, v, g, beta, do, dvar, dq, dk, dv, dbeta,
                      dg_part, in_a, in_b, in_c, prior_h, scale, t0, cs, s, seg_tok, eos, i_v, i_h, offs_a, mask_a,
                      offs_b, mask_b, offs_v, mask_v, offs_vb, NTOK, LA: tl.constexpr, LB: tl.constexpr,
                      H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, HAS_B: tl.constexpr,
                      HAS_DVAR: tl.constexpr, INPUTS: tl.constexpr, KA: tl.constexpr, KB: tl.constexpr,
                      LANES_K: tl.constexpr, VCOLS: tl.constexpr, WARPS: tl.constexpr):
    """A sub-block of four tokens from its first token's state: forward, each token's (M, P) stored in shared
    memory, then the reverse steps on the states read back; returns the adjoints for the token before t0."""
    for j in gl.static_range(4):
        mean_a, imp_a, mean_b, imp_b = _token_forward(
            mean_a, imp_a, mean_b, imp_b, k, v, g, beta, in_a, in_b, in_c, t0 + j, cs, s + j < seg_tok, i_h,
            offs_a, mask_a, offs_b, mask_b, offs_v, mask_v, offs_vb, LA, LB, H, K, V, HAS_B, INPUTS)
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
        adj_m_a, adj_p_a, adj_m_b, adj_p_b, alpha_next, sdi = _token_backward(
            m_a, i_a, m_b, i_b, adj_m_a, adj_p_a, adj_m_b, adj_p_b, alpha_next, sdi,
            q, k, v, g, beta, do, dvar, dq, dk, dv, dbeta, dg_part, in_a, in_b, in_c, prior_h, scale, t0 + j, cs,
            s + j < seg_tok, eos, i_v, i_h, offs_a, mask_a, offs_b, mask_b, offs_v, mask_v, offs_vb, NTOK,
            LA, LB, H, K, V, HAS_B, HAS_DVAR, INPUTS, KA, KB, LANES_K, VCOLS, WARPS)
    return adj_m_a, adj_p_a, adj_m_b, adj_p_b, alpha_next, sdi


@jit
def _direct(mean, imp, kc, qc, vc, betac, doc, dvarc, decay, prior_h, HAS_DVAR: tl.constexpr):
    """One token forward on a state part (M, P = I - I0), then its direct adjoints (DM, DI) from o and the
    variance: returns the new (M, P) and (DM, DI) (see chunk_bwd.direct_adjoints); the token's inputs as the
    broadcast tiles of _part_inputs, its decay [1, BV]."""
    mean, imp = _forward(mean, imp, kc, vc, betac, decay)
    r = reciprocal(imp + prior_h)
    d_mean = (qc * doc) * r
    if HAS_DVAR:
        d_imp = -(d_mean * (mean * r) + (qc * qc) * ((dvarc * r) * r))
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
        q_an, k_an, v_n, beta_n, do_n, dvar_n, _a = _part_inputs(q, k, v, g, beta, do, dvar, q, q, 0, tok_h, offs_a,
                                                                mask_a, offs_v, mask_v, True, scale, LA, K, V, True,
                                                                False, HAS_DVAR, False)
        if HAS_B:
            q_bn, k_bn, v_bn, beta_bn, do_bn, dvar_bn, _b = _part_inputs(q, k, v, g, beta, do, dvar, q, q, 0, tok_h,
                                                                        offs_b, mask_b, offs_vb, mask_vb, True, scale,
                                                                        LB, K, V, True, False, HAS_DVAR, False)
        for t in range(start, end):
            g_t = g_n.to(gl.float32)
            q_a, k_a, v_t, beta_t, do_t, dvar_t = q_an, k_an, v_n, beta_n, do_n, dvar_n
            if HAS_B:
                q_b, k_b, v_b, beta_b, do_b, dvar_b = q_bn, k_bn, v_bn, beta_bn, do_bn, dvar_bn
            tok_n = gl.cast(t + 1, gl.int64) * H + i_h
            ahead = t + 1 < end
            g_n = gl.load(g + tok_n, mask=ahead, other=0.0)
            q_an, k_an, v_n, beta_n, do_n, dvar_n, _a = _part_inputs(q, k, v, g, beta, do, dvar, q, q, 0, tok_n,
                                                                    offs_a, mask_a, offs_v, mask_v, ahead, scale, LA,
                                                                    K, V, True, False, HAS_DVAR, False)
            if HAS_B:
                q_bn, k_bn, v_bn, beta_bn, do_bn, dvar_bn, _b = _part_inputs(q, k, v, g, beta, do, dvar, q, q, 0,
                                                                            tok_n, offs_b, mask_b, offs_vb, mask_vb,
                                                                            ahead, scale, LB, K, V, True, False,
                                                                            HAS_DVAR, False)
            alpha = gl.exp(g_t)
            b_acc += g_t
            weight = gl.exp(b_acc)
            mean_a, imp_a, dm_a, di_a = _direct(mean_a, imp_a, k_a, q_a, v_t, beta_t, do_t, dvar_t,
                                                gl.expand_dims(gl.where(mask_v, alpha, alpha), 0), prior_h, HAS_DVAR)
            acc_m_a += weight * dm_a
            acc_p_a += weight * di_a
            if HAS_B:
                mean_b, imp_b, dm_b, di_b = _direct(mean_b, imp_b, k_b, q_b, v_b, beta_b, do_b, dvar_b,
                                                    gl.expand_dims(gl.where(mask_vb, alpha, alpha), 0), prior_h,
                                                    HAS_DVAR)
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
    STAGE: tl.constexpr, UNROLL: tl.constexpr, INPUTS: tl.constexpr, HAS_INIT: tl.constexpr, HAS_DVAR: tl.constexpr,
    IS_VARLEN: tl.constexpr,
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
    loads are issued together.  INPUTS stages each chunk's per-token inputs in shared memory when the walk reaches
    the chunk (``_stage_inputs``): the four steps per token then read them there instead of from global memory
    (27.2 -> 19.1 ms fwd+bwd at 760M-like on an H200)."""
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
    # the running sum of DI (for dprior), per lane as _lane_sums leaves it
    sdi = gl.zeros([LANES_K, BV], gl.float32, layout=gl.SliceLayout(1, gl.BlockedLayout(
        [1, 1, VCOLS], [LANES_K, 1, WARP_LANES // LANES_K], [1, 1, WARPS], [1, 0, 2])))
    if HAS_B:
        LB: gl.constexpr = gl.BlockedLayout([KB // LANES_K, VCOLS], [LANES_K, WARP_LANES // LANES_K], [1, WARPS],
                                            [0, 1])
        offs_b = KA + gl.arange(0, KB, layout=gl.SliceLayout(1, LB))
        mask_b = offs_b < K
        offs_vb = i_v * BV + gl.arange(0, BV, layout=gl.SliceLayout(0, LB))
        mask_vb = offs_vb < V
        adj_m_b, adj_p_b = load_state(adj_mean, adj_imp, a_off, offs_b, offs_vb, mask_b, mask_vb, V)
        adj_p_b = gl.where(gl.expand_dims(mask_b, 1) & gl.expand_dims(mask_vb, 0), adj_p_b, 0.0)
    else:  # placeholders, never used
        offs_b = offs_a
        mask_b = mask_a
        offs_vb = offs_v
        adj_m_b = adj_m_a
        adj_p_b = adj_p_a
    # the carried adjoints are the totals of the token after the unit with its decay already applied
    alpha_next = gl.expand_dims(gl.where(mask_v, 1.0, 1.0), 0)
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

    if INPUTS:  # a chunk's per-token inputs, staged once per chunk (see _stage_inputs)
        # token-major buffers, a token's key rows (value columns) contiguous; written as whole chunks (rank-3
        # layouts), read a token at a time through views of rank-2 layouts over the same memory
        COLS3: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [2, 1, 0])
        COLS_FIRST: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
        stage_a, in_a, stage_b, in_b = allocate_rows(C, KA, KB, HAS_B)
        stage_c = gl.allocate_shared_memory(gl.float32, [(8 if HAS_DVAR else 4) * C, 1, BV], COLS3)
        in_c = shared_view(stage_c, [(8 if HAS_DVAR else 4) * C, 1, BV], COLS_FIRST)
    else:  # placeholders, never used
        stage_a = q
        stage_b = q
        stage_c = q
        in_a = q
        in_b = q
        in_c = q
    LBX: gl.constexpr = LB if HAS_B else LA

    for cc in range(0, c_count):
        i_c = c_first + c_count - 1 - cc  # chunks of the unit, last first
        cs = bos + i_c * C
        n_tok = gl.minimum(C, eos - cs)
        h_off = ((cbase + i_c) * H + i_h).to(gl.int64) * K * V
        if INPUTS:
            _stage_inputs(q, k, v, g, beta, do, dvar, stage_a, stage_b, stage_c, cs, n_tok, i_v, i_h, scale, H, K, V,
                          C, KA, KB, BV, WARPS, HAS_B, HAS_DVAR)
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
                mean_sa, imp_sa, mean_sb, imp_sb, k, v, g, beta, in_a, in_b, in_c, cs, seg_start, cs, i_h,
                offs_a, mask_a, offs_b, mask_b, offs_v, mask_v, offs_vb, LA, LBX, H, K, V, HAS_B, UNROLL, INPUTS)
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
                            mean_sa, imp_sa, mean_sb, imp_sb, k, v, g, beta, in_a, in_b, in_c, seg_start + 4 * j,
                            seg_start + 4 * j + 4, cs, i_h, offs_a, mask_a, offs_b, mask_b, offs_v, mask_v, offs_vb,
                            LA, LBX, H, K, V, HAS_B, UNROLL, INPUTS)
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
                        mean_sa, imp_sa, mean_sb, imp_sb, k, v, g, beta, in_a, in_b, in_c, seg_start, t0, cs, i_h,
                        offs_a, mask_a, offs_b, mask_b, offs_v, mask_v, offs_vb, LA, LBX, H, K, V, HAS_B, UNROLL,
                        INPUTS)
                if STAGE:
                    adj_m_a, adj_p_a, adj_m_b, adj_p_b, alpha_next, sdi = _staged_sub_block(
                        mean_a, imp_a, mean_b, imp_b, adj_m_a, adj_p_a, adj_m_b, adj_p_b, alpha_next, sdi,
                        staged_m_a, staged_i_a, staged_m_b if HAS_B else staged_m_a,
                        staged_i_b if HAS_B else staged_i_a, q, k, v, g, beta, do, dvar, dq, dk, dv, dbeta, dg_part,
                        in_a, in_b, in_c, prior_h, scale, t0, cs, s, seg_tok, eos, i_v, i_h, offs_a, mask_a, offs_b,
                        mask_b, offs_v, mask_v, offs_vb, NTOK, LA, LBX, H, K, V, HAS_B, HAS_DVAR, INPUTS, KA,
                        KB, LANES_K, VCOLS, WARPS)
                else:
                    # four tokens forward, keeping the states (M, P) after each
                    m0_a, i0_a, m0_b, i0_b = _token_forward(
                        mean_a, imp_a, mean_b, imp_b, k, v, g, beta, in_a, in_b, in_c, t0, cs, s < seg_tok, i_h,
                        offs_a, mask_a, offs_b, mask_b, offs_v, mask_v, offs_vb, LA, LBX, H, K, V, HAS_B, INPUTS)
                    m1_a, i1_a, m1_b, i1_b = _token_forward(
                        m0_a, i0_a, m0_b, i0_b, k, v, g, beta, in_a, in_b, in_c, t0 + 1, cs, s + 1 < seg_tok, i_h,
                        offs_a, mask_a, offs_b, mask_b, offs_v, mask_v, offs_vb, LA, LBX, H, K, V, HAS_B, INPUTS)
                    m2_a, i2_a, m2_b, i2_b = _token_forward(
                        m1_a, i1_a, m1_b, i1_b, k, v, g, beta, in_a, in_b, in_c, t0 + 2, cs, s + 2 < seg_tok, i_h,
                        offs_a, mask_a, offs_b, mask_b, offs_v, mask_v, offs_vb, LA, LBX, H, K, V, HAS_B, INPUTS)
                    m3_a, i3_a, m3_b, i3_b = _token_forward(
                        m2_a, i2_a, m2_b, i2_b, k, v, g, beta, in_a, in_b, in_c, t0 + 3, cs, s + 3 < seg_tok, i_h,
                        offs_a, mask_a, offs_b, mask_b, offs_v, mask_v, offs_vb, LA, LBX, H, K, V, HAS_B, INPUTS)
                    # the same four tokens in reverse
                    adj_m_a, adj_p_a, adj_m_b, adj_p_b, alpha_next, sdi = _token_backward(
                        m3_a, i3_a, m3_b, i3_b, adj_m_a, adj_p_a, adj_m_b, adj_p_b, alpha_next, sdi,
                        q, k, v, g, beta, do, dvar, dq, dk, dv, dbeta, dg_part, in_a, in_b, in_c, prior_h, scale,
                        t0 + 3, cs, s + 3 < seg_tok, eos, i_v, i_h, offs_a, mask_a, offs_b, mask_b, offs_v, mask_v,
                        offs_vb, NTOK, LA, LBX, H, K, V, HAS_B, HAS_DVAR, INPUTS, KA,
                        KB, LANES_K, VCOLS, WARPS)
                    adj_m_a, adj_p_a, adj_m_b, adj_p_b, alpha_next, sdi = _token_backward(
                        m2_a, i2_a, m2_b, i2_b, adj_m_a, adj_p_a, adj_m_b, adj_p_b, alpha_next, sdi,
                        q, k, v, g, beta, do, dvar, dq, dk, dv, dbeta, dg_part, in_a, in_b, in_c, prior_h, scale,
                        t0 + 2, cs, s + 2 < seg_tok, eos, i_v, i_h, offs_a, mask_a, offs_b, mask_b, offs_v, mask_v,
                        offs_vb, NTOK, LA, LBX, H, K, V, HAS_B, HAS_DVAR, INPUTS, KA,
                        KB, LANES_K, VCOLS, WARPS)
                    adj_m_a, adj_p_a, adj_m_b, adj_p_b, alpha_next, sdi = _token_backward(
                        m1_a, i1_a, m1_b, i1_b, adj_m_a, adj_p_a, adj_m_b, adj_p_b, alpha_next, sdi,
                        q, k, v, g, beta, do, dvar, dq, dk, dv, dbeta, dg_part, in_a, in_b, in_c, prior_h, scale,
                        t0 + 1, cs, s + 1 < seg_tok, eos, i_v, i_h, offs_a, mask_a, offs_b, mask_b, offs_v, mask_v,
                        offs_vb, NTOK, LA, LBX, H, K, V, HAS_B, HAS_DVAR, INPUTS, KA,
                        KB, LANES_K, VCOLS, WARPS)
                    adj_m_a, adj_p_a, adj_m_b, adj_p_b, alpha_next, sdi = _token_backward(
                        m0_a, i0_a, m0_b, i0_b, adj_m_a, adj_p_a, adj_m_b, adj_p_b, alpha_next, sdi,
                        q, k, v, g, beta, do, dvar, dq, dk, dv, dbeta, dg_part, in_a, in_b, in_c, prior_h, scale,
                        t0, cs, s < seg_tok, eos, i_v, i_h, offs_a, mask_a, offs_b, mask_b, offs_v, mask_v,
                        offs_vb, NTOK, LA, LBX, H, K, V, HAS_B, HAS_DVAR, INPUTS, KA,
                        KB, LANES_K, VCOLS, WARPS)

    # the first token's totals times its decay: the adjoints of the state before the unit's first token
    adj_m_a = alpha_next * adj_m_a
    adj_p_a = alpha_next * adj_p_a
    if HAS_B:
        decay_b = gl.convert_layout(alpha_next, LB)
        adj_m_b = decay_b * adj_m_b
        adj_p_b = decay_b * adj_p_b
    dprior_sum = gl.sum(gl.sum(sdi, 1), 0)
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
               kernel: str = "sweep", warps: int = 1, stage: int = 0, maxnreg=None, unroll: int = 1, cols: int = 1,
               inputs: bool = False):
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
                     UNROLL=unroll, INPUTS=inputs,
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
                   cols: int = 1, inputs: bool = False) -> dict:
    """Compile (:func:`compile_sm`) and count, in the PTX, shared memory bytes, barriers, reciprocals, shuffles
    and atomic adds; from the SASS, registers and stack (spill) bytes."""
    import re

    import triton

    from palimpsa.bench.sass import resource_report

    compiled = compile_sm(K, V, lanes_k, with_variance, arch, kernel, warps, stage, maxnreg, unroll, cols, inputs)
    ptx = compiled.asm["ptx"]
    resources = resource_report(compiled, 1 if kernel == "local" else warps, kernel)
    return {"shared": int(compiled.metadata.shared), "barriers": len(re.findall(r"\bbar\.sync|\bbarrier\.", ptx)),
            "reciprocals": ptx.count("rcp.approx.ftz.f32"), "shuffles": ptx.count("shfl.sync"),
            "atomics": len(re.findall(r"\batom\.|\bred\.", ptx)), "registers": resources["registers"],
            "stack": resources["stack"], "triton": triton.__version__}
