/*
 * backend-cuda.h — the CUDA backend as the C side sees it (issue 7): upload a model's weights once,
 * make a GPU context (the mixed-bit KV ring in device memory, scratch, one stream), run one
 * micro-batch of the llama forward on the device. Implemented in cuda/backend.cu when the library
 * is built with MOQAE_CUDA=ON; backend-cuda-stub.c answers "no CUDA" otherwise. The CPU path
 * (graph.c, kv-ring.c) is the reference: the GPU computes the same attention rule (kv-cache.h)
 * with the same codec bytes (kv-codec.h) and the same chunk decisions (the router votes on the host,
 * from the token embeddings, as graph.c does) and the same ring bookkeeping: the GPU ring is kv-ring.c
 * without data (kv-cache.h's arena_ops), so routing (one decision per chunk or per group of layers),
 * the budget and the overflow policies (shift, demote by recency or by the router's learned order)
 * take the CPU ring's decisions, and their record moves and re-encodings reach the device arena.
 * Partial offload: the GPU holds the model's last layers and their ring (a kv config whose layer0 is
 * the first of them); the CPU runs the first layers and hands their output over (job.x).
 */
#ifndef MOQAE_BACKEND_CUDA_H
#define MOQAE_BACKEND_CUDA_H

#include "kv-cache.h"
#include "moqae.h"

#include <stdbool.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

struct moqae_model;
struct moqae_cuda_model;   /* the model's weights in device memory          */
struct moqae_cuda_context; /* ring, staging, scratch, stream of one context  */

/* Whether this build has CUDA and a device answers (computed once). */
bool moqae_cuda_available(void);

/* Upload the weights of the last min(n_gpu_layers, n_layer) layers, the output norm and head, and the
 * token embeddings (n_gpu_layers >= n_layer: the whole model; fewer: partial offload, the CPU runs the
 * first layers). MOQAE_ERR_OUT_OF_MEMORY with the bytes asked and free when they do not fit. */
int  moqae_cuda_model_new(const struct moqae_model * m, int n_gpu_layers, struct moqae_cuda_model ** out);
/* Layers on the GPU: the model's last ones. */
int64_t moqae_cuda_model_n_layers(const struct moqae_cuda_model * cm);
void moqae_cuda_model_free(struct moqae_cuda_model * cm);

/* A device context on model m (which has a cuda model, m->cuda): the KV ring sized from cfg (as
 * kv-ring.c sizes it), the f16 staging window, scratch for cfg->n_batch tokens.
 * MOQAE_ERR_OUT_OF_MEMORY naming the bytes when it does not fit; MOQAE_ERR_UNSUPPORTED for what the
 * GPU path lacks (kv_chunk 64, head_dim other than 64/128). */
int  moqae_cuda_context_new(const struct moqae_model * m, const struct moqae_kv_config * cfg,
                            struct moqae_cuda_context ** out);
void moqae_cuda_context_free(struct moqae_cuda_context * cc);
void moqae_cuda_context_clear(struct moqae_cuda_context * cc);
int64_t moqae_cuda_n_tokens(const struct moqae_cuda_context * cc);
void moqae_cuda_kv_stats(const struct moqae_cuda_context * cc, struct moqae_kv_stats * out);

/* One micro-batch (as context.h's job_* fields for moqae_graph_forward). */
struct moqae_cuda_job {
    const int32_t * tokens; /* [n] ids, checked by the caller                       */
    int64_t         n;      /* tokens, 1 .. n_batch                                  */
    int64_t         n_out;  /* logits rows: the last n_out tokens                    */
    float *         logits; /* [n_out][n_vocab] host memory                          */
    const uint8_t * votes;  /* [n][n_group] the router's votes (cfg->n_expert > 0), else NULL          */
    const float *   x;      /* partial offload: [n][n_embd] the first GPU layer's input (the CPU's
                               layers' output), host memory; NULL: the GPU embeds the tokens          */
};

/* Run one micro-batch after the tokens already in cc. MOQAE_ERR_CONTEXT_FULL (nothing changed) when
 * the ring cannot take the micro-batch's chunks; MOQAE_ERR_INTERNAL naming the CUDA call on a device
 * error. */
int moqae_cuda_forward(struct moqae_cuda_context * cc, const struct moqae_cuda_job * job);

/* The codec of every chunk stored so far, in position order, into codecs[cap] (*n: how many);
 * MOQAE_ERR_BUFFER_TOO_SMALL when cap is short. (Tests: the GPU's chunk decisions against the CPU's.) */
int moqae_cuda_chunk_codecs(const struct moqae_cuda_context * cc, uint8_t * codecs, int64_t cap, int64_t * n);

/* ---- test hooks (tests/tools/cuda-parity.c) ---- */

/* Encode one chunk of one KV head with the GPU encoder. k, v: [C][D] f32 whose values are
 * f16-representable (as the staging window holds them); keys before RoPE: cs_t [D/2][2][C] and
 * cs_p0 [D/2][2] (kv-codec.h's tables of the chunk), else both NULL. krec, vrec get moqae_kv_k_bytes /
 * moqae_kv_v_bytes bytes, to compare with kv-ring.c's path (unrotate, then moqae_kv_encode_k/_v). */
int moqae_cuda_codec_encode(enum moqae_kv_codec c, const struct moqae_kv_shape * s, const float * k, const float * v,
                            const float * cs_t, const float * cs_p0, uint8_t * krec, uint8_t * vrec);
/* The same phases of the GPU encoder run on the CPU (no device needed): the device code's logic
 * against kv-codec.c where there is no GPU. */
int moqae_cuda_codec_encode_emulated(enum moqae_kv_codec c, const struct moqae_kv_shape * s, const float * k,
                                     const float * v, const float * cs_t, const float * cs_p0, uint8_t * krec,
                                     uint8_t * vrec);

/* The GPU's demotion (moqae_cuda_kv_demote) of one head's records run on the CPU: krec/vrec at
 * old_codec re-encoded at new_codec into kout/vout (unpadded records); cs_t [D/2][2][C] and cs_p0
 * [D/2][2] when FP16 keys after RoPE become a quantized record before RoPE, else cs_p0 NULL. To compare
 * with kv-ring.c's demotion (tests/test-kv-ring.c). */
int moqae_cuda_codec_demote_emulated(enum moqae_kv_codec old_codec, enum moqae_kv_codec new_codec,
                                     const struct moqae_kv_shape * s, const uint8_t * krec, const uint8_t * vrec,
                                     const float * cs_t, const float * cs_p0, uint8_t * kout, uint8_t * vout);

/* The int8 tensor-core product y = W . x of n_rows GGUF rows (type Q4_0, Q4_1 or Q8_0) with x [n_tok][n_cols]
 * (quantized on the device as the runtime does) by each of its kernels: y gets 3 x [n_tok][n_rows] floats,
 * the default kernel (stages copied ahead), then the earlier one with 4 and with 1 quant block per stage; then
 * the decode mat-vec's for the first min(n_tok, 8) tokens (a fourth [n_tok][n_rows], the rest left as is). */
int moqae_cuda_imma_check(enum moqae_type type, int64_t n_rows, int64_t n_cols, int64_t n_tok, const uint8_t * rows,
                          const float * x, float * y);

/* One attention call on the GPU over a hand-made ring: n_chunks completed chunks (positions 0, C, ...)
 * whose records are given, then n_stage rows of the staging window (positions n_chunks * C ...); the
 * n_tok queries are those of the last n_tok staged positions. */
struct moqae_cuda_attn_case {
    int64_t         head_dim, n_head, n_head_kv, n_chunks, n_stage, n_tok;
    const int *     codecs;   /* [n_chunks] enum moqae_kv_codec                                       */
    const uint8_t * records;  /* per chunk, per KV head: key record then value record (unpadded)       */
    const float *   stage_k;  /* [n_head_kv][n_stage][head_dim] f16-representable, keys after RoPE     */
    const float *   stage_v;
    const float *   q;        /* [n_tok][n_head][head_dim] after RoPE                                  */
    const float *   theta;    /* [head_dim/2] the ring's angles (keys stored before RoPE), or NULL     */
    int             n_split;  /* flash-decoding splits                                                  */
    int             kernel;   /* 0: the library's choice; else an enum moqae_cuda_attn_kernel value     */
    int64_t         stage_back; /* the staging rows start this many chunks before the ring's end (a
                                   micro-batch whose completed chunks are in the ring already): 0, or
                                   up to n_chunks with n_stage up to (stage_back + 1) chunks           */
};
int moqae_cuda_attn_check(const struct moqae_cuda_attn_case * tc, float * out /* [n_tok][n_head][head_dim] */);

#ifdef __cplusplus
}
#endif

#endif /* MOQAE_BACKEND_CUDA_H */
