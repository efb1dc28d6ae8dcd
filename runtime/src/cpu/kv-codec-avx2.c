/*
 * cpu/kv-codec-avx2.c — the attention primitives of kv-codec.h with AVX2 + FMA + F16C, working on a
 * record's codes directly: a 16-code block (kv-codec.h) is unpacked to two vectors of 8 floats and
 * multiplied in, never written back. Keys: scores_j = sum_d (q_d * s_d) * code_jd + sum_d q_d * z_d, one
 * channel at a time across 16 tokens (the K codes are channel-major, so no horizontal sums); keys stored
 * before RoPE: each pair of channels is decoded, rotated by the tokens' offsets and dotted; values:
 * out_d += sum_j (p_j * s_jg) * code_jd + sum_j p_j * z_jg, one token at a time across 16 columns. A tile
 * serves up to QB queries at once so the unpacking is shared. Same results as the scalar reference in
 * kv-codec.c up to f32 rounding (tests/test-kv-codec.c). Quantized records hold Hadamard-rotated data
 * (kv-codec.h): keys after RoPE score against the query unrotated once (q . H y = (H q) . y), keys before
 * RoPE are decoded and rotated back into a small f32 tile first, values accumulate in the rotated space
 * and the D-vector is rotated back once per query; the keys' outlier token is scored on its own.
 * Not here: encoding (scalar only), ISA checks.
 */
#include "../common.h"
#include "../kv-codec.h"
#include "kernels.h"

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)

#    include <immintrin.h>

#    define INLINE static inline __attribute__((always_inline))
#    define QB     4 /* queries per tile: 2 accumulators each, 8 of the 16 ymm registers */

/* The 16 codes of the block at p, as two vectors of floats (elements 0..7, 8..15). */
INLINE void unpack16(const uint8_t * p, const int bits, __m256 * a, __m256 * b) {
    __m128i v;
    if (bits == 8) {
        v = _mm_loadu_si128((const __m128i *) p);
    } else if (bits == 4) {
        const __m128i x = _mm_loadl_epi64((const __m128i *) p);
        v = _mm_and_si128(_mm_unpacklo_epi64(x, _mm_srli_epi16(x, 4)), _mm_set1_epi8(0x0f));
    } else {
        int32_t x;
        memcpy(&x, p, 4);
        v = _mm_and_si128(_mm_srlv_epi32(_mm_set1_epi32(x), _mm_setr_epi32(0, 2, 4, 6)), _mm_set1_epi8(0x03));
    }
    *a = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v));
    *b = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(v, 8)));
}

INLINE void load16_f16(const uint8_t * p, __m256 * a, __m256 * b) {
    *a = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) p));
    *b = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) (p + 16)));
}

/* sum_k a[k] * b[k] for n a multiple of 8 */
INLINE float dot8n(int64_t n, const float * a, const float * b) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t k = 0; k < n; k += 8) {
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + k), _mm256_loadu_ps(b + k), acc);
    }
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    h        = _mm_add_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}

/* w[d] = q[d] * scale[d]; returns q . zero (n a multiple of 8) */
INLINE float scale_query(int64_t n, const float * q, const float * scale, const float * zero, float * w) {
    for (int64_t k = 0; k < n; k += 8) {
        _mm256_storeu_ps(w + k, _mm256_mul_ps(_mm256_loadu_ps(q + k), _mm256_loadu_ps(scale + k)));
    }
    return dot8n(n, q, zero);
}

/* A quantized record's decoded metadata, 8 lanes at a time, with the same f32 operations as
 * kv-codec.c: zero[i] = zl + zs * zcode[i] (n_groups of them), scale[r] = (sb * FRAC[a % 16]) * 2^-(a / 16)
 * for each scale code a (n_groups / share of them). */
static void meta(const struct moqae_kv_geom * g, const uint8_t * rec, float * scale, float * zero) {
    float zl, zs, sb;
    moqae_kv_bases(g, rec, &zl, &zs, &sb);
    const uint8_t * zc = rec + g->codes_bytes + g->xrow_bytes;
    const uint8_t * sc = zc + g->zcode_bytes;
    const int64_t   nz = g->n_groups, ns = g->n_groups / g->share;
    const __m256    vsb = _mm256_set1_ps(sb);
    const __m256    t0  = _mm256_mul_ps(vsb, _mm256_loadu_ps(moqae_kv_frac));
    const __m256    t1  = _mm256_mul_ps(vsb, _mm256_loadu_ps(moqae_kv_frac + 8));
    int64_t         i   = 0;
    for (; i + 8 <= ns; i += 8) {
        const __m256i a   = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *) (sc + i)));
        const __m256i f   = _mm256_and_si256(a, _mm256_set1_epi32(15));
        const __m256  hi8 = _mm256_castsi256_ps(_mm256_slli_epi32(f, 28)); /* bit 3 of f as the sign */
        const __m256  m   = _mm256_blendv_ps(_mm256_permutevar8x32_ps(t0, f), _mm256_permutevar8x32_ps(t1, f), hi8);
        const __m256i e   = _mm256_srli_epi32(a, 4);
        const __m256  p2  = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_sub_epi32(_mm256_set1_epi32(127), e), 23));
        _mm256_storeu_ps(scale + i, _mm256_mul_ps(m, p2));
    }
    for (; i < ns; i++) {
        scale[i] = sb * moqae_kv_frac[sc[i] & 15] * (1.0f / (float) (1 << (sc[i] >> 4)));
    }
    const __m256 vzl = _mm256_set1_ps(zl), vzs = _mm256_set1_ps(zs);
    for (i = 0; i + 8 <= nz; i += 8) {
        const __m256 z = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *) (zc + i))));
        _mm256_storeu_ps(zero + i, _mm256_add_ps(vzl, _mm256_mul_ps(vzs, z)));
    }
    for (; i < nz; i++) {
        zero[i] = zl + zs * (float) zc[i];
    }
}

/* ================================================================================================
 * keys: scores[i][j] += sum_d w[i][d] * code[d][j] + bias[i]
 * ================================================================================================ */

/* One tile: NB queries x tokens t0..t0+15. w: [NB][D] (q * scale), rows: channel d's codes at
 * rec + d * row_bytes (bits 16: f16). */
INLINE void kq_tile(const int bits, const int NB, const uint8_t * rec, size_t row_bytes, int64_t D, int64_t t0,
                    const float * w, const float * bias, float * scores, int64_t ld_s) {
    __m256 acc[QB][2];
    for (int i = 0; i < NB; i++) {
        acc[i][0] = acc[i][1] = _mm256_setzero_ps();
    }
    const size_t blk = (size_t) (t0 / 16) * (size_t) (bits == 16 ? 32 : 2 * bits);
    for (int64_t d = 0; d < D; d++) {
        __m256 a, b;
        if (bits == 16) {
            load16_f16(rec + d * row_bytes + blk, &a, &b);
        } else {
            unpack16(rec + d * row_bytes + blk, bits, &a, &b);
        }
        for (int i = 0; i < NB; i++) {
            const __m256 wd = _mm256_broadcast_ss(w + i * D + d);
            acc[i][0]       = _mm256_fmadd_ps(wd, a, acc[i][0]);
            acc[i][1]       = _mm256_fmadd_ps(wd, b, acc[i][1]);
        }
    }
    for (int i = 0; i < NB; i++) {
        float *      s  = scores + i * ld_s + t0;
        const __m256 bi = _mm256_set1_ps(bias[i]);
        _mm256_storeu_ps(s, _mm256_add_ps(_mm256_loadu_ps(s), _mm256_add_ps(acc[i][0], bi)));
        _mm256_storeu_ps(s + 8, _mm256_add_ps(_mm256_loadu_ps(s + 8), _mm256_add_ps(acc[i][1], bi)));
    }
}

/* One tile with keys stored before RoPE: NB queries (already rotated by -P0: qr [NB][D]) x tokens
 * t0..t0+15; each pair (u, w) of decoded keys is rotated by its token's offset (cs_t) before the dot. */
INLINE void kq_tile_rope(const int bits, const int NB, const uint8_t * rec, size_t row_bytes, int64_t D, int64_t C,
                         int64_t t0, const struct moqae_kv_rope * rope, const float * scale, const float * zero,
                         const float * qr, float * scores, int64_t ld_s) {
    __m256 acc[QB][2];
    for (int i = 0; i < NB; i++) {
        acc[i][0] = acc[i][1] = _mm256_setzero_ps();
    }
    const size_t  blk = (size_t) (t0 / 16) * (size_t) (2 * bits);
    const int64_t ps  = rope->pair_stride;
    for (int64_t pr = 0; pr < D / 2; pr++) {
        const int64_t u = ps == 1 ? 2 * pr : pr, w = u + ps;
        __m256        ku[2], kw[2];
        if (bits == 32) { /* a decoded f32 tile */
            const float * fu = (const float *) (rec + u * row_bytes + blk);
            const float * fw = (const float *) (rec + w * row_bytes + blk);
            ku[0] = _mm256_loadu_ps(fu), ku[1] = _mm256_loadu_ps(fu + 8);
            kw[0] = _mm256_loadu_ps(fw), kw[1] = _mm256_loadu_ps(fw + 8);
        } else if (bits == 16) {
            load16_f16(rec + u * row_bytes + blk, &ku[0], &ku[1]);
            load16_f16(rec + w * row_bytes + blk, &kw[0], &kw[1]);
        } else {
            unpack16(rec + u * row_bytes + blk, bits, &ku[0], &ku[1]);
            unpack16(rec + w * row_bytes + blk, bits, &kw[0], &kw[1]);
            const __m256 su = _mm256_set1_ps(scale[u]), zu = _mm256_set1_ps(zero[u]);
            const __m256 sw = _mm256_set1_ps(scale[w]), zw = _mm256_set1_ps(zero[w]);
            for (int h = 0; h < 2; h++) {
                ku[h] = _mm256_fmadd_ps(ku[h], su, zu);
                kw[h] = _mm256_fmadd_ps(kw[h], sw, zw);
            }
        }
        const float * ct = rope->cs_t + (2 * pr) * C + t0;
        const float * st = ct + C;
        __m256        ru[2], rw[2];
        for (int h = 0; h < 2; h++) {
            const __m256 c = _mm256_loadu_ps(ct + 8 * h), sn = _mm256_loadu_ps(st + 8 * h);
            ru[h]          = _mm256_fmsub_ps(ku[h], c, _mm256_mul_ps(kw[h], sn));
            rw[h]          = _mm256_fmadd_ps(ku[h], sn, _mm256_mul_ps(kw[h], c));
        }
        for (int i = 0; i < NB; i++) {
            const __m256 qu = _mm256_broadcast_ss(qr + i * D + u), qw = _mm256_broadcast_ss(qr + i * D + w);
            acc[i][0]       = _mm256_fmadd_ps(qw, rw[0], _mm256_fmadd_ps(qu, ru[0], acc[i][0]));
            acc[i][1]       = _mm256_fmadd_ps(qw, rw[1], _mm256_fmadd_ps(qu, ru[1], acc[i][1]));
        }
    }
    for (int i = 0; i < NB; i++) {
        float * s = scores + i * ld_s + t0;
        _mm256_storeu_ps(s, _mm256_add_ps(_mm256_loadu_ps(s), acc[i][0]));
        _mm256_storeu_ps(s + 8, _mm256_add_ps(_mm256_loadu_ps(s + 8), acc[i][1]));
    }
}

/* ---- the inverse rotation (kv-codec.h), vectorised: the same adds and subtracts as kv-codec.c ------ */

/* One in-register butterfly stage of distance h < 8: lanes without bit h get a + b, lanes with it a - b. */
#    define FWHT_STAGE(v, partner, with_h)                                                                     \
        do {                                                                                                    \
            const __m256 y_ = _mm256_permutevar8x32_ps(v, partner);                                            \
            v               = _mm256_blend_ps(_mm256_add_ps(v, y_), _mm256_sub_ps(y_, v), with_h);               \
        } while (0)

INLINE __m256 fwht8(__m256 v) {
    FWHT_STAGE(v, _mm256_setr_epi32(1, 0, 3, 2, 5, 4, 7, 6), 0xAA);
    FWHT_STAGE(v, _mm256_setr_epi32(2, 3, 0, 1, 6, 7, 4, 5), 0xCC);
    FWHT_STAGE(v, _mm256_setr_epi32(4, 5, 6, 7, 0, 1, 2, 3), 0xF0);
    return v;
}

/* The butterflies of distance h >= from between rows of `step` floats: rows j and j + h of each block of n
 * rows, `w` floats each (w a multiple of 8). */
static void fwht_rows(float * x, int64_t n_rows, int64_t n, int64_t from, int64_t w, int64_t step) {
    for (int64_t b = 0; b < n_rows; b += n) {
        for (int64_t h = from; h < n; h *= 2) {
            for (int64_t i = 0; i < n; i += 2 * h) {
                for (int64_t j = b + i; j < b + i + h; j++) {
                    for (int64_t t = 0; t < w; t += 8) {
                        const __m256 p = _mm256_loadu_ps(x + j * step + t), q = _mm256_loadu_ps(x + (j + h) * step + t);
                        _mm256_storeu_ps(x + j * step + t, _mm256_add_ps(p, q));
                        _mm256_storeu_ps(x + (j + h) * step + t, _mm256_sub_ps(p, q));
                    }
                }
            }
        }
    }
}

/* moqae_kv_unrotate(x, len, n) for n >= 8: stages 1..4 inside each vector, the rest between vectors,
 * then the factor. */
static void unrotate8n(float * x, int64_t len, int64_t n) {
    for (int64_t i = 0; i < len; i += 8) {
        _mm256_storeu_ps(x + i, fwht8(_mm256_loadu_ps(x + i)));
    }
    for (int64_t b = 0; b < len; b += n) {
        for (int64_t h = 8; h < n; h *= 2) {
            for (int64_t i = 0; i < n; i += 2 * h) {
                for (int64_t j = b + i; j < b + i + h; j += 8) {
                    const __m256 p = _mm256_loadu_ps(x + j), q = _mm256_loadu_ps(x + j + h);
                    _mm256_storeu_ps(x + j, _mm256_add_ps(p, q));
                    _mm256_storeu_ps(x + j + h, _mm256_sub_ps(p, q));
                }
            }
        }
    }
    const __m256 f = _mm256_set1_ps(moqae_kv_rot_factor(n, 1));
    for (int64_t i = 0; i < len; i += 8) {
        _mm256_storeu_ps(x + i, _mm256_mul_ps(_mm256_loadu_ps(x + i), f));
    }
}

/* Keys before RoPE, quantized: the chunk decoded and rotated back, WITHOUT the inverse factor (the
 * caller folds it into the query), into kt [D][C] f32 (rows = channels, each a vector of tokens):
 * 8 rows x 8 tokens at a time are decoded (scale * code + zero, the outlier's column from yx) and put
 * through the butterflies of distance 1..4 in registers, the longer distances follow row by row. */
static void decode_k_tile(const struct moqae_kv_geom * g, const uint8_t * rec, int64_t C, int64_t D,
                          const float * scale, const float * zero, int64_t xi, const float * yx, float * kt) {
    const size_t row_bytes = (size_t) (C * g->bits / 8);
    for (int64_t t0 = 0; t0 < C; t0 += 16) {
        const size_t blk = (size_t) (t0 / 16) * (size_t) (2 * g->bits);
        for (int64_t r0 = 0; r0 < D; r0 += 8) {
            __m256 v[2][8];
            for (int r = 0; r < 8; r++) {
                const int64_t d = r0 + r;
                __m256        a, b;
                unpack16(rec + d * row_bytes + blk, (int) g->bits, &a, &b);
                v[0][r] = _mm256_fmadd_ps(a, _mm256_set1_ps(scale[d]), _mm256_set1_ps(zero[d]));
                v[1][r] = _mm256_fmadd_ps(b, _mm256_set1_ps(scale[d]), _mm256_set1_ps(zero[d]));
            }
            for (int half = 0; half < 2; half++) {
                if (xi >= t0 + 8 * half && xi < t0 + 8 * half + 8) { /* the outlier's column */
                    float tmp[8];
                    for (int r = 0; r < 8; r++) {
                        _mm256_storeu_ps(tmp, v[half][r]);
                        tmp[xi - t0 - 8 * half] = yx[r0 + r];
                        v[half][r]              = _mm256_loadu_ps(tmp);
                    }
                }
                for (int h = 1; h < 8; h *= 2) {
                    for (int i = 0; i < 8; i += 2 * h) {
                        for (int j = i; j < i + h; j++) {
                            const __m256 p = v[half][j], q = v[half][j + h];
                            v[half][j]         = _mm256_add_ps(p, q);
                            v[half][j + h]     = _mm256_sub_ps(p, q);
                        }
                    }
                }
                for (int r = 0; r < 8; r++) {
                    _mm256_storeu_ps(kt + (r0 + r) * C + t0 + 8 * half, v[half][r]);
                }
            }
        }
    }
    fwht_rows(kt, D, moqae_kv_rot_block(D), 8, C, C);
}

INLINE void kq_any(const int bits, enum moqae_kv_codec c, const struct moqae_kv_shape * s,
                   const struct moqae_kv_rope * rope, const uint8_t * rec, int64_t n_q, const float * q, int64_t ld_q,
                   float * scores, int64_t ld_s) {
    const int64_t C = s->chunk, D = s->head_dim;
    float         scale[256], zero[256], w[QB * 256], bias[QB], yx[256], xs[QB], saved[QB];
    int64_t       xi = 0;
    if (bits != 16) {
        const struct moqae_kv_geom g = moqae_kv_geom_k(c, s);
        meta(&g, rec, scale, zero);
        xi = moqae_kv_outlier_k(c, s, rec, yx);
        if (rope) { /* decode and rotate back, then score as f32 rows */
            float kt[C * D]; /* C x D floats: a VLA, so that only those pages are touched */
            decode_k_tile(&g, rec, C, D, scale, zero, xi, yx, kt);
            for (int64_t i0 = 0; i0 < n_q; i0 += QB) {
                const int nb = (int) (n_q - i0 < QB ? n_q - i0 : QB);
                const float f = moqae_kv_rot_factor(moqae_kv_rot_block(D), 1); /* kt lacks it */
                for (int i = 0; i < nb; i++) {
                    const float * qi = q + (i0 + i) * ld_q;
                    for (int64_t pr = 0; pr < D / 2; pr++) { /* w = f R(-P0) q */
                        const int64_t u = rope->pair_stride == 1 ? 2 * pr : pr, v = u + rope->pair_stride;
                        const float   c0 = rope->cs_p0[2 * pr], s0 = rope->cs_p0[2 * pr + 1];
                        w[i * D + u]     = (qi[u] * c0 + qi[v] * s0) * f;
                        w[i * D + v]     = (qi[v] * c0 - qi[u] * s0) * f;
                    }
                }
                float * so = scores + i0 * ld_s;
                for (int64_t t0 = 0; t0 < C; t0 += 16) {
                    switch (nb) {
#    define KQR_CASE(N)                                                                                           \
    case N: kq_tile_rope(32, N, (const uint8_t *) kt, (size_t) C * 4, D, C, t0, rope, scale, zero, w, so, ld_s); break;
                        KQR_CASE(1)
                        KQR_CASE(2)
                        KQR_CASE(3)
                        default: KQR_CASE(4)
#    undef KQR_CASE
                    }
                }
            }
            return;
        }
    }
    const size_t row_bytes = (size_t) (C * (bits == 16 ? 16 : bits) / 8);
    for (int64_t i0 = 0; i0 < n_q; i0 += QB) {
        const int nb = (int) (n_q - i0 < QB ? n_q - i0 : QB);
        for (int i = 0; i < nb; i++) {
            const float * qi = q + (i0 + i) * ld_q;
            if (rope) { /* f16 records: w = R(-P0) q */
                for (int64_t pr = 0; pr < D / 2; pr++) {
                    const int64_t u = rope->pair_stride == 1 ? 2 * pr : pr, v = u + rope->pair_stride;
                    const float   c0 = rope->cs_p0[2 * pr], s0 = rope->cs_p0[2 * pr + 1];
                    w[i * D + u]     = qi[u] * c0 + qi[v] * s0;
                    w[i * D + v]     = qi[v] * c0 - qi[u] * s0;
                }
                continue;
            }
            if (bits == 16) {
                memcpy(w + i * D, qi, sizeof(float) * (size_t) D);
                bias[i] = 0.0f;
            } else { /* u = H q (unrotated once), w = u * scale, bias = u . zero, the outlier's score u . yx */
                float u[256];
                memcpy(u, qi, sizeof(float) * (size_t) D);
                unrotate8n(u, D, moqae_kv_rot_block(D));
                bias[i]  = scale_query(D, u, scale, zero, w + i * D);
                xs[i]    = dot8n(D, u, yx);
                saved[i] = scores[(i0 + i) * ld_s + xi];
            }
        }
        float * so = scores + i0 * ld_s;
        for (int64_t t0 = 0; t0 < C; t0 += 16) {
#    define KQ_CASE(N)                                                                                         \
        case N:                                                                                                 \
            if (rope) {                                                                                         \
                kq_tile_rope(bits, N, rec, row_bytes, D, C, t0, rope, scale, zero, w, so, ld_s);               \
            } else {                                                                                            \
                kq_tile(bits, N, rec, row_bytes, D, t0, w, bias, so, ld_s);                                     \
            }                                                                                                   \
            break;
            switch (nb) {
                KQ_CASE(1)
                KQ_CASE(2)
                KQ_CASE(3)
                default: KQ_CASE(4)
            }
#    undef KQ_CASE
        }
        if (bits != 16) { /* the outlier's column: its own score instead of its low bits' */
            for (int i = 0; i < nb; i++) {
                so[i * ld_s + xi] = saved[i] + xs[i];
            }
        }
    }
}

/* ================================================================================================
 * values: out[i][d] += sum_j (p[i][j] * scale[j][g]) * code[j][d] + sum_j p[i][j] * zero[j][g]
 * ================================================================================================ */

/* One tile: NB queries x columns d0..d0+15 (inside group g = d0 / G). */
INLINE void pv_tile(const int bits, const int NB, const uint8_t * rec, size_t row_bytes, int64_t C, int64_t d0,
                    const float * sc, int64_t sc_stride, const float * p, int64_t ld_p, float * out, int64_t ld_o,
                    const float * bias) {
    __m256 acc[QB][2];
    for (int i = 0; i < NB; i++) {
        acc[i][0] = acc[i][1] = _mm256_setzero_ps();
    }
    const size_t blk = (size_t) (d0 / 16) * (size_t) (bits == 16 ? 32 : 2 * bits);
    for (int64_t j = 0; j < C; j++) {
        __m256 a, b;
        if (bits == 16) {
            load16_f16(rec + j * row_bytes + blk, &a, &b);
        } else {
            unpack16(rec + j * row_bytes + blk, bits, &a, &b);
        }
        const float sj = bits == 16 ? 1.0f : sc[j * sc_stride];
        for (int i = 0; i < NB; i++) {
            const __m256 wj = _mm256_set1_ps(p[i * ld_p + j] * sj);
            acc[i][0]       = _mm256_fmadd_ps(wj, a, acc[i][0]);
            acc[i][1]       = _mm256_fmadd_ps(wj, b, acc[i][1]);
        }
    }
    for (int i = 0; i < NB; i++) {
        float *      o  = out + i * ld_o + d0;
        const __m256 bi = _mm256_set1_ps(bias[i]);
        _mm256_storeu_ps(o, _mm256_add_ps(_mm256_loadu_ps(o), _mm256_add_ps(acc[i][0], bi)));
        _mm256_storeu_ps(o + 8, _mm256_add_ps(_mm256_loadu_ps(o + 8), _mm256_add_ps(acc[i][1], bi)));
    }
}

INLINE void pv_any(const int bits, enum moqae_kv_codec c, const struct moqae_kv_shape * s, const uint8_t * rec,
                   int64_t n_q, const float * p, int64_t ld_p, float * out, int64_t ld_o) {
    const int64_t C = s->chunk, D = s->head_dim, G = bits == 16 ? 16 : s->v_group, ng = D / G;
    float         scale[256], zero[4096], zt[4096], bias[QB]; /* scale: one per token (kv-codec.h) */
    float         acc[QB * 256];                             /* quantized: sums in the rotated space */
    if (bits != 16) {
        const struct moqae_kv_geom g = moqae_kv_geom_v(c, s);
        meta(&g, rec, scale, zero);
        for (int64_t j = 0; j < C; j++) { /* zt[g][j]: each group's zeros contiguous, for the bias dots */
            for (int64_t gi = 0; gi < ng; gi++) {
                zt[gi * C + j] = zero[j * ng + gi];
            }
        }
    }
    const size_t  row_bytes = (size_t) (D * (bits == 16 ? 16 : bits) / 8);
    const int64_t D16       = D / 16 * 16; /* f16 rows may end in a partial block */
    for (int64_t i0 = 0; i0 < n_q; i0 += QB) {
        const int     nb   = (int) (n_q - i0 < QB ? n_q - i0 : QB);
        const float * pb   = p + i0 * ld_p;
        float *       ob   = bits == 16 ? out + i0 * ld_o : acc;
        const int64_t ld_b = bits == 16 ? ld_o : D;
        if (bits != 16) {
            memset(acc, 0, sizeof(float) * (size_t) (nb * D));
        }
        for (int64_t d0 = 0; d0 < D16; d0 += 16) {
            const int64_t g = d0 / G;
            for (int i = 0; i < nb; i++) { /* sum_j p[i][j] * zero[j][g] (C is a multiple of 16) */
                bias[i] = bits == 16 ? 0.0f : dot8n(C, pb + i * ld_p, zt + g * C);
            }
            switch (nb) {
                case 1: pv_tile(bits, 1, rec, row_bytes, C, d0, scale, 1, pb, ld_p, ob, ld_b, bias); break;
                case 2: pv_tile(bits, 2, rec, row_bytes, C, d0, scale, 1, pb, ld_p, ob, ld_b, bias); break;
                case 3: pv_tile(bits, 3, rec, row_bytes, C, d0, scale, 1, pb, ld_p, ob, ld_b, bias); break;
                default: pv_tile(bits, 4, rec, row_bytes, C, d0, scale, 1, pb, ld_p, ob, ld_b, bias); break;
            }
        }
        if (bits != 16) { /* back from the rotated space, once per query */
            const int64_t n = moqae_kv_rot_block(G);
            for (int i = 0; i < nb; i++) {
                unrotate8n(acc + i * D, D, n);
                float * o = out + (i0 + i) * ld_o;
                for (int64_t d = 0; d < D; d += 8) {
                    _mm256_storeu_ps(o + d, _mm256_add_ps(_mm256_loadu_ps(o + d), _mm256_loadu_ps(acc + i * D + d)));
                }
            }
            continue;
        }
        for (int64_t d = D16; d < D; d++) { /* scalar tail: f16 only (quantized D is a multiple of 16) */
            for (int i = 0; i < nb; i++) {
                float a = 0.0f;
                for (int64_t j = 0; j < C; j++) {
                    moqae_f16 h;
                    memcpy(&h, rec + j * row_bytes + 2 * d, 2);
                    a += pb[i * ld_p + j] * moqae_f16_to_f32(h);
                }
                ob[i * ld_o + d] += a;
            }
        }
    }
}

/* ================================================================================================
 * the encoder's search error (kv-codec.h moqae_kv_err_fn): 8 elements at a time, the scalar
 * reference's operations in the same order; the product scale * code is kept apart from the add (the
 * empty asm) so that the compiler cannot fuse them, as the reference never does
 * ================================================================================================ */

/* The terms of 8 elements, summed into 4 int64 lanes; lanes whose bit is clear in `live` (all-ones /
 * zero int32 lanes) add 0. */
INLINE __m256i err8(__m256 v, __m256i live, __m256 vz, __m256 vs, __m256 vq, __m256d vp) {
    const __m256d cap = _mm256_set1_pd(0x1p48), magic = _mm256_set1_pd(0x1p52);
    const __m256  y   = _mm256_add_ps(_mm256_div_ps(_mm256_sub_ps(v, vz), vs), _mm256_set1_ps(0.5f));
    /* clamp(floor(y), 0, qmax), NaN -> 0: max and min return their second operand on NaN */
    const __m256 q = _mm256_min_ps(_mm256_max_ps(_mm256_floor_ps(y), _mm256_setzero_ps()), vq);
    __m256       p = _mm256_mul_ps(vs, q);
    __asm__("" : "+x"(p));
    const __m256 d   = _mm256_sub_ps(v, _mm256_add_ps(p, vz));
    __m256i      sum = _mm256_setzero_si256();
    for (int h = 0; h < 2; h++) {
        const __m256d dd = _mm256_cvtps_pd(h ? _mm256_extractf128_ps(d, 1) : _mm256_castps256_ps128(d));
        const __m256d t  = _mm256_min_pd(_mm256_mul_pd(_mm256_mul_pd(dd, dd), vp), cap); /* NaN -> cap */
        /* floor(t), t in [0, 2^48]: the nearest integer (2^52 trick), minus 1 where it is above t */
        const __m256d r  = _mm256_add_pd(t, magic);
        const __m256i k  = _mm256_sub_epi64(_mm256_castpd_si256(r), _mm256_castpd_si256(magic));
        const __m256i up = _mm256_castpd_si256(_mm256_cmp_pd(_mm256_sub_pd(r, magic), t, _CMP_GT_OQ));
        const __m256i l  = _mm256_cvtepi32_epi64(h ? _mm256_extracti128_si256(live, 1) : _mm256_castsi256_si128(live));
        sum              = _mm256_add_epi64(sum, _mm256_and_si256(_mm256_add_epi64(k, up), l));
    }
    return sum;
}

INLINE int64_t hsum64(__m256i v) {
    int64_t l[4];
    _mm256_storeu_si256((__m256i *) l, v);
    return l[0] + l[1] + l[2] + l[3];
}

static int64_t err_avx2(const float * x, int64_t n, float zero, float scale, float qmax, double p2k, int64_t limit) {
    if (!(scale > 0.0f)) {
        return moqae_kv_err_ref(x, n, zero, scale, qmax, p2k, limit);
    }
    const __m256  vz = _mm256_set1_ps(zero), vs = _mm256_set1_ps(scale), vq = _mm256_set1_ps(qmax);
    const __m256d vp   = _mm256_set1_pd(p2k);
    const __m256i all  = _mm256_set1_epi32(-1);
    __m256i       vacc = _mm256_setzero_si256();
    int64_t       e    = 0;
    for (; e + 8 <= n; e += 8) {
        vacc = _mm256_add_epi64(vacc, err8(_mm256_loadu_ps(x + e), all, vz, vs, vq, vp));
        if ((e & 8) && hsum64(vacc) >= limit) { /* every 16 elements */
            return hsum64(vacc);
        }
    }
    if (e < n) { /* the tail: a masked load, dead lanes add 0 */
        const __m256i live = _mm256_cmpgt_epi32(_mm256_set1_epi32((int) (n - e)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        vacc = _mm256_add_epi64(vacc, err8(_mm256_maskload_ps(x + e, live), live, vz, vs, vq, vp));
    }
    return hsum64(vacc);
}

/* ================================================================================================
 * table
 * ================================================================================================ */

#    define KERNELS(NAME, BITS, CODEC)                                                                          \
        static void kq_##NAME(const struct moqae_kv_shape * s, const struct moqae_kv_rope * rope,              \
                              const uint8_t * rec, int64_t n_q, const float * q, int64_t ld_q, float * scores, \
                              int64_t ld_s) {                                                                   \
            kq_any(BITS, CODEC, s, rope, rec, n_q, q, ld_q, scores, ld_s);                                      \
        }                                                                                                       \
        static void pv_##NAME(const struct moqae_kv_shape * s, const uint8_t * rec, int64_t n_q,               \
                              const float * p, int64_t ld_p, float * out, int64_t ld_o) {                      \
            pv_any(BITS, CODEC, s, rec, n_q, p, ld_p, out, ld_o);                                               \
        }
KERNELS(f16, 16, MOQAE_KV_CODEC_F16)
KERNELS(q8, 8, MOQAE_KV_CODEC_Q8)
KERNELS(q4, 4, MOQAE_KV_CODEC_Q4)
KERNELS(q2, 2, MOQAE_KV_CODEC_Q2)

static const struct moqae_kv_codec_kernels kernels_avx2 = {
    .name = "avx2",
    .kq   = {kq_f16, kq_q8, kq_q4, kq_q2},
    .pv   = {pv_f16, pv_q8, pv_q4, pv_q2},
    .err  = err_avx2,
};

const struct moqae_kv_codec_kernels * moqae_kv_codec_kernels_avx2(void) {
    return moqae_cpu_has_avx2() ? &kernels_avx2 : NULL;
}

#else /* no AVX2 in this build */

const struct moqae_kv_codec_kernels * moqae_kv_codec_kernels_avx2(void) {
    return NULL;
}

#endif
