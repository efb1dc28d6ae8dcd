/*
 * api.c — the public entry points of moqae.h that are not in model.c / sampler.c: contexts, decode,
 * logits, KV statistics, tokenizer wrappers, perplexity, version and backend queries. Checks every
 * argument, since this is where callers' mistakes arrive.
 */
#include "backend-cuda.h"
#include "common.h"
#include "context.h"

#include <math.h>
#include <unistd.h>

#ifndef MOQAE_VERSION_STRING /* set by CMake from project(VERSION) */
#    define MOQAE_VERSION_STRING "0.0.0"
#endif

const char * moqae_version(void) {
    return MOQAE_VERSION_STRING;
}

bool moqae_has_cuda(void) {
    return moqae_cuda_available(); /* false without MOQAE_CUDA (backend-cuda-stub.c) or without a device */
}

const char * moqae_cpu_backend(void) {
    return moqae_cpu_kernels()->name;
}

/* ---- tokenizer wrappers ----------------------------------------------------------------------- */

int moqae_tokenize(const struct moqae_model * m, const char * text, size_t len, bool add_special, bool parse_special,
                   int32_t * tokens, int64_t capacity, int64_t * n_tokens) {
    if (!m || !n_tokens || (!text && len) || (!tokens && capacity) || capacity < 0) {
        return moqae_fail(MOQAE_ERR_INVALID_ARG, "moqae_tokenize: NULL or negative argument");
    }
    return moqae_tokenizer_encode(m->tok, text ? text : "", len, add_special, parse_special, tokens, capacity,
                                  n_tokens);
}

int moqae_token_to_piece(const struct moqae_model * m, int32_t token, bool special, char * buf, size_t capacity,
                         size_t * n_written) {
    if (!m || !n_written || (!buf && capacity)) {
        return moqae_fail(MOQAE_ERR_INVALID_ARG, "moqae_token_to_piece: NULL argument");
    }
    return moqae_tokenizer_piece(m->tok, token, special, buf, capacity, n_written);
}

int moqae_detokenize(const struct moqae_model * m, const int32_t * tokens, int64_t n_tokens, bool special, char * buf,
                     size_t capacity, size_t * n_written) {
    if (!m || !n_written || (!tokens && n_tokens) || n_tokens < 0 || (!buf && capacity)) {
        return moqae_fail(MOQAE_ERR_INVALID_ARG, "moqae_detokenize: NULL or negative argument");
    }
    return moqae_tokenizer_decode(m->tok, tokens, n_tokens, special, buf, capacity, n_written);
}

bool moqae_token_is_eog(const struct moqae_model * m, int32_t token) {
    return m && moqae_tokenizer_is_eog(m->tok, token);
}

/* ---- contexts --------------------------------------------------------------------------------- */

struct moqae_context_params moqae_context_default_params(void) {
    struct moqae_context_params p;
    memset(&p, 0, sizeof(p));
    p.n_ctx     = 0;
    p.n_batch   = 512;
    p.n_threads = 0;
    p.kv        = NULL;
    return p;
}

static int alloc_scratch(struct moqae_context * c) {
    const struct moqae_hparams * hp = &c->model->hp;
    const int64_t                B  = c->n_batch;
    const int64_t                dq = hp->n_head * hp->head_dim, dkv = hp->n_head_kv * hp->head_dim;
    const int64_t max_in = hp->n_ff > dq ? (hp->n_ff > hp->n_embd ? hp->n_ff : hp->n_embd) : (dq > hp->n_embd ? dq : hp->n_embd);
    struct {
        float ** p;
        int64_t  n;
    } bufs[] = {
        { &c->x, B * hp->n_embd },   { &c->xn, B * hp->n_embd },   { &c->tmp, B * hp->n_embd },
        { &c->q, B * dq },           { &c->k, B * dkv },           { &c->v, B * dkv },
        { &c->att, B * dq },         { &c->gate, B * hp->n_ff },   { &c->up, B * hp->n_ff },
        { &c->rope_cs, B * hp->n_rot },
    };
    for (size_t i = 0; i < sizeof(bufs) / sizeof(bufs[0]); i++) {
        *bufs[i].p = moqae_aligned_alloc((size_t) bufs[i].n * sizeof(float));
        if (!*bufs[i].p) {
            return moqae_fail(MOQAE_ERR_OUT_OF_MEMORY, "out of memory for the context's scratch buffers");
        }
    }
    /* worst case over vec_dot types: f32 needs no buffer, bf16/f16 2 bytes, q8_1 36/32 bytes */
    c->act_row_cap = (size_t) max_in * 2 + 64;
    for (int i = 0; i < 2; i++) {
        c->act[i] = moqae_aligned_alloc(c->act_row_cap * (size_t) B);
        if (!c->act[i]) {
            return moqae_fail(MOQAE_ERR_OUT_OF_MEMORY, "out of memory for the context's scratch buffers");
        }
    }
    c->attn_scratch_floats = (moqae_kv_cache_scratch_floats(c->kv, hp->n_head) + 15) / 16 * 16;
    c->attn_scratch = moqae_aligned_alloc((size_t) c->attn_scratch_floats * (size_t) c->n_threads * sizeof(float));
    c->logits_cap   = 1;
    c->logits       = moqae_aligned_alloc((size_t) hp->n_vocab * sizeof(float));
    if (!c->attn_scratch || !c->logits) {
        return moqae_fail(MOQAE_ERR_OUT_OF_MEMORY, "out of memory for the context's scratch buffers");
    }
    return MOQAE_OK;
}

/* Where the KV cache quantizes keys: params.kv_keys, before RoPE by default (docs/KV-CODECS.md measures
 * why); the environment's MOQAE_KV_KEYS=post stores them after RoPE whatever the parameters say (the
 * measurements' switch for tools that have no option). */
static bool keys_pre_rope(int32_t kv_keys) {
    const char * e = getenv("MOQAE_KV_KEYS");
    return kv_keys == MOQAE_KV_KEYS_PRE_ROPE && !(e && !strcmp(e, "post"));
}

/* Test hook: MOQAE_KV_ALIGN=16 pads the CPU ring's records to 16 bytes as the GPU ring's are, so that
 * budgets, demotions and evictions compare exactly between the two paths (tests/tools/cuda-parity.c). */
static int64_t kv_rec_align(void) {
    const char * e = getenv("MOQAE_KV_ALIGN");
    return e && !strcmp(e, "16") ? 16 : 0;
}

int moqae_context_new(struct moqae_model * model, const struct moqae_context_params * params,
                      struct moqae_context ** out) {
    if (!out) {
        return moqae_fail(MOQAE_ERR_INVALID_ARG, "moqae_context_new: out is NULL");
    }
    *out = NULL;
    if (!model) {
        return moqae_fail(MOQAE_ERR_INVALID_ARG, "moqae_context_new: model is NULL");
    }
    struct moqae_context_params p = params ? *params : moqae_context_default_params();
    const struct moqae_hparams * hp = &model->hp;
    if (p.n_ctx < 0 || p.n_batch < 0 || p.n_threads < 0) {
        return moqae_fail(MOQAE_ERR_INVALID_ARG, "n_ctx, n_batch and n_threads must not be negative");
    }
    struct moqae_kv_policy policy;
    if (p.router && p.kv) {
        return moqae_fail(MOQAE_ERR_INVALID_ARG, "give either a KV policy (kv = \"%s\") or a router, not both", p.kv);
    }
    int st = moqae_kv_policy_parse(p.kv ? p.kv : "fp16", &policy);
    if (st) {
        return st;
    }
    const struct moqae_router * router = p.router;
    if (router) {
        if (router->n_embd != hp->n_embd || router->n_layer != hp->n_layer) {
            return moqae_fail(MOQAE_ERR_INVALID_ARG, "the router was loaded for another model");
        }
        if (p.kv_chunk != 0 && p.kv_chunk != router->chunk) {
            return moqae_fail(MOQAE_ERR_INVALID_ARG, "kv_chunk %d differs from the router's chunk size %lld", p.kv_chunk,
                              (long long) router->chunk);
        }
        if (router->chunk > hp->n_ctx_train) {
            return moqae_fail(MOQAE_ERR_INVALID_ARG, "the router's chunks of %lld tokens exceed the model's context of "
                              "%lld", (long long) router->chunk, (long long) hp->n_ctx_train);
        }
        policy.sink  = router->freeze;
        policy.codec = router->expert[router->n_expert - 1];
    }
    if (p.kv_overflow < MOQAE_KV_OVERFLOW_POLICY_ERROR || p.kv_overflow > MOQAE_KV_OVERFLOW_POLICY_DEMOTE) {
        return moqae_fail(MOQAE_ERR_INVALID_ARG, "kv_overflow %d is not a moqae_kv_overflow_policy", p.kv_overflow);
    }
    if (p.kv_keys != MOQAE_KV_KEYS_PRE_ROPE && p.kv_keys != MOQAE_KV_KEYS_POST_ROPE) {
        return moqae_fail(MOQAE_ERR_INVALID_ARG, "kv_keys %d is not a moqae_kv_keys (0: before RoPE, 1: after)",
                          p.kv_keys);
    }
    if (p.kv_chunk != 0 && p.kv_chunk != 32 && p.kv_chunk != 64) {
        return moqae_fail(MOQAE_ERR_INVALID_ARG, "kv_chunk must be 32 or 64, got %d", p.kv_chunk);
    }
    if (p.kv_budget < 0) {
        return moqae_fail(MOQAE_ERR_INVALID_ARG, "kv_budget must not be negative");
    }
    const int64_t n_ctx = p.n_ctx ? p.n_ctx : hp->n_ctx_train;
    if (n_ctx > ((int64_t) 1 << 24)) {
        return moqae_fail(MOQAE_ERR_INVALID_ARG, "n_ctx %lld is too large (max %lld)", (long long) n_ctx,
                          (long long) 1 << 24);
    }
    if (p.kv_bits != 0.0) {
        if (p.kv_budget != 0) {
            return moqae_fail(MOQAE_ERR_INVALID_ARG, "give either kv_budget or kv_bits, not both");
        }
        if (!(p.kv_bits >= 1.0 && p.kv_bits <= 16.0)) {
            return moqae_fail(MOQAE_ERR_INVALID_ARG, "kv_bits must be between 1 and 16 bits per element, got %g",
                              p.kv_bits);
        }
        const double elems = 2.0 * (double) (hp->n_layer * hp->n_head_kv * hp->head_dim) * (double) n_ctx;
        p.kv_budget        = (int64_t) (elems * p.kv_bits / 8.0);
    }
    if (n_ctx > hp->n_ctx_train) {
        moqae_log(MOQAE_LOG_WARN, "n_ctx %lld exceeds the model's training context %lld", (long long) n_ctx,
                  (long long) hp->n_ctx_train);
    }
    int n_threads = p.n_threads;
    if (n_threads == 0) {
        long n    = sysconf(_SC_NPROCESSORS_ONLN);
        n_threads = n > 0 ? (int) (n > 256 ? 256 : n) : 1;
    }
    if (n_threads > 1024) {
        return moqae_fail(MOQAE_ERR_INVALID_ARG, "n_threads %d is too large", n_threads);
    }
    struct moqae_context * c = calloc(1, sizeof(*c));
    if (!c) {
        return moqae_fail(MOQAE_ERR_OUT_OF_MEMORY, "out of memory for the context");
    }
    c->model     = model;
    c->K         = moqae_cpu_kernels();
    c->n_ctx     = n_ctx;
    c->n_batch   = p.n_batch ? (p.n_batch < n_ctx ? p.n_batch : n_ctx) : (n_ctx < 512 ? n_ctx : 512);
    c->n_threads = n_threads;
    c->kv_overflow = p.kv_overflow;
    c->router      = router;
    struct moqae_kv_config kc = { hp->n_layer, hp->n_head_kv, hp->head_dim, n_ctx, c->n_batch,
                                  router ? router->chunk : p.kv_chunk ? p.kv_chunk : 32, policy, p.kv_budget,
                                  (enum moqae_kv_overflow) p.kv_overflow, 0, { 0 }, 1, hp->n_layer, 0.0,
                                  keys_pre_rope(p.kv_keys), hp->n_rot, hp->rope_base, NULL, kv_rec_align(), NULL, 0 };
    if (router) {
        kc.n_expert = router->n_expert;
        for (int64_t e = 0; e < router->n_expert; e++) {
            kc.expert[e] = router->expert[e];
        }
        kc.n_group       = router->n_router;
        kc.group_size    = router->group_size;
        kc.expected_bits = router->expected_bits;
        kc.demote_weight = router->demote_weight;
        c->router_scratch_floats = (hp->n_embd + moqae_router_scratch_floats(router) + 15) / 16 * 16;
        c->votes          = calloc((size_t) (c->n_batch * router->n_router), 1);
        c->router_scratch = moqae_aligned_alloc((size_t) c->router_scratch_floats * (size_t) n_threads * sizeof(float));
        if (!c->votes || !c->router_scratch) {
            moqae_context_free(c);
            return moqae_fail(MOQAE_ERR_OUT_OF_MEMORY, "out of memory for the router's scratch");
        }
    }
    /* issue 7: the last n_gpu layers (all with -ngl >= n_layer) run on the GPU, with their ring there; the
     * first n_layer_cpu on the CPU with theirs. A budget is shared in proportion to the layers. */
    const int64_t n_gpu = model->cuda ? moqae_cuda_model_n_layers(model->cuda) : 0;
    c->n_layer_cpu      = hp->n_layer - n_gpu;
    if (n_gpu > 0) {
        struct moqae_kv_config kg = kc;
        kg.n_layer                = n_gpu;
        kg.layer0                 = c->n_layer_cpu;
        kg.budget                 = kc.budget * n_gpu / hp->n_layer;
        kg.demote_weight          = kc.demote_weight ? kc.demote_weight + c->n_layer_cpu : NULL;
        st                        = moqae_cuda_context_new(model, &kg, &c->cuda);
        if (!st && c->n_layer_cpu == 0) { /* only the logits stay here */
            c->logits_cap = 1;
            c->logits     = moqae_aligned_alloc((size_t) hp->n_vocab * sizeof(float));
            st            = c->logits ? MOQAE_OK : moqae_fail(MOQAE_ERR_OUT_OF_MEMORY, "out of memory for logits");
        }
    }
    if (!st && c->n_layer_cpu > 0) {
        kc.n_layer = c->n_layer_cpu;
        kc.budget  = kc.budget - kc.budget * n_gpu / hp->n_layer;
        st         = moqae_kv_cache_new(&kc, &c->kv);
        if (!st) {
            st = alloc_scratch(c);
        }
    }
    if (!st) {
        st = moqae_threadpool_new(n_threads, &c->tp);
    }
    if (st) {
        moqae_context_free(c);
        return st;
    }
    *out = c;
    return MOQAE_OK;
}

void moqae_context_free(struct moqae_context * c) {
    if (!c) {
        return;
    }
    moqae_threadpool_free(c->tp);
    moqae_kv_cache_free(c->kv);
    moqae_cuda_context_free(c->cuda);
    float * bufs[] = { c->x, c->xn, c->tmp, c->q, c->k, c->v, c->att, c->gate, c->up, c->rope_cs, c->attn_scratch,
                       c->logits };
    for (size_t i = 0; i < sizeof(bufs) / sizeof(bufs[0]); i++) {
        free(bufs[i]);
    }
    free(c->act[0]);
    free(c->act[1]);
    free(c->votes);
    free(c->router_scratch);
    free(c);
}

int moqae_context_reset(struct moqae_context * c) {
    if (!c) {
        return moqae_fail(MOQAE_ERR_INVALID_ARG, "moqae_context_reset: ctx is NULL");
    }
    if (c->cuda) {
        moqae_cuda_context_clear(c->cuda);
    }
    if (c->kv) {
        moqae_kv_cache_clear(c->kv);
    }
    c->n_logits = 0;
    c->broken   = false;
    return MOQAE_OK;
}

int64_t moqae_context_n_past(const struct moqae_context * c) {
    return !c ? 0 : c->kv ? moqae_kv_cache_n_tokens(c->kv) : moqae_cuda_n_tokens(c->cuda);
}

int64_t moqae_context_n_ctx(const struct moqae_context * c) {
    return c ? c->n_ctx : 0;
}

void moqae_context_interrupt(struct moqae_context * c) {
    if (c) {
        atomic_store(&c->interrupt, true);
    }
}

int moqae_decode(struct moqae_context * c, const int32_t * tokens, int64_t n_tokens, int64_t n_logits) {
    if (!c || (!tokens && n_tokens)) {
        return moqae_fail(MOQAE_ERR_INVALID_ARG, "moqae_decode: NULL argument");
    }
    if (n_tokens < 0 || n_logits < 0 || n_logits > n_tokens) {
        return moqae_fail(MOQAE_ERR_INVALID_ARG, "moqae_decode: need 0 <= n_logits (%lld) <= n_tokens (%lld)",
                          (long long) n_logits, (long long) n_tokens);
    }
    atomic_store(&c->interrupt, false);
    const int64_t n_vocab = c->model->hp.n_vocab;
    for (int64_t i = 0; i < n_tokens; i++) {
        if (tokens[i] < 0 || tokens[i] >= n_vocab) {
            return moqae_fail(MOQAE_ERR_INVALID_TOKEN, "token %lld of %lld has id %d, outside the vocabulary [0, %lld)",
                              (long long) i, (long long) n_tokens, tokens[i], (long long) n_vocab);
        }
    }
    const int64_t n_past = moqae_context_n_past(c);
    if (n_past + n_tokens > c->n_ctx && c->kv_overflow != MOQAE_KV_OVERFLOW_POLICY_SHIFT) {
        return moqae_fail(MOQAE_ERR_CONTEXT_FULL,
                          "context full: %lld tokens already in the context + %lld new > n_ctx %lld", (long long) n_past,
                          (long long) n_tokens, (long long) c->n_ctx);
    }
    if (n_logits > c->logits_cap) {
        float * l = moqae_aligned_alloc((size_t) n_logits * (size_t) n_vocab * sizeof(float));
        if (!l) {
            return moqae_fail(MOQAE_ERR_OUT_OF_MEMORY, "out of memory for %lld rows of logits", (long long) n_logits);
        }
        free(c->logits);
        c->logits     = l;
        c->logits_cap = n_logits;
    }
    c->n_logits          = 0;
    const int64_t first_out = n_tokens - n_logits; /* tokens from here on keep logits */
    for (int64_t i0 = 0; i0 < n_tokens; i0 += c->n_batch) {
        if (atomic_load(&c->interrupt)) {
            return moqae_fail(MOQAE_ERR_INTERRUPTED, "interrupted after %lld of %lld tokens", (long long) i0,
                              (long long) n_tokens);
        }
        const int64_t n   = n_tokens - i0 < c->n_batch ? n_tokens - i0 : c->n_batch;
        const int64_t out = i0 + n > first_out ? i0 + n - (first_out > i0 ? first_out : i0) : 0;
        c->job_tokens     = tokens + i0;
        c->job_n          = n;
        c->job_pos0       = moqae_context_n_past(c);
        c->job_n_out      = out;
        c->job_logits     = c->logits + c->n_logits * n_vocab;
        if (c->broken) {
            return moqae_fail(MOQAE_ERR_INTERNAL, "an earlier micro-batch was stored by the CPU's layers but not the "
                                                  "GPU's (partial offload); reset the context first");
        }
        /* the CPU's layers (they route too), then the GPU's from their output; or the GPU alone, routed here */
        int st = MOQAE_OK;
        if (c->kv) {
            st = moqae_graph_forward(c);
        } else {
            moqae_graph_votes(c); /* the GPU ring takes the chunk decisions from the host's votes */
        }
        if (!st && c->cuda) {
            const struct moqae_cuda_job job = { c->job_tokens, n, out, c->job_logits, c->router ? c->votes : NULL,
                                                c->kv ? c->x : NULL };
            st = moqae_cuda_forward(c->cuda, &job);
            if (st && c->kv) {
                c->broken = true;
                return moqae_fail_prefix(st, "the GPU's layers (partial offload; reset the context before decoding "
                                             "again): ");
            }
        }
        if (st) {
            return st;
        }
        c->n_logits += out;
    }
    return MOQAE_OK;
}

int moqae_context_logits(const struct moqae_context * c, int64_t i, const float ** out) {
    if (!c || !out) {
        return moqae_fail(MOQAE_ERR_INVALID_ARG, "moqae_context_logits: NULL argument");
    }
    if (i < 0 || i >= c->n_logits) {
        *out = NULL;
        return moqae_fail(MOQAE_ERR_INVALID_ARG, "logits row %lld requested, the last decode kept %lld", (long long) i,
                          (long long) c->n_logits);
    }
    *out = c->logits + i * c->model->hp.n_vocab;
    return MOQAE_OK;
}

int moqae_context_kv_stats(const struct moqae_context * c, struct moqae_kv_stats * out) {
    if (!c || !out) {
        return moqae_fail(MOQAE_ERR_INVALID_ARG, "moqae_context_kv_stats: NULL argument");
    }
    if (c->cuda && c->kv) { /* partial offload: both rings hold the same tokens, each its own layers */
        struct moqae_kv_stats g;
        const double          L = (double) c->model->hp.n_layer, lc = (double) c->n_layer_cpu;
        moqae_kv_cache_stats(c->kv, out);
        moqae_cuda_kv_stats(c->cuda, &g);
        const double elems = 2.0 * L * (double) (c->model->hp.n_head_kv * c->model->hp.head_dim) * (double) out->n_tokens;
        for (int e = 0; e < 4; e++) {
            out->n_records[e] += g.n_records[e];
            out->n_chunks[e] = (out->n_records[e] + c->model->hp.n_layer / 2) / c->model->hp.n_layer;
        }
        out->nominal_bits   = (out->nominal_bits * lc + g.nominal_bits * (L - lc)) / L;
        out->bytes_used    += g.bytes_used;
        out->bytes_reserved += g.bytes_reserved;
        out->effective_bits = elems > 0.0 ? (double) out->bytes_used * 8.0 / elems : 0.0;
    } else if (c->cuda) {
        moqae_cuda_kv_stats(c->cuda, out);
    } else {
        moqae_kv_cache_stats(c->kv, out);
    }
    return MOQAE_OK;
}

/* ---- perplexity ------------------------------------------------------------------------------- */

struct moqae_ppl_params moqae_ppl_default_params(void) {
    struct moqae_ppl_params p;
    memset(&p, 0, sizeof(p));
    return p;
}

/* -log softmax(logits)[target], computed in double like llama.cpp's perplexity. */
static double token_nll(const float * logits, int64_t n_vocab, int32_t target) {
    float mx = logits[0];
    for (int64_t i = 1; i < n_vocab; i++) {
        mx = logits[i] > mx ? logits[i] : mx;
    }
    double sum = 0.0;
    for (int64_t i = 0; i < n_vocab; i++) {
        sum += exp((double) (logits[i] - mx));
    }
    return -((double) (logits[target] - mx) - log(sum));
}

int moqae_perplexity(struct moqae_context * c, const int32_t * tokens, int64_t n_tokens,
                     const struct moqae_ppl_params * params, struct moqae_ppl_result * out) {
    if (!c || !tokens || !out) {
        return moqae_fail(MOQAE_ERR_INVALID_ARG, "moqae_perplexity: NULL argument");
    }
    memset(out, 0, sizeof(*out));
    struct moqae_ppl_params p = params ? *params : moqae_ppl_default_params();
    const int64_t n_ctx = p.n_ctx ? p.n_ctx : c->n_ctx;
    if (n_ctx < 2 || n_ctx > c->n_ctx) {
        return moqae_fail(MOQAE_ERR_INVALID_ARG, "perplexity window %lld must be in [2, the context's n_ctx %lld]",
                          (long long) n_ctx, (long long) c->n_ctx);
    }
    const int64_t n_max = n_tokens / n_ctx;
    if (n_max < 1) {
        return moqae_fail(MOQAE_ERR_INVALID_ARG, "the text has %lld tokens, fewer than one window of %lld",
                          (long long) n_tokens, (long long) n_ctx);
    }
    const int64_t n_chunks = p.n_chunks > 0 && p.n_chunks < n_max ? p.n_chunks : n_max;
    const int64_t first    = n_ctx / 2;
    const int64_t n_vocab  = c->model->hp.n_vocab;
    const bool    add_bos  = c->model->info.add_bos && c->model->info.token_bos >= 0;
    int32_t *     win      = malloc((size_t) n_ctx * sizeof(int32_t));
    if (!win) {
        return moqae_fail(MOQAE_ERR_OUT_OF_MEMORY, "out of memory");
    }
    double  nll = 0.0, nll2 = 0.0;
    int64_t count = 0;
    int     st    = MOQAE_OK;
    for (int64_t ci = 0; ci < n_chunks; ci++) {
        memcpy(win, tokens + ci * n_ctx, (size_t) n_ctx * sizeof(int32_t));
        if (add_bos) {
            win[0] = c->model->info.token_bos;
        }
        moqae_context_reset(c);
        /* logits for positions first .. n_ctx-2 predict tokens first+1 .. n_ctx-1 */
        const int64_t n_keep = n_ctx - first;
        if ((st = moqae_decode(c, win, n_ctx, n_keep))) {
            break;
        }
        for (int64_t j = first; j < n_ctx - 1; j++) {
            const double v = token_nll(c->logits + (j - first) * n_vocab, n_vocab, tokens[ci * n_ctx + j + 1]);
            nll += v;
            nll2 += v * v;
            count++;
        }
        out->n_chunks = ci + 1;
        if (p.progress && !p.progress(ci, n_chunks, exp(nll / (double) count), p.user_data)) {
            break;
        }
    }
    moqae_context_reset(c);
    free(win);
    if (st) {
        return st;
    }
    const double mean = nll / (double) count;
    double       var  = nll2 / (double) count - mean * mean;
    out->nll          = mean;
    out->ppl          = exp(mean);
    out->ppl_err      = var > 0 && count > 1 ? out->ppl * sqrt(var / (double) (count - 1)) : 0.0;
    out->n_scored     = count;
    return MOQAE_OK;
}
