/*
 * kv-codec.c — the KV codecs of kv-codec.h in plain scalar C: encoding (the only encoder: it runs once
 * per completed chunk, so it stays scalar and is bit-identical on every CPU: rotation, outlier token,
 * the search of scale and zero codes), decoding, the metadata decoder the SIMD kernels use, and the
 * reference attention primitives (decode the chunk, accumulate in double), which are the oracle for
 * cpu/kv-codec-avx2.c and cpu/kv-codec-avx512.c.
 * The PyTorch twin is train/kv_codec.py: every f32 operation here has its counterpart there, in the
 * same order, with no fused multiply-add (mul_rn below; build this file with -ffp-contract=off too).
 * Not here: the ring, softmax, threads.
 */
#include "kv-codec.h"

#include "common.h"
#include "cpu/kernels.h"

#include <math.h>

/* Bounds that keep every per-record table on the stack (see moqae_kv_shape_check). */
#define MAX_CHUNK    256
#define MAX_HEAD_DIM 256
#define MAX_GROUPS   (MAX_CHUNK * MAX_HEAD_DIM / 16)

/* FRAC[f] = f32(2^(-f/16)): the 16 mantissas of the log-scale code. train/kv_codec.py lists the same
 * bits; tests/test_kv_codec.py checks they agree. */
#define FRAC moqae_kv_frac
const float moqae_kv_frac[16] = {
    0x1.000000p+0f, 0x1.ea4afap-1f, 0x1.d5818ep-1f, 0x1.c199bep-1f, 0x1.ae89fap-1f, 0x1.9c4918p-1f,
    0x1.8ace54p-1f, 0x1.7a1148p-1f, 0x1.6a09e6p-1f, 0x1.5ab07ep-1f, 0x1.4bfdaep-1f, 0x1.3dea64p-1f,
    0x1.306fe0p-1f, 0x1.2387a6p-1f, 0x1.172b84p-1f, 0x1.0b5586p-1f,
};

/* a * b rounded to f32 on its own. GCC contracts a*b+c into an FMA across statements under
 * -ffp-contract=fast (its default for GNU C) when FMA is enabled (-march=native); the empty asm hides
 * the product so the following add cannot fuse with it, as torch on CPU never fuses. */
static inline float mul_rn(float a, float b) {
    float p = a * b;
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
    __asm__("" : "+x"(p));
#elif defined(__GNUC__) && defined(__aarch64__)
    __asm__("" : "+w"(p));
#else
    volatile float v = p;
    p                = v;
#endif
    return p;
}

/* ================================================================================================
 * Shapes, sizes, geometry
 * ================================================================================================ */

const char * moqae_kv_codec_name(enum moqae_kv_codec c) {
    static const char * names[MOQAE_KV_CODEC_COUNT] = {"fp16", "int8", "int4", "int2"};
    return (unsigned) c < MOQAE_KV_CODEC_COUNT ? names[c] : "?";
}

int moqae_kv_codec_bits(enum moqae_kv_codec c) {
    static const int bits[MOQAE_KV_CODEC_COUNT] = {16, 8, 4, 2};
    return (unsigned) c < MOQAE_KV_CODEC_COUNT ? bits[c] : 0;
}

int moqae_kv_shape_check(enum moqae_kv_codec c, const struct moqae_kv_shape * s) {
    if ((unsigned) c >= MOQAE_KV_CODEC_COUNT) {
        return moqae_fail(MOQAE_ERR_INVALID_ARG, "KV codec %d is unknown", (int) c);
    }
    if (s->chunk < 16 || s->chunk > MAX_CHUNK || s->chunk % 16 != 0) {
        return moqae_fail(MOQAE_ERR_INVALID_ARG, "KV chunk size %lld: must be a multiple of 16 in [16, %d]",
                          (long long) s->chunk, MAX_CHUNK);
    }
    if (s->head_dim < 2 || s->head_dim > MAX_HEAD_DIM || s->head_dim % 2 != 0) {
        return moqae_fail(MOQAE_ERR_INVALID_ARG, "KV head_dim %lld: must be even, in [2, %d]",
                          (long long) s->head_dim, MAX_HEAD_DIM);
    }
    if (c == MOQAE_KV_CODEC_F16) {
        return MOQAE_OK;
    }
    if (s->head_dim % 16 != 0 || s->head_dim % MOQAE_KV_K_SCALE_SHARE != 0) {
        return moqae_fail(MOQAE_ERR_INVALID_ARG, "KV codec %s needs head_dim a multiple of 16, not %lld",
                          moqae_kv_codec_name(c), (long long) s->head_dim);
    }
    if (s->v_group < 16 || s->v_group % 16 != 0 || s->head_dim % s->v_group != 0) {
        return moqae_fail(MOQAE_ERR_INVALID_ARG,
                          "KV value group %lld: must be a multiple of 16 that divides head_dim %lld",
                          (long long) s->v_group, (long long) s->head_dim);
    }
    return MOQAE_OK;
}

static struct moqae_kv_geom geom(int64_t n_groups, int64_t n_elems, int64_t share, int64_t bits, int outlier) {
    struct moqae_kv_geom g;
    g.n_groups    = n_groups;
    g.n_elems     = n_elems;
    g.share       = share;
    g.bits        = bits;
    g.outlier     = outlier;
    g.codes_bytes = (size_t) (n_groups * n_elems * bits / 8);
    g.xrow_bytes  = outlier ? (size_t) (n_groups * bits / 8) : 0;
    g.zcode_bytes = (size_t) n_groups;
    g.scode_bytes = (size_t) (n_groups / share);
    g.total       = g.codes_bytes + g.xrow_bytes + g.zcode_bytes + g.scode_bytes + 6 + (outlier ? 5 : 0);
    return g;
}

struct moqae_kv_geom moqae_kv_geom_k(enum moqae_kv_codec c, const struct moqae_kv_shape * s) {
    return geom(s->head_dim, s->chunk, MOQAE_KV_K_SCALE_SHARE, moqae_kv_codec_bits(c), 1);
}

struct moqae_kv_geom moqae_kv_geom_v(enum moqae_kv_codec c, const struct moqae_kv_shape * s) {
    /* one scale code per token, shared by its D / G groups */
    return geom(s->chunk * (s->head_dim / s->v_group), s->v_group, s->head_dim / s->v_group, moqae_kv_codec_bits(c),
                0);
}

size_t moqae_kv_k_bytes(enum moqae_kv_codec c, const struct moqae_kv_shape * s) {
    if (c == MOQAE_KV_CODEC_F16) {
        return (size_t) s->chunk * (size_t) s->head_dim * 2;
    }
    return moqae_kv_geom_k(c, s).total;
}

size_t moqae_kv_v_bytes(enum moqae_kv_codec c, const struct moqae_kv_shape * s) {
    if (c == MOQAE_KV_CODEC_F16) {
        return (size_t) s->chunk * (size_t) s->head_dim * 2;
    }
    return moqae_kv_geom_v(c, s).total;
}

double moqae_kv_effective_bits(enum moqae_kv_codec c, const struct moqae_kv_shape * s) {
    const double bytes = (double) (moqae_kv_k_bytes(c, s) + moqae_kv_v_bytes(c, s));
    return bytes * 8.0 / (2.0 * (double) s->chunk * (double) s->head_dim);
}

/* ================================================================================================
 * Code packing (16-code blocks, kv-codec.h)
 * ================================================================================================ */

static inline void put_code(uint8_t * row, int64_t e, int64_t bits, unsigned q) {
    const int64_t k = e / 16, r = e % 16;
    switch (bits) {
        case 8: row[e] = (uint8_t) q; break;
        case 4: row[8 * k + r % 8] |= (uint8_t) (q << (4 * (r / 8))); break;
        default: row[4 * k + r % 4] |= (uint8_t) (q << (2 * (r / 4))); break;
    }
}

static inline unsigned get_code(const uint8_t * row, int64_t e, int64_t bits) {
    const int64_t k = e / 16, r = e % 16;
    switch (bits) {
        case 8: return row[e];
        case 4: return (row[8 * k + r % 8] >> (4 * (r / 8))) & 15u;
        default: return (row[4 * k + r % 4] >> (2 * (r / 4))) & 3u;
    }
}

/* f16 of x rounded toward -inf / +inf: round to nearest even, then one step if it went the wrong way. */
static moqae_f16 f16_down(float x) {
    moqae_f16 h = moqae_f32_to_f16(x);
    if (moqae_f16_to_f32(h) > x) {
        h = h == 0x0000u ? 0x8001u : (h & 0x8000u) ? (moqae_f16) (h + 1) : (moqae_f16) (h - 1);
    }
    return h;
}

static moqae_f16 f16_up(float x) {
    moqae_f16 h = moqae_f32_to_f16(x);
    if (moqae_f16_to_f32(h) < x) {
        h = h == 0x8000u ? 0x0001u : (h & 0x8000u) ? (moqae_f16) (h - 1) : (moqae_f16) (h + 1);
    }
    return h;
}

static inline moqae_f16 rd16(const uint8_t * p) {
    moqae_f16 h;
    memcpy(&h, p, 2);
    return h;
}

static inline void wr16(uint8_t * p, moqae_f16 h) {
    memcpy(p, &h, 2);
}

/* ================================================================================================
 * Metadata: bases, zero and scale codes
 * ================================================================================================ */

/* Decoded bases of a record: zero(i) = zl + zs * zcode[i], scale(a) = (sb * FRAC[a % 16]) * 2^-(a / 16). */
struct bases {
    float zl, zs, sb;
};

static inline const uint8_t * zcodes(const struct moqae_kv_geom * g, const uint8_t * rec) {
    return rec + g->codes_bytes + g->xrow_bytes;
}

static struct bases read_bases(const struct moqae_kv_geom * g, const uint8_t * rec) {
    const uint8_t * p = zcodes(g, rec) + g->zcode_bytes + g->scode_bytes;
    struct bases    b = {moqae_f16_to_f32(rd16(p)), moqae_f16_to_f32(rd16(p + 2)), moqae_f16_to_f32(rd16(p + 4))};
    return b;
}

void moqae_kv_bases(const struct moqae_kv_geom * g, const uint8_t * rec, float * zl, float * zs, float * sb) {
    const struct bases b = read_bases(g, rec);
    *zl                  = b.zl;
    *zs                  = b.zs;
    *sb                  = b.sb;
}

/* 2^-e for e < 16: multiplying by it is exact (sb * FRAC >= 2^-25, so no result is subnormal). */
static const float POW2_NEG[16] = {
    0x1p-0f, 0x1p-1f, 0x1p-2f,  0x1p-3f,  0x1p-4f,  0x1p-5f,  0x1p-6f,  0x1p-7f,
    0x1p-8f, 0x1p-9f, 0x1p-10f, 0x1p-11f, 0x1p-12f, 0x1p-13f, 0x1p-14f, 0x1p-15f,
};

/* The scale of code a. */
static inline float scale_of(float sb, unsigned a) {
    return mul_rn(sb, FRAC[a & 15u]) * POW2_NEG[a >> 4];
}

static inline float zero_of(const struct bases * b, unsigned zcode) {
    return b->zl + mul_rn(b->zs, (float) zcode);
}

/* Group i's scale and zero. */
static inline void group_meta(const struct moqae_kv_geom * g, const uint8_t * rec, const struct bases * b,
                              int64_t i, float * scale, float * zero) {
    const uint8_t * zc = zcodes(g, rec);
    const uint8_t * sc = zc + g->zcode_bytes;
    *scale             = scale_of(b->sb, sc[i / g->share]);
    *zero              = zero_of(b, zc[i]);
}

static void meta_all(const struct moqae_kv_geom * g, const uint8_t * rec, float * scale, float * zero) {
    const struct bases b = read_bases(g, rec);
    for (int64_t i = 0; i < g->n_groups; i++) {
        group_meta(g, rec, &b, i, &scale[i], &zero[i]);
    }
}

void moqae_kv_meta_k(enum moqae_kv_codec c, const struct moqae_kv_shape * s, const uint8_t * rec, float * scale,
                     float * zero) {
    const struct moqae_kv_geom g = moqae_kv_geom_k(c, s);
    meta_all(&g, rec, scale, zero);
}

void moqae_kv_meta_v(enum moqae_kv_codec c, const struct moqae_kv_shape * s, const uint8_t * rec, float * scale,
                     float * zero) {
    const struct moqae_kv_geom g = moqae_kv_geom_v(c, s);
    meta_all(&g, rec, scale, zero);
}

/* The outlier's fields, after the bases: xz, xs (f16), xi (u8). */
static inline const uint8_t * outlier_fields(const struct moqae_kv_geom * g, const uint8_t * rec) {
    return zcodes(g, rec) + g->zcode_bytes + g->scode_bytes + 6;
}

int64_t moqae_kv_outlier_k(enum moqae_kv_codec c, const struct moqae_kv_shape * s, const uint8_t * rec, float * y) {
    const struct moqae_kv_geom g  = moqae_kv_geom_k(c, s);
    const uint8_t *            of = outlier_fields(&g, rec);
    const float                xz = moqae_f16_to_f32(rd16(of)), xs = moqae_f16_to_f32(rd16(of + 2));
    const int64_t              xi = of[4], C = s->chunk;
    const uint8_t *            xhi = rec + g.codes_bytes;
    for (int64_t d = 0; d < s->head_dim; d++) {
        const unsigned lo = get_code(rec + (size_t) (d * C * g.bits / 8), xi, g.bits);
        const unsigned q  = get_code(xhi, d, g.bits) << g.bits | lo;
        y[d]              = mul_rn(xs, (float) q) + xz;
    }
    return xi;
}

/* ================================================================================================
 * The rotation (kv-codec.h: blocks of Walsh-Hadamard butterflies, exact power-of-two scalings)
 * ================================================================================================ */

int64_t moqae_kv_rot_block(int64_t n) {
    return n & -n;
}

static void fwht(float * x, int64_t len, int64_t n, float f) {
    for (int64_t b = 0; b < len; b += n) {
        float * y = x + b;
        for (int64_t h = 1; h < n; h *= 2) {
            for (int64_t i = 0; i < n; i += 2 * h) {
                for (int64_t j = i; j < i + h; j++) {
                    const float a = y[j], c = y[j + h];
                    y[j]          = a + c;
                    y[j + h]      = a - c;
                }
            }
        }
        for (int64_t i = 0; i < n; i++) {
            y[i] *= f;
        }
    }
}

/* n = 2^m: 2^-floor(m/2) forward, 2^-ceil(m/2) back */
float moqae_kv_rot_factor(int64_t n, int inverse) {
    int m = 0;
    while (((int64_t) 1 << m) < n) {
        m++;
    }
    return ldexpf(1.0f, -(inverse ? (m + 1) / 2 : m / 2));
}

void moqae_kv_rotate(float * x, int64_t len, int64_t n) {
    fwht(x, len, n, moqae_kv_rot_factor(n, 0));
}

void moqae_kv_unrotate(float * x, int64_t len, int64_t n) {
    fwht(x, len, n, moqae_kv_rot_factor(n, 1));
}

/* ================================================================================================
 * Encoding
 * ================================================================================================ */

/* Where the groups of a record live in an f32 [C][ld] chunk: element e of group i is at
 * x[goff(i) + e * estride]. Keys: group d = column d (estride = ld); values: group (j, g) = the G
 * floats at row j, column g*G (estride = 1). skip: an element index left out of every group (the keys'
 * outlier token), or -1. */
struct src {
    const float * x;
    int64_t       ld, estride, groups_per_row, group_len, skip;
};

static inline int64_t goff(const struct src * s, int64_t i) {
    return (i / s->groups_per_row) * s->ld + (i % s->groups_per_row) * s->group_len;
}

static inline float quant_code(float x, float zero, float scale, float qmax) {
    if (!(scale > 0.0f)) {
        return 0.0f;
    }
    const float t = floorf((x - zero) / scale + 0.5f);
    return t > 0.0f ? (t < qmax ? t : qmax) : 0.0f;
}

/* Group i's elements but the skipped one, copied to x (contiguous); returns their number. */
static int64_t gather(const struct src * s, int64_t i, int64_t m, float * x) {
    const float * g = s->x + goff(s, i);
    int64_t       n = 0;
    for (int64_t e = 0; e < m; e++) {
        if (e != s->skip) {
            x[n++] = g[e * s->estride];
        }
    }
    return n;
}

/* One element's term of the search error: min(floor(e^2 * 2^K), 2^48), e = x - decoded (t >= 0, or NaN
 * from non-finite input: 2^48). e^2 is exact in double, and scaling it by p2k = 2^K rounds as ldexp does. */
static inline int64_t err_term(float x, float zero, float scale, float qmax, double p2k) {
    const float  d = x - (mul_rn(scale, quant_code(x, zero, scale, qmax)) + zero);
    const double t = (double) d * (double) d * p2k;
    return t < 0x1p48 ? (int64_t) t : ((int64_t) 1 << 48); /* t >= 0: truncation is floor */
}

int64_t moqae_kv_err_ref(const float * x, int64_t n, float zero, float scale, float qmax, double p2k, int64_t limit) {
    int64_t acc = 0;
    for (int64_t e = 0; e < n; e++) {
        acc += err_term(x[e], zero, scale, qmax, p2k);
        if ((e & 7) == 7 && acc >= limit) {
            break;
        }
    }
    return acc;
}

/* The search of kv-codec.h for the run r of groups r*share .. r*share+share-1: returns the scale code,
 * writes each group's zero code to zc. Exact pruning: a candidate (zero or scale) stops being summed
 * once it cannot be strictly better than the best so far, which is what the search keeps. */
static unsigned search_run(const struct moqae_kv_geom * g, const struct src * s, const struct bases * b, int64_t r,
                           unsigned a0, const float * lo, const float * hi, uint8_t * zc) {
    const float   qmax = (float) ((1 << g->bits) - 1);
    const int64_t i0 = r * g->share, m = g->n_elems;
    int           E;
    (void) frexpf(mul_rn(scale_of(b->sb, a0), qmax), &E);
    const double  p2k    = ldexp(1.0, MOQAE_KV_ERR_BITS - 2 * E);
    const int64_t NONE   = INT64_MAX;
    const moqae_kv_err_fn group_err = moqae_kv_codec_kernels()->err; /* the same integers in every table */
    int64_t       best   = NONE;
    unsigned      best_a = a0;
    uint8_t       zbest[MAX_GROUPS], ztry[MAX_GROUPS];
    float         x[MAX_HEAD_DIM]; /* the run's groups gathered: [share][m] (values: one token; keys: a column) */
    int64_t       n = 0;             /* elements of each gathered group */
    MOQAE_ASSERT(g->share * m <= MAX_HEAD_DIM);
    for (int64_t i = i0; i < i0 + g->share; i++) {
        n = gather(s, i, m, x + (i - i0) * m);
    }
    for (int t = 0; t < MOQAE_KV_SEARCH_SCALES(g->bits); t++) {
        const unsigned a   = a0 + (unsigned) t < 255u ? a0 + (unsigned) t : 255u;
        const float    sc  = scale_of(b->sb, a);
        int64_t        sum = 0;
        for (int64_t i = i0; i < i0 + g->share && sum < best; i++) {
            const float * xi = x + (i - i0) * m;
            float cand[2 + 2 * MOQAE_KV_SEARCH_ZEROS];
            int   nc     = 0;
            cand[nc++]   = (float) zc[i]; /* zc0: no clipping at the bottom */
            const float cen = b->zs > 0.0f
                                  ? floorf((((lo[i] + hi[i]) * 0.5f - mul_rn(sc, qmax) * 0.5f) - b->zl) / b->zs + 0.5f)
                                  : 0.0f;
            for (int u = -MOQAE_KV_SEARCH_ZEROS; u <= MOQAE_KV_SEARCH_ZEROS; u++) {
                cand[nc++] = cen + (float) u;
            }
            int64_t  gbest = NONE;
            unsigned tried[2 + 2 * MOQAE_KV_SEARCH_ZEROS];
            for (int k = 0; k < nc; k++) {
                float z = b->zs > 0.0f ? cand[k] : 0.0f;
                z       = z > 0.0f ? (z < 255.0f ? z : 255.0f) : 0.0f; /* NaN -> 0 */
                tried[k] = (unsigned) z;
                int dup  = 0; /* a repeated zero has the same error: the first one is kept anyway */
                for (int j = 0; j < k; j++) {
                    dup |= tried[j] == tried[k];
                }
                if (dup) {
                    continue;
                }
                const int64_t room  = best == NONE ? NONE : best - sum;
                const int64_t limit = gbest < room ? gbest : room;
                const int64_t e     = group_err(xi, n, zero_of(b, tried[k]), sc, qmax, p2k, limit);
                if (e < gbest) {
                    gbest   = e;
                    ztry[i] = (uint8_t) tried[k];
                }
            }
            /* gbest == NONE only if every candidate reached room: this scale cannot win */
            sum = gbest == NONE || gbest >= NONE - sum ? NONE : sum + gbest;
        }
        if (sum < best) {
            best   = sum;
            best_a = a;
            for (int64_t i = i0; i < i0 + g->share; i++) {
                zbest[i] = ztry[i];
            }
        }
    }
    for (int64_t i = i0; i < i0 + g->share; i++) {
        zc[i] = zbest[i];
    }
    return best_a;
}

static void encode_q(const struct moqae_kv_geom * g, const struct src * s, uint8_t * rec) {
    const float qmax = (float) ((1 << g->bits) - 1);
    const int64_t n = g->n_groups, m = g->n_elems;
    uint8_t *     zc = rec + g->codes_bytes + g->xrow_bytes;
    uint8_t *     sc = zc + g->zcode_bytes;
    uint8_t *     bp = sc + g->scode_bytes;
    float lo[MAX_GROUPS], hi[MAX_GROUPS], need[MAX_GROUPS];

    /* per-group ranges (without the skipped element) and the zero base */
    float lo_min = INFINITY, lo_max = -INFINITY;
    for (int64_t i = 0; i < n; i++) {
        const float * x = s->x + goff(s, i);
        float         a = INFINITY, b = -INFINITY;
        for (int64_t e = 0; e < m; e++) {
            if (e == s->skip) {
                continue;
            }
            const float v = x[e * s->estride];
            a             = v < a ? v : a;
            b             = v > b ? v : b;
        }
        lo[i]  = a;
        hi[i]  = b;
        lo_min = a < lo_min ? a : lo_min;
        lo_max = a > lo_max ? a : lo_max;
    }
    const moqae_f16 zlo16   = f16_down(lo_min); /* so that zero(i) <= lo_i: no clipping from below */
    const float     zl      = moqae_f16_to_f32(zlo16);
    const moqae_f16 zstep16 = moqae_f32_to_f16((lo_max - zl) / 255.0f);
    const float     zs      = moqae_f16_to_f32(zstep16);
    const struct bases base0 = {zl, zs, 0.0f};

    /* zero codes (zero(i) <= lo_i up to rounding), then what each run of groups needs as a scale */
    float need_max = 0.0f;
    for (int64_t i = 0; i < n; i++) {
        unsigned z = 0;
        if (zs > 0.0f) {
            const float t = floorf((lo[i] - zl) / zs);
            z             = t > 0.0f ? (t < 255.0f ? (unsigned) t : 255u) : 0u;
        }
        zc[i]         = (uint8_t) z;
        const float r = (hi[i] - zero_of(&base0, z)) / qmax;
        if (i % g->share == 0 || r > need[i / g->share]) {
            need[i / g->share] = r;
        }
        need_max = r > need_max ? r : need_max;
    }
    const moqae_f16 sbase16 = f16_up(need_max); /* so that scale(0) covers every run */
    const float     sb      = moqae_f16_to_f32(sbase16);
    const struct bases base = {zl, zs, sb};

    /* scale codes: the largest a whose scale still covers the run (binary search over decreasing
     * scales), then the search of kv-codec.h from there */
    for (int64_t r = 0; r < n / g->share; r++) {
        unsigned a = 0;
        if (scale_of(sb, 0) >= need[r]) {
            unsigned b = 256; /* scale(a) >= need, and every code >= b has a smaller scale */
            while (b - a > 1) {
                const unsigned mid = (a + b) / 2;
                if (scale_of(sb, mid) >= need[r]) {
                    a = mid;
                } else {
                    b = mid;
                }
            }
        }
        sc[r] = (uint8_t) search_run(g, s, &base, r, a, lo, hi, zc);
    }
    wr16(bp, zlo16);
    wr16(bp + 2, zstep16);
    wr16(bp + 4, sbase16);

    /* codes (the skipped element's are 0 here) */
    const struct bases b = read_bases(g, rec);
    memset(rec, 0, g->codes_bytes);
    for (int64_t i = 0; i < n; i++) {
        float scale, zero;
        group_meta(g, rec, &b, i, &scale, &zero);
        const float * x = s->x + goff(s, i);
        /* group i's codes start at byte i * m * bits / 8: keys, row i; values, row j at column g * G */
        uint8_t *     row = rec + (size_t) (i * m * g->bits / 8);
        for (int64_t e = 0; e < m; e++) {
            if (e != s->skip) {
                put_code(row, e, g->bits, (unsigned) quant_code(x[e * s->estride], zero, scale, qmax));
            }
        }
    }
}

/* The keys' outlier token: the farthest from the chunk's mean key (kv-codec.h). */
static int64_t outlier_index(const float * k, int64_t ld, int64_t C, int64_t D) {
    float mean[MAX_HEAD_DIM];
    for (int64_t d = 0; d < D; d++) {
        float acc = 0.0f;
        for (int64_t j = 0; j < C; j++) {
            acc = acc + k[j * ld + d];
        }
        mean[d] = acc / (float) C;
    }
    int64_t best = 0;
    float   bd   = 0.0f;
    for (int64_t j = 0; j < C; j++) {
        float dist = 0.0f;
        for (int64_t d = 0; d < D; d++) {
            const float t = k[j * ld + d] - mean[d];
            dist          = dist + mul_rn(t, t);
        }
        if (j == 0 || dist > bd) {
            best = j;
            bd   = dist;
        }
    }
    return best;
}

void moqae_kv_encode_k(enum moqae_kv_codec c, const struct moqae_kv_shape * s, const float * k, int64_t ld,
                       uint8_t * rec) {
    const int64_t C = s->chunk, D = s->head_dim;
    if (c == MOQAE_KV_CODEC_F16) {
        for (int64_t d = 0; d < D; d++) {
            for (int64_t j = 0; j < C; j++) {
                wr16(rec + 2 * (d * C + j), moqae_f32_to_f16(k[j * ld + d]));
            }
        }
        return;
    }
    const struct moqae_kv_geom g  = moqae_kv_geom_k(c, s);
    const int64_t              xi = outlier_index(k, ld, C, D);
    float                      y[MAX_CHUNK * MAX_HEAD_DIM]; /* [C][D] rotated rows */
    for (int64_t j = 0; j < C; j++) {
        memcpy(y + j * D, k + j * ld, sizeof(float) * (size_t) D);
        moqae_kv_rotate(y + j * D, D, moqae_kv_rot_block(D));
    }
    const struct src src = {y, D, D, D, 1, xi};
    encode_q(&g, &src, rec);

    /* the outlier's row: 2b-bit codes, low bits in its column, high bits in the xhi row */
    const float * yx   = y + xi * D;
    float         xmin = yx[0], xmax = yx[0];
    for (int64_t d = 1; d < D; d++) {
        xmin = yx[d] < xmin ? yx[d] : xmin;
        xmax = yx[d] > xmax ? yx[d] : xmax;
    }
    const float     qmax2 = (float) ((1u << (2 * g.bits)) - 1u);
    const moqae_f16 xz16  = f16_down(xmin);
    const float     xz    = moqae_f16_to_f32(xz16);
    const moqae_f16 xs16  = f16_up((xmax - xz) / qmax2);
    const float     xs    = moqae_f16_to_f32(xs16);
    uint8_t *       xhi   = rec + g.codes_bytes;
    memset(xhi, 0, g.xrow_bytes);
    const unsigned low = (1u << g.bits) - 1u;
    for (int64_t d = 0; d < D; d++) {
        const unsigned q = (unsigned) quant_code(yx[d], xz, xs, qmax2);
        put_code(rec + (size_t) (d * C * g.bits / 8), xi, g.bits, q & low);
        put_code(xhi, d, g.bits, q >> g.bits);
    }
    uint8_t * of = rec + g.codes_bytes + g.xrow_bytes + g.zcode_bytes + g.scode_bytes + 6;
    wr16(of, xz16);
    wr16(of + 2, xs16);
    of[4] = (uint8_t) xi;
}

void moqae_kv_encode_v(enum moqae_kv_codec c, const struct moqae_kv_shape * s, const float * v, int64_t ld,
                       uint8_t * rec) {
    const int64_t C = s->chunk, D = s->head_dim;
    if (c == MOQAE_KV_CODEC_F16) {
        for (int64_t j = 0; j < C; j++) {
            for (int64_t d = 0; d < D; d++) {
                wr16(rec + 2 * (j * D + d), moqae_f32_to_f16(v[j * ld + d]));
            }
        }
        return;
    }
    const struct moqae_kv_geom g = moqae_kv_geom_v(c, s);
    float                      y[MAX_CHUNK * MAX_HEAD_DIM]; /* [C][D] rows rotated in blocks */
    for (int64_t j = 0; j < C; j++) {
        memcpy(y + j * D, v + j * ld, sizeof(float) * (size_t) D);
        moqae_kv_rotate(y + j * D, D, moqae_kv_rot_block(s->v_group));
    }
    const struct src src = {y, D, 1, D / s->v_group, s->v_group, -1};
    encode_q(&g, &src, rec);
}

/* ================================================================================================
 * Decoding
 * ================================================================================================ */

/* Element e of group i, decoded: scale * code + zero, product rounded first. */
static inline float elem(const struct moqae_kv_geom * g, const uint8_t * rec, int64_t i, int64_t e, float scale,
                         float zero) {
    const uint8_t * row = rec + (size_t) (i * g->n_elems * g->bits / 8);
    return mul_rn(scale, (float) get_code(row, e, g->bits)) + zero;
}

void moqae_kv_decode_k(enum moqae_kv_codec c, const struct moqae_kv_shape * s, const uint8_t * rec, float * k,
                       int64_t ld) {
    const int64_t C = s->chunk, D = s->head_dim;
    if (c == MOQAE_KV_CODEC_F16) {
        for (int64_t d = 0; d < D; d++) {
            for (int64_t j = 0; j < C; j++) {
                k[j * ld + d] = moqae_f16_to_f32(rd16(rec + 2 * (d * C + j)));
            }
        }
        return;
    }
    const struct moqae_kv_geom g = moqae_kv_geom_k(c, s);
    const struct bases         b = read_bases(&g, rec);
    for (int64_t d = 0; d < D; d++) {
        float scale, zero;
        group_meta(&g, rec, &b, d, &scale, &zero);
        for (int64_t j = 0; j < C; j++) {
            k[j * ld + d] = elem(&g, rec, d, j, scale, zero);
        }
    }
    float         yx[MAX_HEAD_DIM];
    const int64_t xi = moqae_kv_outlier_k(c, s, rec, yx);
    memcpy(k + xi * ld, yx, sizeof(float) * (size_t) D);
    for (int64_t j = 0; j < C; j++) {
        moqae_kv_unrotate(k + j * ld, D, moqae_kv_rot_block(D));
    }
}

void moqae_kv_decode_v(enum moqae_kv_codec c, const struct moqae_kv_shape * s, const uint8_t * rec, float * v,
                       int64_t ld) {
    const int64_t C = s->chunk, D = s->head_dim, G = s->v_group;
    if (c == MOQAE_KV_CODEC_F16) {
        for (int64_t j = 0; j < C; j++) {
            for (int64_t d = 0; d < D; d++) {
                v[j * ld + d] = moqae_f16_to_f32(rd16(rec + 2 * (j * D + d)));
            }
        }
        return;
    }
    const struct moqae_kv_geom g = moqae_kv_geom_v(c, s);
    const struct bases         b = read_bases(&g, rec);
    for (int64_t i = 0; i < g.n_groups; i++) {
        float scale, zero;
        group_meta(&g, rec, &b, i, &scale, &zero);
        const int64_t j = i / (D / G), d0 = (i % (D / G)) * G;
        for (int64_t e = 0; e < G; e++) {
            v[j * ld + d0 + e] = elem(&g, rec, i, e, scale, zero);
        }
    }
    for (int64_t j = 0; j < C; j++) {
        moqae_kv_unrotate(v + j * ld, D, moqae_kv_rot_block(G));
    }
}

/* ================================================================================================
 * Reference attention primitives: decode the chunk (moqae_kv_decode_*), accumulate in double
 * ================================================================================================ */

void moqae_kv_rope_fill(int64_t head_dim, int64_t n, int64_t pos0, const float * theta, float * cs) {
    for (int64_t i = 0; i < head_dim / 2; i++) {
        for (int64_t t = 0; t < n; t++) {
            const double a         = (double) (pos0 + t) * (double) theta[i];
            cs[(2 * i) * n + t]     = (float) cos(a);
            cs[(2 * i + 1) * n + t] = (float) sin(a);
        }
    }
}

/* The reference q.K^T: the decoded chunk, rotated (rope) and accumulated in double. */
static void kq_ref_any(enum moqae_kv_codec c, const struct moqae_kv_shape * s, const struct moqae_kv_rope * rope,
                       const uint8_t * rec, int64_t n_q, const float * q, int64_t ld_q, float * scores,
                       int64_t ld_s) {
    const int64_t C = s->chunk, D = s->head_dim, H = D / 2;
    float         kd[MAX_CHUNK * MAX_HEAD_DIM]; /* [C][D] */
    double        qr[MAX_HEAD_DIM];
    moqae_kv_decode_k(c, s, rec, kd, D);
    for (int64_t i = 0; i < n_q; i++) {
        const float * qi = q + i * ld_q;
        for (int64_t d = 0; d < D; d++) {
            qr[d] = qi[d];
        }
        for (int64_t pr = 0; rope && pr < H; pr++) { /* R(-P0) q */
            const int64_t u = rope->pair_stride == 1 ? 2 * pr : pr, w = u + rope->pair_stride;
            const double  c0 = rope->cs_p0[2 * pr], s0 = rope->cs_p0[2 * pr + 1];
            qr[u]            = (double) qi[u] * c0 + (double) qi[w] * s0;
            qr[w]            = (double) qi[w] * c0 - (double) qi[u] * s0;
        }
        for (int64_t j = 0; j < C; j++) {
            const float * k   = kd + j * D;
            double        acc = 0.0;
            if (!rope) {
                for (int64_t d = 0; d < D; d++) {
                    acc += qr[d] * (double) k[d];
                }
            }
            for (int64_t pr = 0; rope && pr < H; pr++) { /* R(t) k */
                const int64_t u = rope->pair_stride == 1 ? 2 * pr : pr, w = u + rope->pair_stride;
                const double  ct = rope->cs_t[(2 * pr) * C + j], st = rope->cs_t[(2 * pr + 1) * C + j];
                acc += qr[u] * ((double) k[u] * ct - (double) k[w] * st) + qr[w] * ((double) k[u] * st + (double) k[w] * ct);
            }
            scores[i * ld_s + j] += (float) acc;
        }
    }
}

static void pv_ref_any(enum moqae_kv_codec c, const struct moqae_kv_shape * s, const uint8_t * rec, int64_t n_q,
                       const float * p, int64_t ld_p, float * out, int64_t ld_o) {
    const int64_t C = s->chunk, D = s->head_dim;
    float         vd[MAX_CHUNK * MAX_HEAD_DIM]; /* [C][D] */
    moqae_kv_decode_v(c, s, rec, vd, D);
    for (int64_t i = 0; i < n_q; i++) {
        for (int64_t d = 0; d < D; d++) {
            double acc = 0.0;
            for (int64_t j = 0; j < C; j++) {
                acc += (double) p[i * ld_p + j] * (double) vd[j * D + d];
            }
            out[i * ld_o + d] += (float) acc;
        }
    }
}

#define REF_PAIR(NAME, CODEC)                                                                                   \
    static void kq_##NAME##_ref(const struct moqae_kv_shape * s, const struct moqae_kv_rope * rope,             \
                                const uint8_t * rec, int64_t n_q, const float * q, int64_t ld_q, float * scores, \
                                int64_t ld_s) {                                                                 \
        kq_ref_any(CODEC, s, rope, rec, n_q, q, ld_q, scores, ld_s);                                            \
    }                                                                                                           \
    static void pv_##NAME##_ref(const struct moqae_kv_shape * s, const uint8_t * rec, int64_t n_q,              \
                                const float * p, int64_t ld_p, float * out, int64_t ld_o) {                     \
        pv_ref_any(CODEC, s, rec, n_q, p, ld_p, out, ld_o);                                                     \
    }
REF_PAIR(f16, MOQAE_KV_CODEC_F16)
REF_PAIR(q8, MOQAE_KV_CODEC_Q8)
REF_PAIR(q4, MOQAE_KV_CODEC_Q4)
REF_PAIR(q2, MOQAE_KV_CODEC_Q2)

static const struct moqae_kv_codec_kernels kernels_ref = {
    .name = "scalar",
    .kq   = {kq_f16_ref, kq_q8_ref, kq_q4_ref, kq_q2_ref},
    .pv   = {pv_f16_ref, pv_q8_ref, pv_q4_ref, pv_q2_ref},
    .err  = moqae_kv_err_ref,
};

const struct moqae_kv_codec_kernels * moqae_kv_codec_kernels_ref(void) {
    return &kernels_ref;
}

static const struct moqae_kv_codec_kernels * pick(void) {
    const struct moqae_kv_codec_kernels * avx512 = moqae_kv_codec_kernels_avx512();
    const struct moqae_kv_codec_kernels * avx2   = moqae_kv_codec_kernels_avx2();
    const char *                          want   = getenv("MOQAE_CPU");
    if (want && strcmp(want, "scalar") == 0) {
        return &kernels_ref;
    }
    if (want && strcmp(want, "avx2") == 0 && avx2) {
        return avx2;
    }
    return avx512 ? avx512 : avx2 ? avx2 : &kernels_ref;
}

const struct moqae_kv_codec_kernels * moqae_kv_codec_kernels(void) {
    /* Every thread computes the same answer, so a race only repeats the work (as cpu/dispatch.c). */
    static const struct moqae_kv_codec_kernels * chosen;
    const struct moqae_kv_codec_kernels *        k = __atomic_load_n(&chosen, __ATOMIC_ACQUIRE);
    if (!k) {
        k = pick();
        __atomic_store_n(&chosen, k, __ATOMIC_RELEASE);
    }
    return k;
}
