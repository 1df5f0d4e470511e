// Pieces shared by the CUDA kernels (sweep.cu, output.cu): the host (palimpsa/ops/cuda/nvrtc.py, kernel_source)
// prepends this file to each, after the kernel's #defines.
//
// Each thread of both kernels holds R = K / 16 consecutive key rows of 2 adjacent value columns (16 lanes over K, 2
// over V), E = 2 R state elements.  16-bit floats are distinct types, so that one overload of to_f / from_f serves
// each tensor's own dtype; PIN, PG, PDO (0 bfloat16, 1 float16, 2 float32) choose in_t, g_t and do_t.

#define R (PK / 16)
#define E (2 * R)

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

// Stage a chunk's rows of one head into shared memory as float32, by all NTHREADS threads of the block: for the
// chunk's token j < PC, dst[j * DST_STRIDE + x] = src[((cs + j) * PH + i_h) * ROW_LEN + OFF + x] (times `factor`
// when SCALED) for x < L, zeros for j >= n_tok.  With PALIGNED (the host checked every input's address and row
// offsets for 16-byte alignment) and L a multiple of the vector width, each thread moves 16-byte vectors.
template <typename T, int L, int DST_STRIDE, int NTHREADS, bool SCALED>
__device__ __forceinline__ void stage_rows(float* dst, const T* __restrict__ src, int row_len, u64 off, int cs,
                                           int i_h, int n_tok, float factor) {
    constexpr int VN = 16 / sizeof(T);
    constexpr int VEC = (PALIGNED && L % VN == 0 && DST_STRIDE % 4 == 0) ? VN : 1;
    constexpr int PER = L / VEC;
    for (int idx = threadIdx.x; idx < PC * PER; idx += NTHREADS) {
        const int j = idx / PER, x = (idx - j * PER) * VEC;
        float* d = dst + j * DST_STRIDE + x;
        float f[VEC];
        if (j < n_tok) {
            const T* s = src + ((u64)(cs + j) * PH + i_h) * row_len + off + x;
            if constexpr (VEC == 1) {
                f[0] = to_f(s[0]);
            } else {
                unpack(*reinterpret_cast<const uint4*>(s), s, f);
            }
#pragma unroll
            for (int i = 0; i < VEC; ++i) f[i] = SCALED ? f[i] * factor : f[i];
        } else {
#pragma unroll
            for (int i = 0; i < VEC; ++i) f[i] = 0.f;
        }
        if constexpr (VEC == 1) {
            d[0] = f[0];
        } else {
#pragma unroll
            for (int i = 0; i < VEC; i += 4)
                *reinterpret_cast<float4*>(d + i) = make_float4(f[i], f[i + 1], f[i + 2], f[i + 3]);
        }
    }
}
