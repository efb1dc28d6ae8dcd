/*
 * tokenizer-bpe.c — GPT-2 byte-level BPE (tokenizer.ggml.model = "gpt2"): the pre-tokenizer regexes
 * written out by hand as matchers (no regex library), then rank-ordered merges over each pre-token
 * with a binary heap (lowest rank first, leftmost first on ties, as HF tokenizers' Word::merge_all).
 * The merges work on token ids of raw bytes: the vocabulary was byte-decoded at load, so text never
 * goes through the GPT-2 unicode alphabet here. No cache: scratch lives in the caller's call.
 * References: HF tokenizers (models/bpe, pre_tokenizers/byte_level.rs, digits.rs), the regexes as
 * llama.cpp lists them (src/llama-vocab.cpp); tests/test_tokenizer.py checks the outputs against HF.
 */
#include "common.h"
#include "tokenizer-impl.h"
#include "unicode.h"

#include <stdlib.h>
#include <string.h>

/* ================================================================================================
 * Pre-tokenizers
 *
 * Each matcher returns the end of the pre-token that starts at byte pos of s[0..end), pos < end,
 * and always consumes at least one byte. "Letter", "number", "space" are \p{L}, \p{N} and \s
 * (unicode.h); an invalid UTF-8 byte is a one-byte unit of class "other", like punctuation.
 * ============================================================================================== */

struct unit {
    int32_t             cp;
    int                 len;
    enum moqae_cp_class cls;
};

static inline struct unit unit_at(const uint8_t * s, size_t pos, size_t end) {
    struct unit u;
    if (s[pos] < 0x80) {
        u.cp  = s[pos];
        u.len = 1;
        u.cls = moqae_ascii_class(s[pos]);
        return u;
    }
    u.len = moqae_utf8_decode(s + pos, end - pos, &u.cp);
    u.cls = moqae_cp_class(u.cp);
    return u;
}

/* End of the run of class cls starting at pos (at most max units; max < 0: no limit). */
static size_t run_end(const uint8_t * s, size_t pos, size_t end, enum moqae_cp_class cls, int64_t max) {
    int64_t n = 0;
    while (pos < end && n != max) {
        const struct unit u = unit_at(s, pos, end);
        if (u.cls != cls) {
            break;
        }
        pos += (size_t) u.len;
        n++;
    }
    return pos;
}

/* A whitespace run at pos: `\s*[\r\n]+` (only if newlines), then `\s+(?!\S)|\s+`. The lookahead
 * makes a run followed by a non-space give up its last unit (which then leads the next pre-token,
 * " word"), unless the run is a single unit. */
static size_t space_end(const uint8_t * s, size_t pos, size_t end, bool newline_rule) {
    size_t  k = pos, last = pos, nl_end = 0;
    int64_t n = 0;
    while (k < end) {
        const struct unit u = unit_at(s, k, end);
        if (u.cls != MOQAE_CP_SPACE) {
            break;
        }
        last = k;
        k += (size_t) u.len;
        n++;
        if (u.cp == '\r' || u.cp == '\n') {
            nl_end = k;
        }
    }
    if (newline_rule && nl_end > 0) {
        return nl_end; /* \s*[\r\n]+ backtracks to just after the run's last newline */
    }
    return (k == end || n == 1) ? k : last;
}

/* 's|'t|'re|'ve|'m|'ll|'d at pos (s[pos] == '\''); ci: case-insensitive (the qwen2 (?i:...)).
 * Returns the end, or 0 for no match. */
static size_t contraction_end(const uint8_t * s, size_t pos, size_t end, bool ci) {
    if (pos + 1 >= end) {
        return 0;
    }
    const uint8_t lower = ci ? 0x20 : 0; /* ASCII letters: OR-ing 0x20 lowercases */
    const int     a     = s[pos + 1] | lower;
    if (a == 's' || a == 't' || a == 'm' || a == 'd') {
        return pos + 2;
    }
    if (pos + 2 < end) {
        const int b = s[pos + 2] | lower;
        if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) {
            return pos + 3;
        }
    }
    return 0;
}

/* GPT-2: 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+ */
static size_t match_gpt2(const uint8_t * s, size_t pos, size_t end) {
    if (s[pos] == '\'') {
        const size_t e = contraction_end(s, pos, end, false);
        if (e) {
            return e;
        }
    }
    const struct unit u0 = unit_at(s, pos, end);
    if (u0.cp == ' ' && pos + 1 < end) {
        const struct unit u1 = unit_at(s, pos + 1, end);
        if (u1.cls != MOQAE_CP_SPACE) { /* " ?" then a letter, number or other run */
            return run_end(s, pos + 1, end, u1.cls, -1);
        }
    }
    if (u0.cls != MOQAE_CP_SPACE) {
        return run_end(s, pos, end, u0.cls, -1);
    }
    return space_end(s, pos, end, false);
}

/* Qwen2 (max_digits 1) and LLaMA-3 (max_digits 3):
 * (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,max}| ?[^\s\p{L}\p{N}]+[\r\n]*|
 * \s*[\r\n]+|\s+(?!\S)|\s+ */
static size_t match_qwen2(const uint8_t * s, size_t pos, size_t end, int max_digits) {
    if (s[pos] == '\'') {
        const size_t e = contraction_end(s, pos, end, true);
        if (e) {
            return e;
        }
    }
    const struct unit u0 = unit_at(s, pos, end);
    if (u0.cls == MOQAE_CP_LETTER) {
        return run_end(s, pos, end, MOQAE_CP_LETTER, -1);
    }
    const size_t p1 = pos + (size_t) u0.len;
    if (u0.cls != MOQAE_CP_NUMBER && u0.cp != '\r' && u0.cp != '\n' && p1 < end &&
        unit_at(s, p1, end).cls == MOQAE_CP_LETTER) {
        return run_end(s, p1, end, MOQAE_CP_LETTER, -1); /* one non-letter, then letters */
    }
    if (u0.cls == MOQAE_CP_NUMBER) {
        return run_end(s, pos, end, MOQAE_CP_NUMBER, max_digits);
    }
    size_t j = end; /* start of the [^\s\p{L}\p{N}]+ run, if any */
    if (u0.cp == ' ' && p1 < end && unit_at(s, p1, end).cls == MOQAE_CP_OTHER) {
        j = p1;
    } else if (u0.cls == MOQAE_CP_OTHER) {
        j = pos;
    }
    if (j != end) {
        size_t k = run_end(s, j, end, MOQAE_CP_OTHER, -1);
        while (k < end && (s[k] == '\r' || s[k] == '\n')) {
            k++;
        }
        return k;
    }
    return space_end(s, pos, end, true);
}

/* End of the next pre-token of the tokenizer's kind (SmolLM is handled by the caller). */
static size_t pre_next(const struct moqae_tokenizer * tok, const uint8_t * s, size_t pos, size_t end) {
    switch (tok->pre) {
        case MOQAE_PRE_QWEN2: return match_qwen2(s, pos, end, 1);
        case MOQAE_PRE_LLAMA_BPE: return match_qwen2(s, pos, end, 3);
        default: return match_gpt2(s, pos, end);
    }
}

/* ================================================================================================
 * BPE merges over one pre-token
 * ============================================================================================== */

/* A candidate merge of the symbol at pos with the next one; stale once either side changed. */
struct bpe_cand {
    int32_t rank;
    int32_t pos;
    int32_t left;  /* token ids when queued */
    int32_t right;
    int32_t id;    /* the merged token */
};

static inline bool cand_before(const struct bpe_cand * a, const struct bpe_cand * b) {
    return a->rank < b->rank || (a->rank == b->rank && a->pos < b->pos);
}

static void heap_push(struct bpe_cand * h, int64_t * n, struct bpe_cand c) {
    int64_t i = (*n)++;
    while (i > 0) {
        const int64_t parent = (i - 1) / 2;
        if (!cand_before(&c, &h[parent])) {
            break;
        }
        h[i] = h[parent];
        i    = parent;
    }
    h[i] = c;
}

static struct bpe_cand heap_pop(struct bpe_cand * h, int64_t * n) {
    const struct bpe_cand top  = h[0];
    const struct bpe_cand last = h[--(*n)];
    int64_t               i    = 0;
    for (;;) {
        int64_t c = 2 * i + 1;
        if (c >= *n) {
            break;
        }
        if (c + 1 < *n && cand_before(&h[c + 1], &h[c])) {
            c++;
        }
        if (!cand_before(&h[c], &last)) {
            break;
        }
        h[i] = h[c];
        i    = c;
    }
    if (*n > 0) {
        h[i] = last;
    }
    return top;
}

struct bpe_sym {
    int32_t id;   /* -1: merged away */
    int32_t prev; /* -1: none */
    int32_t next;
};

static void bpe_try_pair(const struct moqae_tokenizer * tok, const struct bpe_sym * sym, int32_t pos,
                         struct bpe_cand * heap, int64_t * n_heap) {
    if (pos < 0 || sym[pos].next < 0) {
        return;
    }
    struct bpe_cand c;
    c.pos   = pos;
    c.left  = sym[pos].id;
    c.right = sym[sym[pos].next].id;
    if (moqae_tok_merge_find(tok, c.left, c.right, &c.rank, &c.id)) {
        heap_push(heap, n_heap, c);
    }
}

static int bpe_piece(const struct moqae_tokenizer * tok, const uint8_t * s, size_t n,
                     struct moqae_tok_scratch * scratch, struct moqae_tok_out * out) {
    if (tok->ignore_merges) { /* a pre-token that is a whole token stays one (HF ignore_merges) */
        const int32_t id = moqae_tok_lookup(tok, (const char *) s, n);
        if (id >= 0) {
            moqae_tok_push(out, id);
            return MOQAE_OK;
        }
    }
    if (n == 1 && tok->byte_token[s[0]] >= 0) {
        moqae_tok_push(out, tok->byte_token[s[0]]);
        return MOQAE_OK;
    }
    if (n > INT32_MAX / 4) { /* symbol positions are 32-bit */
        return moqae_fail(MOQAE_ERR_INVALID_ARG, "moqae_tokenize: a pre-token of %zu bytes is too long", n);
    }
    struct bpe_sym *  sym  = moqae_tok_scratch_get(scratch, 0, n * sizeof(struct bpe_sym));
    struct bpe_cand * heap = moqae_tok_scratch_get(scratch, 1, 3 * n * sizeof(struct bpe_cand));
    if (!sym || !heap) {
        return moqae_fail(MOQAE_ERR_OUT_OF_MEMORY, "moqae_tokenize: out of memory");
    }
    /* One symbol per byte. A byte without a token is dropped, as HF's BPE (no unk_token in GPT-2
     * style tokenizer.json files) and llama.cpp do: SmolLM2 has no token for 21 of the 256 bytes. */
    int32_t m = 0;
    for (size_t i = 0; i < n; i++) {
        const int32_t id = tok->byte_token[s[i]];
        if (id < 0) {
            continue;
        }
        sym[m].id   = id;
        sym[m].prev = m - 1;
        sym[m].next = -1;
        if (m > 0) {
            sym[m - 1].next = m;
        }
        m++;
    }
    int64_t n_heap = 0;
    for (int32_t i = 0; i + 1 < m; i++) {
        bpe_try_pair(tok, sym, i, heap, &n_heap);
    }
    while (n_heap > 0) {
        const struct bpe_cand c = heap_pop(heap, &n_heap);
        const int32_t         r = sym[c.pos].next;
        if (sym[c.pos].id != c.left || r < 0 || sym[r].id != c.right) {
            continue; /* stale: one side was merged since */
        }
        sym[c.pos].id   = c.id;
        sym[r].id       = -1;
        sym[c.pos].next = sym[r].next;
        if (sym[r].next >= 0) {
            sym[sym[r].next].prev = c.pos;
        }
        bpe_try_pair(tok, sym, sym[c.pos].prev, heap, &n_heap);
        bpe_try_pair(tok, sym, c.pos, heap, &n_heap);
    }
    for (int32_t i = m > 0 ? 0 : -1; i >= 0; i = sym[i].next) {
        moqae_tok_push(out, sym[i].id);
    }
    return MOQAE_OK;
}

/* Pre-tokenize s[pos..end) and run BPE on each pre-token. */
static int bpe_span(const struct moqae_tokenizer * tok, const uint8_t * s, size_t pos, size_t end,
                    struct moqae_tok_scratch * scratch, struct moqae_tok_out * out) {
    while (pos < end) {
        const size_t e = pre_next(tok, s, pos, end);
        MOQAE_ASSERT(e > pos && e <= end);
        const int st = bpe_piece(tok, s + pos, e - pos, scratch, out);
        if (st != MOQAE_OK) {
            return st;
        }
        pos = e;
    }
    return MOQAE_OK;
}

int moqae_tok_bpe_encode(const struct moqae_tokenizer * tok, const char * text, size_t len,
                         struct moqae_tok_scratch * scratch, struct moqae_tok_out * out) {
    const uint8_t * s = (const uint8_t *) text;
    if (tok->pre != MOQAE_PRE_SMOLLM) {
        return bpe_span(tok, s, 0, len, scratch, out);
    }
    /* SmolLM (HF Digits(individual_digits) then ByteLevel): every \p{N} unit is a pre-token by
     * itself, and the gpt2 regex runs on the spans between them, so its (?!\S) sees a span's end. */
    size_t span = 0, pos = 0;
    while (pos < len) {
        const struct unit u = unit_at(s, pos, len);
        if (u.cls != MOQAE_CP_NUMBER) {
            pos += (size_t) u.len;
            continue;
        }
        int st = bpe_span(tok, s, span, pos, scratch, out);
        if (st == MOQAE_OK) {
            st = bpe_piece(tok, s + pos, (size_t) u.len, scratch, out);
        }
        if (st != MOQAE_OK) {
            return st;
        }
        pos += (size_t) u.len;
        span = pos;
    }
    return bpe_span(tok, s, span, len, scratch, out);
}

/* ================================================================================================
 * Loading the merges
 * ============================================================================================== */

static uint64_t hash_u64(uint64_t x) { /* splitmix64's finaliser */
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ull;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

bool moqae_tok_merge_find(const struct moqae_tokenizer * tok, int32_t left, int32_t right, int32_t * rank,
                          int32_t * id) {
    if (!tok->merges) {
        return false;
    }
    const uint64_t key = ((uint64_t) (uint32_t) left << 32) | (uint32_t) right;
    for (uint64_t i = hash_u64(key) & tok->merge_mask;; i = (i + 1) & tok->merge_mask) {
        const struct moqae_tok_merge * m = &tok->merges[i];
        if (m->key == UINT64_MAX) {
            return false;
        }
        if (m->key == key) {
            *rank = m->rank;
            *id   = m->id;
            return true;
        }
    }
}

/* Insert unless the pair is already there (the first, lowest rank wins). False if it was. */
static bool merge_insert(struct moqae_tokenizer * tok, uint64_t key, int32_t rank, int32_t id) {
    for (uint64_t i = hash_u64(key) & tok->merge_mask;; i = (i + 1) & tok->merge_mask) {
        struct moqae_tok_merge * m = &tok->merges[i];
        if (m->key == key) {
            return false;
        }
        if (m->key == UINT64_MAX) {
            m->key  = key;
            m->rank = rank;
            m->id   = id;
            return true;
        }
    }
}

/* Id of the token spelled s[0..n) in the GPT-2 alphabet (byte-decoded first; a string outside the
 * alphabet is looked up as it is, matching tokens whose piece kept their raw text), or -1. buf holds
 * at least n bytes; the piece is left in buf[0..*bn). */
static int32_t bpe_lookup_spelled(const struct moqae_tokenizer * tok, const char * s, size_t n, char * buf,
                                  size_t * bn) {
    const int64_t len = moqae_tok_gpt2_decode(s, n, buf);
    if (len < 0) {
        memcpy(buf, s, n);
    }
    *bn = len < 0 ? n : (size_t) len;
    return moqae_tok_lookup(tok, buf, *bn);
}

int moqae_tok_bpe_load_merges(struct moqae_tokenizer * tok, const struct moqae_gguf * g) {
    const struct moqae_gguf_kv * kv = NULL;
    int st = moqae_gguf_get_arr(g, "tokenizer.ggml.merges", MOQAE_GGUF_STRING, &kv);
    if (st == MOQAE_ERR_NOT_FOUND) {
        return moqae_fail(st, "tokenizer: tokenizer.ggml.merges is missing (a gpt2 vocabulary needs it)");
    }
    if (st != MOQAE_OK) {
        return st;
    }
    if (kv->arr_n >= INT32_MAX) {
        return moqae_fail(MOQAE_ERR_FORMAT, "tokenizer: %llu merges", (unsigned long long) kv->arr_n);
    }
    const int64_t n = (int64_t) kv->arr_n;
    size_t        max_len = 0;
    for (int64_t r = 0; r < n; r++) {
        max_len = kv->arr_strs[r].len > max_len ? (size_t) kv->arr_strs[r].len : max_len;
    }
    tok->merge_mask = moqae_tok_table_size(n) - 1;
    tok->merges     = malloc((size_t) (tok->merge_mask + 1) * sizeof(struct moqae_tok_merge));
    char * buf      = malloc(2 * max_len + 1);
    if (!tok->merges || !buf) {
        free(buf);
        return moqae_fail(MOQAE_ERR_OUT_OF_MEMORY, "tokenizer: out of memory for %lld merges", (long long) n);
    }
    for (uint64_t i = 0; i <= tok->merge_mask; i++) {
        tok->merges[i].key = UINT64_MAX;
    }
    int64_t skipped = 0;
    for (int64_t r = 0; r < n; r++) {
        const char * s  = kv->arr_strs[r].ptr;
        const size_t sn = (size_t) kv->arr_strs[r].len;
        /* "left right": the first space after the first byte (llama.cpp: find(' ', 1)). */
        const char * sp = sn > 1 ? memchr(s + 1, ' ', sn - 1) : NULL;
        if (!sp) {
            skipped++;
            continue;
        }
        const size_t ln = (size_t) (sp - s);
        size_t       lb, rb;
        const int32_t left  = bpe_lookup_spelled(tok, s, ln, buf, &lb);
        const int32_t right = bpe_lookup_spelled(tok, sp + 1, sn - ln - 1, buf + lb, &rb);
        const int32_t id    = (left >= 0 && right >= 0) ? moqae_tok_lookup(tok, buf, lb + rb) : -1;
        if (id < 0) {
            skipped++; /* a part or the result is not a token: HF would refuse the file, we skip */
            continue;
        }
        const uint64_t key = ((uint64_t) (uint32_t) left << 32) | (uint32_t) right;
        if (merge_insert(tok, key, (int32_t) r, id)) {
            tok->n_merges++;
        }
    }
    free(buf);
    if (skipped) {
        moqae_log(MOQAE_LOG_WARN, "tokenizer: skipped %lld of %lld merges (malformed or naming unknown tokens)",
                  (long long) skipped, (long long) n);
    }
    return MOQAE_OK;
}
