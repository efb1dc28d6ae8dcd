/*
 * test-sampler.c — the sampler (sampler.c) against its definition: greedy = argmax; top-k 1 and
 * tiny top-p collapse to argmax at any temperature; with no filters the draw frequencies follow
 * softmax(logits / temp); min-p drops unlikely tokens; the repetition penalty; seeds; bad params.
 */
#include "moqae.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>

static int g_fail = 0;
#define CHECK(cond, ...)                                      \
    do {                                                      \
        if (!(cond)) {                                        \
            fprintf(stderr, "%s:%d: FAIL: ", __FILE__, __LINE__); \
            fprintf(stderr, __VA_ARGS__);                     \
            fputc('\n', stderr);                              \
            g_fail = 1;                                       \
        }                                                     \
    } while (0)

static struct moqae_sampler * make(float temp, int top_k, float top_p, float min_p, float rep, uint64_t seed) {
    struct moqae_sampler_params p = moqae_sampler_default_params();
    p.temp = temp, p.top_k = top_k, p.top_p = top_p, p.min_p = min_p, p.repeat_penalty = rep, p.seed = seed;
    struct moqae_sampler * s = NULL;
    int st = moqae_sampler_new(&p, &s);
    CHECK(st == MOQAE_OK && s, "sampler_new: %s", moqae_last_error());
    return s;
}

int main(void) {
    enum { N = 7 };
    const float logits[N] = { 0.5f, 2.0f, -1.0f, 1.5f, 0.0f, 1.9f, -3.0f };
    int32_t     tok;

    struct moqae_sampler * s = make(0.0f, 0, 1.0f, 0.0f, 1.0f, 1);
    CHECK(moqae_sampler_sample(s, logits, N, &tok) == MOQAE_OK && tok == 1, "greedy gave %d", tok);
    moqae_sampler_free(s);

    s = make(5.0f, 1, 1.0f, 0.0f, 1.0f, 1);
    for (int i = 0; i < 100; i++) {
        moqae_sampler_sample(s, logits, N, &tok);
        CHECK(tok == 1, "top_k=1 gave %d", tok);
    }
    moqae_sampler_free(s);

    s = make(5.0f, 0, 0.01f, 0.0f, 1.0f, 1);
    for (int i = 0; i < 100; i++) {
        moqae_sampler_sample(s, logits, N, &tok);
        CHECK(tok == 1, "top_p=0.01 gave %d", tok);
    }
    moqae_sampler_free(s);

    /* frequencies follow softmax(logits / T) with no filters */
    const float T = 0.7f;
    s             = make(T, 0, 1.0f, 0.0f, 1.0f, 123);
    enum { DRAWS = 200000 };
    int    count[N] = { 0 };
    double z        = 0.0, p[N];
    for (int i = 0; i < N; i++) {
        z += exp(logits[i] / T);
    }
    for (int i = 0; i < DRAWS; i++) {
        moqae_sampler_sample(s, logits, N, &tok);
        CHECK(tok >= 0 && tok < N, "token %d out of range", tok);
        count[tok]++;
    }
    for (int i = 0; i < N; i++) {
        p[i]             = exp(logits[i] / T) / z;
        const double f   = (double) count[i] / DRAWS;
        const double tol = 5.0 * sqrt(p[i] * (1.0 - p[i]) / DRAWS) + 1e-4; /* 5 sigma */
        CHECK(fabs(f - p[i]) < tol, "token %d: frequency %.5f, softmax %.5f", i, f, p[i]);
    }
    moqae_sampler_free(s);

    /* min-p 0.5: only tokens with p >= 0.5 p_max survive: ids 1, 3, 5 (logit >= 2 - ln 2) */
    s = make(1.0f, 0, 1.0f, 0.5f, 1.0f, 7);
    for (int i = 0; i < 2000; i++) {
        moqae_sampler_sample(s, logits, N, &tok);
        CHECK(tok == 1 || tok == 3 || tok == 5, "min_p kept token %d", tok);
    }
    moqae_sampler_free(s);

    /* repetition penalty: after accepting token 1, greedy picks 5 (2.0 / 1.5 < 1.9) */
    s = make(0.0f, 0, 1.0f, 0.0f, 1.5f, 1);
    moqae_sampler_accept(s, 1);
    moqae_sampler_sample(s, logits, N, &tok);
    CHECK(tok == 5, "penalised greedy gave %d", tok);
    moqae_sampler_reset(s, 1);
    moqae_sampler_sample(s, logits, N, &tok);
    CHECK(tok == 1, "after reset greedy gave %d", tok);
    moqae_sampler_free(s);

    /* same seed, same draws; different seed, different sequence */
    struct moqae_sampler * a = make(1.0f, 0, 1.0f, 0.0f, 1.0f, 99), *b = make(1.0f, 0, 1.0f, 0.0f, 1.0f, 99),
                         *c = make(1.0f, 0, 1.0f, 0.0f, 1.0f, 100);
    int same_ab = 1, same_ac = 1;
    for (int i = 0; i < 64; i++) {
        int32_t ta, tb, tc;
        moqae_sampler_sample(a, logits, N, &ta);
        moqae_sampler_sample(b, logits, N, &tb);
        moqae_sampler_sample(c, logits, N, &tc);
        same_ab &= ta == tb;
        same_ac &= ta == tc;
    }
    CHECK(same_ab && !same_ac, "seeding: same %d, different-seed same %d", same_ab, same_ac);
    moqae_sampler_free(a);
    moqae_sampler_free(b);
    moqae_sampler_free(c);

    /* NaN logits are skipped; all-NaN is an error, not a crash */
    float nanl[3] = { NAN, 1.0f, NAN };
    s             = make(1.0f, 0, 1.0f, 0.0f, 1.0f, 1);
    CHECK(moqae_sampler_sample(s, nanl, 3, &tok) == MOQAE_OK && tok == 1, "NaN logits gave %d", tok);
    float alln[2] = { NAN, NAN };
    CHECK(moqae_sampler_sample(s, alln, 2, &tok) == MOQAE_ERR_INVALID_ARG, "all-NaN accepted");
    CHECK(moqae_sampler_sample(s, logits, 0, &tok) == MOQAE_ERR_INVALID_ARG, "n_vocab 0 accepted");
    CHECK(moqae_sampler_sample(NULL, logits, N, &tok) == MOQAE_ERR_INVALID_ARG, "NULL sampler accepted");
    moqae_sampler_free(s);
    moqae_sampler_free(NULL);

    struct moqae_sampler_params bad = moqae_sampler_default_params();
    bad.repeat_penalty             = 0.0f;
    CHECK(moqae_sampler_new(&bad, &s) == MOQAE_ERR_INVALID_ARG && s == NULL, "repeat_penalty 0 accepted");
    bad          = moqae_sampler_default_params();
    bad.temp     = NAN;
    CHECK(moqae_sampler_new(&bad, &s) == MOQAE_ERR_INVALID_ARG, "NaN temp accepted");

    if (!g_fail) {
        printf("test-sampler: OK\n");
    }
    return g_fail;
}
