/*
 * router.h — a loaded MoQAE router (docs/ROUTER-FORMAT.md): per-token expert votes from the hidden
 * states at the router's input layer (version 1: the token embeddings, layer 0's input). The chunk's
 * majority is taken by the KV ring (kv-cache.h), which keeps the votes of the incomplete chunk.
 * Reference: train/reference.py (the same computation in PyTorch).
 */
#ifndef MOQAE_ROUTER_H
#define MOQAE_ROUTER_H

#include "cpu/kernels.h"
#include "gguf.h"
#include "kv-codec.h"
#include "model.h"

#define MOQAE_ROUTER_MAX_EXPERTS 4

struct moqae_router {
    struct moqae_gguf *  gguf;
    int64_t              chunk;       /* C                                   */
    int64_t              n_expert;    /* E                                   */
    enum moqae_kv_codec  expert[MOQAE_ROUTER_MAX_EXPERTS];
    int32_t              bits[MOQAE_ROUTER_MAX_EXPERTS];
    int64_t              n_router;    /* decisions per chunk                 */
    int64_t              group_size;  /* layers per decision                 */
    int64_t              hidden;      /* R                                   */
    int64_t              n_embd, n_layer;
    bool                 freeze;
    float                eps, lambda, expected_bits;
    const float **       w1;          /* [n_router] -> [R][n_embd]           */
    const float **       w2;          /* [n_router] -> [R][n_embd]           */
    const float **       w3;          /* [n_router] -> [E][R]                */
    float *              demote_weight; /* [n_layer] or NULL (optional key)   */
};

/* Floats of scratch one call of moqae_router_vote needs. */
int64_t moqae_router_scratch_floats(const struct moqae_router * r);

/* The votes (expert indices) of one token for every router: x is its input-layer hidden state
 * (n_embd floats), votes[n_router]. */
void moqae_router_vote(const struct moqae_router * r, const struct moqae_cpu_kernels * K, const float * x,
                       uint8_t * votes, float * scratch);

#endif /* MOQAE_ROUTER_H */
