/*
 * model.c — loads a llama-architecture GGUF into struct moqae_model (model.h): reads and checks
 * the hyper-parameters, finds every tensor and checks its shape and type, builds the tokenizer.
 * The forward pass lives in graph.c.
 */
#include "model.h"

#include "backend-cuda.h"
#include "common.h"
#include "cpu/kernels.h"

#include <math.h>
#include <stdio.h>

/* Read a required integer hyper-parameter "<arch>.<name>" and check its range. */
static int get_hparam(const struct moqae_gguf * g, const char * arch, const char * name, int64_t lo, int64_t hi,
                      int64_t * out) {
    char key[128];
    snprintf(key, sizeof(key), "%s.%s", arch, name);
    int st = moqae_gguf_get_i64(g, key, out);
    if (st == MOQAE_ERR_NOT_FOUND) {
        return moqae_fail(MOQAE_ERR_FORMAT, "required key '%s' is missing", key);
    }
    if (st != MOQAE_OK) {
        return st;
    }
    if (*out < lo || *out > hi) {
        return moqae_fail(MOQAE_ERR_FORMAT, "key '%s' = %lld is outside the supported range [%lld, %lld]", key,
                          (long long) *out, (long long) lo, (long long) hi);
    }
    return MOQAE_OK;
}

static int get_hparam_f32(const struct moqae_gguf * g, const char * arch, const char * name, float dflt,
                          float * out) {
    char key[128];
    snprintf(key, sizeof(key), "%s.%s", arch, name);
    int st = moqae_gguf_get_f32(g, key, out);
    if (st == MOQAE_ERR_NOT_FOUND) {
        *out = dflt;
        return MOQAE_OK;
    }
    if (st != MOQAE_OK) {
        return st;
    }
    if (!(*out > 0.0f) || *out > 1e30f) { /* also rejects NaN */
        return moqae_fail(MOQAE_ERR_FORMAT, "key '%s' = %g must be a positive finite number", key, (double) *out);
    }
    return MOQAE_OK;
}

static int load_hparams(const struct moqae_gguf * g, const char * arch, struct moqae_hparams * hp) {
    const int64_t big = (int64_t) 1 << 20;
    int           st;
    if ((st = get_hparam(g, arch, "block_count", 1, 4096, &hp->n_layer)) ||
        (st = get_hparam(g, arch, "context_length", 1, (int64_t) 1 << 24, &hp->n_ctx_train)) ||
        (st = get_hparam(g, arch, "embedding_length", 1, big, &hp->n_embd)) ||
        (st = get_hparam(g, arch, "feed_forward_length", 1, 4 * big, &hp->n_ff)) ||
        (st = get_hparam(g, arch, "attention.head_count", 1, 4096, &hp->n_head))) {
        return st;
    }
    st = get_hparam(g, arch, "attention.head_count_kv", 1, hp->n_head, &hp->n_head_kv);
    if (st == MOQAE_ERR_FORMAT && !moqae_gguf_find_kv(g, "llama.attention.head_count_kv")) {
        hp->n_head_kv = hp->n_head; /* absent: multi-head attention */
        st            = MOQAE_OK;
    }
    if (st) {
        return st;
    }
    if (hp->n_embd % hp->n_head != 0) {
        return moqae_fail(MOQAE_ERR_FORMAT, "embedding_length %lld is not a multiple of head_count %lld",
                          (long long) hp->n_embd, (long long) hp->n_head);
    }
    if (hp->n_head % hp->n_head_kv != 0) {
        return moqae_fail(MOQAE_ERR_FORMAT, "head_count %lld is not a multiple of head_count_kv %lld",
                          (long long) hp->n_head, (long long) hp->n_head_kv);
    }
    hp->head_dim = hp->n_embd / hp->n_head;
    st           = get_hparam(g, arch, "rope.dimension_count", 2, hp->head_dim, &hp->n_rot);
    if (st == MOQAE_ERR_FORMAT && !moqae_gguf_find_kv(g, "llama.rope.dimension_count")) {
        hp->n_rot = hp->head_dim;
        st        = MOQAE_OK;
    }
    if (st) {
        return st;
    }
    if (hp->n_rot % 2 != 0) {
        return moqae_fail(MOQAE_ERR_FORMAT, "rope.dimension_count %lld must be even", (long long) hp->n_rot);
    }
    if ((st = get_hparam_f32(g, arch, "rope.freq_base", 10000.0f, &hp->rope_base)) ||
        (st = get_hparam_f32(g, arch, "attention.layer_norm_rms_epsilon", 1e-5f, &hp->rms_eps))) {
        return st;
    }
    return MOQAE_OK;
}

/* Find tensor `name`, check it has shape [n_rows][n_cols] (n_rows = 0: 1-D) and a supported type. */
static int get_weight(const struct moqae_gguf * g, const char * name, int64_t n_cols, int64_t n_rows, bool f32_only,
                      bool required, struct moqae_weight * w) {
    memset(w, 0, sizeof(*w));
    const struct moqae_gguf_tensor * t = moqae_gguf_find_tensor(g, name);
    if (!t) {
        return required ? moqae_fail(MOQAE_ERR_FORMAT, "required tensor '%s' is missing", name) : MOQAE_ERR_NOT_FOUND;
    }
    const int64_t want_rows = n_rows ? n_rows : 1;
    const bool    shape_ok  = t->ne[0] == n_cols && t->ne[1] == want_rows && t->ne[2] == 1 && t->ne[3] == 1;
    if (!shape_ok) {
        return moqae_fail(MOQAE_ERR_FORMAT, "tensor '%s' has shape [%lld, %lld, %lld, %lld], expected [%lld, %lld]",
                          name, (long long) t->ne[0], (long long) t->ne[1], (long long) t->ne[2],
                          (long long) t->ne[3], (long long) n_cols, (long long) want_rows);
    }
    const struct moqae_cpu_kernels * k = moqae_cpu_kernels_ref();
    if (f32_only ? t->type != MOQAE_TYPE_F32 : (!k->type[t->type].vec_dot || !k->type[t->type].to_float)) {
        return moqae_fail(MOQAE_ERR_UNSUPPORTED, "tensor '%s' has type %s, which moqae cannot use there", name,
                          moqae_type_name(t->type));
    }
    if (f32_only) { /* norms are small: reject NaN/Inf here rather than produce NaN logits later */
        const float * v = t->data;
        for (int64_t i = 0; i < n_cols * want_rows; i++) {
            if (!isfinite(v[i])) {
                return moqae_fail(MOQAE_ERR_FORMAT, "tensor '%s' holds a non-finite value (%g) at element %lld", name,
                                  (double) v[i], (long long) i);
            }
        }
    }
    w->type      = t->type;
    w->n_cols    = n_cols;
    w->n_rows    = want_rows;
    w->row_bytes = moqae_type_row_bytes(t->type, n_cols);
    w->data      = t->data;
    return MOQAE_OK;
}

static int load_tensors(struct moqae_model * m) {
    const struct moqae_gguf *    g  = m->gguf;
    const struct moqae_hparams * hp = &m->hp;
    const int64_t                dq = hp->n_head * hp->head_dim, dkv = hp->n_head_kv * hp->head_dim;
    int                          st;
    if ((st = get_weight(g, "token_embd.weight", hp->n_embd, hp->n_vocab, false, true, &m->tok_embd)) ||
        (st = get_weight(g, "output_norm.weight", hp->n_embd, 0, true, true, &m->output_norm))) {
        return st;
    }
    st = get_weight(g, "output.weight", hp->n_embd, hp->n_vocab, false, false, &m->output);
    if (st == MOQAE_ERR_NOT_FOUND) {
        m->output = m->tok_embd; /* tied embeddings */
    } else if (st) {
        return st;
    }
    m->layers = calloc((size_t) hp->n_layer, sizeof(*m->layers));
    if (!m->layers) {
        return moqae_fail(MOQAE_ERR_OUT_OF_MEMORY, "out of memory for %lld layers", (long long) hp->n_layer);
    }
    for (int64_t il = 0; il < hp->n_layer; il++) {
        struct moqae_layer * L = &m->layers[il];
        struct {
            const char *          name;
            int64_t               cols, rows;
            bool                  f32;
            struct moqae_weight * w;
        } want[] = {
            { "attn_norm", hp->n_embd, 0, true, &L->attn_norm },
            { "attn_q", hp->n_embd, dq, false, &L->wq },
            { "attn_k", hp->n_embd, dkv, false, &L->wk },
            { "attn_v", hp->n_embd, dkv, false, &L->wv },
            { "attn_output", dq, hp->n_embd, false, &L->wo },
            { "ffn_norm", hp->n_embd, 0, true, &L->ffn_norm },
            { "ffn_gate", hp->n_embd, hp->n_ff, false, &L->w_gate },
            { "ffn_up", hp->n_embd, hp->n_ff, false, &L->w_up },
            { "ffn_down", hp->n_ff, hp->n_embd, false, &L->w_down },
        };
        for (size_t i = 0; i < sizeof(want) / sizeof(want[0]); i++) {
            char name[96];
            snprintf(name, sizeof(name), "blk.%lld.%s.weight", (long long) il, want[i].name);
            if ((st = get_weight(g, name, want[i].cols, want[i].rows, want[i].f32, true, want[i].w))) {
                return st;
            }
        }
    }
    return MOQAE_OK;
}

static void fill_info(struct moqae_model * m) {
    struct moqae_model_info * in = &m->info;
    const struct moqae_hparams * hp = &m->hp;
    memset(in, 0, sizeof(*in));
    in->n_vocab     = hp->n_vocab;
    in->n_ctx_train = hp->n_ctx_train;
    in->n_embd      = hp->n_embd;
    in->n_layer     = hp->n_layer;
    in->n_head      = hp->n_head;
    in->n_head_kv   = hp->n_head_kv;
    in->head_dim    = hp->head_dim;
    in->n_ff        = hp->n_ff;
    for (uint64_t i = 0; i < m->gguf->n_tensors; i++) {
        const struct moqae_gguf_tensor * t = &m->gguf->tensors[i];
        in->n_params += t->ne[0] * t->ne[1] * t->ne[2] * t->ne[3];
        in->weight_bytes += (int64_t) t->n_bytes;
    }
    in->token_bos = moqae_tokenizer_bos(m->tok);
    in->token_eos = moqae_tokenizer_eos(m->tok);
    in->add_bos   = moqae_tokenizer_add_bos(m->tok);
    in->add_eos   = moqae_tokenizer_add_eos(m->tok);
    struct moqae_gguf_str s;
    if (moqae_gguf_get_str(m->gguf, "general.architecture", &s) == MOQAE_OK) {
        size_t n = s.len < sizeof(in->arch) - 1 ? s.len : sizeof(in->arch) - 1;
        memcpy(in->arch, s.ptr, n);
    }
    if (moqae_gguf_get_str(m->gguf, "general.name", &s) == MOQAE_OK) {
        size_t n = s.len < sizeof(in->name) - 1 ? s.len : sizeof(in->name) - 1;
        memcpy(in->name, s.ptr, n);
    }
}

struct moqae_model_params moqae_model_default_params(void) {
    struct moqae_model_params p;
    memset(&p, 0, sizeof(p));
    return p;
}

static int model_load(const char * path, struct moqae_model * m) {
    int st = moqae_gguf_open(path, &m->gguf);
    if (st) {
        return st;
    }
    struct moqae_gguf_str arch;
    st = moqae_gguf_get_str(m->gguf, "general.architecture", &arch);
    if (st == MOQAE_ERR_NOT_FOUND) {
        return moqae_fail(MOQAE_ERR_FORMAT, "required key 'general.architecture' is missing");
    }
    if (st) {
        return st;
    }
    if (!moqae_gguf_str_eq(arch, "llama")) {
        return moqae_fail(MOQAE_ERR_UNSUPPORTED, "architecture '%.*s' is not supported (supported: llama)",
                          (int) (arch.len > 64 ? 64 : arch.len), arch.ptr);
    }
    if ((st = load_hparams(m->gguf, "llama", &m->hp))) {
        return st;
    }
    if ((st = moqae_tokenizer_new(m->gguf, &m->tok))) {
        return st; /* tokenizer.c's messages start with "tokenizer: " */
    }
    m->hp.n_vocab = moqae_tokenizer_n_vocab(m->tok);
    int64_t vocab_key;
    if (moqae_gguf_get_i64(m->gguf, "llama.vocab_size", &vocab_key) == MOQAE_OK && vocab_key != m->hp.n_vocab) {
        return moqae_fail(MOQAE_ERR_FORMAT, "llama.vocab_size = %lld but the vocabulary has %lld tokens",
                          (long long) vocab_key, (long long) m->hp.n_vocab);
    }
    if ((st = load_tensors(m))) {
        return st;
    }
    fill_info(m);
    return MOQAE_OK;
}

int moqae_model_load(const char * path, const struct moqae_model_params * params, struct moqae_model ** out) {
    if (!out) {
        return moqae_fail(MOQAE_ERR_INVALID_ARG, "moqae_model_load: out is NULL");
    }
    *out = NULL;
    if (!path || !*path) {
        return moqae_fail(MOQAE_ERR_INVALID_ARG, "moqae_model_load: no model path given");
    }
    struct moqae_model_params p = params ? *params : moqae_model_default_params();
    if (p.n_gpu_layers != 0 && !moqae_has_cuda()) {
        moqae_log(MOQAE_LOG_WARN, "n_gpu_layers=%d ignored: this build has no CUDA device", p.n_gpu_layers);
    }
    struct moqae_model * m = calloc(1, sizeof(*m));
    if (!m) {
        return moqae_fail(MOQAE_ERR_OUT_OF_MEMORY, "out of memory loading %s", path);
    }
    int st = model_load(path, m);
    if (!st && p.n_gpu_layers != 0 && moqae_has_cuda()) { /* issue 7: weights uploaded once; < 0: all */
        st = moqae_cuda_model_new(m, p.n_gpu_layers < 0 ? INT32_MAX : p.n_gpu_layers, &m->cuda);
    }
    if (st) {
        moqae_model_free(m);
        /* I/O messages already name the path */
        return st == MOQAE_ERR_IO ? st : moqae_fail_prefix(st, "%s: ", path);
    }
    moqae_log(MOQAE_LOG_INFO, "loaded %s: %lld layers, n_embd %lld, %lld heads (%lld kv), vocab %lld", path,
              (long long) m->hp.n_layer, (long long) m->hp.n_embd, (long long) m->hp.n_head,
              (long long) m->hp.n_head_kv, (long long) m->hp.n_vocab);
    *out = m;
    return MOQAE_OK;
}

void moqae_model_free(struct moqae_model * m) {
    if (!m) {
        return;
    }
    moqae_cuda_model_free(m->cuda);
    moqae_tokenizer_free(m->tok);
    moqae_gguf_close(m->gguf);
    free(m->layers);
    free(m);
}

int moqae_model_get_info(const struct moqae_model * m, struct moqae_model_info * out) {
    if (!m || !out) {
        return moqae_fail(MOQAE_ERR_INVALID_ARG, "moqae_model_get_info: NULL argument");
    }
    *out = m->info;
    return MOQAE_OK;
}

int moqae_model_meta_str(const struct moqae_model * m, const char * key, char * buf, size_t capacity,
                         size_t * n_written) {
    if (!m || !key || !n_written || (!buf && capacity)) {
        return moqae_fail(MOQAE_ERR_INVALID_ARG, "moqae_model_meta_str: NULL argument");
    }
    struct moqae_gguf_str s;
    const struct moqae_gguf_kv * kv = moqae_gguf_find_kv(m->gguf, key);
    if (!kv || kv->type != MOQAE_GGUF_STRING) {
        *n_written = 0;
        return moqae_fail(MOQAE_ERR_NOT_FOUND, "metadata key '%s' is absent or not a string", key);
    }
    s          = kv->str;
    *n_written = (size_t) s.len;
    if (capacity < s.len + 1) {
        return moqae_fail(MOQAE_ERR_BUFFER_TOO_SMALL, "metadata '%s' needs %llu bytes", key,
                          (unsigned long long) s.len + 1);
    }
    memcpy(buf, s.ptr, s.len);
    buf[s.len] = '\0';
    return MOQAE_OK;
}
