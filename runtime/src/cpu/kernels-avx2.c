/*
 * cpu/kernels-avx2.c — the AVX2 + FMA + F16C kernel table, same signatures and results as
 * kernels-ref.c (bit-exact conversions and quantization; dot products within the tolerances of
 * tests/test-kernels.c). Without VNNI, int8 products use vpmaddubsw (u8 x s8 -> s16 pairs) + vpmaddwd:
 * 4-bit weights are unsigned (Q4_0 subtracts 8*sum(x), computed once per token), Q8_0 weights use the
 * sign trick |w| x sign(x, w), which cannot saturate. gemm uses 2 x 2 (row x token) tiles, all 16 ymm
 * registers allow; decode tiles prefetch the weights. Vector tails are plain scalar code. Not here:
 * threading, ISA checks (dispatch.c). NULL table without the flags. Measurements: docs/KERNELS.md.
 */
#include "../common.h"
#include "../quant.h"
#include "kernels.h"

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)

#    include <immintrin.h>
#    include <math.h>

#    define INLINE static inline __attribute__((always_inline))
#    define UNROLL _Pragma("GCC unroll 16")

/* ================================================================================================
 * helpers
 * ================================================================================================ */

INLINE float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s        = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s        = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

INLINE __m256 load_f16x8(const uint16_t * p) {
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) p));
}
INLINE __m256 load_bf16x8(const uint16_t * p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *) p)), 16));
}

/* as moqae_f32_to_f16 for NaN: sign | 0x7e00 */
INLINE __m128i cvt_f16x8(__m256 v) {
    const __m128i h   = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256i n32 = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    const __m128i n16 = _mm_packs_epi32(_mm256_castsi256_si128(n32), _mm256_extracti128_si256(n32, 1));
    const __m128i qn  = _mm_or_si128(_mm_and_si128(h, _mm_set1_epi16((short) 0x8000)), _mm_set1_epi16(0x7e00));
    return _mm_blendv_epi8(h, qn, n16);
}

INLINE moqae_bf16 f32_to_bf16_1(float f) { /* as kernels-ref.c */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        return (moqae_bf16) ((u >> 16) | 64);
    }
    return (moqae_bf16) ((u + (0x7fffu + ((u >> 16) & 1u))) >> 16);
}

INLINE __m128i cvt_bf16x8(__m256 v) {
    const __m256i u   = _mm256_castps_si256(v);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i       r   = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff))), 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    r = _mm256_blendv_epi8(r, _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(64)), nan);
    r = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
    return _mm256_castsi256_si128(r);
}

INLINE __m256 round_away8(__m256 v) {
    const __m256 t    = _mm256_round_ps(v, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
    const __m256 sgn  = _mm256_and_ps(v, _mm256_set1_ps(-0.0f));
    const __m256 frac = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), _mm256_sub_ps(v, t));
    const __m256 up   = _mm256_cmp_ps(frac, _mm256_set1_ps(0.5f), _CMP_GE_OQ);
    return _mm256_add_ps(t, _mm256_and_ps(up, _mm256_or_ps(sgn, _mm256_set1_ps(1.0f))));
}

/* e^x as kernels-avx512.c's exp512; 2^n is applied as two factors so that overflow gives inf and
 * underflow goes gradually to 0 (AVX2 has no vscalefps). */
INLINE __m256 exp8(__m256 x) {
    x              = _mm256_max_ps(_mm256_set1_ps(-104.0f), _mm256_min_ps(_mm256_set1_ps(89.0f), x));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r       = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r              = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p       = _mm256_set1_ps(1.9875691500e-4f);
    p              = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p              = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p              = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p              = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p              = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p              = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i ni = _mm256_cvtps_epi32(n);                    /* -150 .. 128 */
    const __m256i n1 = _mm256_srai_epi32(ni, 1), n2 = _mm256_sub_epi32(ni, n1); /* each -75 .. 64 */
    const __m256  f1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, _mm256_set1_epi32(127)), 23));
    const __m256  f2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n2, _mm256_set1_epi32(127)), 23));
    return _mm256_mul_ps(_mm256_mul_ps(p, f1), f2);
}

/* ================================================================================================
 * to_float / from_float
 * ================================================================================================ */

static void to_float_f32_avx2(const void * x, float * y, int64_t n) {
    memcpy(y, x, (size_t) n * sizeof(float));
}

static void to_float_f16_avx2(const void * x, float * y, int64_t n) {
    const uint16_t * h = x;
    int64_t          i = 0;
    for (; i + 8 <= n; i += 8) {
        _mm256_storeu_ps(y + i, load_f16x8(h + i));
    }
    for (; i < n; i++) {
        y[i] = moqae_f16_to_f32(h[i]);
    }
}

static void to_float_bf16_avx2(const void * x, float * y, int64_t n) {
    const uint16_t * h = x;
    int64_t          i = 0;
    for (; i + 8 <= n; i += 8) {
        _mm256_storeu_ps(y + i, load_bf16x8(h + i));
    }
    for (; i < n; i++) {
        y[i] = moqae_bf16_to_f32(h[i]);
    }
}

/* 16 bytes of nibbles -> q (low nibbles, elements 0-15) and high nibbles (16-31) as float, minus sub */
INLINE void nibbles_f32(const uint8_t * qs, int sub, __m256 f[4]) {
    const __m128i q  = _mm_loadu_si128((const __m128i *) qs);
    const __m128i lo = _mm_and_si128(q, _mm_set1_epi8(0x0f));
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(q, 4), _mm_set1_epi8(0x0f));
    const __m256i s  = _mm256_set1_epi32(sub);
    f[0] = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(lo), s));
    f[1] = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)), s));
    f[2] = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(hi), s));
    f[3] = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)), s));
}

static void to_float_q4_0_avx2(const void * x, float * y, int64_t n) {
    const moqae_block_q4_0 * b = x;
    for (int64_t i = 0; i < n / 32; i++) {
        const __m256 d = _mm256_set1_ps(moqae_f16_to_f32(b[i].d));
        __m256       f[4];
        nibbles_f32(b[i].qs, 8, f);
        for (int j = 0; j < 4; j++) {
            _mm256_storeu_ps(y + i * 32 + j * 8, _mm256_mul_ps(d, f[j]));
        }
    }
}

static void to_float_q4_1_avx2(const void * x, float * y, int64_t n) {
    const moqae_block_q4_1 * b = x;
    for (int64_t i = 0; i < n / 32; i++) {
        const __m256 d = _mm256_set1_ps(moqae_f16_to_f32(b[i].d));
        const __m256 m = _mm256_set1_ps(moqae_f16_to_f32(b[i].m));
        __m256       f[4];
        nibbles_f32(b[i].qs, 0, f);
        for (int j = 0; j < 4; j++) {
            __m256 v = _mm256_mul_ps(d, f[j]);
            __asm__("" : "+x"(v)); /* round d*q before adding m, as the reference: no FMA */
            _mm256_storeu_ps(y + i * 32 + j * 8, _mm256_add_ps(v, m));
        }
    }
}

INLINE void to_float_q8(const uint8_t * b, size_t bs, size_t qoff, float * y, int64_t n) {
    for (int64_t i = 0; i < n / 32; i++, b += bs) {
        uint16_t d16;
        memcpy(&d16, b, 2);
        const __m256 d = _mm256_set1_ps(moqae_f16_to_f32(d16));
        for (int j = 0; j < 4; j++) {
            const __m128i q = _mm_loadl_epi64((const __m128i *) (b + qoff + 8 * j));
            _mm256_storeu_ps(y + i * 32 + 8 * j, _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q))));
        }
    }
}

static void to_float_q8_0_avx2(const void * x, float * y, int64_t n) {
    to_float_q8(x, sizeof(moqae_block_q8_0), offsetof(moqae_block_q8_0, qs), y, n);
}

static void to_float_q8_1_avx2(const void * x, float * y, int64_t n) {
    to_float_q8(x, sizeof(moqae_block_q8_1), offsetof(moqae_block_q8_1, qs), y, n);
}

static void from_float_f32_avx2(const float * x, void * y, int64_t n) {
    memcpy(y, x, (size_t) n * sizeof(float));
}

static void f32_to_f16_avx2(int64_t n, const float * x, uint16_t * y) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        _mm_storeu_si128((__m128i *) (y + i), cvt_f16x8(_mm256_loadu_ps(x + i)));
    }
    for (; i < n; i++) {
        y[i] = moqae_f32_to_f16(x[i]);
    }
}

static void from_float_f16_avx2(const float * x, void * y, int64_t n) {
    f32_to_f16_avx2(n, x, y);
}

static void from_float_bf16_avx2(const float * x, void * y, int64_t n) {
    uint16_t * h = y;
    int64_t    i = 0;
    for (; i + 8 <= n; i += 8) {
        _mm_storeu_si128((__m128i *) (h + i), cvt_bf16x8(_mm256_loadu_ps(x + i)));
    }
    for (; i < n; i++) {
        h[i] = f32_to_bf16_1(x[i]);
    }
}

/* One block of 32 as the reference (d = amax/127, q = roundf(x * (1/d))); returns sum(q), *d unrounded. */
INLINE int quantize_q8_block(const float * x, float * d, int8_t * qs) {
    __m256 v[4], amax = _mm256_setzero_ps();
    for (int j = 0; j < 4; j++) {
        v[j] = _mm256_loadu_ps(x + 8 * j);
        amax = _mm256_max_ps(amax, _mm256_andnot_ps(_mm256_set1_ps(-0.0f), v[j]));
    }
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    m        = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m        = _mm_max_ss(m, _mm_movehdup_ps(m));
    *d       = _mm_cvtss_f32(m) / 127.0f;
    const __m256 id = _mm256_set1_ps(*d != 0.0f ? 1.0f / *d : 0.0f);
    __m256i      q[4];
    for (int j = 0; j < 4; j++) {
        q[j] = _mm256_cvtps_epi32(round_away8(_mm256_mul_ps(v[j], id)));
    }
    const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
    _mm256_storeu_si256((__m256i *) qs, _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
    const __m256i s  = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
    __m128i       s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
    s4               = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
    s4               = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1));
    return _mm_cvtsi128_si32(s4);
}

static void from_float_q8_0_avx2(const float * x, void * y, int64_t n) {
    moqae_block_q8_0 * b = y;
    for (int64_t i = 0; i < n / 32; i++) {
        float d;
        quantize_q8_block(x + i * 32, &d, b[i].qs);
        b[i].d = moqae_f32_to_f16(d);
    }
}

static void from_float_q8_1_avx2(const float * x, void * y, int64_t n) {
    moqae_block_q8_1 * b = y;
    for (int64_t i = 0; i < n / 32; i++) {
        float     d;
        const int sum = quantize_q8_block(x + i * 32, &d, b[i].qs);
        b[i].d        = moqae_f32_to_f16(d);
        b[i].s        = moqae_f32_to_f16((float) sum * d);
    }
}

/* ================================================================================================
 * quantized gemm / vec_dot
 *
 * A step covers 2 blocks: 128-bit lane k of "lo" holds elements 0-15 of block k, of "hi" elements
 * 16-31, for weights and activations alike, so vpmaddwd's int32 lanes 4k..4k+3 hold partial sums of
 * block k and d is spread as [dA x4 | dB x4]. Scales come from one 4-byte load per block (d plus m or
 * s) and a vcvtph2ps. A row with an odd number of blocks ends with a 1-block step (lane 1 zero).
 * ================================================================================================ */

enum qkind { Q4_0 = 0, Q4_1 = 1, Q8_0 = 2 };

#    define QR_MAX 4
#    define QT_MAX 4

INLINE int qk_wbytes(enum qkind k) {
    return k == Q4_0 ? (int) sizeof(moqae_block_q4_0) : k == Q4_1 ? (int) sizeof(moqae_block_q4_1)
                                                                    : (int) sizeof(moqae_block_q8_0);
}
INLINE int qk_xbytes(enum qkind k) {
    return k == Q4_1 ? (int) sizeof(moqae_block_q8_1) : (int) sizeof(moqae_block_q8_0);
}

/* 16 bytes at p (lane 0) and p + bs (lane 1, zero when nbl == 1) */
INLINE __m256i load2x16(const uint8_t * p, size_t bs, int nbl) {
    const __m128i a = _mm_loadu_si128((const __m128i *) p);
    if (nbl == 1) {
        return _mm256_zextsi128_si256(a);
    }
    return _mm256_inserti128_si256(_mm256_castsi128_si256(a), _mm_loadu_si128((const __m128i *) (p + bs)), 1);
}

/* The first 4 bytes (d and m / s, or d and 2 quant bytes) of blocks A, B as 4 floats [dA, xA, dB, xB]
 * (zero for a missing B), in the low half of a ymm whose upper half is zero. */
INLINE __m256 heads(const uint8_t * p, size_t bs, int nbl) {
    uint32_t a, b = 0;
    memcpy(&a, p, 4);
    if (nbl > 1) {
        memcpy(&b, p + bs, 4);
    }
    const __m128i h = _mm_insert_epi32(_mm_cvtsi32_si128((int) a), (int) b, 1);
    return _mm256_zextps128_ps256(_mm_cvtph_ps(h));
}

INLINE __m256 spread(__m256 h, int i) { /* [h[i] x4 | h[i+2] x4] */
    return _mm256_permutevar8x32_ps(h, _mm256_setr_epi32(i, i, i, i, i + 2, i + 2, i + 2, i + 2));
}
INLINE __m256 spread1(__m256 h) { /* [h[1], 0, 0, 0 | h[3], 0, 0, 0] (lane 7 of h is zero) */
    return _mm256_permutevar8x32_ps(h, _mm256_setr_epi32(1, 7, 7, 7, 3, 7, 7, 7));
}

#    define QPF_AHEAD 8192 /* decode prefetch distance (moqae_prefetch_offset, kernels.h) */

/* One step (nbl <= 2 blocks) of an R x T tile. */
INLINE void qstep(const enum qkind k, const int R, const int T, const int nbl, const uint8_t * w, size_t wrb,
                  const uint8_t * x, size_t xrb, size_t pf, __m256 acc[QR_MAX][QT_MAX]) {
    const size_t  WB = qk_wbytes(k), XB = qk_xbytes(k);
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i       wl[QR_MAX], wh[QR_MAX];
    __m256        dw[QR_MAX], mw[QR_MAX];
    UNROLL for (int r = 0; r < R; r++) {
        const uint8_t * p = w + r * wrb;
        if (T == 1) {
            UNROLL for (int o = 0; o < 2 * (int) WB; o += 64) {
                _mm_prefetch((const char *) (p + pf + o), _MM_HINT_T0);
            }
        }
        const __m256 h = heads(p, WB, nbl);
        dw[r]             = spread(h, 0);
        if (k == Q4_1) {
            mw[r] = spread1(h);
        }
        if (k == Q8_0) {
            wl[r] = load2x16(p + 2, WB, nbl);
            wh[r] = load2x16(p + 18, WB, nbl);
        } else {
            const __m256i q = load2x16(p + (k == Q4_1 ? 4 : 2), WB, nbl);
            wl[r]           = _mm256_and_si256(q, _mm256_set1_epi8(0x0f));
            wh[r]           = _mm256_and_si256(_mm256_srli_epi16(q, 4), _mm256_set1_epi8(0x0f));
        }
    }
    UNROLL for (int t = 0; t < T; t++) {
        const uint8_t * p  = x + t * xrb;
        const int       qo = k == Q4_1 ? 4 : 2;
        const __m256i   xl = load2x16(p + qo, XB, nbl), xh = load2x16(p + qo + 16, XB, nbl);
        const __m256    h  = heads(p, XB, nbl);
        const __m256    dx = spread(h, 0);
        __m256i         n16 = _mm256_setzero_si256();
        if (k == Q4_0) { /* 8 * sum(x) in pairs: the weights' offset */
            const __m256i e = _mm256_set1_epi8(8);
            n16             = _mm256_add_epi16(_mm256_maddubs_epi16(e, xl), _mm256_maddubs_epi16(e, xh));
        }
        UNROLL for (int r = 0; r < R; r++) {
            __m256i i;
            if (k == Q8_0) {
                const __m256i pl = _mm256_maddubs_epi16(_mm256_abs_epi8(wl[r]), _mm256_sign_epi8(xl, wl[r]));
                const __m256i ph = _mm256_maddubs_epi16(_mm256_abs_epi8(wh[r]), _mm256_sign_epi8(xh, wh[r]));
                i = _mm256_add_epi32(_mm256_madd_epi16(pl, ones), _mm256_madd_epi16(ph, ones));
            } else {
                __m256i p16 = _mm256_add_epi16(_mm256_maddubs_epi16(wl[r], xl), _mm256_maddubs_epi16(wh[r], xh));
                if (k == Q4_0) {
                    p16 = _mm256_sub_epi16(p16, n16);
                }
                i = _mm256_madd_epi16(p16, ones);
            }
            acc[r][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i), _mm256_mul_ps(dw[r], dx), acc[r][t]);
            if (k == Q4_1) {
                acc[r][t] = _mm256_fmadd_ps(mw[r], spread(h, 1), acc[r][t]);
            }
        }
    }
}

INLINE void qtile(const enum qkind k, const int R, const int T, int64_t nb, const uint8_t * w, size_t wrb,
                  const uint8_t * x, size_t xrb, float * y, int64_t ldy) {
    __m256 acc[QR_MAX][QT_MAX];
    UNROLL for (int r = 0; r < R; r++) {
        UNROLL for (int t = 0; t < T; t++) {
            acc[r][t] = _mm256_setzero_ps();
        }
    }
    const int64_t WB = qk_wbytes(k), XB = qk_xbytes(k);
    const size_t  pf = moqae_prefetch_offset(R, wrb, QPF_AHEAD);
    int64_t       b  = 0;
    for (; b + 2 <= nb; b += 2) {
        qstep(k, R, T, 2, w + b * WB, wrb, x + b * XB, xrb, pf, acc);
    }
    if (b < nb) {
        qstep(k, R, T, 1, w + b * WB, wrb, x + b * XB, xrb, pf, acc);
    }
    UNROLL for (int r = 0; r < R; r++) {
        UNROLL for (int t = 0; t < T; t++) {
            y[t * ldy + r] = hsum8(acc[r][t]);
        }
    }
}

/* tile shapes: QR x QT for prefill, QRD x 1 for decode (n_tok < QT), 1-row and 1-token tails */
#    define QR  2
#    define QT  2
#    define QRD 2

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

/* tile shapes (rows x tokens): 2 x 2 for prefill and 2 x 1 for decode fit the 16 ymm registers */
QGEMM_FNS(Q4_0, 2, 2, 2)
QGEMM_FNS(Q4_1, 2, 2, 2)
QGEMM_FNS(Q8_0, 2, 2, 2)

/* ================================================================================================
 * float-type gemm / vec_dot (F32, F16, BF16 weights against activations of the same type)
 * ================================================================================================ */

enum fkind { F32 = 0, F16 = 1, BF16 = 2 };

#    define FR_MAX 4
#    define FT_MAX 4

INLINE __m256 fload(const enum fkind k, const uint8_t * p, int64_t i) {
    if (k == F32) {
        return _mm256_loadu_ps((const float *) p + i);
    }
    return k == F16 ? load_f16x8((const uint16_t *) p + i) : load_bf16x8((const uint16_t *) p + i);
}
INLINE float fload1(const enum fkind k, const uint8_t * p, int64_t i) {
    if (k == F32) {
        return ((const float *) p)[i];
    }
    return k == F16 ? moqae_f16_to_f32(((const uint16_t *) p)[i]) : moqae_bf16_to_f32(((const uint16_t *) p)[i]);
}

INLINE void ftile(const enum fkind k, const int R, const int T, int64_t n, const uint8_t * w, size_t wrb,
                  const uint8_t * x, size_t xrb, float * y, int64_t ldy) {
    __m256 acc[FR_MAX][FT_MAX];
    UNROLL for (int r = 0; r < R; r++) {
        UNROLL for (int t = 0; t < T; t++) {
            acc[r][t] = _mm256_setzero_ps();
        }
    }
    const int64_t es = k == F32 ? 4 : 2;
    const size_t  pf = moqae_prefetch_offset(R, wrb, QPF_AHEAD);
    int64_t       i  = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 wv[FR_MAX];
        UNROLL for (int r = 0; r < R; r++) {
            if (T == 1 && (k == F32 || i % 16 == 0)) { /* decode: one prefetch per 32 bytes */
                _mm_prefetch((const char *) (w + r * wrb + i * es + pf), _MM_HINT_T0);
            }
            wv[r] = fload(k, w + r * wrb, i);
        }
        UNROLL for (int t = 0; t < T; t++) {
            const __m256 xv = fload(k, x + t * xrb, i);
            UNROLL for (int r = 0; r < R; r++) {
                acc[r][t] = _mm256_fmadd_ps(wv[r], xv, acc[r][t]);
            }
        }
    }
    UNROLL for (int r = 0; r < R; r++) {
        UNROLL for (int t = 0; t < T; t++) {
            float s = hsum8(acc[r][t]);
            for (int64_t j = i; j < n; j++) {
                s += fload1(k, w + r * wrb, j) * fload1(k, x + t * xrb, j);
            }
            y[t * ldy + r] = s;
        }
    }
}

INLINE float fdot(const enum fkind k, int64_t n, const uint8_t * w, const uint8_t * x) {
    __m256  a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    int64_t i  = 0;
    for (; i + 32 <= n; i += 32) {
        a0 = _mm256_fmadd_ps(fload(k, w, i), fload(k, x, i), a0);
        a1 = _mm256_fmadd_ps(fload(k, w, i + 8), fload(k, x, i + 8), a1);
        a2 = _mm256_fmadd_ps(fload(k, w, i + 16), fload(k, x, i + 16), a2);
        a3 = _mm256_fmadd_ps(fload(k, w, i + 24), fload(k, x, i + 24), a3);
    }
    for (; i + 8 <= n; i += 8) {
        a0 = _mm256_fmadd_ps(fload(k, w, i), fload(k, x, i), a0);
    }
    float s = hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (; i < n; i++) {
        s += fload1(k, w, i) * fload1(k, x, i);
    }
    return s;
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

/* tile shapes: 3 x 3 for prefill (9 accumulators + 3 rows + 1 token of 16 ymm), 3 x 1 for decode */
FGEMM_FNS(F32, 3, 3, 3)
FGEMM_FNS(F16, 3, 3, 3)
FGEMM_FNS(BF16, 3, 3, 3)

/* ================================================================================================
 * float ops
 * ================================================================================================ */

static float dot_f32_avx2(int64_t n, const float * x, const float * y) {
    return fdot(F32, n, (const uint8_t *) x, (const uint8_t *) y);
}

static float dot_f32_f16_avx2(int64_t n, const float * x, const uint16_t * y) {
    __m256  a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    int64_t i  = 0;
    for (; i + 16 <= n; i += 16) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), load_f16x8(y + i), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 8), load_f16x8(y + i + 8), a1);
    }
    for (; i + 8 <= n; i += 8) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), load_f16x8(y + i), a0);
    }
    float s = hsum8(_mm256_add_ps(a0, a1));
    for (; i < n; i++) {
        s += x[i] * moqae_f16_to_f32(y[i]);
    }
    return s;
}

static void axpy_f16_avx2(int64_t n, float a, const uint16_t * x, float * y) {
    const __m256 va = _mm256_set1_ps(a);
    int64_t      i  = 0;
    for (; i + 8 <= n; i += 8) {
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, load_f16x8(x + i), _mm256_loadu_ps(y + i)));
    }
    for (; i < n; i++) {
        y[i] += a * moqae_f16_to_f32(x[i]);
    }
}

static void rms_norm_avx2(int64_t n, const float * x, const float * w, float eps, float * y) {
    __m256d a0 = _mm256_setzero_pd(), a1 = _mm256_setzero_pd();
    int64_t i  = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256d lo = _mm256_cvtps_pd(_mm_loadu_ps(x + i)), hi = _mm256_cvtps_pd(_mm_loadu_ps(x + i + 4));
        a0               = _mm256_fmadd_pd(lo, lo, a0);
        a1               = _mm256_fmadd_pd(hi, hi, a1);
    }
    const __m256d s4  = _mm256_add_pd(a0, a1);
    __m128d       s2  = _mm_add_pd(_mm256_castpd256_pd128(s4), _mm256_extractf128_pd(s4, 1));
    double        sum = _mm_cvtsd_f64(_mm_add_sd(s2, _mm_unpackhi_pd(s2, s2)));
    for (; i < n; i++) {
        sum += (double) x[i] * (double) x[i];
    }
    const float  mean  = (float) (sum / (double) n);
    const float  scale = 1.0f / sqrtf(mean + eps);
    const __m256 vs    = _mm256_set1_ps(scale);
    for (i = 0; i + 8 <= n; i += 8) {
        _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), vs), _mm256_loadu_ps(w + i)));
    }
    for (; i < n; i++) {
        y[i] = (x[i] * scale) * w[i];
    }
}

static void swiglu_avx2(int64_t n, float * g, const float * u) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 v = _mm256_loadu_ps(g + i);
        const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), v));
        _mm256_storeu_ps(g + i, _mm256_mul_ps(_mm256_div_ps(v, _mm256_add_ps(_mm256_set1_ps(1.0f), e)),
                                              _mm256_loadu_ps(u + i)));
    }
    for (; i < n; i++) {
        g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
    }
}

static void scale_avx2(int64_t n, float a, float * y);

/* softmax_ref with exp8 (about 1 ulp) and f32 lane sums; the tail through the same vector code on a
 * padded copy, so every element gets the same exp. */
static void softmax_avx2(int64_t n, float a, float * y) {
    const __m256 va = _mm256_set1_ps(a);
    __m256       vm = _mm256_set1_ps(-INFINITY);
    int64_t      i  = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 v = _mm256_mul_ps(_mm256_loadu_ps(y + i), va);
        _mm256_storeu_ps(y + i, v);
        vm = _mm256_max_ps(vm, v);
    }
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(vm), _mm256_extractf128_ps(vm, 1));
    m4        = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4        = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    float mx  = _mm_cvtss_f32(m4);
    for (int64_t j = i; j < n; j++) {
        y[j] *= a;
        mx = y[j] > mx ? y[j] : mx;
    }
    const __m256 vmx = _mm256_set1_ps(mx);
    __m256       vs  = _mm256_setzero_ps();
    for (i = 0; i + 8 <= n; i += 8) {
        const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(y + i), vmx));
        _mm256_storeu_ps(y + i, e);
        vs = _mm256_add_ps(vs, e);
    }
    float sum = hsum8(vs);
    if (i < n) {
        float t[8];
        for (int j = 0; j < 8; j++) {
            t[j] = i + j < n ? y[i + j] - mx : -INFINITY; /* exp(-inf) = 0 */
        }
        const __m256 e = exp8(_mm256_loadu_ps(t));
        _mm256_storeu_ps(t, e);
        sum += hsum8(e);
        for (int64_t j = i; j < n; j++) {
            y[j] = t[j - i];
        }
    }
    scale_avx2(n, 1.0f / sum, y);
}

static void scale_avx2(int64_t n, float a, float * y) {
    const __m256 va = _mm256_set1_ps(a);
    int64_t      i  = 0;
    for (; i + 8 <= n; i += 8) {
        _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_loadu_ps(y + i), va));
    }
    for (; i < n; i++) {
        y[i] *= a;
    }
}

static void add_avx2(int64_t n, const float * x, float * y) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        _mm256_storeu_ps(y + i, _mm256_add_ps(_mm256_loadu_ps(y + i), _mm256_loadu_ps(x + i)));
    }
    for (; i < n; i++) {
        y[i] += x[i];
    }
}

/* ================================================================================================
 * the table
 * ================================================================================================ */

static const struct moqae_cpu_kernels kernels_avx2 = {
    .name = "avx2",
    .type =
        {
            [MOQAE_TYPE_F32]  = {MOQAE_TYPE_F32, to_float_f32_avx2, from_float_f32_avx2, fvdot_F32, fgemm_F32},
            [MOQAE_TYPE_F16]  = {MOQAE_TYPE_F16, to_float_f16_avx2, from_float_f16_avx2, fvdot_F16, fgemm_F16},
            [MOQAE_TYPE_BF16] = {MOQAE_TYPE_BF16, to_float_bf16_avx2, from_float_bf16_avx2, fvdot_BF16, fgemm_BF16},
            [MOQAE_TYPE_Q4_0] = {MOQAE_TYPE_Q8_0, to_float_q4_0_avx2, NULL, qdot_Q4_0, qgemm_Q4_0},
            [MOQAE_TYPE_Q4_1] = {MOQAE_TYPE_Q8_1, to_float_q4_1_avx2, NULL, qdot_Q4_1, qgemm_Q4_1},
            [MOQAE_TYPE_Q8_0] = {MOQAE_TYPE_Q8_0, to_float_q8_0_avx2, from_float_q8_0_avx2, qdot_Q8_0, qgemm_Q8_0},
            [MOQAE_TYPE_Q8_1] = {MOQAE_TYPE_Q8_1, to_float_q8_1_avx2, from_float_q8_1_avx2, NULL, NULL},
        },
    .dot_f32     = dot_f32_avx2,
    .dot_f32_f16 = dot_f32_f16_avx2,
    .axpy_f16    = axpy_f16_avx2,
    .f32_to_f16  = f32_to_f16_avx2,
    .rms_norm    = rms_norm_avx2,
    .swiglu      = swiglu_avx2,
    .scale       = scale_avx2,
    .softmax     = softmax_avx2,
    .add         = add_avx2,
};

const struct moqae_cpu_kernels * moqae_cpu_kernels_avx2(void) {
    return moqae_cpu_has_avx2() ? &kernels_avx2 : NULL;
}

#else /* no AVX2 in this build */

const struct moqae_cpu_kernels * moqae_cpu_kernels_avx2(void) {
    return NULL;
}

#endif
