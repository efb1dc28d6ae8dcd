/*
 * kv-cache.h — the KV cache behind one interface, so the mixed-bit ring (issue 5) can replace the
 * plain FP16 cache here without touching graph.c. The cache owns the attention computation over its
 * contents, because only it knows how its tokens are stored.
 *
 * Attention rule: token at position p attends, causally, to positions 0..p of the same sequence;
 * scores are q.k * scale, softmax in f32, output = sum_j p_j v_j.
 * This version: every token stored as f16 (K after RoPE, V as is).
 */
#ifndef MOQAE_KV_CACHE_H
#define MOQAE_KV_CACHE_H

#include "cpu/kernels.h"
#include "moqae.h"

#include <stdint.h>

struct moqae_kv_cache;

struct moqae_kv_config {
    int64_t n_layer;
    int64_t n_head_kv;
    int64_t head_dim;
    int64_t n_ctx; /* positions held */
};

int  moqae_kv_cache_new(const struct moqae_kv_config * cfg, struct moqae_kv_cache ** out);
void moqae_kv_cache_free(struct moqae_kv_cache * kv);
void moqae_kv_cache_clear(struct moqae_kv_cache * kv);

/* Tokens committed so far (the next token's position). */
int64_t moqae_kv_cache_n_tokens(const struct moqae_kv_cache * kv);
int64_t moqae_kv_cache_n_ctx(const struct moqae_kv_cache * kv);

/* Store n_tok tokens at positions pos0.. for one layer: k, v are [n_tok][n_head_kv * head_dim] f32.
 * Work is split over nth threads (this call is made by all of them, with their ith). */
void moqae_kv_cache_store(struct moqae_kv_cache * kv, const struct moqae_cpu_kernels * K, int64_t layer, int64_t pos0,
                          int64_t n_tok, const float * k, const float * v, int ith, int nth);

/* Scratch floats one thread needs for moqae_kv_cache_attend. */
int64_t moqae_kv_cache_scratch_floats(const struct moqae_kv_cache * kv);

/* Causal attention of n_tok queries at positions pos0.. over the layer's tokens 0..pos: q and out are
 * [n_tok][n_head * head_dim]. The tokens pos0..pos0+n_tok-1 must have been stored for this layer.
 * scratch: this thread's moqae_kv_cache_scratch_floats() floats. Split over nth threads. */
void moqae_kv_cache_attend(const struct moqae_kv_cache * kv, const struct moqae_cpu_kernels * K, int64_t layer,
                           int64_t pos0, int64_t n_tok, int64_t n_head, float scale, const float * q, float * out,
                           float * scratch, int ith, int nth);

/* After every layer has stored them: the n_tok tokens become part of the context. */
void moqae_kv_cache_commit(struct moqae_kv_cache * kv, int64_t n_tok);

void moqae_kv_cache_stats(const struct moqae_kv_cache * kv, struct moqae_kv_stats * out);

#endif /* MOQAE_KV_CACHE_H */
