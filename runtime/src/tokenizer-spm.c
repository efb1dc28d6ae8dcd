/*
 * tokenizer-spm.c — SentencePiece-style BPE (tokenizer.ggml.model = "llama"): spaces become "▁"
 * (U+2581), one "▁" goes in front when add_space_prefix is set, then adjacent symbols merge while
 * some pair is a token, highest tokenizer.ggml.scores first (leftmost on ties); a final symbol that
 * is not a token falls back to its bytes as <0xXX> tokens. No normalisation (the NFKC/whitespace
 * rules of a sentencepiece model are not in the GGUF; LLaMA's model uses the identity rule).
 * References: sentencepiece bpe_model.cc (Model::SampleEncode's agenda) and llama.cpp's
 * llm_tokenizer_spm_session; tests/test_tokenizer.py compares with the sentencepiece library.
 */
#include "common.h"
#include "tokenizer-impl.h"
#include "unicode.h"

#include <stdlib.h>
#include <string.h>

struct spm_sym {
    int32_t off;  /* into the normalised text */
    int32_t n;    /* bytes; 0 once merged into its left neighbour */
    int32_t prev; /* -1: none */
    int32_t next;
};

/* A candidate: merge symbol left with the next one, right, into a piece of size bytes. */
struct spm_cand {
    float   score;
    int32_t left;
    int32_t right;
    int32_t size;
};

static inline bool cand_before(const struct spm_cand * a, const struct spm_cand * b) {
    return a->score > b->score || (a->score == b->score && a->left < b->left);
}

static void heap_push(struct spm_cand * h, int64_t * n, struct spm_cand c) {
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

static struct spm_cand heap_pop(struct spm_cand * h, int64_t * n) {
    const struct spm_cand top  = h[0];
    const struct spm_cand last = h[--(*n)];
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

static void spm_try_pair(const struct moqae_tokenizer * tok, const char * text, const struct spm_sym * sym,
                         int32_t left, struct spm_cand * heap, int64_t * n_heap) {
    if (left < 0 || sym[left].next < 0) {
        return;
    }
    const int32_t right = sym[left].next;
    const int32_t size  = sym[left].n + sym[right].n; /* symbols are contiguous in text */
    const int32_t id    = moqae_tok_lookup(tok, text + sym[left].off, (size_t) size);
    if (id < 0) {
        return;
    }
    const struct spm_cand c = {tok->score[id], left, right, size};
    heap_push(heap, n_heap, c);
}

/* Output one final symbol: its token, else its bytes (<0xXX>, else <unk>, else dropped). */
static void spm_emit(const struct moqae_tokenizer * tok, const char * s, size_t n, struct moqae_tok_out * out) {
    const int32_t id = moqae_tok_lookup(tok, s, n);
    if (id >= 0) {
        moqae_tok_push(out, id);
        return;
    }
    for (size_t i = 0; i < n; i++) {
        const int32_t b = tok->byte_token[(uint8_t) s[i]];
        if (b >= 0 || tok->unk >= 0) {
            moqae_tok_push(out, b >= 0 ? b : tok->unk);
        }
    }
}

/* Merge the characters of s[0..n) and emit the tokens. */
static int spm_segment(const struct moqae_tokenizer * tok, const char * s, size_t n,
                       struct moqae_tok_scratch * scratch, struct moqae_tok_out * out) {
    struct spm_sym *  sym  = moqae_tok_scratch_get(scratch, 0, n * sizeof(struct spm_sym));
    struct spm_cand * heap = moqae_tok_scratch_get(scratch, 1, 3 * n * sizeof(struct spm_cand));
    if (!sym || !heap) {
        return moqae_fail(MOQAE_ERR_OUT_OF_MEMORY, "moqae_tokenize: out of memory");
    }
    /* One symbol per character (an invalid byte is a character of its own). */
    int32_t m = 0;
    for (size_t i = 0; i < n;) {
        int32_t   cp;
        const int cl = moqae_utf8_decode((const uint8_t *) s + i, n - i, &cp);
        sym[m].off   = (int32_t) i;
        sym[m].n     = cl;
        sym[m].prev  = m - 1;
        sym[m].next  = -1;
        if (m > 0) {
            sym[m - 1].next = m;
        }
        m++;
        i += (size_t) cl;
    }
    int64_t n_heap = 0;
    for (int32_t i = 0; i + 1 < m; i++) {
        spm_try_pair(tok, s, sym, i, heap, &n_heap);
    }
    while (n_heap > 0) {
        const struct spm_cand c = heap_pop(heap, &n_heap);
        struct spm_sym *      l = &sym[c.left];
        struct spm_sym *      r = &sym[c.right];
        if (l->n == 0 || r->n == 0 || l->n + r->n != c.size) {
            continue; /* stale: one side was merged since (a side only ever grows) */
        }
        l->n += r->n;
        r->n    = 0;
        l->next = r->next;
        if (r->next >= 0) {
            sym[r->next].prev = c.left;
        }
        spm_try_pair(tok, s, sym, l->prev, heap, &n_heap);
        spm_try_pair(tok, s, sym, c.left, heap, &n_heap);
    }
    for (int32_t i = m > 0 ? 0 : -1; i >= 0; i = sym[i].next) {
        spm_emit(tok, s + sym[i].off, (size_t) sym[i].n, out);
    }
    return MOQAE_OK;
}

static bool spm_glues_space(const struct moqae_tokenizer * tok, int32_t cp) {
    int64_t lo = 0, hi = tok->n_spm_glue - 1;
    while (lo <= hi) {
        const int64_t mid = (lo + hi) / 2;
        if (tok->spm_glue[mid] == cp) {
            return true;
        }
        if (tok->spm_glue[mid] < cp) {
            lo = mid + 1;
        } else {
            hi = mid - 1;
        }
    }
    return false;
}

int moqae_tok_spm_encode(const struct moqae_tokenizer * tok, const char * text, size_t len, bool prev_special,
                         struct moqae_tok_scratch * scratch, struct moqae_tok_out * out) {
    static const char space[] = "\xe2\x96\x81"; /* "▁" */
    /* Normalise: optional "▁" prefix, every ' ' -> "▁". */
    const bool prefix   = tok->add_space_prefix && prev_special;
    size_t     n_spaces = 0;
    for (size_t i = 0; i < len; i++) {
        n_spaces += text[i] == ' ';
    }
    const size_t nlen = len + 2 * n_spaces + (prefix ? 3 : 0);
    if (nlen > INT32_MAX / 4) {
        return moqae_fail(MOQAE_ERR_INVALID_ARG, "moqae_tokenize: a text fragment of %zu bytes is too long", len);
    }
    char * s = moqae_tok_scratch_get(scratch, 2, nlen);
    if (!s) {
        return moqae_fail(MOQAE_ERR_OUT_OF_MEMORY, "moqae_tokenize: out of memory");
    }
    size_t k = 0;
    if (prefix) {
        memcpy(s, space, 3);
        k = 3;
    }
    for (size_t i = 0; i < len; i++) {
        if (text[i] == ' ') {
            memcpy(s + k, space, 3);
            k += 3;
        } else {
            s[k++] = text[i];
        }
    }
    /* Cut before each "▁" that no token glues to the character before it: no merge can cross such a
     * cut (a merged symbol is a token), so the segments merge independently and the result is the
     * same as merging the whole text, in far less memory (the scratch is one word, not the text). */
    size_t  seg = 0, i = 0;
    int32_t prev_cp = -2; /* codepoint before i; -2: none */
    while (i < nlen) {
        if (i > seg && i + 2 < nlen && memcmp(s + i, space, 3) == 0 && !spm_glues_space(tok, prev_cp)) {
            const int st = spm_segment(tok, s + seg, i - seg, scratch, out);
            if (st != MOQAE_OK) {
                return st;
            }
            seg = i;
        }
        i += (size_t) moqae_utf8_decode((const uint8_t *) s + i, nlen - i, &prev_cp);
    }
    return spm_segment(tok, s + seg, nlen - seg, scratch, out);
}
