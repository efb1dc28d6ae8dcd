/*
 * test-kernels.c — CPU kernel tests (CTest). The scalar reference table (cpu/kernels-ref.c) is checked
 * against straightforward double-precision arithmetic on dequantized values, then every SIMD table this
 * CPU can run (avx2, avx512) is checked against the reference on random inputs (fixed seeds) of awkward
 * sizes: conversions and quantization bit for bit, dot products and float ops within the named
 * tolerances below. Failures print the shape, the first mismatches and the max error; main returns 1.
 * `test-kernels --bench` instead times matvec (GB/s of weights) and gemm (GFLOP/s) for docs/KERNELS.md;
 * benchmarks are not tests, so the default run asserts nothing about speed.
 */
#include "common.h"
#include "cpu/kernels.h"
#include "quant.h"

#include <float.h>
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* ---- tolerances ------------------------------------------------------------------------------------
 * A "terms" sum is the sum of the absolute values of everything the kernel adds up; float rounding of
 * a sum is bounded relative to it, whatever the cancellation. */
#define TOL_QDOT_REL    1e-5 /* quantized and f16/bf16/f32 weight dot products, x terms sum           */
#define TOL_FDOT_REL    1e-6 /* dot_f32, dot_f32_f16, x terms sum                                     */
#define TOL_ELEM_REL    1e-6 /* element-wise float ops (axpy, rms_norm, swiglu), x |reference| ...    */
#define TOL_ELEM_ABS    1e-30 /* ... plus this, for results that under/overflow differently near 0   */
#define TOL_F16_S_REL   (1.0 / 2048.0) /* fp16 rounding of Q8_1's s = d*sum(q): half an ulp ...       */
#define TOL_F16_S_ABS   (1.0 / 33554432.0) /* ... or half the subnormal spacing 2^-25                 */
#define TOL_Q8_ROUNDTRIP 0.5625 /* |x - deq(q8(x))| <= this * d: 1/2 for rounding, 127 * 2^-11 for fp16 d */

static int g_failures = 0;

/* ---- random numbers (splitmix64, fixed seeds) --------------------------------------------------- */

static uint64_t g_rng = 0x9e3779b97f4a7c15ull;

static uint64_t rnd_u64(void) {
    uint64_t z = (g_rng += 0x9e3779b97f4a7c15ull);
    z          = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z          = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* uniform in [-1, 1) */
static float rnd_f(void) {
    return (float) ((double) (rnd_u64() >> 11) * (1.0 / 4503599627370496.0) - 1.0);
}

static float bits_f(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static uint32_t f_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

/* ---- type facts (kept here so the test does not depend on gguf.c) --------------------------------- */

static const struct {
    const char * name;
    int64_t      blck;  /* elements per block */
    size_t       bytes; /* bytes per block    */
} k_types[MOQAE_TYPE_COUNT] = {
    [MOQAE_TYPE_F32] = {"f32", 1, 4},       [MOQAE_TYPE_F16] = {"f16", 1, 2},
    [MOQAE_TYPE_BF16] = {"bf16", 1, 2},     [MOQAE_TYPE_Q4_0] = {"q4_0", 32, sizeof(moqae_block_q4_0)},
    [MOQAE_TYPE_Q4_1] = {"q4_1", 32, sizeof(moqae_block_q4_1)},
    [MOQAE_TYPE_Q8_0] = {"q8_0", 32, sizeof(moqae_block_q8_0)},
    [MOQAE_TYPE_Q8_1] = {"q8_1", 32, sizeof(moqae_block_q8_1)},
};

static int64_t blck(enum moqae_type t) {
    return k_types[t].blck;
}
static size_t row_bytes(enum moqae_type t, int64_t n) {
    return (size_t) (n / k_types[t].blck) * k_types[t].bytes;
}
static const char * tname(enum moqae_type t) {
    return k_types[t].name;
}

static const enum moqae_type k_weight_types[] = {MOQAE_TYPE_F32,  MOQAE_TYPE_F16,  MOQAE_TYPE_BF16,
                                                 MOQAE_TYPE_Q4_0, MOQAE_TYPE_Q4_1, MOQAE_TYPE_Q8_0};
#define N_WEIGHT_TYPES ((int) (sizeof(k_weight_types) / sizeof(k_weight_types[0])))

static void * xmalloc(size_t n) {
    void * p = malloc(n ? n : 1);
    if (!p) {
        fprintf(stderr, "out of memory (%zu bytes)\n", n);
        exit(2);
    }
    return p;
}

/* ---- failure reporting: at most a few lines per check ------------------------------------------ */

struct check {
    char   what[160];
    int    n_bad;
    double max_err; /* in units of the tolerance (1 = at the limit) */
};

static void check_begin(struct check * c, const char * fmt, ...) MOQAE_PRINTF(2, 3);
static void check_begin(struct check * c, const char * fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->what, sizeof(c->what), fmt, ap);
    va_end(ap);
    c->n_bad   = 0;
    c->max_err = 0.0;
}

/* got vs want with |got - want| <= tol; idx names the element */
static void check_close(struct check * c, const char * idx, double got, double want, double tol) {
    const double err = fabs(got - want);
    const double rel = tol > 0 ? err / tol : (err > 0 ? INFINITY : 0);
    if (rel > c->max_err || isnan(got) != isnan(want)) {
        c->max_err = isnan(got) != isnan(want) ? INFINITY : rel;
    }
    if (!(err <= tol) && !(isnan(got) && isnan(want))) {
        if (c->n_bad < 5) {
            fprintf(stderr, "  %s: %s got %.9g want %.9g (err %.3g, tol %.3g)\n", c->what, idx, got, want, err, tol);
        }
        c->n_bad++;
    }
}

static void check_bits(struct check * c, const char * idx, uint32_t got, uint32_t want) {
    if (got != want) {
        if (c->n_bad < 5) {
            fprintf(stderr, "  %s: %s got 0x%08x want 0x%08x\n", c->what, idx, got, want);
        }
        c->n_bad++;
        c->max_err = INFINITY;
    }
}

static void check_end(struct check * c) {
    if (c->n_bad) {
        fprintf(stderr, "FAIL %s: %d mismatches, max error %.3g x tolerance\n", c->what, c->n_bad, c->max_err);
        g_failures++;
    }
}

/* ---- test data -------------------------------------------------------------------------------------- */

static moqae_bf16 bf16_trunc(float f) {
    return (moqae_bf16) (f_bits(f) >> 16);
}

/* n_rows rows of n elements of weight type t, row stride `stride` bytes, into buf. Scales have random
 * signs, and Q8_0 quants cover all of -128..127. */
static void gen_weights(enum moqae_type t, int64_t n_rows, int64_t n, size_t stride, uint8_t * buf) {
    for (int64_t r = 0; r < n_rows; r++) {
        uint8_t *   row = buf + (size_t) r * stride;
        const float mag = 0.1f + 3.0f * fabsf(rnd_f());
        for (int64_t i = 0; i < n / blck(t); i++) {
            switch (t) {
                case MOQAE_TYPE_F32: ((float *) row)[i] = mag * rnd_f(); break;
                case MOQAE_TYPE_F16: ((moqae_f16 *) row)[i] = moqae_f32_to_f16(mag * rnd_f()); break;
                case MOQAE_TYPE_BF16: ((moqae_bf16 *) row)[i] = bf16_trunc(mag * rnd_f()); break;
                case MOQAE_TYPE_Q4_0: {
                    moqae_block_q4_0 * b = (moqae_block_q4_0 *) row + i;
                    b->d                 = moqae_f32_to_f16(0.05f * mag * rnd_f());
                    for (int j = 0; j < 16; j++) {
                        b->qs[j] = (uint8_t) rnd_u64();
                    }
                    break;
                }
                case MOQAE_TYPE_Q4_1: {
                    moqae_block_q4_1 * b = (moqae_block_q4_1 *) row + i;
                    b->d                 = moqae_f32_to_f16(0.05f * mag * rnd_f());
                    b->m                 = moqae_f32_to_f16(0.4f * mag * rnd_f());
                    for (int j = 0; j < 16; j++) {
                        b->qs[j] = (uint8_t) rnd_u64();
                    }
                    break;
                }
                case MOQAE_TYPE_Q8_0:
                case MOQAE_TYPE_Q8_1: { /* only Q8_0 is a weight type; Q8_1 raw blocks are for to_float */
                    const size_t bs = t == MOQAE_TYPE_Q8_0 ? sizeof(moqae_block_q8_0) : sizeof(moqae_block_q8_1);
                    uint8_t *    b  = row + (size_t) i * bs;
                    const moqae_f16 d = moqae_f32_to_f16(0.01f * mag * rnd_f());
                    memcpy(b, &d, 2);
                    for (size_t j = 2; j < bs; j++) {
                        b[j] = (uint8_t) rnd_u64();
                    }
                    break;
                }
                default: break;
            }
        }
    }
}

/* n_tok rows of n activations: varied magnitudes per token and per block, with an all-zero block, a
 * block of exact rounding ties (amax 127 makes 1/d exactly 1) and a single-outlier block. */
static void gen_acts(int64_t n_tok, int64_t n, float * x) {
    for (int64_t t = 0; t < n_tok; t++) {
        float * row = x + t * n;
        for (int64_t i = 0; i < n; i++) {
            row[i] = rnd_f() * (0.01f + 4.0f * (float) ((t * 7 + i / 32) % 5));
        }
        if (n >= 32 && t % 3 == 1) {
            memset(row, 0, 32 * sizeof(float));
        }
        if (n >= 64 && t % 3 == 2) {
            for (int j = 0; j < 32; j++) {
                row[32 + j] = (float) (j - 16) + ((j & 1) ? 0.5f : -0.5f);
            }
            row[32] = 127.0f;
        }
        if (n >= 96 && t % 4 == 0) {
            for (int j = 0; j < 32; j++) {
                row[64 + j] = 1e-3f * rnd_f();
            }
            row[64 + 5] = -300.0f;
        }
    }
}

/* Sum of |terms| of the dot product of row w (type t) with x (its vec_dot_type), as the kernels add
 * them: per element for float types; per block |d_w d_x| sum|q_w q_x| (+ |m s| for Q4_1) otherwise. */
static double abs_terms(enum moqae_type t, int64_t n, const void * w, const void * x) {
    double s = 0.0;
    if (blck(t) == 1) {
        float * a = xmalloc((size_t) n * sizeof(float));
        float * b = xmalloc((size_t) n * sizeof(float));
        moqae_cpu_kernels_ref()->type[t].to_float(w, a, n);
        moqae_cpu_kernels_ref()->type[t].to_float(x, b, n);
        for (int64_t i = 0; i < n; i++) {
            s += fabs((double) a[i] * b[i]);
        }
        free(a);
        free(b);
        return s;
    }
    for (int64_t i = 0; i < n / 32; i++) {
        double          sq = 0.0, dd, ms = 0.0;
        int             qw[32];
        const int8_t *  qx;
        if (t == MOQAE_TYPE_Q4_1) {
            const moqae_block_q4_1 * a = (const moqae_block_q4_1 *) w + i;
            const moqae_block_q8_1 * b = (const moqae_block_q8_1 *) x + i;
            for (int j = 0; j < 16; j++) {
                qw[j]      = a->qs[j] & 15;
                qw[j + 16] = a->qs[j] >> 4;
            }
            qx = b->qs;
            dd = (double) moqae_f16_to_f32(a->d) * moqae_f16_to_f32(b->d);
            ms = fabs((double) moqae_f16_to_f32(a->m) * moqae_f16_to_f32(b->s));
        } else {
            const moqae_block_q8_0 * b = (const moqae_block_q8_0 *) x + i;
            uint16_t                 d;
            if (t == MOQAE_TYPE_Q4_0) {
                const moqae_block_q4_0 * a = (const moqae_block_q4_0 *) w + i;
                for (int j = 0; j < 16; j++) {
                    qw[j]      = (a->qs[j] & 15) - 8;
                    qw[j + 16] = (a->qs[j] >> 4) - 8;
                }
                d = a->d;
            } else {
                const moqae_block_q8_0 * a = (const moqae_block_q8_0 *) w + i;
                for (int j = 0; j < 32; j++) {
                    qw[j] = a->qs[j];
                }
                d = a->d;
            }
            qx = b->qs;
            dd = (double) moqae_f16_to_f32(d) * moqae_f16_to_f32(b->d);
        }
        for (int j = 0; j < 32; j++) {
            sq += abs(qw[j] * qx[j]);
        }
        s += fabs(dd) * sq + ms;
    }
    return s;
}

/* The double-precision oracle: dequantize both sides with the reference to_float and dot in double.
 * *deq_terms gets sum |w_i x_i| of the dequantized values; *s_err the bound on Q4_1's s rounding. */
static double oracle_dot(enum moqae_type t, int64_t n, const void * w, const void * x, double * deq_terms,
                         double * s_err) {
    const struct moqae_cpu_kernels * R   = moqae_cpu_kernels_ref();
    const enum moqae_type            vdt = R->type[t].vec_dot_type;
    float *                          a   = xmalloc((size_t) n * sizeof(float));
    float *                          b   = xmalloc((size_t) n * sizeof(float));
    R->type[t].to_float(w, a, n);
    R->type[vdt].to_float(x, b, n);
    double s = 0.0, at = 0.0;
    for (int64_t i = 0; i < n; i++) {
        s += (double) a[i] * b[i];
        at += fabs((double) a[i] * b[i]);
    }
    *deq_terms = at;
    *s_err     = 0.0;
    if (t == MOQAE_TYPE_Q4_1) {
        /* s = fp16(d * sum q) with d unrounded, while the dequantized x use fp16(d): two roundings */
        for (int64_t i = 0; i < n / 32; i++) {
            const moqae_block_q8_1 * b  = (const moqae_block_q8_1 *) x + i;
            const double             m  = moqae_f16_to_f32(((const moqae_block_q4_1 *) w)[i].m);
            int                      sq = 0;
            for (int j = 0; j < 32; j++) {
                sq += b->qs[j];
            }
            const double ds = (double) moqae_f16_to_f32(b->d) * sq;
            *s_err += fabs(m) * ((fabs(moqae_f16_to_f32(b->s)) + fabs(ds)) * TOL_F16_S_REL +
                                 (1 + abs(sq)) * TOL_F16_S_ABS);
        }
    }
    free(a);
    free(b);
    return s;
}

/* ---- the reference against independent arithmetic -------------------------------------------------- */

/* h is the half (f16, or bf16 when bf is set) nearest to x, ties to even; x finite and below the
 * format's overflow threshold. */
static int half_is_nearest(float x, uint16_t h, int bf) {
    const uint16_t inf = bf ? 0x7f80 : 0x7c00;
    const double   e   = fabs((bf ? moqae_bf16_to_f32(h) : moqae_f16_to_f32(h)) - (double) x);
    for (int k = -1; k <= 1; k += 2) {
        const uint16_t o = (uint16_t) (h + k);
        if ((o & inf) == inf || ((h ^ o) & 0x8000)) {
            continue; /* past inf or across zero */
        }
        const double eo = fabs((bf ? moqae_bf16_to_f32(o) : moqae_f16_to_f32(o)) - (double) x);
        if (eo < e || (eo == e && (h & 1))) {
            return 0;
        }
    }
    return 1;
}

/* 64 special floats for conversions: zeros, subnormals, f16 boundaries and ties, inf, NaN payloads */
static void special_floats(float * v) {
    static const uint32_t bits[] = {
        0x00000000, 0x80000000, 0x00000001, 0x807fffff, 0x33000000, 0x33000001, 0x337fffff, 0x33800000,
        0x38800000, 0x387fe000, 0x387ff000, 0x38801000, 0x38803000, 0x477fe000, 0x477fefff, 0x477ff000,
        0x477ff001, 0x47800000, 0x7f7fffff, 0x7f800000, 0xff800000, 0x7fc00000, 0xffc00000, 0x7f800001,
        0x7fbfffff, 0xffa12345, 0x3f800000, 0x3f801000, 0x3f803000, 0x3f801001, 0xbf807000, 0x3f808000,
        0x3f818000, 0x3f7fffff, 0x3f7f8000, 0x3f7f7fff, 0x3f818001, 0x7f7f8000, 0x7f7f7fff, 0x00008000,
        0x00018000, 0x33800001, 0xb3c00000, 0x34000000, 0x37800000, 0x37801000, 0x37803000, 0x387fffff,
    };
    const int nb = (int) (sizeof(bits) / sizeof(bits[0]));
    for (int i = 0; i < 64; i++) {
        v[i] = i < nb ? bits_f(bits[i]) : (float) (i - nb) * 1024.5f;
    }
}

static void test_ref_oracle_conversions(void) {
    const struct moqae_cpu_kernels * R = moqae_cpu_kernels_ref();
    struct check                     c;
    check_begin(&c, "ref f32_to_f16 nearest-even");
    for (int i = 0; i < 200000; i++) {
        const float x = i < 100000 ? bits_f((uint32_t) rnd_u64()) : rnd_f() * 70000.0f * (float) pow(2, -(i % 30));
        if (!isfinite(x) || fabsf(x) >= 65520.0f) {
            continue;
        }
        uint16_t h;
        R->f32_to_f16(1, &x, &h);
        if (!half_is_nearest(x, h, 0)) {
            char idx[96];
            snprintf(idx, sizeof(idx), "x=%a", x);
            check_bits(&c, idx, h, 0xffff);
        }
    }
    check_end(&c);

    check_begin(&c, "ref from_float bf16 nearest-even");
    for (int i = 0; i < 100000; i++) {
        const float x = bits_f((uint32_t) rnd_u64());
        if (!isfinite(x) || fabsf(x) >= 3.38953139e38f) {
            continue;
        }
        uint16_t h;
        R->type[MOQAE_TYPE_BF16].from_float(&x, &h, 1);
        if (!half_is_nearest(x, h, 1)) {
            char idx[96];
            snprintf(idx, sizeof(idx), "x=%a", x);
            check_bits(&c, idx, h, 0xffff);
        }
    }
    check_end(&c);

    /* to_float of every block type against the format as documented in quant.h */
    check_begin(&c, "ref to_float block layout");
    uint8_t blk[4 * 36];
    float   y[128];
    char    idx[96];
    for (int ti = 0; ti < 4; ti++) {
        const enum moqae_type t = (enum moqae_type[]){MOQAE_TYPE_Q4_0, MOQAE_TYPE_Q4_1, MOQAE_TYPE_Q8_0,
                                                      MOQAE_TYPE_Q8_1}[ti];
        gen_weights(t, 1, 128, sizeof(blk), blk);
        R->type[t].to_float(blk, y, 128);
        for (int i = 0; i < 128; i++) {
            const int j = i % 32;
            double    want;
            if (t == MOQAE_TYPE_Q4_0 || t == MOQAE_TYPE_Q4_1) {
                const uint8_t * b  = blk + (size_t) (i / 32) * row_bytes(t, 32);
                const uint8_t * qs = b + (t == MOQAE_TYPE_Q4_0 ? 2 : 4);
                const int       q  = j < 16 ? (qs[j] & 15) : (qs[j - 16] >> 4);
                moqae_f16       d, m;
                memcpy(&d, b, 2);
                memcpy(&m, b + 2, 2);
                want = t == MOQAE_TYPE_Q4_0 ? (double) moqae_f16_to_f32(d) * (q - 8)
                                            : (float) (moqae_f16_to_f32(d) * (float) q) + moqae_f16_to_f32(m);
            } else {
                const uint8_t * b = blk + (size_t) (i / 32) * row_bytes(t, 32);
                moqae_f16       d;
                memcpy(&d, b, 2);
                want = (double) moqae_f16_to_f32(d) * (int8_t) b[(t == MOQAE_TYPE_Q8_0 ? 2 : 4) + j];
            }
            snprintf(idx, sizeof(idx), "%s[%d]", tname(t), i);
            check_close(&c, idx, y[i], (float) want, 0.0);
        }
    }
    check_end(&c);
}

/* from_float Q8_0 / Q8_1 of the reference: round-trip error and s against double arithmetic */
static void test_ref_oracle_q8(int64_t n) {
    const struct moqae_cpu_kernels * R = moqae_cpu_kernels_ref();
    const int64_t                    T = 7;
    float *                          x = xmalloc((size_t) (T * n) * sizeof(float));
    float *                          y = xmalloc((size_t) n * sizeof(float));
    uint8_t *                        q = xmalloc(row_bytes(MOQAE_TYPE_Q8_1, n));
    gen_acts(T, n, x);
    for (int k = 0; k < 2; k++) {
        const enum moqae_type qt = k ? MOQAE_TYPE_Q8_1 : MOQAE_TYPE_Q8_0;
        struct check          c;
        check_begin(&c, "ref from_float %s round trip n=%lld", tname(qt), (long long) n);
        for (int64_t t = 0; t < T; t++) {
            const float * xr = x + t * n;
            R->type[qt].from_float(xr, q, n);
            R->type[qt].to_float(q, y, n);
            for (int64_t b = 0; b < n / 32; b++) {
                double amax = 0.0;
                int    sum  = 0;
                for (int j = 0; j < 32; j++) {
                    amax = fmax(amax, fabs(xr[b * 32 + j]));
                }
                const double d = amax / 127.0;
                char         idx[96];
                for (int j = 0; j < 32; j++) {
                    snprintf(idx, sizeof(idx), "t=%lld i=%lld", (long long) t, (long long) (b * 32 + j));
                    check_close(&c, idx, y[b * 32 + j], xr[b * 32 + j], TOL_Q8_ROUNDTRIP * d + 127 * TOL_F16_S_ABS);
                    sum += ((const moqae_block_q8_1 *) q)[b].qs[j] * (qt == MOQAE_TYPE_Q8_1);
                }
                if (qt == MOQAE_TYPE_Q8_1) {
                    const double s = moqae_f16_to_f32(((const moqae_block_q8_1 *) q)[b].s);
                    snprintf(idx, sizeof(idx), "t=%lld block %lld s", (long long) t, (long long) b);
                    check_close(&c, idx, s, d * sum, fabs(d * sum) * (TOL_F16_S_REL + 1e-6) + TOL_F16_S_ABS);
                }
            }
        }
        check_end(&c);
    }
    free(x);
    free(y);
    free(q);
}

/* ---- SIMD tables against the reference: conversions ----------------------------------------------- */

/* every f16 / bf16 bit pattern to f32; an f16 NaN only needs to stay NaN (F16C quiets signalling NaNs) */
static void test_half_to_float(const struct moqae_cpu_kernels * K) {
    const struct moqae_cpu_kernels * R = moqae_cpu_kernels_ref();
    struct check                     c;
    char                             idx[96];

    uint16_t * h  = xmalloc(65536 * sizeof(uint16_t));
    float *    a  = xmalloc(65536 * sizeof(float));
    float *    b  = xmalloc(65536 * sizeof(float));
    for (int i = 0; i < 65536; i++) {
        h[i] = (uint16_t) i;
    }
    R->type[MOQAE_TYPE_F16].to_float(h, a, 65536);
    K->type[MOQAE_TYPE_F16].to_float(h, b, 65536);
    check_begin(&c, "%s to_float f16 (all 65536)", K->name);
    for (int i = 0; i < 65536; i++) {
        if (!(isnan(a[i]) && isnan(b[i]))) {
            snprintf(idx, sizeof(idx), "h=0x%04x", i);
            check_bits(&c, idx, f_bits(b[i]), f_bits(a[i]));
        }
    }
    check_end(&c);
    R->type[MOQAE_TYPE_BF16].to_float(h, a, 65536);
    K->type[MOQAE_TYPE_BF16].to_float(h, b, 65536);
    check_begin(&c, "%s to_float bf16 (all 65536)", K->name);
    for (int i = 0; i < 65536; i++) {
        snprintf(idx, sizeof(idx), "h=0x%04x", i);
        check_bits(&c, idx, f_bits(b[i]), f_bits(a[i]));
    }
    check_end(&c);
    free(h);
    free(a);
    free(b);
}

/* f32 -> f16 / bf16, bit exact including NaN: specials then random bit patterns, odd lengths */
static void test_float_to_half(const struct moqae_cpu_kernels * K) {
    const struct moqae_cpu_kernels * R = moqae_cpu_kernels_ref();
    struct check                     c;
    char                             idx[96];
    static const int64_t             lens[] = {1, 7, 15, 16, 17, 63, 1000, 4128};
    for (size_t li = 0; li < sizeof(lens) / sizeof(lens[0]); li++) {
        const int64_t n  = lens[li];
        float *       x  = xmalloc((size_t) n * sizeof(float));
        uint16_t *    hr = xmalloc((size_t) n * sizeof(uint16_t));
        uint16_t *    hk = xmalloc((size_t) n * sizeof(uint16_t));
        float         sp[64];
        special_floats(sp);
        for (int64_t i = 0; i < n; i++) {
            x[i] = (i < 64 && n >= 64) ? sp[i] : (i % 2 ? bits_f((uint32_t) rnd_u64()) : rnd_f() * 70000.0f);
        }
        for (int k = 0; k < 3; k++) {
            const char * what = k == 0 ? "f32_to_f16" : k == 1 ? "from_float f16" : "from_float bf16";
            memset(hk, 0xab, (size_t) n * sizeof(uint16_t));
            if (k == 0) {
                R->f32_to_f16(n, x, hr);
                K->f32_to_f16(n, x, hk);
            } else {
                const enum moqae_type t = k == 1 ? MOQAE_TYPE_F16 : MOQAE_TYPE_BF16;
                R->type[t].from_float(x, hr, n);
                K->type[t].from_float(x, hk, n);
            }
            check_begin(&c, "%s %s n=%lld", K->name, what, (long long) n);
            for (int64_t i = 0; i < n; i++) {
                snprintf(idx, sizeof(idx), "[%lld] x=%a", (long long) i, x[i]);
                check_bits(&c, idx, hk[i], hr[i]);
            }
            check_end(&c);
        }
        free(x);
        free(hr);
        free(hk);
    }
}

/* to_float of every weight type and Q8_1, and from_float Q8_0 / Q8_1 (zero, tie and outlier blocks
 * included): bit exact */
static void test_blocks(const struct moqae_cpu_kernels * K) {
    const struct moqae_cpu_kernels * R = moqae_cpu_kernels_ref();
    struct check                     c;
    char                             idx[96];
    static const int64_t             qlens[] = {32, 64, 96, 4128};
    for (int ti = 0; ti < N_WEIGHT_TYPES + 1; ti++) {
        const enum moqae_type t = ti < N_WEIGHT_TYPES ? k_weight_types[ti] : MOQAE_TYPE_Q8_1;
        for (size_t li = 0; li < 4; li++) {
            const int64_t n   = qlens[li] + (blck(t) == 1 ? li : 0); /* odd lengths for float types */
            uint8_t *     w   = xmalloc(row_bytes(t, n));
            float *       yr  = xmalloc((size_t) n * sizeof(float));
            float *       yk  = xmalloc((size_t) n * sizeof(float));
            gen_weights(t, 1, n, row_bytes(t, n), w);
            R->type[t].to_float(w, yr, n);
            K->type[t].to_float(w, yk, n);
            check_begin(&c, "%s to_float %s n=%lld", K->name, tname(t), (long long) n);
            for (int64_t i = 0; i < n; i++) {
                snprintf(idx, sizeof(idx), "[%lld]", (long long) i);
                check_bits(&c, idx, f_bits(yk[i]), f_bits(yr[i]));
            }
            check_end(&c);
            free(w);
            free(yr);
            free(yk);
        }
    }

    for (size_t li = 0; li < 4; li++) {
        const int64_t n = qlens[li], T = 9;
        float *       x = xmalloc((size_t) (T * n) * sizeof(float));
        gen_acts(T, n, x);
        for (int k = 0; k < 2; k++) {
            const enum moqae_type qt = k ? MOQAE_TYPE_Q8_1 : MOQAE_TYPE_Q8_0;
            const size_t          rb = row_bytes(qt, n), bs = row_bytes(qt, 32);
            uint8_t *             qr = xmalloc(rb);
            uint8_t *             qk = xmalloc(rb);
            check_begin(&c, "%s from_float %s n=%lld", K->name, tname(qt), (long long) n);
            for (int64_t t = 0; t < T; t++) {
                R->type[qt].from_float(x + t * n, qr, n);
                K->type[qt].from_float(x + t * n, qk, n);
                for (size_t off = 0; off < rb; off++) {
                    if (qr[off] != qk[off]) {
                        snprintf(idx, sizeof(idx), "t=%lld block %zu byte %zu", (long long) t, off / bs, off % bs);
                        check_bits(&c, idx, qk[off], qr[off]);
                    }
                }
            }
            check_end(&c);
            free(qr);
            free(qk);
        }
        free(x);
    }
}

/* ---- matrix products: reference against the oracle, every table against the reference ------------ */

#define MM_ROWS 17
#define MM_TOKS 33

struct mm_case {
    enum moqae_type wt, vdt;
    int64_t         n;
    size_t          wrb, xrb; /* row strides: sometimes padded by an odd number of bytes */
    uint8_t *       w;        /* [MM_ROWS][wrb], allocated to the last row's end (ASan sees overreads) */
    uint8_t *       x;        /* [MM_TOKS][xrb] */
    float           yref[MM_TOKS][MM_ROWS];
    double          terms[MM_TOKS][MM_ROWS];
};

static void mm_setup(struct mm_case * m, enum moqae_type wt, int64_t n, int pad) {
    const struct moqae_cpu_kernels * R = moqae_cpu_kernels_ref();
    m->wt                              = wt;
    m->vdt                             = R->type[wt].vec_dot_type;
    m->n                               = n;
    /* odd padding, but keeping rows at their natural alignment (2 bytes, 4 for f32) as GGUF does */
    m->wrb                             = row_bytes(wt, n) + (pad ? (wt == MOQAE_TYPE_F32 ? 12 : 6) : 0);
    m->xrb                             = row_bytes(m->vdt, n) + (pad ? (m->vdt == MOQAE_TYPE_F32 ? 20 : 10) : 0);
    m->w                               = xmalloc((MM_ROWS - 1) * m->wrb + row_bytes(wt, n));
    m->x                               = xmalloc((MM_TOKS - 1) * m->xrb + row_bytes(m->vdt, n));
    gen_weights(wt, MM_ROWS, n, m->wrb, m->w);
    float * xf = xmalloc((size_t) (MM_TOKS * n) * sizeof(float));
    gen_acts(MM_TOKS, n, xf);
    for (int t = 0; t < MM_TOKS; t++) {
        R->type[m->vdt].from_float(xf + t * n, m->x + t * m->xrb, n);
    }
    free(xf);
    for (int t = 0; t < MM_TOKS; t++) {
        for (int r = 0; r < MM_ROWS; r++) {
            const void * wr = m->w + r * m->wrb;
            const void * xr = m->x + t * m->xrb;
            R->type[wt].vec_dot(n, &m->yref[t][r], wr, xr);
            m->terms[t][r] = abs_terms(wt, n, wr, xr);
        }
    }
}

static void mm_free(struct mm_case * m) {
    free(m->w);
    free(m->x);
}

static void test_mm_oracle(const struct mm_case * m) {
    struct check c;
    char         idx[96];
    check_begin(&c, "ref vec_dot %s x %s n=%lld vs double", tname(m->wt), tname(m->vdt), (long long) m->n);
    for (int t = 0; t < MM_TOKS; t++) {
        for (int r = 0; r < MM_ROWS; r++) {
            double       deq_terms, s_err;
            const double want = oracle_dot(m->wt, m->n, m->w + r * m->wrb, m->x + t * m->xrb, &deq_terms, &s_err);
            snprintf(idx, sizeof(idx), "row %d tok %d", r, t);
            check_close(&c, idx, m->yref[t][r], want, TOL_QDOT_REL * (m->terms[t][r] + deq_terms) + s_err);
        }
    }
    check_end(&c);
}

static void test_mm_table(const struct moqae_cpu_kernels * K, const struct mm_case * m) {
    static const int64_t rows[] = {1, 3, 5, 17}, toks[] = {1, 2, 5, 7, 33};
    const struct moqae_type_kernels * tk = &K->type[m->wt];
    struct check                      c;
    char                              idx[64];
    if (tk->vec_dot_type != m->vdt) {
        fprintf(stderr, "FAIL %s %s: vec_dot_type %d, reference %d\n", K->name, tname(m->wt), tk->vec_dot_type, m->vdt);
        g_failures++;
        return;
    }
    check_begin(&c, "%s vec_dot %s n=%lld", K->name, tname(m->wt), (long long) m->n);
    for (int t = 0; t < MM_TOKS; t++) {
        for (int r = 0; r < MM_ROWS; r++) {
            float s = NAN;
            tk->vec_dot(m->n, &s, m->w + r * m->wrb, m->x + t * m->xrb);
            snprintf(idx, sizeof(idx), "row %d tok %d", r, t);
            check_close(&c, idx, s, m->yref[t][r], TOL_QDOT_REL * m->terms[t][r]);
        }
    }
    check_end(&c);
    for (size_t ri = 0; ri < sizeof(rows) / sizeof(rows[0]); ri++) {
        for (size_t ti = 0; ti < sizeof(toks) / sizeof(toks[0]); ti++) {
            const int64_t nr = rows[ri], nt = toks[ti], ldy = nr + 2;
            float *       y  = xmalloc((size_t) (nt * ldy) * sizeof(float));
            for (int64_t i = 0; i < nt * ldy; i++) {
                y[i] = -12345.0f; /* sentinel: columns past nr must stay untouched */
            }
            tk->gemm(m->n, nr, nt, m->w, m->wrb, m->x, m->xrb, y, ldy);
            check_begin(&c, "%s gemm %s n=%lld n_rows=%lld n_tok=%lld (strides %zu, %zu)", K->name, tname(m->wt),
                        (long long) m->n, (long long) nr, (long long) nt, m->wrb, m->xrb);
            for (int64_t t = 0; t < nt; t++) {
                for (int64_t r = 0; r < ldy; r++) {
                    snprintf(idx, sizeof(idx), "row %lld tok %lld", (long long) r, (long long) t);
                    if (r < nr) {
                        check_close(&c, idx, y[t * ldy + r], m->yref[t][r], TOL_QDOT_REL * m->terms[t][r]);
                    } else {
                        check_bits(&c, idx, f_bits(y[t * ldy + r]), f_bits(-12345.0f));
                    }
                }
            }
            check_end(&c);
            free(y);
        }
    }
}

/* ---- float ops ----------------------------------------------------------------------------------- */

static void test_float_ops_ref(int64_t n) {
    const struct moqae_cpu_kernels * R  = moqae_cpu_kernels_ref();
    float *                          x  = xmalloc((size_t) n * sizeof(float));
    float *                          y  = xmalloc((size_t) n * sizeof(float));
    float *                          o  = xmalloc((size_t) n * sizeof(float));
    uint16_t *                       h  = xmalloc((size_t) n * sizeof(uint16_t));
    struct check                     c;
    char                             idx[96];
    double                           s = 0, at = 0;
    for (int64_t i = 0; i < n; i++) {
        x[i] = rnd_f() * 3.0f;
        y[i] = rnd_f();
        h[i] = moqae_f32_to_f16(rnd_f() * 2.0f);
        s += (double) x[i] * y[i];
        at += fabs((double) x[i] * y[i]);
    }
    check_begin(&c, "ref dot_f32 n=%lld vs double", (long long) n);
    check_close(&c, "sum", R->dot_f32(n, x, y), s, TOL_FDOT_REL * at);
    check_end(&c);
    s = at = 0;
    for (int64_t i = 0; i < n; i++) {
        s += (double) x[i] * moqae_f16_to_f32(h[i]);
        at += fabs((double) x[i] * moqae_f16_to_f32(h[i]));
    }
    check_begin(&c, "ref dot_f32_f16 n=%lld vs double", (long long) n);
    check_close(&c, "sum", R->dot_f32_f16(n, x, h), s, TOL_FDOT_REL * at);
    check_end(&c);

    check_begin(&c, "ref axpy_f16 n=%lld vs double", (long long) n);
    memcpy(o, y, (size_t) n * sizeof(float));
    R->axpy_f16(n, 0.37f, h, o);
    for (int64_t i = 0; i < n; i++) {
        const double ax = 0.37 * moqae_f16_to_f32(h[i]);
        snprintf(idx, sizeof(idx), "[%lld]", (long long) i);
        check_close(&c, idx, o[i], y[i] + ax, TOL_ELEM_REL * (fabs(y[i]) + fabs(ax)) + TOL_ELEM_ABS);
    }
    check_end(&c);

    check_begin(&c, "ref rms_norm n=%lld vs double", (long long) n);
    R->rms_norm(n, x, y, 1e-5f, o);
    double ss = 0;
    for (int64_t i = 0; i < n; i++) {
        ss += (double) x[i] * x[i];
    }
    for (int64_t i = 0; i < n; i++) {
        const double want = x[i] * (double) y[i] / sqrt(ss / n + 1e-5);
        snprintf(idx, sizeof(idx), "[%lld]", (long long) i);
        check_close(&c, idx, o[i], want, TOL_ELEM_REL * fabs(want) + TOL_ELEM_ABS);
    }
    check_end(&c);

    check_begin(&c, "ref swiglu n=%lld vs double", (long long) n);
    for (int64_t i = 0; i < n; i++) {
        o[i] = x[i] * 7.0f;
    }
    R->swiglu(n, o, y);
    for (int64_t i = 0; i < n; i++) {
        const double g = x[i] * 7.0f, want = g / (1.0 + exp(-g)) * y[i];
        snprintf(idx, sizeof(idx), "[%lld]", (long long) i);
        check_close(&c, idx, o[i], want, TOL_ELEM_REL * fabs(want) + TOL_ELEM_ABS);
    }
    check_end(&c);
    free(x);
    free(y);
    free(o);
    free(h);
}

static void test_float_ops(const struct moqae_cpu_kernels * K, int64_t n) {
    const struct moqae_cpu_kernels * R  = moqae_cpu_kernels_ref();
    float *                          x  = xmalloc((size_t) n * sizeof(float));
    float *                          y  = xmalloc((size_t) n * sizeof(float));
    float *                          yr = xmalloc((size_t) n * sizeof(float));
    float *                          yk = xmalloc((size_t) n * sizeof(float));
    uint16_t *                       h  = xmalloc((size_t) n * sizeof(uint16_t));
    struct check                     c;
    char                             idx[96];
    double                           at = 0, ah = 0;
    for (int64_t i = 0; i < n; i++) {
        x[i] = rnd_f() * (i % 3 ? 1.0f : 100.0f);
        y[i] = rnd_f();
        h[i] = moqae_f32_to_f16(rnd_f() * 4.0f);
        at += fabs((double) x[i] * y[i]);
        ah += fabs((double) x[i] * moqae_f16_to_f32(h[i]));
    }
#define CLOSE_ALL(op, tol_expr)                                                   \
    check_begin(&c, "%s %s n=%lld", K->name, op, (long long) n);                    \
    for (int64_t i = 0; i < n; i++) {                                               \
        snprintf(idx, sizeof(idx), "[%lld]", (long long) i);                        \
        check_close(&c, idx, yk[i], yr[i], (tol_expr));                             \
    }                                                                               \
    check_end(&c)
#define BITS_ALL(op)                                                              \
    check_begin(&c, "%s %s n=%lld", K->name, op, (long long) n);                    \
    for (int64_t i = 0; i < n; i++) {                                               \
        snprintf(idx, sizeof(idx), "[%lld]", (long long) i);                        \
        check_bits(&c, idx, f_bits(yk[i]), f_bits(yr[i]));                          \
    }                                                                               \
    check_end(&c)

    check_begin(&c, "%s dot_f32 n=%lld", K->name, (long long) n);
    check_close(&c, "sum", K->dot_f32(n, x, y), R->dot_f32(n, x, y), TOL_FDOT_REL * at);
    check_end(&c);
    check_begin(&c, "%s dot_f32_f16 n=%lld", K->name, (long long) n);
    check_close(&c, "sum", K->dot_f32_f16(n, x, h), R->dot_f32_f16(n, x, h), TOL_FDOT_REL * ah);
    check_end(&c);

    memcpy(yr, y, (size_t) n * sizeof(float));
    memcpy(yk, y, (size_t) n * sizeof(float));
    R->axpy_f16(n, -1.75f, h, yr);
    K->axpy_f16(n, -1.75f, h, yk);
    CLOSE_ALL("axpy_f16", TOL_ELEM_REL * (fabs(y[i]) + fabs(1.75 * moqae_f16_to_f32(h[i]))) + TOL_ELEM_ABS);

    R->rms_norm(n, x, y, 1e-6f, yr);
    K->rms_norm(n, x, y, 1e-6f, yk);
    CLOSE_ALL("rms_norm", TOL_ELEM_REL * fabs(yr[i]) + TOL_ELEM_ABS);

    /* swiglu over [-20, 20] plus the edges of expf's range */
    static const float edge[] = {0.0f, -0.0f, 88.7f, -88.7f, 88.73f, -88.73f, 100.0f, -100.0f, 103.0f, -104.0f,
                                 1e-20f, -1e-20f, 87.0f, -87.0f, 1e30f, -1e30f};
    for (int64_t i = 0; i < n; i++) {
        yr[i] = yk[i] = (i < 16 && n >= 64) ? edge[i] : 20.0f * rnd_f();
    }
    R->swiglu(n, yr, y);
    K->swiglu(n, yk, y);
    CLOSE_ALL("swiglu", TOL_ELEM_REL * fabs(yr[i]) + TOL_ELEM_ABS);

    memcpy(yr, x, (size_t) n * sizeof(float));
    memcpy(yk, x, (size_t) n * sizeof(float));
    R->scale(n, 0.3f, yr);
    K->scale(n, 0.3f, yk);
    BITS_ALL("scale");
    R->add(n, y, yr);
    K->add(n, y, yk);
    BITS_ALL("add");

    /* softmax of attention scores (scaled by 1/8): exp within ~1 ulp, the sum in f32 lanes against
     * double, so a relative error that grows with n / lanes */
    for (int64_t i = 0; i < n; i++) {
        yr[i] = yk[i] = 30.0f * rnd_f() + (i % 97 == 5 ? 200.0f : 0.0f);
    }
    R->softmax(n, 0.125f, yr);
    K->softmax(n, 0.125f, yk);
    CLOSE_ALL("softmax", (double) (n / 8 + 16) * FLT_EPSILON * fabs(yr[i]) + TOL_ELEM_ABS);
    double tot = 0.0;
    for (int64_t i = 0; i < n; i++) {
        tot += yk[i];
    }
    check_begin(&c, "%s softmax n=%lld sums to 1", K->name, (long long) n);
    check_close(&c, "sum", tot, 1.0, (double) (n / 8 + 16) * FLT_EPSILON);
    check_end(&c);
#undef CLOSE_ALL
#undef BITS_ALL
    free(x);
    free(y);
    free(yr);
    free(yk);
    free(h);
}

/* ---- the tests ------------------------------------------------------------------------------------ */

static const int64_t k_float_lens[] = {1, 7, 15, 16, 17, 63, 1000};
#define N_FLOAT_LENS ((int) (sizeof(k_float_lens) / sizeof(k_float_lens[0])))

static int run_tests(void) {
    const struct moqae_cpu_kernels * R      = moqae_cpu_kernels_ref();
    const struct moqae_cpu_kernels * simd[] = {moqae_cpu_kernels_avx2(), moqae_cpu_kernels_avx512()};
    const char *                     names[] = {"avx2", "avx512"};
    for (int k = 0; k < 2; k++) {
        printf("table %-6s %s\n", names[k], simd[k] ? "available: tested" : "not available on this build/CPU");
    }
    printf("moqae_cpu_kernels() picks \"%s\" (MOQAE_CPU=%s)\n", moqae_cpu_kernels()->name,
           getenv("MOQAE_CPU") ? getenv("MOQAE_CPU") : "unset");
    if (!getenv("MOQAE_CPU")) {
        const struct moqae_cpu_kernels * best = simd[1] ? simd[1] : simd[0] ? simd[0] : R;
        if (moqae_cpu_kernels() != best) {
            fprintf(stderr, "FAIL dispatch picked %s, best is %s\n", moqae_cpu_kernels()->name, best->name);
            g_failures++;
        }
    }

    test_ref_oracle_conversions();
    test_ref_oracle_q8(32);
    test_ref_oracle_q8(4128);
    for (int i = 0; i < N_FLOAT_LENS; i++) {
        test_float_ops_ref(k_float_lens[i]);
    }
    for (int k = 0; k < 2; k++) {
        if (simd[k]) {
            test_half_to_float(simd[k]);
            test_float_to_half(simd[k]);
            test_blocks(simd[k]);
            for (int i = 0; i < N_FLOAT_LENS; i++) {
                test_float_ops(simd[k], k_float_lens[i]);
            }
            test_float_ops(simd[k], 4128);
        }
    }

    static const int64_t qlens[] = {32, 64, 96, 4128}, flens[] = {1, 7, 16, 17, 63, 96, 1000, 4128};
    for (int ti = 0; ti < N_WEIGHT_TYPES; ti++) {
        const enum moqae_type wt   = k_weight_types[ti];
        const int             fl   = blck(wt) == 1;
        const int             nlen = fl ? 8 : 4;
        for (int li = 0; li < nlen; li++) {
            struct mm_case * m = xmalloc(sizeof(*m));
            mm_setup(m, wt, fl ? flens[li] : qlens[li], li % 2);
            test_mm_oracle(m);
            test_mm_table(R, m); /* the reference gemm loops vec_dot: checks strides and ldy */
            for (int k = 0; k < 2; k++) {
                if (simd[k]) {
                    test_mm_table(simd[k], m);
                }
            }
            mm_free(m);
            free(m);
        }
    }
    if (g_failures) {
        fprintf(stderr, "test-kernels: %d checks FAILED\n", g_failures);
        return 1;
    }
    printf("test-kernels: all checks passed\n");
    return 0;
}

/* ---- --bench: not a test ------------------------------------------------------------------------- */

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double) ts.tv_sec + 1e-9 * (double) ts.tv_nsec;
}

static double cpu_now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (double) ts.tv_sec + 1e-9 * (double) ts.tv_nsec;
}

struct bench_job {
    double          cpu_s; /* out: this thread's CPU time */
    moqae_gemm_fn   gemm;
    int64_t         n, r0, r1, n_tok, n_mats, reps, ldy;
    uint8_t * const * w;
    size_t          wrb, xrb;
    const uint8_t * x;
    float *         y;
};


static void * bench_thread(void * arg) {
    struct bench_job * j  = arg;
    const double       t0 = cpu_now_s();
    for (int64_t rep = 0; rep < j->reps; rep++) {
        for (int64_t c = 0; c < j->n_mats; c++) {
            j->gemm(j->n, j->r1 - j->r0, j->n_tok, j->w[c] + j->r0 * j->wrb, j->wrb, j->x, j->xrb, j->y + j->r0,
                    j->ldy);
        }
    }
    j->cpu_s = cpu_now_s() - t0;
    return NULL;
}

/* Seconds per pass over n_mats matrices [n_rows][n] (best of 3 timings of `reps` passes), rows split
 * over n_th threads: wall time, and in *cpu the slowest thread's CPU time (the machine may be shared:
 * CPU time leaves out the time other processes ran on our core). */
static double bench_run(double * cpu, const struct moqae_cpu_kernels * K, enum moqae_type t, int64_t n_rows, int64_t n,
                        int64_t n_tok, int64_t n_mats, int n_th, int64_t reps) {
    const enum moqae_type vdt = K->type[t].vec_dot_type;
    const size_t          wrb = row_bytes(t, n), xrb = row_bytes(vdt, n);
    uint8_t **            w   = xmalloc((size_t) n_mats * sizeof(*w));
    for (int64_t c = 0; c < n_mats; c++) {
        w[c] = xmalloc(wrb * (size_t) n_rows);
        gen_weights(t, n_rows, n, wrb, w[c]);
    }
    float *   xf = xmalloc((size_t) (n * n_tok) * sizeof(float));
    uint8_t * x  = xmalloc(xrb * (size_t) n_tok);
    gen_acts(n_tok, n, xf);
    for (int64_t i = 0; i < n_tok; i++) {
        K->type[vdt].from_float(xf + i * n, x + i * xrb, n);
    }
    float * y = xmalloc((size_t) (n_rows * n_tok) * sizeof(float));
    double  best = INFINITY;
    *cpu         = INFINITY;
    for (int trial = 0; trial < 4; trial++) { /* trial 0 warms up */
        struct bench_job jobs[2];
        pthread_t        th[2];
        const double     t0 = now_s();
        for (int i = 0; i < n_th; i++) {
            const int64_t per = (n_rows / n_th + 15) / 16 * 16;
            jobs[i] = (struct bench_job){0, K->type[t].gemm, n, i * per, i == n_th - 1 ? n_rows : (i + 1) * per, n_tok,
                                         n_mats, trial ? reps : 1, n_rows, w, wrb, xrb, x, y};
            pthread_create(&th[i], NULL, bench_thread, &jobs[i]);
        }
        for (int i = 0; i < n_th; i++) {
            pthread_join(th[i], NULL);
        }
        const double dt = (now_s() - t0) / (double) (trial ? reps : 1);
        double       dc = 0;
        for (int i = 0; i < n_th; i++) {
            dc = fmax(dc, jobs[i].cpu_s / (double) (trial ? reps : 1));
        }
        if (trial) {
            best = fmin(best, dt);
            *cpu = fmin(*cpu, dc);
        }
    }
    for (int64_t c = 0; c < n_mats; c++) {
        free(w[c]);
    }
    free(w);
    free(xf);
    free(x);
    free(y);
    return best;
}

/* Read bandwidth (the table's dot_f32 over two arrays) and memcpy bandwidth (bytes read + written),
 * from DRAM and from L3, wall time (thread CPU time). */
static void bench_memory(const struct moqae_cpu_kernels * K) {
    for (int k = 0; k < 2; k++) {
        const size_t bytes = k ? (size_t) 8 << 20 : (size_t) 256 << 20;
        float *      a     = xmalloc(bytes / 2);
        float *      b     = xmalloc(bytes / 2);
        memset(a, 1, bytes / 2);
        memset(b, 1, bytes / 2);
        const int      reps = k ? 200 : 5;
        double         best[4] = {INFINITY, INFINITY, INFINITY, INFINITY}; /* read wall, cpu; copy wall, cpu */
        volatile float sink    = 0;
        for (int trial = 0; trial < 3; trial++) {
            for (int op = 0; op < 2; op++) {
                const double t0 = now_s(), c0 = cpu_now_s();
                for (int r = 0; r < reps; r++) {
                    if (op == 0) {
                        sink += K->dot_f32((int64_t) (bytes / 8), a, b);
                    } else {
                        memcpy(b, a, bytes / 2);
                    }
                }
                best[2 * op]     = fmin(best[2 * op], (now_s() - t0) / reps);
                best[2 * op + 1] = fmin(best[2 * op + 1], (cpu_now_s() - c0) / reps);
            }
        }
        printf("memory %s (%zu MiB): read (%s dot_f32) %.1f (%.1f) GB/s, memcpy %.1f (%.1f) GB/s\n",
               k ? "L3-resident" : "DRAM", bytes >> 20, K->name, bytes / best[0] * 1e-9, bytes / best[1] * 1e-9,
               bytes / best[2] * 1e-9, bytes / best[3] * 1e-9);
        free(a);
        free(b);
    }
}

static int run_bench(void) {
    const struct moqae_cpu_kernels * K = moqae_cpu_kernels();
    printf("bench: table %s (set MOQAE_CPU to pick another)\n", K->name);
    bench_memory(K);
    static const struct {
        int64_t rows, n;
    } mv[] = {{1536, 576}, {576, 1536}, {4096, 4096}};
    static const enum moqae_type types[] = {MOQAE_TYPE_Q4_1, MOQAE_TYPE_Q4_0, MOQAE_TYPE_Q8_0, MOQAE_TYPE_F16,
                                            MOQAE_TYPE_BF16, MOQAE_TYPE_F32};
    printf("\nmatvec (n_tok = 1), GB/s of weights read: wall time (thread CPU time); hot = one matrix reused\n"
           "(cache-resident), cold = cycling through matrices totalling >= 96 MiB\n");
    for (size_t ti = 0; ti < sizeof(types) / sizeof(types[0]); ti++) {
        for (size_t s = 0; s < sizeof(mv) / sizeof(mv[0]); s++) {
            const enum moqae_type t = types[ti];
            if (t != MOQAE_TYPE_Q4_1 && mv[s].n != 4096) {
                continue;
            }
            const double  mb     = (double) row_bytes(t, mv[s].n) * (double) mv[s].rows;
            const int64_t n_cold = (int64_t) ceil(96.0 * 1048576.0 / mb);
            printf("  %-5s %5lld x %-5lld (%6.2f MiB):", tname(t), (long long) mv[s].rows, (long long) mv[s].n,
                   mb / 1048576.0);
            for (int th = 1; th <= 2; th++) {
                double       hc, cc;
                const double hot  = bench_run(&hc, K, t, mv[s].rows, mv[s].n, 1, 1, th, (int64_t) (2e8 / mb) + 1);
                const double cold = bench_run(&cc, K, t, mv[s].rows, mv[s].n, 1, n_cold, th, 2);
                printf("  %dT hot %5.1f (%5.1f) cold %5.1f (%5.1f)", th, mb / hot * 1e-9, mb / hc * 1e-9,
                       mb * n_cold / cold * 1e-9, mb * n_cold / cc * 1e-9);
            }
            printf("\n");
        }
    }
    printf("\ngemm (prefill), GFLOP/s = 2 * rows * n * n_tok / s: wall time (thread CPU time)\n");
    static const struct {
        int64_t rows, n, tok;
    } gm[] = {{1536, 576, 64}, {576, 1536, 64}, {4096, 4096, 64}};
    for (size_t ti = 0; ti < sizeof(types) / sizeof(types[0]); ti++) {
        for (size_t s = 0; s < sizeof(gm) / sizeof(gm[0]); s++) {
            const enum moqae_type t = types[ti];
            const double          fl = 2.0 * gm[s].rows * gm[s].n * gm[s].tok;
            printf("  %-5s %5lld x %-5lld x %3lld tok:", tname(t), (long long) gm[s].rows, (long long) gm[s].n,
                   (long long) gm[s].tok);
            for (int th = 1; th <= 2; th++) {
                double       dc;
                const double dt = bench_run(&dc, K, t, gm[s].rows, gm[s].n, gm[s].tok, 1, th, (int64_t) (2e9 / fl) + 1);
                printf("  %dT %6.1f (%6.1f)", th, fl / dt * 1e-9, fl / dc * 1e-9);
            }
            printf("\n");
        }
    }
    return 0;
}

int main(int argc, char ** argv) {
    if (argc > 1 && strcmp(argv[1], "--bench") == 0) {
        return run_bench();
    }
    return run_tests();
}
