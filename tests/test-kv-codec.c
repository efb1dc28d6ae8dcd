/*
 * test-kv-codec.c — KV codec tests (CTest): record sizes, shape checks and the rotation; round trips of
 * every codec (in the rotated space: each element within half a quantization step inside its group's
 * decodable range, at the range's end outside it; the keys' outlier token within half its own step)
 * and within named RMSE bounds on Gaussian data; the scalar reference primitives (q.K^T, p.V on a
 * record) against double-precision arithmetic on the decoded chunk; then every SIMD table this CPU can run against the reference on awkward shapes
 * (C = 16, 32, 64; D = 48, 64, 128, and 50 for FP16; several queries; strided rows). Only completed
 * chunks are ever encoded, so partial chunks are not a case. Failures print the case, the first
 * mismatches and the max error; main returns 1. `test-kv-codec --bench` times the primitives instead.
 * Bit-exactness with PyTorch is tests/test_kv_codec.py's job.
 */
#define _POSIX_C_SOURCE 200809L /* clock_gettime */

#include "common.h"
#include "kv-codec.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* ---- tolerances ---------------------------------------------------------------------------------
 * SIMD primitives use f32 FMAs on (q * scale) . code + q . zero; the reference decodes each element and
 * sums in double. Their difference is bounded relative to the "terms" sum: sum |q_d| (|s_d| qmax + |z_d|)
 * (keys) or sum |p_j| (|s_jg| qmax + |z_jg|) (values), whatever the cancellation. */
#define TOL_PRIM_REL   2e-6  /* SIMD vs reference, x terms sum                                         */
#define TOL_REF_REL    1e-12 /* reference vs double on the decoded chunk (both double sums)           */
#define TOL_ROPE_REL   1e-6  /* rotating by P0 and t from f32 tables vs by the angle (P0 + t) theta    */
#define TOL_STEP_ULPS  4e-7  /* round trip: |x - dec| <= scale/2 + this * (|x| + |zero| + scale*qmax) */
/* normalised RMSE (rmse / rms) of a round trip of N(0,1) data; the ideal uniform quantizer of a
 * Gaussian group of 32 (64) has about range/(qmax*sqrt(12)) with range ~4.1 (4.8): 0.0046 (0.0054),
 * 0.079 (0.092), 0.40 (0.46); the u8 scale code rounds the step up by up to 2^(1/16), pairs share one */
static const double MAX_NRMSE[4] = {1e-3, 0.007, 0.115, 0.55}; /* fp16, int8, int4, int2 */

static int g_failures = 0;

/* ---- random numbers (splitmix64, fixed seeds) ---------------------------------------------------- */

static uint64_t g_rng = 0x2545f4914f6cdd1dull;

static uint64_t rnd_u64(void) {
    uint64_t z = (g_rng += 0x9e3779b97f4a7c15ull);
    z          = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z          = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static float rnd_f(void) { /* uniform in [-1, 1) */
    return (float) ((double) (rnd_u64() >> 11) * (1.0 / 4503599627370496.0) - 1.0);
}

static float rnd_gauss(void) {
    double u = ((double) (rnd_u64() >> 11) + 0.5) * (1.0 / 9007199254740992.0);
    double v = ((double) (rnd_u64() >> 11) + 0.5) * (1.0 / 9007199254740992.0);
    return (float) (sqrt(-2.0 * log(u)) * cos(6.283185307179586 * v));
}

static void fail(const char * fmt, ...) __attribute__((format(printf, 1, 2)));
static void fail(const char * fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "FAIL: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    g_failures++;
}

/* A chunk [C][ld] like real K/V: per-channel offsets and scales (some outlier channels), Gaussian
 * noise, one constant channel and one constant token. */
static void make_chunk(float * x, int64_t C, int64_t D, int64_t ld, int gaussian_only) {
    for (int64_t d = 0; d < D; d++) {
        const float off = gaussian_only ? 0.0f : (d % 7 == 0 ? 6.0f * rnd_f() : 0.5f * rnd_f());
        const float mul = gaussian_only ? 1.0f : (d % 11 == 3 ? 8.0f : 1.0f + rnd_f() * 0.5f);
        for (int64_t j = 0; j < C; j++) {
            x[j * ld + d] = off + mul * rnd_gauss();
        }
    }
    if (!gaussian_only) {
        for (int64_t j = 0; j < C; j++) {
            x[j * ld + 1] = 0.75f;
        }
        for (int64_t d = 0; d < D; d++) {
            x[5 * ld + d] = -1.25f;
        }
    }
}

/* ---- sizes and shapes ------------------------------------------------------------------------------ */

static void test_sizes(void) {
    const struct moqae_kv_shape s = {32, 64, MOQAE_KV_V_GROUP};
    /* codes + keys: the outlier's high-bits row + zero codes + scale codes + 3 f16 bases (+ keys: the
     * outlier's f16 zero and scale and its u8 index) */
    const size_t k4 = 64 * 32 / 2 + 64 / 2 + 64 + 64 / MOQAE_KV_K_SCALE_SHARE + 6 + 5;
    const size_t v4 = 32 * 64 / 2 + 32 * (64 / MOQAE_KV_V_GROUP) + 32 + 6; /* values: one scale code per token */
    if (moqae_kv_k_bytes(MOQAE_KV_CODEC_Q4, &s) != k4 || moqae_kv_v_bytes(MOQAE_KV_CODEC_Q4, &s) != v4) {
        fail("int4 record sizes %zu %zu, expected %zu %zu", moqae_kv_k_bytes(MOQAE_KV_CODEC_Q4, &s),
             moqae_kv_v_bytes(MOQAE_KV_CODEC_Q4, &s), k4, v4);
    }
    if (moqae_kv_k_bytes(MOQAE_KV_CODEC_F16, &s) != 4096 || moqae_kv_v_bytes(MOQAE_KV_CODEC_Q2, &s) != 512 + 70 ||
        moqae_kv_k_bytes(MOQAE_KV_CODEC_Q2, &s) != 512 + 16 + 128 + 11) {
        fail("fp16 / int2 record sizes");
    }
    const double e4 = moqae_kv_effective_bits(MOQAE_KV_CODEC_Q4, &s);
    if (e4 > 4.5 || fabs(e4 - (double) (k4 + v4) * 8 / 4096) > 1e-12) {
        fail("int4 effective bits %.4f (target <= 4.5)", e4);
    }
    if (moqae_kv_effective_bits(MOQAE_KV_CODEC_Q2, &s) > 2.6) {
        fail("int2 effective bits %.4f (target <= 2.6)", moqae_kv_effective_bits(MOQAE_KV_CODEC_Q2, &s));
    }
    struct {
        struct moqae_kv_shape s;
        enum moqae_kv_codec   c;
        int                   ok;
    } cases[] = {
        {{32, 64, 32}, MOQAE_KV_CODEC_Q4, 1},   {{64, 128, 64}, MOQAE_KV_CODEC_Q2, 1},
        {{32, 48, 16}, MOQAE_KV_CODEC_Q8, 1},   {{32, 48, 32}, MOQAE_KV_CODEC_Q8, 0},
        {{32, 50, 32}, MOQAE_KV_CODEC_F16, 1},  {{32, 50, 32}, MOQAE_KV_CODEC_Q4, 0},
        {{20, 64, 32}, MOQAE_KV_CODEC_F16, 0},  {{0, 64, 32}, MOQAE_KV_CODEC_Q4, 0},
        {{512, 64, 32}, MOQAE_KV_CODEC_Q4, 0},  {{32, 512, 32}, MOQAE_KV_CODEC_F16, 0},
        {{32, 64, 8}, MOQAE_KV_CODEC_Q4, 0},    {{32, 64, 32}, (enum moqae_kv_codec) 9, 0},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        const int ok = moqae_kv_shape_check(cases[i].c, &cases[i].s) == MOQAE_OK;
        if (ok != cases[i].ok) {
            fail("shape check C=%lld D=%lld G=%lld codec %d: got %d", (long long) cases[i].s.chunk,
                 (long long) cases[i].s.head_dim, (long long) cases[i].s.v_group, (int) cases[i].c, ok);
        }
    }
    /* the rotation: rotate then unrotate is the identity up to rounding, and the block is a power of two */
    float x[64], y[64];
    for (int i = 0; i < 64; i++) {
        x[i] = y[i] = rnd_f();
    }
    moqae_kv_rotate(y, 64, 64);
    moqae_kv_unrotate(y, 64, 64);
    for (int i = 0; i < 64; i++) {
        if (fabs(y[i] - x[i]) > 1e-6) {
            fail("rotate/unrotate: [%d] %g -> %g", i, (double) x[i], (double) y[i]);
        }
    }
    if (moqae_kv_rot_block(48) != 16 || moqae_kv_rot_block(64) != 64 || moqae_kv_rot_block(96) != 32) {
        fail("moqae_kv_rot_block");
    }
}

/* ---- round trips ------------------------------------------------------------------------------------ */

/* rows [C][ld] rotated in place like the encoder does (keys: blocks of rot_block(D); values: of rot_block(G)) */
static void rotate_rows(float * x, int64_t C, int64_t D, int64_t ld, int64_t n) {
    for (int64_t j = 0; j < C; j++) {
        moqae_kv_rotate(x + j * ld, D, n);
    }
}

/* Every rotated element decodes within half its group's step when it lies inside the group's decodable
 * range [zero, zero + qmax * scale] (the search may clip), or to the nearest end of it when outside; the
 * keys' outlier token within half the step of its own 2b-bit codes. */
static void test_roundtrip(enum moqae_kv_codec c, const struct moqae_kv_shape * s, int gaussian) {
    const int64_t C = s->chunk, D = s->head_dim, G = s->v_group, ld = D + 3;
    const double  qmax = (double) ((1 << moqae_kv_codec_bits(c)) - 1);
    float *       x    = malloc(sizeof(float) * (size_t) (C * ld));
    float *       y    = malloc(sizeof(float) * (size_t) (C * ld));
    uint8_t *     rec  = malloc(moqae_kv_v_bytes(c, s) + moqae_kv_k_bytes(c, s));
    float         sc[4096], zr[4096], yx[256];
    for (int kind = 0; kind < 2; kind++) {
        make_chunk(x, C, D, ld, gaussian);
        if (kind == 0) {
            moqae_kv_encode_k(c, s, x, ld, rec);
            moqae_kv_decode_k(c, s, rec, y, ld);
        } else {
            moqae_kv_encode_v(c, s, x, ld, rec);
            moqae_kv_decode_v(c, s, rec, y, ld);
        }
        double se = 0.0, sx = 0.0;
        for (int64_t j = 0; j < C; j++) {
            for (int64_t d = 0; d < D; d++) {
                const double err = (double) y[j * ld + d] - (double) x[j * ld + d];
                se += err * err;
                sx += (double) x[j * ld + d] * (double) x[j * ld + d];
            }
        }
        const double nrmse = sqrt(se / sx);
        if (gaussian && nrmse > MAX_NRMSE[c]) {
            fail("%s %s C=%lld D=%lld: NRMSE %.4f > %.4f", kind ? "V" : "K", moqae_kv_codec_name(c), (long long) C,
                 (long long) D, nrmse, MAX_NRMSE[c]);
        }
        int64_t xi = -1;
        if (c == MOQAE_KV_CODEC_F16) {
            for (int64_t j = 0; j < C; j++) {
                for (int64_t d = 0; d < D; d++) {
                    const double xv = x[j * ld + d], err = fabs((double) y[j * ld + d] - xv);
                    if (err > fabs(xv) / 2048.0 + 1.0 / 33554432.0) { /* half an ulp, or of the subnormal step */
                        fail("fp16 %s: element [%lld][%lld] = %g decodes to %g", kind ? "V" : "K", (long long) j,
                             (long long) d, xv, (double) y[j * ld + d]);
                    }
                }
            }
            continue;
        }
        const int64_t n = kind == 0 ? moqae_kv_rot_block(D) : moqae_kv_rot_block(G);
        rotate_rows(x, C, D, ld, n);
        rotate_rows(y, C, D, ld, n);
        if (kind == 0) {
            moqae_kv_meta_k(c, s, rec, sc, zr);
            xi = moqae_kv_outlier_k(c, s, rec, yx);
        } else {
            moqae_kv_meta_v(c, s, rec, sc, zr);
        }
        int bad = 0;
        for (int64_t j = 0; j < C; j++) {
            double rmax = 0.0; /* the row's magnitude: rotating back and forth rounds relative to it */
            for (int64_t d = 0; d < D; d++) {
                rmax = fabs(x[j * ld + d]) > rmax ? fabs(x[j * ld + d]) : rmax;
            }
            for (int64_t d = 0; d < D; d++) {
                const double xv = x[j * ld + d], yv = y[j * ld + d];
                double       want, half;
                if (j == xi) { /* the outlier: 2b-bit codes over its own row's range */
                    double lo = x[j * ld], hi = lo;
                    for (int64_t e = 1; e < D; e++) {
                        lo = x[j * ld + e] < lo ? x[j * ld + e] : lo;
                        hi = x[j * ld + e] > hi ? x[j * ld + e] : hi;
                    }
                    const double q2 = (double) ((1u << (2 * moqae_kv_codec_bits(c))) - 1u);
                    want = xv;
                    half = (hi - lo) / q2 * (1.0 + 1.0 / 512) * 0.5;
                } else {
                    const int64_t g = kind == 0 ? d : j * (D / G) + d / G;
                    const double  lo = zr[g], hi = zr[g] + sc[g] * qmax;
                    want = xv < lo ? lo : xv > hi ? hi : xv;
                    half = sc[g] * 0.5;
                }
                const double tol = half + TOL_STEP_ULPS * 64.0 * (rmax + fabs(want) + half * qmax);
                if (!(fabs(yv - want) <= tol) && bad++ < 4) {
                    fail("%s %s C=%lld D=%lld G=%lld: rotated element [%lld][%lld] = %g decodes to %g, want %g +- %g",
                         kind ? "V" : "K", moqae_kv_codec_name(c), (long long) C, (long long) D, (long long) G,
                         (long long) j, (long long) d, xv, yv, want, tol);
                }
            }
        }
    }
    free(x);
    free(y);
    free(rec);
}

/* ---- primitives ------------------------------------------------------------------------------------- */

struct prim_case {
    enum moqae_kv_codec   c;
    struct moqae_kv_shape s;
    int64_t               n_q;
    int                   rope; /* 0: keys after RoPE (no rotation); 1: adjacent pairs; 2: NeoX halves */
};

static const char * rope_name(int r) {
    return r == 0 ? "post-rope" : r == 1 ? "rope-pairs" : "rope-neox";
}

/* terms[i][j or d]: the sum of |each product| that the kernel adds up, for the tolerance. */
static void terms_kq(const struct prim_case * pc, const uint8_t * rec, const float * kdec, const float * q,
                     int64_t ldq, double * terms) {
    const int64_t C = pc->s.chunk, D = pc->s.head_dim;
    const double  qmax = (double) ((1 << moqae_kv_codec_bits(pc->c)) - 1);
    float         sc[256], zr[256];
    if (pc->c != MOQAE_KV_CODEC_F16) {
        moqae_kv_meta_k(pc->c, &pc->s, rec, sc, zr);
    }
    for (int64_t i = 0; i < pc->n_q; i++) {
        for (int64_t j = 0; j < C; j++) {
            double t = 0.0;
            for (int64_t d = 0; d < D; d++) {
                const double m = pc->c == MOQAE_KV_CODEC_F16 ? fabs(kdec[j * D + d]) : sc[d] * qmax + fabs(zr[d]);
                /* a rotation mixes each element with its pair's: bound both by the larger sum */
                t += fabs(q[i * ldq + d]) * m * (pc->rope ? 4.0 : 1.0);
            }
            terms[i * C + j] = t;
        }
    }
    if (pc->rope) { /* the pairs' magnitudes mix: use each pair's total for both */
        for (int64_t i = 0; i < pc->n_q; i++) {
            for (int64_t j = 0; j < C; j++) {
                double t = 0.0;
                for (int64_t pr = 0; pr < D / 2; pr++) {
                    const int64_t u = pc->rope == 1 ? 2 * pr : pr, w = pc->rope == 1 ? u + 1 : u + D / 2;
                    const double  mu = pc->c == MOQAE_KV_CODEC_F16 ? fabs(kdec[j * D + u]) : sc[u] * qmax + fabs(zr[u]);
                    const double  mw = pc->c == MOQAE_KV_CODEC_F16 ? fabs(kdec[j * D + w]) : sc[w] * qmax + fabs(zr[w]);
                    t += (fabs(q[i * ldq + u]) + fabs(q[i * ldq + w])) * 2.0 * (mu + mw);
                }
                terms[i * C + j] = t;
            }
        }
    }
}

static void terms_pv(const struct prim_case * pc, const uint8_t * rec, const float * vdec, const float * p,
                     int64_t ldp, double * terms) {
    const int64_t C = pc->s.chunk, D = pc->s.head_dim, G = pc->s.v_group;
    const double  qmax = (double) ((1 << moqae_kv_codec_bits(pc->c)) - 1);
    static float  sc[4096], zr[4096];
    if (pc->c != MOQAE_KV_CODEC_F16) {
        moqae_kv_meta_v(pc->c, &pc->s, rec, sc, zr);
    }
    for (int64_t i = 0; i < pc->n_q; i++) {
        for (int64_t d = 0; d < D; d++) {
            double t = 0.0;
            for (int64_t j = 0; j < C; j++) {
                const int64_t g = j * (D / G) + d / G;
                const double  m = pc->c == MOQAE_KV_CODEC_F16 ? fabs(vdec[j * D + d]) : sc[g] * qmax + fabs(zr[g]);
                t += fabs(p[i * ldp + j]) * m;
            }
            terms[i * D + d] = t;
        }
    }
}

/* Compares got with want (both [n][m] at stride ld) within tol * terms; prints the first mismatches. */
static void compare(const char * what, const struct prim_case * pc, const char * isa, const float * got,
                    const float * want, int64_t n, int64_t m, int64_t ld, const double * terms, double tol) {
    int    bad   = 0;
    double worst = 0.0;
    for (int64_t i = 0; i < n; i++) {
        for (int64_t j = 0; j < m; j++) {
            const double err = fabs((double) got[i * ld + j] - (double) want[i * ld + j]);
            const double lim = tol * terms[i * m + j] + 1e-30;
            worst            = err / lim > worst ? err / lim : worst;
            if (!(err <= lim) && bad++ < 4) {
                fail("%s %s %s [%s] C=%lld D=%lld G=%lld n_q=%lld: [%lld][%lld] got %.9g want %.9g (err %.3g, limit %.3g)",
                     what, moqae_kv_codec_name(pc->c), rope_name(pc->rope), isa, (long long) pc->s.chunk, (long long) pc->s.head_dim,
                     (long long) pc->s.v_group, (long long) pc->n_q, (long long) i, (long long) j,
                     (double) got[i * ld + j], (double) want[i * ld + j], err, lim);
            }
        }
    }
    if (bad) {
        fprintf(stderr, "  %d mismatches, worst %.3g x the limit\n", bad, worst);
    }
}

static void test_primitives(const struct prim_case * pc, const struct moqae_kv_codec_kernels * const * tabs,
                            int n_tabs) {
    const int64_t C = pc->s.chunk, D = pc->s.head_dim, nq = pc->n_q;
    const int64_t ldq = D + 5, lds = C + 7, ldo = D + 2;
    float *       x    = malloc(sizeof(float) * (size_t) (C * D));
    float *       kdec = malloc(sizeof(float) * (size_t) (C * D));
    float *       vdec = malloc(sizeof(float) * (size_t) (C * D));
    uint8_t *     krec = malloc(moqae_kv_k_bytes(pc->c, &pc->s));
    uint8_t *     vrec = malloc(moqae_kv_v_bytes(pc->c, &pc->s));
    float *       q    = malloc(sizeof(float) * (size_t) (nq * ldq));
    float *       p    = malloc(sizeof(float) * (size_t) (nq * lds));
    float *       s0   = malloc(sizeof(float) * (size_t) (nq * lds));
    float *       o0   = malloc(sizeof(float) * (size_t) (nq * ldo));
    float *       s1   = malloc(sizeof(float) * (size_t) (nq * lds));
    float *       o1   = malloc(sizeof(float) * (size_t) (nq * ldo));
    double *      tk   = malloc(sizeof(double) * (size_t) (nq * C));
    double *      tv   = malloc(sizeof(double) * (size_t) (nq * D));
    make_chunk(x, C, D, D, 0);
    moqae_kv_encode_k(pc->c, &pc->s, x, D, krec);
    moqae_kv_decode_k(pc->c, &pc->s, krec, kdec, D);
    make_chunk(x, C, D, D, 0);
    moqae_kv_encode_v(pc->c, &pc->s, x, D, vrec);
    moqae_kv_decode_v(pc->c, &pc->s, vrec, vdec, D);
    for (int64_t i = 0; i < nq * ldq; i++) {
        q[i] = rnd_f();
    }
    for (int64_t i = 0; i < nq * lds; i++) {
        p[i]  = (rnd_f() + 1.0f) / (float) C; /* like softmax weights */
        s0[i] = rnd_f();                      /* the primitives add to what is there */
    }
    for (int64_t i = 0; i < nq * ldo; i++) {
        o0[i] = rnd_f();
    }
    terms_kq(pc, krec, kdec, q, ldq, tk);
    terms_pv(pc, vrec, vdec, p, lds, tv);

    /* the reference against double arithmetic on the decoded chunk */
    const struct moqae_kv_codec_kernels * ref = moqae_kv_codec_kernels_ref();
    float *                               sw  = malloc(sizeof(float) * (size_t) (nq * lds));
    float *                               ow  = malloc(sizeof(float) * (size_t) (nq * ldo));
    memcpy(sw, s0, sizeof(float) * (size_t) (nq * lds));
    memcpy(ow, o0, sizeof(float) * (size_t) (nq * ldo));
    /* rope tables: theta_i = 10000^(-2i/D), the chunk at P0 = 1000 * C */
    float                theta[128], cs_t[256 * 64], cs_p0[256];
    const int64_t        P0 = 1000 * C;
    struct moqae_kv_rope rope = {pc->rope == 1 ? 1 : D / 2, cs_t, cs_p0};
    for (int64_t i = 0; i < D / 2; i++) {
        theta[i] = (float) pow(10000.0, -2.0 * (double) i / (double) D);
    }
    moqae_kv_rope_fill(D, C, 0, theta, cs_t);
    moqae_kv_rope_fill(D, 1, P0, theta, cs_p0);
    const struct moqae_kv_rope * rp = pc->rope ? &rope : NULL;
    float *                      sa = malloc(sizeof(float) * (size_t) (nq * lds));
    memcpy(sa, s0, sizeof(float) * (size_t) (nq * lds));
    for (int64_t i = 0; i < nq; i++) {
        for (int64_t j = 0; j < C; j++) {
            double acc = 0.0, abs_acc = 0.0;
            if (!rp) {
                for (int64_t d = 0; d < D; d++) {
                    acc += (double) q[i * ldq + d] * (double) kdec[j * D + d];
                }
            }
            for (int64_t pr = 0; rp && pr < D / 2; pr++) {
                /* (R(-P0) q) . (R(t) k) from the tables, and q . R(P0 + t) k from the angle itself */
                const int64_t u = rp->pair_stride == 1 ? 2 * pr : pr, w = u + rp->pair_stride;
                const double  qu = q[i * ldq + u], qw = q[i * ldq + w], ku = kdec[j * D + u], kw = kdec[j * D + w];
                const double  c0 = cs_p0[2 * pr], s0 = cs_p0[2 * pr + 1];
                const double  ct = cs_t[2 * pr * C + j], st = cs_t[(2 * pr + 1) * C + j];
                acc += (qu * c0 + qw * s0) * (ku * ct - kw * st) + (qw * c0 - qu * s0) * (ku * st + kw * ct);
                const double a = (double) (P0 + j) * (double) theta[pr];
                abs_acc += qu * (ku * cos(a) - kw * sin(a)) + qw * (ku * sin(a) + kw * cos(a));
            }
            sw[i * lds + j] += (float) acc;
            sa[i * lds + j] += (float) (rp ? abs_acc : acc);
        }
        for (int64_t d = 0; d < D; d++) {
            double acc = 0.0;
            for (int64_t j = 0; j < C; j++) {
                acc += (double) p[i * lds + j] * (double) vdec[j * D + d];
            }
            ow[i * ldo + d] += (float) acc;
        }
    }
    memcpy(s1, s0, sizeof(float) * (size_t) (nq * lds));
    memcpy(o1, o0, sizeof(float) * (size_t) (nq * ldo));
    ref->kq[pc->c](&pc->s, rp, krec, nq, q, ldq, s1, lds);
    ref->pv[pc->c](&pc->s, vrec, nq, p, lds, o1, ldo);
    compare("kq", pc, "ref", s1, sw, nq, C, lds, tk, TOL_REF_REL);
    compare("kq vs absolute rope angle", pc, "ref", s1, sa, nq, C, lds, tk, TOL_ROPE_REL);
    free(sa);
    compare("pv", pc, "ref", o1, ow, nq, D, ldo, tv, TOL_REF_REL);

    for (int t = 0; t < n_tabs; t++) {
        memcpy(sw, s0, sizeof(float) * (size_t) (nq * lds));
        memcpy(ow, o0, sizeof(float) * (size_t) (nq * ldo));
        tabs[t]->kq[pc->c](&pc->s, rp, krec, nq, q, ldq, sw, lds);
        tabs[t]->pv[pc->c](&pc->s, vrec, nq, p, lds, ow, ldo);
        compare("kq", pc, tabs[t]->name, sw, s1, nq, C, lds, tk, TOL_PRIM_REL);
        compare("pv", pc, tabs[t]->name, ow, o1, nq, D, ldo, tv, TOL_PRIM_REL);
        /* nothing outside the C (or D) columns of each row is touched */
        for (int64_t i = 0; i < nq; i++) {
            for (int64_t j = C; j < lds; j++) {
                if (sw[i * lds + j] != s0[i * lds + j]) {
                    fail("kq %s [%s] wrote past column C", moqae_kv_codec_name(pc->c), tabs[t]->name);
                }
            }
            for (int64_t d = D; d < ldo; d++) {
                if (ow[i * ldo + d] != o0[i * ldo + d]) {
                    fail("pv %s [%s] wrote past column D", moqae_kv_codec_name(pc->c), tabs[t]->name);
                }
            }
        }
    }
    free(x), free(kdec), free(vdec), free(krec), free(vrec), free(q), free(p), free(s0), free(o0), free(s1);
    free(o1), free(tk), free(tv), free(sw), free(ow);
}

/* ---- bench ------------------------------------------------------------------------------------------ */

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double) ts.tv_sec + 1e-9 * (double) ts.tv_nsec;
}

static void bench(const struct moqae_kv_codec_kernels * const * tabs, int n_tabs) {
    const struct moqae_kv_shape shapes[] = {{32, 64, MOQAE_KV_V_GROUP}, {32, 128, MOQAE_KV_V_GROUP}};
    const int64_t               nqs[]    = {1, 3, 8};
    static float                x[64 * 256], q[8 * 256], sc[8 * 64], o[8 * 256], theta[128], cs_t[256 * 64], cs0[256];
    static uint8_t              krec[65536], vrec[65536];
    printf("%-7s %-5s %4s %4s %3s %9s %9s %9s  (ns per chunk)\n", "isa", "codec", "C", "D", "n_q", "kq post",
           "kq pre", "pv");
    for (size_t si = 0; si < sizeof(shapes) / sizeof(shapes[0]); si++) {
        const struct moqae_kv_shape * s = &shapes[si];
        for (int64_t i = 0; i < s->head_dim / 2; i++) {
            theta[i] = (float) pow(10000.0, -2.0 * (double) i / (double) s->head_dim);
        }
        moqae_kv_rope_fill(s->head_dim, s->chunk, 0, theta, cs_t);
        moqae_kv_rope_fill(s->head_dim, 1, 4096, theta, cs0);
        const struct moqae_kv_rope rope = {1, cs_t, cs0};
        for (int c = 0; c < MOQAE_KV_CODEC_COUNT; c++) {
            make_chunk(x, s->chunk, s->head_dim, s->head_dim, 0);
            moqae_kv_encode_k((enum moqae_kv_codec) c, s, x, s->head_dim, krec);
            moqae_kv_encode_v((enum moqae_kv_codec) c, s, x, s->head_dim, vrec);
            for (int64_t i = 0; i < 8 * 256; i++) {
                q[i] = rnd_f();
            }
            for (int64_t i = 0; i < 8 * 64; i++) {
                sc[i] = 1.0f / 64;
            }
            for (int t = 0; t < n_tabs; t++) {
                for (size_t ni = 0; ni < sizeof(nqs) / sizeof(nqs[0]); ni++) {
                    const int64_t nq = nqs[ni], reps = tabs[t] == moqae_kv_codec_kernels_ref() ? 200 : 5000;
                    double        tk[2];
                    for (int r = 0; r < 2; r++) {
                        const double t0 = now_s();
                        for (int64_t k = 0; k < reps; k++) {
                            tabs[t]->kq[c](s, r ? &rope : NULL, krec, nq, q, s->head_dim, sc, 64);
                        }
                        tk[r] = (now_s() - t0) / (double) reps;
                    }
                    const double t0 = now_s();
                    for (int64_t k = 0; k < reps; k++) {
                        tabs[t]->pv[c](s, vrec, nq, sc, 64, o, s->head_dim);
                    }
                    const double tv = (now_s() - t0) / (double) reps;
                    printf("%-7s %-5s %4lld %4lld %3lld %9.0f %9.0f %9.0f\n", tabs[t]->name,
                           moqae_kv_codec_name((enum moqae_kv_codec) c), (long long) s->chunk,
                           (long long) s->head_dim, (long long) nq, tk[0] * 1e9, tk[1] * 1e9, tv * 1e9);
                }
            }
        }
    }
    /* the encoder (scalar, the same on every CPU): one chunk of one KV head, real-like data */
    printf("\n%-5s %4s %4s %11s %11s  (ns per chunk)\n", "codec", "C", "D", "encode k", "encode v");
    for (size_t si = 0; si < sizeof(shapes) / sizeof(shapes[0]); si++) {
        const struct moqae_kv_shape * s = &shapes[si];
        for (int c = 0; c < MOQAE_KV_CODEC_COUNT; c++) {
            make_chunk(x, s->chunk, s->head_dim, s->head_dim, 0);
            double te[2];
            for (int kv = 0; kv < 2; kv++) {
                const int64_t reps = 200;
                const double  t0   = now_s();
                for (int64_t k = 0; k < reps; k++) {
                    if (kv) {
                        moqae_kv_encode_v((enum moqae_kv_codec) c, s, x, s->head_dim, vrec);
                    } else {
                        moqae_kv_encode_k((enum moqae_kv_codec) c, s, x, s->head_dim, krec);
                    }
                }
                te[kv] = (now_s() - t0) / (double) reps;
            }
            printf("%-5s %4lld %4lld %11.0f %11.0f\n", moqae_kv_codec_name((enum moqae_kv_codec) c),
                   (long long) s->chunk, (long long) s->head_dim, te[0] * 1e9, te[1] * 1e9);
        }
    }
}

/* The encoder's search error: every SIMD table's err gives the reference's integers (below the limit;
 * at or above it, both say so), on group-like data, clipped ranges, zero or negative scales, 2-bit and
 * 8-bit code ranges, tails of every length and non-finite elements. */
static void test_err(const struct moqae_kv_codec_kernels * const * tabs, int n_tabs) {
    float x[80];
    for (int r = 0; r < 400; r++) {
        const int64_t n = 1 + r % 79;
        for (int64_t i = 0; i < n; i++) {
            x[i] = 2.0f * rnd_gauss() + (r % 5 == 0 ? 40.0f * rnd_f() : 0.0f);
        }
        if (r % 37 == 3) {
            x[r % n] = r % 2 ? NAN : INFINITY;
        }
        const float qmax  = (float) ((1 << (2 << (r % 3))) - 1); /* 3, 15, 255 */
        float       scale = (4.0f + rnd_f()) / qmax;
        scale             = r % 23 == 0 ? 0.0f : r % 29 == 0 ? -scale : r % 7 == 0 ? scale * 0.25f : scale;
        const float  zero = -2.0f + rnd_f();
        const double p2k  = ldexp(1.0, 40 - 2 * (r % 9 - 2));
        const int64_t want = moqae_kv_err_ref(x, n, zero, scale, qmax, p2k, INT64_MAX);
        for (int t = 0; t < n_tabs; t++) {
            const int64_t got = tabs[t]->err(x, n, zero, scale, qmax, p2k, INT64_MAX);
            if (got != want) {
                fail("%s err, case %d (n %lld): %lld, reference %lld", tabs[t]->name, r, (long long) n,
                     (long long) got, (long long) want);
            }
            const int64_t limit = want / 2 + 1, cut = tabs[t]->err(x, n, zero, scale, qmax, p2k, limit);
            if ((want < limit) != (cut < limit) || (cut < limit && cut != want)) {
                fail("%s err with limit %lld, case %d: %lld, reference %lld", tabs[t]->name, (long long) limit, r,
                     (long long) cut, (long long) want);
            }
        }
    }
}

int main(int argc, char ** argv) {
    const struct moqae_kv_codec_kernels * tabs[2];
    int                                   n_tabs = 0;
    if (moqae_kv_codec_kernels_avx2()) {
        tabs[n_tabs++] = moqae_kv_codec_kernels_avx2();
    }
    if (moqae_kv_codec_kernels_avx512()) {
        tabs[n_tabs++] = moqae_kv_codec_kernels_avx512();
    }
    if (argc > 1 && strcmp(argv[1], "--bench") == 0) {
        const struct moqae_kv_codec_kernels * all[3] = {moqae_kv_codec_kernels_ref(), tabs[0], tabs[1]};
        bench(all, 1 + n_tabs);
        return 0;
    }
    printf("test-kv-codec: SIMD tables:");
    for (int t = 0; t < n_tabs; t++) {
        printf(" %s", tabs[t]->name);
    }
    printf("%s\n", n_tabs ? "" : " none on this CPU");

    test_sizes();
    test_err(tabs, n_tabs);
    const struct moqae_kv_shape shapes[] = {{32, 64, 32}, {64, 64, 32}, {32, 128, 32}, {64, 128, 64},
                                            {32, 48, 16}, {16, 64, 64}, {32, 64, 64}};
    for (size_t si = 0; si < sizeof(shapes) / sizeof(shapes[0]); si++) {
        for (int c = 0; c < MOQAE_KV_CODEC_COUNT; c++) {
            test_roundtrip((enum moqae_kv_codec) c, &shapes[si], 0);
            test_roundtrip((enum moqae_kv_codec) c, &shapes[si], 1);
            const int64_t nqs[] = {1, 3, 5, 9};
            for (size_t ni = 0; ni < 4; ni++) {
                for (int r = 0; r < 3; r++) {
                    const struct prim_case pc = {(enum moqae_kv_codec) c, shapes[si], nqs[ni], r};
                    test_primitives(&pc, tabs, n_tabs);
                }
            }
        }
    }
    /* FP16 takes any head_dim: one that ends in a partial 16-block */
    const struct prim_case odd[] = {{MOQAE_KV_CODEC_F16, {32, 50, 32}, 3, 1}, {MOQAE_KV_CODEC_F16, {16, 2, 2}, 5, 2}};
    for (size_t i = 0; i < 2; i++) {
        test_roundtrip(odd[i].c, &odd[i].s, 0);
        test_primitives(&odd[i], tabs, n_tabs);
    }
    if (g_failures) {
        printf("test-kv-codec: %d failures\n", g_failures);
        return 1;
    }
    printf("test-kv-codec: all passed\n");
    return 0;
}
