/*
 * cpu/kernels-avx512.c — the AVX-512 (F/BW/VL/DQ/VNNI) kernel table, same signatures and results as
 * kernels-ref.c (bit-exact conversions and quantization; dot products within the tolerances of
 * tests/test-kernels.c). Quantized products use vpdpbusd (u8 x s8): 4-bit weights are already
 * unsigned, Q8_0 weights are offset by +128, and the offset times sum(x) is subtracted once per token.
 * gemm register-blocks 4 rows x 3 tokens so each unpacked weight block serves 3 tokens and each
 * activation block 4 rows; decode tiles (1 token) prefetch the weights. Not here: threading (the
 * caller splits rows), ISA checks (dispatch.c). NULL table without the ISA flags. Measurements and
 * version history: docs/KERNELS.md.
 */
#include "../common.h"
#include "../quant.h"
#include "kernels.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__) && \
    defined(__AVX512VNNI__) && defined(__FMA__) && defined(__F16C__)

#    include <immintrin.h>
#    include <math.h>

#    define INLINE static inline __attribute__((always_inline))
#    define UNROLL _Pragma("GCC unroll 16")

/* ================================================================================================
 * small helpers
 * ================================================================================================ */

/* n (< 16) lanes mask */
INLINE __mmask16 lanes16(int64_t n) {
    return (__mmask16) ((1u << n) - 1u);
}

/* 16 fp16 / bf16 values to f32 */
INLINE __m512 load_f16(const uint16_t * p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *) p));
}
INLINE __m512 maskz_load_f16(__mmask16 m, const uint16_t * p) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
}
INLINE __m512 load_bf16(const uint16_t * p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *) p)), 16));
}
INLINE __m512 maskz_load_bf16(__mmask16 m, const uint16_t * p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

/* f32 -> f16 round to nearest even; NaN becomes sign|0x7e00 as moqae_f32_to_f16 (the hardware keeps
 * the payload). */
INLINE __m256i cvt_f16(__m512 v) {
    const __m256i  h   = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    const __m256i  qn  = _mm256_or_si256(_mm256_and_si256(h, _mm256_set1_epi16((short) 0x8000)),
                                         _mm256_set1_epi16(0x7e00));
    return _mm256_mask_mov_epi16(h, nan, qn);
}

/* f32 -> bf16 round to nearest even, NaN forced quiet (as ggml_compute_fp32_to_bf16). */
INLINE __m256i cvt_bf16(__m512 v) {
    const __m512i  u    = _mm512_castps_si512(v);
    const __m512i  odd  = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    const __m512i  r    = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), 16);
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    const __m512i  q    = _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(64));
    return _mm512_cvtepi32_epi16(_mm512_mask_mov_epi32(r, nan, q));
}

/* roundf(): half away from zero, exactly (v - trunc(v) is exact). */
INLINE __m512 round_away(__m512 v) {
    const __m512    t    = _mm512_roundscale_ps(v, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
    const __m512    frac = _mm512_abs_ps(_mm512_sub_ps(v, t));
    const __mmask16 up   = _mm512_cmp_ps_mask(frac, _mm512_set1_ps(0.5f), _CMP_GE_OQ);
    const __m512    one  = _mm512_castsi512_ps(_mm512_or_si512(
        _mm512_and_si512(_mm512_castps_si512(v), _mm512_set1_epi32((int) 0x80000000u)),
        _mm512_castps_si512(_mm512_set1_ps(1.0f))));
    return _mm512_mask_add_ps(t, up, t, one);
}

/* e^x, about 1 ulp on [-87, 88] (Cephes expf polynomial, Cody-Waite reduction); vscalefps gives inf
 * above ~88.72 and 0 / subnormals below, like expf. */
INLINE __m512 exp512(__m512 x) {
    x              = _mm512_max_ps(_mm512_set1_ps(-104.0f), _mm512_min_ps(_mm512_set1_ps(89.0f), x));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r       = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r              = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p       = _mm512_set1_ps(1.9875691500e-4f);
    p              = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p              = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p              = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p              = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p              = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p              = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

/* ================================================================================================
 * to_float / from_float
 * ================================================================================================ */

static void to_float_f32_avx512(const void * x, float * y, int64_t n) {
    memcpy(y, x, (size_t) n * sizeof(float));
}

static void to_float_f16_avx512(const void * x, float * y, int64_t n) {
    const uint16_t * h = x;
    int64_t          i = 0;
    for (; i + 16 <= n; i += 16) {
        _mm512_storeu_ps(y + i, load_f16(h + i));
    }
    if (i < n) {
        const __mmask16 m = lanes16(n - i);
        _mm512_mask_storeu_ps(y + i, m, maskz_load_f16(m, h + i));
    }
}

static void to_float_bf16_avx512(const void * x, float * y, int64_t n) {
    const uint16_t * h = x;
    int64_t          i = 0;
    for (; i + 16 <= n; i += 16) {
        _mm512_storeu_ps(y + i, load_bf16(h + i));
    }
    if (i < n) {
        const __mmask16 m = lanes16(n - i);
        _mm512_mask_storeu_ps(y + i, m, maskz_load_bf16(m, h + i));
    }
}

/* 16 packed bytes of nibbles -> (low nibbles, high nibbles) as 16 int32 each */
INLINE void nibbles_i32(const uint8_t * qs, __m512i * lo, __m512i * hi) {
    const __m128i q = _mm_loadu_si128((const __m128i *) qs);
    *lo             = _mm512_cvtepu8_epi32(_mm_and_si128(q, _mm_set1_epi8(0x0f)));
    *hi             = _mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(q, 4), _mm_set1_epi8(0x0f)));
}

static void to_float_q4_0_avx512(const void * x, float * y, int64_t n) {
    const moqae_block_q4_0 * b = x;
    for (int64_t i = 0; i < n / MOQAE_QK4_0; i++) {
        const __m512 d = _mm512_set1_ps(moqae_f16_to_f32(b[i].d));
        __m512i      lo, hi;
        nibbles_i32(b[i].qs, &lo, &hi);
        const __m512i eight = _mm512_set1_epi32(8);
        _mm512_storeu_ps(y + i * 32, _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_sub_epi32(lo, eight))));
        _mm512_storeu_ps(y + i * 32 + 16, _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_sub_epi32(hi, eight))));
    }
}

static void to_float_q4_1_avx512(const void * x, float * y, int64_t n) {
    const moqae_block_q4_1 * b = x;
    for (int64_t i = 0; i < n / MOQAE_QK4_1; i++) {
        const __m512 d = _mm512_set1_ps(moqae_f16_to_f32(b[i].d));
        const __m512 m = _mm512_set1_ps(moqae_f16_to_f32(b[i].m));
        __m512i      lo, hi;
        nibbles_i32(b[i].qs, &lo, &hi);
        __m512 a = _mm512_mul_ps(d, _mm512_cvtepi32_ps(lo));
        __m512 c = _mm512_mul_ps(d, _mm512_cvtepi32_ps(hi));
        /* the reference rounds d*q before adding m: keep the compiler from fusing them into an FMA */
        __asm__("" : "+v"(a), "+v"(c));
        _mm512_storeu_ps(y + i * 32, _mm512_add_ps(a, m));
        _mm512_storeu_ps(y + i * 32 + 16, _mm512_add_ps(c, m));
    }
}

/* Q8_0 and Q8_1 blocks share the layout of qs, at byte offset qoff in blocks of bs bytes. */
INLINE void to_float_q8(const uint8_t * b, size_t bs, size_t qoff, float * y, int64_t n) {
    for (int64_t i = 0; i < n / 32; i++, b += bs) {
        uint16_t d16;
        memcpy(&d16, b, 2);
        const __m512  d = _mm512_set1_ps(moqae_f16_to_f32(d16));
        const __m256i q = _mm256_loadu_si256((const __m256i *) (b + qoff));
        const __m512  lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(q)));
        const __m512  hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(q, 1)));
        _mm512_storeu_ps(y + i * 32, _mm512_mul_ps(d, lo));
        _mm512_storeu_ps(y + i * 32 + 16, _mm512_mul_ps(d, hi));
    }
}

static void to_float_q8_0_avx512(const void * x, float * y, int64_t n) {
    to_float_q8(x, sizeof(moqae_block_q8_0), offsetof(moqae_block_q8_0, qs), y, n);
}

static void to_float_q8_1_avx512(const void * x, float * y, int64_t n) {
    to_float_q8(x, sizeof(moqae_block_q8_1), offsetof(moqae_block_q8_1, qs), y, n);
}

static void from_float_f32_avx512(const float * x, void * y, int64_t n) {
    memcpy(y, x, (size_t) n * sizeof(float));
}

static void f32_to_f16_avx512(int64_t n, const float * x, uint16_t * y) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        _mm256_storeu_si256((__m256i *) (y + i), cvt_f16(_mm512_loadu_ps(x + i)));
    }
    if (i < n) {
        const __mmask16 m = lanes16(n - i);
        _mm256_mask_storeu_epi16(y + i, m, cvt_f16(_mm512_maskz_loadu_ps(m, x + i)));
    }
}

static void from_float_f16_avx512(const float * x, void * y, int64_t n) {
    f32_to_f16_avx512(n, x, y);
}

static void from_float_bf16_avx512(const float * x, void * y, int64_t n) {
    uint16_t * h = y;
    int64_t    i = 0;
    for (; i + 16 <= n; i += 16) {
        _mm256_storeu_si256((__m256i *) (h + i), cvt_bf16(_mm512_loadu_ps(x + i)));
    }
    if (i < n) {
        const __mmask16 m = lanes16(n - i);
        _mm256_mask_storeu_epi16(h + i, m, cvt_bf16(_mm512_maskz_loadu_ps(m, x + i)));
    }
}

/* One block of 32: d = amax/127, q = roundf(x * (1/d)) as the reference; returns sum(q), *d unrounded. */
INLINE int quantize_q8_block(const float * x, float * d, int8_t * qs) {
    const __m512 v0   = _mm512_loadu_ps(x);
    const __m512 v1   = _mm512_loadu_ps(x + 16);
    const float  amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
    *d                = amax / 127.0f;
    const __m512 id   = _mm512_set1_ps(*d != 0.0f ? 1.0f / *d : 0.0f);
    const __m512i q0  = _mm512_cvtps_epi32(round_away(_mm512_mul_ps(v0, id)));
    const __m512i q1  = _mm512_cvtps_epi32(round_away(_mm512_mul_ps(v1, id)));
    _mm_storeu_si128((__m128i *) qs, _mm512_cvtepi32_epi8(q0));
    _mm_storeu_si128((__m128i *) (qs + 16), _mm512_cvtepi32_epi8(q1));
    return _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
}

static void from_float_q8_0_avx512(const float * x, void * y, int64_t n) {
    moqae_block_q8_0 * b = y;
    for (int64_t i = 0; i < n / MOQAE_QK8_0; i++) {
        float d;
        quantize_q8_block(x + i * MOQAE_QK8_0, &d, b[i].qs);
        b[i].d = moqae_f32_to_f16(d);
    }
}

static void from_float_q8_1_avx512(const float * x, void * y, int64_t n) {
    moqae_block_q8_1 * b = y;
    for (int64_t i = 0; i < n / MOQAE_QK8_1; i++) {
        float     d;
        const int sum = quantize_q8_block(x + i * MOQAE_QK8_1, &d, b[i].qs);
        b[i].d        = moqae_f32_to_f16(d);
        b[i].s        = moqae_f32_to_f16((float) sum * d);
    }
}

/* ================================================================================================
 * quantized gemm / vec_dot
 *
 * A step covers 4 consecutive blocks. Its bytes are read with 2-4 contiguous zmm loads, and permutes
 * (vpermt2w/d, fixed index tables below) pick out: lo = elements 0-15 of block k in 128-bit lane k,
 * hi = elements 16-31 likewise, and each block's d replicated over that lane's four int32 lanes. The
 * weights and activations get the same layout, so vpdpbusd's int32 lanes 4k..4k+3 hold partial sums
 * of block k, and one cvt + FMA per (row, token) applies d_w * d_x. For Q4_1 the m (weights) and s
 * (activations) of a 16-block group collect in the upper words of a register and m*s is added once
 * per group with a 16-lane FMA. (A gather per group was 3x slower on Zen 5: vpgatherdd is microcoded.)
 * The last, partial step of a row uses masked loads: missing blocks read as zero, with zero scales.
 * Q8_0 weights alone use 16-byte loads (the overlapping zmm loads split cache lines, which halved
 * cold-DRAM decode).
 * ================================================================================================ */

/* Q4_0 step (72 bytes): quants, words from bytes [0, 72) */
static const uint16_t IDX_Q4_0_QS[32] __attribute__((aligned(64))) = {
    1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 14, 15, 16, 17,
    19, 20, 21, 22, 23, 24, 25, 26, 28, 29, 30, 31, 32, 33, 34, 35,
};
/* Q4_0: d of each block in words 4k..4k+3 */
static const uint16_t IDX_Q4_0_D[32] __attribute__((aligned(64))) = {
    0, 0, 0, 0, 9, 9, 9, 9, 18, 18, 18, 18, 27, 27, 27, 27,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
};
/* Q4_1 step (80 bytes): quants, dwords from bytes [0, 80) */
static const uint32_t IDX_Q4_1_QS[16] __attribute__((aligned(64))) = {
    1, 2, 3, 4, 6, 7, 8, 9, 11, 12, 13, 14, 16, 17, 18, 19,
};
/* Q4_1: d in words 4k..4k+3, and m of block k in word 16+s+k, for the step at block s of its group */
static const uint16_t IDX_Q4_1_DM[4][32] __attribute__((aligned(64))) = {
    {
        0, 0, 0, 0, 10, 10, 10, 10, 20, 20, 20, 20, 30, 30, 30, 30,
        1, 11, 21, 31, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    },
    {
        0, 0, 0, 0, 10, 10, 10, 10, 20, 20, 20, 20, 30, 30, 30, 30,
        0, 0, 0, 0, 1, 11, 21, 31, 0, 0, 0, 0, 0, 0, 0, 0,
    },
    {
        0, 0, 0, 0, 10, 10, 10, 10, 20, 20, 20, 20, 30, 30, 30, 30,
        0, 0, 0, 0, 0, 0, 0, 0, 1, 11, 21, 31, 0, 0, 0, 0,
    },
    {
        0, 0, 0, 0, 10, 10, 10, 10, 20, 20, 20, 20, 30, 30, 30, 30,
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 11, 21, 31,
    },
};
/* Q8_0 step (136 bytes): elements 0-15 from bytes [0, 128), 16-31 from bytes [8, 136), d from [0, 128) */
static const uint16_t IDX_Q8_0_LO[32] __attribute__((aligned(64))) = {
    1, 2, 3, 4, 5, 6, 7, 8, 18, 19, 20, 21, 22, 23, 24, 25,
    35, 36, 37, 38, 39, 40, 41, 42, 52, 53, 54, 55, 56, 57, 58, 59,
};
static const uint16_t IDX_Q8_0_HI[32] __attribute__((aligned(64))) = {
    5, 6, 7, 8, 9, 10, 11, 12, 22, 23, 24, 25, 26, 27, 28, 29,
    39, 40, 41, 42, 43, 44, 45, 46, 56, 57, 58, 59, 60, 61, 62, 63,
};
static const uint16_t IDX_Q8_0_D[32] __attribute__((aligned(64))) = {
    0, 0, 0, 0, 17, 17, 17, 17, 34, 34, 34, 34, 51, 51, 51, 51,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
};
/* Q8_1 step (144 bytes): elements 0-15 from bytes [0, 128), 16-31 from [16, 144) with the same index */
static const uint32_t IDX_Q8_1_QS[16] __attribute__((aligned(64))) = {
    1, 2, 3, 4, 10, 11, 12, 13, 19, 20, 21, 22, 28, 29, 30, 31,
};
/* Q8_1: d in words 4k..4k+3, s of block k in word 16+s+k */
static const uint16_t IDX_Q8_1_DS[4][32] __attribute__((aligned(64))) = {
    {
        0, 0, 0, 0, 18, 18, 18, 18, 36, 36, 36, 36, 54, 54, 54, 54,
        1, 19, 37, 55, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    },
    {
        0, 0, 0, 0, 18, 18, 18, 18, 36, 36, 36, 36, 54, 54, 54, 54,
        0, 0, 0, 0, 1, 19, 37, 55, 0, 0, 0, 0, 0, 0, 0, 0,
    },
    {
        0, 0, 0, 0, 18, 18, 18, 18, 36, 36, 36, 36, 54, 54, 54, 54,
        0, 0, 0, 0, 0, 0, 0, 0, 1, 19, 37, 55, 0, 0, 0, 0,
    },
    {
        0, 0, 0, 0, 18, 18, 18, 18, 36, 36, 36, 36, 54, 54, 54, 54,
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 19, 37, 55,
    },
};

enum qkind { Q4_0 = 0, Q4_1 = 1, Q8_0 = 2 };

#    define QR_MAX 8 /* register tile bounds (rows, tokens) */
#    define QT_MAX 4

#    define QPF_AHEAD 8192 /* decode prefetch distance (moqae_prefetch_offset, kernels.h) */

INLINE int qk_wbytes(enum qkind k) {
    return k == Q4_0 ? (int) sizeof(moqae_block_q4_0) : k == Q4_1 ? (int) sizeof(moqae_block_q4_1)
                                                                    : (int) sizeof(moqae_block_q8_0);
}
INLINE int qk_xbytes(enum qkind k) {
    return k == Q4_1 ? (int) sizeof(moqae_block_q8_1) : (int) sizeof(moqae_block_q8_0);
}

INLINE __m512i idx_load(const void * p) {
    return _mm512_load_si512(p);
}

/* The 64 bytes at p + off, of which only [0, avail) relative to p may be read (the rest read as 0). */
INLINE __m512i load64(const uint8_t * p, int off, int avail, int full) {
    if (full) {
        return _mm512_loadu_si512(p + off);
    }
    const int n = avail - off;
    if (n <= 0) {
        return _mm512_setzero_si512();
    }
    return _mm512_maskz_loadu_epi8(n >= 64 ? ~(__mmask64) 0 : (((__mmask64) 1 << n) - 1), p + off);
}

/* 16 bytes at p + k * bs into 128-bit lane k for k < nbl, other lanes zero */
INLINE __m512i load_lanes(const uint8_t * p, size_t bs, int nbl) {
    __m512i v = _mm512_zextsi128_si512(_mm_loadu_si128((const __m128i *) p));
    for (int k = 1; k < nbl; k++) {
        const __m128i q = _mm_loadu_si128((const __m128i *) (p + k * bs));
        v = k == 1 ? _mm512_inserti32x4(v, q, 1) : k == 2 ? _mm512_inserti32x4(v, q, 2) : _mm512_inserti32x4(v, q, 3);
    }
    return v;
}

INLINE __m512 cvt_lo_halves(__m512i v) {
    return _mm512_cvtph_ps(_mm512_castsi512_si256(v));
}

/* Weights of nbl (<= 4) blocks at p, the step at block 4*si of its group: unsigned lo/hi bytes, d per
 * lane; Q4_1 merges its m into words 16+4si.. of *mw. */
INLINE void wstep(const enum qkind k, const uint8_t * p, const int nbl, const int si, __m512i * lo, __m512i * hi,
                  __m512 * d, __m512i * mw) {
    const int full = nbl == 4, avail = nbl * qk_wbytes(k);
    if (k == Q8_0) { /* 16-byte loads: see the section comment */
        const __m512i off = _mm512_set1_epi8((char) 0x80); /* +128: vpdpbusd wants unsigned */
        const __m512i z0 = load64(p, 0, avail, full), z1 = load64(p, 64, avail, full);
        *lo               = _mm512_xor_si512(load_lanes(p + 2, sizeof(moqae_block_q8_0), nbl), off);
        *hi               = _mm512_xor_si512(load_lanes(p + 18, sizeof(moqae_block_q8_0), nbl), off);
        *d                = cvt_lo_halves(_mm512_permutex2var_epi16(z0, idx_load(IDX_Q8_0_D), z1));
        return;
    }
    const __m512i z0 = load64(p, 0, avail, full);
    __m512i       q;
    if (k == Q4_0) {
        const __m512i z1 = full ? _mm512_zextsi128_si512(_mm_loadl_epi64((const __m128i *) (p + 64)))
                                : load64(p, 64, avail, 0);
        q  = _mm512_permutex2var_epi16(z0, idx_load(IDX_Q4_0_QS), z1);
        *d = cvt_lo_halves(_mm512_permutexvar_epi16(idx_load(IDX_Q4_0_D), z0));
    } else {
        const __m512i z1 = full ? _mm512_zextsi128_si512(_mm_loadu_si128((const __m128i *) (p + 64)))
                                : load64(p, 64, avail, 0);
        q                = _mm512_permutex2var_epi32(z0, idx_load(IDX_Q4_1_QS), z1);
        const __m512i dm = _mm512_permutexvar_epi16(idx_load(IDX_Q4_1_DM[si]), z0);
        *d               = cvt_lo_halves(dm);
        *mw              = _mm512_mask_mov_epi16(*mw, (__mmask32) (0xfu << (16 + 4 * si)), dm);
    }
    const __m512i nib = _mm512_set1_epi8(0x0f);
    *lo               = _mm512_and_si512(q, nib);
    *hi               = _mm512_and_si512(_mm512_srli_epi16(q, 4), nib);
}

/* Activations (Q8_0, or Q8_1 for Q4_1) of nbl blocks at p: lo/hi signed bytes, d per lane; Q8_1 merges
 * its s into words 16+4si.. of *sw. */
INLINE void xstep(const enum qkind k, const uint8_t * p, const int nbl, const int si, __m512i * lo, __m512i * hi,
                  __m512 * d, __m512i * sw) {
    const int full = nbl == 4, avail = nbl * qk_xbytes(k);
    if (k == Q4_1) {
        const __m512i z0 = load64(p, 0, avail, full), z1 = load64(p, 64, avail, full);
        const __m512i z2 = load64(p, 16, avail, full), z3 = load64(p, 80, avail, full);
        *lo              = _mm512_permutex2var_epi32(z0, idx_load(IDX_Q8_1_QS), z1);
        *hi              = _mm512_permutex2var_epi32(z2, idx_load(IDX_Q8_1_QS), z3);
        const __m512i ds = _mm512_permutex2var_epi16(z0, idx_load(IDX_Q8_1_DS[si]), z1);
        *d               = cvt_lo_halves(ds);
        *sw              = _mm512_mask_mov_epi16(*sw, (__mmask32) (0xfu << (16 + 4 * si)), ds);
    } else {
        const __m512i z0 = load64(p, 0, avail, full), z1 = load64(p, 64, avail, full);
        const __m512i z2 = load64(p, 8, avail, full), z3 = load64(p, 72, avail, full);
        *lo              = _mm512_permutex2var_epi16(z0, idx_load(IDX_Q8_0_LO), z1);
        *hi              = _mm512_permutex2var_epi16(z2, idx_load(IDX_Q8_0_HI), z3);
        *d               = cvt_lo_halves(_mm512_permutex2var_epi16(z0, idx_load(IDX_Q8_0_D), z1));
    }
}

/* One step (nbl <= 4 blocks) of an R x T tile; w, x point at the step's first block of row 0 / token 0. */
INLINE void qstep(const enum qkind k, const int R, const int T, const int si, const int nbl, const uint8_t * w,
                  size_t wrb, const uint8_t * x, size_t xrb, size_t pf, __m512 acc[QR_MAX][QT_MAX], __m512i * mw,
                  __m512i * sw) {
    __m512i wl[QR_MAX], wh[QR_MAX];
    __m512  dw[QR_MAX];
    UNROLL for (int r = 0; r < R; r++) {
        if (T == 1) { /* decode: see QPF_AHEAD */
            UNROLL for (int o = 0; o < 4 * qk_wbytes(k); o += 64) {
                _mm_prefetch((const char *) (w + r * wrb + pf + o), _MM_HINT_T0);
            }
        }
        wstep(k, w + r * wrb, nbl, si, &wl[r], &wh[r], &dw[r], &mw[r]);
    }
    UNROLL for (int t = 0; t < T; t++) {
        __m512i xl, xh;
        __m512  dx;
        xstep(k, x + t * xrb, nbl, si, &xl, &xh, &dx, &sw[t]);
        __m512i base = _mm512_setzero_si512();
        if (k != Q4_1) { /* weights were offset by +8 (Q4_0) or +128 (Q8_0): start from -offset*sum(x) */
            const __m512i off = _mm512_set1_epi8(k == Q4_0 ? 8 : (char) 0x80);
            base = _mm512_sub_epi32(base, _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(base, off, xl), off, xh));
        }
        UNROLL for (int r = 0; r < R; r++) {
            const __m512i i = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(base, wl[r], xl), wh[r], xh);
            acc[r][t]       = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i), _mm512_mul_ps(dw[r], dx), acc[r][t]);
        }
    }
}

/* One group of ng (<= 16) blocks. */
INLINE void qgroup(const enum qkind k, const int R, const int T, const int ng, const uint8_t * w, size_t wrb,
                   const uint8_t * x, size_t xrb, size_t pf, __m512 acc[QR_MAX][QT_MAX]) {
    const int WB = qk_wbytes(k), XB = qk_xbytes(k);
    __m512i   mw[QR_MAX], sw[QT_MAX];
    UNROLL for (int r = 0; r < R; r++) {
        mw[r] = _mm512_setzero_si512();
    }
    UNROLL for (int t = 0; t < T; t++) {
        sw[t] = _mm512_setzero_si512();
    }
    if (ng == 16) {
        UNROLL for (int si = 0; si < 4; si++) {
            qstep(k, R, T, si, 4, w + 4 * si * WB, wrb, x + 4 * si * XB, xrb, pf, acc, mw, sw);
        }
    } else { /* the row's last group: full steps, then one of 1-3 blocks with its size known statically */
        int si = 0;
        for (; 4 * si + 4 <= ng; si++) {
            qstep(k, R, T, si, 4, w + 4 * si * WB, wrb, x + 4 * si * XB, xrb, pf, acc, mw, sw);
        }
        const uint8_t * wt = w + 4 * si * WB;
        const uint8_t * xt = x + 4 * si * XB;
        switch (ng - 4 * si) {
            case 1: qstep(k, R, T, si, 1, wt, wrb, xt, xrb, pf, acc, mw, sw); break;
            case 2: qstep(k, R, T, si, 2, wt, wrb, xt, xrb, pf, acc, mw, sw); break;
            case 3: qstep(k, R, T, si, 3, wt, wrb, xt, xrb, pf, acc, mw, sw); break;
            default: break;
        }
    }
    if (k == Q4_1) { /* + sum over the group's blocks of m * s */
        UNROLL for (int r = 0; r < R; r++) {
            const __m512 m = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(mw[r], 1));
            UNROLL for (int t = 0; t < T; t++) {
                acc[r][t] = _mm512_fmadd_ps(m, _mm512_cvtph_ps(_mm512_extracti64x4_epi64(sw[t], 1)), acc[r][t]);
            }
        }
    }
}

INLINE void qtile(const enum qkind k, const int R, const int T, int64_t nb, const uint8_t * w, size_t wrb,
                  const uint8_t * x, size_t xrb, float * y, int64_t ldy) {
    __m512 acc[QR_MAX][QT_MAX];
    UNROLL for (int r = 0; r < R; r++) {
        UNROLL for (int t = 0; t < T; t++) {
            acc[r][t] = _mm512_setzero_ps();
        }
    }
    const int64_t WB = qk_wbytes(k), XB = qk_xbytes(k);
    const size_t  pf = moqae_prefetch_offset(R, wrb, QPF_AHEAD);
    int64_t       b  = 0;
    for (; b + 16 <= nb; b += 16) {
        qgroup(k, R, T, 16, w + b * WB, wrb, x + b * XB, xrb, pf, acc);
    }
    if (b < nb) {
        qgroup(k, R, T, (int) (nb - b), w + b * WB, wrb, x + b * XB, xrb, pf, acc);
    }
    UNROLL for (int r = 0; r < R; r++) {
        UNROLL for (int t = 0; t < T; t++) {
            y[t * ldy + r] = _mm512_reduce_add_ps(acc[r][t]);
        }
    }
}

#    define QTILE_FN(kind, R, T)                                                                        \
        static void qtile_##kind##_##R##x##T(int64_t n, const uint8_t * w, size_t wrb, const uint8_t * x, \
                                             size_t xrb, float * y, int64_t ldy) {                         \
            qtile(kind, R, T, n / 32, w, wrb, x, xrb, y, ldy);                                             \
        }
/* RD x 1 must be R x 1 or instantiated before */
#    define QGEMM_FNS(kind, R, T, RD)                                                                         \
        QTILE_FN(kind, R, T)                                                                                  \
        QTILE_FN(kind, R, 1)                                                                                  \
        QTILE_FN(kind, 1, T)                                                                                  \
        QTILE_FN(kind, 1, 1)                                                                                  \
        static const struct moqae_gemm_tiles qtiles_##kind = {R,                                              \
                                                              T,                                              \
                                                              RD,                                             \
                                                              qtile_##kind##_##R##x##T,                       \
                                                              qtile_##kind##_##R##x1,                         \
                                                              qtile_##kind##_1x##T,                           \
                                                              qtile_##kind##_1x1,                             \
                                                              qtile_##kind##_##RD##x1};                       \
        static void qgemm_##kind(int64_t n, int64_t n_rows, int64_t n_tok, const void * w, size_t wrb,       \
                                 const void * x, size_t xrb, float * y, int64_t ldy) {                      \
            moqae_gemm_tiled(&qtiles_##kind, n, n_rows, n_tok, w, wrb, x, xrb, y, ldy);                     \
        }                                                                                                    \
        static void qdot_##kind(int64_t n, float * s, const void * w, const void * x) {                      \
            qtile(kind, 1, 1, n / 32, w, 0, x, 0, s, 1);                                                     \
        }

/* tile shapes (rows x tokens): 4 x 3 for prefill, 4 x 1 for decode; all shapes from 3x3 to 4x4
 * measured within 5% (docs/KERNELS.md) */
QGEMM_FNS(Q4_0, 4, 3, 4)
QGEMM_FNS(Q4_1, 4, 3, 4)
QGEMM_FNS(Q8_0, 4, 3, 4)

/* ================================================================================================
 * float-type gemm / vec_dot (F32, F16, BF16 weights against activations of the same type)
 * ================================================================================================ */

enum fkind { F32 = 0, F16 = 1, BF16 = 2 };

#    define FR_MAX 8
#    define FT_MAX 4

/* 16 elements starting at element i of a row p, as f32 (m: only the first lanes, rest zero) */
INLINE __m512 fload(const enum fkind k, const uint8_t * p, int64_t i) {
    if (k == F32) {
        return _mm512_loadu_ps((const float *) p + i);
    }
    return k == F16 ? load_f16((const uint16_t *) p + i) : load_bf16((const uint16_t *) p + i);
}
INLINE __m512 fload_mask(const enum fkind k, __mmask16 m, const uint8_t * p, int64_t i) {
    if (k == F32) {
        return _mm512_maskz_loadu_ps(m, (const float *) p + i);
    }
    return k == F16 ? maskz_load_f16(m, (const uint16_t *) p + i) : maskz_load_bf16(m, (const uint16_t *) p + i);
}

INLINE void ftile(const enum fkind k, const int R, const int T, int64_t n, const uint8_t * w, size_t wrb,
                  const uint8_t * x, size_t xrb, float * y, int64_t ldy) {
    __m512 acc[FR_MAX][FT_MAX];
    UNROLL for (int r = 0; r < R; r++) {
        UNROLL for (int t = 0; t < T; t++) {
            acc[r][t] = _mm512_setzero_ps();
        }
    }
    const int64_t es = k == F32 ? 4 : 2;
    const size_t  pf = moqae_prefetch_offset(R, wrb, QPF_AHEAD);
    int64_t       i  = 0;
    for (; i + 16 <= n; i += 16) {
        __m512 wv[FR_MAX];
        UNROLL for (int r = 0; r < R; r++) {
            if (T == 1) { /* decode: see QPF_AHEAD */
                _mm_prefetch((const char *) (w + r * wrb + i * es + pf), _MM_HINT_T0);
            }
            wv[r] = fload(k, w + r * wrb, i);
        }
        UNROLL for (int t = 0; t < T; t++) {
            const __m512 xv = fload(k, x + t * xrb, i);
            UNROLL for (int r = 0; r < R; r++) {
                acc[r][t] = _mm512_fmadd_ps(wv[r], xv, acc[r][t]);
            }
        }
    }
    if (i < n) {
        const __mmask16 m = lanes16(n - i);
        __m512          wv[FR_MAX];
        UNROLL for (int r = 0; r < R; r++) {
            wv[r] = fload_mask(k, m, w + r * wrb, i);
        }
        UNROLL for (int t = 0; t < T; t++) {
            const __m512 xv = fload_mask(k, m, x + t * xrb, i);
            UNROLL for (int r = 0; r < R; r++) {
                acc[r][t] = _mm512_fmadd_ps(wv[r], xv, acc[r][t]);
            }
        }
    }
    UNROLL for (int r = 0; r < R; r++) {
        UNROLL for (int t = 0; t < T; t++) {
            y[t * ldy + r] = _mm512_reduce_add_ps(acc[r][t]);
        }
    }
}

/* one row: four accumulators to hide the FMA latency */
INLINE float fdot(const enum fkind k, int64_t n, const uint8_t * w, const uint8_t * x) {
    __m512  a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    int64_t i  = 0;
    for (; i + 64 <= n; i += 64) {
        a0 = _mm512_fmadd_ps(fload(k, w, i), fload(k, x, i), a0);
        a1 = _mm512_fmadd_ps(fload(k, w, i + 16), fload(k, x, i + 16), a1);
        a2 = _mm512_fmadd_ps(fload(k, w, i + 32), fload(k, x, i + 32), a2);
        a3 = _mm512_fmadd_ps(fload(k, w, i + 48), fload(k, x, i + 48), a3);
    }
    for (; i + 16 <= n; i += 16) {
        a0 = _mm512_fmadd_ps(fload(k, w, i), fload(k, x, i), a0);
    }
    if (i < n) {
        const __mmask16 m = lanes16(n - i);
        a1                = _mm512_fmadd_ps(fload_mask(k, m, w, i), fload_mask(k, m, x, i), a1);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
}

#    define FTILE_FN(kind, R, T)                                                                        \
        static void ftile_##kind##_##R##x##T(int64_t n, const uint8_t * w, size_t wrb, const uint8_t * x, \
                                             size_t xrb, float * y, int64_t ldy) {                         \
            ftile(kind, R, T, n, w, wrb, x, xrb, y, ldy);                                                  \
        }
/* RD x 1 must be R x 1 or instantiated before */
#    define FGEMM_FNS(kind, R, T, RD)                                                                         \
        FTILE_FN(kind, R, T)                                                                                  \
        FTILE_FN(kind, R, 1)                                                                                  \
        FTILE_FN(kind, 1, T)                                                                                  \
        static void ftile_##kind##_1x1(int64_t n, const uint8_t * w, size_t wrb, const uint8_t * x,         \
                                       size_t xrb, float * y, int64_t ldy) {                               \
            *y = fdot(kind, n, w, x);                                                                        \
        }                                                                                                    \
        static const struct moqae_gemm_tiles ftiles_##kind = {R,                                              \
                                                              T,                                              \
                                                              RD,                                             \
                                                              ftile_##kind##_##R##x##T,                       \
                                                              ftile_##kind##_##R##x1,                         \
                                                              ftile_##kind##_1x##T,                           \
                                                              ftile_##kind##_1x1,                             \
                                                              ftile_##kind##_##RD##x1};                       \
        static void fgemm_##kind(int64_t n, int64_t n_rows, int64_t n_tok, const void * w, size_t wrb,       \
                                 const void * x, size_t xrb, float * y, int64_t ldy) {                      \
            moqae_gemm_tiled(&ftiles_##kind, n, n_rows, n_tok, w, wrb, x, xrb, y, ldy);                     \
        }                                                                                                    \
        static void fvdot_##kind(int64_t n, float * s, const void * w, const void * x) {                     \
            *s = fdot(kind, n, w, x);                                                                        \
        }

/* tile shapes: 4 x 4 for prefill, 8 x 1 for decode */
FTILE_FN(F32, 8, 1)
FTILE_FN(F16, 8, 1)
FTILE_FN(BF16, 8, 1)
FGEMM_FNS(F32, 4, 4, 8)
FGEMM_FNS(F16, 4, 4, 8)
FGEMM_FNS(BF16, 4, 4, 8)

/* ================================================================================================
 * float ops
 * ================================================================================================ */

static float dot_f32_avx512(int64_t n, const float * x, const float * y) {
    return fdot(F32, n, (const uint8_t *) x, (const uint8_t *) y);
}

static float dot_f32_f16_avx512(int64_t n, const float * x, const uint16_t * y) {
    __m512  a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    int64_t i  = 0;
    for (; i + 64 <= n; i += 64) {
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i), load_f16(y + i), a0);
        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i + 16), load_f16(y + i + 16), a1);
        a2 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i + 32), load_f16(y + i + 32), a2);
        a3 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i + 48), load_f16(y + i + 48), a3);
    }
    for (; i + 16 <= n; i += 16) {
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i), load_f16(y + i), a0);
    }
    if (i < n) {
        const __mmask16 m = lanes16(n - i);
        a1                = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, x + i), maskz_load_f16(m, y + i), a1);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
}

static void axpy_f16_avx512(int64_t n, float a, const uint16_t * x, float * y) {
    const __m512 va = _mm512_set1_ps(a);
    int64_t      i  = 0;
    for (; i + 16 <= n; i += 16) {
        _mm512_storeu_ps(y + i, _mm512_fmadd_ps(va, load_f16(x + i), _mm512_loadu_ps(y + i)));
    }
    if (i < n) {
        const __mmask16 m = lanes16(n - i);
        _mm512_mask_storeu_ps(y + i, m, _mm512_fmadd_ps(va, maskz_load_f16(m, x + i), _mm512_maskz_loadu_ps(m, y + i)));
    }
}

/* sum of squares in double as the reference (x*x is exact in double, so only the order differs) */
static void rms_norm_avx512(int64_t n, const float * x, const float * w, float eps, float * y) {
    __m512d a0 = _mm512_setzero_pd(), a1 = _mm512_setzero_pd();
    int64_t i  = 0;
    for (; i + 16 <= n; i += 16) {
        const __m512  v  = _mm512_loadu_ps(x + i);
        const __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
        const __m512d hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
        a0               = _mm512_fmadd_pd(lo, lo, a0);
        a1               = _mm512_fmadd_pd(hi, hi, a1);
    }
    if (i < n) {
        const __m512  v  = _mm512_maskz_loadu_ps(lanes16(n - i), x + i);
        const __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
        const __m512d hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
        a0               = _mm512_fmadd_pd(lo, lo, a0);
        a1               = _mm512_fmadd_pd(hi, hi, a1);
    }
    const double sum   = _mm512_reduce_add_pd(_mm512_add_pd(a0, a1));
    const float  mean  = (float) (sum / (double) n);
    const __m512 scale = _mm512_set1_ps(1.0f / sqrtf(mean + eps));
    for (i = 0; i + 16 <= n; i += 16) {
        _mm512_storeu_ps(y + i, _mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(x + i), scale), _mm512_loadu_ps(w + i)));
    }
    if (i < n) {
        const __mmask16 m = lanes16(n - i);
        _mm512_mask_storeu_ps(y + i, m,
                              _mm512_mul_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + i), scale),
                                            _mm512_maskz_loadu_ps(m, w + i)));
    }
}

INLINE __m512 swiglu16(__m512 g, __m512 u) {
    const __m512 e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), g));
    return _mm512_mul_ps(_mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), e)), u);
}

static void swiglu_avx512(int64_t n, float * g, const float * u) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        _mm512_storeu_ps(g + i, swiglu16(_mm512_loadu_ps(g + i), _mm512_loadu_ps(u + i)));
    }
    if (i < n) {
        const __mmask16 m = lanes16(n - i);
        _mm512_mask_storeu_ps(g + i, m, swiglu16(_mm512_maskz_loadu_ps(m, g + i), _mm512_maskz_loadu_ps(m, u + i)));
    }
}

static void scale_avx512(int64_t n, float a, float * y);

/* softmax_ref with exp512 (about 1 ulp) and f32 lane sums; masked tails. */
static void softmax_avx512(int64_t n, float a, float * y) {
    const __m512 va = _mm512_set1_ps(a);
    __m512       vm = _mm512_set1_ps(-INFINITY);
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 m = n - i >= 16 ? (__mmask16) 0xffff : lanes16(n - i);
        const __m512    v = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, y + i), va);
        _mm512_mask_storeu_ps(y + i, m, v);
        vm = _mm512_mask_max_ps(vm, m, vm, v);
    }
    const __m512 vmx = _mm512_set1_ps(_mm512_reduce_max_ps(vm));
    __m512       vs  = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 m = n - i >= 16 ? (__mmask16) 0xffff : lanes16(n - i);
        const __m512    e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, y + i), vmx));
        _mm512_mask_storeu_ps(y + i, m, e);
        vs = _mm512_mask_add_ps(vs, m, vs, e);
    }
    scale_avx512(n, 1.0f / _mm512_reduce_add_ps(vs), y);
}

static void scale_avx512(int64_t n, float a, float * y) {
    const __m512 va = _mm512_set1_ps(a);
    int64_t      i  = 0;
    for (; i + 16 <= n; i += 16) {
        _mm512_storeu_ps(y + i, _mm512_mul_ps(_mm512_loadu_ps(y + i), va));
    }
    if (i < n) {
        const __mmask16 m = lanes16(n - i);
        _mm512_mask_storeu_ps(y + i, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, y + i), va));
    }
}

static void add_avx512(int64_t n, const float * x, float * y) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        _mm512_storeu_ps(y + i, _mm512_add_ps(_mm512_loadu_ps(y + i), _mm512_loadu_ps(x + i)));
    }
    if (i < n) {
        const __mmask16 m = lanes16(n - i);
        _mm512_mask_storeu_ps(y + i, m,
                              _mm512_add_ps(_mm512_maskz_loadu_ps(m, y + i), _mm512_maskz_loadu_ps(m, x + i)));
    }
}

/* ================================================================================================
 * the table
 * ================================================================================================ */

static const struct moqae_cpu_kernels kernels_avx512 = {
    .name = "avx512",
    .type =
        {
            [MOQAE_TYPE_F32]  = {MOQAE_TYPE_F32, to_float_f32_avx512, from_float_f32_avx512, fvdot_F32, fgemm_F32},
            [MOQAE_TYPE_F16]  = {MOQAE_TYPE_F16, to_float_f16_avx512, from_float_f16_avx512, fvdot_F16, fgemm_F16},
            [MOQAE_TYPE_BF16] = {MOQAE_TYPE_BF16, to_float_bf16_avx512, from_float_bf16_avx512, fvdot_BF16,
                                 fgemm_BF16},
            [MOQAE_TYPE_Q4_0] = {MOQAE_TYPE_Q8_0, to_float_q4_0_avx512, NULL, qdot_Q4_0, qgemm_Q4_0},
            [MOQAE_TYPE_Q4_1] = {MOQAE_TYPE_Q8_1, to_float_q4_1_avx512, NULL, qdot_Q4_1, qgemm_Q4_1},
            [MOQAE_TYPE_Q8_0] = {MOQAE_TYPE_Q8_0, to_float_q8_0_avx512, from_float_q8_0_avx512, qdot_Q8_0, qgemm_Q8_0},
            [MOQAE_TYPE_Q8_1] = {MOQAE_TYPE_Q8_1, to_float_q8_1_avx512, from_float_q8_1_avx512, NULL, NULL},
        },
    .dot_f32     = dot_f32_avx512,
    .dot_f32_f16 = dot_f32_f16_avx512,
    .axpy_f16    = axpy_f16_avx512,
    .f32_to_f16  = f32_to_f16_avx512,
    .rms_norm    = rms_norm_avx512,
    .swiglu      = swiglu_avx512,
    .scale       = scale_avx512,
    .softmax     = softmax_avx512,
    .add         = add_avx512,
};

const struct moqae_cpu_kernels * moqae_cpu_kernels_avx512(void) {
    return moqae_cpu_has_avx512() ? &kernels_avx512 : NULL;
}

#else /* no AVX-512 in this build */

const struct moqae_cpu_kernels * moqae_cpu_kernels_avx512(void) {
    return NULL;
}

#endif
