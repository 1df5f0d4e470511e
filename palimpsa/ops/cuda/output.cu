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
// Compile-time parameters (#defines prepended by output.py): PK, PV, PH (key size, value size, heads), PC (chunk),
// PWARPS, PIN (dtype of q, k, v, beta and the outputs), PG (of g): 0 bfloat16, 1 float16, 2 float32; PVAR (the
// variance is asked for), PVARLEN, PALIGNED, PSHARED_BYTES (as in sweep.cu).  Requires PK % 16 == 0 and
// PV % (4 * PWARPS) == 0 (the host checks).

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

extern "C" __global__ void __launch_bounds__(32 * PWARPS)
palimpsa_output(const in_t* __restrict__ q, const in_t* __restrict__ k, const in_t* __restrict__ v,
                const g_t* __restrict__ g, const in_t* __restrict__ beta, const float* __restrict__ prior,
                const float* __restrict__ h_mean, const float* __restrict__ h_imp, in_t* __restrict__ o,
                in_t* __restrict__ var, const int* __restrict__ cu_seqlens, const int* __restrict__ chunk_indices,
                float scale, int T) {
    extern __shared__ float4 smem4[];
    float* smem = reinterpret_cast<float*>(smem4);
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    const int kl = lane & 15, vl = lane >> 4;
    const int i_v = blockIdx.x, i_c = blockIdx.y, i_h = blockIdx.z;
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
    const float I0 = prior[i_h];
    const int row0 = kl * R, ccol = w * 4 + vl * 2, col = i_v * BV + ccol;

    // the chunk-start state (loads issued before the staging below, so their latency overlaps it)
    float M[E], I[E];
    const u64 h_off = ((u64)i_c * PH + i_h) * PK * PV;
#pragma unroll
    for (int i = 0; i < R; ++i) {
        const u64 off = h_off + (u64)(row0 + i) * PV + col;
        const float2 m = *reinterpret_cast<const float2*>(h_mean + off);
        const float2 p = *reinterpret_cast<const float2*>(h_imp + off);
        M[2 * i] = m.x; M[2 * i + 1] = m.y;
        I[2 * i] = p.x; I[2 * i + 1] = p.y;
    }
    float* sq = smem + SQ_OFF;
    float* sk = smem + SK_OFF;
    float* sin = smem + SIN_OFF;
    float* sa = smem + SA_OFF;
    constexpr int NT = 32 * PWARPS;
    {   // every load of the chunk's inputs first, then the stores (zeros and decay 1 after the sequence's end)
        RowStage<in_t, PK, PK, NT> rq, rk;
        RowStage<in_t, BV, 2 * BV, NT> rv, rb;
        DecayStage<NT> ra;
        rq.load(q, PK, 0, cs, i_h, n_tok);
        rk.load(k, PK, 0, cs, i_h, n_tok);
        rv.load(v, PV, (u64)i_v * BV, cs, i_h, n_tok);
        rb.load(beta, PV, (u64)i_v * BV, cs, i_h, n_tok);
        ra.load(g, cs, i_h, n_tok);
        rq.store(sq, scale);
        rk.store(sk, 1.f);
        rv.store(sin, 1.f);
        rb.store(sin + BV, 1.f);
        ra.store<true>(sa, I0);
    }
    __syncthreads();

    float* red = smem + RED_OFF + w * 16 * RED_STRIDE;
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
                    I[e] = fmaf(ar.x, I[e], fmaf(kk, b2[cc], ar.y));
                    M[e] = fmaf(ar.x, M[e], kr[i] * v2[cc]);
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
