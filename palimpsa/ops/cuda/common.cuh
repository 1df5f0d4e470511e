// Pieces shared by the CUDA kernels (sweep.cu, output.cu): the host (palimpsa/ops/cuda/nvrtc.py, kernel_source)
// prepends this file to each, after the kernel's #defines.
//
// Each thread of both kernels holds R = K / 16 consecutive key rows of 2 adjacent value columns (16 lanes over K, 2
// over V), E = 2 R state elements.  16-bit floats are distinct types, so that one overload of to_f / from_f serves
// each tensor's own dtype; PIN, PG, PDO (0 bfloat16, 1 float16, 2 float32) choose in_t, g_t and do_t.

// PKLANES (the sweep's layout, 16 unless it defines 32): lanes over K.  With 32, each thread holds the rows lane + 32 i
// (i < R = K / 32) of 4 adjacent value columns, E = 4 R elements, a warp still owning 4 columns.
#ifndef PKLANES
#define PKLANES 16
#endif
#define R (PK / PKLANES)
#define CW (PKLANES / 8)
#define E (CW * R)

typedef unsigned short u16;
typedef unsigned long long u64;

struct bf16 { u16 bits; };
struct f16 { u16 bits; };
__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(bf16 x) { return __uint_as_float(((unsigned)x.bits) << 16); }
__device__ __forceinline__ float to_f(f16 x) {
    float r;
    asm("cvt.f32.f16 %0, %1;" : "=f"(r) : "h"(x.bits));
    return r;
}
__device__ __forceinline__ void from_f(float x, float* dst) { *dst = x; }
__device__ __forceinline__ void from_f(float x, bf16* dst) {
    u16 r;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(x));
    dst->bits = r;
}
__device__ __forceinline__ void from_f(float x, f16* dst) {
    u16 r;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(x));
    dst->bits = r;
}
#if PIN == 0
typedef bf16 in_t;
#elif PIN == 1
typedef f16 in_t;
#else
typedef float in_t;
#endif
#if PG == 0
typedef bf16 g_t;
#elif PG == 1
typedef f16 g_t;
#else
typedef float g_t;
#endif
#if PDO == 0
typedef bf16 do_t;
#elif PDO == 1
typedef f16 do_t;
#else
typedef float do_t;
#endif

__device__ __forceinline__ float rcp(float x) {  // 1 / x in one MUFU op (x >= the prior > 0)
    float r;
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
    return r;
}

// R consecutive floats of shared memory into registers, in 16- or 8-byte pieces where the row count allows
__device__ __forceinline__ void load_rows(const float* src, float (&x)[R]) {
#if R % 4 == 0
#pragma unroll
    for (int i = 0; i < R; i += 4) {
        float4 t = *reinterpret_cast<const float4*>(src + i);
        x[i] = t.x; x[i + 1] = t.y; x[i + 2] = t.z; x[i + 3] = t.w;
    }
#elif R % 2 == 0
#pragma unroll
    for (int i = 0; i < R; i += 2) {
        float2 t = *reinterpret_cast<const float2*>(src + i);
        x[i] = t.x; x[i + 1] = t.y;
    }
#else
#pragma unroll
    for (int i = 0; i < R; ++i) x[i] = src[i];
#endif
}

__device__ __forceinline__ void store_rows(float* dst, const float (&x)[R]) {
#if R % 2 == 0
#pragma unroll
    for (int i = 0; i < R; i += 2) *reinterpret_cast<float2*>(dst + i) = make_float2(x[i], x[i + 1]);
#else
#pragma unroll
    for (int i = 0; i < R; ++i) dst[i] = x[i];
#endif
}


// Eight 16-bit or four 32-bit floats of a 16-byte vector, as float32 (the pointer argument only picks the overload)
__device__ __forceinline__ void unpack(const uint4& u, const bf16*, float (&x)[8]) {
    const unsigned w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        x[2 * i] = __uint_as_float(w[i] << 16);
        x[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
}
__device__ __forceinline__ void unpack(const uint4& u, const f16*, float (&x)[8]) {
    const unsigned w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        x[2 * i] = to_f(f16{(u16)(w[i] & 0xffffu)});
        x[2 * i + 1] = to_f(f16{(u16)(w[i] >> 16)});
    }
}
__device__ __forceinline__ void unpack(const uint4& u, const float*, float (&x)[4]) {
    x[0] = __uint_as_float(u.x); x[1] = __uint_as_float(u.y); x[2] = __uint_as_float(u.z); x[3] = __uint_as_float(u.w);
}

// A chunk's rows of one head, staged into shared memory as float32 by all NTHREADS threads of the block in two
// phases, so that a block issues every global load of a chunk before it waits for any (load() for each tensor, then
// store() for each): for the chunk's token j < PC, dst[j * DST_STRIDE + x] = src[((cs + j) * PH + i_h) * row_len +
// off + x] (times `factor` in store) for x < L, zeros for j >= n_tok.  With PALIGNED (the host checked every input's
// address and row length for 16-byte alignment) and L a multiple of the vector width, each thread moves 16-byte
// vectors.
template <typename T, int L, int DST_STRIDE, int NTHREADS>
struct RowStage {
    static constexpr int VN = 16 / sizeof(T);
    static constexpr int VEC = (PALIGNED && L % VN == 0 && DST_STRIDE % 4 == 0) ? VN : 1;
    static constexpr int PER = L / VEC;
    static constexpr int ITERS = (PC * PER + NTHREADS - 1) / NTHREADS;
    uint4 raw[VEC == 1 ? 1 : ITERS];
    T one[VEC == 1 ? ITERS : 1];

    __device__ __forceinline__ void load(const T* __restrict__ src, int row_len, u64 off, int cs, int i_h,
                                         int n_tok) {
#pragma unroll
        for (int it = 0; it < ITERS; ++it) {
            const int idx = it * NTHREADS + threadIdx.x;
            const int j = idx / PER, x = (idx - j * PER) * VEC;
            const bool ok = idx < PC * PER && j < n_tok;
            const T* s = src + ((u64)(cs + j) * PH + i_h) * row_len + off + x;
            if constexpr (VEC == 1) {
                one[it] = ok ? s[0] : T{};
            } else {
                raw[it] = ok ? *reinterpret_cast<const uint4*>(s) : make_uint4(0u, 0u, 0u, 0u);
            }
        }
    }

    __device__ __forceinline__ void store(float* dst, float factor) const { store_rows(dst, factor, nullptr); }
    // the same, token j's values times factor * token_factor[j]
    __device__ __forceinline__ void store(float* dst, float factor, const float* token_factor) const {
        store_rows(dst, factor, token_factor);
    }

    __device__ __forceinline__ void store_rows(float* dst, float scalar, const float* token_factor) const {
#pragma unroll
        for (int it = 0; it < ITERS; ++it) {
            const int idx = it * NTHREADS + threadIdx.x;
            if (ITERS * NTHREADS > PC * PER && idx >= PC * PER) break;
            const int j = idx / PER, x = (idx - j * PER) * VEC;
            const float factor = token_factor ? scalar * token_factor[j] : scalar;
            float* d = dst + j * DST_STRIDE + x;
            if constexpr (VEC == 1) {
                d[0] = to_f(one[it]) * factor;
            } else {
                float f[VEC];
                unpack(raw[it], (const T*)nullptr, f);
#pragma unroll
                for (int i = 0; i < VEC; i += 4)
                    *reinterpret_cast<float4*>(d + i) =
                        make_float4(f[i] * factor, f[i + 1] * factor, f[i + 2] * factor, f[i + 3] * factor);
            }
        }
    }
};

// The chunk's decays: NTHREADS threads load g of tokens j < PC (load()), then store exp(g) (1 after n_tok) and the
// prior term (1 - exp(g)) I0 next to it (store())
template <int NTHREADS>
struct DecayStage {
    static constexpr int ITERS = (PC + NTHREADS - 1) / NTHREADS;
    float gv[ITERS];
    __device__ __forceinline__ void load(const g_t* __restrict__ g, int cs, int i_h, int n_tok) {
#pragma unroll
        for (int it = 0; it < ITERS; ++it) {
            const int j = it * NTHREADS + threadIdx.x;
            gv[it] = (j < PC && j < n_tok) ? to_f(g[(u64)(cs + j) * PH + i_h]) : 0.f;
        }
    }
    __device__ __forceinline__ void store(float* sa, float I0) const {
#pragma unroll
        for (int it = 0; it < ITERS; ++it) {
            const int j = it * NTHREADS + threadIdx.x;
            if (j < PC) {
                const float a = expf(gv[it]);  // g = 0 (a = 1) after the sequence's end
                sa[2 * j] = a;
                sa[2 * j + 1] = (1.f - a) * I0;
            }
        }
    }
};

// The log decays of a chunk of PC = 32 tokens, one token a lane of every warp (each warp scans them itself: identical
// results, no barrier): load() reads token `lane`'s g (0, decay 1, after the sequence's end); scan() gives its log
// decay from the chunk's start through that token, and the chunk's whole in b_end.  A chunk whose whole log decay is at
// least MIN_SCALED_LOG_DECAY can step states scaled by 1 / A_j (A_j = exp of that log decay): 1 / A_j stays below
// exp(40) = 2.4e17, so a scaled state stays finite for states up to 1e21 in magnitude (float32's range is 3.4e38;
// under a decay that strong the state is about its last few tokens' k^2 beta and k v).
#define MIN_SCALED_LOG_DECAY (-40.f)
struct ChunkDecays {
    float gj;
    __device__ __forceinline__ void load(const g_t* __restrict__ g, int cs, int i_h, int n_tok, int lane) {
        gj = lane < n_tok ? to_f(g[(u64)(cs + lane) * PH + i_h]) : 0.f;
    }
    __device__ __forceinline__ float scan(int lane, float& b_end) const {
        float b = gj;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const float t = __shfl_up_sync(0xffffffffu, b, o);
            if (lane >= o) b += t;
        }
        b_end = __shfl_sync(0xffffffffu, b, 31);
        return b;
    }
};
