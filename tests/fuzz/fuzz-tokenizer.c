/*
 * fuzz-tokenizer.c — libFuzzer harness for the tokenizers (runtime/src/tokenizer*.c): arbitrary bytes
 * are tokenized, checked and detokenized with every vocabulary loaded once in LLVMFuzzerInitialize.
 * Vocabularies: the GGUF files named in $MOQAE_FUZZ_VOCAB (':'-separated; scripts/fuzz.sh passes
 * SmolLM2's), else tests/fuzz/vocab-spm and vocab-bpe (tiny GGUF files from tests/fuzz/make_seeds.py).
 * Input: byte 0 holds flags (bit 0 add_special, bit 1 parse_special, bit 2 render special pieces,
 * bit 3 read the rest as int32 token ids instead of text), the rest is the text. Any failure of a
 * contract in moqae.h (sizes that disagree, an id outside the vocabulary, a plain-text round trip that
 * loses bytes) aborts, so libFuzzer records the input; ASan/UBSan catch the memory errors.
 * It does not compare with reference tokenizers (tests/test_tokenizer.py does).
 */
#include "common.h"
#include "gguf.h"
#include "tokenizer.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerInitialize(int * argc, char *** argv);
int LLVMFuzzerTestOneInput(const uint8_t * data, size_t size);

#define MAX_VOCABS 4
#define MAX_TEXT   4096 /* longer inputs are cut: the tokenizers are linear, length finds nothing new */

struct vocab {
    struct moqae_tokenizer * tok;
    char                     path[512];
    bool                     lossy[256]; /* bytes whose one-byte round trip is not the identity */
    bool                     spm_space;  /* "▁" (U+2581) comes back as ' ' */
};

static struct vocab g_vocabs[MAX_VOCABS];
static int          g_n_vocabs = 0;

#define CHECK(cond, ...)                                                                      \
    do {                                                                                      \
        if (!(cond)) {                                                                        \
            fprintf(stderr, "fuzz-tokenizer: %s: check failed: %s: ", v->path, #cond);        \
            fprintf(stderr, __VA_ARGS__);                                                     \
            fprintf(stderr, " (last error: %s)\n", moqae_last_error());                       \
            abort();                                                                          \
        }                                                                                     \
    } while (0)

/* Encode in two calls (size query with capacity 0, then exact capacity), checking they agree. */
static int32_t * encode(const struct vocab * v, const char * text, size_t len, bool add, bool parse, int64_t * n) {
    int64_t need = -1;
    int     st   = moqae_tokenizer_encode(v->tok, text, len, add, parse, NULL, 0, &need);
    CHECK(st == MOQAE_OK || st == MOQAE_ERR_BUFFER_TOO_SMALL, "size query returned %s", moqae_status_name(st));
    CHECK((st == MOQAE_OK) == (need == 0), "size query: %s with %lld tokens", moqae_status_name(st), (long long) need);
    CHECK(need >= 0 && need <= 3 * (int64_t) len + 8, "%lld tokens for %zu bytes", (long long) need, len);
    int32_t * ids = malloc((size_t) (need + 1) * sizeof(int32_t));
    CHECK(ids != NULL, "malloc");
    st = moqae_tokenizer_encode(v->tok, text, len, add, parse, ids, need, n);
    CHECK(st == MOQAE_OK && *n == need, "second call: %s, %lld tokens, expected %lld", moqae_status_name(st),
          (long long) *n, (long long) need);
    if (need > 0) { /* one less than needed must be refused and report the same size */
        int64_t n2 = -1;
        st         = moqae_tokenizer_encode(v->tok, text, len, add, parse, ids, need - 1, &n2);
        CHECK(st == MOQAE_ERR_BUFFER_TOO_SMALL && n2 == need, "capacity %lld: %s, %lld", (long long) (need - 1),
              moqae_status_name(st), (long long) n2);
        st = moqae_tokenizer_encode(v->tok, text, len, add, parse, ids, need, n);
        CHECK(st == MOQAE_OK, "third call: %s", moqae_status_name(st));
    }
    for (int64_t i = 0; i < *n; i++) {
        CHECK(ids[i] >= 0 && ids[i] < moqae_tokenizer_n_vocab(v->tok), "id %d at %lld", (int) ids[i], (long long) i);
    }
    return ids;
}

/* Decode into an exactly sized buffer (NULL on MOQAE_ERR_INVALID_TOKEN), checking the size query. */
static char * decode(const struct vocab * v, const int32_t * ids, int64_t n, bool special, size_t * len) {
    size_t need = (size_t) -1;
    int    st   = moqae_tokenizer_decode(v->tok, ids, n, special, NULL, 0, &need);
    if (st == MOQAE_ERR_INVALID_TOKEN) {
        return NULL;
    }
    CHECK(st == MOQAE_OK || st == MOQAE_ERR_BUFFER_TOO_SMALL, "decode size query: %s", moqae_status_name(st));
    CHECK((st == MOQAE_OK) == (need == 0), "decode size query: %s with %zu bytes", moqae_status_name(st), need);
    char * out = malloc(need + 1);
    CHECK(out != NULL, "malloc");
    st = moqae_tokenizer_decode(v->tok, ids, n, special, out, need, len);
    CHECK(st == MOQAE_OK && *len == need, "decode: %s, %zu bytes, expected %zu", moqae_status_name(st), *len, need);
    return out;
}

/* Token ids straight from the input: valid ones decode, invalid ones are refused, never read. */
static void fuzz_ids(const struct vocab * v, const uint8_t * data, size_t size, bool special) {
    int64_t   n   = (int64_t) (size / 4);
    int32_t * ids = malloc((size_t) (n + 1) * sizeof(int32_t));
    CHECK(ids != NULL, "malloc");
    const int64_t n_vocab = moqae_tokenizer_n_vocab(v->tok);
    bool          valid   = true;
    for (int64_t i = 0; i < n; i++) {
        uint32_t u;
        memcpy(&u, data + 4 * i, 4);
        /* mostly in range, so that decoding is reached; the top bit keeps out-of-range ids possible */
        ids[i] = (u & 0x80000000u) ? (int32_t) u : (int32_t) (u % (uint32_t) (n_vocab + 1));
        valid  = valid && ids[i] >= 0 && ids[i] < n_vocab;
    }
    size_t len = 0;
    char * out = decode(v, ids, n, special, &len);
    CHECK((out != NULL) == valid, "ids valid=%d but decode %s", (int) valid, out ? "succeeded" : "refused them");
    for (int64_t i = 0; i < n; i++) {
        char   piece[8];
        size_t pn = 0;
        int    st = moqae_tokenizer_piece(v->tok, ids[i], special, piece, sizeof(piece), &pn);
        const bool ok = ids[i] >= 0 && ids[i] < n_vocab;
        CHECK(ok ? (st == MOQAE_OK || st == MOQAE_ERR_BUFFER_TOO_SMALL) : st == MOQAE_ERR_INVALID_TOKEN,
              "piece of %d: %s", (int) ids[i], moqae_status_name(st));
        (void) moqae_tokenizer_is_eog(v->tok, ids[i]);
    }
    free(out);
    free(ids);
}

static void fuzz_text(const struct vocab * v, const char * text, size_t len, bool add, bool parse, bool special) {
    int64_t   n   = 0;
    int32_t * ids = encode(v, text, len, add, parse, &n);
    size_t    out_len = 0;
    char *    out     = decode(v, ids, n, special, &out_len);
    CHECK(out != NULL, "the encoder's own ids were refused");
    if (!add && !parse) {
        /* Plain text comes back byte for byte, except bytes the vocabulary cannot spell (dropped) and
         * SentencePiece's "▁", which decodes to a space. */
        char * expect = malloc(len + 1);
        CHECK(expect != NULL, "malloc");
        size_t m = 0;
        for (size_t i = 0; i < len; i++) {
            if (v->spm_space && i + 2 < len && memcmp(text + i, "\xe2\x96\x81", 3) == 0) {
                expect[m++] = ' ';
                i += 2;
            } else if (!v->lossy[(uint8_t) text[i]]) {
                expect[m++] = text[i];
            }
        }
        bool has_lossy = false;
        for (size_t i = 0; i < len; i++) {
            has_lossy = has_lossy || v->lossy[(uint8_t) text[i]];
        }
        /* With a lossy byte the drop may also change how neighbours merge; then only the length bound holds. */
        if (has_lossy) {
            CHECK(out_len <= len + 2 * (size_t) n, "%zu bytes back from %zu", out_len, len);
        } else {
            CHECK(out_len == m && memcmp(out, expect, m) == 0, "round trip: %zu bytes in, %zu out, %zu expected",
                  len, out_len, m);
        }
        free(expect);
    }
    free(out);
    free(ids);
}

int LLVMFuzzerTestOneInput(const uint8_t * data, size_t size) {
    if (size == 0) {
        return 0;
    }
    const uint8_t flags = data[0];
    data++;
    size--;
    if (size > MAX_TEXT) {
        size = MAX_TEXT;
    }
    for (int i = 0; i < g_n_vocabs; i++) {
        if (flags & 8) {
            fuzz_ids(&g_vocabs[i], data, size, (flags & 4) != 0);
        } else {
            fuzz_text(&g_vocabs[i], (const char *) data, size, (flags & 1) != 0, (flags & 2) != 0, (flags & 4) != 0);
        }
    }
    return 0;
}

/* ------------------------------------------------------------------------------------------------
 * Loading the vocabularies
 * ---------------------------------------------------------------------------------------------- */

/* Which single bytes survive a round trip, and whether "▁" decodes to a space (as tokenize-dump does). */
static void probe(struct vocab * v) {
    for (int b = 0; b < 257; b++) {
        const char   c    = (char) b;
        const char * text = b < 256 ? &c : "\xe2\x96\x81";
        const size_t len  = b < 256 ? 1 : 3;
        int64_t      n    = 0;
        int32_t *    ids  = encode(v, text, len, false, false, &n);
        size_t       out_len = 0;
        char *       out     = decode(v, ids, n, false, &out_len);
        if (b < 256) {
            v->lossy[b] = !out || out_len != 1 || out[0] != c;
        } else {
            v->spm_space = out && out_len == 1 && out[0] == ' ';
        }
        free(out);
        free(ids);
    }
}

static void load_vocab(const char * path) {
    if (g_n_vocabs == MAX_VOCABS) {
        fprintf(stderr, "fuzz-tokenizer: more than %d vocabularies, ignoring %s\n", MAX_VOCABS, path);
        return;
    }
    struct vocab *      v = &g_vocabs[g_n_vocabs];
    struct moqae_gguf * g = NULL;
    snprintf(v->path, sizeof(v->path), "%s", path);
    int st = moqae_gguf_open(path, &g);
    if (st == MOQAE_OK) {
        st = moqae_tokenizer_new(g, &v->tok);
    }
    moqae_gguf_close(g);
    if (st != MOQAE_OK) {
        fprintf(stderr, "fuzz-tokenizer: cannot load the vocabulary of %s: %s\n", path, moqae_last_error());
        exit(1);
    }
    probe(v);
    int n_lossy = 0;
    for (int b = 0; b < 256; b++) {
        n_lossy += v->lossy[b];
    }
    fprintf(stderr, "fuzz-tokenizer: %s: %lld tokens, %d bytes without a token%s\n", path,
            (long long) moqae_tokenizer_n_vocab(v->tok), n_lossy, v->spm_space ? ", SentencePiece spaces" : "");
    g_n_vocabs++;
}

int LLVMFuzzerInitialize(int * argc, char *** argv) {
    (void) argc;
    (void) argv;
    const char * env = getenv("MOQAE_FUZZ_VOCAB");
    if (env && *env) {
        char list[4096];
        snprintf(list, sizeof(list), "%s", env);
        for (char * save = NULL, *p = strtok_r(list, ":", &save); p; p = strtok_r(NULL, ":", &save)) {
            load_vocab(p);
        }
        return 0;
    }
    /* __FILE__ is the absolute path of this file in a CMake build: the tiny vocabularies sit beside it. */
    char         dir[1024];
    const char * slash = strrchr(__FILE__, '/');
    snprintf(dir, sizeof(dir), "%.*s", slash ? (int) (slash - __FILE__) : 1, slash ? __FILE__ : ".");
    static const char * const names[] = { "vocab-spm", "vocab-bpe" };
    for (int i = 0; i < 2; i++) {
        char path[1100];
        snprintf(path, sizeof(path), "%s/%s", dir, names[i]);
        load_vocab(path);
    }
    return 0;
}
