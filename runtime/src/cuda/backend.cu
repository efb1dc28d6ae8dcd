/*
 * cuda/backend.cu — backend-cuda.h: the weights uploaded once ("malloc and point": one device
 * allocation sized from a table of the tensors), a context's device memory (one allocation: the
 * mixed-bit ring, the f16 staging window, scratch), and the llama forward of one micro-batch as a
 * sequence of launches on the context's stream (graph.c's order). Decode steps (one token, one
 * logits row) replay a CUDA graph captured once: every kernel reads the step's positions from the
 * device-side moqae_cuda_dyn, so the same graph serves every step. The ring's bookkeeping is
 * kv-ring.c's (a ring without data, records padded to 16 bytes): each micro-batch's prepare decides
 * the new chunks' codecs and offsets and applies the overflow policy, whose record moves (coalesced,
 * device to device) and demotions (the record read to the host, re-encoded by kv-codec.c, written
 * back) reach the device arena in order; the chunk table is mirrored to the device per layer, only
 * the new rows unless records moved. Not here: partial offload, chunk size 64.
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
#include <initializer_list>
#include <math.h>
#include <vector>

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

thread_local bool moqae_cuda_pdl_decode = false;

/* moqae_cuda_pdl_decode for one step's launches, restored on every way out. */
struct pdl_scope {
    bool old;
    explicit pdl_scope(bool on) : old(moqae_cuda_pdl_decode) {
        moqae_cuda_pdl_decode = on;
    }
    ~pdl_scope() {
        moqae_cuda_pdl_decode = old;
    }
};

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
    int64_t                    layer0; /* the first layer on the GPU (0: every layer; else partial offload) */
};

/* Walk every weight of m: fn(host weight, device weight) with a running offset. */
template <typename F> static void for_each_weight(const struct moqae_model * m, struct moqae_cuda_model * cm, F fn) {
    fn(&m->tok_embd, &cm->tok_embd);
    fn(&m->output_norm, &cm->output_norm);
    if (m->output.data != m->tok_embd.data) {
        fn(&m->output, &cm->output);
    }
    for (int64_t il = cm->layer0; il < m->hp.n_layer; il++) {
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

/* Bytes of w on the device (its rows in matmul.cuh's layout). */
static size_t weight_bytes(const struct moqae_weight * w) {
    return (size_t) w->n_rows * moqae_cuda_weight_row_bytes(w->type, w->n_cols, w->row_bytes);
}

int moqae_cuda_model_new(const struct moqae_model * m, int n_gpu_layers, struct moqae_cuda_model ** out) {
    *out = NULL;
    if (!moqae_cuda_available()) {
        return moqae_fail(MOQAE_ERR_UNSUPPORTED, "no CUDA device");
    }
    if (n_gpu_layers < 1) {
        return moqae_fail(MOQAE_ERR_INVALID_ARG, "n_gpu_layers = %d: nothing to offload", n_gpu_layers);
    }
    struct moqae_cuda_model * cm = (struct moqae_cuda_model *) calloc(1, sizeof(*cm));
    if (!cm || !(cm->layers = (struct cuda_layer *) calloc((size_t) m->hp.n_layer, sizeof(struct cuda_layer)))) {
        free(cm);
        return moqae_fail(MOQAE_ERR_OUT_OF_MEMORY, "out of memory");
    }
    cm->m      = m;
    cm->layer0 = n_gpu_layers < m->hp.n_layer ? m->hp.n_layer - n_gpu_layers : 0;
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
    std::vector<uint8_t> host; /* one weight in the device layout */
    for_each_weight(m, cm, [&](const struct moqae_weight * w, struct moqae_cuda_weight * d) {
        d->type      = w->type;
        d->n_cols    = w->n_cols;
        d->n_rows    = w->n_rows;
        d->row_bytes = moqae_cuda_weight_row_bytes(w->type, w->n_cols, w->row_bytes);
        d->data      = cm->buf + off;
        if (err == cudaSuccess) {
            host.resize(weight_bytes(w));
            moqae_cuda_repack_rows(w->type, w->n_cols, w->n_rows, (const uint8_t *) w->data, w->row_bytes, host.data());
            err = cudaMemcpy(cm->buf + off, host.data(), host.size(), cudaMemcpyHostToDevice);
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
    moqae_log(MOQAE_LOG_INFO, "cuda: %s, %d SMs: uploaded %lld of %lld layers (%lld .. %lld), %.2f GiB of weights",
              prop.name, cm->n_sm, (long long) (m->hp.n_layer - cm->layer0), (long long) m->hp.n_layer,
              (long long) cm->layer0, (long long) (m->hp.n_layer - 1), gib((double) total));
    *out = cm;
    return MOQAE_OK;
}

int64_t moqae_cuda_model_n_layers(const struct moqae_cuda_model * cm) {
    return cm->m->hp.n_layer - cm->layer0;
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

/* One queued operation of the ring on the device arena. */
struct ring_op {
    size_t dst, src, n; /* a move, or a placement: src = the record's offset in demote_tmp */
    int    job;         /* the placement's demotion (h_jobs index), or -1 for a move      */
};

struct moqae_cuda_context {
    const struct moqae_model *      m;
    const struct moqae_cuda_model * cm;
    struct moqae_kv_config          cfg;
    struct moqae_cuda_ring_geom     geom;
    cudaStream_t                    stream;
    /* The ring's bookkeeping: kv-ring.c without data (cfg.arena_ops), records padded to 16 bytes, so
     * the GPU ring takes the CPU ring's decisions (routing, overflow, demotion order) and the device
     * arena mirrors its offsets. */
    struct moqae_kv_cache *         kv;
    struct moqae_kv_arena_ops       ops;

    /* device: one allocation */
    uint8_t *                 dbuf;
    size_t                    arena_bytes, stage_bytes, scratch_bytes;
    uint8_t *                 arena;  /* the ring's records, at the offsets of kv's table          */
    uint16_t *                stage_k, *stage_v; /* [n_layer][n_head_kv][stage_rows][D] f16        */
    float *                   x, *xn, *q, *k, *v, *att, *gate, *up, *logits, *part;
    int32_t *                 ids;
    void *                    xq;      /* activations quantized for the products [n_batch][cols/32] */
    float *                   rope_cs; /* [n_batch][n_rot/2][2] the micro-batch's RoPE table         */
    float *                   cs_t;    /* keys before RoPE: [D/2][2][C] (NULL: keys after RoPE)      */
    float *                   cs_p0;   /* [cap_chunks][D/2][2] each table entry's start              */
    struct moqae_cuda_dyn *   dyn;
    struct moqae_cuda_chunk * table;   /* [n_layer][cap_chunks] each layer's records                 */
    uint8_t *                 move_tmp; /* overlapping arena moves go through here (overflow policies) */
    size_t                    move_tmp_bytes;
    uint8_t *                 demote_tmp; /* a round's demoted records before their placement        */
    size_t                    demote_tmp_bytes;
    struct moqae_cuda_demotion * jobs;  /* [max_jobs] a round's demotions (device)                   */

    /* host (pinned) */
    struct moqae_cuda_chunk * h_table; /* [n_layer][cap_chunks]                                      */
    struct moqae_cuda_dyn *   h_dyn;
    int32_t *                 h_ids;
    float *                   h_rope;  /* [n_batch][n_rot/2][2]                                     */
    float *                   h_cs_p0; /* [cap_chunks][D/2][2]                                      */
    float *                   h_x;     /* partial offload: [n_batch][n_embd] the CPU layers' output  */

    int64_t cap_chunks;
    int     n_split_decode, max_split_prefill;
    int     raw_bytes; /* largest quantized record pair the ring may hold (v3's copy buffers) */
    /* the ring's operations of the current overflow round, queued (ring_move, ring_demote, flush_ops) */
    struct ring_op *             ops_q;
    int                          q_n, q_cap, n_jobs, max_jobs;
    struct moqae_cuda_demotion * h_jobs; /* [max_jobs] (pinned)                                      */
    size_t                       tmp_used, hull_lo, hull_hi; /* bytes of demote_tmp; where the queue writes */
    bool    dirty;                /* records moved or changed codec: upload the whole table           */
    bool    broken;               /* a device error left the arena and the table apart: clear first   */

    cudaGraphExec_t graph;
    int             graph_state; /* 0: not yet (run eagerly once), 1: eager done, 2: captured, -1: off */
};

static size_t chunk_bytes(const struct moqae_cuda_context * cc, int codec) {
    return (size_t) cc->geom.n_head_kv * (size_t) (cc->geom.k_pad[codec] + cc->geom.v_pad[codec]);
}

/* ---- the ring's byte operations on the device arena (kv-cache.h's struct moqae_kv_arena_ops) ----- */

/* memmove(arena + dst, arena + src, n), dst < src. Pieces that overlap their source go through move_tmp;
 * pieces are taken in ascending order, so a piece's target only covers source bytes already copied. */
static int copy_down(struct moqae_cuda_context * cc, size_t to, size_t from, size_t n) {
    const size_t    delta = from - to;
    uint8_t *       dst   = cc->arena + to;
    const uint8_t * src   = cc->arena + from;
    cudaStream_t    s     = cc->stream;
    if (n <= delta || delta >= cc->move_tmp_bytes) { /* pieces of delta bytes do not overlap */
        for (size_t done = 0; done < n; done += delta) {
            MOQAE_CUDA_CHECK(cudaMemcpyAsync(dst + done, src + done, std::min(delta, n - done), cudaMemcpyDeviceToDevice, s));
        }
        return MOQAE_OK;
    }
    for (size_t done = 0; done < n; done += cc->move_tmp_bytes) {
        const size_t k = std::min(cc->move_tmp_bytes, n - done);
        MOQAE_CUDA_CHECK(cudaMemcpyAsync(cc->move_tmp, src + done, k, cudaMemcpyDeviceToDevice, s));
        MOQAE_CUDA_CHECK(cudaMemcpyAsync(dst + done, cc->move_tmp, k, cudaMemcpyDeviceToDevice, s));
    }
    return MOQAE_OK;
}

/* Run the queued operations: every queued demotion encoded in one launch from the arena as it is (into
 * demote_tmp), then the moves and the demotions' placements in the ring's order. */
static int flush_ops(struct moqae_cuda_context * cc) {
    cudaStream_t s = cc->stream;
    int          st = MOQAE_OK;
    if (cc->n_jobs > 0) {
        MOQAE_CUDA_CHECK(cudaMemcpyAsync(cc->jobs, cc->h_jobs, (size_t) cc->n_jobs * sizeof(struct moqae_cuda_demotion),
                                         cudaMemcpyHostToDevice, s));
        st = moqae_cuda_kv_demote(&cc->geom, cc->arena, cc->jobs, cc->n_jobs, cc->demote_tmp, cc->cs_t, s);
    }
    for (int i = 0; i < cc->q_n && !st; i++) {
        const struct ring_op * o = &cc->ops_q[i];
        if (o->job >= 0) {
            const cudaError_t e = cudaMemcpyAsync(cc->arena + o->dst, cc->demote_tmp + o->src, o->n, cudaMemcpyDeviceToDevice, s);
            st = e == cudaSuccess ? MOQAE_OK : moqae_fail(MOQAE_ERR_INTERNAL, "CUDA: placing a demoted record: %s",
                                                          cudaGetErrorString(e));
        } else {
            st = copy_down(cc, o->dst, o->src, o->n);
        }
    }
    if (!st && cc->n_jobs > 0) { /* h_jobs is refilled by the next round */
        MOQAE_CUDA_CHECK(cudaStreamSynchronize(s));
    }
    cc->q_n = 0, cc->n_jobs = 0, cc->tmp_used = 0, cc->hull_lo = SIZE_MAX, cc->hull_hi = 0;
    return st;
}

/* Queue one operation. Every operation of one overflow round reads bytes that no earlier operation of
 * the round writes (the ring walks its records upwards and writes below the one it reads), so the round
 * can be queued whole; an operation that reads what a queued one writes starts a new round. */
static bool reads_queued_writes(const struct moqae_cuda_context * cc, size_t src, size_t n) {
    return src < cc->hull_hi && src + n > cc->hull_lo;
}

static void queued_write(struct moqae_cuda_context * cc, size_t dst, size_t n) {
    cc->hull_lo = std::min(cc->hull_lo, dst);
    cc->hull_hi = std::max(cc->hull_hi, dst + n);
}

static int ring_move(void * user, size_t dst, size_t src, size_t n) {
    struct moqae_cuda_context * cc = (struct moqae_cuda_context *) user;
    cc->dirty                      = true;
    if (n == 0) {
        return MOQAE_OK;
    }
    if (reads_queued_writes(cc, src, n) || cc->q_n == cc->q_cap) {
        MOQAE_TRY(flush_ops(cc));
    }
    struct ring_op * last = cc->q_n > 0 ? &cc->ops_q[cc->q_n - 1] : NULL;
    if (last && last->job < 0 && last->src + last->n == src && last->dst + last->n == dst) {
        last->n += n; /* the next record moves by the same distance: one copy */
    } else {
        cc->ops_q[cc->q_n++] = { dst, src, n, -1 };
    }
    queued_write(cc, dst, n);
    return MOQAE_OK;
}

static int ring_demote(void * user, const struct moqae_kv_demotion * d) {
    struct moqae_cuda_context * cc = (struct moqae_cuda_context *) user;
    cc->dirty                      = true;
    const size_t old_b = chunk_bytes(cc, d->old_codec), new_b = chunk_bytes(cc, d->new_codec);
    if (reads_queued_writes(cc, d->src, old_b) || cc->n_jobs == cc->max_jobs || cc->q_n == cc->q_cap ||
        cc->tmp_used + new_b > cc->demote_tmp_bytes) {
        MOQAE_TRY(flush_ops(cc));
    }
    struct moqae_cuda_demotion * j = &cc->h_jobs[cc->n_jobs];
    j->src = (long long) d->src, j->out = (long long) cc->tmp_used, j->old_codec = d->old_codec, j->new_codec = d->new_codec;
    j->has_p0 = d->cs_p0 != NULL, j->pad = 0;
    if (d->cs_p0) {
        memcpy(j->p0, d->cs_p0, (size_t) cc->cfg.head_dim * sizeof(float));
    }
    cc->ops_q[cc->q_n++] = { d->dst, cc->tmp_used, new_b, cc->n_jobs++ };
    cc->tmp_used += new_b;
    queued_write(cc, d->dst, new_b);
    return MOQAE_OK;
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
    void * pinned[] = { cc->h_table, cc->h_dyn, cc->h_ids, cc->h_rope, cc->h_cs_p0, cc->h_x, cc->h_jobs };
    for (void * p : pinned) {
        if (p) {
            cudaFreeHost(p);
        }
    }
    if (cc->stream) {
        cudaStreamDestroy(cc->stream);
    }
    moqae_kv_cache_free(cc->kv);
    free(cc->ops_q);
    free(cc);
}

static int context_alloc(struct moqae_cuda_context * cc, const float * theta) {
    const struct moqae_hparams * hp = &cc->m->hp;
    const int64_t B = cc->cfg.n_batch, E = hp->n_embd, dq = hp->n_head * hp->head_dim, dkv = hp->n_head_kv * hp->head_dim;
    const int64_t D = hp->head_dim, L = cc->cfg.n_layer; /* the layers on the GPU */
    const size_t  part = std::max(moqae_cuda_attn_part_floats(&cc->geom, 1, hp->n_head, cc->n_split_decode),
                                  moqae_cuda_attn_part_floats(&cc->geom, B, hp->n_head, cc->max_split_prefill));
    const bool    pre  = theta != NULL;
    struct moqae_kv_table tab;
    moqae_kv_cache_table(cc->kv, &tab);
    /* overflow policies move records inside the arena (overlapping moves go through a buffer) and
     * re-encode them (into the same buffer first) */
    const bool demote  = cc->cfg.overflow == MOQAE_KV_OVERFLOW_DEMOTE;
    cc->move_tmp_bytes = cc->cfg.overflow != MOQAE_KV_OVERFLOW_ERROR
                             ? std::max(std::min<size_t>(tab.cap, (size_t) 64 << 20), chunk_bytes(cc, MOQAE_KV_CODEC_F16))
                             : 0;
    cc->demote_tmp_bytes = demote ? cc->move_tmp_bytes : 0;
    cc->max_jobs         = demote ? 1024 : 0;
    cc->q_cap            = cc->cfg.overflow != MOQAE_KV_OVERFLOW_ERROR ? 2 * cc->max_jobs + 64 : 0;
    cc->hull_lo          = SIZE_MAX;
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
        { (void **) &cc->xq, moqae_cuda_quant_bytes(B, std::max({ E, dq, hp->n_ff })) },
        { (void **) &cc->table, (size_t) (L * cc->cap_chunks) * sizeof(struct moqae_cuda_chunk) },
        { (void **) &cc->rope_cs, (size_t) (B * hp->n_rot) * 4 },
        { (void **) &cc->cs_t, pre ? (size_t) (D * cc->cfg.chunk) * 4 : 0 },
        { (void **) &cc->cs_p0, pre ? (size_t) (cc->cap_chunks * D) * 4 : 0 },
        { (void **) &cc->move_tmp, cc->move_tmp_bytes },
        { (void **) &cc->demote_tmp, cc->demote_tmp_bytes },
        { (void **) &cc->jobs, (size_t) cc->max_jobs * sizeof(struct moqae_cuda_demotion) },
    };
    size_t scratch = 0;
    for (auto & e : t) {
        scratch += (e.bytes + 255) / 256 * 256;
    }
    const size_t stage_rows = (size_t) cc->geom.stage_rows;
    cc->stage_bytes   = 2 * (size_t) L * (size_t) hp->n_head_kv * stage_rows * (size_t) hp->head_dim * 2;
    cc->arena_bytes   = (tab.cap + 255) / 256 * 256;
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
    const char * kvname = cc->cfg.n_expert > 0 ? "router" : moqae_kv_codec_name(cc->cfg.policy.codec);
    if (total + MEM_MARGIN > free_b) {
        return moqae_fail(MOQAE_ERR_OUT_OF_MEMORY,
                          "the KV cache does not fit on the GPU: n_ctx %lld with --kv %s%s needs %zu bytes (%.2f GiB: ring "
                          "%.2f GiB + staging %.2f GiB + scratch %.2f GiB); the device has %zu bytes (%.2f GiB) free of "
                          "%.2f GiB after the weights (%.2f GiB). Use a lower-bit --kv policy, a smaller -c or --kv-budget",
                          (long long) cc->cfg.n_ctx, cc->cfg.policy.sink && cc->cfg.n_expert == 0 ? "sink+" : "", kvname,
                          total, gib((double) total), gib((double) cc->arena_bytes), gib((double) cc->stage_bytes),
                          gib((double) scratch), free_b, gib((double) free_b), gib((double) total_b), gib((double) cc->cm->bytes));
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
        *e.p = e.bytes ? cc->dbuf + off : NULL;
        off += (e.bytes + 255) / 256 * 256;
    }
    /* staging rows beyond what was written must read as finite numbers (they are masked, and a
     * masked weight 0 times a NaN would still poison P V) */
    MOQAE_CUDA_CHECK(cudaMemset(cc->stage_k, 0, cc->stage_bytes));
    MOQAE_CUDA_CHECK(cudaMallocHost((void **) &cc->h_table, (size_t) (L * cc->cap_chunks) * sizeof(struct moqae_cuda_chunk)));
    MOQAE_CUDA_CHECK(cudaMallocHost((void **) &cc->h_dyn, sizeof(struct moqae_cuda_dyn)));
    MOQAE_CUDA_CHECK(cudaMallocHost((void **) &cc->h_ids, (size_t) B * 4));
    MOQAE_CUDA_CHECK(cudaMallocHost((void **) &cc->h_rope, (size_t) (B * hp->n_rot) * 4));
    if (cc->cm->layer0 > 0) {
        MOQAE_CUDA_CHECK(cudaMallocHost((void **) &cc->h_x, (size_t) (B * E) * 4));
    }
    if (cc->max_jobs > 0) {
        MOQAE_CUDA_CHECK(cudaMallocHost((void **) &cc->h_jobs, (size_t) cc->max_jobs * sizeof(struct moqae_cuda_demotion)));
    }
    if (cc->q_cap > 0 && !(cc->ops_q = (struct ring_op *) calloc((size_t) cc->q_cap, sizeof(struct ring_op)))) {
        return moqae_fail(MOQAE_ERR_OUT_OF_MEMORY, "out of memory");
    }
    if (pre) {
        MOQAE_CUDA_CHECK(cudaMallocHost((void **) &cc->h_cs_p0, (size_t) (cc->cap_chunks * D) * 4));
        float * cs = (float *) malloc((size_t) (D * cc->cfg.chunk) * 4);
        if (!cs) {
            return moqae_fail(MOQAE_ERR_OUT_OF_MEMORY, "out of memory");
        }
        moqae_kv_rope_fill(D, cc->cfg.chunk, 0, theta, cs);
        err = cudaMemcpy(cc->cs_t, cs, (size_t) (D * cc->cfg.chunk) * 4, cudaMemcpyHostToDevice);
        free(cs);
        MOQAE_CUDA_CHECK(err);
    }
    moqae_log(MOQAE_LOG_INFO,
              "cuda: context n_ctx %lld, kv %s: ring %.3f GiB, staging %.3f GiB, scratch %.3f GiB; weights %.3f GiB; "
              "decode attention splits %d",
              (long long) cc->cfg.n_ctx, kvname, gib((double) cc->arena_bytes), gib((double) cc->stage_bytes),
              gib((double) scratch), gib((double) cc->cm->bytes), cc->n_split_decode);
    return MOQAE_OK;
}

int moqae_cuda_context_new(const struct moqae_model * m, const struct moqae_kv_config * cfg,
                           struct moqae_cuda_context ** out) {
    *out = NULL;
    if (!m->cuda) {
        return moqae_fail(MOQAE_ERR_INVALID_ARG, "CUDA context on a model without GPU weights");
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
    if (cfg->n_layer != moqae_cuda_model_n_layers(m->cuda) || cfg->layer0 != m->cuda->layer0) {
        return moqae_fail(MOQAE_ERR_INVALID_ARG, "CUDA context for layers %lld.. (%lld) on a model with layers %lld.. on "
                                                 "the GPU", (long long) cfg->layer0, (long long) cfg->n_layer,
                          (long long) m->cuda->layer0);
    }
    struct moqae_cuda_context * cc = (struct moqae_cuda_context *) calloc(1, sizeof(*cc));
    if (!cc) {
        return moqae_fail(MOQAE_ERR_OUT_OF_MEMORY, "out of memory");
    }
    cc->m   = m;
    cc->cm  = m->cuda;
    cc->cfg = *cfg;
    cc->ops = { cc, ring_move, ring_demote };
    struct moqae_kv_config kc = *cfg; /* the bookkeeping ring: kv-ring.c checks the shape, RoPE, weights */
    kc.rec_align              = MOQAE_CUDA_REC_ALIGN;
    kc.arena_ops              = &cc->ops;
    int st                    = moqae_kv_cache_new(&kc, &cc->kv);
    if (st) {
        free(cc);
        return st;
    }
    struct moqae_kv_shape shape = { cfg->chunk, cfg->head_dim, MOQAE_KV_V_GROUP };
    if (cfg->head_dim % MOQAE_KV_V_GROUP != 0) {
        shape.v_group = cfg->head_dim;
    }
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
    /* the quantized codecs the ring may hold: the experts' (or the policy's), and under demote every
     * lower one down to INT2 (an FP16 expert's chunks may become INT8) */
    int top = MOQAE_KV_CODEC_Q2;
    for (int64_t e = 0; e <= cfg->n_expert; e++) {
        const int c = (int) (e < cfg->n_expert ? cfg->expert[e] : cfg->policy.codec);
        top         = std::min(top, c);
        if (c != MOQAE_KV_CODEC_F16) {
            cc->raw_bytes = std::max(cc->raw_bytes, (int) (g->k_pad[c] + g->v_pad[c]));
        }
    }
    for (int c = std::max(top, (int) MOQAE_KV_CODEC_Q8); cfg->overflow == MOQAE_KV_OVERFLOW_DEMOTE && c <= MOQAE_KV_CODEC_Q2; c++) {
        cc->raw_bytes = std::max(cc->raw_bytes, (int) (g->k_pad[c] + g->v_pad[c]));
    }
    cc->cap_chunks = cfg->n_ctx / cfg->chunk + 1;
    cc->dirty      = true;
    float * theta  = NULL;
    if (cfg->keys_pre_rope) {
        const int64_t D = cfg->head_dim;
        theta           = (float *) calloc((size_t) D / 2, sizeof(float));
        if (!theta) {
            moqae_cuda_context_free(cc);
            return moqae_fail(MOQAE_ERR_OUT_OF_MEMORY, "out of memory");
        }
        for (int64_t i = 0; i < cfg->n_rot / 2; i++) { /* kv-ring.c: pos * base^(-2i / n_rot), in double */
            theta[i] = (float) pow((double) cfg->rope_base, -2.0 * (double) i / (double) cfg->n_rot);
        }
    }
    const int64_t max_tiles = cc->cap_chunks + 1;
    const int     n_sm      = m->cuda->n_sm > 0 ? m->cuda->n_sm : 1;
    if ((st = moqae_cuda_attn_decode_split(g, cc->raw_bytes, (int) (m->hp.n_head / m->hp.n_head_kv), n_sm, max_tiles,
                                           &cc->n_split_decode))) {
        free(theta);
        moqae_cuda_context_free(cc);
        return st;
    }
    cc->max_split_prefill = 4;
    if ((st = cudaStreamCreateWithFlags(&cc->stream, cudaStreamNonBlocking)) != cudaSuccess) {
        cc->stream = NULL;
        free(theta);
        moqae_cuda_context_free(cc);
        return moqae_fail(MOQAE_ERR_INTERNAL, "CUDA: cudaStreamCreate: %s", cudaGetErrorString((cudaError_t) st));
    }
    st = context_alloc(cc, theta);
    free(theta);
    if (st) {
        moqae_cuda_context_free(cc);
        return st;
    }
    *out = cc;
    return MOQAE_OK;
}

void moqae_cuda_context_clear(struct moqae_cuda_context * cc) {
    moqae_kv_cache_clear(cc->kv);
    cc->q_n = 0, cc->n_jobs = 0, cc->tmp_used = 0, cc->hull_lo = SIZE_MAX, cc->hull_hi = 0;
    cc->dirty  = true;
    cc->broken = false;
}

int64_t moqae_cuda_n_tokens(const struct moqae_cuda_context * cc) {
    return moqae_kv_cache_n_tokens(cc->kv);
}

void moqae_cuda_kv_stats(const struct moqae_cuda_context * cc, struct moqae_kv_stats * out) {
    memset(out, 0, sizeof(*out));
    const struct moqae_hparams * hp = &cc->m->hp;
    const int64_t C = cc->cfg.chunk, L = cc->cfg.n_layer, n_tokens = moqae_kv_cache_n_tokens(cc->kv);
    const double  per_token_elems = 2.0 * (double) (L * hp->n_head_kv * hp->head_dim);
    double        code_bits = 0.0; /* per layer, summed over tokens (kv-ring.c's stats) */
    struct moqae_kv_table t;
    moqae_kv_cache_table(cc->kv, &t);
    for (int64_t r = 0; r < t.n_chunks * L; r++) {
        out->n_records[t.codec[r]]++;
        code_bits += (double) moqae_kv_codec_bits((enum moqae_kv_codec) t.codec[r]) * (double) C / (double) L;
    }
    for (int e = 0; e < 4; e++) {
        out->n_chunks[e] = (out->n_records[e] + L / 2) / L;
    }
    const int64_t resid = n_tokens - n_tokens / C * C; /* the f16 residual window */
    const int64_t held  = t.n_chunks * C + resid;
    code_bits += 16.0 * (double) resid;
    out->n_tokens       = held;
    out->n_ctx          = cc->cfg.n_ctx;
    out->bytes_used     = (int64_t) ((double) t.used + (double) resid * per_token_elems * 2.0);
    out->bytes_reserved = (int64_t) (cc->arena_bytes + cc->stage_bytes);
    if (held > 0) {
        out->nominal_bits   = code_bits / (double) held;
        out->effective_bits = (double) out->bytes_used * 8.0 / ((double) held * per_token_elems);
    }
}

int moqae_cuda_chunk_codecs(const struct moqae_cuda_context * cc, uint8_t * codecs, int64_t cap, int64_t * n) {
    struct moqae_kv_table t;
    moqae_kv_cache_table(cc->kv, &t);
    *n = t.n_chunks;
    if (t.n_chunks > cap) {
        return moqae_fail(MOQAE_ERR_BUFFER_TOO_SMALL, "%lld chunks, room for %lld", (long long) t.n_chunks, (long long) cap);
    }
    for (int64_t i = 0; i < t.n_chunks; i++) {
        codecs[i] = t.codec[i * t.n_layer]; /* layer 0's */
    }
    return MOQAE_OK;
}

/* ================================================================================================
 * Forward
 * ================================================================================================ */

static bool any_quantized(std::initializer_list<const struct moqae_cuda_weight *> ws) {
    for (const struct moqae_cuda_weight * w : ws) {
        if (moqae_cuda_type_quantized(w->type)) {
            return true;
        }
    }
    return false;
}

/* y = RMSNorm(x) (and xq = its quantization when the weights reading it need it: one launch). */
static int norm_for(struct moqae_cuda_context * cc, const float * x, const float * w, int64_t n_tok, float * y,
                    std::initializer_list<const struct moqae_cuda_weight *> ws) {
    const struct moqae_hparams * hp = &cc->m->hp;
    if (any_quantized(ws)) {
        return moqae_cuda_rms_norm_quant(x, w, hp->rms_eps, hp->n_embd, n_tok, y, cc->xq, cc->stream);
    }
    return moqae_cuda_rms_norm(x, w, hp->rms_eps, hp->n_embd, n_tok, y, cc->stream);
}

/* Every layer for n_tok tokens (ids, dyn, the RoPE table and the chunk table already on the device). */
static int run_layers(struct moqae_cuda_context * cc, int64_t n_tok, int n_split, int max_enc) {
    const struct moqae_hparams *    hp = &cc->m->hp;
    const struct moqae_cuda_model * cm = cc->cm;
    cudaStream_t                    s  = cc->stream;
    const int64_t                   E = hp->n_embd, D = hp->head_dim, nkv = hp->n_head_kv;
    const size_t stage_layer = (size_t) nkv * (size_t) cc->geom.stage_rows * (size_t) D;
    /* MOQAE_CUDA_FUSE=0: one launch per product, as before (comparison) */
    static const bool fuse = *moqae_cuda_switch("MOQAE_CUDA_FUSE") != '0';

    if (cm->layer0 == 0) { /* else x came from the CPU's layers */
        MOQAE_TRY(moqae_cuda_get_rows(&cm->tok_embd, cc->ids, n_tok, cc->x, s));
    }
    for (int64_t il = cm->layer0; il < hp->n_layer; il++) {
        const struct cuda_layer * L  = &cm->layers[il];
        const int64_t             li = il - cm->layer0; /* the ring's layer */
        MOQAE_TRY(norm_for(cc, cc->x, L->attn_norm, n_tok, cc->xn, { &L->wq, &L->wk, &L->wv }));
        {
            const struct moqae_cuda_weight * ws[3] = { &L->wq, &L->wk, &L->wv };
            float * const                    ys[3] = { cc->q, cc->k, cc->v };
            MOQAE_TRY(moqae_cuda_matmul_seq(ws, ys, fuse ? 3 : 1, cc->xn, cc->xq, n_tok, s));
            for (int i = fuse ? 3 : 1; i < 3; i++) {
                MOQAE_TRY(moqae_cuda_matmul_seq(ws + i, ys + i, 1, cc->xn, cc->xq, n_tok, s));
            }
        }
        uint16_t * sk = cc->stage_k + (size_t) li * stage_layer, *sv = cc->stage_v + (size_t) li * stage_layer;
        const struct moqae_cuda_chunk * tab = cc->table + li * cc->cap_chunks; /* this layer's records */
        MOQAE_TRY(moqae_cuda_kv_rope_store(&cc->geom, cc->q, cc->k, cc->v, n_tok, hp->n_head, hp->n_rot, cc->rope_cs, sk, sv,
                                           cc->dyn, s));
        if (n_tok > 1) { /* prefill: this micro-batch's later tokens attend to the chunks it completes */
            MOQAE_TRY(moqae_cuda_kv_encode(&cc->geom, sk, sv, cc->arena, tab, cc->cs_t, cc->cs_p0, max_enc, cc->dyn, s));
        }
        struct moqae_cuda_attn_args a = {};
        a.xq = any_quantized({ &L->wo }) ? cc->xq : nullptr; /* the merge quantizes for wo */
        a.q = cc->q, a.out = cc->att, a.part = cc->part, a.arena = cc->arena, a.stage_k = sk, a.stage_v = sv;
        a.table = tab, a.cs_t = cc->cs_t, a.cs_p0 = cc->cs_p0, a.dyn = cc->dyn, a.n_tok = (int) n_tok;
        a.n_head = (int) hp->n_head, a.n_split = n_split, a.scale = 1.0f / sqrtf((float) D), a.raw_bytes = cc->raw_bytes;
        a.kernel = 0;
        MOQAE_TRY(moqae_cuda_attention(&cc->geom, &a, s));
        MOQAE_TRY(moqae_cuda_matmul(&L->wo, cc->att, cc->xq, n_tok, cc->x, E, true, s));
        MOQAE_TRY(norm_for(cc, cc->x, L->ffn_norm, n_tok, cc->xn, { &L->w_gate, &L->w_up }));
        {
            const struct moqae_cuda_weight * ws[2] = { &L->w_gate, &L->w_up };
            float * const                    ys[2] = { cc->gate, cc->up };
            MOQAE_TRY(moqae_cuda_matmul_seq(ws, ys, fuse ? 2 : 1, cc->xn, cc->xq, n_tok, s));
            if (!fuse) {
                MOQAE_TRY(moqae_cuda_matmul_seq(ws + 1, ys + 1, 1, cc->xn, cc->xq, n_tok, s));
            }
        }
        if (any_quantized({ &L->w_down })) {
            MOQAE_TRY(moqae_cuda_swiglu_quant(cc->gate, cc->up, n_tok, hp->n_ff, cc->xq, s));
        } else {
            MOQAE_TRY(moqae_cuda_swiglu(cc->gate, cc->up, n_tok * hp->n_ff, s));
        }
        MOQAE_TRY(moqae_cuda_matmul(&L->w_down, cc->gate, cc->xq, n_tok, cc->x, E, true, s));
    }
    if (n_tok == 1) { /* decode: the chunk this token completes (if any), every layer in one launch; its own
                         attention read it from the staging window, the next step reads the records */
        MOQAE_TRY(moqae_cuda_kv_encode_layers(&cc->geom, cc->stage_k, cc->stage_v, (long long) stage_layer, cc->arena,
                                              cc->table, cc->cap_chunks, (int) cc->cfg.n_layer, cc->cs_t, cc->cs_p0,
                                              max_enc, cc->dyn, s));
    }
    return MOQAE_OK;
}

/* Logits of rows [first, first + n) of x into cc->logits (n <= LOGITS_ROWS). */
static int run_logits(struct moqae_cuda_context * cc, int64_t first, int64_t n) {
    const struct moqae_hparams * hp = &cc->m->hp;
    MOQAE_TRY(norm_for(cc, cc->x + first * hp->n_embd, (const float *) cc->cm->output_norm.data, n, cc->xn,
                       { &cc->cm->output }));
    return moqae_cuda_matmul(&cc->cm->output, cc->xn, cc->xq, n, cc->logits, hp->n_vocab, false, cc->stream);
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

/* graph.c rope_table for positions pos0 .. pos0 + n - 1, into the pinned table. */
static void rope_table(struct moqae_cuda_context * cc, int64_t pos0, int64_t n) {
    const struct moqae_hparams * hp    = &cc->m->hp;
    const int64_t                half  = hp->n_rot / 2;
    const float                  scale = powf(hp->rope_base, -2.0f / (float) hp->n_rot);
    for (int64_t t = 0; t < n; t++) {
        float   theta = (float) (pos0 + t);
        float * cs    = cc->h_rope + t * half * 2;
        for (int64_t i = 0; i < half; i++) {
            cs[2 * i]     = cosf(theta);
            cs[2 * i + 1] = sinf(theta);
            theta *= scale;
        }
    }
}

int moqae_cuda_forward(struct moqae_cuda_context * cc, const struct moqae_cuda_job * job) {
    const struct moqae_hparams * hp = &cc->m->hp;
    const int64_t                C = cc->cfg.chunk, T = job->n, D = hp->head_dim, L = cc->cfg.n_layer;
    if (cc->broken) {
        return moqae_fail(MOQAE_ERR_INTERNAL, "an earlier CUDA error left this context's KV ring inconsistent; clear "
                                              "the context (moqae_context_clear) before decoding again");
    }
    if (T < 1 || T > cc->cfg.n_batch || job->n_out < 0 || job->n_out > T) {
        return moqae_fail(MOQAE_ERR_INVALID_ARG, "CUDA forward: bad micro-batch (%lld tokens, %lld logits)",
                          (long long) T, (long long) job->n_out);
    }
    if (cc->cfg.n_expert > 0 && !job->votes) {
        return moqae_fail(MOQAE_ERR_INVALID_ARG, "CUDA forward: a routed context needs the micro-batch's votes");
    }
    if ((cc->cm->layer0 > 0) != (job->x != NULL)) {
        return moqae_fail(MOQAE_ERR_INVALID_ARG, "CUDA forward: the input of layer %lld is %s", (long long) cc->cm->layer0,
                          job->x ? "given, but the GPU embeds the tokens" : "missing (partial offload)");
    }
    /* prepare: kv-ring.c gives the chunks this micro-batch completes their codecs and places, applying
     * the overflow policy (its moves and demotions reach the device arena through cc->ops, in order);
     * nothing changes when they do not fit under --kv-overflow error */
    const int64_t n_past = moqae_kv_cache_n_tokens(cc->kv), n_new = (n_past + T) / C - n_past / C;
    struct moqae_kv_table t;
    moqae_kv_cache_table(cc->kv, &t);
    const int64_t n_before = t.n_chunks;
    int           st       = moqae_kv_cache_prepare(cc->kv, T, job->votes);
    const int     fl       = flush_ops(cc); /* what it moved before failing stays moved (shift) */
    st                     = st ? st : fl;
    if (st == MOQAE_ERR_INTERNAL) {
        cc->broken = true;
    }
    if (st) {
        return st;
    }
    moqae_kv_cache_table(cc->kv, &t);
    if (t.n_chunks != n_before + n_new) {
        cc->dirty = true; /* chunks were evicted: every later index moved */
    }
    const int64_t enc_first = t.n_chunks - n_new, up = cc->dirty ? 0 : enc_first; /* table rows to upload */
    for (int64_t l = 0; l < L; l++) {
        for (int64_t i = up; i < t.n_chunks; i++) {
            cc->h_table[l * cc->cap_chunks + i] = { (long long) t.pos[i], (long long) t.off[i * L + l], (int) t.codec[i * L + l], 0 };
        }
    }
    if (t.cs_p0 && t.n_chunks > up) {
        memcpy(cc->h_cs_p0 + up * D, t.cs_p0 + up * D, (size_t) ((t.n_chunks - up) * D) * sizeof(float));
    }
    cudaStream_t s = cc->stream;
    /* the previous step's copies out of these pinned buffers are complete: forward ends with a sync */
    *cc->h_dyn = { (long long) n_past, (int) T, (int) t.n_chunks, (int) enc_first, (int) n_new };
    memcpy(cc->h_ids, job->tokens, (size_t) T * sizeof(int32_t));
    rope_table(cc, n_past, T);
    auto fail = [&](int status) {
        cc->broken = true; /* the ring holds this micro-batch's chunks, the device may not: clear first */
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
    CSTEP(cudaMemcpyAsync(cc->rope_cs, cc->h_rope, (size_t) (T * hp->n_rot) * sizeof(float), cudaMemcpyHostToDevice, s));
    if (job->x) { /* partial offload: the CPU layers' output is the first GPU layer's input */
        memcpy(cc->h_x, job->x, (size_t) (T * hp->n_embd) * sizeof(float));
        CSTEP(cudaMemcpyAsync(cc->x, cc->h_x, (size_t) (T * hp->n_embd) * sizeof(float), cudaMemcpyHostToDevice, s));
    }
    if (t.n_chunks > up) {
        const size_t row = sizeof(struct moqae_cuda_chunk), pitch = (size_t) cc->cap_chunks * row;
        CSTEP(cudaMemcpy2DAsync(cc->table + up, pitch, cc->h_table + up, pitch, (size_t) (t.n_chunks - up) * row, (size_t) L,
                                cudaMemcpyHostToDevice, s));
        if (t.cs_p0) {
            CSTEP(cudaMemcpyAsync(cc->cs_p0 + up * D, cc->h_cs_p0 + up * D, (size_t) ((t.n_chunks - up) * D) * sizeof(float),
                                  cudaMemcpyHostToDevice, s));
        }
    }
    const pdl_scope pdl(T == 1); /* decode steps launch with PDL (common.cuh) */
    const bool      graph = T == 1 && job->n_out == 1 && cc->graph_state >= 1 && !getenv("MOQAE_CUDA_NO_GRAPH");
    if (graph) {
        STEP(decode_graph(cc));
        CSTEP(cudaMemcpyAsync(job->logits, cc->logits, (size_t) hp->n_vocab * sizeof(float), cudaMemcpyDeviceToHost, s));
    } else {
        int n_split = cc->n_split_decode;
        if (T > 1) {
            const int     rows = moqae_cuda_attn_rows(T);
            const int64_t tpb = rows / (hp->n_head / hp->n_head_kv), n_qt = (T + tpb - 1) / tpb;
            const int64_t tiles = t.n_chunks + T / C + 2, blocks = hp->n_head_kv * n_qt;
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
    cc->dirty = false;
    moqae_kv_cache_commit(cc->kv, T);
    return MOQAE_OK;
}

/* ================================================================================================
 * Test hooks (tests/tools/cuda-parity.c)
 * ================================================================================================ */

static void geom_of(struct moqae_cuda_ring_geom * g, const struct moqae_kv_shape * s, int n_head_kv, int64_t stage_rows) {
    *g = {};
    g->chunk = (int) s->chunk, g->head_dim = (int) s->head_dim, g->v_group = (int) s->v_group, g->n_head_kv = n_head_kv;
    g->stage_rows = stage_rows;
    for (int i = 0; i < 4; i++) {
        g->k_bytes[i] = (long long) moqae_kv_k_bytes((enum moqae_kv_codec) i, s);
        g->v_bytes[i] = (long long) moqae_kv_v_bytes((enum moqae_kv_codec) i, s);
        g->k_pad[i]   = (long long) moqae_cuda_align((size_t) g->k_bytes[i]);
        g->v_pad[i]   = (long long) moqae_cuda_align((size_t) g->v_bytes[i]);
    }
}

int moqae_cuda_codec_encode(enum moqae_kv_codec c, const struct moqae_kv_shape * s, const float * k, const float * v,
                            const float * cs_t, const float * cs_p0, uint8_t * krec, uint8_t * vrec) {
    if (!moqae_cuda_available()) {
        return moqae_fail(MOQAE_ERR_UNSUPPORTED, "no CUDA device");
    }
    MOQAE_TRY(moqae_kv_shape_check(c, s));
    const int64_t C = s->chunk, D = s->head_dim;
    struct moqae_cuda_ring_geom g;
    geom_of(&g, s, 1, C);
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
    const size_t                  tabs  = (size_t) (D * C + D) * sizeof(float);
    const size_t                  bytes = 4 * n + rec + 1024 + tabs;
    int                           st    = MOQAE_OK;
    cudaError_t                   err   = cudaMalloc((void **) &d, bytes);
    if (err == cudaSuccess) {
        uint16_t *                stage = (uint16_t *) d;
        uint8_t *                 arena = d + 4 * n;
        struct moqae_cuda_chunk * tab   = (struct moqae_cuda_chunk *) (d + ((4 * n + rec + 255) / 256) * 256);
        struct moqae_cuda_dyn *   dd    = (struct moqae_cuda_dyn *) ((uint8_t *) tab + 256);
        float *                   dcs   = (float *) ((uint8_t *) tab + 512);
        if ((err = cudaMemcpy(stage, h, 4 * n, cudaMemcpyHostToDevice)) == cudaSuccess &&
            (err = cudaMemcpy(tab, &ch, sizeof(ch), cudaMemcpyHostToDevice)) == cudaSuccess &&
            (err = cudaMemcpy(dd, &dyn, sizeof(dyn), cudaMemcpyHostToDevice)) == cudaSuccess &&
            (!cs_t || (err = cudaMemcpy(dcs, cs_t, (size_t) (D * C) * 4, cudaMemcpyHostToDevice)) == cudaSuccess) &&
            (!cs_t || (err = cudaMemcpy(dcs + D * C, cs_p0, (size_t) D * 4, cudaMemcpyHostToDevice)) == cudaSuccess)) {
            st = moqae_cuda_kv_encode(&g, stage, stage + n, arena, tab, cs_t ? dcs : NULL, cs_t ? dcs + D * C : NULL, 1,
                                      dd, 0);
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

int moqae_cuda_imma_check(enum moqae_type type, int64_t n_rows, int64_t n_cols, int64_t n_tok, const uint8_t * rows,
                          const float * x, float * y) {
    if (!moqae_cuda_available()) {
        return moqae_fail(MOQAE_ERR_UNSUPPORTED, "no CUDA device");
    }
    if (!moqae_cuda_type_quantized(type) || n_rows < 1 || n_cols < 32 || n_cols % 32 != 0 || n_tok < 1) {
        return moqae_fail(MOQAE_ERR_INVALID_ARG, "int8 product check: bad case");
    }
    const size_t gguf_rb = moqae_type_row_bytes(type, n_cols), rb = moqae_cuda_weight_row_bytes(type, n_cols, gguf_rb);
    std::vector<uint8_t> host((size_t) n_rows * rb);
    moqae_cuda_repack_rows(type, n_cols, n_rows, rows, gguf_rb, host.data());
    const size_t wbytes = host.size(), xbytes = (size_t) (n_tok * n_cols) * 4, qbytes = moqae_cuda_quant_bytes(n_tok, n_cols);
    const size_t ybytes = (size_t) (n_tok * n_rows) * 4;
    uint8_t *    d      = NULL;
    int          st     = MOQAE_OK;
    cudaError_t  err    = cudaMalloc((void **) &d, wbytes + xbytes + qbytes + ybytes + 1024);
    if (err == cudaSuccess) {
        uint8_t * dw = d;
        float *   dx = (float *) (d + ((wbytes + 255) / 256) * 256);
        uint8_t * dq = (uint8_t *) dx + ((xbytes + 255) / 256) * 256;
        float *   dy = (float *) (dq + ((qbytes + 255) / 256) * 256);
        const struct moqae_cuda_weight w = { type, n_cols, n_rows, rb, dw };
        if ((err = cudaMemcpy(dw, host.data(), wbytes, cudaMemcpyHostToDevice)) == cudaSuccess &&
            (err = cudaMemcpy(dx, x, xbytes, cudaMemcpyHostToDevice)) == cudaSuccess) {
            st = moqae_cuda_quantize(dx, n_tok, n_cols, dq, 0);
            static const int variants[3] = { 0, 4, 1 };
            for (int v = 0; v < 3 && !st && err == cudaSuccess; v++) {
                if ((err = cudaMemset(dy, 0xff, ybytes)) == cudaSuccess &&
                    !(st = moqae_cuda_matmul_imma(&w, dq, n_tok, dy, n_rows, false, variants[v], 0)) &&
                    (err = cudaDeviceSynchronize()) == cudaSuccess) {
                    err = cudaMemcpy(y + (size_t) v * (size_t) (n_tok * n_rows), dy, ybytes, cudaMemcpyDeviceToHost);
                }
            }
            const int64_t tv = std::min<int64_t>(n_tok, MOQAE_CUDA_MMV_MAX_T); /* the decode mat-vec's tokens */
            if (!st && err == cudaSuccess && (err = cudaMemset(dy, 0xff, ybytes)) == cudaSuccess &&
                !(st = moqae_cuda_matmul(&w, dx, dq, tv, dy, n_rows, false, 0)) &&
                (err = cudaDeviceSynchronize()) == cudaSuccess) {
                err = cudaMemcpy(y + (size_t) 3 * (size_t) (n_tok * n_rows), dy, (size_t) (tv * n_rows) * 4,
                                 cudaMemcpyDeviceToHost);
            }
        }
        cudaFree(d);
    }
    if (!st && err != cudaSuccess) {
        st = moqae_fail(MOQAE_ERR_INTERNAL, "CUDA int8 product check: %s", cudaGetErrorString(err));
    }
    return st;
}

int moqae_cuda_attn_check(const struct moqae_cuda_attn_case * tc, float * out) {
    if (!moqae_cuda_available()) {
        return moqae_fail(MOQAE_ERR_UNSUPPORTED, "no CUDA device");
    }
    const int64_t C = 32, D = tc->head_dim, nkv = tc->n_head_kv, nch = tc->n_chunks, ns = tc->n_stage;
    struct moqae_kv_shape s = { C, D, D % MOQAE_KV_V_GROUP == 0 ? MOQAE_KV_V_GROUP : D };
    struct moqae_cuda_ring_geom g;
    const int64_t back = tc->stage_back;
    geom_of(&g, &s, (int) nkv, (back + 1) * C + 64);
    if (back < 0 || back > nch || ns < 1 || ns > (back + 1) * C || tc->n_tok < 1 || tc->n_tok > ns || nch < 0 ||
        nch > 4096) {
        return moqae_fail(MOQAE_ERR_INVALID_ARG, "attention check: bad case");
    }
    /* host images of the device buffers: records padded as the ring pads them */
    std::vector<moqae_cuda_chunk> tab((size_t) nch + 1);
    std::vector<uint8_t>          arena;
    size_t                        src = 0;
    int                           raw = 0;
    for (int64_t i = 0; i < nch; i++) {
        const int c = tc->codecs[i];
        tab[(size_t) i] = { (long long) (i * C), (long long) arena.size(), c, 0 };
        for (int64_t h = 0; h < nkv; h++) {
            const size_t o = arena.size();
            arena.resize(o + (size_t) (g.k_pad[c] + g.v_pad[c]), 0);
            memcpy(arena.data() + o, tc->records + src, (size_t) g.k_bytes[c]);
            memcpy(arena.data() + o + g.k_pad[c], tc->records + src + g.k_bytes[c], (size_t) g.v_bytes[c]);
            src += (size_t) (g.k_bytes[c] + g.v_bytes[c]);
        }
        if (c != 0) {
            raw = std::max(raw, (int) (g.k_pad[c] + g.v_pad[c]));
        }
    }
    arena.resize(arena.size() + 16);
    const int64_t rows = g.stage_rows, pos_stage = (nch - back) * C;
    std::vector<uint16_t> stage(2 * (size_t) (nkv * rows * D), 0);
    for (int64_t h = 0; h < nkv; h++) {
        for (int64_t j = 0; j < ns; j++) {
            for (int64_t d = 0; d < D; d++) {
                const size_t o = (size_t) ((h * rows + (pos_stage + j) % rows) * D + d), i = (size_t) ((h * ns + j) * D + d);
                stage[o]                           = moqae_f32_to_f16(tc->stage_k[i]);
                stage[(size_t) (nkv * rows * D) + o] = moqae_f32_to_f16(tc->stage_v[i]);
            }
        }
    }
    std::vector<float> cs_t, cs_p0;
    if (tc->theta) {
        cs_t.resize((size_t) (D * C));
        cs_p0.resize((size_t) ((nch + 1) * D));
        moqae_kv_rope_fill(D, C, 0, tc->theta, cs_t.data());
        for (int64_t i = 0; i < nch; i++) {
            moqae_kv_rope_fill(D, 1, i * C, tc->theta, cs_p0.data() + i * D);
        }
    }
    const int64_t n_head = tc->n_head, n_tok = tc->n_tok;
    const size_t  qn = (size_t) (n_tok * n_head * D);
    const struct moqae_cuda_dyn dyn = { (long long) (pos_stage + ns - n_tok), (int) n_tok, (int) nch, 0, 0 };
    struct moqae_cuda_attn_args a = {};
    const size_t part = moqae_cuda_attn_part_floats(&g, n_tok, n_head, tc->n_split);
    const size_t sz[] = { arena.size(), stage.size() * 2, tab.size() * sizeof(moqae_cuda_chunk), cs_t.size() * 4,
                          cs_p0.size() * 4, sizeof(dyn), qn * 4, qn * 4, part * 4 };
    size_t off[9], total = 0;
    for (int i = 0; i < 9; i++) {
        off[i] = total;
        total += (sz[i] + 255) / 256 * 256 + 256;
    }
    uint8_t *   d   = NULL;
    cudaError_t err = cudaMalloc((void **) &d, total);
    int         st  = MOQAE_OK;
    if (err == cudaSuccess) {
        a.arena   = d + off[0];
        a.stage_k = (const uint16_t *) (d + off[1]);
        a.stage_v = a.stage_k + nkv * rows * D;
        a.table   = (const moqae_cuda_chunk *) (d + off[2]);
        a.cs_t    = tc->theta ? (const float *) (d + off[3]) : NULL;
        a.cs_p0   = tc->theta ? (const float *) (d + off[4]) : NULL;
        a.dyn     = (const moqae_cuda_dyn *) (d + off[5]);
        a.q       = (const float *) (d + off[6]);
        a.out     = (float *) (d + off[7]);
        a.part    = (float *) (d + off[8]);
        a.n_tok = (int) n_tok, a.n_head = (int) n_head, a.n_split = tc->n_split, a.raw_bytes = raw;
        a.kernel = tc->kernel;
        a.scale = 1.0f / sqrtf((float) D);
        const void * host[] = { arena.data(), stage.data(), tab.data(), cs_t.data(), cs_p0.data(), &dyn, tc->q };
        for (int i = 0; i < 7 && err == cudaSuccess; i++) {
            if (sz[i]) {
                err = cudaMemcpy(d + off[i], host[i], sz[i], cudaMemcpyHostToDevice);
            }
        }
        if (err == cudaSuccess) {
            err = cudaMemset(a.out, 0xff, qn * 4); /* NaN: every element must be written */
        }
        if (err == cudaSuccess) {
            st = moqae_cuda_attention(&g, &a, 0);
            if (!st && (err = cudaDeviceSynchronize()) == cudaSuccess) {
                err = cudaMemcpy(out, a.out, qn * 4, cudaMemcpyDeviceToHost);
            }
        }
        cudaFree(d);
    }
    if (!st && err != cudaSuccess) {
        st = moqae_fail(MOQAE_ERR_INTERNAL, "CUDA attention check: %s", cudaGetErrorString(err));
    }
    return st;
}

int moqae_cuda_codec_encode_emulated(enum moqae_kv_codec c, const struct moqae_kv_shape * s, const float * k,
                                     const float * v, const float * cs_t, const float * cs_p0, uint8_t * krec,
                                     uint8_t * vrec) {
    MOQAE_TRY(moqae_kv_shape_check(c, s));
    const size_t          n = (size_t) (s->chunk * s->head_dim);
    std::vector<uint16_t> h(2 * n);
    for (size_t i = 0; i < n; i++) {
        h[i]     = moqae_f32_to_f16(k[i]);
        h[n + i] = moqae_f32_to_f16(v[i]);
    }
    return moqae_cuda_kv_encode_host((int) c, (int) s->chunk, (int) s->head_dim, (int) s->v_group, h.data(), h.data() + n,
                                     cs_t, cs_p0, krec, vrec);
}

int moqae_cuda_codec_demote_emulated(enum moqae_kv_codec old_codec, enum moqae_kv_codec new_codec,
                                     const struct moqae_kv_shape * s, const uint8_t * krec, const uint8_t * vrec,
                                     const float * cs_t, const float * cs_p0, uint8_t * kout, uint8_t * vout) {
    MOQAE_TRY(moqae_kv_shape_check(old_codec, s));
    MOQAE_TRY(moqae_kv_shape_check(new_codec, s));
    return moqae_cuda_kv_demote_host((int) old_codec, (int) new_codec, (int) s->chunk, (int) s->head_dim, (int) s->v_group,
                                     krec, vrec, cs_t, cs_p0, kout, vout);
}
