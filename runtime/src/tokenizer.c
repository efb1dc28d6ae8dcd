/*
 * tokenizer.c — builds a tokenizer from a GGUF vocabulary (tokenizer.ggml.*) and implements the
 * public calls: special-token splitting, BOS/EOS, token pieces, detokenization and end-of-generation.
 * The text between special tokens goes to tokenizer-bpe.c (model "gpt2") or tokenizer-spm.c (model
 * "llama"). Everything read from the file is validated and copied, so the GGUF may be closed after.
 * References: llama.cpp src/llama-vocab.cpp (the GGUF keys, special-token and BOS/space-prefix
 * rules), HF tokenizers and sentencepiece (the outputs; tests/test_tokenizer.py compares them).
 */
#include "tokenizer.h"

#include "common.h"
#include "tokenizer-impl.h"
#include "unicode.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* ================================================================================================
 * Hash tables (built at load, read-only afterwards)
 * ============================================================================================== */

static uint64_t tok_hash_bytes(const char * s, size_t n) {
    uint64_t h = 0xcbf29ce484222325ull; /* FNV-1a 64 */
    for (size_t i = 0; i < n; i++) {
        h ^= (uint8_t) s[i];
        h *= 0x100000001b3ull;
    }
    return h ^ (h >> 29);
}

/* The bytes a token is looked up by: its piece for BPE, its text for SPM (see tokenizer-impl.h). */
static const char * tok_key(const struct moqae_tokenizer * tok, int32_t id, size_t * n) {
    if (tok->kind == MOQAE_VOCAB_BPE) {
        *n = tok->piece_len[id];
        return tok->blob + tok->piece_off[id];
    }
    *n = tok->text_len[id];
    return tok->blob + tok->text_off[id];
}

int32_t moqae_tok_lookup(const struct moqae_tokenizer * tok, const char * s, size_t n) {
    uint64_t i = tok_hash_bytes(s, n) & tok->tok_hash_mask;
    for (;;) {
        const int32_t id = tok->tok_hash[i];
        if (id < 0) {
            return -1;
        }
        size_t       kn;
        const char * k = tok_key(tok, id, &kn);
        if (kn == n && memcmp(k, s, n) == 0) {
            return id;
        }
        i = (i + 1) & tok->tok_hash_mask;
    }
}

/* Insert id under its key unless an earlier token has the same key (the first one wins). */
static void tok_hash_insert(struct moqae_tokenizer * tok, int32_t id) {
    size_t       n;
    const char * s = tok_key(tok, id, &n);
    uint64_t     i = tok_hash_bytes(s, n) & tok->tok_hash_mask;
    for (;;) {
        const int32_t other = tok->tok_hash[i];
        if (other < 0) {
            tok->tok_hash[i] = id;
            return;
        }
        size_t       kn;
        const char * k = tok_key(tok, other, &kn);
        if (kn == n && memcmp(k, s, n) == 0) {
            return;
        }
        i = (i + 1) & tok->tok_hash_mask;
    }
}

/* Smallest power of two >= 2 * n (load factor <= 0.5), at least 16. */
uint64_t moqae_tok_table_size(int64_t n) {
    uint64_t size = 16;
    while (size < 2 * (uint64_t) n) {
        size *= 2;
    }
    return size;
}

/* ================================================================================================
 * Scratch
 * ============================================================================================== */

void * moqae_tok_scratch_get(struct moqae_tok_scratch * s, int i, size_t bytes) {
    if (bytes <= s->cap[i]) {
        return s->buf[i];
    }
    size_t cap = s->cap[i] ? s->cap[i] : 256;
    while (cap < bytes) {
        cap *= 2;
    }
    void * p = realloc(s->buf[i], cap);
    if (!p) {
        return NULL;
    }
    s->buf[i] = p;
    s->cap[i] = cap;
    return p;
}

void moqae_tok_scratch_free(struct moqae_tok_scratch * s) {
    for (int i = 0; i < (int) (sizeof(s->buf) / sizeof(s->buf[0])); i++) {
        free(s->buf[i]);
        s->buf[i] = NULL;
        s->cap[i] = 0;
    }
}

/* ================================================================================================
 * Loading
 * ============================================================================================== */

void moqae_tokenizer_free(struct moqae_tokenizer * tok) {
    if (!tok) {
        return;
    }
    free(tok->type);
    free(tok->score);
    free(tok->text_off);
    free(tok->text_len);
    free(tok->piece_off);
    free(tok->piece_len);
    free(tok->blob);
    free(tok->tok_hash);
    free(tok->merges);
    free(tok->special);
    free(tok->spm_glue);
    free(tok);
}

/* "<0xXX>" -> XX, or -1. */
static int tok_parse_byte_token(const char * s, size_t n) {
    if (n != 6 || s[0] != '<' || s[1] != '0' || s[2] != 'x' || s[5] != '>') {
        return -1;
    }
    int v = 0;
    for (int i = 3; i < 5; i++) {
        const char c = s[i];
        v *= 16;
        if (c >= '0' && c <= '9') {
            v += c - '0';
        } else if (c >= 'A' && c <= 'F') {
            v += c - 'A' + 10;
        } else if (c >= 'a' && c <= 'f') {
            v += c - 'a' + 10;
        } else {
            return -1;
        }
    }
    return v;
}

int64_t moqae_tok_gpt2_decode(const char * s, size_t n, char * out) {
    size_t  i = 0;
    int64_t o = 0;
    while (i < n) {
        int32_t   cp;
        const int len = moqae_utf8_decode((const uint8_t *) s + i, n - i, &cp);
        const int b   = moqae_gpt2_cp_to_byte(cp);
        if (b < 0) {
            return -1;
        }
        out[o++] = (char) b;
        i += (size_t) len;
    }
    return o;
}

/* Render the piece of token id (text already in blob at text_off) at blob + *pos. */
static void tok_render_piece(struct moqae_tokenizer * tok, int32_t id, uint64_t * pos) {
    const char *   text = tok->blob + tok->text_off[id];
    const size_t   n    = tok->text_len[id];
    char *         out  = tok->blob + *pos;
    const uint8_t  type = tok->type[id];
    int64_t        len  = 0;
    static const char unk_piece[] = " \xe2\x81\x87 "; /* " ⁇ ", what sentencepiece decodes <unk> to */

    tok->piece_off[id] = (uint32_t) *pos;
    if (type == MOQAE_TOKEN_CONTROL) {
        len = 0;
    } else if (type == MOQAE_TOKEN_UNKNOWN) {
        len = (int64_t) sizeof(unk_piece) - 1;
        memcpy(out, unk_piece, (size_t) len);
    } else if (type == MOQAE_TOKEN_BYTE && tok_parse_byte_token(text, n) >= 0) {
        out[0] = (char) tok_parse_byte_token(text, n);
        len    = 1;
    } else if (type == MOQAE_TOKEN_USER_DEFINED) {
        memcpy(out, text, n);
        len = (int64_t) n;
    } else if (tok->kind == MOQAE_VOCAB_BPE) {
        len = moqae_tok_gpt2_decode(text, n, out);
        if (len < 0) {
            memcpy(out, text, n);
            len = (int64_t) n;
        }
    } else { /* SPM: "▁" (U+2581, e2 96 81) is a space */
        for (size_t i = 0; i < n; i++) {
            if (i + 2 < n && memcmp(text + i, "\xe2\x96\x81", 3) == 0) {
                out[len++] = ' ';
                i += 2;
            } else {
                out[len++] = text[i];
            }
        }
    }
    tok->piece_len[id] = (uint32_t) len;
    *pos += (uint64_t) len;
}

/* tokenizer.ggml.tokens / token_type / scores -> the per-token arrays and the blob. */
static int tok_load_vocab(struct moqae_tokenizer * tok, const struct moqae_gguf * g) {
    const struct moqae_gguf_kv * tokens = NULL;
    int st = moqae_gguf_get_arr(g, "tokenizer.ggml.tokens", MOQAE_GGUF_STRING, &tokens);
    if (st != MOQAE_OK) {
        return st == MOQAE_ERR_NOT_FOUND ? moqae_fail(st, "tokenizer: tokenizer.ggml.tokens is missing") : st;
    }
    if (tokens->arr_n == 0 || tokens->arr_n >= INT32_MAX) {
        return moqae_fail(MOQAE_ERR_FORMAT, "tokenizer: tokenizer.ggml.tokens has %llu entries",
                          (unsigned long long) tokens->arr_n);
    }
    const int64_t n = (int64_t) tokens->arr_n;
    tok->n_vocab    = n;

    const struct moqae_gguf_kv * types = moqae_gguf_find_kv(g, "tokenizer.ggml.token_type");
    if (types) {
        const enum moqae_gguf_type t = types->arr_type;
        if (types->type != MOQAE_GGUF_ARRAY || t == MOQAE_GGUF_FLOAT32 || t == MOQAE_GGUF_FLOAT64 ||
            t == MOQAE_GGUF_BOOL || t == MOQAE_GGUF_STRING || t == MOQAE_GGUF_ARRAY || types->arr_n != (uint64_t) n) {
            return moqae_fail(MOQAE_ERR_FORMAT, "tokenizer: tokenizer.ggml.token_type must be an integer array of "
                                                "%lld entries (one per token)", (long long) n);
        }
    }
    const struct moqae_gguf_kv * scores = moqae_gguf_find_kv(g, "tokenizer.ggml.scores");
    if (scores) {
        const enum moqae_gguf_type t = scores->arr_type;
        if (scores->type != MOQAE_GGUF_ARRAY || (t != MOQAE_GGUF_FLOAT32 && t != MOQAE_GGUF_FLOAT64) ||
            scores->arr_n != (uint64_t) n) {
            return moqae_fail(MOQAE_ERR_FORMAT, "tokenizer: tokenizer.ggml.scores must be a float array of %lld "
                                                "entries (one per token)", (long long) n);
        }
    }

    uint64_t text_total = 0;
    for (int64_t i = 0; i < n; i++) {
        text_total += tokens->arr_strs[i].len;
    }
    /* A piece is never longer than its text, except <unk>'s " ⁇ " (5 bytes). */
    const uint64_t blob_size = 2 * text_total + 5 * (uint64_t) n + 1;
    if (text_total > UINT32_MAX / 4 || blob_size > UINT32_MAX) { /* offsets are 32-bit */
        return moqae_fail(MOQAE_ERR_FORMAT, "tokenizer: the vocabulary's text is too large (%llu bytes)",
                          (unsigned long long) text_total);
    }
    tok->type      = calloc((size_t) n, 1);
    tok->score     = calloc((size_t) n, sizeof(float));
    tok->text_off  = calloc((size_t) n, sizeof(uint32_t));
    tok->text_len  = calloc((size_t) n, sizeof(uint32_t));
    tok->piece_off = calloc((size_t) n, sizeof(uint32_t));
    tok->piece_len = calloc((size_t) n, sizeof(uint32_t));
    tok->blob      = malloc((size_t) blob_size);
    tok->tok_hash_mask = moqae_tok_table_size(n) - 1;
    tok->tok_hash      = malloc((size_t) (tok->tok_hash_mask + 1) * sizeof(int32_t));
    if (!tok->type || !tok->score || !tok->text_off || !tok->text_len || !tok->piece_off || !tok->piece_len ||
        !tok->blob || !tok->tok_hash) {
        return moqae_fail(MOQAE_ERR_OUT_OF_MEMORY, "tokenizer: out of memory for %lld tokens", (long long) n);
    }
    memset(tok->tok_hash, 0xff, (size_t) (tok->tok_hash_mask + 1) * sizeof(int32_t));

    uint64_t pos = 0;
    for (int64_t i = 0; i < n; i++) {
        const struct moqae_gguf_str s = tokens->arr_strs[i];
        if (s.len) {
            memcpy(tok->blob + pos, s.ptr, s.len);
        }
        tok->text_off[i] = (uint32_t) pos;
        tok->text_len[i] = (uint32_t) s.len;
        pos += s.len;
        int64_t type = MOQAE_TOKEN_NORMAL;
        if (types) {
            type = moqae_gguf_arr_i64(types, (uint64_t) i);
            if (type < MOQAE_TOKEN_UNDEFINED || type > MOQAE_TOKEN_BYTE) {
                return moqae_fail(MOQAE_ERR_FORMAT, "tokenizer: token %lld has type %lld (valid: 0..6)",
                                  (long long) i, (long long) type);
            }
        }
        tok->type[i] = (uint8_t) type;
        if (scores) {
            const double v = moqae_gguf_arr_f64(scores, (uint64_t) i);
            tok->score[i]  = isnan(v) ? -INFINITY : (float) v; /* NaN would break the merge order */
        }
    }
    for (int64_t i = 0; i < n; i++) {
        tok_render_piece(tok, (int32_t) i, &pos);
    }
    MOQAE_ASSERT(pos <= blob_size);
    return MOQAE_OK;
}

/* The key hash of the tokens the models may produce from plain text (see tok_hash in
 * tokenizer-impl.h) and the byte tokens. */
static void tok_index_vocab(struct moqae_tokenizer * tok) {
    const int64_t n = tok->n_vocab;
    for (int64_t i = 0; i < n; i++) {
        const uint8_t t = tok->type[i];
        bool          in = t == MOQAE_TOKEN_NORMAL || t == MOQAE_TOKEN_UNDEFINED || t == MOQAE_TOKEN_UNUSED;
        if (tok->kind == MOQAE_VOCAB_SPM && t == MOQAE_TOKEN_USER_DEFINED) {
            in = true;
        }
        size_t kn;
        tok_key(tok, (int32_t) i, &kn);
        if (in && kn > 0) {
            tok_hash_insert(tok, (int32_t) i);
        }
    }
    for (int b = 0; b < 256; b++) {
        tok->byte_token[b] = -1;
    }
    if (tok->kind == MOQAE_VOCAB_BPE) {
        for (int b = 0; b < 256; b++) {
            const char c       = (char) b;
            tok->byte_token[b] = moqae_tok_lookup(tok, &c, 1);
        }
    } else {
        for (int64_t i = n - 1; i >= 0; i--) { /* descending, so the first <0xXX> wins */
            if (tok->type[i] == MOQAE_TOKEN_BYTE) {
                const int b = tok_parse_byte_token(tok->blob + tok->text_off[i], tok->text_len[i]);
                if (b >= 0) {
                    tok->byte_token[b] = (int32_t) i;
                }
            }
        }
    }
}

/* An optional token id key: -1 when absent or out of range (with a log line, like llama.cpp). */
static int tok_get_id(const struct moqae_tokenizer * tok, const struct moqae_gguf * g, const char * key,
                      int32_t dflt, int32_t * out) {
    int64_t   v  = 0;
    const int st = moqae_gguf_get_i64(g, key, &v);
    if (st == MOQAE_ERR_NOT_FOUND) {
        *out = dflt < tok->n_vocab ? dflt : -1;
        return MOQAE_OK;
    }
    if (st != MOQAE_OK) {
        return st;
    }
    if (v < 0 || v >= tok->n_vocab) {
        moqae_log(MOQAE_LOG_WARN, "tokenizer: %s = %lld is outside the vocabulary (%lld tokens): ignored", key,
                  (long long) v, (long long) tok->n_vocab);
        *out = -1;
        return MOQAE_OK;
    }
    *out = (int32_t) v;
    return MOQAE_OK;
}

static int tok_get_flag(const struct moqae_gguf * g, const char * key, bool dflt, bool * out) {
    const int st = moqae_gguf_get_bool(g, key, out);
    if (st == MOQAE_ERR_NOT_FOUND) {
        *out = dflt;
        return MOQAE_OK;
    }
    return st;
}

static int tok_load_special_ids(struct moqae_tokenizer * tok, const struct moqae_gguf * g) {
    const bool spm = tok->kind == MOQAE_VOCAB_SPM;
    int        st;
    /* llama.cpp's defaults for SentencePiece vocabularies: <unk> 0, <s> 1, </s> 2. */
    if ((st = tok_get_id(tok, g, "tokenizer.ggml.bos_token_id", spm ? 1 : -1, &tok->bos)) ||
        (st = tok_get_id(tok, g, "tokenizer.ggml.eos_token_id", spm ? 2 : -1, &tok->eos)) ||
        (st = tok_get_id(tok, g, "tokenizer.ggml.unknown_token_id", spm ? 0 : -1, &tok->unk)) ||
        (st = tok_get_id(tok, g, "tokenizer.ggml.eot_token_id", -1, &tok->eot)) ||
        (st = tok_get_id(tok, g, "tokenizer.ggml.eom_token_id", -1, &tok->eom)) ||
        (st = tok_get_flag(g, "tokenizer.ggml.add_bos_token", spm, &tok->add_bos)) ||
        (st = tok_get_flag(g, "tokenizer.ggml.add_eos_token", false, &tok->add_eos)) ||
        (st = tok_get_flag(g, "tokenizer.ggml.add_space_prefix", spm, &tok->add_space_prefix))) {
        return moqae_fail_prefix(st, "tokenizer: ");
    }
    if (!spm) {
        tok->add_space_prefix = false; /* the GPT-2 pre-tokenizers have their own space handling */
    }
    if (tok->add_bos && tok->bos < 0) {
        moqae_log(MOQAE_LOG_WARN, "tokenizer: add_bos_token is set but there is no BOS token: not adding it");
        tok->add_bos = false;
    }
    if (tok->add_eos && tok->eos < 0) {
        moqae_log(MOQAE_LOG_WARN, "tokenizer: add_eos_token is set but there is no EOS token: not adding it");
        tok->add_eos = false;
    }
    return MOQAE_OK;
}

static int tok_cmp_i32(const void * a, const void * b) {
    const int32_t x = *(const int32_t *) a, y = *(const int32_t *) b;
    return (x > y) - (x < y);
}

/* SPM: collect every codepoint that precedes a "▁" inside a token the merges can build (see
 * spm_glue in tokenizer-impl.h). LLaMA's vocabulary only has "▁" itself there ("▁▁", ...). */
static int tok_load_spm_glue(struct moqae_tokenizer * tok) {
    int64_t cap = 16;
    tok->spm_glue = malloc((size_t) cap * sizeof(int32_t));
    if (!tok->spm_glue) {
        return moqae_fail(MOQAE_ERR_OUT_OF_MEMORY, "tokenizer: out of memory");
    }
    for (uint64_t h = 0; h <= tok->tok_hash_mask; h++) {
        const int32_t id = tok->tok_hash[h];
        if (id < 0) {
            continue;
        }
        const char * t = tok->blob + tok->text_off[id];
        const size_t n = tok->text_len[id];
        int32_t      prev = -2;
        for (size_t i = 0; i < n;) {
            if (prev != -2 && i + 2 < n && memcmp(t + i, "\xe2\x96\x81", 3) == 0) {
                if (tok->n_spm_glue == cap) {
                    cap *= 2;
                    int32_t * p = realloc(tok->spm_glue, (size_t) cap * sizeof(int32_t));
                    if (!p) {
                        return moqae_fail(MOQAE_ERR_OUT_OF_MEMORY, "tokenizer: out of memory");
                    }
                    tok->spm_glue = p;
                }
                tok->spm_glue[tok->n_spm_glue++] = prev;
            }
            i += (size_t) moqae_utf8_decode((const uint8_t *) t + i, n - i, &prev);
        }
    }
    qsort(tok->spm_glue, (size_t) tok->n_spm_glue, sizeof(int32_t), tok_cmp_i32);
    int64_t k = 0; /* deduplicate */
    for (int64_t i = 0; i < tok->n_spm_glue; i++) {
        if (k == 0 || tok->spm_glue[k - 1] != tok->spm_glue[i]) {
            tok->spm_glue[k++] = tok->spm_glue[i];
        }
    }
    tok->n_spm_glue = k;
    return MOQAE_OK;
}

struct tok_len_id {
    uint8_t  first;
    uint32_t len;
    int32_t  id;
};

/* First byte ascending, then longest first, then by id. */
static int tok_cmp_special(const void * a, const void * b) {
    const struct tok_len_id * x = a;
    const struct tok_len_id * y = b;
    if (x->first != y->first) {
        return x->first < y->first ? -1 : 1;
    }
    if (x->len != y->len) {
        return x->len > y->len ? -1 : 1;
    }
    return (x->id > y->id) - (x->id < y->id);
}

/* The literal-match list and the end-of-generation set. */
static int tok_load_specials(struct moqae_tokenizer * tok) {
    int64_t n = 0;
    for (int64_t i = 0; i < tok->n_vocab; i++) {
        const uint8_t t = tok->type[i];
        n += (t == MOQAE_TOKEN_CONTROL || t == MOQAE_TOKEN_USER_DEFINED || t == MOQAE_TOKEN_UNKNOWN) &&
             tok->text_len[i] > 0;
    }
    struct tok_len_id * v = malloc((size_t) (n ? n : 1) * sizeof(*v));
    tok->special          = malloc((size_t) (n ? n : 1) * sizeof(int32_t));
    if (!v || !tok->special) {
        free(v);
        return moqae_fail(MOQAE_ERR_OUT_OF_MEMORY, "tokenizer: out of memory");
    }
    int64_t k = 0;
    for (int64_t i = 0; i < tok->n_vocab; i++) {
        const uint8_t t = tok->type[i];
        if ((t == MOQAE_TOKEN_CONTROL || t == MOQAE_TOKEN_USER_DEFINED || t == MOQAE_TOKEN_UNKNOWN) &&
            tok->text_len[i] > 0) {
            v[k].first = (uint8_t) tok->blob[tok->text_off[i]];
            v[k].len   = tok->text_len[i];
            v[k].id    = (int32_t) i;
            k++;
        }
    }
    qsort(v, (size_t) n, sizeof(*v), tok_cmp_special);
    for (int64_t i = 0; i < n; i++) {
        tok->special[i] = v[i].id;
    }
    for (int b = 0, i = 0; b <= 256; b++) { /* special_start[b] = first entry whose byte is >= b */
        while (i < n && v[i].first < b) {
            i++;
        }
        tok->special_start[b] = i;
    }
    tok->n_special = n;
    free(v);

    /* End of generation: EOS, EOT, EOM, and the control tokens chat templates end turns with. */
    static const char * const eog_texts[] = {"<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|eom_id|>",
                                             "<end_of_turn>"};
    int32_t cand[3 + 64];
    int     nc = 0;
    cand[nc++] = tok->eos;
    cand[nc++] = tok->eot;
    cand[nc++] = tok->eom;
    for (int64_t i = 0; i < tok->n_special && nc < (int) (sizeof(cand) / sizeof(cand[0])); i++) {
        const int32_t id = tok->special[i];
        if (tok->type[id] != MOQAE_TOKEN_CONTROL) {
            continue;
        }
        for (size_t j = 0; j < sizeof(eog_texts) / sizeof(eog_texts[0]); j++) {
            if (tok->text_len[id] == strlen(eog_texts[j]) &&
                memcmp(tok->blob + tok->text_off[id], eog_texts[j], tok->text_len[id]) == 0) {
                cand[nc++] = id;
            }
        }
    }
    for (int i = 0; i < nc; i++) {
        bool dup = cand[i] < 0;
        for (int j = 0; j < tok->n_eog && !dup; j++) {
            dup = tok->eog[j] == cand[i];
        }
        if (!dup && tok->n_eog < (int) (sizeof(tok->eog) / sizeof(tok->eog[0]))) {
            tok->eog[tok->n_eog++] = cand[i];
        }
    }
    return MOQAE_OK;
}

int moqae_tokenizer_new(const struct moqae_gguf * g, struct moqae_tokenizer ** out) {
    if (!out) {
        return moqae_fail(MOQAE_ERR_INVALID_ARG, "moqae_tokenizer_new: out is NULL");
    }
    *out = NULL;
    if (!g) {
        return moqae_fail(MOQAE_ERR_INVALID_ARG, "moqae_tokenizer_new: gguf is NULL");
    }
    struct moqae_gguf_str model;
    int                   st = moqae_gguf_get_str(g, "tokenizer.ggml.model", &model);
    if (st == MOQAE_ERR_NOT_FOUND) {
        return moqae_fail(st, "tokenizer: tokenizer.ggml.model is missing (the GGUF has no vocabulary)");
    }
    if (st != MOQAE_OK) {
        return st;
    }
    struct moqae_tokenizer * tok = calloc(1, sizeof(*tok));
    if (!tok) {
        return moqae_fail(MOQAE_ERR_OUT_OF_MEMORY, "tokenizer: out of memory");
    }
    if (moqae_gguf_str_eq(model, "gpt2")) {
        tok->kind = MOQAE_VOCAB_BPE;
    } else if (moqae_gguf_str_eq(model, "llama")) {
        tok->kind = MOQAE_VOCAB_SPM;
    } else {
        free(tok);
        return moqae_fail(MOQAE_ERR_UNSUPPORTED, "tokenizer: tokenizer.ggml.model '%.*s' is not supported "
                                                 "(supported: gpt2, llama)",
                          (int) (model.len > 64 ? 64 : model.len), model.ptr);
    }
    /* The pre-tokenizer: unknown names silently get gpt2's regex (the most common one). */
    struct moqae_gguf_str pre;
    tok->pre = MOQAE_PRE_GPT2;
    if (moqae_gguf_get_str(g, "tokenizer.ggml.pre", &pre) == MOQAE_OK) {
        if (moqae_gguf_str_eq(pre, "smollm")) {
            tok->pre = MOQAE_PRE_SMOLLM;
        } else if (moqae_gguf_str_eq(pre, "qwen2")) {
            tok->pre = MOQAE_PRE_QWEN2;
        } else if (moqae_gguf_str_eq(pre, "llama-bpe")) {
            tok->pre = MOQAE_PRE_LLAMA_BPE;
        }
    }
    tok->ignore_merges = tok->pre == MOQAE_PRE_LLAMA_BPE;

    if ((st = tok_load_vocab(tok, g)) == MOQAE_OK) {
        tok_index_vocab(tok);
    }
    if (st != MOQAE_OK || (st = tok_load_special_ids(tok, g)) != MOQAE_OK ||
        (tok->kind == MOQAE_VOCAB_BPE && (st = moqae_tok_bpe_load_merges(tok, g)) != MOQAE_OK) ||
        (tok->kind == MOQAE_VOCAB_SPM && (st = tok_load_spm_glue(tok)) != MOQAE_OK) ||
        (st = tok_load_specials(tok)) != MOQAE_OK) {
        moqae_tokenizer_free(tok);
        return st;
    }
    *out = tok;
    return MOQAE_OK;
}

/* ================================================================================================
 * Queries
 * ============================================================================================== */

int64_t moqae_tokenizer_n_vocab(const struct moqae_tokenizer * tok) {
    return tok->n_vocab;
}

int32_t moqae_tokenizer_bos(const struct moqae_tokenizer * tok) {
    return tok->bos;
}

int32_t moqae_tokenizer_eos(const struct moqae_tokenizer * tok) {
    return tok->eos;
}

bool moqae_tokenizer_add_bos(const struct moqae_tokenizer * tok) {
    return tok->add_bos;
}

bool moqae_tokenizer_add_eos(const struct moqae_tokenizer * tok) {
    return tok->add_eos;
}

bool moqae_tokenizer_is_eog(const struct moqae_tokenizer * tok, int32_t id) {
    for (int i = 0; i < tok->n_eog; i++) {
        if (tok->eog[i] == id) {
            return true;
        }
    }
    return false;
}

/* ================================================================================================
 * Encode
 * ============================================================================================== */

/* Longest special token whose text starts at text[i] (CONTROL/UNKNOWN only with parse_special),
 * or -1. Each first byte's bucket is sorted longest first, so the first hit is the longest. */
static int32_t tok_match_special(const struct moqae_tokenizer * tok, const char * text, size_t len, size_t i,
                                 bool parse_special) {
    const uint8_t b = (uint8_t) text[i];
    for (int64_t k = tok->special_start[b]; k < tok->special_start[b + 1]; k++) {
        const int32_t id = tok->special[k];
        const size_t  n  = tok->text_len[id];
        if (n > len - i || (!parse_special && tok->type[id] != MOQAE_TOKEN_USER_DEFINED)) {
            continue;
        }
        if (memcmp(text + i, tok->blob + tok->text_off[id], n) == 0) {
            return id;
        }
    }
    return -1;
}

static int tok_encode_fragment(const struct moqae_tokenizer * tok, const char * text, size_t len, bool prev_special,
                               struct moqae_tok_scratch * scratch, struct moqae_tok_out * out) {
    if (len == 0) {
        return MOQAE_OK;
    }
    if (tok->kind == MOQAE_VOCAB_BPE) {
        return moqae_tok_bpe_encode(tok, text, len, scratch, out);
    }
    return moqae_tok_spm_encode(tok, text, len, prev_special, scratch, out);
}

int moqae_tokenizer_encode(const struct moqae_tokenizer * tok, const char * text, size_t len, bool add_special,
                           bool parse_special, int32_t * tokens, int64_t capacity, int64_t * n_tokens) {
    if (!tok || !n_tokens || (!text && len > 0) || capacity < 0 || (!tokens && capacity > 0)) {
        return moqae_fail(MOQAE_ERR_INVALID_ARG, "moqae_tokenize: NULL argument or negative capacity");
    }
    *n_tokens                        = 0;
    struct moqae_tok_out     out     = {tokens, capacity, 0};
    struct moqae_tok_scratch scratch = {{NULL}, {0}};
    if (add_special && tok->add_bos) {
        moqae_tok_push(&out, tok->bos);
    }
    /* Split the text at special tokens (leftmost, then longest), encoding the plain text between. */
    int    st           = MOQAE_OK;
    size_t frag         = 0;
    bool   prev_special = true;
    for (size_t i = 0; i < len && st == MOQAE_OK;) {
        const uint8_t b  = (uint8_t) text[i];
        const int32_t id = tok->special_start[b] < tok->special_start[b + 1]
                               ? tok_match_special(tok, text, len, i, parse_special)
                               : -1;
        if (id < 0) {
            i++;
            continue;
        }
        st = tok_encode_fragment(tok, text + frag, i - frag, prev_special, &scratch, &out);
        moqae_tok_push(&out, id);
        prev_special = true;
        i += tok->text_len[id];
        frag = i;
    }
    if (st == MOQAE_OK) {
        st = tok_encode_fragment(tok, text + frag, len - frag, prev_special, &scratch, &out);
    }
    moqae_tok_scratch_free(&scratch);
    if (st != MOQAE_OK) {
        return st;
    }
    if (add_special && tok->add_eos) {
        moqae_tok_push(&out, tok->eos);
    }
    *n_tokens = out.n;
    if (out.n > capacity) {
        return moqae_fail(MOQAE_ERR_BUFFER_TOO_SMALL, "moqae_tokenize: %lld tokens do not fit in %lld",
                          (long long) out.n, (long long) capacity);
    }
    return MOQAE_OK;
}

/* ================================================================================================
 * Decode
 * ============================================================================================== */

/* The bytes token id renders to (special: control and unknown tokens as their text). */
static const char * tok_piece(const struct moqae_tokenizer * tok, int32_t id, bool special, size_t * n) {
    const uint8_t t = tok->type[id];
    if (special && (t == MOQAE_TOKEN_CONTROL || t == MOQAE_TOKEN_UNKNOWN)) {
        *n = tok->text_len[id];
        return tok->blob + tok->text_off[id];
    }
    *n = tok->piece_len[id];
    return tok->blob + tok->piece_off[id];
}

int moqae_tokenizer_piece(const struct moqae_tokenizer * tok, int32_t id, bool special, char * buf, size_t capacity,
                          size_t * n_written) {
    if (!tok || !n_written || (!buf && capacity > 0)) {
        return moqae_fail(MOQAE_ERR_INVALID_ARG, "moqae_token_to_piece: NULL argument");
    }
    *n_written = 0;
    if (id < 0 || id >= tok->n_vocab) {
        return moqae_fail(MOQAE_ERR_INVALID_TOKEN, "moqae_token_to_piece: token %d is outside [0, %lld)", (int) id,
                          (long long) tok->n_vocab);
    }
    size_t       n;
    const char * p = tok_piece(tok, id, special, &n);
    *n_written     = n;
    if (n > capacity) {
        return moqae_fail(MOQAE_ERR_BUFFER_TOO_SMALL, "moqae_token_to_piece: %zu bytes do not fit in %zu", n,
                          capacity);
    }
    if (n) {
        memcpy(buf, p, n);
    }
    return MOQAE_OK;
}

int moqae_tokenizer_decode(const struct moqae_tokenizer * tok, const int32_t * ids, int64_t n, bool special,
                           char * buf, size_t capacity, size_t * n_written) {
    if (!tok || !n_written || (!ids && n > 0) || n < 0 || (!buf && capacity > 0)) {
        return moqae_fail(MOQAE_ERR_INVALID_ARG, "moqae_detokenize: NULL argument or negative count");
    }
    *n_written = 0;
    for (int64_t i = 0; i < n; i++) {
        if (ids[i] < 0 || ids[i] >= tok->n_vocab) {
            return moqae_fail(MOQAE_ERR_INVALID_TOKEN, "moqae_detokenize: token %d (at %lld) is outside [0, %lld)",
                              (int) ids[i], (long long) i, (long long) tok->n_vocab);
        }
    }
    /* SentencePiece's decode drops the space its encode put in front: one leading space of the first
     * piece that renders to anything, if that piece is a normal token. */
    bool   strip = tok->add_space_prefix;
    size_t total = 0;
    for (int64_t i = 0; i < n; i++) {
        size_t       len;
        const char * p = tok_piece(tok, ids[i], special, &len);
        if (strip && len > 0) {
            strip = false;
            const uint8_t t = tok->type[ids[i]];
            if (p[0] == ' ' && (t == MOQAE_TOKEN_NORMAL || t == MOQAE_TOKEN_UNDEFINED || t == MOQAE_TOKEN_UNUSED)) {
                p++;
                len--;
            }
        }
        if (total < capacity && len > 0) {
            const size_t room = capacity - total;
            memcpy(buf + total, p, len < room ? len : room);
        }
        total += len;
    }
    *n_written = total;
    if (total > capacity) {
        return moqae_fail(MOQAE_ERR_BUFFER_TOO_SMALL, "moqae_detokenize: %zu bytes do not fit in %zu", total,
                          capacity);
    }
    return MOQAE_OK;
}
