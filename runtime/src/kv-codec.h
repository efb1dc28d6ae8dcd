/*
 * kv-codec.h — the KV-cache codecs: how one completed chunk of C tokens of one layer and one KV head is
 * encoded into a key record and a value record (FP16 copy, or INT8/INT4/INT2 asymmetric, KIVI-style:
 * keys per channel across the chunk's tokens, values per token in groups along head_dim, both after a
 * Hadamard rotation, with the keys' most outlying token kept apart at twice the bits, and an encoder that
 * searches the scale and zero codes), decoded, and used directly by the attention primitives (q.K^T, p.V;
 * keys best stored before RoPE, which the key primitive then applies). Not here: the ring, the choice of
 * codec per chunk, softmax, threading.
 * The byte layouts below are the contract with train/kv_codec.py (same bytes: tests/test_kv_codec.py);
 * docs/KV-CODECS.md has the measurements. References: kv-codec.c; SIMD: cpu/kv-codec-avx2.c, -avx512.c.
 */
#ifndef MOQAE_KV_CODEC_H
#define MOQAE_KV_CODEC_H

#include <stddef.h>
#include <stdint.h>

/* ================================================================================================
 * Codecs and shapes
 * ================================================================================================ */

enum moqae_kv_codec {
    MOQAE_KV_CODEC_F16 = 0, /* 16 bits: f16 copy (round to nearest even)          */
    MOQAE_KV_CODEC_Q8  = 1, /*  8-bit codes, u8 scale/zero codes + f16 bases      */
    MOQAE_KV_CODEC_Q4  = 2, /*  4-bit codes, same metadata                        */
    MOQAE_KV_CODEC_Q2  = 3, /*  2-bit codes, same metadata                        */
    MOQAE_KV_CODEC_COUNT
};

struct moqae_kv_shape {
    int64_t chunk;    /* C: tokens per chunk; a multiple of 16 in [16, 256] (32 by default, 64 allowed) */
    int64_t head_dim; /* D: even, in [2, 256]; the quantized codecs need D a multiple of 16              */
    int64_t v_group;  /* G: values' group length along head_dim; a multiple of 16 that divides D
                         (MOQAE_KV_V_GROUP by default; G = D is allowed)                                */
};

/* Default value group length: 64, the whole head at D = 64 (rotated, one group per token beats groups
 * of 32 per bit spent: docs/KV-CODECS.md, "Variants screened"). */
#define MOQAE_KV_V_GROUP 64

/* Scale codes are shared by `share` consecutive groups of a record (see the layout below). Keys: 1, a
 * scale per channel (sharing one between the channels of a RoPE pair cost more than it saved). Values:
 * D / G, one scale code per token shared by its groups, each group keeping its own zero: this keeps
 * int4 within 4.5 effective bits at C = 32, D = 64 at a lower error than groups of 64
 * (docs/KV-CODECS.md, "Choosing the metadata"). */
#define MOQAE_KV_K_SCALE_SHARE 1

/* The encoder's search (see the layout): scale codes tried from the covering one down (int2 clips
 * deeper), zero codes tried on each side of the centred one, and the fixed-point unit of the errors. */
#define MOQAE_KV_SEARCH_SCALES(bits) ((bits) == 2 ? 16 : 8)
#define MOQAE_KV_SEARCH_ZEROS        2
#define MOQAE_KV_ERR_BITS            40

/* MOQAE_OK when the shape is usable by codec c (records are only made for completed chunks: C tokens,
 * never fewer); otherwise MOQAE_ERR_INVALID_ARG with a message (moqae_last_error). */
int moqae_kv_shape_check(enum moqae_kv_codec c, const struct moqae_kv_shape * s);

const char * moqae_kv_codec_name(enum moqae_kv_codec c); /* "fp16", "int8", "int4", "int2" */
int          moqae_kv_codec_bits(enum moqae_kv_codec c); /* nominal bits: 16, 8, 4, 2        */

/* Exact record sizes in bytes (functions of codec, C, D, G only; see the layout). */
size_t moqae_kv_k_bytes(enum moqae_kv_codec c, const struct moqae_kv_shape * s);
size_t moqae_kv_v_bytes(enum moqae_kv_codec c, const struct moqae_kv_shape * s);
/* Effective bits per element of K and V together: (k_bytes + v_bytes) * 8 / (2 * C * D). */
double moqae_kv_effective_bits(enum moqae_kv_codec c, const struct moqae_kv_shape * s);

/* ================================================================================================
 * Record layouts (all multi-byte fields little-endian; records need no alignment)
 *
 * FP16 key record:   f16 K[D][C]   (transposed: channel d's C tokens are contiguous)     2*C*D bytes
 * FP16 value record: f16 V[C][D]   (as is)                                               2*C*D bytes
 *
 * Quantized records (b = 8, 4, 2 bits; qmax = 2^b - 1) quantize ROTATED data: each key row (token j's
 * D channels) and each value group is cut into blocks of n = moqae_kv_rot_block(D) (keys) or
 * moqae_kv_rot_block(G) (values) floats, the largest power of two dividing the length, and each block
 * goes through the Walsh-Hadamard butterflies, in this order (moqae_kv_fwht):
 *     for h = 1, 2, 4, .., n/2: for each i with (i & h) == 0: (a, b) = (y[i], y[i+h]); y[i] = a + b; y[i+h] = a - b
 * then is multiplied by 2^-floor(m/2) (n = 2^m): y = rotate(x). Decoding multiplies the butterflies of the
 * decoded block by 2^-ceil(m/2) (unrotate: the product of the two factors is 1/n, both exact). Rotation
 * spreads a channel's outliers over the block, so one range fits every element better.
 * The rotated data is a set of n_groups groups of n_elems elements, each group with its own zero and scale:
 *   keys:   group d = rotated channel d over the chunk's C tokens: n_groups = D,         n_elems = C
 *           (a group's elements are its tokens, in order: codes are channel-major, K^T)
 *   values: group (j, g) = token j, elements g*G .. g*G+G-1:       n_groups = C * D / G, n_elems = G
 *           (groups in token-major order: (0,0), (0,1), ..., (1,0), ...; codes are token-major)
 * Keys keep one OUTLIER token apart: xi = the token farthest from the chunk's mean key (sum over d of
 * (k[j][d] - mean[d])^2, f32, mean[d] = (sum over j in order of k[j][d]) / C, then the distance summed over d
 * in order; the first j of the largest). Its rotated row gets 2b-bit codes of its own (f16 zero xz rounded
 * down from its min, f16 scale xs rounded up from (max - xz) / (2^2b - 1)); the channel groups leave it out
 * (ranges, search), and its column of the code rows holds the low b bits of its codes instead.
 * Byte layout:
 *   codes      rows of codes: keys D rows of C codes (row d = channel d), values C rows of D codes
 *              (row j = token j). A row is packed in blocks of 16 codes, block k (elements 16k..16k+15)
 *              taking 2*b bytes at byte 2*b*k of the row; inside a block, element e is at
 *                b = 8: byte e
 *                b = 4: byte e % 8, bits 4*(e / 8) .. +3          (byte i = e_i | e_{i+8} << 4)
 *                b = 2: byte e % 4, bits 2*(e / 4) .. +1          (byte i = e_i | e_{i+4} << 2 | e_{i+8} << 4 | e_{i+12} << 6)
 *              so that one 64-bit (b=4) or 32-bit (b=2) load, shifted and masked, yields the block's
 *              16 codes in order as 16 bytes.                               n_groups * n_elems * b / 8 bytes
 *   xhi        keys only: one row of D codes packed the same way, the high b bits of the outlier's codes
 *                                                                                             D * b / 8 bytes
 *   zcode[n_groups]   u8 zero code of each group                                         n_groups bytes
 *   scode[n_groups / share]  u8 scale code of each run of `share` consecutive groups
 *              (keys: share = MOQAE_KV_K_SCALE_SHARE = 1; values: share = D / G, one per token)
 *   zlo, zstep, sbase: three f16 (the record's bases)                                           6 bytes
 *   keys only: xz, xs (two f16: the outlier's zero and scale), xi (u8: its token)               5 bytes
 *
 * Decoding (all f32, each operation rounded on its own, no fused multiply-add):
 *   zero(i)  = zlo + zstep * zcode[i]
 *   scale(a) = (sbase * FRAC[a % 16]) * 2^-(a / 16),  FRAC[f] = f32(2^(-f/16)) (kv-codec.c lists the bits)
 *   y        = scale(scode[i / share]) * code + zero(i);   the outlier: y = xs * (xhi << b | code) + xz
 *   x        = unrotate(y) (each key row, each value group's blocks)
 * Encoding, per record, of the rotated groups (f16() rounds to nearest even, f16_down/f16_up toward
 * -inf/+inf; lo_i, hi_i = min, max of group i without the outlier):
 *   zlo   = f16_down(min_i lo_i);         zstep = f16((max_i lo_i - zlo) / 255)
 *   zc0_i = zstep > 0 ? clamp(floor((lo_i - zlo) / zstep), 0, 255) : 0       (zero(zc0_i) <= lo_i, up to rounding)
 *   need  = (hi_i - zero(zc0_i)) / qmax, maximised over each run of `share` groups
 *   sbase = f16_up(max(max need, +0));  a0 = the largest a in [0, 255] with scale(a) >= need (0 if none): the
 *           smallest listed scale that covers the run's range (scale(a) decreases with a)
 *   code(x; z, s) = s > 0 ? clamp(floor((x - z) / s + 0.5), 0, qmax) : 0   (NaN -> 0)
 *   search (MSE, decoder unchanged): for each run, for a = min(a0 + t, 255), t < MOQAE_KV_SEARCH_SCALES(b)
 *           (clipping the top), s = scale(a); for each group of the run the zero codes zc0_i and
 *           cen + u, |u| <= MOQAE_KV_SEARCH_ZEROS (clipping both ends), each clamped to [0, 255] (0 when
 *           zstep == 0), where cen = floor((((lo_i + hi_i) * 0.5 - (s * qmax) * 0.5) - zlo) / zstep + 0.5);
 *           err(zc) = sum over the group's elements of min(floor(e^2 * 2^K), 2^48) in int64, e = x - (s * code
 *           + zero(zc)) in f32, e^2 in double, K = MOQAE_KV_ERR_BITS - 2 * E with scale(a0) * qmax = f * 2^E,
 *           f in [0.5, 1) (frexpf); each group keeps its first zero of least err, the run its first a whose
 *           groups' least errors sum the least. Exact integer sums: the choice cannot depend on the order.
 * Inputs must be finite with |x| <= 2^12 (rotated values then stay within f16 range; as for the FP16
 * codec, non-finite inputs give meaningless records, never undefined behaviour).
 * ================================================================================================ */

/* Encode one completed chunk of one KV head: k, v are [C][ld] f32 (row j = token j; the first D floats
 * of each row are used), rec gets moqae_kv_k_bytes / moqae_kv_v_bytes bytes. The shape must pass
 * moqae_kv_shape_check. Deterministic and identical on every CPU (scalar code). */
void moqae_kv_encode_k(enum moqae_kv_codec c, const struct moqae_kv_shape * s, const float * k, int64_t ld,
                       uint8_t * rec);
void moqae_kv_encode_v(enum moqae_kv_codec c, const struct moqae_kv_shape * s, const float * v, int64_t ld,
                       uint8_t * rec);

/* Decode a record back to f32: k, v are [C][ld] (the first D floats of each row are written). */
void moqae_kv_decode_k(enum moqae_kv_codec c, const struct moqae_kv_shape * s, const uint8_t * rec, float * k,
                       int64_t ld);
void moqae_kv_decode_v(enum moqae_kv_codec c, const struct moqae_kv_shape * s, const uint8_t * rec, float * v,
                       int64_t ld);

/* The per-group scale and zero of a quantized record, decoded, in the rotated space (for the SIMD kernels
 * and tests): keys: scale, zero are [D] (rotated channel d); values: [C][D / G] (token j, group g).
 * Not for FP16. */
void moqae_kv_meta_k(enum moqae_kv_codec c, const struct moqae_kv_shape * s, const uint8_t * rec, float * scale,
                     float * zero);
void moqae_kv_meta_v(enum moqae_kv_codec c, const struct moqae_kv_shape * s, const uint8_t * rec, float * scale,
                     float * zero);

/* ================================================================================================
 * Attention primitives on records (the kernel table)
 * ================================================================================================ */

/* Keys stored before RoPE (docs/KV-CODECS.md measures why): a record holds a chunk's keys as they come
 * out of the K projection, and the score of a query q (already rotated to its own position) against the
 * key at position P0 + t (P0 = the chunk's first position, t < C) is
 *     q . R(P0 + t) k = (R(-P0) q) . (R(t) k)
 * so the primitive rotates the query once by -P0 and each decoded key by its offset t, from two tables
 * the caller keeps: cs_t is the same for every chunk, cs_p0 is the chunk's own. R(a) rotates each pair
 * (x_u, x_w) of a key to (x_u cos - x_w sin, x_u sin + x_w cos) by the angle a * theta_i of pair i. */
struct moqae_kv_rope {
    int64_t       pair_stride; /* 1: pairs (2i, 2i+1) (llama-style GGUF); D/2: pairs (i, i + D/2) (NeoX)       */
    const float * cs_t;        /* [D/2][2][C]: cos, sin of t * theta_i for t = 0..C-1 (pairs past n_rot: 1, 0) */
    const float * cs_p0;       /* [D/2][2]: cos, sin of P0 * theta_i                                           */
};

/* Fills cs[D/2][2][n] with cos and sin of (pos0 + t) * theta[i], t < n, computed in double (n = C gives
 * cs_t with pos0 = 0; n = 1 gives a chunk's cs_p0). theta: [D/2] angles per position of each pair. */
void moqae_kv_rope_fill(int64_t head_dim, int64_t n, int64_t pos0, const float * theta, float * cs);

/* scores[i * ld_s + j] += sum_d q[i * ld_q + d] * K[j][d]   for i < n_q, j < C
 * with K the decoded chunk, rotated as above when rope is not NULL (rope NULL: keys stored after RoPE,
 * used as they decode). q: [n_q][ld_q] f32 (several query heads or tokens against the same chunk share
 * the unpacking); rec: a key record of the table entry's codec; scores: [n_q][ld_s], C of each row updated. */
typedef void (*moqae_kv_kq_fn)(const struct moqae_kv_shape * s, const struct moqae_kv_rope * rope,
                               const uint8_t * rec, int64_t n_q, const float * q, int64_t ld_q, float * scores,
                               int64_t ld_s);
/* out[i * ld_o + d] += sum_j p[i * ld_p + j] * V[j][d]   for i < n_q, d < D
 * p: [n_q][ld_p] f32 weights of the chunk's C tokens; rec: a value record; out: [n_q][ld_o]. */
typedef void (*moqae_kv_pv_fn)(const struct moqae_kv_shape * s, const uint8_t * rec, int64_t n_q,
                               const float * p, int64_t ld_p, float * out, int64_t ld_o);

/* The encoder's search error (the layout comment's err(zc) for one zero and scale): sum over x[0..n) of
 * min(floor(e^2 * p2k), 2^48) in int64, e = x - (scale * code(x; zero, scale) + zero) in f32, p2k = 2^K.
 * It may stop once the sum reaches limit: a result >= limit then only says that the true sum is >= limit
 * (every term is >= 0). Below limit every table returns the same integer: the SIMD ones do the same IEEE
 * operations, element by element, with no fused multiply-add. */
typedef int64_t (*moqae_kv_err_fn)(const float * x, int64_t n, float zero, float scale, float qmax, double p2k,
                                   int64_t limit);

struct moqae_kv_codec_kernels {
    const char *    name; /* "scalar", "avx2", "avx512" */
    moqae_kv_kq_fn  kq[MOQAE_KV_CODEC_COUNT];
    moqae_kv_pv_fn  pv[MOQAE_KV_CODEC_COUNT];
    moqae_kv_err_fn err;
};

/* The scalar err (the SIMD ones end with it for their tails). */
int64_t moqae_kv_err_ref(const float * x, int64_t n, float zero, float scale, float qmax, double p2k, int64_t limit);

/* The scalar reference (decode the chunk with moqae_kv_decode_*, accumulate in double): the SIMD tables' oracle. */
const struct moqae_kv_codec_kernels * moqae_kv_codec_kernels_ref(void);
/* SIMD tables (f32 arithmetic on the codes, within tests/test-kv-codec.c's tolerances of the
 * reference); NULL when the build or the CPU lacks the ISA. */
const struct moqae_kv_codec_kernels * moqae_kv_codec_kernels_avx2(void);
const struct moqae_kv_codec_kernels * moqae_kv_codec_kernels_avx512(void);
/* The best table for this CPU, honouring MOQAE_CPU=scalar|avx2|avx512 like moqae_cpu_kernels(). */
const struct moqae_kv_codec_kernels * moqae_kv_codec_kernels(void);

/* The outlier token of a quantized key record: its index (returned) and its row in the rotated space,
 * decoded: y[D] (xs * code + xz). */
int64_t moqae_kv_outlier_k(enum moqae_kv_codec c, const struct moqae_kv_shape * s, const uint8_t * rec, float * y);

/* ---- the rotation (kv-codec.c; the SIMD files use them on their accumulators) ---- */
/* The largest power of two that divides n (n >= 1): the rotation's block. */
int64_t moqae_kv_rot_block(int64_t n);
/* x[len] (len a multiple of n, n a power of two): the butterflies of each block of n (the layout's order),
 * then each element multiplied by 2^-floor(m/2) (rotate) or 2^-ceil(m/2) (unrotate), n = 2^m. */
void moqae_kv_rotate(float * x, int64_t len, int64_t n);
/* The factor itself: 2^-floor(m/2) (inverse 0) or 2^-ceil(m/2) (inverse 1), n = 2^m. */
float moqae_kv_rot_factor(int64_t n, int inverse);
void moqae_kv_unrotate(float * x, int64_t len, int64_t n);

/* ---- internal to the codec files: record geometry ---- */
struct moqae_kv_geom {
    int64_t n_groups, n_elems, share, bits;
    size_t  codes_bytes; /* offset of the xhi row (keys) or of zcode (values)                 */
    size_t  xrow_bytes;  /* keys: n_groups * bits / 8 (the outlier's high bits); values: 0  */
    size_t  zcode_bytes; /* n_groups                                                         */
    size_t  scode_bytes; /* n_groups / share                                                 */
    size_t  total;       /* codes + xrow + zcode + scode + 6 + (keys: 5)                     */
    int     outlier;     /* keys: 1                                                           */
};
struct moqae_kv_geom moqae_kv_geom_k(enum moqae_kv_codec c, const struct moqae_kv_shape * s);
struct moqae_kv_geom moqae_kv_geom_v(enum moqae_kv_codec c, const struct moqae_kv_shape * s);
/* A quantized record's bases, decoded: zero(i) = zl + zs * zcode[i], scale(a) = (sb * FRAC[a%16]) * 2^-(a/16). */
void moqae_kv_bases(const struct moqae_kv_geom * g, const uint8_t * rec, float * zl, float * zs, float * sb);
extern const float moqae_kv_frac[16]; /* FRAC */

#endif /* MOQAE_KV_CODEC_H */
