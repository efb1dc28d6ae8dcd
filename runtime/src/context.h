/*
 * context.h — struct moqae_context: the per-user state on top of a shared model (KV cache, worker
 * threads, scratch for one micro-batch, logits). Created in api.c; the forward pass that fills it is
 * graph.c. All scratch is sized for the worst case at creation, so decode never allocates (except
 * the logits buffer, which grows when a caller first asks for more logits rows than before).
 */
#ifndef MOQAE_CONTEXT_H
#define MOQAE_CONTEXT_H

#include "cpu/kernels.h"
#include "kv-cache.h"
#include "model.h"
#include "router.h"
#include "threadpool.h"

#include <stdatomic.h>

struct moqae_cuda_context;

struct moqae_context {
    struct moqae_model *             model;
    struct moqae_cuda_context *      cuda; /* the GPU ring and scratch (model->cuda) for the layers on the
                                              GPU; with every layer there, kv and the CPU scratch below are
                                              NULL and decode runs on the GPU */
    const struct moqae_cpu_kernels * K;
    struct moqae_threadpool *        tp;
    struct moqae_kv_cache *          kv;
    int64_t                          n_layer_cpu; /* layers 0 .. n_layer_cpu - 1 run on the CPU (kv holds
                                                     them), the rest on the GPU: partial offload */
    bool                             broken;      /* partial offload: a micro-batch reached one side's
                                                     cache only; reset first                        */
    int64_t                          n_ctx;
    int64_t                          n_batch;
    int                              n_threads;
    int                              kv_overflow; /* enum moqae_kv_overflow_policy */
    const struct moqae_router *      router;      /* NULL: fixed KV policy          */
    uint8_t *                        votes;       /* [n_batch][n_router]            */
    float *                          router_scratch; /* [n_threads][router_scratch_floats] */
    int64_t                          router_scratch_floats;

    /* scratch for one micro-batch of up to n_batch tokens */
    float * x;        /* [n_batch][n_embd] residual stream            */
    float * xn;       /* [n_batch][n_embd] normed input of a block     */
    float * tmp;      /* [n_batch][n_embd] block output before the add */
    float * q;        /* [n_batch][n_head * head_dim]                  */
    float * k;        /* [n_batch][n_head_kv * head_dim]               */
    float * v;        /* [n_batch][n_head_kv * head_dim]               */
    float * att;      /* [n_batch][n_head * head_dim]                  */
    float * gate;     /* [n_batch][n_ff]                               */
    float * up;       /* [n_batch][n_ff]                               */
    float * rope_cs;  /* [n_batch][n_rot/2][2] cos, sin                */
    void *  act[2];   /* [n_batch][row bytes] activations in a weight's vec_dot_type */
    size_t  act_row_cap;       /* bytes per row available in act[i]    */
    float * attn_scratch;      /* [n_threads][scratch_floats]          */
    int64_t attn_scratch_floats;

    float * logits;   /* [logits_cap][n_vocab] */
    int64_t logits_cap;
    int64_t n_logits; /* rows valid from the last decode */

    atomic_bool interrupt;

    /* the micro-batch being computed (read by the worker threads) */
    const int32_t * job_tokens;
    int64_t         job_n;
    int64_t         job_pos0;
    int64_t         job_n_out;  /* logits rows: the last job_n_out tokens of the micro-batch */
    float *         job_logits; /* where they go */
};

/* Run the model on one micro-batch described by ctx->job_* (n_past positions already cached): the
 * CPU's layers (all of them, or the first n_layer_cpu under partial offload: then ctx->x holds the
 * next layer's input and no logits are computed). Stores its K/V in the cache and commits them.
 * MOQAE_ERR_CONTEXT_FULL (nothing changed) when the cache cannot take the micro-batch's chunks. */
int moqae_graph_forward(struct moqae_context * ctx);
/* The router's votes of the micro-batch ctx->job_* into ctx->votes (no router: nothing); the CUDA
 * path routes on the host with it (issue 7). */
void moqae_graph_votes(struct moqae_context * ctx);

#endif /* MOQAE_CONTEXT_H */
