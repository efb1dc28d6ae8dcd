/*
 * cuda/backend.cu — backend-cuda.h: the weights uploaded once ("malloc and point": one device
 * allocation sized from a table of the tensors), a context's device memory (one allocation: the
 * mixed-bit ring, the f16 staging window, scratch), and the llama forward of one micro-batch as a
 * sequence of launches on the context's stream (graph.c's order). Decode steps (one token, one
 * logits row) replay a CUDA graph captured once: every kernel reads the step's positions from the
 * device-side moqae_cuda_dyn, so the same graph serves every step. The chunk table (position,
 * codec, offset of each completed chunk) lives on the host and is mirrored to the device per
 * micro-batch: the codec of a chunk is an input, decided on the host (fixed policy now, the router
 * later). Not here: partial offload, overflow shift/demote on the GPU, chunk size 64.
 */
#include "attention.cuh"
#include "kv-codec.cuh"
#include "matmul.cuh"
#include "ops.cuh"

extern "C" {
#include "../backend-cuda.h"
#include "../model.h"
}

#include <algorithm>
#include <math.h>

#define LOGITS_ROWS 64                 /* logits rows computed per piece (bounds the device buffer) */
#define MEM_MARGIN  ((size_t) 256 << 20) /* device memory left free for the CUDA context and kernels */

static double gib(double bytes) {
    return bytes / 1073741824.0;
}

bool moqae_cuda_available(void) {
    static int state = -1; /* -1 unknown, 0 no, 1 yes; computed once (a race only repeats the query) */
    if (state < 0) {
        int n = 0;
        state = cudaGetDeviceCount(&n) == cudaSuccess && n > 0 ? 1 : 0;
        if (!state) {
            cudaGetLastError(); /* clear the sticky "no device" error */
        }
    }
    return state == 1;
}

/* ================================================================================================
 * Model
 * ================================================================================================ */

struct cuda_layer {
    const float *            attn_norm, *ffn_norm;
    struct moqae_cuda_weight wq, wk, wv, wo, w_gate, w_up, w_down;
};

struct moqae_cuda_model {
    const struct moqae_model * m;
    struct moqae_cuda_weight   tok_embd, output, output_norm;
    struct cuda_layer *        layers;
    uint8_t *                  buf;   /* the one device allocation */
    size_t                     bytes;
    int                        n_sm;
};

/* Walk every weight of m: fn(host weight, device weight) with a running offset. */
template <typename F> static void for_each_weight(const struct moqae_model * m, struct moqae_cuda_model * cm, F fn) {
    fn(&m->tok_embd, &cm->tok_embd);
    fn(&m->output_norm, &cm->output_norm);
    if (m->output.data != m->tok_embd.data) {
        fn(&m->output, &cm->output);
    }
    for (int64_t il = 0; il < m->hp.n_layer; il++) {
        const struct moqae_layer * L  = &m->layers[il];
        struct cuda_layer *        CL = &cm->layers[il];
        struct moqae_cuda_weight   an = {}, fnw = {};
        fn(&L->attn_norm, &an);
        fn(&L->ffn_norm, &fnw);
        CL->attn_norm = (const float *) an.data;
        CL->ffn_norm  = (const float *) fnw.data;
        fn(&L->wq, &CL->wq), fn(&L->wk, &CL->wk), fn(&L->wv, &CL->wv), fn(&L->wo, &CL->wo);
        fn(&L->w_gate, &CL->w_gate), fn(&L->w_up, &CL->w_up), fn(&L->w_down, &CL->w_down);
    }
}

static size_t weight_bytes(const struct moqae_weight * w) {
    return (size_t) w->n_rows * w->row_bytes;
}

int moqae_cuda_model_new(const struct moqae_model * m, int n_gpu_layers, struct moqae_cuda_model ** out) {
    *out = NULL;
    if (!moqae_cuda_available()) {
        return moqae_fail(MOQAE_ERR_UNSUPPORTED, "no CUDA device");
    }
    if (n_gpu_layers < m->hp.n_layer) {
        return moqae_fail(MOQAE_ERR_UNSUPPORTED,
                          "n_gpu_layers = %d: partial offload is not supported yet (issue 7); use 0 (CPU) or >= %lld "
                          "(every layer, e.g. -ngl 99)",
                          n_gpu_layers, (long long) m->hp.n_layer);
    }
    struct moqae_cuda_model * cm = (struct moqae_cuda_model *) calloc(1, sizeof(*cm));
    if (!cm || !(cm->layers = (struct cuda_layer *) calloc((size_t) m->hp.n_layer, sizeof(struct cuda_layer)))) {
        free(cm);
        return moqae_fail(MOQAE_ERR_OUT_OF_MEMORY, "out of memory");
    }
    cm->m = m;
    /* table pass: sizes and types */
    size_t       total = 0;
    const char * bad   = NULL;
    for_each_weight(m, cm, [&](const struct moqae_weight * w, struct moqae_cuda_weight * d) {
        if (w->n_rows > 1 && !moqae_cuda_type_supported(w->type)) {
            bad = moqae_type_name(w->type);
        }
        total += (weight_bytes(w) + 255) / 256 * 256;
        (void) d;
    });
    if (bad) {
        moqae_cuda_model_free(cm);
        return moqae_fail(MOQAE_ERR_UNSUPPORTED, "CUDA: weight type %s has no GPU kernels (F32, F16, Q4_0, Q4_1, Q8_0)",
                          bad);
    }
    size_t free_b = 0, total_b = 0;
    int    dev    = 0;
    cudaDeviceProp prop;
    if (cudaGetDevice(&dev) != cudaSuccess || cudaGetDeviceProperties(&prop, dev) != cudaSuccess ||
        cudaMemGetInfo(&free_b, &total_b) != cudaSuccess) {
        moqae_cuda_model_free(cm);
        return moqae_fail(MOQAE_ERR_INTERNAL, "CUDA: cannot query the device: %s", cudaGetErrorString(cudaGetLastError()));
    }
    cm->n_sm = prop.multiProcessorCount;
    if (total + MEM_MARGIN > free_b) {
        moqae_cuda_model_free(cm);
        return moqae_fail(MOQAE_ERR_OUT_OF_MEMORY,
                          "the model does not fit on the GPU: its weights need %zu bytes (%.2f GiB), the device has %zu "
                          "bytes (%.2f GiB) free",
                          total, gib((double) total), free_b, gib((double) free_b));
    }
    cudaError_t err = cudaMalloc((void **) &cm->buf, total);
    if (err != cudaSuccess) {
        cudaGetLastError();
        cm->buf = NULL;
        moqae_cuda_model_free(cm);
        return moqae_fail(MOQAE_ERR_OUT_OF_MEMORY, "the model does not fit on the GPU: cudaMalloc of %zu bytes: %s", total,
                          cudaGetErrorString(err));
    }
    cm->bytes  = total;
    size_t off = 0;
    err        = cudaSuccess;
    for_each_weight(m, cm, [&](const struct moqae_weight * w, struct moqae_cuda_weight * d) {
        d->type      = w->type;
        d->n_cols    = w->n_cols;
        d->n_rows    = w->n_rows;
        d->row_bytes = w->row_bytes;
        d->data      = cm->buf + off;
        if (err == cudaSuccess) {
            err = cudaMemcpy(cm->buf + off, w->data, weight_bytes(w), cudaMemcpyHostToDevice);
        }
        off += (weight_bytes(w) + 255) / 256 * 256;
    });
    if (m->output.data == m->tok_embd.data) {
        cm->output = cm->tok_embd; /* tied */
    }
    if (err != cudaSuccess) {
        moqae_cuda_model_free(cm);
        return moqae_fail(MOQAE_ERR_INTERNAL, "CUDA: uploading the weights: %s", cudaGetErrorString(err));
    }
    moqae_log(MOQAE_LOG_INFO, "cuda: %s, %d SMs: uploaded %lld layers, %.2f GiB of weights", prop.name, cm->n_sm,
              (long long) m->hp.n_layer, gib((double) total));
    *out = cm;
    return MOQAE_OK;
}

void moqae_cuda_model_free(struct moqae_cuda_model * cm) {
    if (!cm) {
        return;
    }
    if (cm->buf) {
        cudaFree(cm->buf);
    }
    free(cm->layers);
    free(cm);
}

/* ================================================================================================
 * Context
 * ================================================================================================ */

struct moqae_cuda_context {
    const struct moqae_model *      m;
    const struct moqae_cuda_model * cm;
    struct moqae_kv_config          cfg;
    struct moqae_cuda_ring_geom     geom;
    cudaStream_t                    stream;
    float                           theta_scale;

    /* device: one allocation */
    uint8_t *                 dbuf;
    size_t                    arena_bytes, stage_bytes, scratch_bytes;
    uint8_t *                 arena;  /* [n_layer][layer_cap]                 */
    uint16_t *                stage_k, *stage_v; /* [n_layer][n_head_kv][stage_rows][D] f16 */
    float *                   x, *xn, *q, *k, *v, *att, *gate, *up, *logits, *part;
    int32_t *                 ids;
    void *                    xq;     /* one token's 8-bit activations for the integer mat-vec */
    struct moqae_cuda_dyn *   dyn;
    struct moqae_cuda_chunk * table;

    /* host (pinned) */
    struct moqae_cuda_chunk * h_table;
    struct moqae_cuda_dyn *   h_dyn;
    int32_t *                 h_ids;

    size_t  layer_cap, used;
    int64_t n_chunks, cap_chunks, n_tokens;
    int     n_split_decode, max_split_prefill;
    int     raw_bytes; /* largest record pair the policy writes (attention copy buffers) */

    cudaGraphExec_t graph;
    int             graph_state; /* 0: not yet (run eagerly once), 1: eager done, 2: captured, -1: off */
};

static size_t chunk_bytes(const struct moqae_cuda_context * cc, int codec) {
    return (size_t) cc->geom.n_head_kv * (size_t) (cc->geom.k_pad[codec] + cc->geom.v_pad[codec]);
}

static int policy_codec(const struct moqae_cuda_context * cc, int64_t index) {
    return cc->cfg.policy.sink && index == 0 ? MOQAE_KV_CODEC_F16 : (int) cc->cfg.policy.codec;
}

void moqae_cuda_context_free(struct moqae_cuda_context * cc) {
    if (!cc) {
        return;
    }
    if (cc->graph) {
        cudaGraphExecDestroy(cc->graph);
    }
    if (cc->dbuf) {
        cudaFree(cc->dbuf);
    }
    if (cc->h_table) {
        cudaFreeHost(cc->h_table);
    }
    if (cc->h_dyn) {
        cudaFreeHost(cc->h_dyn);
    }
    if (cc->h_ids) {
        cudaFreeHost(cc->h_ids);
    }
    if (cc->stream) {
        cudaStreamDestroy(cc->stream);
    }
    free(cc);
}

static int context_alloc(struct moqae_cuda_context * cc) {
    const struct moqae_hparams * hp = &cc->m->hp;
    const int64_t B = cc->cfg.n_batch, E = hp->n_embd, dq = hp->n_head * hp->head_dim, dkv = hp->n_head_kv * hp->head_dim;
    const size_t  part = std::max(moqae_cuda_attn_part_floats(&cc->geom, 1, hp->n_head, cc->n_split_decode),
                                  moqae_cuda_attn_part_floats(&cc->geom, B, hp->n_head, cc->max_split_prefill));
    struct {
        void ** p;
        size_t  bytes;
    } t[] = {
        { (void **) &cc->x, (size_t) (B * E) * 4 },        { (void **) &cc->xn, (size_t) (B * E) * 4 },
        { (void **) &cc->q, (size_t) (B * dq) * 4 },       { (void **) &cc->att, (size_t) (B * dq) * 4 },
        { (void **) &cc->k, (size_t) (B * dkv) * 4 },      { (void **) &cc->v, (size_t) (B * dkv) * 4 },
        { (void **) &cc->gate, (size_t) (B * hp->n_ff) * 4 }, { (void **) &cc->up, (size_t) (B * hp->n_ff) * 4 },
        { (void **) &cc->logits, (size_t) (LOGITS_ROWS * hp->n_vocab) * 4 }, { (void **) &cc->part, part * 4 },
        { (void **) &cc->ids, (size_t) B * 4 },             { (void **) &cc->dyn, sizeof(struct moqae_cuda_dyn) },
        { (void **) &cc->xq, moqae_cuda_matmul_scratch_bytes(std::max({ E, dq, hp->n_ff })) },
        { (void **) &cc->table, (size_t) cc->cap_chunks * sizeof(struct moqae_cuda_chunk) },
    };
    size_t scratch = 0;
    for (auto & e : t) {
        scratch += (e.bytes + 255) / 256 * 256;
    }
    const size_t stage_rows = (size_t) cc->geom.stage_rows;
    cc->stage_bytes   = 2 * (size_t) hp->n_layer * (size_t) hp->n_head_kv * stage_rows * (size_t) hp->head_dim * 2;
    cc->arena_bytes   = cc->layer_cap * (size_t) hp->n_layer;
    cc->scratch_bytes = scratch;
    const size_t total = cc->arena_bytes + cc->stage_bytes + scratch;
    size_t free_b = 0, total_b = 0;
    MOQAE_CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
    /* MOQAE_CUDA_MEMORY_LIMIT=24G: behave as a card of that size would (what fits on a 24 GiB GPU) */
    const char * lim = getenv("MOQAE_CUDA_MEMORY_LIMIT");
    if (lim && *lim) {
        char *       end = NULL;
        const double x   = strtod(lim, &end);
        const double mul = end && (*end == 'G' || *end == 'g') ? 1073741824.0 : end && (*end == 'M' || *end == 'm') ? 1048576.0 : 1.0;
        const size_t cap = (size_t) (x * mul);
        const size_t in_use = total_b - free_b;
        total_b = cap < total_b ? cap : total_b;
        free_b  = total_b > in_use ? total_b - in_use : 0;
    }
    if (total + MEM_MARGIN > free_b) {
        return moqae_fail(MOQAE_ERR_OUT_OF_MEMORY,
                          "the KV cache does not fit on the GPU: n_ctx %lld with --kv %s%s needs %zu bytes (%.2f GiB: ring "
                          "%.2f GiB + staging %.2f GiB + scratch %.2f GiB); the device has %zu bytes (%.2f GiB) free of "
                          "%.2f GiB after the weights (%.2f GiB). Use a lower-bit --kv policy, a smaller -c or --kv-budget",
                          (long long) cc->cfg.n_ctx, cc->cfg.policy.sink ? "sink+" : "",
                          moqae_kv_codec_name(cc->cfg.policy.codec), total, gib((double) total),
                          gib((double) cc->arena_bytes), gib((double) cc->stage_bytes), gib((double) scratch), free_b,
                          gib((double) free_b), gib((double) total_b), gib((double) cc->cm->bytes));
    }
    cudaError_t err = cudaMalloc((void **) &cc->dbuf, total);
    if (err != cudaSuccess) {
        cudaGetLastError();
        cc->dbuf = NULL;
        return moqae_fail(MOQAE_ERR_OUT_OF_MEMORY, "the KV cache does not fit on the GPU: cudaMalloc of %zu bytes (%.2f GiB): %s",
                          total, gib((double) total), cudaGetErrorString(err));
    }
    cc->arena   = cc->dbuf;
    cc->stage_k = (uint16_t *) (cc->dbuf + cc->arena_bytes);
    cc->stage_v = (uint16_t *) (cc->dbuf + cc->arena_bytes + cc->stage_bytes / 2);
    size_t off  = cc->arena_bytes + cc->stage_bytes;
    for (auto & e : t) {
        *e.p = cc->dbuf + off;
        off += (e.bytes + 255) / 256 * 256;
    }
    /* staging rows beyond what was written must read as finite numbers (they are masked, and a
     * masked weight 0 times a NaN would still poison P V) */
    MOQAE_CUDA_CHECK(cudaMemset(cc->stage_k, 0, cc->stage_bytes));
    MOQAE_CUDA_CHECK(cudaMallocHost((void **) &cc->h_table, (size_t) cc->cap_chunks * sizeof(struct moqae_cuda_chunk)));
    MOQAE_CUDA_CHECK(cudaMallocHost((void **) &cc->h_dyn, sizeof(struct moqae_cuda_dyn)));
    MOQAE_CUDA_CHECK(cudaMallocHost((void **) &cc->h_ids, (size_t) B * 4));
    moqae_log(MOQAE_LOG_INFO,
              "cuda: context n_ctx %lld, kv %s: ring %.3f GiB, staging %.3f GiB, scratch %.3f GiB; weights %.3f GiB",
              (long long) cc->cfg.n_ctx, moqae_kv_codec_name(cc->cfg.policy.codec), gib((double) cc->arena_bytes),
              gib((double) cc->stage_bytes), gib((double) scratch), gib((double) cc->cm->bytes));
    return MOQAE_OK;
}

int moqae_cuda_context_new(const struct moqae_model * m, const struct moqae_kv_config * cfg,
                           struct moqae_cuda_context ** out) {
    *out = NULL;
    if (!m->cuda) {
        return moqae_fail(MOQAE_ERR_INVALID_ARG, "CUDA context on a model without GPU weights");
    }
    if (cfg->overflow != MOQAE_KV_OVERFLOW_ERROR) {
        return moqae_fail(MOQAE_ERR_UNSUPPORTED,
                          "--kv-overflow shift/demote is not supported on the GPU yet (issue 7): use error, or -ngl 0");
    }
    if (!moqae_cuda_attn_supported((int) cfg->head_dim, (int) cfg->chunk)) {
        return moqae_fail(MOQAE_ERR_UNSUPPORTED,
                          "the GPU attention supports head_dim 64 or 128 with KV chunks of 32 (got head_dim %lld, chunk "
                          "%lld); use -ngl 0",
                          (long long) cfg->head_dim, (long long) cfg->chunk);
    }
    if (cfg->n_batch > 65535) {
        return moqae_fail(MOQAE_ERR_UNSUPPORTED, "the GPU path takes micro-batches of at most 65535 tokens");
    }
    struct moqae_kv_shape shape = { cfg->chunk, cfg->head_dim, MOQAE_KV_V_GROUP };
    if (cfg->head_dim % MOQAE_KV_V_GROUP != 0) {
        shape.v_group = cfg->head_dim;
    }
    int st = moqae_kv_shape_check(cfg->policy.codec, &shape);
    if (st) {
        return st;
    }
    struct moqae_cuda_context * cc = (struct moqae_cuda_context *) calloc(1, sizeof(*cc));
    if (!cc) {
        return moqae_fail(MOQAE_ERR_OUT_OF_MEMORY, "out of memory");
    }
    cc->m   = m;
    cc->cm  = m->cuda;
    cc->cfg = *cfg;
    struct moqae_cuda_ring_geom * g = &cc->geom;
    g->chunk      = (int) cfg->chunk;
    g->head_dim   = (int) cfg->head_dim;
    g->v_group    = (int) shape.v_group;
    g->n_head_kv  = (int) cfg->n_head_kv;
    g->stage_rows = cfg->chunk + cfg->n_batch;
    for (int c = 0; c < 4; c++) {
        g->k_bytes[c] = (long long) moqae_kv_k_bytes((enum moqae_kv_codec) c, &shape);
        g->v_bytes[c] = (long long) moqae_kv_v_bytes((enum moqae_kv_codec) c, &shape);
        g->k_pad[c]   = (long long) moqae_cuda_align((size_t) g->k_bytes[c]);
        g->v_pad[c]   = (long long) moqae_cuda_align((size_t) g->v_bytes[c]);
    }
    cc->theta_scale = powf(m->hp.rope_base, -2.0f / (float) m->hp.n_rot);
    {
        const int pc  = (int) cfg->policy.codec;
        cc->raw_bytes = (int) (g->k_pad[pc] + g->v_pad[pc]);
        if (cfg->policy.sink) { /* TODO(issue 7): with the router, any codec: FP16 is the largest */
            cc->raw_bytes = std::max(cc->raw_bytes, (int) (g->k_pad[0] + g->v_pad[0]));
        }
    }
    cc->cap_chunks  = cfg->n_ctx / cfg->chunk + 1;
    if (cfg->budget > 0) {
        cc->layer_cap = (size_t) cfg->budget / (size_t) cfg->n_layer;
    } else {
        const int64_t n_full = cfg->n_ctx / cfg->chunk;
        const bool    sink   = n_full > 0 && cfg->policy.sink;
        cc->layer_cap = (sink ? chunk_bytes(cc, MOQAE_KV_CODEC_F16) : 0) +
                        (size_t) (n_full - (sink ? 1 : 0)) * chunk_bytes(cc, cfg->policy.codec);
    }
    const int64_t max_tiles = cc->cap_chunks + 1;
    const int     n_sm      = m->cuda->n_sm > 0 ? m->cuda->n_sm : 1;
    /* decode: enough blocks to keep every SM busy with several tiles in flight (6 blocks of 34 KiB
     * each per SM), but no split shorter than 8 tiles of the longest context */
    cc->n_split_decode    = (int) std::max<int64_t>(1, std::min<int64_t>((6 * n_sm + g->n_head_kv - 1) / g->n_head_kv,
                                                                         std::max<int64_t>(1, max_tiles / 8)));
    cc->max_split_prefill = 4;
    if ((st = cudaStreamCreateWithFlags(&cc->stream, cudaStreamNonBlocking)) != cudaSuccess) {
        cc->stream = NULL;
        moqae_cuda_context_free(cc);
        return moqae_fail(MOQAE_ERR_INTERNAL, "CUDA: cudaStreamCreate: %s", cudaGetErrorString((cudaError_t) st));
    }
    if ((st = context_alloc(cc))) {
        moqae_cuda_context_free(cc);
        return st;
    }
    *out = cc;
    return MOQAE_OK;
}

void moqae_cuda_context_clear(struct moqae_cuda_context * cc) {
    cc->n_tokens = 0;
    cc->n_chunks = 0;
    cc->used     = 0;
}

int64_t moqae_cuda_n_tokens(const struct moqae_cuda_context * cc) {
    return cc->n_tokens;
}

void moqae_cuda_kv_stats(const struct moqae_cuda_context * cc, struct moqae_kv_stats * out) {
    memset(out, 0, sizeof(*out));
    const struct moqae_hparams * hp = &cc->m->hp;
    const int64_t C = cc->cfg.chunk;
    const double  per_token_elems = 2.0 * (double) (hp->n_layer * hp->n_head_kv * hp->head_dim);
    double        code_bits = 0.0;
    for (int64_t i = 0; i < cc->n_chunks; i++) {
        out->n_chunks[cc->h_table[i].codec]++;
        code_bits += (double) moqae_kv_codec_bits((enum moqae_kv_codec) cc->h_table[i].codec) * (double) C;
    }
    const int64_t resid = cc->n_tokens - cc->n_tokens / C * C; /* the f16 residual window */
    const int64_t held  = cc->n_chunks * C + resid;
    code_bits += 16.0 * (double) resid;
    out->n_tokens       = held;
    out->n_ctx          = cc->cfg.n_ctx;
    out->bytes_used     = (int64_t) ((double) cc->used * (double) hp->n_layer + (double) resid * per_token_elems * 2.0);
    out->bytes_reserved = (int64_t) (cc->arena_bytes + cc->stage_bytes);
    if (held > 0) {
        out->nominal_bits   = code_bits / (double) held;
        out->effective_bits = (double) out->bytes_used * 8.0 / ((double) held * per_token_elems);
    }
}

/* ================================================================================================
 * Forward
 * ================================================================================================ */

/* Every layer for n_tok tokens (ids and dyn already on the device), then the final norm and the
 * output rows of the last n_out tokens, rows [r0, r0 + n_rows) of them, into cc->logits. */
static int run_layers(struct moqae_cuda_context * cc, int64_t n_tok, int n_split, int max_enc) {
    const struct moqae_hparams *    hp = &cc->m->hp;
    const struct moqae_cuda_model * cm = cc->cm;
    cudaStream_t                    s  = cc->stream;
    const int64_t                   E = hp->n_embd, D = hp->head_dim, nkv = hp->n_head_kv;
    const size_t stage_layer = (size_t) nkv * (size_t) cc->geom.stage_rows * (size_t) D;

    MOQAE_TRY(moqae_cuda_get_rows(&cm->tok_embd, cc->ids, n_tok, cc->x, s));
    for (int64_t il = 0; il < hp->n_layer; il++) {
        const struct cuda_layer * L = &cm->layers[il];
        MOQAE_TRY(moqae_cuda_rms_norm(cc->x, L->attn_norm, hp->rms_eps, E, n_tok, cc->xn, s));
        MOQAE_TRY(moqae_cuda_matmul(&L->wq, cc->xn, n_tok, cc->q, L->wq.n_rows, false, cc->xq, s));
        MOQAE_TRY(moqae_cuda_matmul(&L->wk, cc->xn, n_tok, cc->k, L->wk.n_rows, false, cc->xq, s));
        MOQAE_TRY(moqae_cuda_matmul(&L->wv, cc->xn, n_tok, cc->v, L->wv.n_rows, false, cc->xq, s));
        MOQAE_TRY(moqae_cuda_rope(cc->q, cc->k, n_tok, hp->n_head, nkv, D, hp->n_rot, cc->theta_scale, cc->dyn, s));
        uint16_t * sk = cc->stage_k + (size_t) il * stage_layer, *sv = cc->stage_v + (size_t) il * stage_layer;
        uint8_t *  ar = cc->arena + (size_t) il * cc->layer_cap;
        MOQAE_TRY(moqae_cuda_kv_store(&cc->geom, sk, sv, cc->k, cc->v, n_tok, cc->dyn, s));
        MOQAE_TRY(moqae_cuda_kv_encode(&cc->geom, sk, sv, ar, cc->table, max_enc, cc->dyn, s));
        struct moqae_cuda_attn_args a;
        a.q = cc->q, a.out = cc->att, a.part = cc->part, a.arena = ar, a.stage_k = sk, a.stage_v = sv;
        a.table = cc->table, a.dyn = cc->dyn, a.n_tok = (int) n_tok, a.n_head = (int) hp->n_head;
        a.n_split = n_split, a.scale = 1.0f / sqrtf((float) D), a.raw_bytes = cc->raw_bytes;
        MOQAE_TRY(moqae_cuda_attention(&cc->geom, &a, s));
        MOQAE_TRY(moqae_cuda_matmul(&L->wo, cc->att, n_tok, cc->x, E, true, cc->xq, s));
        MOQAE_TRY(moqae_cuda_rms_norm(cc->x, L->ffn_norm, hp->rms_eps, E, n_tok, cc->xn, s));
        MOQAE_TRY(moqae_cuda_matmul(&L->w_gate, cc->xn, n_tok, cc->gate, hp->n_ff, false, cc->xq, s));
        MOQAE_TRY(moqae_cuda_matmul(&L->w_up, cc->xn, n_tok, cc->up, hp->n_ff, false, cc->xq, s));
        MOQAE_TRY(moqae_cuda_swiglu(cc->gate, cc->up, n_tok * hp->n_ff, s));
        MOQAE_TRY(moqae_cuda_matmul(&L->w_down, cc->gate, n_tok, cc->x, E, true, cc->xq, s));
    }
    return MOQAE_OK;
}

/* Logits of rows [first, first + n) of x into cc->logits (n <= LOGITS_ROWS). */
static int run_logits(struct moqae_cuda_context * cc, int64_t first, int64_t n) {
    const struct moqae_hparams * hp = &cc->m->hp;
    MOQAE_TRY(moqae_cuda_rms_norm(cc->x + first * hp->n_embd, (const float *) cc->cm->output_norm.data, hp->rms_eps,
                                  hp->n_embd, n, cc->xn, cc->stream));
    return moqae_cuda_matmul(&cc->cm->output, cc->xn, n, cc->logits, hp->n_vocab, false, cc->xq, cc->stream);
}

/* The decode step as a graph: captured on the second one-token step (the first ran eagerly, so
 * every kernel attribute is set), replayed afterwards. */
static int decode_graph(struct moqae_cuda_context * cc) {
    if (cc->graph_state == 2) {
        MOQAE_CUDA_CHECK(cudaGraphLaunch(cc->graph, cc->stream));
        return MOQAE_OK;
    }
    cudaGraph_t g = NULL;
    MOQAE_CUDA_CHECK(cudaStreamBeginCapture(cc->stream, cudaStreamCaptureModeRelaxed));
    int st = run_layers(cc, 1, cc->n_split_decode, 1);
    if (!st) {
        st = run_logits(cc, 0, 1);
    }
    const cudaError_t end = cudaStreamEndCapture(cc->stream, &g);
    if (st || end != cudaSuccess) {
        if (g) {
            cudaGraphDestroy(g);
        }
        cudaGetLastError();
        cc->graph_state = -1; /* stay eager */
        moqae_log(MOQAE_LOG_WARN, "cuda: decode graph capture failed (%s); running eagerly",
                  st ? moqae_last_error() : cudaGetErrorString(end));
        MOQAE_TRY(run_layers(cc, 1, cc->n_split_decode, 1));
        return run_logits(cc, 0, 1);
    }
    const cudaError_t inst = cudaGraphInstantiate(&cc->graph, g, 0);
    cudaGraphDestroy(g);
    if (inst != cudaSuccess) {
        cc->graph       = NULL;
        cc->graph_state = -1;
        cudaGetLastError();
        MOQAE_TRY(run_layers(cc, 1, cc->n_split_decode, 1));
        return run_logits(cc, 0, 1);
    }
    cc->graph_state = 2;
    MOQAE_CUDA_CHECK(cudaGraphLaunch(cc->graph, cc->stream));
    return MOQAE_OK;
}

int moqae_cuda_forward(struct moqae_cuda_context * cc, const struct moqae_cuda_job * job) {
    const struct moqae_hparams * hp = &cc->m->hp;
    const int64_t                C = cc->cfg.chunk, T = job->n;
    if (T < 1 || T > cc->cfg.n_batch || job->n_out < 0 || job->n_out > T) {
        return moqae_fail(MOQAE_ERR_INVALID_ARG, "CUDA forward: bad micro-batch (%lld tokens, %lld logits)",
                          (long long) T, (long long) job->n_out);
    }
    if (cc->n_tokens + T > cc->cfg.n_ctx) {
        return moqae_fail(MOQAE_ERR_CONTEXT_FULL, "context full: %lld tokens in the context + %lld new > n_ctx %lld",
                          (long long) cc->n_tokens, (long long) T, (long long) cc->cfg.n_ctx);
    }
    /* prepare: the chunks this micro-batch completes get their codec and place (checked first:
     * nothing changes when they do not fit) */
    const int64_t n_new = (cc->n_tokens + T) / C - cc->n_tokens / C;
    size_t        need  = cc->used;
    for (int64_t i = 0; i < n_new; i++) {
        need += chunk_bytes(cc, policy_codec(cc, cc->n_tokens / C + i));
    }
    if (need > cc->layer_cap || cc->n_chunks + n_new > cc->cap_chunks) {
        return moqae_fail(MOQAE_ERR_CONTEXT_FULL,
                          "context full: the KV budget (%.2f MiB) holds no more chunks; raise --kv-budget",
                          (double) cc->layer_cap * (double) hp->n_layer / 1048576.0);
    }
    const int64_t enc_first = cc->n_chunks;
    for (int64_t i = 0; i < n_new; i++) {
        const int64_t index = cc->n_tokens / C + i;
        const int     codec = policy_codec(cc, index);
        cc->h_table[cc->n_chunks++] = { (long long) (index * C), (long long) cc->used, codec, 0 };
        cc->used += chunk_bytes(cc, codec);
    }
    cudaStream_t s = cc->stream;
    /* the previous step's copies out of these pinned buffers are complete: forward ends with a sync */
    *cc->h_dyn = { (long long) cc->n_tokens, (int) T, (int) cc->n_chunks, (int) enc_first, (int) n_new };
    memcpy(cc->h_ids, job->tokens, (size_t) T * sizeof(int32_t));
    int st = MOQAE_OK;
    auto fail = [&](int status) {
        cc->n_chunks = enc_first; /* undo prepare; the device state of this step is discarded */
        cc->used     = enc_first > 0 ? (size_t) cc->h_table[enc_first - 1].off + chunk_bytes(cc, cc->h_table[enc_first - 1].codec) : 0;
        return status;
    };
#define STEP(expr)                 \
    do {                           \
        if ((st = (expr))) {       \
            return fail(st);       \
        }                          \
    } while (0)
#define CSTEP(expr)                                                                                                \
    do {                                                                                                           \
        const cudaError_t e_ = (expr);                                                                             \
        if (e_ != cudaSuccess) {                                                                                   \
            return fail(moqae_fail(MOQAE_ERR_INTERNAL, "CUDA: %s failed: %s", #expr, cudaGetErrorString(e_)));     \
        }                                                                                                          \
    } while (0)
    CSTEP(cudaMemcpyAsync(cc->dyn, cc->h_dyn, sizeof(*cc->h_dyn), cudaMemcpyHostToDevice, s));
    CSTEP(cudaMemcpyAsync(cc->ids, cc->h_ids, (size_t) T * sizeof(int32_t), cudaMemcpyHostToDevice, s));
    if (n_new > 0) {
        CSTEP(cudaMemcpyAsync(cc->table + enc_first, cc->h_table + enc_first, (size_t) n_new * sizeof(struct moqae_cuda_chunk),
                              cudaMemcpyHostToDevice, s));
    }
    const bool graph = T == 1 && job->n_out == 1 && cc->graph_state >= 1 && !getenv("MOQAE_CUDA_NO_GRAPH");
    if (graph) {
        STEP(decode_graph(cc));
        CSTEP(cudaMemcpyAsync(job->logits, cc->logits, (size_t) hp->n_vocab * sizeof(float), cudaMemcpyDeviceToHost, s));
    } else {
        int n_split = cc->n_split_decode;
        if (T > 1) {
            const int     rows = moqae_cuda_attn_rows(T);
            const int64_t tpb = rows / (hp->n_head / hp->n_head_kv), n_qt = (T + tpb - 1) / tpb;
            const int64_t tiles = cc->n_chunks + T / C + 2, blocks = hp->n_head_kv * n_qt;
            const int64_t want  = (2 * (int64_t) cc->cm->n_sm + blocks - 1) / blocks;
            n_split = (int) std::max<int64_t>(1, std::min<int64_t>({ want, (int64_t) cc->max_split_prefill, tiles / 8 }));
        }
        STEP(run_layers(cc, T, n_split, (int) (T / C + 1)));
        for (int64_t r = 0; r < job->n_out; r += LOGITS_ROWS) {
            const int64_t n = std::min<int64_t>(LOGITS_ROWS, job->n_out - r);
            STEP(run_logits(cc, T - job->n_out + r, n));
            CSTEP(cudaMemcpyAsync(job->logits + r * hp->n_vocab, cc->logits, (size_t) (n * hp->n_vocab) * sizeof(float),
                                  cudaMemcpyDeviceToHost, s));
            if (r + LOGITS_ROWS < job->n_out) {
                CSTEP(cudaStreamSynchronize(s)); /* the next piece reuses cc->logits */
            }
        }
        if (T == 1 && cc->graph_state == 0) {
            cc->graph_state = 1;
        }
    }
    CSTEP(cudaStreamSynchronize(s));
#undef STEP
#undef CSTEP
    cc->n_tokens += T;
    return MOQAE_OK;
}

/* ================================================================================================
 * Test hook: the GPU encoder on one chunk (tests/tools/cuda-parity.c compares it with kv-codec.c)
 * ================================================================================================ */

int moqae_cuda_codec_encode(enum moqae_kv_codec c, const struct moqae_kv_shape * s, const float * k, const float * v,
                            uint8_t * krec, uint8_t * vrec) {
    if (!moqae_cuda_available()) {
        return moqae_fail(MOQAE_ERR_UNSUPPORTED, "no CUDA device");
    }
    MOQAE_TRY(moqae_kv_shape_check(c, s));
    const int64_t C = s->chunk, D = s->head_dim;
    struct moqae_cuda_ring_geom g = {};
    g.chunk = (int) C, g.head_dim = (int) D, g.v_group = (int) s->v_group, g.n_head_kv = 1, g.stage_rows = C;
    for (int i = 0; i < 4; i++) {
        g.k_bytes[i] = (long long) moqae_kv_k_bytes((enum moqae_kv_codec) i, s);
        g.v_bytes[i] = (long long) moqae_kv_v_bytes((enum moqae_kv_codec) i, s);
        g.k_pad[i]   = (long long) moqae_cuda_align((size_t) g.k_bytes[i]);
        g.v_pad[i]   = (long long) moqae_cuda_align((size_t) g.v_bytes[i]);
    }
    const size_t n = (size_t) (C * D), rec = (size_t) (g.k_pad[c] + g.v_pad[c]);
    uint16_t *   h = (uint16_t *) malloc(2 * n * sizeof(uint16_t));
    if (!h) {
        return moqae_fail(MOQAE_ERR_OUT_OF_MEMORY, "out of memory");
    }
    for (size_t i = 0; i < n; i++) {
        h[i]     = moqae_f32_to_f16(k[i]);
        h[n + i] = moqae_f32_to_f16(v[i]);
    }
    const struct moqae_cuda_chunk ch  = { 0, 0, (int) c, 0 };
    const struct moqae_cuda_dyn   dyn = { 0, (int) C, 1, 0, 1 };
    uint8_t *                     d   = NULL;
    const size_t                  bytes = 4 * n + rec + 1024;
    int                           st    = MOQAE_OK;
    cudaError_t                   err   = cudaMalloc((void **) &d, bytes);
    if (err == cudaSuccess) {
        uint16_t *                stage = (uint16_t *) d;
        uint8_t *                 arena = d + 4 * n;
        struct moqae_cuda_chunk * tab   = (struct moqae_cuda_chunk *) (d + ((4 * n + rec + 255) / 256) * 256);
        struct moqae_cuda_dyn *   dd    = (struct moqae_cuda_dyn *) ((uint8_t *) tab + 256);
        if ((err = cudaMemcpy(stage, h, 4 * n, cudaMemcpyHostToDevice)) == cudaSuccess &&
            (err = cudaMemcpy(tab, &ch, sizeof(ch), cudaMemcpyHostToDevice)) == cudaSuccess &&
            (err = cudaMemcpy(dd, &dyn, sizeof(dyn), cudaMemcpyHostToDevice)) == cudaSuccess) {
            st = moqae_cuda_kv_encode(&g, stage, stage + n, arena, tab, 1, dd, 0);
            if (!st && (err = cudaDeviceSynchronize()) == cudaSuccess &&
                (err = cudaMemcpy(krec, arena, (size_t) g.k_bytes[c], cudaMemcpyDeviceToHost)) == cudaSuccess) {
                err = cudaMemcpy(vrec, arena + g.k_pad[c], (size_t) g.v_bytes[c], cudaMemcpyDeviceToHost);
            }
        }
        cudaFree(d);
    }
    free(h);
    if (!st && err != cudaSuccess) {
        st = moqae_fail(MOQAE_ERR_INTERNAL, "CUDA codec test: %s", cudaGetErrorString(err));
    }
    return st;
}
