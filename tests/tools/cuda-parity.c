/*
 * cuda-parity.c — the CUDA backend against the CPU path (issue 7), for tests/test_cuda.py and the
 * H100 runs (scripts/cuda-check.sh):
 *   cuda-parity MODEL.gguf [--quick]
 * 1. codec bytes: the GPU encoder against kv-codec.c on random chunks (f16-representable values),
 *    every codec, D = 64 and 128: byte-identical records required;
 * 2. logits: for every fixed KV policy, a prompt of ~300 tokens in micro-batches of 64 (chunks
 *    completed mid-batch) then 40 one-token steps (the decode graph, chunks completed while
 *    decoding), CPU (-ngl 0) against GPU (-ngl 99) row by row: normalized RMS error, max abs error,
 *    argmax agreement;
 * 3. greedy: 64 tokens from 3 prompts with fp16 and int4 KV, token ids compared.
 * Exit 0 when all pass, 1 on a failure, 77 when there is no CUDA device (pytest skips).
 */
#include "backend-cuda.h"
#include "common.h"
#include "kv-codec.h"
#include "moqae.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NRMSE_MAX  0.03 /* |gpu - cpu| / |cpu| over a logits row (the CPU quantizes activations to 8 bits) */
#define ARGMAX_MIN 0.95 /* fraction of rows whose argmax agrees                                        */

static uint64_t rng = 0x9e3779b97f4a7c15ull;
static float    frand(void) {
    rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
    return (float) ((rng >> 11) * (1.0 / 9007199254740992.0));
}

static int check_codecs(void) {
    int fails = 0;
    for (int di = 0; di < 2; di++) {
        const int64_t         D = di ? 128 : 64, C = 32;
        struct moqae_kv_shape s = { C, D, MOQAE_KV_V_GROUP };
        float *               k = malloc(sizeof(float) * C * D), *v = malloc(sizeof(float) * C * D);
        uint8_t *             a = malloc(4 * C * D + 64), *b = malloc(4 * C * D + 64);
        uint8_t *             c = malloc(4 * C * D + 64), *d = malloc(4 * C * D + 64);
        for (int trial = 0; trial < 20; trial++) {
            const float spread = trial % 4 == 0 ? 0.01f : trial % 4 == 1 ? 1.0f : trial % 4 == 2 ? 8.0f : 100.0f;
            for (int64_t i = 0; i < C * D; i++) { /* channel offsets as real keys have, f16-representable */
                k[i] = moqae_f16_to_f32(moqae_f32_to_f16((frand() - 0.5f) * spread + (float) (i % D) * 0.05f));
                v[i] = moqae_f16_to_f32(moqae_f32_to_f16((frand() - 0.5f) * spread));
            }
            if (trial == 5) { /* a constant chunk: zero steps and scales */
                for (int64_t i = 0; i < C * D; i++) {
                    k[i] = v[i] = 0.25f;
                }
            }
            for (int codec = 0; codec < MOQAE_KV_CODEC_COUNT; codec++) {
                const size_t kb = moqae_kv_k_bytes(codec, &s), vb = moqae_kv_v_bytes(codec, &s);
                moqae_kv_encode_k(codec, &s, k, D, a);
                moqae_kv_encode_v(codec, &s, v, D, b);
                if (moqae_cuda_codec_encode(codec, &s, k, v, c, d)) {
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
                    printf("codec %s D %lld trial %d: %zu key bytes and %zu value bytes differ (first key byte %zd)\n",
                           moqae_kv_codec_name(codec), (long long) D, trial, bad_k, bad_v, (ssize_t) first);
                    if (fails == 0) { /* the first failure in detail */
                        for (size_t i = 0; i < 24 && i < kb; i++) {
                            printf("  k[%zu] cpu %02x gpu %02x   v cpu %02x gpu %02x\n", i, a[i], c[i], b[i], d[i]);
                        }
                    }
                    fails++;
                }
            }
        }
        free(k), free(v), free(a), free(b), free(c), free(d);
    }
    printf("codec bytes: %s\n", fails ? "FAIL" : "identical (4 codecs x D 64, 128 x 20 chunks)");
    return fails;
}

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

struct cmp {
    double  worst_nrmse, max_abs;
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
    s->rows++;
    s->agree += argmax(a, n) == argmax(b, n);
}

static int ctx_new(struct moqae_model * m, const char * kv, int64_t n_batch, struct moqae_context ** c) {
    struct moqae_context_params cp = moqae_context_default_params();
    cp.n_ctx = 1024, cp.n_batch = n_batch, cp.kv = kv, cp.n_threads = 8;
    int st = moqae_context_new(m, &cp, c);
    if (st) {
        printf("context (%s): %s\n", kv, moqae_last_error());
    }
    return st;
}

static int check_logits(struct moqae_model * mc, struct moqae_model * mg, const int32_t * toks, int64_t n, int64_t n_vocab) {
    static const char * policies[] = { "fp16", "int8", "int4", "int2", "sink+int4", "sink+int2" };
    int                 fails      = 0;
    float *             ref        = malloc(sizeof(float) * (size_t) (n * n_vocab));
    for (size_t pi = 0; pi < sizeof(policies) / sizeof(policies[0]); pi++) {
        struct moqae_context *cc = NULL, *cg = NULL;
        if (ctx_new(mc, policies[pi], 64, &cc) || ctx_new(mg, policies[pi], 64, &cg)) {
            fails++;
            moqae_context_free(cc), moqae_context_free(cg);
            continue;
        }
        struct cmp   pre = { 0 }, dec = { 0 };
        const float *lc, *lg;
        int          st = moqae_decode(cc, toks, n, n);
        for (int64_t i = 0; !st && i < n; i++) {
            moqae_context_logits(cc, i, &lc);
            memcpy(ref + i * n_vocab, lc, sizeof(float) * (size_t) n_vocab);
        }
        if (!st) {
            st = moqae_decode(cg, toks, n, n);
        }
        for (int64_t i = 0; !st && i < n; i++) {
            moqae_context_logits(cg, i, &lg);
            cmp_row(&pre, ref + i * n_vocab, lg, n_vocab);
        }
        int32_t next = argmax(ref + (n - 1) * n_vocab, n_vocab);
        for (int step = 0; !st && step < 40; step++) { /* teacher-forced by the CPU's greedy token */
            if ((st = moqae_decode(cc, &next, 1, 1)) || (st = moqae_decode(cg, &next, 1, 1))) {
                break;
            }
            moqae_context_logits(cc, 0, &lc);
            moqae_context_logits(cg, 0, &lg);
            cmp_row(&dec, lc, lg, n_vocab);
            next = argmax(lc, n_vocab);
        }
        if (st) {
            printf("kv %-9s: decode failed: %s\n", policies[pi], moqae_last_error());
            fails++;
        } else {
            const bool ok = pre.worst_nrmse < NRMSE_MAX && dec.worst_nrmse < NRMSE_MAX &&
                            (double) pre.agree >= ARGMAX_MIN * (double) pre.rows &&
                            (double) dec.agree >= ARGMAX_MIN * (double) dec.rows;
            printf("kv %-9s: prefill %lld rows nrmse %.4f max|d| %.3f argmax %lld/%lld; decode %lld steps nrmse %.4f "
                   "max|d| %.3f argmax %lld/%lld  %s\n",
                   policies[pi], (long long) pre.rows, pre.worst_nrmse, pre.max_abs, (long long) pre.agree,
                   (long long) pre.rows, (long long) dec.rows, dec.worst_nrmse, dec.max_abs, (long long) dec.agree,
                   (long long) dec.rows, ok ? "ok" : "FAIL");
            fails += !ok;
        }
        moqae_context_free(cc), moqae_context_free(cg);
    }
    free(ref);
    return fails;
}

static int greedy(struct moqae_model * m, const char * kv, const char * text, int32_t * out, int n_gen, int64_t n_vocab) {
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
        if (moqae_decode(c, &out[i], 1, 1)) {
            moqae_context_free(c);
            return 1;
        }
    }
    moqae_context_free(c);
    return 0;
}

int main(int argc, char ** argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: cuda-parity MODEL.gguf\n");
        return 2;
    }
    if (!moqae_has_cuda()) {
        printf("skip: no CUDA device in this build or machine\n");
        return 77;
    }
    if (!strcmp(argv[1], "--probe")) {
        printf("CUDA device present\n");
        return 0;
    }
    int fails = check_codecs();
    struct moqae_model *      mc = NULL, *mg = NULL;
    struct moqae_model_params pg = moqae_model_default_params();
    pg.n_gpu_layers              = 99;
    if (moqae_model_load(argv[1], NULL, &mc) || moqae_model_load(argv[1], &pg, &mg)) {
        printf("load: %s\n", moqae_last_error());
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
    fails += check_logits(mc, mg, toks, n, info.n_vocab);
    static const char * prompts[] = { "The capital of France is", "def fibonacci(n):",
                                      "Once upon a time, in a small village by the sea," };
    static const char * kvs[]     = { "fp16", "int4" };
    for (int ki = 0; ki < 2; ki++) {
        for (int p = 0; p < 3; p++) {
            int32_t a[64], b[64];
            if (greedy(mc, kvs[ki], prompts[p], a, 64, info.n_vocab) || greedy(mg, kvs[ki], prompts[p], b, 64, info.n_vocab)) {
                printf("greedy: %s\n", moqae_last_error());
                fails++;
                continue;
            }
            int same = 0;
            while (same < 64 && a[same] == b[same]) {
                same++;
            }
            printf("greedy kv %s prompt %d: %d/64 tokens identical%s\n", kvs[ki], p, same,
                   same == 64 ? "" : " (first difference at that index)");
            fails += same != 64 && ki == 0; /* the gate: fp16; int4 reported */
        }
    }
    moqae_model_free(mc);
    moqae_model_free(mg);
    printf("%s\n", fails ? "FAIL" : "PASS");
    return fails ? 1 : 0;
}
