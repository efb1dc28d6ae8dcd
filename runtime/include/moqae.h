/*
 * moqae.h — the one public C API of libmoqae.
 *
 * Walk-through:
 *
 *     struct moqae_model * model = NULL;
 *     if (moqae_model_load("m.gguf", NULL, &model) != MOQAE_OK) {
 *         fprintf(stderr, "%s\n", moqae_last_error());
 *     }
 *     struct moqae_context_params cp = moqae_context_default_params();
 *     cp.n_ctx = 4096;
 *     struct moqae_context * ctx = NULL;
 *     moqae_context_new(model, &cp, &ctx);
 *     int32_t toks[256]; int64_t n = 0;
 *     moqae_tokenize(model, "Hello", 5, true, false, toks, 256, &n);
 *     moqae_decode(ctx, toks, n, 1);          // logits of the last token
 *     const float * logits = NULL;
 *     moqae_context_logits(ctx, 0, &logits);  // n_vocab floats
 *     ...
 *     moqae_context_free(ctx);                // contexts before their model
 *     moqae_model_free(model);
 *
 * Errors: every fallible call returns enum moqae_status (0 is OK, negative names the error);
 * moqae_last_error() then gives a thread-local message. Handles come back through out-pointers.
 * The library never prints and never exits; it logs through moqae_log_set().
 *
 * Threads: a model is read-only after loading and may be shared by any number of contexts on any
 * threads. A context (KV cache, scratch, worker threads) is used by one thread at a time.
 * moqae_context_interrupt() is the one call that may come from another thread (or a signal handler).
 */
#ifndef MOQAE_H
#define MOQAE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#    define MOQAE_API __declspec(dllexport)
#else
#    define MOQAE_API __attribute__((visibility("default")))
#endif

/* ------------------------------------------------------------------------------------------------
 * Status, version, logging
 * ---------------------------------------------------------------------------------------------- */

enum moqae_status {
    MOQAE_OK                   = 0,
    MOQAE_ERR_INVALID_ARG      = -1,  /* a NULL handle, an out-of-range value, a bad option      */
    MOQAE_ERR_IO               = -2,  /* a file could not be opened, read or mapped              */
    MOQAE_ERR_FORMAT           = -3,  /* a file is malformed (bad magic, truncated, bad offsets)  */
    MOQAE_ERR_UNSUPPORTED      = -4,  /* well-formed but not supported (architecture, type)      */
    MOQAE_ERR_OUT_OF_MEMORY    = -5,  /* an allocation failed                                    */
    MOQAE_ERR_CONTEXT_FULL     = -6,  /* the tokens do not fit in the context                    */
    MOQAE_ERR_BUFFER_TOO_SMALL = -7,  /* a caller's buffer is too small; *n_written says how big  */
    MOQAE_ERR_INTERRUPTED      = -8,  /* moqae_context_interrupt() stopped the call               */
    MOQAE_ERR_INVALID_TOKEN    = -9,  /* a token id outside [0, n_vocab)                          */
    MOQAE_ERR_NOT_FOUND        = -10, /* a metadata key is absent                                 */
    MOQAE_ERR_INTERNAL         = -11, /* a bug: please report it with the message                 */
};

/* Message of the last failed call on this thread ("" if none). Valid until the next failing call on
 * the same thread. Never NULL. */
MOQAE_API const char * moqae_last_error(void);

/* Short name of a status ("MOQAE_ERR_FORMAT"). Never NULL. */
MOQAE_API const char * moqae_status_name(int status);

/* Library version, "MAJOR.MINOR.PATCH". */
MOQAE_API const char * moqae_version(void);

/* Whether this build has CUDA kernels and a usable device. */
MOQAE_API bool moqae_has_cuda(void);

/* The CPU kernel set chosen at run time: "avx512", "avx2" or "scalar". */
MOQAE_API const char * moqae_cpu_backend(void);

enum moqae_log_level {
    MOQAE_LOG_DEBUG = 0,
    MOQAE_LOG_INFO  = 1,
    MOQAE_LOG_WARN  = 2,
    MOQAE_LOG_ERROR = 3,
};

/* msg is NUL-terminated and has no trailing newline. */
typedef void (*moqae_log_fn)(int level, const char * msg, void * user_data);

/* Install a log callback for the whole process (NULL: discard logs, the default). Not thread-safe
 * against concurrent logging: set it once before loading models. */
MOQAE_API void moqae_log_set(moqae_log_fn fn, void * user_data);

/* ------------------------------------------------------------------------------------------------
 * Model: the weights (mmapped, read-only) and the vocabulary
 * ---------------------------------------------------------------------------------------------- */

struct moqae_model;

struct moqae_model_params {
    int32_t n_gpu_layers; /* layers to offload to CUDA, the model's last ones and the output head;
                             0 = none (CPU only); < 0 or >= n_layer = every layer              */
    bool    use_mlock;    /* lock the mapped weights in RAM; false = let the OS page them         */
};

MOQAE_API struct moqae_model_params moqae_model_default_params(void);

/* Load a GGUF model. params NULL = defaults. On success *out owns the model: free it with
 * moqae_model_free() after every context made from it. On failure *out is NULL. */
MOQAE_API int moqae_model_load(const char * path, const struct moqae_model_params * params,
                               struct moqae_model ** out);

/* Accepts NULL. */
MOQAE_API void moqae_model_free(struct moqae_model * model);

struct moqae_model_info {
    int64_t n_vocab;
    int64_t n_ctx_train; /* the context length the model was trained for                    */
    int64_t n_embd;
    int64_t n_layer;
    int64_t n_head;
    int64_t n_head_kv;
    int64_t head_dim;
    int64_t n_ff;
    int64_t n_params;      /* elements in all tensors                                         */
    int64_t weight_bytes;  /* bytes of all tensors as stored                                  */
    int32_t token_bos;     /* -1 if none                                                      */
    int32_t token_eos;     /* -1 if none                                                      */
    bool    add_bos;       /* tokenize(add_special=true) prepends BOS                         */
    bool    add_eos;       /* tokenize(add_special=true) appends EOS                          */
    char    arch[32];      /* general.architecture, NUL-terminated                            */
    char    name[128];     /* general.name, NUL-terminated, may be ""                         */
};

MOQAE_API int moqae_model_get_info(const struct moqae_model * model, struct moqae_model_info * out);

/* A string metadata value (e.g. "tokenizer.chat_template"), copied with a NUL into buf.
 * *n_written = length without the NUL (also set on MOQAE_ERR_BUFFER_TOO_SMALL: then it is the
 * needed length). MOQAE_ERR_NOT_FOUND if the key is absent or not a string. */
MOQAE_API int moqae_model_meta_str(const struct moqae_model * model, const char * key, char * buf, size_t capacity,
                                   size_t * n_written);

/* ------------------------------------------------------------------------------------------------
 * Tokenizer (thread-safe: reads the model only)
 * ---------------------------------------------------------------------------------------------- */

/* Tokenize len bytes of text (any bytes; need not be NUL-terminated; invalid UTF-8 is tokenized
 * byte-wise, never rejected). add_special: add BOS/EOS as the model says. parse_special: text like
 * "<|im_start|>" becomes the special token instead of plain text. Writes at most capacity ids; on
 * MOQAE_ERR_BUFFER_TOO_SMALL *n_tokens is the number needed. */
MOQAE_API int moqae_tokenize(const struct moqae_model * model, const char * text, size_t len, bool add_special,
                             bool parse_special, int32_t * tokens, int64_t capacity, int64_t * n_tokens);

/* The bytes of one token (not NUL-terminated). special=false renders control tokens as "".
 * MOQAE_ERR_INVALID_TOKEN for an id outside the vocabulary. */
MOQAE_API int moqae_token_to_piece(const struct moqae_model * model, int32_t token, bool special, char * buf,
                                   size_t capacity, size_t * n_written);

/* Detokenize a sequence into buf (not NUL-terminated); SentencePiece's leading space is removed
 * when the model adds one. */
MOQAE_API int moqae_detokenize(const struct moqae_model * model, const int32_t * tokens, int64_t n_tokens,
                               bool special, char * buf, size_t capacity, size_t * n_written);

/* Whether the token ends generation (EOS, EOT, <|im_end|> ...). False for invalid ids. */
MOQAE_API bool moqae_token_is_eog(const struct moqae_model * model, int32_t token);

/* ------------------------------------------------------------------------------------------------
 * Router: a MoQAE router file (docs/ROUTER-FORMAT.md) that picks each KV chunk's expert
 * ---------------------------------------------------------------------------------------------- */

struct moqae_router;

/* Load a router GGUF and check it against model (architecture, n_embd, n_layer, n_vocab and the
 * fingerprint of its token embeddings): MOQAE_ERR_IO, MOQAE_ERR_FORMAT (a missing or bad key or
 * tensor, named), MOQAE_ERR_UNSUPPORTED (an expert codec or input layer this runtime lacks),
 * MOQAE_ERR_INVALID_ARG (a router for another model). The router keeps no reference to the model.
 * A router is read-only and may be shared by any number of contexts on any threads. */
MOQAE_API int moqae_router_load(const struct moqae_model * model, const char * path, struct moqae_router ** out);

/* Accepts NULL. Contexts using the router must be freed first. */
MOQAE_API void moqae_router_free(struct moqae_router * router);

struct moqae_router_info {
    int32_t format_version;
    int32_t chunk_size;         /* C, tokens per chunk                                         */
    int32_t n_expert;           /* experts, highest precision first                            */
    int32_t expert_bits[4];     /* nominal bits of each: 16, 8, 4 or 2                         */
    int32_t n_router;           /* routers in the file (decisions per chunk)                   */
    int32_t group_size;         /* consecutive layers each decision covers                     */
    int32_t hidden_size;        /* width of the router MLP                                     */
    bool    freeze_first_chunk; /* chunk 0 always FP16                                         */
    float   lambda;             /* training lambda                                             */
    float   expected_bits;      /* average nominal bits on the calibration text                */
};

MOQAE_API int moqae_router_get_info(const struct moqae_router * router, struct moqae_router_info * out);

/* ------------------------------------------------------------------------------------------------
 * Context: KV cache, scratch and worker threads
 * ---------------------------------------------------------------------------------------------- */

struct moqae_context;

struct moqae_context_params {
    int64_t n_ctx;     /* tokens the context holds; 0 = the model's n_ctx_train                    */
    int64_t n_batch;   /* prompt micro-batch in tokens; 0 = 512. Results do not depend on it.      */
    int32_t n_threads; /* worker threads including the caller; 0 = the number of online CPUs       */
    const char * kv;   /* KV cache policy: "fp16", "int8", "int4", "int2", "sink+int8", "sink+int4",
                          "sink+int2" (chunk 0 FP16); NULL = "fp16"                                  */
    int64_t kv_budget; /* bytes for the encoded KV chunks; 0 = sized from n_ctx and the policy     */
    int32_t kv_overflow; /* enum moqae_kv_overflow_policy: what happens when the KV cache is full  */
    int32_t kv_chunk;  /* tokens per KV chunk (32 or 64); 0 = 32, or the router's chunk size        */
    const struct moqae_router * router; /* NULL = every chunk by the kv policy; else the router picks
                          each chunk's expert (kv must then be NULL). Must outlive the context.       */
    double  kv_bits;   /* instead of kv_budget: a budget of kv_bits effective bits per KV element over
                          n_ctx tokens (n_ctx x 2 x n_layer x n_head_kv x head_dim x kv_bits / 8
                          bytes), in [1, 16]; 0 = unused. Pair it with kv_overflow DEMOTE.            */
    int32_t kv_keys;   /* enum moqae_kv_keys: where quantized chunks hold their keys; 0 = before RoPE  */
};

/* Where the KV cache quantizes keys (moqae_context_params.kv_keys; docs/KV-CODECS.md). Before RoPE is
 * the more exact (the attention contract the routers are trained under); after RoPE lets the GPU's
 * decode attention move the keys' inverse Hadamard to the query: fewer instructions per chunk, a little
 * more quantization error (the CLI's --kv-keys). */
enum moqae_kv_keys {
    MOQAE_KV_KEYS_PRE_ROPE  = 0,
    MOQAE_KV_KEYS_POST_ROPE = 1,
};

/* What a full KV cache does (moqae_context_params.kv_overflow). */
enum moqae_kv_overflow_policy {
    MOQAE_KV_OVERFLOW_POLICY_ERROR  = 0, /* decode fails with MOQAE_ERR_CONTEXT_FULL                  */
    MOQAE_KV_OVERFLOW_POLICY_SHIFT  = 1, /* drop the oldest non-sink chunks, keep generating          */
    MOQAE_KV_OVERFLOW_POLICY_DEMOTE = 2, /* re-encode the oldest non-sink chunks to fewer bits (down
                                            to int2), then fail when nothing is left to demote       */
};

MOQAE_API struct moqae_context_params moqae_context_default_params(void);

/* Create a context on model. params NULL = defaults. The model must outlive the context. */
MOQAE_API int moqae_context_new(struct moqae_model * model, const struct moqae_context_params * params,
                                struct moqae_context ** out);

/* Accepts NULL. Joins the worker threads. */
MOQAE_API void moqae_context_free(struct moqae_context * ctx);

/* Forget every token: the next decode starts at position 0. */
MOQAE_API int moqae_context_reset(struct moqae_context * ctx);

/* Position of the next token: tokens decoded since the last reset (with kv_overflow SHIFT this can
 * exceed n_ctx; moqae_context_kv_stats tells how many the cache still holds). */
MOQAE_API int64_t moqae_context_n_past(const struct moqae_context * ctx);

/* The n_ctx the context was created with. */
MOQAE_API int64_t moqae_context_n_ctx(const struct moqae_context * ctx);

/* Run the model on n_tokens tokens appended after the n_past already in the context (prompt
 * micro-batches of n_batch). Keeps logits for the last n_logits of these tokens (0..n_tokens).
 * MOQAE_ERR_CONTEXT_FULL if n_past + n_tokens > n_ctx, unless kv_overflow is SHIFT (nothing is changed
 * then); with a kv_budget below what n_ctx needs, also when the budget runs out (the tokens of the
 * micro-batches before that stay in the context);
 * MOQAE_ERR_INVALID_TOKEN for an id outside the vocabulary (nothing is changed);
 * MOQAE_ERR_INTERRUPTED if interrupted: the tokens of completed micro-batches stay in the context. */
MOQAE_API int moqae_decode(struct moqae_context * ctx, const int32_t * tokens, int64_t n_tokens, int64_t n_logits);

/* Logits (n_vocab floats) of the i-th kept token of the last decode, 0 <= i < n_logits. The pointer
 * stays valid until the next decode, reset or free of ctx. */
MOQAE_API int moqae_context_logits(const struct moqae_context * ctx, int64_t i, const float ** out);

/* Ask a running moqae_decode on ctx to stop at the next micro-batch boundary. Safe from any
 * thread and from signal handlers. The flag clears when the next decode starts. */
MOQAE_API void moqae_context_interrupt(struct moqae_context * ctx);

struct moqae_kv_stats {
    int64_t n_tokens;        /* tokens the cache holds (completed chunks + the residual window);
                                with kv_overflow SHIFT up to n_ctx + kv_chunk - 1              */
    int64_t n_ctx;           /* tokens it can hold                                            */
    int64_t n_chunks[4];     /* completed chunks per expert: fp16, int8, int4, int2           */
    double  nominal_bits;    /* average bits per stored element, codes only (the residual window
                                counts 16: f16 values)                                        */
    double  effective_bits;  /* average bits per stored element, scales and zeros included    */
    int64_t bytes_used;      /* bytes holding the n_tokens tokens                             */
    int64_t bytes_reserved;  /* bytes allocated for the cache                                 */
    int64_t n_records[4];    /* completed (chunk, layer) records per expert: with a router that
                                decides per layer or per group, n_chunks[e] is n_records[e] / n_layer
                                rounded                                                       */
};

MOQAE_API int moqae_context_kv_stats(const struct moqae_context * ctx, struct moqae_kv_stats * out);

/* ------------------------------------------------------------------------------------------------
 * Perplexity (llama.cpp's method): consecutive windows of n_ctx tokens from tokens[]; the model's
 * KV is cleared before each window; if the model adds BOS the window's first token is replaced by
 * BOS; the tokens of the second half of each window are scored.
 * ---------------------------------------------------------------------------------------------- */

struct moqae_ppl_params {
    int64_t n_ctx;    /* window length; 0 = the context's n_ctx; must be <= the context's n_ctx      */
    int64_t n_chunks; /* windows to score; 0 = all that fit                                          */
    /* Called after each window with its index, the running PPL estimate; return false to stop. */
    bool (*progress)(int64_t chunk, int64_t n_chunks, double ppl, void * user_data);
    void * user_data;
};

MOQAE_API struct moqae_ppl_params moqae_ppl_default_params(void);

struct moqae_ppl_result {
    double  ppl;
    double  ppl_err;   /* llama.cpp's +/- */
    double  nll;       /* mean negative log-likelihood (nats) */
    int64_t n_scored;  /* tokens scored */
    int64_t n_chunks;  /* windows evaluated */
};

/* Resets the context before each window and leaves it reset (the progress callback runs while a
 * window is still in the context, e.g. to read moqae_context_kv_stats). MOQAE_ERR_INVALID_ARG if tokens hold
 * fewer than one window (n_ctx tokens). */
MOQAE_API int moqae_perplexity(struct moqae_context * ctx, const int32_t * tokens, int64_t n_tokens,
                               const struct moqae_ppl_params * params, struct moqae_ppl_result * out);

/* ------------------------------------------------------------------------------------------------
 * Sampler
 * ---------------------------------------------------------------------------------------------- */

struct moqae_sampler;

struct moqae_sampler_params {
    float    temp;           /* <= 0: greedy (argmax)                                            */
    int32_t  top_k;          /* keep the k most likely; <= 0: off                                */
    float    top_p;          /* keep the smallest set with mass >= p; >= 1: off                  */
    float    min_p;          /* drop tokens below min_p * p(max); <= 0: off                      */
    float    repeat_penalty; /* divide positive / multiply negative logits of recent tokens; 1: off */
    int32_t  repeat_last_n;  /* how many recent tokens the penalty looks at; 0: off              */
    uint64_t seed;           /* RNG seed                                                         */
};

MOQAE_API struct moqae_sampler_params moqae_sampler_default_params(void);

MOQAE_API int moqae_sampler_new(const struct moqae_sampler_params * params, struct moqae_sampler ** out);

/* Accepts NULL. */
MOQAE_API void moqae_sampler_free(struct moqae_sampler * smpl);

/* Pick a token from n_vocab logits (not modified). Does not record it: call moqae_sampler_accept. */
MOQAE_API int moqae_sampler_sample(struct moqae_sampler * smpl, const float * logits, int64_t n_vocab,
                                   int32_t * out_token);

/* Record a token (prompt or generated) for the repetition penalty. */
MOQAE_API int moqae_sampler_accept(struct moqae_sampler * smpl, int32_t token);

/* Forget the recorded tokens and reseed. */
MOQAE_API int moqae_sampler_reset(struct moqae_sampler * smpl, uint64_t seed);

#ifdef __cplusplus
}
#endif

#endif /* MOQAE_H */
