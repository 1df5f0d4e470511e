// The per-channel op's reverse sweep in CUDA C++ (compiled at run time by NVRTC: palimpsa/ops/cuda/sweep.py).
//
// Same algorithm and buffers as unit_bwd_gluon_kernel (palimpsa/ops/triton/chunk_bwd_gluon.py; notation in
// palimpsa/ops/triton/chunk_bwd.py), except that dg_part and dg_anchor hold the terms of dg (below): one unit of
// chunks (C = PC tokens) walked last chunk first, its states rebuilt from the chunk-start states, the adjoints (dM, dP)
// carried in reverse, every gradient written per token.  What the C++ gives that the Gluon source could not:
//  * each thread's state elements are explicit registers, so every sum over a thread's elements is a chain of fused
//    multiply-adds, and nothing spills.  PKLANES 32 (K a multiple of 32): the key rows lane + 32 i (i < R = K / 32) of
//    4 value columns, so that dq and dk leave the thread summed over its columns, as coalesced atomic adds over the
//    value blocks; PKLANES 16: K / 16 adjacent key rows of 2 value columns, dq and dk summed per PDQK tokens over the
//    two column lanes in shared memory first;
//  * the sums across lanes are collected in shared memory and reduced once, one lane per output: dv and dbeta per
//    sub-block of 4 tokens (a row of 32 or 16 values a lane instead of butterfly levels per token); the dg terms of the
//    4 tokens take one transposed butterfly;
//  * a block of PWARPS warps (4 * PWARPS value columns of one head and unit) stages a chunk's inputs in shared memory
//    once for all its warps (every load issued before any store), each warp keeps its segment's sub-block start
//    states there (2.25 forward steps per token), and the next chunk's start state is copied there with cp.async
//    while the current chunk runs;
//  * where a chunk's decay allows (common.cuh's ChunkDecays), its states step scaled by 1 / A_j, A_j the decay from
//    the chunk's start through token j: P~ += k^2 (beta / A_j), M~ += k (v / A_j), two instructions per element and
//    forward step instead of four.  The reverse step then reads I0 / A_j, so that 1 / I~ = A_j / I and mu = M~ / I~
//    comes out unscaled, and carries its adjoints scaled by A_j: lambda~_j = lambda~_{j+1} + A_j G_j, no decay per
//    element (backward_token).  Chunks with saturated or infinite log decays step directly;
//  * dg needs no sum over the state elements per token.  With P = I - I0 and M both gated linear recurrences in g, and
//    G_t the gradient that token t's read-out sends to its state,
//        dg_t = sum_{s >= t} c_s,   c_s = <G_s, (M_s, P_s)> - <lambda_s, (k_s v_s, k_s^2 beta_s)>
//    (lambda_s the adjoint total at token s; the initial state is included).  With mu = M / I the read-out's part of
//    <G_s, (M_s, P_s)> is -I0 sum(DI_s) - <dvar_s, var_s> (its M part cancels), and the second term is <v_s, dv_s> +
//    <beta_s, dbeta_s>, so c_s costs one sum per token, which the sweep adds into dg_part.  The sum over s beyond a
//    chunk's end is <Lambda, (M_end, P_end)>, Lambda the adjoints entering the chunk from after it (from the final
//    state's gradient at a sequence's end): the sweep adds it into dg_anchor once per chunk, so that the host's sums
//    (chunk_bwd.py, dg_from_token_terms) run over one chunk's terms at most and float32 rounding does not accumulate
//    along the sequence.  The read-out's scale is staged with do (and its square with dvar).
//
// Compile-time parameters (#defines prepended by sweep.py): PK, PV, PH (key size, value size, heads), PC (chunk),
// PU (chunks per unit), PWARPS, PBLOCKS (blocks a multiprocessor is to hold: launch bounds), PSEG (tokens per segment,
// a multiple of 4 dividing PC), PCKFIRST (a sub-block's checkpoint holds its state after its first token, not before),
// PKLANES (16 or 32 lanes over K, common.cuh), PCOMPACT and PSTARTSLOT (below), PPAIRS (32 lanes: dq and dk interleaved in one
// float32 buffer, dq at even and dk at odd addresses, each row's two sums one vector atomic add), PDQK (with 16 lanes:
// tokens whose dq and dk are summed over lanes at a time: 2, or 4 with a sub-block's reverse steps in one stretch of
// code), PIN, PG, PDO
// (dtypes of q, k, v, beta, dv, dbeta; of g; of do and dvar: 0 bfloat16, 1 float16, 2 float32), PDVAR (a variance
// gradient is given), PINIT (an initial state is given), PVARLEN, PALIGNED (16-byte vector loads allowed),
// PSHARED_BYTES (the host's dynamic shared memory, checked against the layout).  Requires PK % 16 == 0 and PV % (4 *
// PWARPS) == 0 (the host checks).

#define BV (4 * PWARPS)
#define NQS (PDVAR ? 4 : 3)  // the staged value-column rows: v / A_j, beta / A_j, do, (dvar)
static_assert(PC == 32, "a chunk's decays are scanned one token a lane (ChunkDecays)");
static_assert(PDQK == 2 || PDQK == 4, "dq and dk are summed per 2 or 4 tokens");
#define NSUB (PSEG / 4)
#define W_TOKENS (PC * PU)
#define CK_VEC ((E % 4 == 0) ? 4 : 2)
// the sums over K of a sub-block: 16 (PKLANES 16) or 32 (PKLANES 32) quantities of 32 lanes, each row padded so that
// a warp's stores (and, with 32, 16-byte loads of its own row by each lane) meet no bank conflict
// PCOMPACT (32 lanes over K only): the dv and dbeta sums of a sub-block are collected 2 tokens at a time (16 rows
// instead of 32), and the segment's last sub-block starts from the pass's own registers (no checkpoint slot): less
// shared memory a warp, so that more warps fit a block
#define RED1_SLOTS (PKLANES == 16 ? 16 : (PCOMPACT ? 16 : 32))
#define RED1_STRIDE (PKLANES == 16 ? 33 : 36)
static_assert(PKLANES == 16 || PKLANES == 32, "16 or 32 lanes over K");
static_assert(PKLANES == 32 || (!PCOMPACT && !PPAIRS), "compact shared memory and dq/dk pairs need 32 lanes over K");
#define CK_SLOTS (PCOMPACT ? NSUB - 1 : NSUB)
// PSTARTSLOT (compact shared memory, one segment a chunk): the chunk-start state has no buffer of its own; it is read
// from (and the next chunk's fetched into) the last checkpoint slot, which a full chunk's pass fills last and its
// reverse walk frees first (a checkpoint slot and the start buffer have the same layout where CW == CK_VEC == 4)
static_assert(!PSTARTSLOT || (PCOMPACT && PSEG == PC && CW == 4 && NSUB >= 2),
              "the chunk start in a checkpoint slot needs the compact layout, one segment a chunk and 4 columns a thread");
static_assert(PK % PKLANES == 0, "K a multiple of the lanes over it");

// This thread's key rows of a staged row of PK floats: rows row0 + i (PKLANES 16, row0 = 16-lane index times R), or
// row0 + 32 i (PKLANES 32, row0 = the lane: a warp's loads fall on 32 banks)
__device__ __forceinline__ int krow(int row0, int i) { return PKLANES == 16 ? row0 + i : row0 + 32 * i; }

__device__ __forceinline__ void load_krows(const float* src, int row0, float (&x)[R]) {
#if PKLANES == 16
    load_rows(src + row0, x);
#else
#pragma unroll
    for (int i = 0; i < R; ++i) x[i] = src[row0 + 32 * i];
#endif
}

// CW adjacent floats (8- or 16-byte aligned) into registers
__device__ __forceinline__ void load_cols(const float* src, float (&x)[CW]) {
#if CW == 2
    const float2 t = *reinterpret_cast<const float2*>(src);
    x[0] = t.x; x[1] = t.y;
#else
    const float4 t = *reinterpret_cast<const float4*>(src);
    x[0] = t.x; x[1] = t.y; x[2] = t.z; x[3] = t.w;
#endif
}

// A thread's state pair (M, P) at checkpoint slot `slot` of its warp's buffer: [slot][M or P][E / CK_VEC][lane]
// vectors of CK_VEC floats, so that each store or load of a warp covers consecutive bytes (no bank conflicts).
__device__ __forceinline__ void save_state(float* ck, int slot, int lane, const float (&M)[E], const float (&P)[E]) {
#pragma unroll
    for (int e = 0; e < E; e += CK_VEC) {
        float* m = ck + ((slot * 2 + 0) * (E / CK_VEC) + e / CK_VEC) * 32 * CK_VEC + lane * CK_VEC;
        float* p = ck + ((slot * 2 + 1) * (E / CK_VEC) + e / CK_VEC) * 32 * CK_VEC + lane * CK_VEC;
#if CK_VEC == 4
        *reinterpret_cast<float4*>(m) = make_float4(M[e], M[e + 1], M[e + 2], M[e + 3]);
        *reinterpret_cast<float4*>(p) = make_float4(P[e], P[e + 1], P[e + 2], P[e + 3]);
#else
        *reinterpret_cast<float2*>(m) = make_float2(M[e], M[e + 1]);
        *reinterpret_cast<float2*>(p) = make_float2(P[e], P[e + 1]);
#endif
    }
}

__device__ __forceinline__ void load_state(const float* ck, int slot, int lane, float (&M)[E], float (&P)[E]) {
#pragma unroll
    for (int e = 0; e < E; e += CK_VEC) {
        const float* m = ck + ((slot * 2 + 0) * (E / CK_VEC) + e / CK_VEC) * 32 * CK_VEC + lane * CK_VEC;
        const float* p = ck + ((slot * 2 + 1) * (E / CK_VEC) + e / CK_VEC) * 32 * CK_VEC + lane * CK_VEC;
#if CK_VEC == 4
        float4 a = *reinterpret_cast<const float4*>(m), b = *reinterpret_cast<const float4*>(p);
        M[e] = a.x; M[e + 1] = a.y; M[e + 2] = a.z; M[e + 3] = a.w;
        P[e] = b.x; P[e + 1] = b.y; P[e + 2] = b.z; P[e + 3] = b.w;
#else
        float2 a = *reinterpret_cast<const float2*>(m), b = *reinterpret_cast<const float2*>(p);
        M[e] = a.x; M[e + 1] = a.y;
        P[e] = b.x; P[e + 1] = b.y;
#endif
    }
}

// Shared memory of a block, in floats: the chunk's q and k rows [PC][PK] each, its value-column inputs [PC][NQS][BV]
// (v / A_j, beta / A_j, do times the scale, dvar times its square and 1 / A_j), its decays [PC][4] (a_j,
// I0 / A_j, A_j, 1 / A_j); then per warp: the sub-block start states [CK_SLOTS][2][E][32], the chunk-start state
// [2][R][32][CW] (copied from global memory asynchronously while the chunk before is processed), the sums over K of a
// sub-block [RED1_SLOTS][RED1_STRIDE] and, with 16 lanes over K, its sums over V for PDQK tokens [PDQK][2][2][PK].
#define SQ_OFF 0
#define SK_OFF (PC * PK)
#define SIN_OFF (2 * PC * PK)
#define SA_OFF (SIN_OFF + PC * NQS * BV)
#define WARP_OFF (SA_OFF + 4 * PC)
#define CK_FLOATS (CK_SLOTS * 2 * E * 32)
#define RED1_FLOATS (RED1_SLOTS * RED1_STRIDE)
#define RED2_FLOATS (PKLANES == 16 ? 4 * PDQK * PK : 0)
#define START_FLOATS (PSTARTSLOT ? 0 : 2 * E * 32)
#define WARP_FLOATS (CK_FLOATS + START_FLOATS + RED1_FLOATS + RED2_FLOATS)
#define SHARED_FLOATS (WARP_OFF + PWARPS * WARP_FLOATS)
// the host's size of the dynamic shared memory (PSHARED_BYTES) must be this layout's
static_assert(SHARED_FLOATS * 4 == PSHARED_BYTES, "the host's shared-memory size differs from the kernel's layout");

struct Ctx {
    const float* sq;
    const float* sk;
    const float* sin;
    const float* sa;
    float I0;
    int lane, vl, row0, ccol;  // row0: krow's; ccol: this thread's first column within the block's BV
};

template <bool B>
struct Scaled {
    static constexpr bool value = B;
};

// One token forward on a thread's elements (no reciprocal): P = a P + k^2 beta, M = a M + k v; SCALED: the states
// scaled by 1 / A_j (the decay from the chunk's start through token j), P~ += k^2 beta / A_j, M~ += k v / A_j.
template <bool SCALED>
__device__ __forceinline__ void forward_token(const Ctx& c, int j, float (&M)[E], float (&P)[E]) {
    float kr[R], vv[CW], bb[CW];
    load_krows(c.sk + j * PK, c.row0, kr);
    // v / A_j and beta / A_j (1 / A_j = 1 in a chunk that steps directly)
    load_cols(c.sin + (j * NQS + 0) * BV + c.ccol, vv);
    load_cols(c.sin + (j * NQS + 1) * BV + c.ccol, bb);
#pragma unroll
    for (int i = 0; i < R; ++i) {
        const float kk = kr[i] * kr[i];
#pragma unroll
        for (int cc = 0; cc < CW; ++cc) {
            const int e = CW * i + cc;
            if constexpr (SCALED) {
                P[e] = fmaf(kk, bb[cc], P[e]);
                M[e] = fmaf(kr[i], vv[cc], M[e]);
            } else {
                const float a = c.sa[4 * j];
                P[e] = fmaf(a, P[e], kk * bb[cc]);
                M[e] = fmaf(a, M[e], kr[i] * vv[cc]);
            }
        }
    }
}

// Reverse step of chunk token j, (M, P) its state after the token, (aM, aP) the adjoint totals of the token after it.
// SCALED: the states are scaled by 1 / A_j and the adjoints by A_j (lambda~_j = A_j lambda_j = lambda~_{j+1} + A_j G_j:
// one add per element, no decay); q is staged unscaled, so that 1 / I~ (= A_j / I) gives mu = M~ / I~ and x~ = q / I~
// = A_j q / I, and dvar is staged times 1 / A_j; v / A_j and beta / A_j (the staged rows 0 and 1) turn the scaled
// adjoints into dk, and the sums over K (dv, dbeta) and of DI are scaled back by 1 / A_j per token.  Otherwise
// (states and adjoints unscaled, 1 / A_j = 1) the adjoints take the next token's decay `an` first, and `an` becomes
// this token's.  Leaves this token's totals in (aM, aP), adds its DI to sdi, writes this thread's partial sums over K
// (dv, dbeta, still times A_j) to red1 at sub-block slot `ts` and its sums over V (dq, dk): with 16 lanes over K to
// red2 at slot ts % PDQK, with 32 atomically to dq_tok and dk_tok (the token's rows from this lane; past the
// sequence's end, where they add zeros, the last token's), and returns its part of the token's dg term c_j (the header's identity): -I0 sum(DI) -
// <dvar, var> over its elements (the -<v, dv> - <beta, dbeta> part is added where dv and dbeta are summed).
template <bool SCALED>
__device__ __forceinline__ float backward_token(const Ctx& c, int j, int ts, const float (&M)[E], const float (&P)[E],
                                                float (&aM)[E], float (&aP)[E], float& an, float& sdi, float* red1,
                                                float* red2, float* dq_tok, float* dk_tok) {
    float qs[R], kr[R], v2[CW], b2[CW], d2[CW];
    load_krows(c.sq + j * PK, c.row0, qs);
    load_krows(c.sk + j * PK, c.row0, kr);
    load_cols(c.sin + (j * NQS + 0) * BV + c.ccol, v2);  // v / A_j
    load_cols(c.sin + (j * NQS + 1) * BV + c.ccol, b2);  // beta / A_j
    load_cols(c.sin + (j * NQS + 2) * BV + c.ccol, d2);
    const float4 decay = *reinterpret_cast<const float4*>(c.sa + 4 * j);  // a_j, I0 / A_j, A_j, 1 / A_j
#if PDVAR
    float dwc[CW];
    load_cols(c.sin + (j * NQS + 3) * BV + c.ccol, dwc);
#endif
    float sd = 0.f;
#if PDVAR
    float wv = 0.f;  // sum over its rows of q^2 DQB: <dvar, var>
#endif
    float dva[CW], dba[CW];
#pragma unroll
    for (int cc = 0; cc < CW; ++cc) dva[cc] = dba[cc] = 0.f;
    float dqr[R], dkr[R];
#pragma unroll
    for (int i = 0; i < R; ++i) {
        const float kk = kr[i] * kr[i];
        float dqa = 0.f, dk1 = 0.f, dk2 = 0.f;
#if PDVAR
        float dqb = 0.f;
#endif
#pragma unroll
        for (int cc = 0; cc < CW; ++cc) {
            const int e = CW * i + cc;
            const float r = rcp(P[e] + decay.y);
            const float mu = M[e] * r;
            const float x = qs[i] * r;
            const float dm = x * d2[cc];
            dqa = fmaf(d2[cc], mu, dqa);
            const float tm = SCALED ? aM[e] + dm : fmaf(an, aM[e], dm);
#if PDVAR
            const float di = -fmaf(x * x, dwc[cc], dm * mu);
            dqb = fmaf(dwc[cc], r, dqb);
            const float tp = SCALED ? aP[e] + di : fmaf(an, aP[e], di);
            sd += di;
#else
            float tp;
            if constexpr (SCALED) {  // DI = -dm mu folded into both of its uses
                tp = fmaf(-dm, mu, aP[e]);
                sd = fmaf(-dm, mu, sd);
            } else {
                const float di = -(dm * mu);
                tp = fmaf(an, aP[e], di);
                sd += di;
            }
#endif
            dva[cc] = fmaf(kr[i], tm, dva[cc]);
            dba[cc] = fmaf(kk, tp, dba[cc]);
            dk1 = fmaf(tm, v2[cc], dk1);
            dk2 = fmaf(tp, b2[cc], dk2);
            aM[e] = tm;
            aP[e] = tp;
        }
#if PDVAR
        dqr[i] = fmaf(2.f * qs[i], dqb, dqa);
        wv = fmaf(qs[i] * qs[i], dqb, wv);
#else
        dqr[i] = dqa;
#endif
        dkr[i] = fmaf(2.f * kr[i], dk2, dk1);
    }
    sd *= decay.w;
    sdi += sd;
#if PKLANES == 16
    store_rows(red2 + (((ts % PDQK) * 2 + 0) * 2 + c.vl) * PK + c.row0, dqr);
    store_rows(red2 + (((ts % PDQK) * 2 + 1) * 2 + c.vl) * PK + c.row0, dkr);
#else
    // the thread's rows hold its 4 columns' sums: straight to memory (coalesced over the warp's lanes), without a
    // branch: a token past the sequence's end has all its staged inputs zero, so that its sums are zero and its rows
    // point at a token inside it (the caller's)
#pragma unroll
    for (int i = 0; i < R; ++i) {
#if PPAIRS  // dq_tok points at the (dq, dk) pair of the token's row `lane`
        asm volatile("red.relaxed.gpu.global.add.v2.f32 [%0], {%1, %2};" ::"l"(dq_tok + 64 * i), "f"(dqr[i]),
                     "f"(dkr[i]) : "memory");
#else
        atomicAdd(dq_tok + 32 * i, dqr[i]);
        atomicAdd(dk_tok + 32 * i, dkr[i]);
#endif
    }
#endif
#pragma unroll
    for (int cc = 0; cc < CW; ++cc) {
        red1[(ts * 2 * CW + cc) * RED1_STRIDE + c.lane] = dva[cc];
        red1[(ts * 2 * CW + CW + cc) * RED1_STRIDE + c.lane] = dba[cc];
    }
    if (!SCALED) an = decay.x;
#if PDVAR
    return -fmaf(c.I0, sd, wv);
#else
    return -c.I0 * sd;
#endif
}

// The chunk-start state (M, I) of this thread's elements, copied from global memory into its warp's start buffer
// [M or I][R][lane][CW] without registers (cp.async, 4 CW bytes per row of CW columns); wait_start() before reading
// it back.
__device__ __forceinline__ void prefetch_start(float* start, int lane, const float* h_mean, const float* h_imp,
                                               u64 h_off, int row0, int col) {
#pragma unroll
    for (int i = 0; i < R; ++i) {
        const u64 o = h_off + (u64)krow(row0, i) * PV + col;
        const unsigned dm = (unsigned)__cvta_generic_to_shared(start + ((0 * R + i) * 32 + lane) * CW);
        const unsigned dp = (unsigned)__cvta_generic_to_shared(start + ((1 * R + i) * 32 + lane) * CW);
        asm volatile("cp.async.ca.shared.global [%0], [%1], %2;" ::"r"(dm), "l"(h_mean + o), "n"(4 * CW) : "memory");
        asm volatile("cp.async.ca.shared.global [%0], [%1], %2;" ::"r"(dp), "l"(h_imp + o), "n"(4 * CW) : "memory");
    }
    asm volatile("cp.async.commit_group;" ::: "memory");
}

__device__ __forceinline__ void wait_start() { asm volatile("cp.async.wait_group 0;" ::: "memory"); }

// (M, P = I - I0) from the start buffer
__device__ __forceinline__ void read_start(const float* start, int lane, float I0, float (&M)[E], float (&P)[E]) {
#pragma unroll
    for (int i = 0; i < R; ++i) {
        float m[CW], p[CW];
        load_cols(start + ((0 * R + i) * 32 + lane) * CW, m);
        load_cols(start + ((1 * R + i) * 32 + lane) * CW, p);
#pragma unroll
        for (int cc = 0; cc < CW; ++cc) {
            M[CW * i + cc] = m[cc];
            P[CW * i + cc] = p[cc] - I0;  // the sweep steps P = I - I0
        }
    }
}

// The sum of N floats of shared memory (16-byte aligned, N a multiple of 8): N / 4 vector loads, then halves added
// pairwise down to two vectors, then their 8 lanes as a tree
template <int N>
__device__ __forceinline__ float row_sum(const float* src) {
    static_assert(N % 8 == 0, "row_sum adds whole pairs of 4-float vectors");
    float4 part[N / 4];
#pragma unroll
    for (int i = 0; i < N / 4; ++i) part[i] = *reinterpret_cast<const float4*>(src + 4 * i);
#pragma unroll
    for (int n = N / 8; n >= 2; n /= 2) {
#pragma unroll
        for (int i = 0; i < n; ++i) {
            part[i].x += part[i + n].x; part[i].y += part[i + n].y;
            part[i].z += part[i + n].z; part[i].w += part[i + n].w;
        }
    }
    return ((part[0].x + part[1].x) + (part[0].y + part[1].y)) + ((part[0].z + part[1].z) + (part[0].w + part[1].w));
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

extern "C" __global__ void __launch_bounds__(32 * PWARPS, PBLOCKS)
palimpsa_sweep(const in_t* __restrict__ q, const in_t* __restrict__ k, const in_t* __restrict__ v,
               const g_t* __restrict__ g, const in_t* __restrict__ beta, const float* __restrict__ prior,
               const float* __restrict__ h_mean, const float* __restrict__ h_imp,
               const float* __restrict__ adj_mean, const float* __restrict__ adj_imp,
               const float* __restrict__ mu0, const float* __restrict__ imp0,
               const do_t* __restrict__ dout, const do_t* __restrict__ dvar,
               float* __restrict__ dq, float* __restrict__ dk, in_t* __restrict__ dv, in_t* __restrict__ dbeta,
               float* __restrict__ dg_part, float* __restrict__ dg_anchor, float* __restrict__ dprior,
               float* __restrict__ dmu0,
               float* __restrict__ dimp0, const int* __restrict__ cu_seqlens, const int* __restrict__ unit_indices,
               const int* __restrict__ chunk_offsets, float scale, int T, int NU) {
    extern __shared__ float4 smem4[];
    float* smem = reinterpret_cast<float*>(smem4);
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    const int kl = lane & 15, vl = lane >> 4;
    const int i_v = blockIdx.x, i_u = blockIdx.y, i_h = blockIdx.z;
    int i_n, i_w, bos, eos, cbase;
#if PVARLEN
    i_n = unit_indices[2 * i_u];
    i_w = unit_indices[2 * i_u + 1];
    bos = cu_seqlens[i_n];
    eos = cu_seqlens[i_n + 1];
    cbase = chunk_offsets[i_n];
#else
    {
        const int NW = (T + W_TOKENS - 1) / W_TOKENS;
        i_n = i_u / NW;
        i_w = i_u % NW;
        bos = i_n * T;
        eos = bos + T;
        cbase = i_n * ((T + PC - 1) / PC);
    }
#endif
    const int n_chunks = (eos - bos + PC - 1) / PC;
    const int c_first = i_w * PU;
    const int c_count = min(c_first + PU, n_chunks) - c_first;

    Ctx c;
    c.sq = smem + SQ_OFF;
    c.sk = smem + SK_OFF;
    c.sin = smem + SIN_OFF;
    c.sa = smem + SA_OFF;
    c.I0 = prior[i_h];
    c.lane = lane;
    c.vl = vl;
    c.row0 = PKLANES == 16 ? kl * R : lane;
    c.ccol = PKLANES == 16 ? w * 4 + vl * 2 : w * 4;
    float* ck = smem + WARP_OFF + w * WARP_FLOATS;
    float* start = PSTARTSLOT ? ck + (CK_SLOTS - 1) * 2 * E * 32 : ck + CK_FLOATS;
    float* red1 = start + START_FLOATS;
    float* red2 = red1 + RED1_FLOATS;
    const int col = i_v * BV + c.ccol;  // this thread's first value column

    // the adjoints entering the unit from its end (totals with the next token's decay applied)
    float aM[E], aP[E];
    const u64 a_off = ((u64)i_u * PH + i_h) * PK * PV;
#pragma unroll
    for (int i = 0; i < R; ++i) {
        const u64 o = a_off + (u64)krow(c.row0, i) * PV + col;
        float m[CW], p[CW];
        load_cols(adj_mean + o, m);
        load_cols(adj_imp + o, p);
#pragma unroll
        for (int cc = 0; cc < CW; ++cc) {
            aM[CW * i + cc] = m[cc];
            aP[CW * i + cc] = p[cc];
        }
    }
    float an = 1.f, sdi = 0.f;
    if (c_count > 0)
        prefetch_start(start, lane, h_mean, h_imp, ((u64)(cbase + c_first + c_count - 1) * PH + i_h) * PK * PV,
                       c.row0, col);

    for (int cc = 0; cc < c_count; ++cc) {
        const int i_c = c_first + c_count - 1 - cc;  // the unit's chunks, last first
        const int cs = bos + i_c * PC;
        const int n_tok = min(PC, eos - cs);
        bool scaled;  // whether this chunk's states step scaled by 1 / A_j
        __syncthreads();  // every warp is done with the previous chunk's staged inputs
        {   // stage the chunk's inputs, float32 (zeros and decay 1 after the sequence's end): every load first
            float* sq = smem + SQ_OFF;
            float* sk = smem + SK_OFF;
            float* sin = smem + SIN_OFF;
            float* sa = smem + SA_OFF;
            constexpr int NT = 32 * PWARPS;
            RowStage<in_t, PK, PK, NT> rq, rk;
            RowStage<in_t, BV, NQS * BV, NT> rv, rb;
            RowStage<do_t, BV, NQS * BV, NT> rd, rw;
            ChunkDecays decays;
            rq.load(q, PK, 0, cs, i_h, n_tok);
            rk.load(k, PK, 0, cs, i_h, n_tok);
            rv.load(v, PV, (u64)i_v * BV, cs, i_h, n_tok);
            rb.load(beta, PV, (u64)i_v * BV, cs, i_h, n_tok);
            rd.load(dout, PV, (u64)i_v * BV, cs, i_h, n_tok);
#if PDVAR
            rw.load(dvar, PV, (u64)i_v * BV, cs, i_h, n_tok);
#endif
            decays.load(g, cs, i_h, n_tok, lane);
            // the chunk steps scaled states where its decay allows (common.cuh's ChunkDecays); 1 / A_j through the
            // warp's own reduction slots (free until the chunk's first sub-block)
            float b_end;
            const float b = decays.scan(lane, b_end);
            scaled = b_end >= MIN_SCALED_LOG_DECAY;  // false for NaN and -inf too
            const float inv = scaled ? expf(-b) : 1.f;
            red1[lane] = inv;
            if (w == 0)
                *reinterpret_cast<float4*>(sa + 4 * lane) =
                    make_float4(expf(decays.gj), c.I0 * inv, scaled ? expf(b) : 1.f, inv);
            __syncwarp();
            rq.store(sq, 1.f);
            rk.store(sk, 1.f);
            rv.store(sin + 0 * BV, 1.f, red1);
            rb.store(sin + 1 * BV, 1.f, red1);
            rd.store(sin + 2 * BV, scale);  // the read-out's scale goes with do (and its square with dvar): dq needs
#if PDVAR                                   // no multiply of its own
            rw.store(sin + 3 * BV, scale * scale, red1);
#endif
        }
        __syncthreads();
        auto run_chunk = [&](auto scaled_tag) {
            constexpr bool S = decltype(scaled_tag)::value;
            if constexpr (S) {  // the adjoints entering the chunk's last token, times A_j there: the chunk's decay
                const float a_end = c.sa[4 * (PC - 1) + 2];
#pragma unroll
                for (int e = 0; e < E; ++e) {
                    aM[e] *= a_end;
                    aP[e] *= a_end;
                }
            }

            const int n_seg = (n_tok + PSEG - 1) / PSEG;
            for (int ss = 0; ss < n_seg; ++ss) {
                const int seg = n_seg - 1 - ss;  // segments of the chunk, last first
                const int s0 = seg * PSEG;
                const int seg_tok = min(PSEG, n_tok - s0);
                const int n_sub = (seg_tok + 3) / 4;
                float M[E], P[E];
                // the states of a sub-block's 4 tokens, rebuilt from its checkpoint in Ms[0], Ps[0]
                float Ms[4][E], Ps[4][E];
                auto rebuild = [&](int t0) {
#if !PCKFIRST
                    forward_token<S>(c, t0, Ms[0], Ps[0]);
#endif
#pragma unroll
                    for (int j = 1; j < 4; ++j) {
#pragma unroll
                        for (int e = 0; e < E; ++e) {
                            Ms[j][e] = Ms[j - 1][e];
                            Ps[j][e] = Ps[j - 1][e];
                        }
                        forward_token<S>(c, t0 + j, Ms[j], Ps[j]);
                    }
                };
                wait_start();
                read_start(start, lane, c.I0, M, P);
#pragma unroll 4
                for (int j = 0; j < s0; ++j) forward_token<S>(c, j, M, P);
                // one pass over the segment keeps every sub-block's state before its first token (PCKFIRST: after it,
                // so that a sub-block rebuilds three states, not four); PCOMPACT: the last sub-block's stays in M, P
                for (int sb = 0; sb < n_sub; ++sb) {
#if PCKFIRST
                    forward_token<S>(c, s0 + 4 * sb, M, P);
#endif
                    if (!PCOMPACT || sb + 1 < n_sub) save_state(ck, sb, lane, M, P);
                    if (sb + 1 < n_sub) {
#pragma unroll
                        for (int j = PCKFIRST; j < 4; ++j) forward_token<S>(c, s0 + 4 * sb + j, M, P);
                    }
                }
#if PCOMPACT
#pragma unroll
                for (int e = 0; e < E; ++e) {
                    Ms[0][e] = M[e];
                    Ps[0][e] = P[e];
                }
                rebuild(s0 + 4 * (n_sub - 1));
#endif
                // this chunk's start was read for the last time (and used: the reads are complete): fetch the next
                // chunk's while this segment's sub-blocks run (PSTARTSLOT: into the start's slot, which a chunk with
                // all its sub-blocks still needs; such a chunk fetches it once its reverse walk has read the slot)
                const bool has_next = seg == 0 && cc + 1 < c_count;
                const u64 next_start = ((u64)(cbase + i_c - 1) * PH + i_h) * PK * PV;
                if (has_next && !(PSTARTSLOT && n_sub == NSUB))
                    prefetch_start(start, lane, h_mean, h_imp, next_start, c.row0, col);
                __syncwarp();
                for (int jj = 0; jj < n_sub; ++jj) {
                    const int sb = n_sub - 1 - jj;  // sub-blocks of 4 tokens, last first
                    const int t0 = s0 + 4 * sb;
#if !PCOMPACT
                    load_state(ck, sb, lane, Ms[0], Ps[0]);
                    rebuild(t0);
#endif
                    if (ss == 0 && jj == 0) {  // the chunk's last sub-block: its end state and the adjoints from after
                        float anchor = 0.f;        // the chunk (both scaled or both not: their products are not)
#pragma unroll
                        for (int e = 0; e < E; ++e) anchor = fmaf(aM[e], Ms[3][e], fmaf(aP[e], Ps[3][e], anchor));
                        anchor = warp_sum(anchor);
                        if (lane == 0) atomicAdd(dg_anchor + (u64)(cbase + i_c) * PH + i_h, anchor);
                    }
                    float dgn[4];
                    // a lane's sum over K of dv or dbeta (`what` 0 or 1) of sub-block token jl and block column vc: the
                    // sum, / A_j, goes to memory and -v dv or -beta dbeta of it to the token's c (`own`: this lane
                    // holds the sum for itself, not as a copy of another lane's)
                    auto add_sums = [&](float sum, int jl, int what, int vc, bool own) {
                        const int jt = t0 + jl;
                        const float s = sum * c.sa[4 * jt + 3];  // / A_j
                        const float x = own ? c.sin[(jt * NQS + what) * BV + vc] * c.sa[4 * jt + 2] : 0.f;  // v, beta
#pragma unroll
                        for (int jr = 0; jr < 4; ++jr)
                            if (jl == jr) dgn[jr] = fmaf(-s, x, dgn[jr]);
                        if (own && jt < n_tok) {
                            const u64 o = ((u64)(cs + jt) * PH + i_h) * PV + i_v * BV + vc;
                            from_f(s, (what == 0 ? dv : dbeta) + o);
                        }
                    };
#if PKLANES == 16
                    // the sub-block's tokens in groups of PDQK, last first: their reverse steps, then dq and dk of the
                    // group (the two column lanes' rows added, coalesced atomic adds over the block's value columns)
#pragma unroll
                    for (int grp = 4 / PDQK - 1; grp >= 0; --grp) {
#pragma unroll
                        for (int jr = PDQK * grp + PDQK - 1; jr >= PDQK * grp; --jr)
                            dgn[jr] = backward_token<S>(c, t0 + jr, jr, Ms[jr], Ps[jr], aM, aP, an, sdi, red1, red2,
                                                        nullptr, nullptr);
                        __syncwarp();
#pragma unroll
                        for (int ts = 0; ts < PDQK; ++ts) {
                            const int jt = t0 + PDQK * grp + ts;
                            if (jt < n_tok) {  // one address per tensor and token, the rows at fixed offsets
                                const u64 base = ((u64)(cs + jt) * PH + i_h) * PK + lane;
#pragma unroll
                                for (int qq = 0; qq < 2; ++qq) {
                                    const float* src = red2 + (ts * 2 + qq) * 2 * PK + lane;
                                    float* dst = (qq == 0 ? dq : dk) + base;
#pragma unroll
                                    for (int m = 0; m < (PK + 31) / 32; ++m)
                                        if (PK % 32 == 0 || 32 * m + lane < PK)
                                            atomicAdd(dst + 32 * m, src[32 * m] + src[PK + 32 * m]);
                                }
                            }
                        }
                        if (grp > 0) __syncwarp();  // red2 is read before the next group writes it
                    }
                    // dv, dbeta: lane l sums the 16 key lanes of (token l % 16 / 4, quantity l % 4, column half l / 16)
                    // and adds -v dv or -beta dbeta of its column to its token's c
                    {
                        const int slot = lane & 15, half = lane >> 4;
                        const float* src = red1 + slot * RED1_STRIDE + half * 16;
                        float part[8];
#pragma unroll
                        for (int i = 0; i < 8; ++i) part[i] = src[i] + src[i + 8];
#pragma unroll
                        for (int i = 0; i < 4; ++i) part[i] += part[i + 4];
                        const int jl = slot >> 2, what = (slot >> 1) & 1;
                        const float sum = (part[0] + part[2]) + (part[1] + part[3]);
                        add_sums(sum, jl, what, w * 4 + half * 2 + (slot & 1), true);
                    }
#else
                    // the sub-block's tokens, last first: each adds its dq and dk rows straight to memory
                    auto reverse_token = [&](int jr) {
                        // a token past the sequence's end adds its zero sums to the sequence's last token
                        const u64 base = ((u64)(cs + min(t0 + jr, n_tok - 1)) * PH + i_h) * PK + lane;
                        float* dqt = dq + (PPAIRS ? 2 * base : base);
                        float* dkt = dk + base;
                        dgn[jr] = backward_token<S>(c, t0 + jr, PCOMPACT ? jr & 1 : jr, Ms[jr], Ps[jr], aM, aP, an, sdi,
                                                    red1, red2, dqt, dkt);
                    };
#if PCOMPACT
                    // dv, dbeta per 2 tokens (tokens 3 and 2, then 1 and 0): lane l sums 16 key lanes (l / 16 which)
                    // of (token l % 16 / 8, dv or dbeta l / 4 % 2, column l % 4), the other half from lane l ^ 16
#pragma unroll
                    for (int h = 1; h >= 0; --h) {
                        reverse_token(2 * h + 1);
                        reverse_token(2 * h);
                        __syncwarp();
                        const int slot = lane & 15;
                        float sum = row_sum<16>(red1 + slot * RED1_STRIDE + (lane >> 4) * 16);
                        sum += __shfl_xor_sync(0xffffffffu, sum, 16);
                        add_sums(sum, 2 * h + (slot >> 3), (slot >> 2) & 1, w * 4 + (slot & 3), lane < 16);
                        __syncwarp();  // red1 is read before the next tokens write it
                    }
#else
#pragma unroll
                    for (int jr = 3; jr >= 0; --jr) reverse_token(jr);
                    __syncwarp();
                    // dv, dbeta: lane l sums the 32 key lanes of (token l / 8, dv or dbeta l / 4 % 2, column l % 4)
                    // and adds -v dv or -beta dbeta of its column to its token's c
                    {
                        const float sum = row_sum<32>(red1 + lane * RED1_STRIDE);
                        add_sums(sum, lane >> 3, (lane >> 2) & 1, w * 4 + (lane & 3), true);
                    }
#endif  // PCOMPACT
#endif  // PKLANES
                    // c of each of the 4 tokens: one transposed butterfly (lanes end holding token 2 * bit4 + bit3's
                    // total)
                    {
                        const bool hi = lane & 16, h8 = lane & 8;
                        float k0 = hi ? dgn[2] : dgn[0], k1 = hi ? dgn[3] : dgn[1];
                        const float s0v = hi ? dgn[0] : dgn[2], s1v = hi ? dgn[1] : dgn[3];
                        k0 += __shfl_xor_sync(0xffffffffu, s0v, 16);
                        k1 += __shfl_xor_sync(0xffffffffu, s1v, 16);
                        float kk = h8 ? k1 : k0;
                        const float sv = h8 ? k0 : k1;
                        kk += __shfl_xor_sync(0xffffffffu, sv, 8);
                        kk += __shfl_xor_sync(0xffffffffu, kk, 4);
                        kk += __shfl_xor_sync(0xffffffffu, kk, 2);
                        kk += __shfl_xor_sync(0xffffffffu, kk, 1);
                        const int jt = t0 + (hi ? 2 : 0) + (h8 ? 1 : 0);
                        if ((lane & 7) == 0 && jt < n_tok)
                            atomicAdd(dg_part + (u64)(cs + jt) * PH + i_h, kk);
                    }
                    __syncwarp();
#if PCOMPACT
                    if (sb > 0) {  // the sub-block before: its states from its checkpoint
                        load_state(ck, sb - 1, lane, Ms[0], Ps[0]);
                        rebuild(t0 - 4);  // (uses every value loaded: the slot's reads are complete)
#if PSTARTSLOT
                        if (has_next && n_sub == NSUB && sb - 1 == CK_SLOTS - 1)
                            prefetch_start(start, lane, h_mean, h_imp, next_start, c.row0, col);
#endif
                    }
#endif
                }
            }
            // the adjoints of the state before the chunk's first token: A_0 = a_0 times its totals, which a scaled
            // chunk holds already
            if constexpr (!S) {
#pragma unroll
                for (int e = 0; e < E; ++e) {
                    aM[e] *= an;
                    aP[e] *= an;
                }
                an = 1.f;
            }
        };
        if (scaled)
            run_chunk(Scaled<true>{});
        else
            run_chunk(Scaled<false>{});
    }

    float dprior_sum = warp_sum(sdi);
#if PINIT
    if (i_w == 0) {
        const u64 s_off = ((u64)i_n * PH + i_h) * PK * PV;
        float sp = 0.f;
#pragma unroll
        for (int i = 0; i < R; ++i) {
#pragma unroll
            for (int cc = 0; cc < CW; ++cc) {
                const int e = CW * i + cc;
                const u64 o = s_off + (u64)krow(c.row0, i) * PV + col + cc;
                const float mi = mu0[o], ii = imp0[o];
                dmu0[o] = aM[e] * ii;
                dimp0[o] = aM[e] * mi + aP[e];
                sp += aP[e];
            }
        }
        dprior_sum -= warp_sum(sp);
    }
#endif
    if (lane == 0) dprior[((u64)(i_v * PWARPS + w) * NU + i_u) * PH + i_h] = dprior_sum;
}
