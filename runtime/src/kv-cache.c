/*
 * kv-cache.c — the plain FP16 KV cache (kv-cache.h). Layout per layer and KV head: K and V as
 * [n_ctx][head_dim] f16, so one head's history is one contiguous scan. Attention is two-pass
 * (scores, then softmax-weighted sum of V) with f32 accumulation.
 */
#include "kv-cache.h"

#include "common.h"

#include <math.h>

struct moqae_kv_cache {
    struct moqae_kv_config cfg;
    int64_t                n_tokens;
    uint16_t *             k; /* [n_layer][n_head_kv][n_ctx][head_dim] f16 */
    uint16_t *             v; /* same layout                               */
};

static size_t head_stride(const struct moqae_kv_cache * kv) {
    return (size_t) kv->cfg.n_ctx * (size_t) kv->cfg.head_dim;
}

int moqae_kv_cache_new(const struct moqae_kv_config * cfg, struct moqae_kv_cache ** out) {
    *out = NULL;
    if (cfg->n_layer < 1 || cfg->n_head_kv < 1 || cfg->head_dim < 1 || cfg->n_ctx < 1) {
        return moqae_fail(MOQAE_ERR_INVALID_ARG, "KV cache: bad shape");
    }
    uint64_t elems = 0;
    if (!moqae_mul_ok((uint64_t) cfg->n_layer * (uint64_t) cfg->n_head_kv, (uint64_t) cfg->n_ctx, &elems) ||
        !moqae_mul_ok(elems, (uint64_t) cfg->head_dim, &elems) || elems > ((uint64_t) 1 << 40)) {
        return moqae_fail(MOQAE_ERR_OUT_OF_MEMORY, "KV cache for n_ctx %lld is too large", (long long) cfg->n_ctx);
    }
    struct moqae_kv_cache * kv = calloc(1, sizeof(*kv));
    if (!kv) {
        return moqae_fail(MOQAE_ERR_OUT_OF_MEMORY, "out of memory for the KV cache");
    }
    kv->cfg = *cfg;
    kv->k   = moqae_aligned_alloc(elems * 2);
    kv->v   = moqae_aligned_alloc(elems * 2);
    if (!kv->k || !kv->v) {
        moqae_kv_cache_free(kv);
        return moqae_fail(MOQAE_ERR_OUT_OF_MEMORY, "out of memory: the f16 KV cache for n_ctx %lld needs %.1f MiB",
                          (long long) cfg->n_ctx, (double) elems * 4 / (1024.0 * 1024.0));
    }
    *out = kv;
    return MOQAE_OK;
}

void moqae_kv_cache_free(struct moqae_kv_cache * kv) {
    if (!kv) {
        return;
    }
    free(kv->k);
    free(kv->v);
    free(kv);
}

void moqae_kv_cache_clear(struct moqae_kv_cache * kv) {
    kv->n_tokens = 0;
}

int64_t moqae_kv_cache_n_tokens(const struct moqae_kv_cache * kv) {
    return kv->n_tokens;
}

int64_t moqae_kv_cache_n_ctx(const struct moqae_kv_cache * kv) {
    return kv->cfg.n_ctx;
}

void moqae_kv_cache_store(struct moqae_kv_cache * kv, const struct moqae_cpu_kernels * K, int64_t layer, int64_t pos0,
                          int64_t n_tok, const float * k, const float * v, int ith, int nth) {
    const int64_t hd = kv->cfg.head_dim, nkv = kv->cfg.n_head_kv;
    const size_t  hs = head_stride(kv);
    /* one unit of work = one token's one head */
    for (int64_t u = ith; u < n_tok * nkv; u += nth) {
        const int64_t t = u / nkv, h = u % nkv;
        const size_t  dst = ((size_t) layer * (size_t) nkv + (size_t) h) * hs + (size_t) (pos0 + t) * (size_t) hd;
        K->f32_to_f16(hd, k + t * nkv * hd + h * hd, kv->k + dst);
        K->f32_to_f16(hd, v + t * nkv * hd + h * hd, kv->v + dst);
    }
}

int64_t moqae_kv_cache_scratch_floats(const struct moqae_kv_cache * kv) {
    return kv->cfg.n_ctx + kv->cfg.head_dim;
}

void moqae_kv_cache_attend(const struct moqae_kv_cache * kv, const struct moqae_cpu_kernels * K, int64_t layer,
                           int64_t pos0, int64_t n_tok, int64_t n_head, float scale, const float * q, float * out,
                           float * scratch, int ith, int nth) {
    const int64_t hd = kv->cfg.head_dim, nkv = kv->cfg.n_head_kv, group = n_head / nkv;
    const size_t  hs = head_stride(kv);
    float *       s  = scratch; /* [n_ctx] scores */
    for (int64_t u = ith; u < n_tok * n_head; u += nth) {
        const int64_t    t = u / n_head, h = u % n_head, hk = h / group;
        const int64_t    n_keys = pos0 + t + 1;
        const size_t     base   = ((size_t) layer * (size_t) nkv + (size_t) hk) * hs;
        const uint16_t * kh     = kv->k + base;
        const uint16_t * vh     = kv->v + base;
        const float *    qh     = q + (t * n_head + h) * hd;
        float *          oh     = out + (t * n_head + h) * hd;
        float            mx     = -INFINITY;
        for (int64_t j = 0; j < n_keys; j++) {
            s[j] = K->dot_f32_f16(hd, qh, kh + j * hd) * scale;
            mx   = s[j] > mx ? s[j] : mx;
        }
        double sum = 0.0;
        for (int64_t j = 0; j < n_keys; j++) {
            s[j] = expf(s[j] - mx);
            sum += s[j];
        }
        const float inv = (float) (1.0 / sum);
        memset(oh, 0, (size_t) hd * sizeof(float));
        for (int64_t j = 0; j < n_keys; j++) {
            K->axpy_f16(hd, s[j] * inv, vh + j * hd, oh);
        }
    }
}

void moqae_kv_cache_commit(struct moqae_kv_cache * kv, int64_t n_tok) {
    kv->n_tokens += n_tok;
}

void moqae_kv_cache_stats(const struct moqae_kv_cache * kv, struct moqae_kv_stats * out) {
    memset(out, 0, sizeof(*out));
    const int64_t per_token = 2 * kv->cfg.n_layer * kv->cfg.n_head_kv * kv->cfg.head_dim * 2;
    out->n_tokens           = kv->n_tokens;
    out->n_ctx              = kv->cfg.n_ctx;
    out->nominal_bits       = 16.0;
    out->effective_bits     = 16.0;
    out->bytes_used         = per_token * kv->n_tokens;
    out->bytes_reserved     = per_token * kv->cfg.n_ctx;
}
