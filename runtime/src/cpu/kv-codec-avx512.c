/*
 * cpu/kv-codec-avx512.c — the attention primitives of kv-codec.h with AVX-512 (F, BW, VL), the same
 * algorithm as cpu/kv-codec-avx2.c on 16 lanes, working on a record's codes directly: a 16-code block
 * (kv-codec.h) is unpacked to one vector of 16 floats and multiplied in, never written back. Keys: scores_j = sum_d (q_d * s_d) * code_jd + sum_d q_d * z_d, one
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

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)

#    include <immintrin.h>

#    define INLINE static inline __attribute__((always_inline))
#    define QB     8 /* queries per tile: 1 accumulator each, 8 of the 32 zmm registers */

/* The 16 codes of the block at p, as 16 floats. */
INLINE __m512 unpack16(const uint8_t * p, const int bits) {
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
    return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(v));
}

/* 16 elements of a row: f16 (bits 16), f32 (bits 32: a decoded tile) or codes */
INLINE __m512 load16(const uint8_t * p, const int bits) {
    return bits == 16   ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *) p))
           : bits == 32 ? _mm512_loadu_ps((const float *) p)
                        : unpack16(p, bits);
}

/* sum_k a[k] * b[k] for n a multiple of 16 */
INLINE float dot16n(int64_t n, const float * a, const float * b) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t k = 0; k < n; k += 16) {
        acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + k), _mm512_loadu_ps(b + k), acc);
    }
    return _mm512_reduce_add_ps(acc);
}

/* w[d] = q[d] * scale[d]; returns q . zero (n a multiple of 16) */
INLINE float scale_query(int64_t n, const float * q, const float * scale, const float * zero, float * w) {
    for (int64_t k = 0; k < n; k += 16) {
        _mm512_storeu_ps(w + k, _mm512_mul_ps(_mm512_loadu_ps(q + k), _mm512_loadu_ps(scale + k)));
    }
    return dot16n(n, q, zero);
}

/* A quantized record's decoded metadata, 16 lanes at a time, with the same f32 operations as
 * kv-codec.c: zero[i] = zl + zs * zcode[i] (n_groups of them), scale[r] = (sb * FRAC[a % 16]) * 2^-(a / 16)
 * for each scale code a (n_groups / share of them). */
static void meta(const struct moqae_kv_geom * g, const uint8_t * rec, float * scale, float * zero) {
    float zl, zs, sb;
    moqae_kv_bases(g, rec, &zl, &zs, &sb);
    const uint8_t * zc = rec + g->codes_bytes + g->xrow_bytes;
    const uint8_t * sc = zc + g->zcode_bytes;
    const int64_t   nz = g->n_groups, ns = g->n_groups / g->share;
    const __m512    t  = _mm512_mul_ps(_mm512_set1_ps(sb), _mm512_loadu_ps(moqae_kv_frac));
    int64_t         i  = 0;
    for (; i + 16 <= ns; i += 16) {
        const __m512i a  = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *) (sc + i)));
        const __m512  m  = _mm512_permutexvar_ps(_mm512_and_si512(a, _mm512_set1_epi32(15)), t);
        const __m512i e  = _mm512_srli_epi32(a, 4);
        const __m512  p2 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_sub_epi32(_mm512_set1_epi32(127), e), 23));
        _mm512_storeu_ps(scale + i, _mm512_mul_ps(m, p2));
    }
    for (; i < ns; i++) {
        scale[i] = sb * moqae_kv_frac[sc[i] & 15] * (1.0f / (float) (1 << (sc[i] >> 4)));
    }
    const __m512 vzl = _mm512_set1_ps(zl), vzs = _mm512_set1_ps(zs);
    for (i = 0; i + 16 <= nz; i += 16) {
        const __m512 z = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *) (zc + i))));
        _mm512_storeu_ps(zero + i, _mm512_add_ps(vzl, _mm512_mul_ps(vzs, z)));
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
    __m512 acc[QB];
    for (int i = 0; i < NB; i++) {
        acc[i] = _mm512_setzero_ps();
    }
    const size_t blk = (size_t) (t0 / 16) * (size_t) (bits == 16 ? 32 : 2 * bits);
    for (int64_t d = 0; d < D; d++) {
        const __m512 a = load16(rec + d * row_bytes + blk, bits);
        for (int i = 0; i < NB; i++) {
            acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(w[i * D + d]), a, acc[i]);
        }
    }
    for (int i = 0; i < NB; i++) {
        float * s = scores + i * ld_s + t0;
        _mm512_storeu_ps(s, _mm512_add_ps(_mm512_loadu_ps(s), _mm512_add_ps(acc[i], _mm512_set1_ps(bias[i]))));
    }
}

/* One tile with keys stored before RoPE: NB queries (already rotated by -P0: qr [NB][D]) x tokens
 * t0..t0+15; each pair (u, w) of decoded keys is rotated by its token's offset (cs_t) before the dot. */
INLINE void kq_tile_rope(const int bits, const int NB, const uint8_t * rec, size_t row_bytes, int64_t D, int64_t C,
                         int64_t t0, const struct moqae_kv_rope * rope, const float * scale, const float * zero,
                         const float * qr, float * scores, int64_t ld_s) {
    __m512 acc[QB];
    for (int i = 0; i < NB; i++) {
        acc[i] = _mm512_setzero_ps();
    }
    const size_t  blk = (size_t) (t0 / 16) * (size_t) (2 * bits);
    const int64_t ps  = rope->pair_stride;
    for (int64_t pr = 0; pr < D / 2; pr++) {
        const int64_t u = ps == 1 ? 2 * pr : pr, w = u + ps;
        __m512        ku = load16(rec + u * row_bytes + blk, bits);
        __m512        kw = load16(rec + w * row_bytes + blk, bits);
        if (bits < 16) {
            ku = _mm512_fmadd_ps(ku, _mm512_set1_ps(scale[u]), _mm512_set1_ps(zero[u]));
            kw = _mm512_fmadd_ps(kw, _mm512_set1_ps(scale[w]), _mm512_set1_ps(zero[w]));
        }
        const float * ct = rope->cs_t + (2 * pr) * C + t0;
        const __m512  c = _mm512_loadu_ps(ct), sn = _mm512_loadu_ps(ct + C);
        const __m512  ru = _mm512_fmsub_ps(ku, c, _mm512_mul_ps(kw, sn));
        const __m512  rw = _mm512_fmadd_ps(ku, sn, _mm512_mul_ps(kw, c));
        for (int i = 0; i < NB; i++) {
            acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(qr[i * D + w]), rw,
                                     _mm512_fmadd_ps(_mm512_set1_ps(qr[i * D + u]), ru, acc[i]));
        }
    }
    for (int i = 0; i < NB; i++) {
        float * s = scores + i * ld_s + t0;
        _mm512_storeu_ps(s, _mm512_add_ps(_mm512_loadu_ps(s), acc[i]));
    }
}

/* ---- the inverse rotation (kv-codec.h), vectorised: the same adds and subtracts as kv-codec.c ------ */

/* One in-register butterfly stage of distance h < 16: lanes without bit h get a + b, lanes with it a - b
 * (a = the lane without the bit, b = its partner). */
INLINE __m512 fwht_stage(__m512 v, __m512i partner, __mmask16 with_h) {
    const __m512 y = _mm512_permutexvar_ps(partner, v);
    return _mm512_mask_sub_ps(_mm512_add_ps(v, y), with_h, y, v);
}

INLINE __m512 fwht16(__m512 v) {
    v = fwht_stage(v, _mm512_setr_epi32(1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14), 0xAAAA);
    v = fwht_stage(v, _mm512_setr_epi32(2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13), 0xCCCC);
    v = fwht_stage(v, _mm512_setr_epi32(4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11), 0xF0F0);
    return fwht_stage(v, _mm512_setr_epi32(8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7), 0xFF00);
}

/* The butterflies of distance h >= from between rows of `step` floats: rows j and j + h of each block of n
 * rows, `w` floats each (w a multiple of 16). */
static void fwht_rows(float * x, int64_t n_rows, int64_t n, int64_t from, int64_t w, int64_t step) {
    for (int64_t b = 0; b < n_rows; b += n) {
        for (int64_t h = from; h < n; h *= 2) {
            for (int64_t i = 0; i < n; i += 2 * h) {
                for (int64_t j = b + i; j < b + i + h; j++) {
                    for (int64_t t = 0; t < w; t += 16) {
                        const __m512 p = _mm512_loadu_ps(x + j * step + t), q = _mm512_loadu_ps(x + (j + h) * step + t);
                        _mm512_storeu_ps(x + j * step + t, _mm512_add_ps(p, q));
                        _mm512_storeu_ps(x + (j + h) * step + t, _mm512_sub_ps(p, q));
                    }
                }
            }
        }
    }
}

/* moqae_kv_unrotate(x, len, n) for n >= 16: stages 1..8 inside each vector, the rest between vectors
 * (rows of one float), then the factor. */
static void unrotate16n(float * x, int64_t len, int64_t n) {
    for (int64_t i = 0; i < len; i += 16) {
        _mm512_storeu_ps(x + i, fwht16(_mm512_loadu_ps(x + i)));
    }
    for (int64_t b = 0; b < len; b += n) {
        for (int64_t h = 16; h < n; h *= 2) {
            for (int64_t i = 0; i < n; i += 2 * h) {
                for (int64_t j = b + i; j < b + i + h; j += 16) {
                    const __m512 p = _mm512_loadu_ps(x + j), q = _mm512_loadu_ps(x + j + h);
                    _mm512_storeu_ps(x + j, _mm512_add_ps(p, q));
                    _mm512_storeu_ps(x + j + h, _mm512_sub_ps(p, q));
                }
            }
        }
    }
    const __m512 f = _mm512_set1_ps(moqae_kv_rot_factor(n, 1));
    for (int64_t i = 0; i < len; i += 16) {
        _mm512_storeu_ps(x + i, _mm512_mul_ps(_mm512_loadu_ps(x + i), f));
    }
}

/* Keys before RoPE, quantized: the chunk decoded and rotated back, WITHOUT the inverse factor (the
 * caller folds it into the query), into kt [D][C] f32 (rows = channels, each a vector of tokens):
 * 16 rows x 16 tokens at a time are decoded (scale * code + zero, the outlier's column from yx) and put
 * through the butterflies of distance 1..8 in registers, the longer distances follow row by row. */
static void decode_k_tile(const struct moqae_kv_geom * g, const uint8_t * rec, int64_t C, int64_t D,
                          const float * scale, const float * zero, int64_t xi, const float * yx, float * kt) {
    const size_t row_bytes = (size_t) (C * g->bits / 8);
    for (int64_t t0 = 0; t0 < C; t0 += 16) {
        const size_t    blk  = (size_t) (t0 / 16) * (size_t) (2 * g->bits);
        const __mmask16 xlan = xi >= t0 && xi < t0 + 16 ? (__mmask16) (1u << (xi - t0)) : 0;
        for (int64_t r0 = 0; r0 < D; r0 += 16) {
            __m512 v[16];
            for (int r = 0; r < 16; r++) {
                const int64_t d = r0 + r;
                v[r] = _mm512_fmadd_ps(unpack16(rec + d * row_bytes + blk, (int) g->bits), _mm512_set1_ps(scale[d]),
                                       _mm512_set1_ps(zero[d]));
                v[r] = _mm512_mask_mov_ps(v[r], xlan, _mm512_set1_ps(yx[d]));
            }
            for (int h = 1; h < 16; h *= 2) {
                for (int i = 0; i < 16; i += 2 * h) {
                    for (int j = i; j < i + h; j++) {
                        const __m512 p = v[j], q = v[j + h];
                        v[j]               = _mm512_add_ps(p, q);
                        v[j + h]           = _mm512_sub_ps(p, q);
                    }
                }
            }
            for (int r = 0; r < 16; r++) {
                _mm512_storeu_ps(kt + (r0 + r) * C + t0, v[r]);
            }
        }
    }
    fwht_rows(kt, D, moqae_kv_rot_block(D), 16, C, C);
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
                        KQR_CASE(4)
                        KQR_CASE(5)
                        KQR_CASE(6)
                        KQR_CASE(7)
                        default: KQR_CASE(8)
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
                unrotate16n(u, D, moqae_kv_rot_block(D));
                bias[i]  = scale_query(D, u, scale, zero, w + i * D);
                xs[i]    = dot16n(D, u, yx);
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
                KQ_CASE(4)
                KQ_CASE(5)
                KQ_CASE(6)
                KQ_CASE(7)
                default: KQ_CASE(8)
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
    __m512 acc[QB];
    for (int i = 0; i < NB; i++) {
        acc[i] = _mm512_setzero_ps();
    }
    const size_t blk = (size_t) (d0 / 16) * (size_t) (bits == 16 ? 32 : 2 * bits);
    for (int64_t j = 0; j < C; j++) {
        const __m512 a  = load16(rec + j * row_bytes + blk, bits);
        const float  sj = bits == 16 ? 1.0f : sc[j * sc_stride];
        for (int i = 0; i < NB; i++) {
            acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(p[i * ld_p + j] * sj), a, acc[i]);
        }
    }
    for (int i = 0; i < NB; i++) {
        float * o = out + i * ld_o + d0;
        _mm512_storeu_ps(o, _mm512_add_ps(_mm512_loadu_ps(o), _mm512_add_ps(acc[i], _mm512_set1_ps(bias[i]))));
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
                bias[i] = bits == 16 ? 0.0f : dot16n(C, pb + i * ld_p, zt + g * C);
            }
#    define PV_CASE(N)                                                                                         \
        case N: pv_tile(bits, N, rec, row_bytes, C, d0, scale, 1, pb, ld_p, ob, ld_b, bias); break;
            switch (nb) {
                PV_CASE(1)
                PV_CASE(2)
                PV_CASE(3)
                PV_CASE(4)
                PV_CASE(5)
                PV_CASE(6)
                PV_CASE(7)
                default: PV_CASE(8)
            }
#    undef PV_CASE
        }
        if (bits != 16) { /* back from the rotated space, once per query */
            const int64_t n = moqae_kv_rot_block(G);
            for (int i = 0; i < nb; i++) {
                unrotate16n(acc + i * D, D, n);
                float * o = out + (i0 + i) * ld_o;
                for (int64_t d = 0; d < D; d += 16) {
                    _mm512_storeu_ps(o + d, _mm512_add_ps(_mm512_loadu_ps(o + d), _mm512_loadu_ps(acc + i * D + d)));
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
 * the encoder's search error (kv-codec.h moqae_kv_err_fn): 16 elements at a time, the scalar
 * reference's operations in the same order; the product scale * code is kept apart from the add (the
 * empty asm) so that the compiler cannot fuse them, as the reference never does
 * ================================================================================================ */

/* floor(min(d^2 * 2^K, 2^48)) of 8 f32 differences, added to sum in the lanes of l: NaN -> 2^48; the
 * floor of t in [0, 2^48] is the nearest integer (2^52 trick) minus 1 where that is above t. */
INLINE __m512i err_terms8(__m512i sum, __m256 d, __mmask8 l, __m512d vp) {
    const __m512d  cap = _mm512_set1_pd(0x1p48), magic = _mm512_set1_pd(0x1p52);
    const __m512d  dd  = _mm512_cvtps_pd(d);
    const __m512d  t   = _mm512_min_pd(_mm512_mul_pd(_mm512_mul_pd(dd, dd), vp), cap);
    const __m512d  r   = _mm512_add_pd(t, magic);
    const __m512i  k   = _mm512_sub_epi64(_mm512_castpd_si512(r), _mm512_castpd_si512(magic));
    const __mmask8 up  = _mm512_cmp_pd_mask(_mm512_sub_pd(r, magic), t, _CMP_GT_OQ);
    return _mm512_mask_add_epi64(sum, l, sum, _mm512_mask_sub_epi64(k, up, k, _mm512_set1_epi64(1)));
}

/* The terms of 16 elements, summed into 8 int64 lanes; lanes outside `live` add 0. */
INLINE __m512i err16(__m512 v, __mmask16 live, __m512 vz, __m512 vs, __m512 vq, __m512d vp) {
    const __m512 y = _mm512_add_ps(_mm512_div_ps(_mm512_sub_ps(v, vz), vs), _mm512_set1_ps(0.5f));
    /* clamp(floor(y), 0, qmax), NaN -> 0: max and min return their second operand on NaN */
    const __m512 f = _mm512_roundscale_ps(y, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    const __m512 q = _mm512_min_ps(_mm512_max_ps(f, _mm512_setzero_ps()), vq);
    __m512       p = _mm512_mul_ps(vs, q);
    __asm__("" : "+v"(p));
    const __m512 d    = _mm512_sub_ps(v, _mm512_add_ps(p, vz));
    const __m256 dlo  = _mm512_castps512_ps256(d);
    const __m256 dhi  = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(d), 1));
    __m512i      sum  = err_terms8(_mm512_setzero_si512(), dlo, (__mmask8) live, vp);
    return err_terms8(sum, dhi, (__mmask8) (live >> 8), vp);
}

static int64_t err_avx512(const float * x, int64_t n, float zero, float scale, float qmax, double p2k,
                          int64_t limit) {
    if (!(scale > 0.0f)) {
        return moqae_kv_err_ref(x, n, zero, scale, qmax, p2k, limit);
    }
    const __m512  vz = _mm512_set1_ps(zero), vs = _mm512_set1_ps(scale), vq = _mm512_set1_ps(qmax);
    const __m512d vp   = _mm512_set1_pd(p2k);
    __m512i       vacc = _mm512_setzero_si512();
    for (int64_t e = 0; e < n; e += 16) {
        const __mmask16 live = n - e >= 16 ? (__mmask16) 0xffff : (__mmask16) ((1u << (n - e)) - 1u);
        vacc = _mm512_add_epi64(vacc, err16(_mm512_maskz_loadu_ps(live, x + e), live, vz, vs, vq, vp));
        if (_mm512_reduce_add_epi64(vacc) >= limit) {
            break;
        }
    }
    return _mm512_reduce_add_epi64(vacc);
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

static const struct moqae_kv_codec_kernels kernels_avx512 = {
    .name = "avx512",
    .kq   = {kq_f16, kq_q8, kq_q4, kq_q2},
    .pv   = {pv_f16, pv_q8, pv_q4, pv_q2},
    .err  = err_avx512,
};

const struct moqae_kv_codec_kernels * moqae_kv_codec_kernels_avx512(void) {
    return moqae_cpu_has_avx512() ? &kernels_avx512 : NULL;
}

#else /* no AVX-512 in this build */

const struct moqae_kv_codec_kernels * moqae_kv_codec_kernels_avx512(void) {
    return NULL;
}

#endif
