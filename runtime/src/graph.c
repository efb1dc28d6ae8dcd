/*
 * graph.c — the llama forward pass for one micro-batch, run by every thread of the context's pool
 * with barriers between ops (rows of each matrix product split across threads):
 *   x = embed(tokens)
 *   per layer: x += Wo·attn(rope(Wq·n(x)), rope(Wk·n(x)), Wv·n(x));  x += Wd·(silu(Wg·n(x)) * Wu·n(x))
 *   logits = Wout·n(x) for the requested tokens
 * n() is RMSNorm with the layer's weight. Reference: train/ (PyTorch) and llama.cpp's llama graph.
 */
#include "common.h"
#include "context.h"

#include <math.h>

/* Tokens per gemm call: keeps the converted activations of one block in L2 while the thread's
 * weight rows stream through. */
#define MOQAE_GEMM_TOKEN_BLOCK 64

struct fwd {
    struct moqae_context *       ctx;
    const struct moqae_model *   m;
    const struct moqae_hparams * hp;
    const struct moqae_cpu_kernels * K;
    int                          ith, nth;
};

static void barrier(const struct fwd * f) {
    moqae_threadpool_barrier(f->ctx->tp);
}

/* This thread's share [*lo, *hi) of n items, in multiples of `align`. */
static void split(int64_t n, int64_t align, int ith, int nth, int64_t * lo, int64_t * hi) {
    int64_t per = (n + nth - 1) / nth;
    per         = (per + align - 1) / align * align;
    *lo         = per * ith < n ? per * ith : n;
    *hi         = *lo + per < n ? *lo + per : n;
}

/* The converted activations of a matrix product's input: rows of type `vdt`, `row_bytes` apart. */
struct act {
    const void * data;
    size_t       row_bytes;
};

/* Convert row t of x ([.][n] f32) to type vdt into act slot `slot` (F32 needs no conversion). Only
 * fills this thread's row: callers partition rows by t and put a barrier before the product. */
static struct act act_row(const struct fwd * f, int slot, const float * x, int64_t n, int64_t t,
                          enum moqae_type vdt) {
    if (vdt == MOQAE_TYPE_F32) {
        return (struct act){ x, (size_t) n * sizeof(float) };
    }
    const size_t rb = moqae_type_row_bytes(vdt, n);
    MOQAE_ASSERT(rb <= f->ctx->act_row_cap);
    char * dst = f->ctx->act[slot];
    if (t >= 0) {
        f->K->type[vdt].from_float(x + t * n, dst + (size_t) t * rb, n);
    }
    return (struct act){ dst, rb };
}

/* Convert rows [0, n_tok) of x, split over threads, then a barrier. */
static struct act act_rows(const struct fwd * f, int slot, const float * x, int64_t n, int64_t n_tok,
                           enum moqae_type vdt) {
    struct act a = act_row(f, slot, x, n, -1, vdt);
    if (vdt != MOQAE_TYPE_F32) {
        for (int64_t t = f->ith; t < n_tok; t += f->nth) {
            act_row(f, slot, x, n, t, vdt);
        }
    }
    barrier(f);
    return a;
}

/* xn = rmsnorm(x) * w for rows [t0, n_tok), each converted for up to two weights' vec_dot types
 * (slots 0 and 1) by the thread that normed it, then one barrier. */
static void norm_act(const struct fwd * f, const float * x, const struct moqae_weight * w, float * xn, int64_t t0,
                     int64_t n_tok, const struct moqae_weight * wa, const struct moqae_weight * wb, struct act * a,
                     struct act * b) {
    const int64_t         n  = f->hp->n_embd;
    const enum moqae_type va = f->K->type[wa->type].vec_dot_type;
    const enum moqae_type vb = wb ? f->K->type[wb->type].vec_dot_type : va;
    *a                       = act_row(f, 0, xn + t0 * n, n, -1, va);
    *b                       = vb == va ? *a : act_row(f, 1, xn + t0 * n, n, -1, vb);
    for (int64_t t = t0 + f->ith; t < n_tok; t += f->nth) {
        f->K->rms_norm(n, x + t * n, (const float *) w->data, f->hp->rms_eps, xn + t * n);
        act_row(f, 0, xn + t0 * n, n, t - t0, va);
        if (vb != va) {
            act_row(f, 1, xn + t0 * n, n, t - t0, vb);
        }
    }
    barrier(f);
}

/* y[t][r] = W[r]·act[t] for this thread's rows r; then, if add_to, add_to[t][r] += y[t][r] for the
 * same rows (no other thread touches them, so no barrier is needed in between). */
static void matmul(const struct fwd * f, const struct moqae_weight * w, struct act a, int64_t n_tok, float * y,
                   float * add_to) {
    const void * act           = a.data;
    const size_t act_row_bytes = a.row_bytes;
    int64_t r0, r1;
    split(w->n_rows, 16, f->ith, f->nth, &r0, &r1);
    if (r0 >= r1) {
        return;
    }
    const moqae_gemm_fn gemm = f->K->type[w->type].gemm;
    for (int64_t t0 = 0; t0 < n_tok; t0 += MOQAE_GEMM_TOKEN_BLOCK) {
        const int64_t nt = n_tok - t0 < MOQAE_GEMM_TOKEN_BLOCK ? n_tok - t0 : MOQAE_GEMM_TOKEN_BLOCK;
        gemm(w->n_cols, r1 - r0, nt, (const char *) w->data + (size_t) r0 * w->row_bytes, w->row_bytes,
             (const char *) act + (size_t) t0 * act_row_bytes, act_row_bytes, y + t0 * w->n_rows + r0, w->n_rows);
    }
    if (add_to) {
        for (int64_t t = 0; t < n_tok; t++) {
            f->K->add(r1 - r0, y + t * w->n_rows + r0, add_to + t * w->n_rows + r0);
        }
    }
}

/* cos/sin of each position and rotary pair, computed as ggml does (theta *= theta_scale per pair,
 * in float) so that our RoPE matches llama.cpp's to the last bit of the angle. */
static void rope_table(const struct fwd * f) {
    const struct moqae_context * c     = f->ctx;
    const int64_t                half  = f->hp->n_rot / 2;
    const float                  scale = powf(f->hp->rope_base, -2.0f / (float) f->hp->n_rot);
    for (int64_t t = f->ith; t < c->job_n; t += f->nth) {
        float   theta = (float) (c->job_pos0 + t);
        float * cs    = c->rope_cs + t * half * 2;
        for (int64_t i = 0; i < half; i++) {
            cs[2 * i]     = cosf(theta);
            cs[2 * i + 1] = sinf(theta);
            theta *= scale;
        }
    }
}

/* Rotate adjacent pairs (v[2i], v[2i+1]) of the first n_rot dims of one head vector (GGUF llama
 * layout: the converter permuted Wq/Wk so that this "normal" RoPE is right). */
static void rope_head(const struct fwd * f, float * v, int64_t t) {
    const int64_t half = f->hp->n_rot / 2;
    const float * cs   = f->ctx->rope_cs + t * half * 2;
    for (int64_t i = 0; i < half; i++) {
        const float x0 = v[2 * i], x1 = v[2 * i + 1];
        v[2 * i]       = x0 * cs[2 * i] - x1 * cs[2 * i + 1];
        v[2 * i + 1]   = x0 * cs[2 * i + 1] + x1 * cs[2 * i];
    }
}

static void attention_block(const struct fwd * f, int64_t il) {
    struct moqae_context *       c  = f->ctx;
    const struct moqae_layer *   L  = &f->m->layers[il];
    const struct moqae_hparams * hp = f->hp;
    const int64_t                T = c->job_n, hd = hp->head_dim;
    struct act                   a, b;

    norm_act(f, c->x, &L->attn_norm, c->xn, 0, T, &L->wq, &L->wk, &a, &b);
    const bool v_like_k = f->K->type[L->wv.type].vec_dot_type == f->K->type[L->wk.type].vec_dot_type;
    matmul(f, &L->wq, a, T, c->q, NULL);
    matmul(f, &L->wk, b, T, c->k, NULL);
    if (v_like_k) {
        matmul(f, &L->wv, b, T, c->v, NULL);
    }
    barrier(f);
    if (!v_like_k) { /* a third vec_dot type in one layer: rare, convert again */
        matmul(f, &L->wv, act_rows(f, 1, c->xn, hp->n_embd, T, f->K->type[L->wv.type].vec_dot_type), T, c->v, NULL);
        barrier(f);
    }
    /* RoPE on every query and key head, then the cache copies and encodes by chunk segment */
    for (int64_t u = f->ith; u < T * hp->n_head; u += f->nth) {
        rope_head(f, c->q + u * hd, u / hp->n_head);
    }
    for (int64_t u = f->ith; u < T * hp->n_head_kv; u += f->nth) {
        rope_head(f, c->k + u * hd, u / hp->n_head_kv);
    }
    barrier(f);
    moqae_kv_cache_store(c->kv, il, T, c->k, c->v, f->ith, f->nth);
    barrier(f);
    float * scratch = c->attn_scratch + (int64_t) f->ith * c->attn_scratch_floats;
    moqae_kv_cache_attend(c->kv, f->K, il, T, hp->n_head, 1.0f / sqrtf((float) hd), c->q, c->att, scratch, f->ith,
                          f->nth);
    barrier(f);
    a = act_rows(f, 0, c->att, hp->n_head * hd, T, f->K->type[L->wo.type].vec_dot_type);
    matmul(f, &L->wo, a, T, c->tmp, c->x);
    barrier(f);
}

static void ffn_block(const struct fwd * f, int64_t il) {
    struct moqae_context *       c  = f->ctx;
    const struct moqae_layer *   L  = &f->m->layers[il];
    const struct moqae_hparams * hp = f->hp;
    const int64_t                T  = c->job_n;
    struct act                   a, b;

    norm_act(f, c->x, &L->ffn_norm, c->xn, 0, T, &L->w_gate, &L->w_up, &a, &b);
    matmul(f, &L->w_gate, a, T, c->gate, NULL);
    matmul(f, &L->w_up, b, T, c->up, NULL);
    /* gate and up rows were split identically, so each thread finishes its own rows */
    int64_t r0, r1;
    split(hp->n_ff, 16, f->ith, f->nth, &r0, &r1);
    if (r0 < r1) {
        for (int64_t t = 0; t < T; t++) {
            f->K->swiglu(r1 - r0, c->gate + t * hp->n_ff + r0, c->up + t * hp->n_ff + r0);
        }
    }
    barrier(f);
    a = act_rows(f, 0, c->gate, hp->n_ff, T, f->K->type[L->w_down.type].vec_dot_type);
    matmul(f, &L->w_down, a, T, c->tmp, c->x);
    barrier(f);
}

static void forward_worker(void * arg, int ith, int nth) {
    struct moqae_context * c = arg;
    struct fwd             f = { c, c->model, &c->model->hp, c->K, ith, nth };
    const int64_t          n = f.hp->n_embd, T = c->job_n;

    for (int64_t t = ith; t < T; t += nth) {
        const struct moqae_weight * e = &f.m->tok_embd;
        f.K->type[e->type].to_float((const char *) e->data + (size_t) c->job_tokens[t] * e->row_bytes, c->x + t * n,
                                    n);
    }
    rope_table(&f);
    barrier(&f);
    for (int64_t il = 0; il < c->n_layer_cpu; il++) {
        attention_block(&f, il);
        ffn_block(&f, il);
    }
    if (c->job_n_out > 0 && c->n_layer_cpu == f.hp->n_layer) { /* else the GPU's layers go on from c->x */
        struct act a, b;
        norm_act(&f, c->x, &f.m->output_norm, c->xn, T - c->job_n_out, T, &f.m->output, NULL, &a, &b);
        matmul(&f, &f.m->output, a, c->job_n_out, c->job_logits, NULL);
    }
}

/* The router's votes for the micro-batch's tokens, from their embeddings (layer 0's input). */
static void vote_worker(void * arg, int ith, int nth) {
    struct moqae_context *      c = arg;
    const struct moqae_weight * e = &c->model->tok_embd;
    const int64_t               n = c->model->hp.n_embd;
    float *                     x = c->router_scratch + (size_t) ith * (size_t) c->router_scratch_floats;
    for (int64_t t = ith; t < c->job_n; t += nth) {
        c->K->type[e->type].to_float((const char *) e->data + (size_t) c->job_tokens[t] * e->row_bytes, x, n);
        moqae_router_vote(c->router, c->K, x, c->votes + t * c->router->n_router, x + n);
    }
}

void moqae_graph_votes(struct moqae_context * ctx) {
    if (!ctx->router) {
        return;
    }
    if (ctx->job_n == 1) { /* decode: one token's MLP costs less than waking the pool */
        vote_worker(ctx, 0, 1);
    } else {
        moqae_threadpool_run(ctx->tp, vote_worker, ctx);
    }
}

int moqae_graph_forward(struct moqae_context * ctx) {
    moqae_graph_votes(ctx);
    int st = moqae_kv_cache_prepare(ctx->kv, ctx->job_n, ctx->router ? ctx->votes : NULL);
    if (st) {
        return st;
    }
    moqae_threadpool_run(ctx->tp, forward_worker, ctx);
    moqae_kv_cache_commit(ctx->kv, ctx->job_n);
    return MOQAE_OK;
}
