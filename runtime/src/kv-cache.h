/*
 * kv-cache.h — the KV cache: the mixed-bit ring of DESIGN.md ("The mixed-bit KV ring"), behind one
 * interface that graph.c calls. The cache owns the attention computation, because only it knows how
 * its tokens are stored.
 *
 * Attention rule (the contract with train/): the token at position p attends to every earlier
 * COMPLETED chunk of C tokens in its encoded form (FP16, INT8, INT4 or INT2 as the chunk's expert
 * says) and to the tokens of ITS OWN chunk, up to p, at the model's KV precision (values rounded to
 * f16, as an f16 cache holds them): the incomplete chunk is the residual window. Scores are q.k * scale, softmax in f32, output = sum_j p_j v_j.
 * Keys are stored before RoPE when keys_pre_rope (kv-codec.h's struct moqae_kv_rope rotates them in the
 * score), else after RoPE. Chunk records are kv-codec.h's. A chunk's expert is chosen when the
 * chunk completes, by the fixed policy or by the router's votes (router.h): one decision for every
 * layer (routing sharing) or one per group of consecutive layers.
 * Implementation: kv-ring.c.
 */
#ifndef MOQAE_KV_CACHE_H
#define MOQAE_KV_CACHE_H

#include "cpu/kernels.h"
#include "kv-codec.h"
#include "moqae.h"

#include <stddef.h>
#include <stdint.h>

struct moqae_kv_cache;

enum moqae_kv_overflow {
    MOQAE_KV_OVERFLOW_ERROR  = 0, /* a clear "context full" error                          */
    MOQAE_KV_OVERFLOW_SHIFT  = 1, /* drop the oldest non-sink chunks, keep going           */
    MOQAE_KV_OVERFLOW_DEMOTE = 2, /* re-encode the oldest non-sink chunks to fewer bits    */
};

/* A fixed policy: every chunk gets `codec`, except chunk 0 which gets FP16 when `sink`. */
struct moqae_kv_policy {
    enum moqae_kv_codec codec;
    bool                sink;
};

/* Parse "fp16", "int8", "int4", "int2", "sink+int8", "sink+int4", "sink+int2" (also "f16",
 * "q8", ... aliases are not accepted: one spelling each). MOQAE_ERR_INVALID_ARG with a message
 * listing the valid names otherwise. */
int moqae_kv_policy_parse(const char * s, struct moqae_kv_policy * out);

/* One record (chunk i, layer l: every KV head's K then V record) re-encoded one codec lower. */
struct moqae_kv_demotion {
    size_t        src, dst;   /* arena offsets of the old record and of the new one (dst <= src)      */
    int           old_codec, new_codec; /* enum moqae_kv_codec                                        */
    const float * cs_p0;      /* FP16 keys (after RoPE) becoming a quantized record (before RoPE): the
                                 chunk's start rotation [head_dim] (kv-codec.h's tables); else NULL  */
};

/* A ring whose records live elsewhere (the CUDA backend's arena in device memory): the ring keeps its
 * bookkeeping (chunk table, offsets, decisions, overflow policy) and hands every operation on its
 * arena's bytes to these, in order. demote decodes the old record and encodes the new one as
 * kv-codec.c does (moqae_kv_decode_*, kv-ring.c's turning of FP16 keys back to before RoPE, then
 * moqae_kv_encode_*), reading the whole old record before writing (the new one may overlap it). Each
 * returns MOQAE_OK or an error status with its message set. */
struct moqae_kv_arena_ops {
    void * user;
    int (*move)(void * user, size_t dst, size_t src, size_t n); /* memmove inside the arena, dst < src */
    int (*demote)(void * user, const struct moqae_kv_demotion * d);
};

struct moqae_kv_config {
    int64_t                n_layer;
    int64_t                n_head_kv;
    int64_t                head_dim;
    int64_t                n_ctx;    /* positions the context holds                                  */
    int64_t                n_batch;  /* largest micro-batch the graph sends                          */
    int64_t                chunk;    /* C: tokens per chunk (32 or 64)                               */
    struct moqae_kv_policy policy;
    int64_t                budget;   /* bytes for the encoded chunks; 0 = sized from n_ctx and policy */
    enum moqae_kv_overflow overflow;
    /* Routed experts (0 = the fixed policy above). With a router: policy.sink = routing freezing
     * (chunk 0 FP16), policy.codec = the experts' lowest; votes name an expert index. */
    int64_t                n_expert;
    enum moqae_kv_codec    expert[MOQAE_KV_CODEC_COUNT];
    int64_t                n_group;       /* decisions per chunk (>= 1; 1 = every layer shares one)   */
    int64_t                group_size;    /* consecutive layers per decision                         */
    double                 expected_bits; /* router's average nominal bits: sizes the ring (0: worst) */
    /* Keys as they leave the K projection (store() then gets un-rotated keys and the cache applies
     * the rotation of position p = angle p * theta_i to pair (2i, 2i+1), i < n_rot / 2); false: keys
     * after RoPE. */
    bool                   keys_pre_rope;
    int64_t                n_rot;
    float                  rope_base;
    /* Demotion order (--kv-overflow demote): NULL = recency (the oldest chunk, every layer above INT2,
     * one codec lower); else [n_layer] positive weights from the router file: the record (chunk i,
     * layer l) with the largest age_i * demote_weight[l] goes one codec lower first (age in chunks). */
    const float *          demote_weight;
    /* Each K and V record padded to a multiple of rec_align bytes (0 or 1: packed; the GPU ring: 16). */
    int64_t                rec_align;
    /* NULL: the ring holds its records. Else a ring without data (no arena, no staging window): prepare
     * and commit keep the bookkeeping and send the arena's byte operations to arena_ops; store and
     * attend must not be called. */
    const struct moqae_kv_arena_ops * arena_ops;
    /* The model layer of this ring's layer 0 (partial offload: the CPU holds layers 0.., the GPU the
     * rest): a router's group of ring layer l is (layer0 + l) / group_size. demote_weight is then the
     * ring's own [n_layer]. */
    int64_t                layer0;
};

/* The chunk table of a ring, for a backend that keeps the records itself (arena_ops). */
struct moqae_kv_table {
    int64_t         n_chunks, cap_chunks, n_layer;
    const int64_t * pos;   /* [n_chunks] position of each chunk's first token                          */
    const uint8_t * codec; /* [n_chunks][n_layer] enum moqae_kv_codec of each record                   */
    const size_t *  off;   /* [n_chunks][n_layer] byte offset of each record in the arena              */
    const float *   cs_p0; /* [n_chunks][head_dim] each chunk's start rotation (keys before RoPE), or NULL */
    size_t          cap, used; /* arena bytes: capacity, in use (a prefix)                             */
    const uint8_t * arena; /* the records (NULL in a ring with arena_ops)                            */
};
void moqae_kv_cache_table(const struct moqae_kv_cache * kv, struct moqae_kv_table * out);

int  moqae_kv_cache_new(const struct moqae_kv_config * cfg, struct moqae_kv_cache ** out);
void moqae_kv_cache_free(struct moqae_kv_cache * kv);
void moqae_kv_cache_clear(struct moqae_kv_cache * kv);

/* Tokens committed so far = the next token's position. */
int64_t moqae_kv_cache_n_tokens(const struct moqae_kv_cache * kv);
int64_t moqae_kv_cache_n_ctx(const struct moqae_kv_cache * kv);

/* Before a micro-batch of n_tok tokens (single-threaded): allocates the records of every chunk that
 * the micro-batch completes, applying the overflow policy. votes: [n_tok][n_group] expert indices
 * from the router (NULL without one); a chunk takes, per group, the expert most of its tokens voted
 * for (ties: the lower index, the higher precision). MOQAE_ERR_CONTEXT_FULL (nothing changed) when
 * they cannot be stored. */
int moqae_kv_cache_prepare(struct moqae_kv_cache * kv, int64_t n_tok, const uint8_t * votes);

/* Store the micro-batch's K/V for one layer (k, v: [n_tok][n_head_kv * head_dim] f32; keys before or
 * after RoPE as cfg.keys_pre_rope says)
 * and encode the chunks it completes. Called by all nth threads. Ends with a barrier-free state: the
 * caller puts a barrier before attending. */
void moqae_kv_cache_store(struct moqae_kv_cache * kv, int64_t layer, int64_t n_tok, const float * k, const float * v,
                          int ith, int nth);

/* Scratch floats one thread needs for moqae_kv_cache_attend. */
int64_t moqae_kv_cache_scratch_floats(const struct moqae_kv_cache * kv, int64_t n_head);

/* Causal attention of the micro-batch's n_tok queries (q, out: [n_tok][n_head * head_dim]) under the
 * attention rule above. scratch: this thread's moqae_kv_cache_scratch_floats floats. Split over nth. */
void moqae_kv_cache_attend(const struct moqae_kv_cache * kv, const struct moqae_cpu_kernels * K, int64_t layer,
                           int64_t n_tok, int64_t n_head, float scale, const float * q, float * out, float * scratch,
                           int ith, int nth);

/* After every layer has stored them: the n_tok tokens become part of the context. */
void moqae_kv_cache_commit(struct moqae_kv_cache * kv, int64_t n_tok);

void moqae_kv_cache_stats(const struct moqae_kv_cache * kv, struct moqae_kv_stats * out);

#endif /* MOQAE_KV_CACHE_H */
