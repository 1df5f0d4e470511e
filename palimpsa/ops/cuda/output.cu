// The per-channel op's output kernel in CUDA C++ (compiled at run time by NVRTC: palimpsa/ops/cuda/output.py).
//
// Same computation and results as chunk_output_gluon_kernel (palimpsa/ops/triton/chunk_fwd_gluon.py): every block
// owns one (value block, chunk, head), loads the chunk-start state (M, I) and steps through the chunk's tokens:
//     I = a I + (1 - a) I0 + k^2 beta^T;   M = a M + k v^T;   r = 1 / I
//     o = scale * sum_k q M r;              var = scale^2 * sum_k q^2 r
// Each thread holds R = K / 16 key rows of 2 value columns (16 lanes over K, 2 over V: a warp owns 4 columns), so a
// token costs it one reciprocal and 6 FP32 instructions per element (7 with the variance), all fused where the math
// allows.  The sums over K are collected in shared memory for a batch of TB tokens (32 sums per warp) and each lane
// adds one of them over the 16 key lanes: no shuffle, no per-token reduction.  The chunk's q (times the scale) and k
// rows, its v, beta, decays and prior terms are staged in shared memory once per block, every load issued first.
//
// Two ways to run it (PWALK):
//  * 0, chunks in parallel: a block owns one (value block, chunk, head) and starts from the chunk-start state of
//    chunk_states (the states of all chunks come first, by matrix products);
//  * 1, sequences walked: a block owns one (value block, sequence, head), starts from the initial state (or the
//    empty one) and walks the sequence's chunks in order, the next chunk's loads in flight while the current chunk
//    runs; no chunk-start states are needed, and the final state is written at the end.  Where the GPU is full
//    without the chunks' parallelism (enough sequences, heads and value columns) this saves the chunk-state pass.
//    Its chunks (PC = 32, one token a lane) also drop the per-token decay from the state updates: with A_j the decay
//    from the chunk's start through token j, the states scaled by 1 / A_j step as
//        I~ = I~ + ((1 - a) I0 + k^2 beta^T) / A_j;   M~ = M~ + k (v / A_j)^T;   mu = M~ / I~ (the scale cancels)
//    (v / A_j, beta / A_j and (1 - a_j) I0 / A_j staged once per chunk), and are multiplied by the chunk's decay at its
//    end: one instruction less per element and token.  A chunk whose decay is below exp(MIN_SCALED_LOG_DECAY)
//    (common.cuh), where 1 / A could overflow (saturated or infinite log decays), steps directly instead.
//
// Compile-time parameters (#defines prepended by output.py): PK, PV, PH (key size, value size, heads), PC (chunk),
// PWARPS, PIN (dtype of q, k, v, beta and the outputs), PG (of g): 0 bfloat16, 1 float16, 2 float32; PVAR (the
// variance is asked for), PVARLEN, PALIGNED, PSHARED_BYTES (as in sweep.cu); PWALK, and with it PINIT (an initial
// state is given), PFINAL (the final state is asked for) and PMINBLOCKS (blocks a multiprocessor must hold: caps the
// registers).  Requires PK % 16 == 0 and PV % (4 * PWARPS) == 0 (the host checks).

#define BV (4 * PWARPS)
#define NS (PVAR ? 4 : 2)
#define TB (16 / NS)
#define RED_STRIDE 33

// Shared memory of a block, in floats: q (times the scale) and k rows [PC][PK] each, v and beta [PC][2][BV], the
// decays and prior terms (1 - a) I0 [PC][2]; per warp the sums of a batch [16][RED_STRIDE].
#define SQ_OFF 0
#define SK_OFF (PC * PK)
#define SIN_OFF (2 * PC * PK)
#define SA_OFF (SIN_OFF + PC * 2 * BV)
#define RED_OFF (SA_OFF + 2 * PC)
#define SHARED_FLOATS (RED_OFF + PWARPS * 16 * RED_STRIDE)
// the host's size of the dynamic shared memory (PSHARED_BYTES) must be this layout's
static_assert(SHARED_FLOATS * 4 == PSHARED_BYTES, "the host's shared-memory size differs from the kernel's layout");

#define NTHREADS (32 * PWARPS)

// One chunk's rows on their way to shared memory: load() issues every global load (into registers), store() puts
// them in the block's staging area as float32 (q times the scale, v and beta times token_factor[j] when given; zeros
// after the sequence's end)
struct InputRows {
    RowStage<in_t, PK, PK, NTHREADS> rq, rk;
    RowStage<in_t, BV, 2 * BV, NTHREADS> rv, rb;
    __device__ __forceinline__ void load(const in_t* __restrict__ q, const in_t* __restrict__ k,
                                         const in_t* __restrict__ v, const in_t* __restrict__ beta, int i_v, int cs,
                                         int i_h, int n_tok) {
        rq.load(q, PK, 0, cs, i_h, n_tok);
        rk.load(k, PK, 0, cs, i_h, n_tok);
        rv.load(v, PV, (u64)i_v * BV, cs, i_h, n_tok);
        rb.load(beta, PV, (u64)i_v * BV, cs, i_h, n_tok);
    }
    __device__ __forceinline__ void store(float* smem, float scale, const float* token_factor) const {
        rq.store(smem + SQ_OFF, scale);
        rk.store(smem + SK_OFF, 1.f);
        rv.store(smem + SIN_OFF, 1.f, token_factor);
        rb.store(smem + SIN_OFF + BV, 1.f, token_factor);
    }
};

// A chunk's inputs for the chunks in parallel: its rows, and its decays and prior terms (a_j, (1 - a_j) I0)
struct ChunkStage {
    InputRows rows;
    DecayStage<NTHREADS> ra;
    __device__ __forceinline__ void load(const in_t* __restrict__ q, const in_t* __restrict__ k,
                                         const in_t* __restrict__ v, const in_t* __restrict__ beta,
                                         const g_t* __restrict__ g, int i_v, int cs, int i_h, int n_tok) {
        rows.load(q, k, v, beta, i_v, cs, i_h, n_tok);
        ra.load(g, cs, i_h, n_tok);
    }
    __device__ __forceinline__ void store(float* smem, float scale, float I0) const {
        rows.store(smem, scale, nullptr);
        ra.store(smem + SA_OFF, I0);
    }
};

// A walked chunk's inputs (PC = 32: lane j of every warp holds token j's log decay), staged like ChunkStage's but, where
// the chunk's decay allows (see the header), with v, beta and the prior term divided by the decay A_j from the chunk's
// start through token j: sa[2 j] = (1 - a_j) I0 / A_j, sa[2 j + 1] = 1 / A_j; otherwise as ChunkStage's (a_j,
// (1 - a_j) I0).  Every warp scans the decays itself (identical results), so no barrier orders the scan before the
// stores; its 1 / A_j go through the warp's own reduction slots.
struct WalkStage {
    InputRows rows;
    ChunkDecays decays;
    __device__ __forceinline__ void load(const in_t* __restrict__ q, const in_t* __restrict__ k,
                                         const in_t* __restrict__ v, const in_t* __restrict__ beta,
                                         const g_t* __restrict__ g, int i_v, int cs, int i_h, int n_tok, int lane) {
        rows.load(q, k, v, beta, i_v, cs, i_h, n_tok);
        decays.load(g, cs, i_h, n_tok, lane);
    }
    // Returns whether the chunk runs scaled, and its whole decay in a_end; `slots`: the warp's 32 free floats.
    __device__ __forceinline__ bool store(float* smem, float* slots, float scale, float I0, int lane, int w,
                                          float& a_end) const {
        float b_end;
        const float b = decays.scan(lane, b_end);
        const bool scaled = b_end >= MIN_SCALED_LOG_DECAY;  // false for NaN and -inf too
        const float a = expf(decays.gj);
        const float inv = scaled ? expf(-b) : 1.f;
        slots[lane] = inv;
        if (w == 0) {
            float* sa = smem + SA_OFF;
            sa[2 * lane] = scaled ? (1.f - a) * I0 * inv : a;
            sa[2 * lane + 1] = scaled ? inv : (1.f - a) * I0;
        }
        __syncwarp();
        rows.store(smem, scale, slots);
        a_end = expf(b_end);
        return scaled;
    }
};

// The n_tok tokens of a staged chunk starting at token cs, stepped on this thread's elements (M, I), with o (and
// var) written for each: the sums over K collected in the warp's `red` for TB tokens, then one lane per output adds
// the 16 key lanes.  SCALED: the states and staged inputs are scaled by 1 / A_j (WalkStage), I~ = I / A_j.
template <bool SCALED>
__device__ __forceinline__ void chunk_tokens(const float* smem, float* red, int n_tok, int cs, int i_h, int i_v,
                                             int w, int lane, int row0, int ccol, float (&M)[E], float (&I)[E],
                                             in_t* __restrict__ o, in_t* __restrict__ var) {
    const float* sq = smem + SQ_OFF;
    const float* sk = smem + SK_OFF;
    const float* sin = smem + SIN_OFF;
    const float* sa = smem + SA_OFF;
    for (int tb = 0; tb < n_tok; tb += TB) {
#pragma unroll
        for (int jj = 0; jj < TB; ++jj) {
            const int j = tb + jj;  // tokens after the chunk's end are zeros with decay 1: the state stays
            float qs[R], kr[R];
            load_rows(sq + j * PK + row0, qs);
            load_rows(sk + j * PK + row0, kr);
            const float2 vv = *reinterpret_cast<const float2*>(sin + (j * 2 + 0) * BV + ccol);
            const float2 bb = *reinterpret_cast<const float2*>(sin + (j * 2 + 1) * BV + ccol);
            const float2 ar = *reinterpret_cast<const float2*>(sa + 2 * j);
            const float v2[2] = {vv.x, vv.y}, b2[2] = {bb.x, bb.y};
            float oc[2] = {0.f, 0.f};
#if PVAR
            float vc[2] = {0.f, 0.f};
#endif
#pragma unroll
            for (int i = 0; i < R; ++i) {
                const float kk = kr[i] * kr[i];
#if PVAR
                const float qq = qs[i] * qs[i];
#endif
#pragma unroll
                for (int cc = 0; cc < 2; ++cc) {
                    const int e = 2 * i + cc;
                    if constexpr (SCALED) {
                        I[e] += fmaf(kk, b2[cc], ar.x);
                        M[e] = fmaf(kr[i], v2[cc], M[e]);
                    } else {
                        I[e] = fmaf(ar.x, I[e], fmaf(kk, b2[cc], ar.y));
                        M[e] = fmaf(ar.x, M[e], kr[i] * v2[cc]);
                    }
                    const float r = rcp(I[e]);
                    oc[cc] = fmaf(qs[i], M[e] * r, oc[cc]);
#if PVAR
                    vc[cc] = fmaf(qq, r, vc[cc]);
#endif
                }
            }
            red[(jj * NS + 0) * RED_STRIDE + lane] = oc[0];
            red[(jj * NS + 1) * RED_STRIDE + lane] = oc[1];
#if PVAR
            if constexpr (SCALED) {  // 1 / I = (1 / I~) / A_j
                vc[0] *= ar.y;
                vc[1] *= ar.y;
            }
            red[(jj * NS + 2) * RED_STRIDE + lane] = vc[0];
            red[(jj * NS + 3) * RED_STRIDE + lane] = vc[1];
#endif
        }
        __syncwarp();
        {   // lane l adds the 16 key lanes of (token slot / NS, quantity slot % NS, column half l / 16)
            const int slot = lane & 15, half = lane >> 4;
            const float* src = red + slot * RED_STRIDE + half * 16;
            float s = 0.f;
#pragma unroll
            for (int i = 0; i < 16; ++i) s += src[i];
            const int j = tb + slot / NS, what = slot % NS;
            if (j < n_tok) {
                const u64 off = ((u64)(cs + j) * PH + i_h) * PV + i_v * BV + w * 4 + half * 2 + (what & 1);
                from_f(s, (what < 2 ? o : var) + off);
            }
        }
        __syncwarp();
    }
}

#if PMINBLOCKS > 1
#define BOUNDS __launch_bounds__(NTHREADS, PMINBLOCKS)
#else
#define BOUNDS __launch_bounds__(NTHREADS)  // (a minimum of 1 spelled out changes ptxas's register choices)
#endif

// h_mean, h_imp: the chunk-start states [chunks, PH, PK, PV] (PWALK 0), or the initial state (mu, I) [N, PH, PK, PV]
// (PWALK 1 with PINIT); final_mu, final_imp [N, PH, PK, PV]: the final state (PWALK 1 with PFINAL).
extern "C" __global__ void BOUNDS
palimpsa_output(const in_t* __restrict__ q, const in_t* __restrict__ k, const in_t* __restrict__ v,
                const g_t* __restrict__ g, const in_t* __restrict__ beta, const float* __restrict__ prior,
                const float* __restrict__ h_mean, const float* __restrict__ h_imp, in_t* __restrict__ o,
                in_t* __restrict__ var, float* __restrict__ final_mu, float* __restrict__ final_imp,
                const int* __restrict__ cu_seqlens, const int* __restrict__ chunk_indices, float scale, int T) {
    extern __shared__ float4 smem4[];
    float* smem = reinterpret_cast<float*>(smem4);
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    const int kl = lane & 15, vl = lane >> 4;
    const int i_v = blockIdx.x, i_h = blockIdx.z;
    const float I0 = prior[i_h];
    const int row0 = kl * R, ccol = w * 4 + vl * 2, col = i_v * BV + ccol;
    float* red = smem + RED_OFF + w * 16 * RED_STRIDE;
    float M[E], I[E];
#if PWALK
    const int i_n = blockIdx.y;
#if PVARLEN
    const int bos = cu_seqlens[i_n], eos = cu_seqlens[i_n + 1];
#else
    const int bos = i_n * T, eos = bos + T;
#endif
    const u64 s_off = ((u64)i_n * PH + i_h) * PK * PV;
#if PINIT
#pragma unroll
    for (int i = 0; i < R; ++i) {
        const u64 off = s_off + (u64)(row0 + i) * PV + col;
        const float2 m = *reinterpret_cast<const float2*>(h_mean + off);
        const float2 p = *reinterpret_cast<const float2*>(h_imp + off);
        M[2 * i] = m.x * p.x; M[2 * i + 1] = m.y * p.y;  // the precision-weighted mean
        I[2 * i] = p.x; I[2 * i + 1] = p.y;
    }
#else
#pragma unroll
    for (int e = 0; e < E; ++e) {
        M[e] = 0.f;
        I[e] = I0;
    }
#endif
    static_assert(PC == 32, "the walk's chunks are one token a lane");
    const int n_chunks = (eos - bos + PC - 1) / PC;
    WalkStage stage;
    bool scaled = false;
    float a_end = 1.f;
    if (n_chunks > 0) {
        stage.load(q, k, v, beta, g, i_v, bos, i_h, min(PC, eos - bos), lane);
        scaled = stage.store(smem, red, scale, I0, lane, w, a_end);
    }
    __syncthreads();
    for (int c = 0; c < n_chunks; ++c) {
        const int cs = bos + c * PC;
        const int n_tok = min(PC, eos - cs);
        const bool more = c + 1 < n_chunks;
        if (more) stage.load(q, k, v, beta, g, i_v, cs + PC, i_h, min(PC, eos - cs - PC), lane);  // in flight
        if (scaled) {
            chunk_tokens<true>(smem, red, n_tok, cs, i_h, i_v, w, lane, row0, ccol, M, I, o, var);
#pragma unroll
            for (int e = 0; e < E; ++e) {  // back to the unscaled states
                M[e] *= a_end;
                I[e] *= a_end;
            }
        } else {
            chunk_tokens<false>(smem, red, n_tok, cs, i_h, i_v, w, lane, row0, ccol, M, I, o, var);
        }
        __syncthreads();  // every warp is done with this chunk's staging
        if (more) {
            scaled = stage.store(smem, red, scale, I0, lane, w, a_end);
            __syncthreads();
        }
    }
#if PFINAL
#pragma unroll
    for (int i = 0; i < R; ++i) {
        const u64 off = s_off + (u64)(row0 + i) * PV + col;
        *reinterpret_cast<float2*>(final_mu + off) = make_float2(M[2 * i] / I[2 * i], M[2 * i + 1] / I[2 * i + 1]);
        *reinterpret_cast<float2*>(final_imp + off) = make_float2(I[2 * i], I[2 * i + 1]);
    }
#endif
#else
    const int i_c = blockIdx.y;
    int bos, eos, i_w;
#if PVARLEN
    {
        const int i_n = chunk_indices[2 * i_c];
        i_w = chunk_indices[2 * i_c + 1];
        bos = cu_seqlens[i_n];
        eos = cu_seqlens[i_n + 1];
    }
#else
    {
        const int NW = (T + PC - 1) / PC;
        const int i_n = i_c / NW;
        i_w = i_c % NW;
        bos = i_n * T;
        eos = bos + T;
    }
#endif
    const int cs = bos + i_w * PC;
    const int n_tok = min(PC, eos - cs);
    // the chunk-start state (loads issued before the staging below, so their latency overlaps it)
    const u64 h_off = ((u64)i_c * PH + i_h) * PK * PV;
#pragma unroll
    for (int i = 0; i < R; ++i) {
        const u64 off = h_off + (u64)(row0 + i) * PV + col;
        const float2 m = *reinterpret_cast<const float2*>(h_mean + off);
        const float2 p = *reinterpret_cast<const float2*>(h_imp + off);
        M[2 * i] = m.x; M[2 * i + 1] = m.y;
        I[2 * i] = p.x; I[2 * i + 1] = p.y;
    }
    {   // every load of the chunk's inputs first, then the stores
        ChunkStage stage;
        stage.load(q, k, v, beta, g, i_v, cs, i_h, n_tok);
        stage.store(smem, scale, I0);
    }
    __syncthreads();
    chunk_tokens<false>(smem, red, n_tok, cs, i_h, i_v, w, lane, row0, ccol, M, I, o, var);
#endif
}
