/*
 * router.c — loading a MoQAE router GGUF (docs/ROUTER-FORMAT.md), checking it against the model, and
 * the per-token votes. Every key and tensor is validated before use; a router for another model is
 * refused by its base-model keys and the fingerprint of the model's token embeddings.
 */
#include "router.h"

#include "common.h"

#include <math.h>

#define KEY(name) "moqae-router." name

static int get_u32_range(const struct moqae_gguf * g, const char * key, uint32_t lo, uint32_t hi, int64_t * out) {
    uint32_t v  = 0;
    int      st = moqae_gguf_get_u32(g, key, &v);
    if (st == MOQAE_ERR_NOT_FOUND) {
        return moqae_fail(MOQAE_ERR_FORMAT, "not a router file: key '%s' is missing", key);
    }
    if (st) {
        return st;
    }
    if (v < lo || v > hi) {
        return moqae_fail(MOQAE_ERR_FORMAT, "key '%s' is %u, expected %u..%u", key, v, lo, hi);
    }
    *out = v;
    return MOQAE_OK;
}

static int get_required(int st, const char * key) {
    if (st == MOQAE_ERR_NOT_FOUND) {
        return moqae_fail(MOQAE_ERR_FORMAT, "not a router file: key '%s' is missing", key);
    }
    return st;
}

/* Optional: the per-layer demotion weights (f32[n_layer], each positive and finite). */
static int load_demote_weight(struct moqae_router * r) {
    const struct moqae_gguf_kv * w = moqae_gguf_find_kv(r->gguf, KEY("demote_weight"));
    if (!w) {
        return MOQAE_OK;
    }
    if (w->type != MOQAE_GGUF_ARRAY || w->arr_type != MOQAE_GGUF_FLOAT32 || w->arr_n != (uint64_t) r->n_layer) {
        return moqae_fail(MOQAE_ERR_FORMAT, "key '%s' must be an array of %lld f32 (one per layer)", KEY("demote_weight"),
                          (long long) r->n_layer);
    }
    if (!(r->demote_weight = malloc((size_t) r->n_layer * sizeof(float)))) {
        return moqae_fail(MOQAE_ERR_OUT_OF_MEMORY, "out of memory for the router");
    }
    for (int64_t l = 0; l < r->n_layer; l++) {
        const double v = moqae_gguf_arr_f64(w, (uint64_t) l);
        if (!(v > 0.0 && v <= 1e6)) {
            return moqae_fail(MOQAE_ERR_FORMAT, "key '%s': layer %lld's weight %g is not in (0, 1e6]",
                              KEY("demote_weight"), (long long) l, v);
        }
        r->demote_weight[l] = (float) v;
    }
    return MOQAE_OK;
}

/* The experts: codec names and bits, highest precision first, no repeats. */
static int load_experts(struct moqae_router * r) {
    const struct moqae_gguf_kv * names = NULL, * bits = NULL;
    int st = get_required(moqae_gguf_get_arr(r->gguf, KEY("experts.codec"), MOQAE_GGUF_STRING, &names),
                          KEY("experts.codec"));
    if (st) {
        return st;
    }
    if (!(bits = moqae_gguf_find_kv(r->gguf, KEY("experts.bits")))) {
        return moqae_fail(MOQAE_ERR_FORMAT, "not a router file: key '%s' is missing", KEY("experts.bits"));
    }
    if (bits->type != MOQAE_GGUF_ARRAY || (bits->arr_type != MOQAE_GGUF_UINT32 && bits->arr_type != MOQAE_GGUF_INT32)) {
        return moqae_fail(MOQAE_ERR_FORMAT, "key '%s' must be an array of u32", KEY("experts.bits"));
    }
    if (names->arr_n < 2 || names->arr_n > MOQAE_ROUTER_MAX_EXPERTS || bits->arr_n != names->arr_n) {
        return moqae_fail(MOQAE_ERR_FORMAT, "the router needs 2 to %d experts with one bit width each (got %llu names, "
                          "%llu widths)", MOQAE_ROUTER_MAX_EXPERTS, (unsigned long long) names->arr_n,
                          (unsigned long long) bits->arr_n);
    }
    r->n_expert = (int64_t) names->arr_n;
    for (int64_t e = 0; e < r->n_expert; e++) {
        const struct moqae_gguf_str n = names->arr_strs[e];
        int                         c = -1;
        for (int k = 0; k < MOQAE_KV_CODEC_COUNT; k++) {
            if (moqae_gguf_str_eq(n, moqae_kv_codec_name((enum moqae_kv_codec) k))) {
                c = k;
            }
        }
        if (c < 0) {
            return moqae_fail(MOQAE_ERR_UNSUPPORTED, "router expert %lld is '%.*s', not a codec this runtime has "
                              "(fp16, int8, int4, int2)", (long long) e, (int) (n.len > 32 ? 32 : n.len), n.ptr);
        }
        const int64_t b = moqae_gguf_arr_i64(bits, (uint64_t) e);
        if (b != moqae_kv_codec_bits((enum moqae_kv_codec) c)) {
            return moqae_fail(MOQAE_ERR_FORMAT, "router expert %lld is %s but claims %lld bits", (long long) e,
                              moqae_kv_codec_name((enum moqae_kv_codec) c), (long long) b);
        }
        if (e > 0 && c <= (int) r->expert[e - 1]) {
            return moqae_fail(MOQAE_ERR_FORMAT, "router experts must be distinct and ordered from the highest "
                              "precision to the lowest");
        }
        r->expert[e] = (enum moqae_kv_codec) c;
        r->bits[e]   = (int32_t) b;
    }
    return MOQAE_OK;
}

/* The model's side of the check. */
static int check_base(const struct moqae_router * r, const struct moqae_model * m) {
    struct moqae_gguf_str want, have;
    int st = get_required(moqae_gguf_get_str(r->gguf, KEY("base.architecture"), &want), KEY("base.architecture"));
    if (st || (st = moqae_gguf_get_str(m->gguf, "general.architecture", &have))) {
        return st;
    }
    if (want.len != have.len || memcmp(want.ptr, have.ptr, want.len) != 0) {
        return moqae_fail(MOQAE_ERR_INVALID_ARG, "the router was trained for a '%.*s' model, this model is '%.*s'",
                          (int) (want.len > 64 ? 64 : want.len), want.ptr, (int) (have.len > 64 ? 64 : have.len), have.ptr);
    }
    int64_t n_embd = 0, n_layer = 0, n_vocab = 0;
    if ((st = get_u32_range(r->gguf, KEY("base.n_embd"), 1, UINT32_MAX, &n_embd)) ||
        (st = get_u32_range(r->gguf, KEY("base.n_layer"), 1, UINT32_MAX, &n_layer)) ||
        (st = get_u32_range(r->gguf, KEY("base.n_vocab"), 1, UINT32_MAX, &n_vocab))) {
        return st;
    }
    if (n_embd != m->hp.n_embd || n_layer != m->hp.n_layer || n_vocab != m->hp.n_vocab) {
        return moqae_fail(MOQAE_ERR_INVALID_ARG, "the router was trained for a model with n_embd %lld, n_layer %lld, "
                          "n_vocab %lld; this model has %lld, %lld, %lld", (long long) n_embd, (long long) n_layer,
                          (long long) n_vocab, (long long) m->hp.n_embd, (long long) m->hp.n_layer,
                          (long long) m->hp.n_vocab);
    }
    struct moqae_gguf_str fp;
    if ((st = get_required(moqae_gguf_get_str(r->gguf, KEY("base.fingerprint"), &fp), KEY("base.fingerprint")))) {
        return st;
    }
    char hex[65];
    moqae_sha256_hex(m->tok_embd.data, m->tok_embd.row_bytes * (size_t) m->tok_embd.n_rows, hex);
    if (fp.len != 64 || memcmp(fp.ptr, hex, 64) != 0) {
        return moqae_fail(MOQAE_ERR_INVALID_ARG, "the router was trained for another model of the same shape: its "
                          "fingerprint %.*s... differs from this model's %.12s...", (int) (fp.len > 12 ? 12 : fp.len),
                          fp.ptr, hex);
    }
    return MOQAE_OK;
}

static int load_tensor(struct moqae_router * r, int64_t g, const char * what, int64_t ne0, int64_t ne1,
                       const float ** out) {
    char name[64];
    snprintf(name, sizeof(name), "router.%lld.%s", (long long) g, what);
    const struct moqae_gguf_tensor * t = moqae_gguf_find_tensor(r->gguf, name);
    if (!t) {
        return moqae_fail(MOQAE_ERR_FORMAT, "router tensor '%s' is missing", name);
    }
    if (t->type != MOQAE_TYPE_F32 || t->n_dims != 2 || t->ne[0] != ne0 || t->ne[1] != ne1) {
        return moqae_fail(MOQAE_ERR_FORMAT, "router tensor '%s' must be f32 [%lld, %lld] (ne), got %s with %u dims "
                          "[%lld, %lld]", name, (long long) ne0, (long long) ne1, moqae_type_name(t->type), t->n_dims,
                          (long long) t->ne[0], (long long) t->ne[1]);
    }
    const float * w = t->data;
    for (int64_t i = 0; i < ne0 * ne1; i++) {
        if (!isfinite(w[i])) {
            return moqae_fail(MOQAE_ERR_FORMAT, "router tensor '%s' has a non-finite value at element %lld", name,
                              (long long) i);
        }
    }
    *out = w;
    return MOQAE_OK;
}

static int load(struct moqae_router * r, const struct moqae_model * m) {
    struct moqae_gguf_str arch, share;
    int64_t               version = 0, input_layer = 0;
    int st = get_required(moqae_gguf_get_str(r->gguf, "general.architecture", &arch), "general.architecture");
    if (st) {
        return st;
    }
    if (!moqae_gguf_str_eq(arch, "moqae-router")) {
        return moqae_fail(MOQAE_ERR_FORMAT, "not a router file: general.architecture is '%.*s', expected 'moqae-router'",
                          (int) (arch.len > 64 ? 64 : arch.len), arch.ptr);
    }
    if ((st = get_u32_range(r->gguf, KEY("format_version"), 0, UINT32_MAX, &version))) {
        return st;
    }
    if (version != 1) {
        return moqae_fail(MOQAE_ERR_UNSUPPORTED, "router format version %lld; this runtime reads version 1",
                          (long long) version);
    }
    if ((st = check_base(r, m)) || (st = load_experts(r)) ||
        (st = get_u32_range(r->gguf, KEY("chunk_size"), 1, UINT32_MAX, &r->chunk)) ||
        (st = get_u32_range(r->gguf, KEY("group_size"), 1, (uint32_t) m->hp.n_layer, &r->group_size)) ||
        (st = get_u32_range(r->gguf, KEY("n_router"), 1, (uint32_t) m->hp.n_layer, &r->n_router)) ||
        (st = get_u32_range(r->gguf, KEY("input_layer"), 0, UINT32_MAX, &input_layer)) ||
        (st = get_u32_range(r->gguf, KEY("hidden_size"), 1, 4096, &r->hidden)) ||
        (st = get_required(moqae_gguf_get_bool(r->gguf, KEY("freeze_first_chunk"), &r->freeze),
                           KEY("freeze_first_chunk"))) ||
        (st = get_required(moqae_gguf_get_f32(r->gguf, KEY("norm_eps"), &r->eps), KEY("norm_eps"))) ||
        (st = get_required(moqae_gguf_get_f32(r->gguf, KEY("lambda"), &r->lambda), KEY("lambda"))) ||
        (st = get_required(moqae_gguf_get_f32(r->gguf, KEY("expected_bits"), &r->expected_bits),
                           KEY("expected_bits"))) ||
        (st = get_required(moqae_gguf_get_str(r->gguf, KEY("share"), &share), KEY("share")))) {
        return st;
    }
    if (r->chunk != 32 && r->chunk != 64) {
        return moqae_fail(MOQAE_ERR_UNSUPPORTED, "router chunk size %lld: this runtime stores chunks of 32 or 64 tokens",
                          (long long) r->chunk);
    }
    if (input_layer != 0) {
        return moqae_fail(MOQAE_ERR_UNSUPPORTED, "router input layer %lld: this runtime routes from layer 0's input "
                          "(docs/ROUTER-FORMAT.md says why)", (long long) input_layer);
    }
    if (!(r->eps > 0.0f && r->eps < 1.0f) || !(r->expected_bits >= 0.0f && r->expected_bits <= 16.0f) ||
        !isfinite(r->lambda)) {
        return moqae_fail(MOQAE_ERR_FORMAT, "router norm_eps (%g), expected_bits (%g) or lambda (%g) out of range",
                          (double) r->eps, (double) r->expected_bits, (double) r->lambda);
    }
    const int64_t L    = m->hp.n_layer;
    const int64_t want = moqae_gguf_str_eq(share, "all") ? L : moqae_gguf_str_eq(share, "none") ? 1
                       : moqae_gguf_str_eq(share, "group")                                     ? r->group_size
                                                                                               : -1;
    if (want < 0 || r->group_size != want || r->n_router != (L + r->group_size - 1) / r->group_size) {
        return moqae_fail(MOQAE_ERR_FORMAT, "router sharing '%.*s' with group_size %lld and n_router %lld does not fit "
                          "a model of %lld layers", (int) (share.len > 16 ? 16 : share.len), share.ptr,
                          (long long) r->group_size, (long long) r->n_router, (long long) L);
    }
    r->n_embd  = m->hp.n_embd;
    r->n_layer = L;
    r->w1      = calloc((size_t) r->n_router, sizeof(float *));
    r->w2      = calloc((size_t) r->n_router, sizeof(float *));
    r->w3      = calloc((size_t) r->n_router, sizeof(float *));
    if (!r->w1 || !r->w2 || !r->w3) {
        return moqae_fail(MOQAE_ERR_OUT_OF_MEMORY, "out of memory for the router");
    }
    if ((st = load_demote_weight(r))) {
        return st;
    }
    for (int64_t g = 0; g < r->n_router; g++) {
        if ((st = load_tensor(r, g, "w1", r->n_embd, r->hidden, &r->w1[g])) ||
            (st = load_tensor(r, g, "w2", r->n_embd, r->hidden, &r->w2[g])) ||
            (st = load_tensor(r, g, "w3", r->hidden, r->n_expert, &r->w3[g]))) {
            return st;
        }
    }
    return MOQAE_OK;
}

int moqae_router_load(const struct moqae_model * model, const char * path, struct moqae_router ** out) {
    if (!out) {
        return moqae_fail(MOQAE_ERR_INVALID_ARG, "moqae_router_load: out is NULL");
    }
    *out = NULL;
    if (!model || !path) {
        return moqae_fail(MOQAE_ERR_INVALID_ARG, "moqae_router_load: model and path must not be NULL");
    }
    struct moqae_router * r = calloc(1, sizeof(*r));
    if (!r) {
        return moqae_fail(MOQAE_ERR_OUT_OF_MEMORY, "out of memory for the router");
    }
    int st = moqae_gguf_open(path, &r->gguf);
    if (!st) {
        st = load(r, model);
    }
    if (st) {
        moqae_router_free(r);
        return st == MOQAE_ERR_IO ? st : moqae_fail_prefix(st, "router %s: ", path);
    }
    *out = r;
    return MOQAE_OK;
}

void moqae_router_free(struct moqae_router * r) {
    if (!r) {
        return;
    }
    moqae_gguf_close(r->gguf);
    free(r->w1);
    free(r->w2);
    free(r->w3);
    free(r->demote_weight);
    free(r);
}

int moqae_router_get_info(const struct moqae_router * r, struct moqae_router_info * out) {
    if (!r || !out) {
        return moqae_fail(MOQAE_ERR_INVALID_ARG, "moqae_router_get_info: NULL argument");
    }
    memset(out, 0, sizeof(*out));
    out->format_version     = 1;
    out->chunk_size         = (int32_t) r->chunk;
    out->n_expert           = (int32_t) r->n_expert;
    for (int64_t e = 0; e < r->n_expert; e++) {
        out->expert_bits[e] = r->bits[e];
    }
    out->n_router           = (int32_t) r->n_router;
    out->group_size         = (int32_t) r->group_size;
    out->hidden_size        = (int32_t) r->hidden;
    out->freeze_first_chunk = r->freeze;
    out->lambda             = r->lambda;
    out->expected_bits      = r->expected_bits;
    return MOQAE_OK;
}

int64_t moqae_router_scratch_floats(const struct moqae_router * r) {
    return r->n_embd + r->hidden;
}

void moqae_router_vote(const struct moqae_router * r, const struct moqae_cpu_kernels * K, const float * x,
                       uint8_t * votes, float * scratch) {
    const int64_t n = r->n_embd, R = r->hidden;
    float *       xn = scratch, *h = scratch + n;
    double        ss = 0.0;
    for (int64_t i = 0; i < n; i++) {
        ss += (double) x[i] * (double) x[i];
    }
    const float inv = 1.0f / sqrtf((float) (ss / (double) n) + r->eps);
    for (int64_t i = 0; i < n; i++) {
        xn[i] = x[i] * inv;
    }
    for (int64_t g = 0; g < r->n_router; g++) {
        for (int64_t j = 0; j < R; j++) {
            const float a = K->dot_f32(n, r->w1[g] + j * n, xn);
            const float b = K->dot_f32(n, r->w2[g] + j * n, xn);
            h[j]          = a / (1.0f + expf(-a)) * b;
        }
        int64_t best = 0;
        float   top  = -INFINITY;
        for (int64_t e = 0; e < r->n_expert; e++) {
            const float z = K->dot_f32(R, r->w3[g] + e * R, h);
            if (z > top) {
                top  = z;
                best = e;
            }
        }
        votes[g] = (uint8_t) best;
    }
}
