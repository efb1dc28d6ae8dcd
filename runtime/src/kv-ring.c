/*
 * kv-ring.c — the mixed-bit KV ring (kv-cache.h). Completed chunks are variable-size records appended
 * in position order to one byte arena, chunk by chunk: chunk i's records of layers 0..n_layer-1, each
 * with its own codec (routers may decide per layer or group), then chunk i+1's. The chunk table holds
 * each chunk's position and each (chunk, layer) record's codec and offset. One arena for all layers
 * makes the budget global: layers that a router keeps at INT2 leave their bytes to the layers it keeps
 * at INT4. The incomplete chunk and the micro-batch being computed live in an f32 staging window.
 * Overflow (the arena or the table full) evicts (shift) or re-encodes (demote) the oldest non-sink
 * chunks and compacts the arena, or fails (error). A ring built with arena_ops keeps only this
 * bookkeeping: its arena and staging window are the CUDA backend's, and the operations on the arena's
 * bytes (record moves, demotions) go to the ops, so the GPU ring takes every decision the CPU ring takes.
 *
 * Record of one chunk in one layer: for each KV head h: K record then V record (kv-codec.h).
 */
#include "common.h"
#include "kv-cache.h"

#include <math.h>

struct moqae_kv_cache {
    struct moqae_kv_config                cfg;
    struct moqae_kv_shape                 shape;
    const struct moqae_kv_codec_kernels * KK;
    int64_t                               n_tokens;   /* committed tokens                            */
    float *                               stage_k;    /* [n_layer][n_head_kv][stage_rows][head_dim]  */
    float *                               stage_v;
    uint8_t *                             stage_votes; /* [stage_rows][n_group] router votes         */
    int64_t                               stage_rows; /* C + n_batch                                 */
    int64_t                               stage_pos0; /* position of staging row 0 (multiple of C)   */
    int64_t *                             pos;        /* [cap_chunks] each stored chunk's first token */
    uint8_t *                             codec;      /* [cap_chunks][n_layer] each record's codec   */
    size_t *                              off;        /* [cap_chunks][n_layer] offset in the arena   */
    int64_t                               n_chunks, cap_chunks;
    uint8_t *                             arena;      /* [cap] records, chunk after chunk            */
    size_t                                cap;        /* the budget: bytes for all encoded chunks    */
    size_t                                used;       /* bytes of the arena in use (a prefix)        */
    uint8_t *                             new_codec;  /* [max_new][n_layer] chunks of one micro-batch */
    int64_t                               max_new;
    float *                               tmp;        /* [3][C][head_dim] for demotion               */
    /* keys before RoPE: rotation tables (kv-codec.h's struct moqae_kv_rope layouts) */
    float *                               theta;      /* [D/2] angle per position of each pair       */
    float *                               cs_t;       /* [D/2][2][C] offsets within a chunk          */
    float *                               cs_p0;      /* [cap_chunks][D/2][2] each stored chunk's P0 */
    uint8_t *                             tmp_rec;    /* one record                                  */
    float *                               dw;         /* [n_layer] demotion weights, or NULL (recency) */
    uint8_t *                             mark;       /* [cap_chunks][n_layer] records to demote       */
    int64_t *                             next;       /* [n_layer] per-layer scan position             */
    const struct moqae_kv_arena_ops *     ops;        /* records elsewhere (cfg.arena_ops), or NULL    */
};

/* ---- policies ---------------------------------------------------------------------------------- */

int moqae_kv_policy_parse(const char * s, struct moqae_kv_policy * out) {
    static const struct {
        const char *        name;
        enum moqae_kv_codec codec;
        bool                sink;
    } names[] = {
        { "fp16", MOQAE_KV_CODEC_F16, false },     { "int8", MOQAE_KV_CODEC_Q8, false },
        { "int4", MOQAE_KV_CODEC_Q4, false },      { "int2", MOQAE_KV_CODEC_Q2, false },
        { "sink+int8", MOQAE_KV_CODEC_Q8, true },  { "sink+int4", MOQAE_KV_CODEC_Q4, true },
        { "sink+int2", MOQAE_KV_CODEC_Q2, true },
    };
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        if (s && !strcmp(s, names[i].name)) {
            out->codec = names[i].codec;
            out->sink  = names[i].sink;
            return MOQAE_OK;
        }
    }
    return moqae_fail(MOQAE_ERR_INVALID_ARG,
                      "unknown KV policy '%s' (valid: fp16, int8, int4, int2, sink+int8, sink+int4, sink+int2)",
                      s ? s : "(null)");
}

/* ---- geometry ---------------------------------------------------------------------------------- */

static size_t padded(const struct moqae_kv_cache * kv, size_t n) {
    const size_t a = kv->cfg.rec_align > 1 ? (size_t) kv->cfg.rec_align : 1;
    return (n + a - 1) / a * a;
}

static size_t rec_k_bytes(const struct moqae_kv_cache * kv, int codec) {
    return padded(kv, moqae_kv_k_bytes((enum moqae_kv_codec) codec, &kv->shape));
}

static size_t rec_v_bytes(const struct moqae_kv_cache * kv, int codec) {
    return padded(kv, moqae_kv_v_bytes((enum moqae_kv_codec) codec, &kv->shape));
}

/* bytes of one chunk in one layer (all KV heads) */
static size_t chunk_bytes(const struct moqae_kv_cache * kv, int codec) {
    return (size_t) kv->cfg.n_head_kv * (rec_k_bytes(kv, codec) + rec_v_bytes(kv, codec));
}

static int rec_codec(const struct moqae_kv_cache * kv, int64_t i, int64_t layer) {
    return kv->codec[i * kv->cfg.n_layer + layer];
}

/* K record of stored chunk i, layer, KV head h; its V record follows it */
static uint8_t * rec_k(const struct moqae_kv_cache * kv, int64_t layer, int64_t i, int64_t h) {
    const int c = rec_codec(kv, i, layer);
    return kv->arena + kv->off[i * kv->cfg.n_layer + layer] +
           (size_t) h * (rec_k_bytes(kv, c) + rec_v_bytes(kv, c));
}

static uint8_t * rec_v(const struct moqae_kv_cache * kv, int64_t layer, int64_t i, int64_t h) {
    return rec_k(kv, layer, i, h) + rec_k_bytes(kv, rec_codec(kv, i, layer));
}

static float * stage_row(float * base, const struct moqae_kv_cache * kv, int64_t layer, int64_t h, int64_t row) {
    return base + (((size_t) layer * (size_t) kv->cfg.n_head_kv + (size_t) h) * (size_t) kv->stage_rows +
                   (size_t) row) * (size_t) kv->cfg.head_dim;
}

/* ---- keys before RoPE ----------------------------------------------------------------------------
 * The residual window and FP16 records hold keys after RoPE, rounded to f16 as an f16 cache holds them.
 * A quantized record holds the chunk's keys turned back to the frame before RoPE, R(-(P0 + t)) k, with
 * the cache's own tables (docs/KV-CODECS.md measures why): kq rotates them forward again with the same
 * tables, so only the quantization differs from an FP16 record. */

static bool rotated(const struct moqae_kv_cache * kv, int codec) {
    return kv->cs_p0 != NULL && codec != MOQAE_KV_CODEC_F16;
}

/* dst = R(-a) src for the pairs (2i, 2i+1): cos a_i at cs[2i * stride], sin a_i at cs[(2i + 1) * stride] */
static void unrotate(float * dst, const float * src, const float * cs, int64_t stride, int64_t D) {
    for (int64_t i = 0; i < D / 2; i++) {
        const float c = cs[2 * i * stride], sn = cs[(2 * i + 1) * stride];
        const float x = src[2 * i], y = src[2 * i + 1];
        dst[2 * i]     = x * c + y * sn;
        dst[2 * i + 1] = y * c - x * sn;
    }
}

/* The C keys of stored chunk i (rows ld apart, after RoPE) into dst [C][D], before RoPE. */
static void unrotate_chunk(const struct moqae_kv_cache * kv, int64_t i, const float * rows, int64_t ld, float * dst) {
    const int64_t C = kv->cfg.chunk, D = kv->cfg.head_dim;
    float         tmp[256];
    for (int64_t t = 0; t < C; t++) {
        unrotate(tmp, rows + t * ld, kv->cs_p0 + i * D, 1, D);
        unrotate(dst + t * D, tmp, kv->cs_t + t, C, D);
    }
}

/* ---- life cycle -------------------------------------------------------------------------------- */

/* Bytes that n_ctx tokens need in all layers: the fixed policy's exact size, or for a router the
 * expected bits at the most expensive bytes-per-bit of its experts, plus a quarter for documents that
 * route richer than the calibration text (never more than all chunks at the first expert). The arena
 * is shared by the layers, so only the total matters, however a router splits it between them. */
static uint64_t sized_capacity(const struct moqae_kv_cache * kv) {
    const struct moqae_kv_config * cfg    = &kv->cfg;
    const int64_t                  n_full = cfg->n_ctx / cfg->chunk;
    const int64_t                  n_sink = n_full > 0 && cfg->policy.sink;
    const uint64_t                 sink   = n_sink ? chunk_bytes(kv, MOQAE_KV_CODEC_F16) : 0;
    uint64_t                       per_chunk = chunk_bytes(kv, cfg->policy.codec);
    if (cfg->n_expert > 0) {
        const uint64_t worst   = (uint64_t) chunk_bytes(kv, cfg->expert[0]);
        double         per_bit = 0.0;
        for (int64_t e = 0; e < cfg->n_expert; e++) {
            const double r = (double) chunk_bytes(kv, cfg->expert[e]) / moqae_kv_codec_bits(cfg->expert[e]);
            per_bit        = r > per_bit ? r : per_bit;
        }
        const double b = 1.25 * cfg->expected_bits * per_bit;
        per_chunk      = cfg->expected_bits > 0.0 && b < (double) worst ? (uint64_t) b : worst;
    }
    return (sink + (uint64_t) (n_full - n_sink) * per_chunk) * (uint64_t) cfg->n_layer;
}

int moqae_kv_cache_new(const struct moqae_kv_config * cfg, struct moqae_kv_cache ** out) {
    *out = NULL;
    if (cfg->n_layer < 1 || cfg->n_head_kv < 1 || cfg->head_dim < 1 || cfg->n_ctx < 1 || cfg->n_batch < 1) {
        return moqae_fail(MOQAE_ERR_INVALID_ARG, "KV cache: bad shape");
    }
    if (cfg->chunk != 32 && cfg->chunk != 64) {
        return moqae_fail(MOQAE_ERR_INVALID_ARG, "KV chunk size must be 32 or 64, got %lld", (long long) cfg->chunk);
    }
    if (cfg->n_expert < 0 || cfg->n_expert > MOQAE_KV_CODEC_COUNT ||
        (cfg->n_expert > 0 && (cfg->n_group < 1 || cfg->group_size < 1 || cfg->layer0 < 0 ||
                               cfg->n_group * cfg->group_size < cfg->layer0 + cfg->n_layer))) {
        return moqae_fail(MOQAE_ERR_INVALID_ARG, "KV cache: bad routing shape");
    }
    struct moqae_kv_shape shape = { cfg->chunk, cfg->head_dim, MOQAE_KV_V_GROUP };
    if (cfg->head_dim % MOQAE_KV_V_GROUP != 0) {
        shape.v_group = cfg->head_dim;
    }
    for (int64_t e = 0; e <= cfg->n_expert; e++) {
        const enum moqae_kv_codec c = e < cfg->n_expert ? cfg->expert[e] : cfg->policy.codec;
        int                       st = moqae_kv_shape_check(c, &shape);
        if (st) {
            return moqae_fail_prefix(st, "KV codec %s on head_dim %lld: ", moqae_kv_codec_name(c),
                                     (long long) cfg->head_dim);
        }
    }
    struct moqae_kv_cache * kv = calloc(1, sizeof(*kv));
    if (!kv) {
        return moqae_fail(MOQAE_ERR_OUT_OF_MEMORY, "out of memory for the KV cache");
    }
    kv->cfg        = *cfg;
    kv->shape      = shape;
    kv->KK         = moqae_kv_codec_kernels();
    kv->cap_chunks = cfg->n_ctx / cfg->chunk + 1;
    kv->stage_rows = cfg->chunk + cfg->n_batch;
    kv->max_new    = cfg->n_batch / cfg->chunk + 2;
    if (kv->cfg.n_expert == 0) {
        kv->cfg.n_group = 1;
    }
    /* capacity from n_ctx and the policy's bits (not the FP16 worst case), or the budget */
    const uint64_t arena = cfg->budget > 0 ? (uint64_t) cfg->budget : sized_capacity(kv);
    uint64_t       stage = 0;
    if (!moqae_mul_ok((uint64_t) cfg->n_layer * (uint64_t) cfg->n_head_kv * (uint64_t) kv->stage_rows,
                      (uint64_t) cfg->head_dim * sizeof(float), &stage) ||
        arena > ((uint64_t) 1 << 42)) {
        moqae_kv_cache_free(kv);
        return moqae_fail(MOQAE_ERR_OUT_OF_MEMORY, "KV cache for n_ctx %lld is too large", (long long) cfg->n_ctx);
    }
    const size_t n_rec = (size_t) kv->cap_chunks * (size_t) cfg->n_layer;
    kv->ops            = cfg->arena_ops;
    if (kv->ops) { /* the records and the staging window live with the ops' owner */
        stage = 0;
    } else {
        kv->stage_k = moqae_aligned_alloc(stage);
        kv->stage_v = moqae_aligned_alloc(stage);
        kv->arena   = moqae_aligned_alloc(arena ? arena : 64);
    }
    kv->stage_votes = calloc((size_t) kv->stage_rows * (size_t) kv->cfg.n_group, 1);
    kv->pos         = calloc((size_t) kv->cap_chunks, sizeof(int64_t));
    kv->codec       = calloc(n_rec, 1);
    kv->off         = calloc(n_rec, sizeof(size_t));
    kv->new_codec   = calloc((size_t) kv->max_new * (size_t) cfg->n_layer, 1);
    kv->tmp         = moqae_aligned_alloc(3 * (size_t) cfg->chunk * (size_t) cfg->head_dim * sizeof(float));
    kv->tmp_rec     = moqae_aligned_alloc(2 * (size_t) cfg->chunk * (size_t) cfg->head_dim * 2 + 64);
    if (cfg->demote_weight) {
        kv->dw   = malloc((size_t) cfg->n_layer * sizeof(float));
        kv->mark = calloc(n_rec, 1);
        kv->next = calloc((size_t) cfg->n_layer, sizeof(int64_t));
        for (int64_t l = 0; kv->dw && l < cfg->n_layer; l++) {
            if (!(cfg->demote_weight[l] > 0.0f && isfinite(cfg->demote_weight[l]))) {
                moqae_kv_cache_free(kv);
                return moqae_fail(MOQAE_ERR_INVALID_ARG, "KV cache: demotion weight of layer %lld is %g, not positive",
                                  (long long) l, (double) cfg->demote_weight[l]);
            }
            kv->dw[l] = cfg->demote_weight[l];
        }
        kv->cfg.demote_weight = kv->dw;
    }
    if (cfg->keys_pre_rope) {
        const int64_t D = cfg->head_dim;
        kv->theta   = calloc((size_t) D / 2, sizeof(float));
        kv->cs_t    = malloc((size_t) (D * cfg->chunk) * sizeof(float));
        kv->cs_p0   = malloc((size_t) (kv->cap_chunks * D) * sizeof(float));
        if (!kv->theta || !kv->cs_t || !kv->cs_p0 || cfg->n_rot < 2 || cfg->n_rot > D || D > 256 ||
            cfg->n_rot % 2 || !(cfg->rope_base > 0.0f)) {
            moqae_kv_cache_free(kv);
            return moqae_fail(MOQAE_ERR_INVALID_ARG, "KV cache: bad RoPE shape or out of memory");
        }
        for (int64_t i = 0; i < cfg->n_rot / 2; i++) { /* the graph's angles: pos * base^(-2i / n_rot) */
            kv->theta[i] = (float) pow((double) cfg->rope_base, -2.0 * (double) i / (double) cfg->n_rot);
        }
        moqae_kv_rope_fill(D, cfg->chunk, 0, kv->theta, kv->cs_t);
    }
    if ((!kv->ops && (!kv->stage_k || !kv->stage_v || !kv->arena)) || !kv->stage_votes || !kv->pos ||
        !kv->codec || !kv->off || !kv->new_codec || !kv->tmp || !kv->tmp_rec ||
        (cfg->demote_weight && (!kv->dw || !kv->mark || !kv->next))) {
        moqae_kv_cache_free(kv);
        return moqae_fail(MOQAE_ERR_OUT_OF_MEMORY, "out of memory: the KV cache needs %.1f MiB",
                          (double) (arena + 2 * stage) / 1048576.0);
    }
    kv->cap = (size_t) arena;
    *out    = kv;
    return MOQAE_OK;
}

void moqae_kv_cache_free(struct moqae_kv_cache * kv) {
    if (!kv) {
        return;
    }
    free(kv->stage_k);
    free(kv->stage_v);
    free(kv->stage_votes);
    free(kv->arena);
    free(kv->pos);
    free(kv->codec);
    free(kv->off);
    free(kv->new_codec);
    free(kv->tmp);
    free(kv->tmp_rec);
    free(kv->theta);
    free(kv->cs_t);
    free(kv->cs_p0);
    free(kv->dw);
    free(kv->mark);
    free(kv->next);
    free(kv);
}

void moqae_kv_cache_clear(struct moqae_kv_cache * kv) {
    kv->n_tokens   = 0;
    kv->stage_pos0 = 0;
    kv->n_chunks   = 0;
    kv->used       = 0;
}

int64_t moqae_kv_cache_n_tokens(const struct moqae_kv_cache * kv) {
    return kv->n_tokens;
}

int64_t moqae_kv_cache_n_ctx(const struct moqae_kv_cache * kv) {
    return kv->cfg.n_ctx;
}

/* ---- routing ----------------------------------------------------------------------------------- */

/* The codec of every layer of the chunk with index `index` (its tokens' votes are in the staging
 * rows), into codecs[n_layer]. */
static void decide(const struct moqae_kv_cache * kv, int64_t index, uint8_t * codecs) {
    const struct moqae_kv_config * cfg = &kv->cfg;
    if (cfg->policy.sink && index == 0) {
        memset(codecs, MOQAE_KV_CODEC_F16, (size_t) cfg->n_layer);
        return;
    }
    if (cfg->n_expert == 0) {
        memset(codecs, cfg->policy.codec, (size_t) cfg->n_layer);
        return;
    }
    const int64_t   C  = cfg->chunk, G = cfg->n_group;
    const uint8_t * v0 = kv->stage_votes + (size_t) (index * C - kv->stage_pos0) * (size_t) G;
    for (int64_t g = 0; g < G; g++) {
        const int64_t l0 = g * cfg->group_size - cfg->layer0, l1 = l0 + cfg->group_size; /* this ring's layers */
        if (l1 <= 0 || l0 >= cfg->n_layer) {
            continue;
        }
        int64_t count[MOQAE_KV_CODEC_COUNT] = { 0 };
        for (int64_t t = 0; t < C; t++) {
            const uint8_t e = v0[t * G + g];
            count[e < cfg->n_expert ? e : 0]++;
        }
        int64_t best = 0;
        for (int64_t e = 1; e < cfg->n_expert; e++) {
            best = count[e] > count[best] ? e : best;
        }
        for (int64_t l = l0 > 0 ? l0 : 0; l < l1 && l < cfg->n_layer; l++) {
            codecs[l] = (uint8_t) cfg->expert[best];
        }
    }
}

/* ---- allocation and overflow ------------------------------------------------------------------- */

/* Memmove within the arena (dst < src), here or through the ops. */
static int arena_move(struct moqae_kv_cache * kv, size_t dst, size_t src, size_t n) {
    if (kv->ops) {
        return kv->ops->move(kv->ops->user, dst, src, n);
    }
    memmove(kv->arena + dst, kv->arena + src, n);
    return MOQAE_OK;
}

/* Demotion of chunk i of layer l to new_codec, written at arena offset dst, at or below the old
 * records (the new records are smaller and are written head by head after decoding each old one into
 * tmp, so a new record never reaches an old one not yet decoded); through the ops, one operation. */
static int demote_fill(struct moqae_kv_cache * kv, int64_t l, int64_t i, int new_codec, size_t dst) {
    const int64_t C   = kv->cfg.chunk, D = kv->cfg.head_dim;
    const int     old = rec_codec(kv, i, l);
    if (kv->ops) {
        const struct moqae_kv_demotion d = { kv->off[i * kv->cfg.n_layer + l], dst, old, new_codec,
                                             rotated(kv, new_codec) && !rotated(kv, old) ? kv->cs_p0 + i * D : NULL };
        return kv->ops->demote(kv->ops->user, &d);
    }
    float *      tk = kv->tmp, *tv = kv->tmp + C * D, *tk2 = kv->tmp + 2 * C * D;
    const size_t nk = rec_k_bytes(kv, new_codec), nv = rec_v_bytes(kv, new_codec);
    for (int64_t h = 0; h < kv->cfg.n_head_kv; h++) {
        moqae_kv_decode_k((enum moqae_kv_codec) old, &kv->shape, rec_k(kv, l, i, h), tk, D);
        moqae_kv_decode_v((enum moqae_kv_codec) old, &kv->shape, rec_v(kv, l, i, h), tv, D);
        if (rotated(kv, new_codec) && !rotated(kv, old)) { /* FP16 keys are after RoPE */
            unrotate_chunk(kv, i, tk, D, tk2);
            memcpy(tk, tk2, (size_t) (C * D) * sizeof(float));
        }
        memset(kv->tmp_rec, 0, nk + nv); /* the padding between and after the records: zeros */
        moqae_kv_encode_k((enum moqae_kv_codec) new_codec, &kv->shape, tk, D, kv->tmp_rec);
        moqae_kv_encode_v((enum moqae_kv_codec) new_codec, &kv->shape, tv, D, kv->tmp_rec + nk);
        memcpy(kv->arena + dst + (size_t) h * (nk + nv), kv->tmp_rec, nk + nv);
    }
    return MOQAE_OK;
}

/* Chunk i made smaller: each layer above INT2 re-encoded one codec lower (demote), or every record
 * removed (drop). The chunk's records move down over the bytes freed, then every later chunk's, so
 * the arena stays one compact prefix. */
static int chunk_shrink(struct moqae_kv_cache * kv, int64_t i, bool drop) {
    const int64_t L   = kv->cfg.n_layer;
    const size_t  end = i + 1 < kv->n_chunks ? kv->off[(i + 1) * L] : kv->used;
    size_t        at  = kv->off[i * L];
    int           st  = MOQAE_OK;
    for (int64_t l = 0; l < L && !drop && !st; l++) {
        const int c  = rec_codec(kv, i, l);
        const int nc = c < MOQAE_KV_CODEC_Q2 ? c + 1 : c;
        if (nc != c) {
            st = demote_fill(kv, l, i, nc, at);
            kv->codec[i * L + l] = (uint8_t) nc;
        } else if (at != kv->off[i * L + l]) {
            st = arena_move(kv, at, kv->off[i * L + l], chunk_bytes(kv, c));
        }
        kv->off[i * L + l] = at;
        at += chunk_bytes(kv, nc);
    }
    const size_t freed = end - at;
    if (!st && kv->used > end && at < end) {
        st = arena_move(kv, at, end, kv->used - end);
    }
    for (int64_t r = (i + 1) * L; r < kv->n_chunks * L; r++) {
        kv->off[r] -= freed;
    }
    kv->used -= freed;
    return st;
}

static int evict(struct moqae_kv_cache * kv, int64_t i) {
    const int64_t L  = kv->cfg.n_layer;
    const int     st = chunk_shrink(kv, i, true);
    const size_t after = (size_t) (kv->n_chunks - i - 1);
    memmove(&kv->pos[i], &kv->pos[i + 1], after * sizeof(int64_t));
    memmove(kv->codec + i * L, kv->codec + (i + 1) * L, after * (size_t) L);
    memmove(kv->off + i * L, kv->off + (i + 1) * L, after * (size_t) L * sizeof(size_t));
    if (kv->cs_p0) {
        const int64_t D = kv->cfg.head_dim;
        memmove(kv->cs_p0 + i * D, kv->cs_p0 + (i + 1) * D, after * (size_t) D * sizeof(float));
    }
    kv->n_chunks--;
    return st;
}

/* Whether stored chunk i is the attention sink that overflow never touches (chunk 0 under a sink
 * policy or a router's routing freezing). */
static bool is_sink(const struct moqae_kv_cache * kv, int64_t i) {
    return kv->cfg.policy.sink && kv->pos[i] == 0;
}

/* The oldest chunk that overflow may touch: not the sink, not allocated in this micro-batch
 * (index < n_old), and for demotion not already at the lowest codec in every layer. -1 if none. */
static int64_t victim(const struct moqae_kv_cache * kv, int64_t n_old, bool for_demotion) {
    for (int64_t i = 0; i < n_old; i++) {
        if (is_sink(kv, i)) {
            continue;
        }
        if (for_demotion) {
            bool lower = false;
            for (int64_t l = 0; l < kv->cfg.n_layer && !lower; l++) {
                lower = rec_codec(kv, i, l) < MOQAE_KV_CODEC_Q2;
            }
            if (!lower) {
                continue;
            }
        }
        return i;
    }
    return -1;
}

/* Weighted demotion (cfg.demote_weight): marks records to take one codec lower, largest
 * age * weight[layer] first (ties: the older chunk, then the lower layer), until `need` bytes would be
 * freed or no record is left (the sink, chunks of this micro-batch (index >= n_old) and INT2 records are
 * not candidates). Each layer's candidate is its oldest unmarked record above INT2, so one pick costs
 * O(n_layer). Returns the first marked chunk, or -1 if nothing could be marked. */
static int64_t mark_weighted(struct moqae_kv_cache * kv, int64_t n_old, int64_t now, size_t need) {
    const int64_t L = kv->cfg.n_layer, C = kv->cfg.chunk;
    int64_t       first = -1;
    size_t        freed = 0;
    for (int64_t l = 0; l < L; l++) {
        kv->next[l] = 0;
    }
    while (freed < need) {
        int64_t best_l = -1;
        double  best   = -1.0;
        for (int64_t l = 0; l < L; l++) {
            int64_t i = kv->next[l];
            while (i < n_old &&
                   (is_sink(kv, i) || kv->mark[i * L + l] || rec_codec(kv, i, l) >= MOQAE_KV_CODEC_Q2)) {
                i++;
            }
            kv->next[l] = i;
            if (i < n_old) {
                const double key = (double) (now - kv->pos[i] / C) * kv->dw[l];
                if (key > best || (key == best && i < kv->next[best_l])) {
                    best   = key;
                    best_l = l;
                }
            }
        }
        if (best_l < 0) {
            break;
        }
        const int64_t i = kv->next[best_l];
        const int     c = rec_codec(kv, i, best_l);
        kv->mark[i * L + best_l] = 1;
        freed += chunk_bytes(kv, c) - chunk_bytes(kv, c + 1);
        first = first < 0 || i < first ? i : first;
    }
    return first;
}

/* The marked records (from chunk `first` on) re-encoded one codec lower; every record from there moves
 * down over the bytes freed, so the arena stays one compact prefix. Clears the marks. */
static int shrink_marked(struct moqae_kv_cache * kv, int64_t first) {
    const int64_t L  = kv->cfg.n_layer;
    size_t        at = kv->off[first * L];
    int           st = MOQAE_OK;
    for (int64_t r = first * L; r < kv->n_chunks * L; r++) {
        const int64_t i = r / L, l = r % L;
        const int     c = rec_codec(kv, i, l);
        if (kv->mark[r]) {
            st           = st ? st : demote_fill(kv, l, i, c + 1, at);
            kv->codec[r] = (uint8_t) (c + 1);
            kv->mark[r]  = 0;
        } else if (at != kv->off[r] && !st) {
            st = arena_move(kv, at, kv->off[r], chunk_bytes(kv, c));
        }
        kv->off[r] = at;
        at += chunk_bytes(kv, kv->codec[r]);
    }
    kv->used = at;
    return st;
}

/* Bytes of a chunk with these per-layer codecs. */
static size_t codecs_bytes(const struct moqae_kv_cache * kv, const uint8_t * codecs) {
    size_t n = 0;
    for (int64_t l = 0; l < kv->cfg.n_layer; l++) {
        n += chunk_bytes(kv, codecs[l]);
    }
    return n;
}

/* Whether a chunk with these per-layer codecs fits now. */
static bool fits(const struct moqae_kv_cache * kv, const uint8_t * codecs) {
    return kv->n_chunks < kv->cap_chunks && kv->used + codecs_bytes(kv, codecs) <= kv->cap;
}

static int budget_full(const struct moqae_kv_cache * kv, const char * what) {
    return moqae_fail(MOQAE_ERR_CONTEXT_FULL, "context full: the KV budget (%.2f MiB) %s",
                      (double) kv->cap / 1048576.0, what);
}

int moqae_kv_cache_prepare(struct moqae_kv_cache * kv, int64_t n_tok, const uint8_t * votes) {
    const int64_t C = kv->cfg.chunk, L = kv->cfg.n_layer, G = kv->cfg.n_group;
    const int64_t n_new = (kv->n_tokens + n_tok) / C - kv->n_tokens / C; /* chunks this micro-batch completes */
    int64_t       n_old = kv->n_chunks;                                   /* chunks stored before it        */
    MOQAE_ASSERT(n_new <= kv->max_new && kv->n_tokens + n_tok - kv->stage_pos0 <= kv->stage_rows);
    if (kv->cfg.overflow == MOQAE_KV_OVERFLOW_ERROR || kv->cfg.overflow == MOQAE_KV_OVERFLOW_DEMOTE) {
        if (kv->n_tokens + n_tok > kv->cfg.n_ctx) {
            return moqae_fail(MOQAE_ERR_CONTEXT_FULL,
                              "context full: %lld tokens in the context + %lld new > n_ctx %lld",
                              (long long) kv->n_tokens, (long long) n_tok, (long long) kv->cfg.n_ctx);
        }
    }
    if (votes) { /* rows past the committed tokens: rewritten by the next prepare if this one fails */
        memcpy(kv->stage_votes + (size_t) (kv->n_tokens - kv->stage_pos0) * (size_t) G, votes,
               (size_t) (n_tok * G));
    }
    for (int64_t i = 0; i < n_new; i++) {
        decide(kv, kv->n_tokens / C + i, kv->new_codec + i * L);
    }
    /* check first (error policy: nothing may change when it does not fit) */
    size_t new_bytes = 0; /* the new chunks at the codecs decided for them */
    for (int64_t i = 0; i < n_new; i++) {
        new_bytes += codecs_bytes(kv, kv->new_codec + i * L);
    }
    if (kv->cfg.overflow == MOQAE_KV_OVERFLOW_ERROR) {
        if (kv->used + new_bytes > kv->cap || n_old + n_new > kv->cap_chunks) {
            return budget_full(kv, "holds no more chunks; raise --kv-budget or use --kv-overflow shift|demote");
        }
    }
    if (kv->cfg.overflow == MOQAE_KV_OVERFLOW_DEMOTE && kv->used + new_bytes > kv->cap) {
        size_t need = new_bytes; /* demote nothing when even every older record at int2 would not do */
        for (int64_t r = 0; r < n_old * L; r++) {
            need += chunk_bytes(kv, is_sink(kv, r / L) ? rec_codec(kv, r / L, r % L) : MOQAE_KV_CODEC_Q2);
        }
        if (need > kv->cap) {
            return budget_full(kv, "cannot hold the chunks of this micro-batch even with every older chunk at "
                                   "int2 (nothing was demoted); raise --kv-budget or lower -b");
        }
    }
    for (int64_t i = 0; i < n_new; i++) {
        const uint8_t * codecs = kv->new_codec + i * L;
        while (!fits(kv, codecs)) {
            const bool dem = kv->cfg.overflow == MOQAE_KV_OVERFLOW_DEMOTE && kv->n_chunks < kv->cap_chunks;
            if (dem && kv->dw) {
                const size_t  want  = kv->used + codecs_bytes(kv, codecs) - kv->cap;
                const int64_t first = mark_weighted(kv, n_old, kv->n_tokens / C + i, want);
                if (first >= 0) {
                    const int st = shrink_marked(kv, first);
                    if (st) {
                        return st;
                    }
                    continue;
                }
            }
            const int64_t v = dem && kv->dw ? -1 : victim(kv, n_old, dem);
            if (v < 0 || kv->cfg.overflow == MOQAE_KV_OVERFLOW_ERROR) {
                return budget_full(kv, dem ? "cannot hold the chunks of this micro-batch even after demoting every "
                                             "older chunk to int2; raise --kv-budget or lower -b"
                                           : "cannot hold the chunks of this micro-batch even after evicting every "
                                             "older chunk; raise --kv-budget or lower -b");
            }
            const int st = dem ? chunk_shrink(kv, v, false) : evict(kv, v);
            if (st) {
                return st; /* the arena's owner failed (a device error): the ring must be cleared */
            }
            n_old -= !dem;
        }
        const int64_t j = kv->n_chunks++;
        kv->pos[j] = (kv->n_tokens / C + i) * C;
        if (kv->cs_p0) {
            moqae_kv_rope_fill(kv->cfg.head_dim, 1, kv->pos[j], kv->theta, kv->cs_p0 + j * kv->cfg.head_dim);
        }
        for (int64_t l = 0; l < L; l++) {
            kv->codec[j * L + l] = codecs[l];
            kv->off[j * L + l]   = kv->used;
            kv->used += chunk_bytes(kv, codecs[l]);
        }
    }
    return MOQAE_OK;
}

/* ---- store, attend, commit --------------------------------------------------------------------- */

/* The index of the stored chunk at position pos (it was allocated by prepare), or -1. */
static int64_t find_chunk(const struct moqae_kv_cache * kv, int64_t pos) {
    for (int64_t i = kv->n_chunks - 1; i >= 0; i--) {
        if (kv->pos[i] == pos) {
            return i;
        }
        if (kv->pos[i] < pos) {
            break;
        }
    }
    return -1;
}

/* The residual window holds K/V at the model's KV precision, f16 (as llama.cpp's f16 cache), kept in
 * f32 storage for the dot products: so "--kv fp16" stores every token exactly as an f16 cache does,
 * and a chunk's FP16 record is lossless. */
static void to_f16_precision(float * dst, const float * src, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        dst[i] = moqae_f16_to_f32(moqae_f32_to_f16(src[i]));
    }
}

void moqae_kv_cache_store(struct moqae_kv_cache * kv, int64_t layer, int64_t n_tok, const float * k, const float * v,
                          int ith, int nth) {
    const int64_t C = kv->cfg.chunk, D = kv->cfg.head_dim, nkv = kv->cfg.n_head_kv;
    const int64_t p0 = kv->n_tokens, p1 = kv->n_tokens + n_tok;
    const int64_t c0 = p0 / C, n_seg = (p1 - 1) / C - c0 + 1;
    /* one unit = one chunk segment of one KV head: copy its rows, encode it if it is complete, so no
     * other thread touches these rows in between */
    for (int64_t u = ith; u < n_seg * nkv; u += nth) {
        const int64_t seg = u / nkv, h = u % nkv;
        const int64_t s0 = (c0 + seg) * C > p0 ? (c0 + seg) * C : p0;
        const int64_t s1 = (c0 + seg + 1) * C < p1 ? (c0 + seg + 1) * C : p1;
        for (int64_t p = s0; p < s1; p++) {
            const int64_t t = p - p0;
            to_f16_precision(stage_row(kv->stage_k, kv, layer, h, p - kv->stage_pos0), k + (t * nkv + h) * D, D);
            to_f16_precision(stage_row(kv->stage_v, kv, layer, h, p - kv->stage_pos0), v + (t * nkv + h) * D, D);
        }
        if (s1 == (c0 + seg + 1) * C) { /* the chunk is complete: encode it */
            const int64_t i  = find_chunk(kv, (c0 + seg) * C);
            const int64_t r0 = (c0 + seg) * C - kv->stage_pos0;
            MOQAE_ASSERT(i >= 0);
            const enum moqae_kv_codec codec = (enum moqae_kv_codec) rec_codec(kv, i, layer);
            const float *             keys  = stage_row(kv->stage_k, kv, layer, h, r0);
            if (rotated(kv, codec)) {
                float pre[64 * 256]; /* C x D <= 64 x 256 (moqae_kv_cache_new checks) */
                unrotate_chunk(kv, i, keys, D, pre);
                moqae_kv_encode_k(codec, &kv->shape, pre, D, rec_k(kv, layer, i, h));
            } else {
                moqae_kv_encode_k(codec, &kv->shape, keys, D, rec_k(kv, layer, i, h));
            }
            moqae_kv_encode_v(codec, &kv->shape, stage_row(kv->stage_v, kv, layer, h, r0), D, rec_v(kv, layer, i, h));
        }
    }
}

int64_t moqae_kv_cache_scratch_floats(const struct moqae_kv_cache * kv, int64_t n_head) {
    const int64_t group = n_head / kv->cfg.n_head_kv;
    return group * (kv->cap_chunks * kv->cfg.chunk + kv->cfg.chunk) + group * kv->cfg.head_dim;
}

void moqae_kv_cache_attend(const struct moqae_kv_cache * kv, const struct moqae_cpu_kernels * K, int64_t layer,
                           int64_t n_tok, int64_t n_head, float scale, const float * q, float * out, float * scratch,
                           int ith, int nth) {
    const int64_t C = kv->cfg.chunk, D = kv->cfg.head_dim, nkv = kv->cfg.n_head_kv, group = n_head / nkv;
    const int64_t ld_s = kv->cap_chunks * C + C; /* a score row: every stored chunk + the own chunk */
    float *       s    = scratch;                /* [group][ld_s] */
    for (int64_t u = ith; u < n_tok * nkv; u += nth) {
        const int64_t t = u / nkv, hk = u % nkv, p = kv->n_tokens + t;
        const int64_t own = p / C * C; /* first position of the token's own chunk */
        const float * qh  = q + (t * n_head + hk * group) * D;
        float *       oh  = out + (t * n_head + hk * group) * D;
        int64_t       n   = 0;       /* scores so far in each row */
        int64_t       nc  = 0;       /* stored chunks before the own chunk */
        while (nc < kv->n_chunks && kv->pos[nc] < own) {
            nc++;
        }
        for (int64_t g = 0; g < group; g++) {
            memset(s + g * ld_s, 0, (size_t) (nc * C) * sizeof(float));
        }
        for (int64_t i = 0; i < nc; i++, n += C) {
            const int                  codec = rec_codec(kv, i, layer);
            const struct moqae_kv_rope rope  = { 1, kv->cs_t, kv->cs_p0 ? kv->cs_p0 + i * D : NULL };
            kv->KK->kq[codec](&kv->shape, rotated(kv, codec) ? &rope : NULL, rec_k(kv, layer, i, hk), group, qh, D,
                              s + n, ld_s);
        }
        const int64_t r0 = own - kv->stage_pos0, r1 = p - kv->stage_pos0; /* own rows r0..r1 */
        for (int64_t g = 0; g < group; g++) {
            float * sg = s + g * ld_s;
            for (int64_t r = r0; r <= r1; r++) {
                sg[n + r - r0] = K->dot_f32(D, qh + g * D, stage_row(kv->stage_k, kv, layer, hk, r));
            }
            K->softmax(n + r1 - r0 + 1, scale, sg);
            float * og = oh + g * D;
            memset(og, 0, (size_t) D * sizeof(float));
            for (int64_t r = r0; r <= r1; r++) {
                const float   w  = sg[n + r - r0];
                const float * vr = stage_row(kv->stage_v, kv, layer, hk, r);
                for (int64_t d = 0; d < D; d++) {
                    og[d] += w * vr[d];
                }
            }
        }
        for (int64_t i = 0; i < nc; i++) {
            kv->KK->pv[rec_codec(kv, i, layer)](&kv->shape, rec_v(kv, layer, i, hk), group, s + i * C, ld_s, oh, D);
        }
    }
}

void moqae_kv_cache_commit(struct moqae_kv_cache * kv, int64_t n_tok) {
    const int64_t C = kv->cfg.chunk, D = kv->cfg.head_dim, G = kv->cfg.n_group;
    kv->n_tokens += n_tok;
    const int64_t pos0 = kv->n_tokens / C * C; /* the new incomplete chunk starts here */
    const int64_t keep = kv->n_tokens - pos0, from = pos0 - kv->stage_pos0;
    if (from > 0 && keep > 0) {
        for (int64_t l = 0; l < kv->cfg.n_layer && !kv->ops; l++) {
            for (int64_t h = 0; h < kv->cfg.n_head_kv; h++) {
                memmove(stage_row(kv->stage_k, kv, l, h, 0), stage_row(kv->stage_k, kv, l, h, from),
                        (size_t) (keep * D) * sizeof(float));
                memmove(stage_row(kv->stage_v, kv, l, h, 0), stage_row(kv->stage_v, kv, l, h, from),
                        (size_t) (keep * D) * sizeof(float));
            }
        }
        memmove(kv->stage_votes, kv->stage_votes + (size_t) (from * G), (size_t) (keep * G));
    }
    kv->stage_pos0 = pos0;
}

void moqae_kv_cache_stats(const struct moqae_kv_cache * kv, struct moqae_kv_stats * out) {
    memset(out, 0, sizeof(*out));
    const int64_t C = kv->cfg.chunk, D = kv->cfg.head_dim, L = kv->cfg.n_layer;
    const double  per_token_elems = 2.0 * (double) (L * kv->cfg.n_head_kv * D);
    double        code_bits = 0.0; /* per layer, summed over tokens */
    for (int64_t i = 0; i < kv->n_chunks; i++) {
        for (int64_t l = 0; l < L; l++) {
            const int c = rec_codec(kv, i, l);
            out->n_records[c]++;
            code_bits += (double) moqae_kv_codec_bits((enum moqae_kv_codec) c) * (double) C / (double) L;
        }
    }
    for (int e = 0; e < 4; e++) { /* chunk-equivalents: exact when every layer shares the decision */
        out->n_chunks[e] = (out->n_records[e] + L / 2) / L;
    }
    const int64_t resid = kv->n_tokens - kv->stage_pos0; /* f32 residual window */
    const int64_t held  = kv->n_chunks * C + resid;
    code_bits += 16.0 * (double) resid; /* f16 values (in f32 storage: effective bits count 32) */
    out->n_tokens       = held;
    out->n_ctx          = kv->cfg.n_ctx;
    const double resid_bytes = (double) resid * per_token_elems * 4.0;
    out->bytes_used          = (int64_t) ((double) kv->used + resid_bytes);
    out->bytes_reserved      = (int64_t) ((double) kv->cap +
                                     2.0 * (double) (L * kv->cfg.n_head_kv * kv->stage_rows * D) * 4.0);
    if (held > 0) {
        out->nominal_bits   = code_bits / (double) held;
        out->effective_bits = (double) out->bytes_used * 8.0 / ((double) held * per_token_elems);
    }
}

void moqae_kv_cache_table(const struct moqae_kv_cache * kv, struct moqae_kv_table * out) {
    out->n_chunks   = kv->n_chunks;
    out->cap_chunks = kv->cap_chunks;
    out->n_layer    = kv->cfg.n_layer;
    out->pos        = kv->pos;
    out->codec      = kv->codec;
    out->off        = kv->off;
    out->cs_p0      = kv->cs_p0;
    out->cap        = kv->cap;
    out->used       = kv->used;
    out->arena      = kv->arena;
}
