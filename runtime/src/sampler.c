/*
 * sampler.c — token sampling from logits: repetition penalty, then greedy (temp <= 0) or
 * top-k → top-p → min-p → temperature → a draw from the seeded RNG (llama.cpp's order).
 * Candidates are taken from a max-heap in descending order, so top-p/min-p cost O(n + kept·log n)
 * instead of a full sort of the vocabulary for every token.
 */
#include "common.h"

#include <math.h>

struct cand {
    float   logit;
    int32_t id;
};

struct moqae_sampler {
    struct moqae_sampler_params p;
    uint64_t                    rng[4]; /* xoshiro256** state */
    int32_t *                   recent; /* ring of the last repeat_last_n accepted tokens */
    int64_t                     n_recent, recent_head;
    struct cand *               heap;   /* [cap] */
    struct cand *               kept;   /* [cap] */
    float *                     penalized; /* [cap] logits after the penalty */
    int64_t                     cap;
};

static uint64_t splitmix64(uint64_t * x) {
    uint64_t z = (*x += 0x9e3779b97f4a7c15ull);
    z          = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z          = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static uint64_t rotl(uint64_t x, int k) {
    return (x << k) | (x >> (64 - k));
}

static uint64_t rng_next(uint64_t * s) {
    const uint64_t r = rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return r;
}

static void rng_seed(uint64_t * s, uint64_t seed) {
    for (int i = 0; i < 4; i++) {
        s[i] = splitmix64(&seed);
    }
}

struct moqae_sampler_params moqae_sampler_default_params(void) {
    struct moqae_sampler_params p;
    memset(&p, 0, sizeof(p));
    p.temp           = 0.8f;
    p.top_k          = 40;
    p.top_p          = 0.95f;
    p.min_p          = 0.05f;
    p.repeat_penalty = 1.0f;
    p.repeat_last_n  = 64;
    p.seed           = 0;
    return p;
}

int moqae_sampler_new(const struct moqae_sampler_params * params, struct moqae_sampler ** out) {
    if (!out) {
        return moqae_fail(MOQAE_ERR_INVALID_ARG, "moqae_sampler_new: out is NULL");
    }
    *out                          = NULL;
    struct moqae_sampler_params p = params ? *params : moqae_sampler_default_params();
    if (isnan(p.temp) || isnan(p.top_p) || isnan(p.min_p) || !(p.repeat_penalty > 0.0f) || p.repeat_last_n < 0 ||
        p.repeat_last_n > (1 << 20)) {
        return moqae_fail(MOQAE_ERR_INVALID_ARG,
                          "sampler: temp, top_p, min_p must be numbers, repeat_penalty > 0, 0 <= repeat_last_n <= 2^20");
    }
    struct moqae_sampler * s = calloc(1, sizeof(*s));
    if (!s) {
        return moqae_fail(MOQAE_ERR_OUT_OF_MEMORY, "out of memory for the sampler");
    }
    s->p = p;
    if (p.repeat_last_n > 0) {
        s->recent = malloc((size_t) p.repeat_last_n * sizeof(int32_t));
        if (!s->recent) {
            free(s);
            return moqae_fail(MOQAE_ERR_OUT_OF_MEMORY, "out of memory for the sampler");
        }
    }
    rng_seed(s->rng, p.seed);
    *out = s;
    return MOQAE_OK;
}

void moqae_sampler_free(struct moqae_sampler * s) {
    if (!s) {
        return;
    }
    free(s->recent);
    free(s->heap);
    free(s->kept);
    free(s->penalized);
    free(s);
}

int moqae_sampler_accept(struct moqae_sampler * s, int32_t token) {
    if (!s) {
        return moqae_fail(MOQAE_ERR_INVALID_ARG, "moqae_sampler_accept: sampler is NULL");
    }
    if (s->p.repeat_last_n == 0) {
        return MOQAE_OK;
    }
    s->recent[s->recent_head] = token;
    s->recent_head            = (s->recent_head + 1) % s->p.repeat_last_n;
    if (s->n_recent < s->p.repeat_last_n) {
        s->n_recent++;
    }
    return MOQAE_OK;
}

int moqae_sampler_reset(struct moqae_sampler * s, uint64_t seed) {
    if (!s) {
        return moqae_fail(MOQAE_ERR_INVALID_ARG, "moqae_sampler_reset: sampler is NULL");
    }
    s->n_recent    = 0;
    s->recent_head = 0;
    rng_seed(s->rng, seed);
    return MOQAE_OK;
}

static bool cand_less(struct cand a, struct cand b) { /* ties: lower id ranks higher */
    return a.logit < b.logit || (a.logit == b.logit && a.id > b.id);
}

static void sift_down(struct cand * h, int64_t n, int64_t i) {
    for (;;) {
        int64_t l = 2 * i + 1, r = l + 1, m = i;
        if (l < n && cand_less(h[m], h[l])) {
            m = l;
        }
        if (r < n && cand_less(h[m], h[r])) {
            m = r;
        }
        if (m == i) {
            return;
        }
        struct cand t = h[i];
        h[i]          = h[m];
        h[m]          = t;
        i             = m;
    }
}

static struct cand heap_pop(struct cand * h, int64_t * n) {
    struct cand top = h[0];
    h[0]            = h[--*n];
    sift_down(h, *n, 0);
    return top;
}

static int ensure_cap(struct moqae_sampler * s, int64_t n) {
    if (n <= s->cap) {
        return MOQAE_OK;
    }
    free(s->heap);
    free(s->kept);
    free(s->penalized);
    s->heap      = malloc((size_t) n * sizeof(struct cand));
    s->kept      = malloc((size_t) n * sizeof(struct cand));
    s->penalized = malloc((size_t) n * sizeof(float));
    s->cap       = n;
    if (!s->heap || !s->kept || !s->penalized) {
        s->cap = 0;
        return moqae_fail(MOQAE_ERR_OUT_OF_MEMORY, "out of memory for the sampler's candidates");
    }
    return MOQAE_OK;
}

int moqae_sampler_sample(struct moqae_sampler * s, const float * logits, int64_t n_vocab, int32_t * out_token) {
    if (!s || !logits || !out_token || n_vocab < 1 || n_vocab > INT32_MAX) {
        return moqae_fail(MOQAE_ERR_INVALID_ARG, "moqae_sampler_sample: NULL argument or bad n_vocab");
    }
    int st = ensure_cap(s, n_vocab);
    if (st) {
        return st;
    }
    float * l = s->penalized;
    memcpy(l, logits, (size_t) n_vocab * sizeof(float));
    if (s->p.repeat_penalty != 1.0f) {
        for (int64_t i = 0; i < s->n_recent; i++) {
            const int32_t t = s->recent[i];
            bool          seen = false; /* penalise each distinct token once */
            for (int64_t j = 0; j < i && !seen; j++) {
                seen = s->recent[j] == t;
            }
            if (!seen && t >= 0 && t < n_vocab) {
                l[t] = l[t] > 0 ? l[t] / s->p.repeat_penalty : l[t] * s->p.repeat_penalty;
            }
        }
    }
    if (!(s->p.temp > 0.0f)) { /* greedy */
        int64_t best = 0;
        for (int64_t i = 1; i < n_vocab; i++) {
            if (l[i] > l[best]) {
                best = i;
            }
        }
        *out_token = (int32_t) best;
        return MOQAE_OK;
    }
    int64_t n = 0;
    for (int64_t i = 0; i < n_vocab; i++) {
        if (!isnan(l[i])) {
            s->heap[n++] = (struct cand){ l[i], (int32_t) i };
        }
    }
    if (n == 0) {
        return moqae_fail(MOQAE_ERR_INVALID_ARG, "all logits are NaN");
    }
    for (int64_t i = n / 2 - 1; i >= 0; i--) {
        sift_down(s->heap, n, i);
    }
    const float mx = s->heap[0].logit;
    /* softmax denominator over the set top-p sees: the top-k tokens, or all */
    int64_t n_kept = 0;
    double  denom  = 0.0;
    if (s->p.top_k > 0 && s->p.top_k < n) {
        while (n_kept < s->p.top_k) {
            s->kept[n_kept] = heap_pop(s->heap, &n);
            denom += exp((double) (s->kept[n_kept].logit - mx));
            n_kept++;
        }
        n = 0; /* nothing beyond the top k */
    } else {
        for (int64_t i = 0; i < n; i++) {
            denom += exp((double) (s->heap[i].logit - mx));
        }
    }
    /* walk candidates in descending order: top-p, then min-p (a ratio to the best, unaffected by the
     * renormalisation after top-p) */
    const double log_min_p = s->p.min_p > 0.0f ? log((double) s->p.min_p) : -INFINITY;
    const bool   use_top_p = s->p.top_p < 1.0f;
    double       cum       = 0.0;
    int64_t      n_final   = 0;
    for (int64_t i = 0;; i++) {
        struct cand c;
        if (i < n_kept) {
            c = s->kept[i];
        } else if (n > 0) {
            c = heap_pop(s->heap, &n);
        } else {
            break;
        }
        if (i > 0 && (double) (c.logit - mx) < log_min_p) {
            break;
        }
        s->kept[n_final++] = c;
        cum += exp((double) (c.logit - mx)) / denom;
        if (use_top_p && cum >= (double) s->p.top_p) {
            break;
        }
    }
    /* temperature, then draw */
    double total = 0.0;
    for (int64_t i = 0; i < n_final; i++) {
        total += exp((double) ((s->kept[i].logit - mx) / s->p.temp));
    }
    const double r   = (double) (rng_next(s->rng) >> 11) * (1.0 / 9007199254740992.0) * total;
    double       acc = 0.0;
    *out_token       = s->kept[n_final - 1].id;
    for (int64_t i = 0; i < n_final; i++) {
        acc += exp((double) ((s->kept[i].logit - mx) / s->p.temp));
        if (r < acc) {
            *out_token = s->kept[i].id;
            break;
        }
    }
    return MOQAE_OK;
}
