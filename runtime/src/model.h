/*
 * model.h — a loaded model: hyper-parameters read from GGUF metadata, and weight tensors that point
 * into the read-only mapping (never copied). Supports the llama architecture (LLaMA-2, SmolLM2...).
 * Every tensor's presence, type and shape is checked against the hyper-parameters at load.
 */
#ifndef MOQAE_MODEL_H
#define MOQAE_MODEL_H

#include "gguf.h"
#include "moqae.h"
#include "tokenizer.h"

#include <stddef.h>
#include <stdint.h>

/* A 2-D weight: n_rows rows of n_cols elements in `type` blocks (1-D tensors have n_rows = 1). */
struct moqae_weight {
    enum moqae_type type;
    int64_t         n_cols;    /* ne[0], the dot-product length */
    int64_t         n_rows;    /* ne[1]                          */
    size_t          row_bytes;
    const void *    data;      /* [n_rows][row_bytes] in the mapping */
};

struct moqae_hparams {
    int64_t n_vocab;
    int64_t n_ctx_train;
    int64_t n_embd;
    int64_t n_layer;
    int64_t n_head;
    int64_t n_head_kv;
    int64_t head_dim;   /* n_embd / n_head */
    int64_t n_ff;
    int64_t n_rot;      /* rotary dims per head (<= head_dim, even) */
    float   rope_base;
    float   rms_eps;
};

struct moqae_layer {
    struct moqae_weight attn_norm; /* [n_embd] f32                      */
    struct moqae_weight wq;        /* [n_head * head_dim][n_embd]       */
    struct moqae_weight wk;        /* [n_head_kv * head_dim][n_embd]    */
    struct moqae_weight wv;        /* [n_head_kv * head_dim][n_embd]    */
    struct moqae_weight wo;        /* [n_embd][n_head * head_dim]       */
    struct moqae_weight ffn_norm;  /* [n_embd] f32                      */
    struct moqae_weight w_gate;    /* [n_ff][n_embd]                    */
    struct moqae_weight w_up;      /* [n_ff][n_embd]                    */
    struct moqae_weight w_down;    /* [n_embd][n_ff]                    */
};

struct moqae_cuda_model; /* backend-cuda.h */

struct moqae_model {
    struct moqae_gguf *      gguf;
    struct moqae_tokenizer * tok;
    struct moqae_hparams     hp;
    struct moqae_weight      tok_embd;    /* [n_vocab][n_embd]                        */
    struct moqae_weight      output_norm; /* [n_embd] f32                             */
    struct moqae_weight      output;      /* [n_vocab][n_embd]; tok_embd when tied    */
    struct moqae_layer *     layers;      /* [n_layer]                                */
    struct moqae_model_info  info;
    struct moqae_cuda_model * cuda;       /* the weights on the GPU (n_gpu_layers > 0 and a CUDA device;
                                             backend-cuda.h), else NULL                 */
};

#endif /* MOQAE_MODEL_H */
