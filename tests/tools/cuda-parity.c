/*
 * cuda-parity.c — the CUDA backend against the CPU path (issue 7), for tests/test_cuda.py and the
 * H100 runs (scripts/cuda-check.sh):
 *   cuda-parity MODEL.gguf [--router R.gguf]
 *   cuda-parity --floor MODEL.gguf [--router R.gguf]   (3 and 5 on the CPU alone: the floor, no device needed)
 *   cuda-parity --emulate       (no device needed: the GPU encoder's phases run on the CPU)
 * 1. codec bytes: the GPU encoder against kv-ring.c's path (keys turned back to before RoPE with the
 *    ring's tables, then kv-codec.c) on random chunks (f16-representable values), every codec, D = 64
 *    and 128, keys before and after RoPE: byte-identical records required;
 * 2. attention: both GPU kernels (generic, v3) on hand-made rings of mixed codecs against the scalar
 *    reference primitives (kv-codec.c) with f64 softmax: relative error per output row;
 * 3. logits: for every fixed KV policy (and the router), a prompt of ~160 tokens in micro-batches of
 *    64 (chunks completed mid-batch) then 40 one-token steps (the decode graph, chunks completed while
 *    decoding), CPU (-ngl 0) against GPU (-ngl 99) row by row: normalized RMS error, max abs error,
 *    argmax agreement, gated against the CPU's own noise floor measured in the same run (the CPU path
 *    under its other kernel tables, MOQAE_CPU in a child process of this tool: see "the gate" below);
 * 4. router: the chunk decisions of the GPU ring against the majority of the router's votes;
 * 5. greedy: 64 tokens from 3 prompts with fp16 and int4 KV, token ids compared, GPU vs CPU and the CPU's
 *    other kernel tables vs CPU; at the GPU's divergence, the two paths' top-2 logit gaps (a near-tie flips
 *    on rounding). Reported, not a gate: the CPU's own tables diverge as early.
 * Exit 0 when all pass, 1 on a failure, 77 when there is no CUDA device (pytest skips).
 */
#include "backend-cuda.h"
#include "common.h"
#include "context.h"
#include "cpu/kernels.h"
#include "kv-codec.h"
#include "moqae.h"
#include "router.h"

#include <errno.h>
#include <math.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#define ATTN_MAX   2e-2 /* attention check: max |gpu - ref| / max |ref| of an output row (gross errors) */

static uint64_t rng = 0x9e3779b97f4a7c15ull;
static float    frand(void) {
    rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
    return (float) ((rng >> 11) * (1.0 / 9007199254740992.0));
}

static float f16r(float x) {
    return moqae_f16_to_f32(moqae_f32_to_f16(x));
}

/* ---- the ring's path for one chunk's keys (kv-ring.c unrotate_chunk): R(-P0), then R(-t) -------- */

static void unrotate(float * dst, const float * src, const float * cs, int64_t stride, int64_t D) {
    for (int64_t i = 0; i < D / 2; i++) {
        const float c = cs[2 * i * stride], sn = cs[(2 * i + 1) * stride];
        const float x = src[2 * i], y = src[2 * i + 1];
        dst[2 * i]     = x * c + y * sn;
        dst[2 * i + 1] = y * c - x * sn;
    }
}

static void ring_theta(int64_t D, int64_t n_rot, float base, float * theta) {
    for (int64_t i = 0; i < D / 2; i++) {
        theta[i] = i < n_rot / 2 ? (float) pow((double) base, -2.0 * (double) i / (double) n_rot) : 0.0f;
    }
}

/* The key record kv-ring.c writes for keys k [C][D] (after RoPE) of the chunk at pos0. */
static void ring_encode_k(enum moqae_kv_codec c, const struct moqae_kv_shape * s, const float * k, const float * theta,
                          int64_t pos0, uint8_t * rec) {
    const int64_t C = s->chunk, D = s->head_dim;
    if (!theta || c == MOQAE_KV_CODEC_F16) {
        moqae_kv_encode_k(c, s, k, D, rec);
        return;
    }
    float cs_t[256 * 64], cs_p0[256], tmp[256], pre[64 * 256];
    moqae_kv_rope_fill(D, C, 0, theta, cs_t);
    moqae_kv_rope_fill(D, 1, pos0, theta, cs_p0);
    for (int64_t t = 0; t < C; t++) {
        unrotate(tmp, k + t * D, cs_p0, 1, D);
        unrotate(pre + t * D, tmp, cs_t + t, C, D);
    }
    moqae_kv_encode_k(c, s, pre, D, rec);
}

/* ---- 1. codec bytes ------------------------------------------------------------------------------ */

static int check_codecs(int emulated) {
    int fails = 0, pairs = 0;
    static const int64_t dims[] = { 64, 128, 96, 256 }; /* 96: one value group of 96 (the ring's G = D) */
    for (int di = 0; di < 4; di++) {
        const int64_t         D = dims[di], C = 32;
        struct moqae_kv_shape s = { C, D, D % MOQAE_KV_V_GROUP ? D : MOQAE_KV_V_GROUP };
        float *               k = malloc(sizeof(float) * C * D), *v = malloc(sizeof(float) * C * D);
        uint8_t *             a = malloc(4 * C * D + 64), *b = malloc(4 * C * D + 64);
        uint8_t *             c = malloc(4 * C * D + 64), *d = malloc(4 * C * D + 64);
        float                 theta[256], cs_t[256 * 32], cs_p0[256];
        ring_theta(D, D, 10000.0f, theta);
        moqae_kv_rope_fill(D, C, 0, theta, cs_t);
        for (int trial = 0; trial < 24; trial++) {
            const float spread = trial % 4 == 0 ? 0.01f : trial % 4 == 1 ? 1.0f : trial % 4 == 2 ? 8.0f : 100.0f;
            for (int64_t i = 0; i < C * D; i++) { /* channel offsets as real keys have, f16-representable */
                k[i] = f16r((frand() - 0.5f) * spread + (float) (i % D) * 0.05f);
                v[i] = f16r((frand() - 0.5f) * spread);
            }
            if (trial == 5) { /* a constant chunk: zero steps and scales */
                for (int64_t i = 0; i < C * D; i++) {
                    k[i] = v[i] = 0.25f;
                }
            }
            if (trial == 9 || trial == 10) { /* an outlying token (the attention sink's kind) */
                for (int64_t i = 0; i < D; i++) {
                    k[7 * D + i] = f16r(k[7 * D + i] * 20.0f);
                }
            }
            const int     pre  = trial & 1;
            const int64_t pos0 = 32 * (trial * 37 % 500);
            moqae_kv_rope_fill(D, 1, pos0, theta, cs_p0);
            for (int codec = 0; codec < MOQAE_KV_CODEC_COUNT; codec++) {
                const size_t kb = moqae_kv_k_bytes(codec, &s), vb = moqae_kv_v_bytes(codec, &s);
                ring_encode_k(codec, &s, k, pre ? theta : NULL, pos0, a);
                moqae_kv_encode_v(codec, &s, v, D, b);
                const int st = emulated ? moqae_cuda_codec_encode_emulated(codec, &s, k, v, pre ? cs_t : NULL,
                                                                           pre ? cs_p0 : NULL, c, d)
                                        : moqae_cuda_codec_encode(codec, &s, k, v, pre ? cs_t : NULL, pre ? cs_p0 : NULL,
                                                                  c, d);
                pairs++;
                if (st) {
                    printf("codec %s D %lld: %s\n", moqae_kv_codec_name(codec), (long long) D, moqae_last_error());
                    fails++;
                    continue;
                }
                size_t bad_k = 0, bad_v = 0, first = (size_t) -1;
                for (size_t i = 0; i < kb; i++) {
                    if (a[i] != c[i]) {
                        bad_k++, first = first == (size_t) -1 ? i : first;
                    }
                }
                for (size_t i = 0; i < vb; i++) {
                    bad_v += b[i] != d[i];
                }
                if (bad_k || bad_v) {
                    printf("codec %s D %lld trial %d (keys %s RoPE): %zu of %zu key bytes and %zu of %zu value bytes "
                           "differ (first key byte %zd)\n",
                           moqae_kv_codec_name(codec), (long long) D, trial, pre ? "before" : "after", bad_k, kb, bad_v,
                           vb, (ssize_t) first);
                    fails++;
                }
            }
        }
        free(k), free(v), free(a), free(b), free(c), free(d);
    }
    printf("codec bytes%s: %s (%d record pairs: 4 codecs x D 64, 128, 96, 256 x 24 chunks, keys before/after RoPE)\n",
           emulated ? " (GPU encoder emulated on the CPU)" : "", fails ? "FAIL" : "identical", pairs);
    return fails;
}

/* ---- 1b. the int8 tensor-core products ------------------------------------------------------------
 * Random GGUF rows of each integer type and random activations, shapes with a partial last stage (17, 18
 * quant blocks), partial tiles of rows and tokens, and a 4096-column one: the default kernel (stages
 * copied ahead) must give the same floats as the earlier kernel with 4 and with 1 block per stage, and
 * agree with the CPU's reference product (per-block values from the same 8-bit activations); so must the decode
 * mat-vec on up to 8 of the tokens (its blocks summed in another order: within the tolerance, not bit for bit). */

static int check_imma(void) {
    static const enum moqae_type types[] = { MOQAE_TYPE_Q4_0, MOQAE_TYPE_Q4_1, MOQAE_TYPE_Q8_0 };
    static const int64_t shapes[][3] = { { 100, 544, 77 }, { 64, 576, 64 }, { 130, 4096, 9 }, { 72, 1024, 200 } };
    const struct moqae_cpu_kernels * ref = moqae_cpu_kernels_ref();
    int fails = 0, n_cases = 0;
    double worst = 0.0;
    for (int ti = 0; ti < 3; ti++) {
        const enum moqae_type t = types[ti];
        for (int si = 0; si < 4; si++) {
            const int64_t nr = shapes[si][0], nc = shapes[si][1], nt = shapes[si][2];
            const size_t  rb = moqae_type_row_bytes(t, nc);
            const int     bb = t == MOQAE_TYPE_Q4_0 ? 18 : t == MOQAE_TYPE_Q4_1 ? 20 : 34; /* bytes per block */
            const enum moqae_type vt = ref->type[t].vec_dot_type;
            const size_t  xrb = moqae_type_row_bytes(vt, nc);
            uint8_t *     w = malloc(rb * nr), *xq = malloc(xrb * nt);
            float *       x = malloc(sizeof(float) * nc * nt), *y = malloc(sizeof(float) * 4 * nt * nr);
            for (size_t i = 0; i < rb * nr; i++) {
                w[i] = (uint8_t) (frand() * 256.0f);
            }
            for (int64_t r = 0; r < nr; r++) { /* valid f16 scales (and Q4_1 minimums) */
                for (int64_t b = 0; b < nc / 32; b++) {
                    uint8_t *      blk = w + r * rb + b * bb;
                    const uint16_t d = moqae_f32_to_f16(0.001f + 0.02f * frand()), m = moqae_f32_to_f16(-0.1f * frand());
                    memcpy(blk, &d, 2);
                    if (t == MOQAE_TYPE_Q4_1) {
                        memcpy(blk + 2, &m, 2);
                    }
                }
            }
            for (int64_t i = 0; i < nc * nt; i++) {
                x[i] = (frand() - 0.5f) * 4.0f;
            }
            n_cases++;
            const int st = moqae_cuda_imma_check(t, nr, nc, nt, w, x, y);
            if (st) {
                printf("int8 products %s %lldx%lld, %lld tokens: %s\n", moqae_type_name(t), (long long) nr,
                       (long long) nc, (long long) nt, moqae_last_error());
                fails++;
            } else {
                size_t diff4 = 0, diff1 = 0;
                double err = 0.0, errv = 0.0; /* errv: the decode mat-vec (first min(nt, 8) tokens) */
                for (int64_t i = 0; i < nt * nr; i++) {
                    diff4 += memcmp(&y[i], &y[nt * nr + i], 4) != 0;
                    diff1 += memcmp(&y[i], &y[2 * nt * nr + i], 4) != 0;
                }
                for (int64_t tk = 0; tk < nt; tk++) {
                    ref->type[vt].from_float(x + tk * nc, xq + tk * xrb, nc);
                }
                for (int64_t tk = 0; tk < nt; tk++) {
                    for (int64_t r = 0; r < nr; r++) {
                        float c = 0.0f, mag = 0.0f;
                        ref->type[t].vec_dot(nc, &c, w + r * rb, xq + tk * xrb);
                        for (int64_t b = 0; b < nc / 32; b++) { /* scale of the sum: sum |d_w| * 32 * 2 */
                            uint16_t d;
                            memcpy(&d, w + r * rb + b * bb, 2);
                            mag += fabsf(moqae_f16_to_f32(d)) * 64.0f;
                        }
                        const double e = fabs((double) y[tk * nr + r] - (double) c) / (double) mag;
                        err            = e > err ? e : err;
                        if (tk < 8) {
                            const double ev = fabs((double) y[(3 * nt + tk) * nr + r] - (double) c) / (double) mag;
                            errv            = ev > errv || isnan(ev) ? ev : errv;
                        }
                    }
                }
                worst = err > worst ? err : worst;
                worst = errv > worst ? errv : worst;
                if (diff4 || diff1 || !(err < 1e-5) || !(errv < 1e-5)) {
                    printf("int8 products %s %lldx%lld, %lld tokens: %zu / %zu outputs differ from the 4- / 1-block "
                           "kernel, worst error against the CPU %.2e (decode mat-vec %.2e)\n",
                           moqae_type_name(t), (long long) nr, (long long) nc, (long long) nt, diff4, diff1, err, errv);
                    fails++;
                }
            }
            free(w), free(xq), free(x), free(y);
        }
    }
    printf("int8 products: %s (%d cases: Q4_0, Q4_1, Q8_0; the three kernels bit for bit, they and the decode mat-vec "
           "within %.1e of the CPU's, relative to the scale)\n",
           fails ? "FAIL" : "identical", n_cases, worst);
    return fails;
}

/* ---- 2. attention on hand-made rings --------------------------------------------------------------- */

struct attn_case {
    int64_t D, n_head, n_head_kv, n_chunks, n_stage, n_tok;
    int     pre, n_split, kernel;
    int64_t back; /* the staging rows start this many chunks before the ring's end (a micro-batch) */
};

/* Reference: kv-codec.c's scalar primitives per chunk, the staging rows in double, softmax in double;
 * kv-cache.h's rule: a query at position p reads the ring chunks before its own chunk and the staging
 * rows from its chunk's start to p. */
static void attn_ref(const struct attn_case * tc, const int * codecs, const uint8_t * records, const float * sk,
                     const float * sv, const float * q, const float * theta, float * out) {
    const int64_t C = 32, D = tc->D, nkv = tc->n_head_kv, group = tc->n_head / nkv, nch = tc->n_chunks;
    struct moqae_kv_shape s = { C, D, D % MOQAE_KV_V_GROUP == 0 ? MOQAE_KV_V_GROUP : D };
    const struct moqae_kv_codec_kernels * K = moqae_kv_codec_kernels_ref();
    const int64_t n_all = nch * C + tc->n_stage, s0 = (nch - tc->back) * C; /* s0: staging row 0's position */
    float *       sc = malloc(sizeof(float) * (size_t) n_all), *p = malloc(sizeof(float) * (size_t) n_all);
    float         cs_t[128 * 32], cs_p0[128], acc[128];
    if (theta) {
        moqae_kv_rope_fill(D, C, 0, theta, cs_t);
    }
    for (int64_t t = 0; t < tc->n_tok; t++) {
        const int64_t row = tc->n_stage - tc->n_tok + t; /* the query's own staging row */
        for (int64_t h = 0; h < tc->n_head; h++) {
            const int64_t hk = h / group;
            const float * qh = q + (t * tc->n_head + h) * D;
            memset(sc, 0, sizeof(float) * (size_t) n_all);
            size_t src = 0;
            for (int64_t i = 0; i < nch; i++) {
                const int    c  = codecs[i];
                const size_t kb = moqae_kv_k_bytes(c, &s), vb = moqae_kv_v_bytes(c, &s);
                const uint8_t * rk = records + src + (size_t) hk * (kb + vb);
                if (theta) {
                    moqae_kv_rope_fill(D, 1, i * C, theta, cs_p0);
                }
                const struct moqae_kv_rope rope = { 1, cs_t, cs_p0 };
                K->kq[c](&s, theta && c != 0 ? &rope : NULL, rk, 1, qh, D, sc + i * C, C);
                src += (size_t) nkv * (kb + vb);
            }
            for (int64_t j = 0; j <= row; j++) {
                double dot = 0.0;
                for (int64_t d = 0; d < D; d++) {
                    dot += (double) qh[d] * (double) sk[(hk * tc->n_stage + j) * D + d];
                }
                sc[nch * C + j] = (float) dot;
            }
            const int64_t n = nch * C + row + 1, own = (s0 + row) / C * C;
            double        mx = -INFINITY, sum = 0.0;
            for (int64_t j = 0; j < n; j++) {
                const bool seen = j < nch * C ? j / C * C < own : s0 + (j - nch * C) >= own;
                sc[j]           = seen ? sc[j] * (1.0f / sqrtf((float) D)) : -INFINITY;
                mx              = sc[j] > mx ? sc[j] : mx;
            }
            for (int64_t j = 0; j < n; j++) {
                p[j] = sc[j] == -INFINITY ? 0.0f : (float) exp((double) sc[j] - mx);
                sum += p[j];
            }
            memset(acc, 0, sizeof(acc));
            src = 0;
            for (int64_t i = 0; i < nch; i++) {
                const int    c  = codecs[i];
                const size_t kb = moqae_kv_k_bytes(c, &s), vb = moqae_kv_v_bytes(c, &s);
                K->pv[c](&s, records + src + (size_t) hk * (kb + vb) + kb, 1, p + i * C, C, acc, D);
                src += (size_t) nkv * (kb + vb);
            }
            for (int64_t d = 0; d < D; d++) {
                double o = acc[d];
                for (int64_t j = 0; j <= row; j++) {
                    o += (double) p[nch * C + j] * (double) sv[(hk * tc->n_stage + j) * D + d];
                }
                out[(t * tc->n_head + h) * D + d] = (float) (o / sum);
            }
        }
    }
    free(sc), free(p);
}

static int check_attention_case(const struct attn_case * tc, double * worst) {
    const int64_t C = 32, D = tc->D, nkv = tc->n_head_kv, nch = tc->n_chunks, ns = tc->n_stage;
    struct moqae_kv_shape s = { C, D, D % MOQAE_KV_V_GROUP == 0 ? MOQAE_KV_V_GROUP : D };
    static const int pattern[] = { 0, 2, 3, 1, 2, 2, 3, 0, 2, 1, 3, 2 };
    int *            codecs = malloc(sizeof(int) * (size_t) (nch + 1));
    size_t           bytes  = 0;
    for (int64_t i = 0; i < nch; i++) {
        codecs[i] = pattern[i % 12];
        bytes += (size_t) nkv * (moqae_kv_k_bytes(codecs[i], &s) + moqae_kv_v_bytes(codecs[i], &s));
    }
    uint8_t * rec = malloc(bytes + 1);
    float *   k = malloc(sizeof(float) * C * D), *v = malloc(sizeof(float) * C * D);
    float *   sk = malloc(sizeof(float) * (size_t) (nkv * ns * D)), *sv = malloc(sizeof(float) * (size_t) (nkv * ns * D));
    const size_t qn = (size_t) (tc->n_tok * tc->n_head * D);
    float *   q = malloc(sizeof(float) * qn), *og = malloc(sizeof(float) * qn), *orf = malloc(sizeof(float) * qn);
    float     theta[128];
    ring_theta(D, D, 10000.0f, theta);
    size_t o = 0;
    for (int64_t i = 0; i < nch; i++) {
        for (int64_t h = 0; h < nkv; h++) {
            for (int64_t e = 0; e < C * D; e++) { /* keys with channel offsets; a large first token (sink) */
                const int64_t j = e / D, d = e % D;
                k[e]            = f16r((frand() - 0.5f) * 2.0f + 0.5f * sinf((float) d) + (i == 0 && j == 0 ? 6.0f : 0.0f));
                v[e]            = f16r((frand() - 0.5f) * 2.0f);
            }
            ring_encode_k(codecs[i], &s, k, tc->pre ? theta : NULL, i * C, rec + o);
            o += moqae_kv_k_bytes(codecs[i], &s);
            moqae_kv_encode_v(codecs[i], &s, v, D, rec + o);
            o += moqae_kv_v_bytes(codecs[i], &s);
        }
    }
    for (int64_t e = 0; e < nkv * ns * D; e++) {
        sk[e] = f16r((frand() - 0.5f) * 2.0f);
        sv[e] = f16r((frand() - 0.5f) * 2.0f);
    }
    for (size_t e = 0; e < qn; e++) {
        q[e] = (frand() - 0.5f) * 3.0f;
    }
    const struct moqae_cuda_attn_case gc = { D,  tc->n_head, nkv,   nch, ns, tc->n_tok, codecs, rec, sk, sv, q,
                                             tc->pre ? theta : NULL, tc->n_split, tc->kernel, tc->back };
    int st = moqae_cuda_attn_check(&gc, og);
    double err = 0.0;
    if (!st) {
        attn_ref(tc, codecs, rec, sk, sv, q, tc->pre ? theta : NULL, orf);
        for (int64_t r = 0; r < tc->n_tok * tc->n_head; r++) {
            double mx = 0.0, md = 0.0;
            for (int64_t d = 0; d < D; d++) {
                const double a = orf[r * D + d], b = og[r * D + d];
                mx = fabs(a) > mx ? fabs(a) : mx;
                md = isnan(b) || fabs(a - b) > md ? (isnan(b) ? INFINITY : fabs(a - b)) : md;
            }
            const double rel = md / (mx > 1e-6 ? mx : 1e-6);
            err              = rel > err ? rel : err;
        }
    }
    free(codecs), free(rec), free(k), free(v), free(sk), free(sv), free(q), free(og), free(orf);
    if (st) {
        printf("attention check: %s\n", moqae_last_error());
        return 1;
    }
    *worst = err;
    return err > ATTN_MAX;
}

static int check_attention(void) {
    static const int64_t shapes[][3] = { { 128, 1, 1 }, { 128, 4, 2 }, { 64, 9, 3 }, { 64, 4, 2 } }; /* D, heads, kv */
    static const char *  names[]     = { "", "generic", "v3", "prefill" };
    int fails = 0;
    for (size_t si = 0; si < sizeof(shapes) / sizeof(shapes[0]); si++) {
        for (int kern = 1; kern <= 3; kern++) { /* 1: generic, 2: v3 (decode only), 3: prefill (micro-batches) */
            for (int pre = 0; pre <= 1; pre++) {
                double worst = 0.0;
                int    f     = 0;
                for (int ci = 0; ci < 6; ci++) {
                    /* cases 4, 5: micro-batches over several chunks (the ring holds their completed chunks) */
                    static const int64_t nch[] = { 0, 1, 13, 37, 5, 40 }, nst[] = { 1, 17, 32, 5, 77, 150 };
                    static const int64_t back[] = { 0, 0, 0, 0, 2, 4 }, ntok[] = { 1, 17, 1, 5, 77, 139 };
                    if (kern == 2 && ci >= 4) {
                        continue;
                    }
                    const int64_t n_tok = kern == 2 ? 1 : ntok[ci];
                    for (int split = 1; split <= 3; split += 2) {
                        const struct attn_case tc = { shapes[si][0], shapes[si][1], shapes[si][2], nch[ci], nst[ci],
                                                      n_tok,         pre,           split,         kern,     back[ci] };
                        double                 e  = 0.0;
                        f += check_attention_case(&tc, &e);
                        worst = e > worst ? e : worst;
                    }
                }
                printf("attention D %lld, %lld/%lld heads, %s kernel, keys %s RoPE: worst row max|d|/max|ref| %.2e  %s\n",
                       (long long) shapes[si][0], (long long) shapes[si][1], (long long) shapes[si][2], names[kern],
                       pre ? "before" : "after", worst, f ? "FAIL" : "ok");
                fails += f;
            }
        }
    }
    return fails;
}

/* ---- 3. logits, 4. router, 5. greedy ------------------------------------------------------------------ */

static const char * PROMPT =
    "The history of the city begins in the Roman period, when a small settlement grew up at a crossing of the "
    "river. Over the following centuries the town became a centre of the wool trade, and its merchants built the "
    "great church whose tower still dominates the skyline. In 1643, during the civil war, the town was besieged "
    "for three months; the damage can still be seen in the old walls. The arrival of the railway in 1847 brought "
    "new industries: brewing, engineering and, later, the manufacture of bicycles, which made the town famous "
    "across the country. Today it is known for its university, founded in 1965, and for the annual music festival "
    "held every summer in the market square, which attracts visitors from all over the world.";

static int argmax(const float * x, int64_t n) {
    int b = 0;
    for (int64_t i = 1; i < n; i++) {
        b = x[i] > x[b] ? (int) i : b;
    }
    return b;
}

/* The gap between the largest and second largest logit. */
static float top2_gap(const float * x, int64_t n) {
    const int b = argmax(x, n);
    float     s = -INFINITY;
    for (int64_t i = 0; i < n; i++) {
        s = i != b && x[i] > s ? x[i] : s;
    }
    return x[b] - s;
}

struct cmp {
    double  worst_nrmse, max_abs, sum_nrmse;
    int64_t rows, agree;
};

static void cmp_row(struct cmp * s, const float * a, const float * b, int64_t n) {
    double num = 0, den = 0;
    for (int64_t i = 0; i < n; i++) {
        const double e = (double) a[i] - (double) b[i];
        num += e * e, den += (double) a[i] * (double) a[i];
        s->max_abs = fabs(e) > s->max_abs ? fabs(e) : s->max_abs;
    }
    const double r = sqrt(num / (den > 0 ? den : 1));
    s->worst_nrmse = r > s->worst_nrmse || isnan(r) ? r : s->worst_nrmse;
    s->sum_nrmse += r;
    s->rows++;
    s->agree += argmax(a, n) == argmax(b, n);
}

static double cmp_mean(const struct cmp * s) {
    return s->rows ? s->sum_nrmse / (double) s->rows : 0.0;
}

/* Field by field the larger disagreement of two comparisons of the same rows (w starts zeroed). */
static void cmp_worse(struct cmp * w, const struct cmp * c) {
    const bool first = w->rows == 0;
    w->sum_nrmse     = c->sum_nrmse > w->sum_nrmse || first ? c->sum_nrmse : w->sum_nrmse;
    w->worst_nrmse   = c->worst_nrmse > w->worst_nrmse || first ? c->worst_nrmse : w->worst_nrmse;
    w->max_abs       = c->max_abs > w->max_abs || first ? c->max_abs : w->max_abs;
    w->agree         = c->agree < w->agree || first ? c->agree : w->agree;
    w->rows          = c->rows;
}

/* ---- the gate: GPU vs CPU against the CPU's own noise floor, measured in the same run ---------------
 * The floor is the CPU path (default kernel table, e.g. AVX-512) against the same path under the other
 * kernel tables this CPU has (scalar, AVX2: MOQAE_CPU in a child process of this tool, cpu/dispatch.c
 * reads it once per process), on the same rows with the same teacher-forced tokens; the worse of them.
 * They disagree because every product quantizes its activations to 8 bits: a 1-ulp difference of
 * summation order or of expf moves an activation by a whole step, and the int4/int2 codecs then code
 * slightly different K/V (docs/RESULTS.md, "the CPU against itself"). The GPU is one more such
 * implementation. With independent errors of size s per implementation a pair differs by ~sqrt(2) s, so
 * GPU-vs-CPU <= FLOOR_K x CPU-vs-CPU allows the GPU's own error up to sqrt(2 FLOOR_K^2 - 1) = 1.87 s; 1.5
 * also covers the floor's sampling spread (per-row nrmse has a spread of 0.7-0.8 x its mean: the mean of 40
 * decode rows has a standard error of >= 12%, more as the rows are correlated). Argmax flips come from
 * near-ties, at a rate about proportional to the noise: up to FLOOR_K times the floor's flips, plus
 * ARGMAX_SLACK rows (a Poisson count of mean 1.5, the floor's one flip x 1.5, goes past ceil(1.5) + 3 = 5
 * with probability 0.5%). The old fixed gate (NRMSE_ABS,
 * ARGMAX_ABS) still passes a line, and the ceilings (NRMSE_CEIL, ARGMAX_CEIL) fail it whatever the floor:
 * a broken GPU path (wrong codec, layout, scale) differs by nrmse 0.3 and more. */
#define FLOOR_K      1.5  /* GPU-vs-CPU may differ by this times the CPU-vs-CPU floor (nrmse mean, argmax flips) */
#define ARGMAX_SLACK 3    /* rows of argmax flips allowed beyond FLOOR_K x the floor's                           */
#define NRMSE_ABS    0.05 /* nrmse mean at or below this passes whatever the floor (the fixed gate of before)   */
#define ARGMAX_ABS   0.95 /* argmax agreement at or above this fraction passes whatever the floor              */
#define NRMSE_CEIL   0.15 /* nrmse mean above this fails whatever the floor                                   */
#define ARGMAX_CEIL  0.85 /* argmax agreement below this fraction fails whatever the floor                   */
#define N_DECODE     40   /* one-token steps after the prompt                                                 */

struct gate {
    double  nrmse_max;
    int64_t agree_min;
};

static struct gate gate_of(const struct cmp * floor) {
    const int64_t rows = floor->rows, flips = rows - floor->agree;
    const double  nr   = FLOOR_K * cmp_mean(floor);
    int64_t allow      = (int64_t) ceil(FLOOR_K * (double) flips) + ARGMAX_SLACK;
    const int64_t lo   = rows - (int64_t) ceil(ARGMAX_ABS * (double) rows - 1e-9);  /* the fixed gate's flips  */
    const int64_t hi   = rows - (int64_t) ceil(ARGMAX_CEIL * (double) rows - 1e-9); /* the ceiling's flips     */
    allow              = allow > lo ? allow : lo;
    allow              = allow < hi ? allow : hi;
    const struct gate g = { fmin(NRMSE_CEIL, fmax(NRMSE_ABS, nr)), rows - allow };
    return g;
}

static bool gate_pass(const struct gate * g, const struct cmp * gpu) {
    return gpu->rows > 0 && cmp_mean(gpu) <= g->nrmse_max && gpu->agree >= g->agree_min;
}

/* What the tool runs on: the model, the router, and the kernel tables of the floor. */
struct parity_src {
    const char * model, *router;
    const char * isa[2]; /* MOQAE_CPU values other than this process's table, available on this CPU */
    int          n_isa;
};

static void floor_isas(struct parity_src * src) {
    static const char * all[] = { "scalar", "avx2", "avx512" };
    const char *        want  = getenv("MOQAE_PARITY_FLOOR"); /* e.g. "scalar": fewer tables, faster */
    const char *        self  = moqae_cpu_kernels()->name;
    src->n_isa                = 0;
    for (int i = 0; i < 3; i++) {
        const bool have = i == 0 || (i == 1 ? moqae_cpu_kernels_avx2() != NULL : moqae_cpu_kernels_avx512() != NULL);
        if (have && strcmp(all[i], self) && (!want || strstr(want, all[i])) && src->n_isa < 2) {
            src->isa[src->n_isa++] = all[i];
        }
    }
}

extern char ** environ;

/* This tool again (args[0] is ignored), with MOQAE_CPU=isa; its exit status. posix_spawn, not fork: the
 * parent holds a CUDA context and worker threads. */
static int run_self(const char * isa, char ** args) {
    size_t n = 0, k = 0;
    while (environ[n]) {
        n++;
    }
    char ** env = malloc(sizeof(char *) * (n + 2));
    char    set[64];
    snprintf(set, sizeof(set), "MOQAE_CPU=%s", isa);
    for (size_t i = 0; i < n; i++) {
        if (strncmp(environ[i], "MOQAE_CPU=", 10)) {
            env[k++] = environ[i];
        }
    }
    env[k++] = set, env[k] = NULL;
    fflush(stdout), fflush(stderr);
    pid_t     pid;
    const int st = posix_spawn(&pid, "/proc/self/exe", NULL, NULL, args, env);
    free(env);
    int ws = 0;
    if (st || waitpid(pid, &ws, 0) < 0) {
        printf("floor: cannot run this tool with MOQAE_CPU=%s: %s\n", isa, strerror(st ? st : errno));
        return 1;
    }
    return WIFEXITED(ws) ? WEXITSTATUS(ws) : 1;
}

/* A new empty file under $TMPDIR (or /tmp); its path in p. */
static int tmp_file(char * p, size_t cap) {
    const char * d = getenv("TMPDIR");
    snprintf(p, cap, "%s/cuda-parity-XXXXXX", d && *d ? d : "/tmp");
    const int fd = mkstemp(p);
    if (fd < 0) {
        printf("floor: mkstemp %s: %s\n", p, strerror(errno));
        return 1;
    }
    close(fd);
    return 0;
}

/* The floor of one policy: ref [n + N_DECODE][n_vocab] (the CPU's rows: the prompt, then the steps fed
 * feed [N_DECODE]) against the same rows from each other kernel table (--logits in a child process). */
static int cpu_floor(const struct parity_src * src, const char * kv, const int32_t * feed, const float * ref, int64_t n,
                     int64_t n_vocab, struct cmp * pre, struct cmp * dec) {
    char fpath[4096], lpath[4096];
    if (tmp_file(fpath, sizeof(fpath)) || tmp_file(lpath, sizeof(lpath))) {
        return 1;
    }
    FILE * f  = fopen(fpath, "wb");
    int    bad = !f || fwrite(feed, sizeof(int32_t), N_DECODE, f) != N_DECODE;
    if (f) {
        fclose(f);
    }
    float * row = malloc(sizeof(float) * (size_t) n_vocab);
    for (int i = 0; !bad && i < src->n_isa; i++) {
        char * args[] = { "cuda-parity", "--logits", lpath,    (char *) src->model, "0",   "--kv",
                          (char *) kv,   "--feed",   fpath,    src->router ? "--router" : NULL,
                          (char *) src->router,      NULL };
        struct cmp p = { 0 }, d = { 0 };
        if ((bad = run_self(src->isa[i], args) != 0)) {
            printf("floor: MOQAE_CPU=%s cuda-parity --logits failed (kv %s)\n", src->isa[i], kv);
            break;
        }
        FILE * l = fopen(lpath, "rb");
        for (int64_t r = 0; l && r < n + N_DECODE && fread(row, sizeof(float), (size_t) n_vocab, l) == (size_t) n_vocab;
             r++) {
            cmp_row(r < n ? &p : &d, ref + r * n_vocab, row, n_vocab);
        }
        if (l) {
            fclose(l);
        }
        if ((bad = p.rows != n || d.rows != N_DECODE)) {
            printf("floor: %s gave %lld of %lld rows (kv %s)\n", src->isa[i], (long long) (p.rows + d.rows),
                   (long long) (n + N_DECODE), kv);
            break;
        }
        cmp_worse(pre, &p), cmp_worse(dec, &d);
    }
    free(row);
    remove(fpath), remove(lpath);
    return bad || src->n_isa == 0;
}

static struct moqae_router * g_router;

static int ctx_new(struct moqae_model * m, const char * kv, int64_t n_batch, struct moqae_context ** c) {
    struct moqae_context_params cp = moqae_context_default_params();
    cp.n_ctx = 1024, cp.n_batch = n_batch, cp.n_threads = 8;
    if (!strcmp(kv, "router")) {
        cp.router = g_router;
    } else {
        cp.kv = kv;
    }
    int st = moqae_context_new(m, &cp, c);
    if (st) {
        printf("context (%s): %s\n", kv, moqae_last_error());
    }
    return st;
}

/* "0.04312/0.16700 (152/159)": nrmse mean / worst, argmax agreement. */
static void print_cmp(const char * tag, const struct cmp * s) {
    printf(" %s %.5f/%.5f (%lld/%lld)", tag, cmp_mean(s), s->worst_nrmse, (long long) s->agree, (long long) s->rows);
}

/* One policy's line: GPU vs CPU (when mg), the floor, the gate; 1 when it fails. */
static int logits_line(const char * kv, const struct cmp * pre, const struct cmp * dec, const struct cmp * fpre,
                       const struct cmp * fdec, bool have_floor, bool gpu, const struct moqae_kv_stats * sc,
                       const struct moqae_kv_stats * sg) {
    const struct gate gp = gate_of(fpre), gd = gate_of(fdec);
    const bool        same_chunks = !gpu || !memcmp(sc->n_chunks, sg->n_chunks, sizeof(sc->n_chunks));
    const bool ok = have_floor && (!gpu || (gate_pass(&gp, pre) && gate_pass(&gd, dec) && same_chunks));
    printf("kv %-9s: prefill", kv);
    if (gpu) {
        print_cmp("gpu", pre);
    }
    print_cmp("floor", fpre);
    printf(" gate <= %.4f (>= %lld); decode", gp.nrmse_max, (long long) gp.agree_min);
    if (gpu) {
        print_cmp("gpu", dec);
    }
    print_cmp("floor", fdec);
    printf(" gate <= %.4f (>= %lld);", gd.nrmse_max, (long long) gd.agree_min);
    if (gpu) {
        printf(" gpu max|d| %.4f/%.4f; chunks fp16/int8/int4/int2 cpu %lld/%lld/%lld/%lld gpu %lld/%lld/%lld/%lld",
               pre->max_abs, dec->max_abs, (long long) sc->n_chunks[0], (long long) sc->n_chunks[1],
               (long long) sc->n_chunks[2], (long long) sc->n_chunks[3], (long long) sg->n_chunks[0],
               (long long) sg->n_chunks[1], (long long) sg->n_chunks[2], (long long) sg->n_chunks[3]);
    }
    printf("  %s\n", !have_floor ? "FAIL (no floor)" : gpu ? (ok ? "ok" : "FAIL") : "floor only");
    return !ok;
}

/* Every policy: the CPU's rows (prompt in micro-batches of 64, then N_DECODE steps teacher-forced by the
 * CPU's greedy token), the GPU's (mg; NULL: the floor only, no device needed) and the floor's. */
static int check_logits(const struct parity_src * src, struct moqae_model * mc, struct moqae_model * mg,
                        const int32_t * toks, int64_t n, int64_t n_vocab) {
    static const char * policies[] = { "fp16", "int8", "int4", "int2", "sink+int4", "sink+int2", "router" };
    int                 fails      = 0;
    float *             ref        = malloc(sizeof(float) * (size_t) ((n + N_DECODE) * n_vocab));
    printf("logits floor: cpu %s against %s", moqae_cpu_kernels()->name, src->n_isa ? src->isa[0] : "(none)");
    printf("%s%s (MOQAE_CPU in a child process; gate: nrmse mean <= max(%.2f, min(%.2f, %.1f x floor)), argmax "
           "flips <= max(%.0f%%, min(%.0f%%, %.1f x floor + %d))\n",
           src->n_isa > 1 ? ", " : "", src->n_isa > 1 ? src->isa[1] : "", NRMSE_ABS, NRMSE_CEIL, FLOOR_K,
           100.0 * (1.0 - ARGMAX_ABS), 100.0 * (1.0 - ARGMAX_CEIL), FLOOR_K, ARGMAX_SLACK);
    for (size_t pi = 0; pi < sizeof(policies) / sizeof(policies[0]); pi++) {
        if (!strcmp(policies[pi], "router") && !g_router) {
            continue;
        }
        struct moqae_context *cc = NULL, *cg = NULL;
        if (ctx_new(mc, policies[pi], 64, &cc) || (mg && ctx_new(mg, policies[pi], 64, &cg))) {
            fails++;
            moqae_context_free(cc), moqae_context_free(cg);
            continue;
        }
        struct cmp   pre = { 0 }, dec = { 0 }, fpre = { 0 }, fdec = { 0 };
        int32_t      feed[N_DECODE];
        const float *lc, *lg;
        int          st = moqae_decode(cc, toks, n, n);
        for (int64_t i = 0; !st && i < n; i++) {
            moqae_context_logits(cc, i, &lc);
            memcpy(ref + i * n_vocab, lc, sizeof(float) * (size_t) n_vocab);
        }
        if (!st && cg) {
            st = moqae_decode(cg, toks, n, n);
        }
        for (int64_t i = 0; !st && cg && i < n; i++) {
            moqae_context_logits(cg, i, &lg);
            cmp_row(&pre, ref + i * n_vocab, lg, n_vocab);
        }
        int32_t next = argmax(ref + (n - 1) * n_vocab, n_vocab);
        for (int step = 0; !st && step < N_DECODE; step++) { /* teacher-forced by the CPU's greedy token */
            feed[step] = next;
            if ((st = moqae_decode(cc, &next, 1, 1)) || (cg && (st = moqae_decode(cg, &next, 1, 1)))) {
                break;
            }
            moqae_context_logits(cc, 0, &lc);
            memcpy(ref + (n + step) * n_vocab, lc, sizeof(float) * (size_t) n_vocab);
            if (cg) {
                moqae_context_logits(cg, 0, &lg);
                cmp_row(&dec, lc, lg, n_vocab);
            }
            next = argmax(lc, n_vocab);
        }
        struct moqae_kv_stats sc = { 0 }, sg = { 0 };
        if (!st) {
            moqae_context_kv_stats(cc, &sc);
            if (cg) {
                moqae_context_kv_stats(cg, &sg);
            }
        }
        if (st) {
            printf("kv %-9s: decode failed: %s\n", policies[pi], moqae_last_error());
            fails++;
        } else {
            const bool have_floor = !cpu_floor(src, policies[pi], feed, ref, n, n_vocab, &fpre, &fdec);
            fails += logits_line(policies[pi], &pre, &dec, &fpre, &fdec, have_floor, cg != NULL, &sc, &sg);
        }
        moqae_context_free(cc), moqae_context_free(cg);
    }
    free(ref);
    return fails;
}

/* The GPU ring's chunk decisions against the majority of the router's votes (kv-ring.c decide). */
static int check_router(struct moqae_model * mc, struct moqae_model * mg, const int32_t * toks, int64_t n) {
    struct moqae_context * cg = NULL;
    if (ctx_new(mg, "router", 64, &cg) || moqae_decode(cg, toks, n, 1)) {
        printf("router: %s\n", moqae_last_error());
        moqae_context_free(cg);
        return 1;
    }
    const struct moqae_cpu_kernels * K   = moqae_cpu_kernels();
    const struct moqae_weight *      e   = &mc->tok_embd;
    const int64_t                    E   = mc->hp.n_embd, C = g_router->chunk;
    float *                          x   = malloc(sizeof(float) * (size_t) (E + moqae_router_scratch_floats(g_router)));
    uint8_t                          got[1024];
    int64_t                          n_got = 0, bad = 0;
    moqae_cuda_chunk_codecs(cg->cuda, got, 1024, &n_got);
    for (int64_t i = 0; i < n_got; i++) {
        int64_t count[4] = { 0 };
        for (int64_t t = i * C; t < i * C + C; t++) {
            uint8_t vote;
            K->type[e->type].to_float((const char *) e->data + (size_t) toks[t] * e->row_bytes, x, E);
            moqae_router_vote(g_router, K, x, &vote, x + E);
            count[vote < g_router->n_expert ? vote : 0]++;
        }
        int64_t best = 0;
        for (int64_t k = 1; k < g_router->n_expert; k++) {
            best = count[k] > count[best] ? k : best;
        }
        const int want = g_router->freeze && i == 0 ? MOQAE_KV_CODEC_F16 : (int) g_router->expert[best];
        bad += want != got[i];
    }
    printf("router decisions: %lld chunks, %lld differ from the votes' majority  %s\n", (long long) n_got,
           (long long) bad, bad ? "FAIL" : "ok");
    free(x);
    moqae_context_free(cg);
    return bad != 0;
}

#define N_GEN 64
static const char * GREEDY_PROMPTS[] = { "The capital of France is", "def fibonacci(n):",
                                         "Once upon a time, in a small village by the sea," };
static const char * GREEDY_KV[]      = { "fp16", "int4" };
#define N_GREEDY 6 /* GREEDY_KV x GREEDY_PROMPTS, kv outermost */

static int greedy(struct moqae_model * m, const char * kv, const char * text, int32_t * out, float * gap, int n_gen,
                  int64_t n_vocab) {
    struct moqae_context * c = NULL;
    int32_t                toks[512];
    int64_t                n = 0;
    if (ctx_new(m, kv, 512, &c) || moqae_tokenize(m, text, strlen(text), true, false, toks, 512, &n) ||
        moqae_decode(c, toks, n, 1)) {
        moqae_context_free(c);
        return 1;
    }
    for (int i = 0; i < n_gen; i++) {
        const float * l;
        moqae_context_logits(c, 0, &l);
        out[i] = argmax(l, n_vocab);
        gap[i] = top2_gap(l, n_vocab);
        if (moqae_decode(c, &out[i], 1, 1)) {
            moqae_context_free(c);
            return 1;
        }
    }
    moqae_context_free(c);
    return 0;
}

static int same_prefix(const int32_t * a, const int32_t * b, int n) {
    int same = 0;
    while (same < n && a[same] == b[same]) {
        same++;
    }
    return same;
}

/* Greedy tokens: the CPU (default table) against the GPU (mg; NULL: the floor only) and against the other
 * kernel tables (--greedy in a child process). Reported, not a gate: the CPU's own tables diverge within
 * a few tokens at near-ties (docs/RESULTS.md, "Greedy parity"); returns 1 only when a run fails. */
static int check_greedy(const struct parity_src * src, struct moqae_model * mc, struct moqae_model * mg, int64_t n_vocab) {
    int32_t(*alt)[N_GREEDY][N_GEN] = calloc(2, sizeof(*alt));
    int  fails  = 0;
    bool have[2] = { false, false };
    char path[4096];
    for (int i = 0; i < src->n_isa && !tmp_file(path, sizeof(path)); i++) {
        char * args[] = { "cuda-parity", "--greedy", path, (char *) src->model, NULL };
        FILE * f      = run_self(src->isa[i], args) ? NULL : fopen(path, "rb");
        have[i]       = f && fread(alt[i], sizeof(alt[i]), 1, f) == 1;
        if (f) {
            fclose(f);
        }
        remove(path);
        if (!have[i]) {
            printf("greedy: MOQAE_CPU=%s cuda-parity --greedy failed\n", src->isa[i]);
            fails++;
        }
    }
    for (int g = 0; g < N_GREEDY; g++) {
        const char * kv = GREEDY_KV[g / 3];
        int32_t      a[N_GEN], b[N_GEN];
        float        ga[N_GEN], gb[N_GEN];
        if (greedy(mc, kv, GREEDY_PROMPTS[g % 3], a, ga, N_GEN, n_vocab) ||
            (mg && greedy(mg, kv, GREEDY_PROMPTS[g % 3], b, gb, N_GEN, n_vocab))) {
            printf("greedy: %s\n", moqae_last_error());
            fails++;
            continue;
        }
        printf("greedy kv %s prompt %d:", kv, g % 3);
        const int same = mg ? same_prefix(a, b, N_GEN) : N_GEN;
        if (mg) {
            printf(" gpu %d/%d tokens identical", same, N_GEN);
        }
        for (int i = 0; i < src->n_isa; i++) {
            if (have[i]) {
                printf("%s cpu %s %d/%d", i ? "," : mg ? ";" : "", src->isa[i], same_prefix(a, alt[i][g], N_GEN), N_GEN);
            } else {
                printf("%s cpu %s n/a", i ? "," : mg ? ";" : "", src->isa[i]);
            }
        }
        printf(" (against cpu %s)", moqae_cpu_kernels()->name);
        if (same < N_GEN) {
            float min_gap = INFINITY;
            for (int i = 0; i < same; i++) {
                min_gap = ga[i] < min_gap ? ga[i] : min_gap;
            }
            printf("; at the gpu's first difference: cpu token %d top-2 gap %.4f, gpu token %d top-2 gap %.4f; smallest "
                   "cpu top-2 gap before it %.4f",
                   a[same], ga[same], b[same], gb[same], min_gap);
        }
        printf("  reported\n");
    }
    free(alt);
    return fails;
}

/* --greedy OUT MODEL: the greedy tokens of check_greedy's runs ([N_GREEDY][N_GEN] int32), for a child
 * process under another MOQAE_CPU. */
static int dump_greedy(const char * out, const char * path) {
    struct moqae_model *    m = NULL;
    struct moqae_model_info info;
    int32_t                 toks[N_GREEDY][N_GEN];
    float                   gap[N_GEN];
    if (moqae_model_load(path, NULL, &m)) {
        printf("greedy: %s\n", moqae_last_error());
        return 1;
    }
    moqae_model_get_info(m, &info);
    int bad = 0;
    for (int g = 0; g < N_GREEDY && !bad; g++) {
        bad = greedy(m, GREEDY_KV[g / 3], GREEDY_PROMPTS[g % 3], toks[g], gap, N_GEN, info.n_vocab);
    }
    FILE * f = bad ? NULL : fopen(out, "wb");
    bad      = bad || !f || fwrite(toks, sizeof(toks), 1, f) != 1;
    if (f) {
        fclose(f);
    }
    if (bad) {
        printf("greedy: %s\n", moqae_last_error());
    }
    moqae_model_free(m);
    return bad;
}

/* --logits OUT MODEL NGL [--kv POLICY] [--feed TOKS] [--router R.gguf]: the logits of the prompt
 * (micro-batches of 64) and of N_DECODE one-token steps, as raw floats [n + N_DECODE][n_vocab], with the
 * KV policy POLICY (default: MOQAE_PARITY_KV, else fp16). The steps are fed TOKS (N_DECODE int32: the
 * floor of check_logits, same tokens as the parent's CPU run), else the prompt's first tokens. Runs of the
 * CPU under different MOQAE_CPU tables and of the GPU, compared with --compare, give the CPU's own noise
 * floor (scripts/cuda-check.sh stage floor). */
static int dump_logits(int argc, char ** argv) {
    const char *kv = getenv("MOQAE_PARITY_KV") ? getenv("MOQAE_PARITY_KV") : "fp16", *feed_path = NULL,
               *router_path = NULL;
    for (int i = 5; i + 1 < argc; i += 2) {
        kv          = !strcmp(argv[i], "--kv") ? argv[i + 1] : kv;
        feed_path   = !strcmp(argv[i], "--feed") ? argv[i + 1] : feed_path;
        router_path = !strcmp(argv[i], "--router") ? argv[i + 1] : router_path;
    }
    struct moqae_model *      m  = NULL;
    struct moqae_model_params mp = moqae_model_default_params();
    mp.n_gpu_layers              = atoi(argv[4]);
    struct moqae_context *  c    = NULL;
    int32_t                 toks[1024], feed[N_DECODE];
    int64_t                 n = 0;
    struct moqae_model_info info;
    FILE *                  fd = feed_path ? fopen(feed_path, "rb") : NULL;
    if (feed_path && (!fd || fread(feed, sizeof(int32_t), N_DECODE, fd) != N_DECODE)) {
        printf("logits: cannot read %d tokens from %s\n", N_DECODE, feed_path);
        return 1;
    }
    if (fd) {
        fclose(fd);
    }
    if (moqae_model_load(argv[3], &mp, &m) || (router_path && moqae_router_load(m, router_path, &g_router)) ||
        moqae_tokenize(m, PROMPT, strlen(PROMPT), true, false, toks, 1024, &n) || ctx_new(m, kv, 64, &c) ||
        moqae_decode(c, toks, n, n)) {
        printf("logits: %s\n", moqae_last_error());
        return 1;
    }
    moqae_model_get_info(m, &info);
    FILE * f = fopen(argv[2], "wb");
    int    bad = !f;
    const float * l;
    for (int64_t i = 0; !bad && i < n; i++) {
        moqae_context_logits(c, i, &l);
        bad = fwrite(l, sizeof(float), (size_t) info.n_vocab, f) != (size_t) info.n_vocab;
    }
    for (int step = 0; !bad && step < N_DECODE; step++) {
        if ((bad = moqae_decode(c, feed_path ? &feed[step] : &toks[step + 1], 1, 1) != 0)) {
            break;
        }
        moqae_context_logits(c, 0, &l);
        bad = fwrite(l, sizeof(float), (size_t) info.n_vocab, f) != (size_t) info.n_vocab;
    }
    if (f && fclose(f)) {
        bad = 1;
    }
    if (bad) {
        printf("logits: %s\n", f ? moqae_last_error() : "cannot write the output");
    }
    moqae_context_free(c);
    moqae_router_free(g_router);
    moqae_model_free(m);
    return bad;
}

static int compare_logits(const char * a, const char * b, int64_t n_vocab) {
    FILE *      fa = fopen(a, "rb"), *fb = fopen(b, "rb");
    float *     x = malloc(sizeof(float) * (size_t) n_vocab), *y = malloc(sizeof(float) * (size_t) n_vocab);
    struct cmp  all = { 0 };
    while (fa && fb && fread(x, sizeof(float), (size_t) n_vocab, fa) == (size_t) n_vocab &&
           fread(y, sizeof(float), (size_t) n_vocab, fb) == (size_t) n_vocab) {
        cmp_row(&all, x, y, n_vocab);
    }
    printf("%s vs %s: %lld rows, nrmse mean %.5f worst %.5f, max|d| %.4f, argmax %lld/%lld\n", a, b, (long long) all.rows,
           cmp_mean(&all), all.worst_nrmse, all.max_abs, (long long) all.agree, (long long) all.rows);
    free(x), free(y);
    return all.rows == 0;
}

int main(int argc, char ** argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: cuda-parity MODEL.gguf [--router R.gguf] | --floor MODEL.gguf [--router R.gguf]\n"
                        "       cuda-parity --emulate | --probe\n"
                        "       cuda-parity --logits OUT MODEL NGL [--kv POLICY] [--feed TOKS] [--router R.gguf]\n"
                        "       cuda-parity --compare A B N_VOCAB | --greedy OUT MODEL\n");
        return 2;
    }
    if (!strcmp(argv[1], "--emulate")) {
        return check_codecs(1) ? 1 : 0;
    }
    if (!strcmp(argv[1], "--logits") && argc >= 5) {
        return dump_logits(argc, argv);
    }
    if (!strcmp(argv[1], "--compare") && argc == 5) {
        return compare_logits(argv[2], argv[3], atoll(argv[4]));
    }
    if (!strcmp(argv[1], "--greedy") && argc == 4) {
        return dump_greedy(argv[2], argv[3]);
    }
    const bool floor_only = !strcmp(argv[1], "--floor") && argc >= 3; /* the CPU's floor alone: no device needed */
    if (!floor_only && !moqae_has_cuda()) {
        printf("skip: no CUDA device in this build or machine\n");
        return 77;
    }
    if (!strcmp(argv[1], "--probe")) {
        printf("CUDA device present\n");
        return 0;
    }
    struct parity_src src = { floor_only ? argv[2] : argv[1], NULL, { NULL, NULL }, 0 };
    for (int i = 2; i + 1 < argc; i++) {
        if (!strcmp(argv[i], "--router")) {
            src.router = argv[i + 1];
        }
    }
    floor_isas(&src);
    int fails = floor_only ? 0 : check_codecs(0) + check_imma() + check_attention();
    struct moqae_model *      mc = NULL, *mg = NULL;
    struct moqae_model_params pg = moqae_model_default_params();
    pg.n_gpu_layers              = 99;
    if (moqae_model_load(src.model, NULL, &mc) || (!floor_only && moqae_model_load(src.model, &pg, &mg))) {
        printf("load: %s\n", moqae_last_error());
        return 1;
    }
    if (src.router && moqae_router_load(mc, src.router, &g_router)) {
        printf("router: %s\n", moqae_last_error());
        return 1;
    }
    struct moqae_model_info info;
    moqae_model_get_info(mc, &info);
    int32_t toks[1024];
    int64_t n = 0;
    if (moqae_tokenize(mc, PROMPT, strlen(PROMPT), true, false, toks, 1024, &n)) {
        printf("tokenize: %s\n", moqae_last_error());
        return 1;
    }
    printf("model %s: %lld prompt tokens\n", info.name, (long long) n);
    fails += check_logits(&src, mc, mg, toks, n, info.n_vocab);
    if (g_router && mg) {
        fails += check_router(mc, mg, toks, n);
    }
    fails += check_greedy(&src, mc, mg, info.n_vocab);
    moqae_router_free(g_router);
    moqae_model_free(mc);
    moqae_model_free(mg);
    printf("%s\n", fails ? "FAIL" : "PASS");
    return fails ? 1 : 0;
}
