/*
 * cuda/attention.cuh — mixed-bit attention over the GPU ring under kv-cache.h's rule: a query at
 * position p attends to every completed chunk before its own (read from the chunk table, each at
 * its own codec, decoded into shared memory tile by tile: no dequantized copy of the cache) and to
 * the tokens of its own chunk up to p (the f16 staging window). One kernel serves decode and
 * chunked prefill: a block takes ROWS query rows (tokens x the query heads of one KV head), walks a
 * share of the key tiles (flash-decoding split), scores and weights them on tensor cores (WMMA f16,
 * f32 accumulate) with an online softmax in f32; a merge kernel combines the splits.
 */
#pragma once

#include "kv-codec.cuh"

struct moqae_cuda_attn_args {
    const float *                   q;       /* [n_tok][n_head][D] after RoPE                 */
    float *                         out;     /* [n_tok][n_head][D]                            */
    float *                         part;    /* split partials (moqae_cuda_attn_part_floats)  */
    const uint8_t *                 arena;   /* this layer's records                          */
    const uint16_t *                stage_k; /* this layer's window [n_head_kv][stage_rows][D] */
    const uint16_t *                stage_v;
    const struct moqae_cuda_chunk * table;
    const struct moqae_cuda_dyn *   dyn;
    int                             n_tok, n_head, n_split;
    int                             raw_bytes; /* largest padded record pair (key + value) of the
                                                  codecs the ring may hold: the decode kernel's copy
                                                  buffers (multiple of 16)                        */
    float                           scale;
};

/* Whether the kernel exists for this head_dim (64, 128) and chunk size (32). */
bool moqae_cuda_attn_supported(int head_dim, int chunk);

/* Rows per block for a micro-batch of n_tok tokens (16 for decode, 64 for prefill). */
int moqae_cuda_attn_rows(int64_t n_tok);

/* Floats the partials of n_split splits need for n_tok tokens. */
size_t moqae_cuda_attn_part_floats(const struct moqae_cuda_ring_geom * g, int64_t n_tok, int64_t n_head, int n_split);

int moqae_cuda_attention(const struct moqae_cuda_ring_geom * g, const struct moqae_cuda_attn_args * a,
                         cudaStream_t stream);
