/*
 * tokenize-dump.c — command-line access to the tokenizer for tests/test_tokenizer.py:
 *   tokenize-dump MODEL.gguf FILE... [--no-special] [--parse-special] [--time]
 *       one line per FILE: the ids of tokenizing its bytes (add_special unless --no-special,
 *       parse_special only with --parse-special), space separated; --time: seconds on stderr.
 *   tokenize-dump MODEL.gguf --decode FILE... [--special] [--hex]
 *       whitespace-separated ids -> the raw bytes (--hex: one line of hex digits per FILE)
 *   tokenize-dump MODEL.gguf --info     n_vocab, BOS/EOS ids and flags, the end-of-generation ids
 *   tokenize-dump MODEL.gguf --fuzz N [SEED] [--threads T]   N random byte strings: encode, check
 *       that decode(encode(s)) == s and that buffer-too-small sizes agree; exit 1 on a mismatch.
 *       --threads: T threads at once on the one tokenizer (it has no mutable state; try -fsanitize=thread).
 * It uses the internal tokenizer directly (links moqae_static). The references are HF tokenizers
 * and sentencepiece, run by the Python test.
 */
#define _POSIX_C_SOURCE 200809L /* clock_gettime */

#include "common.h"
#include "gguf.h"
#include "tokenizer.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static char * read_file(const char * path, size_t * n) {
    FILE * f = strcmp(path, "-") == 0 ? stdin : fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "tokenize-dump: cannot open %s\n", path);
        return NULL;
    }
    size_t cap = 1 << 16, len = 0;
    char * buf = malloc(cap);
    for (;;) {
        if (len + 1 >= cap) { /* room for the NUL that strtol needs */
            cap *= 2;
            buf = realloc(buf, cap);
        }
        if (!buf) {
            return NULL;
        }
        const size_t r = fread(buf + len, 1, cap - len, f);
        if (r == 0) {
            break;
        }
        len += r;
    }
    if (f != stdin) {
        fclose(f);
    }
    buf[len] = '\0';
    *n       = len;
    return buf;
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double) ts.tv_sec + 1e-9 * (double) ts.tv_nsec;
}

/* Tokenize text: the first call asks for the size (capacity 0), the second fills the buffer. */
static int encode(const struct moqae_tokenizer * tok, const char * text, size_t len, bool add_special,
                  bool parse_special, int32_t ** ids, int64_t * n) {
    int st = moqae_tokenizer_encode(tok, text, len, add_special, parse_special, NULL, 0, n);
    if (st != MOQAE_OK && st != MOQAE_ERR_BUFFER_TOO_SMALL) {
        return st;
    }
    if (*n > 0 && st != MOQAE_ERR_BUFFER_TOO_SMALL) {
        return MOQAE_ERR_INTERNAL; /* a non-empty result must not fit in 0 */
    }
    *ids = malloc((size_t) (*n + 1) * sizeof(int32_t));
    if (!*ids) {
        return MOQAE_ERR_OUT_OF_MEMORY;
    }
    int64_t n2 = 0;
    st         = moqae_tokenizer_encode(tok, text, len, add_special, parse_special, *ids, *n, &n2);
    return (st == MOQAE_OK && n2 != *n) ? MOQAE_ERR_INTERNAL : st;
}

static int decode(const struct moqae_tokenizer * tok, const int32_t * ids, int64_t n, bool special, char ** out,
                  size_t * len) {
    int st = moqae_tokenizer_decode(tok, ids, n, special, NULL, 0, len);
    if (st != MOQAE_OK && st != MOQAE_ERR_BUFFER_TOO_SMALL) {
        return st;
    }
    *out = malloc(*len + 1);
    if (!*out) {
        return MOQAE_ERR_OUT_OF_MEMORY;
    }
    size_t len2 = 0;
    st          = moqae_tokenizer_decode(tok, ids, n, special, *out, *len, &len2);
    return (st == MOQAE_OK && len2 != *len) ? MOQAE_ERR_INTERNAL : st;
}

static int run_decode(const struct moqae_tokenizer * tok, const char * path, bool special, bool hex) {
    size_t len;
    char * text = read_file(path, &len);
    if (!text) {
        return 1;
    }
    int64_t   n = 0, cap = 1024;
    int32_t * ids = malloc((size_t) cap * sizeof(int32_t));
    char *    p   = text;
    char *    e   = text + len;
    while (p < e && ids) {
        while (p < e && (*p == ' ' || *p == '\n' || *p == '\t' || *p == '\r')) {
            p++;
        }
        if (p == e) {
            break;
        }
        char * q = p;
        long   v = strtol(p, &q, 10);
        if (q == p || (q < e && *q != ' ' && *q != '\n' && *q != '\t' && *q != '\r')) {
            fprintf(stderr, "tokenize-dump: bad id near byte %lld\n", (long long) (p - text));
            return 1;
        }
        if (n == cap) {
            cap *= 2;
            ids = realloc(ids, (size_t) cap * sizeof(int32_t));
            if (!ids) {
                break;
            }
        }
        ids[n++] = (int32_t) v;
        p        = q;
    }
    free(text);
    char * out = NULL;
    size_t out_len;
    int    st = ids ? decode(tok, ids, n, special, &out, &out_len) : MOQAE_ERR_OUT_OF_MEMORY;
    free(ids);
    if (st != MOQAE_OK) {
        fprintf(stderr, "tokenize-dump: %s: %s\n", moqae_status_name(st), moqae_last_error());
        free(out);
        return 1;
    }
    if (hex) {
        for (size_t i = 0; i < out_len; i++) {
            printf("%02x", (unsigned) (uint8_t) out[i]);
        }
        printf("\n");
    } else {
        fwrite(out, 1, out_len, stdout);
    }
    free(out);
    return 0;
}

/* Print the ids of the file's text on one line; timing: the seconds it took on stderr. */
static int run_encode(const struct moqae_tokenizer * tok, const char * path, bool add_special, bool parse_special,
                      bool timing) {
    size_t len;
    char * text = read_file(path, &len);
    if (!text) {
        return 1;
    }
    /* One call with room for the worst case (SPM: 3 byte tokens per space, plus BOS/EOS). */
    const int64_t cap = (int64_t) (3 * len + 8);
    int32_t *     ids = malloc((size_t) cap * sizeof(int32_t));
    int64_t       n   = 0;
    const double  t0  = now_s();
    const int     st  = ids ? moqae_tokenizer_encode(tok, text, len, add_special, parse_special, ids, cap, &n)
                            : MOQAE_ERR_OUT_OF_MEMORY;
    const double  t1  = now_s();
    if (st == MOQAE_OK) {
        for (int64_t i = 0; i < n; i++) {
            printf(i ? " %d" : "%d", (int) ids[i]);
        }
        printf("\n");
        if (timing) {
            fprintf(stderr, "%s: %zu bytes -> %lld tokens in %.3f s\n", path, len, (long long) n, t1 - t0);
        }
    } else {
        fprintf(stderr, "tokenize-dump: %s: %s\n", moqae_status_name(st), moqae_last_error());
    }
    free(ids);
    free(text);
    return st == MOQAE_OK ? 0 : 1;
}

/* xorshift64*: deterministic random bytes for the fuzz loop. */
static uint64_t rng_next(uint64_t * s) {
    *s ^= *s >> 12;
    *s ^= *s << 25;
    *s ^= *s >> 27;
    return *s * 0x2545F4914F6CDD1Dull;
}

/* Bytes the vocabulary cannot spell (SmolLM2 has no token for 21 bytes; BPE drops them, as HF
 * does): the fuzz loop replaces them by '?' so that its round trip can be exact. And whether a "▁"
 * comes back as ' ' (SentencePiece cannot tell it from a space). */
static void probe_round_trip(const struct moqae_tokenizer * tok, bool lossy[256], bool * spm_space) {
    for (int b = 0; b < 257; b++) {
        const char   c    = (char) b;
        const char * text = b < 256 ? &c : "\xe2\x96\x81";
        int32_t *    ids  = NULL;
        int64_t      n    = 0;
        char *       out  = NULL;
        size_t       out_len = 0;
        int          st   = encode(tok, text, b < 256 ? 1 : 3, false, false, &ids, &n);
        if (st == MOQAE_OK) {
            st = decode(tok, ids, n, false, &out, &out_len);
        }
        if (b < 256) {
            lossy[b] = st != MOQAE_OK || out_len != 1 || out[0] != c;
        } else {
            *spm_space = st == MOQAE_OK && out_len == 1 && out[0] == ' ';
        }
        free(ids);
        free(out);
    }
}

static int run_fuzz(const struct moqae_tokenizer * tok, long iters, uint64_t seed) {
    static const char * const pieces[] = {" ", "  ", "\n", "\r\n", "\t", "'s", "'LL", "a", "Z", "é", "中文", "😀",
                                          "\xe2\x80\x8d", "7", "123", "<|im_start|>", "<|im_end|>", "<s>",
                                          "\xff", "\xc3", "\xed\xa0\x80", "\xf4\x90\x80\x80", "\xe2\x96\x81"};
    const int n_pieces = (int) (sizeof(pieces) / sizeof(pieces[0]));
    uint64_t  s        = seed ? seed : 1;
    char      text[512];
    bool lossy[256], spm_space = false;
    probe_round_trip(tok, lossy, &spm_space);
    for (long it = 0; it < iters; it++) {
        size_t len  = 0;
        size_t want = rng_next(&s) % 200;
        while (len < want) {
            const uint64_t r = rng_next(&s);
            if (r % 3 == 0) { /* a random byte */
                text[len++] = (char) (r >> 8);
            } else {
                const char * p = pieces[(r >> 8) % (uint64_t) n_pieces];
                const size_t n = strlen(p);
                if (len + n > sizeof(text)) {
                    break;
                }
                memcpy(text + len, p, n);
                len += n;
            }
        }
        for (size_t i = 0; i < len; i++) {
            if (lossy[(uint8_t) text[i]]) {
                text[i] = '?';
            }
        }
        const bool parse = (rng_next(&s) & 1) != 0;
        const bool add   = (rng_next(&s) & 1) != 0;
        int32_t *  ids   = NULL;
        int64_t    n     = 0;
        int        st    = encode(tok, text, len, add, parse, &ids, &n);
        char *     out   = NULL;
        size_t     out_len = 0;
        if (st == MOQAE_OK) {
            st = decode(tok, ids, n, parse, &out, &out_len);
        }
        if (st != MOQAE_OK) {
            fprintf(stderr, "fuzz %ld: %s: %s\n", it, moqae_status_name(st), moqae_last_error());
            return 1;
        }
        /* Plain text must survive the round trip byte for byte. */
        char   expect[sizeof(text)];
        size_t expect_len = 0;
        for (size_t i = 0; i < len; i++) {
            if (spm_space && i + 2 < len && memcmp(text + i, "\xe2\x96\x81", 3) == 0) {
                expect[expect_len++] = ' ';
                i += 2;
            } else {
                expect[expect_len++] = text[i];
            }
        }
        if (!parse && !add && (out_len != expect_len || memcmp(out, expect, expect_len) != 0)) {
            fprintf(stderr, "fuzz %ld: round trip differs (%zu bytes in, %zu out)\n", it, len, out_len);
            return 1;
        }
        for (int64_t i = 0; i < n; i++) {
            char   piece[64];
            size_t pn = 0;
            st        = moqae_tokenizer_piece(tok, ids[i], true, piece, sizeof(piece), &pn);
            if (st != MOQAE_OK && st != MOQAE_ERR_BUFFER_TOO_SMALL) {
                fprintf(stderr, "fuzz %ld: piece of %d: %s\n", it, (int) ids[i], moqae_status_name(st));
                return 1;
            }
        }
        free(ids);
        free(out);
    }
    /* Invalid ids are errors, never crashes. */
    const int32_t bad[2] = {-1, (int32_t) moqae_tokenizer_n_vocab(tok)};
    char          buf[8];
    size_t        nw;
    for (int i = 0; i < 2; i++) {
        if (moqae_tokenizer_piece(tok, bad[i], false, buf, sizeof(buf), &nw) != MOQAE_ERR_INVALID_TOKEN ||
            moqae_tokenizer_decode(tok, &bad[i], 1, false, buf, sizeof(buf), &nw) != MOQAE_ERR_INVALID_TOKEN ||
            moqae_tokenizer_is_eog(tok, bad[i])) {
            fprintf(stderr, "fuzz: invalid id %d not rejected\n", (int) bad[i]);
            return 1;
        }
    }
    printf("fuzz: %ld strings OK\n", iters);
    return 0;
}

struct fuzz_job {
    const struct moqae_tokenizer * tok;
    long                           iters;
    uint64_t                       seed;
    int                            rc;
};

static void * fuzz_thread(void * arg) {
    struct fuzz_job * job = arg;
    job->rc               = run_fuzz(job->tok, job->iters, job->seed);
    return NULL;
}

static int run_fuzz_threads(const struct moqae_tokenizer * tok, long iters, uint64_t seed, int n_threads) {
    struct fuzz_job jobs[64];
    pthread_t       th[64];
    n_threads = n_threads < 1 ? 1 : n_threads > 64 ? 64 : n_threads;
    for (int i = 0; i < n_threads; i++) {
        jobs[i] = (struct fuzz_job){tok, iters, seed + (uint64_t) i, 1};
        if (pthread_create(&th[i], NULL, fuzz_thread, &jobs[i]) != 0) {
            fprintf(stderr, "fuzz: cannot start a thread\n");
            n_threads = i;
            break;
        }
    }
    int rc = 0;
    for (int i = 0; i < n_threads; i++) {
        pthread_join(th[i], NULL);
        rc |= jobs[i].rc;
    }
    return rc;
}

int main(int argc, char ** argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s MODEL.gguf FILE... [--no-special] [--parse-special] [--time]\n"
                        "       %s MODEL.gguf --decode FILE... [--special] [--hex]\n"
                        "       %s MODEL.gguf --info\n"
                        "       %s MODEL.gguf --fuzz N [SEED] [--threads T]\n",
                argv[0], argv[0], argv[0], argv[0]);
        return 2;
    }
    bool        add_special = true, parse_special = false, special = false, timing = false;
    bool        do_decode = false, hex = false, info = false;
    int         n_threads = 1;
    const char *fuzz_n = NULL, *fuzz_seed = NULL;
    const char ** files   = calloc((size_t) argc, sizeof(char *));
    int           n_files = 0;
    for (int i = 2; i < argc; i++) {
        if (strcmp(argv[i], "--no-special") == 0) {
            add_special = false;
        } else if (strcmp(argv[i], "--parse-special") == 0) {
            parse_special = true;
        } else if (strcmp(argv[i], "--special") == 0) {
            special = true;
        } else if (strcmp(argv[i], "--time") == 0) {
            timing = true;
        } else if (strcmp(argv[i], "--decode") == 0) {
            do_decode = true;
        } else if (strcmp(argv[i], "--hex") == 0) {
            hex = true;
        } else if (strcmp(argv[i], "--threads") == 0 && i + 1 < argc) {
            n_threads = atoi(argv[++i]);
        } else if (strcmp(argv[i], "--info") == 0) {
            info = true;
        } else if (strcmp(argv[i], "--fuzz") == 0 && i + 1 < argc) {
            fuzz_n = argv[++i];
            if (i + 1 < argc && argv[i + 1][0] != '-') {
                fuzz_seed = argv[++i];
            }
        } else {
            files[n_files++] = argv[i];
        }
    }
    struct moqae_gguf *      g   = NULL;
    struct moqae_tokenizer * tok = NULL;
    int                      st  = moqae_gguf_open(argv[1], &g);
    if (st == MOQAE_OK) {
        st = moqae_tokenizer_new(g, &tok);
    }
    moqae_gguf_close(g); /* the tokenizer keeps copies */
    if (st != MOQAE_OK) {
        fprintf(stderr, "tokenize-dump: %s: %s\n", moqae_status_name(st), moqae_last_error());
        free(files);
        return 1;
    }
    int rc = 0;
    if (info) {
        printf("n_vocab %lld bos %d eos %d add_bos %d add_eos %d\neog", (long long) moqae_tokenizer_n_vocab(tok),
               (int) moqae_tokenizer_bos(tok), (int) moqae_tokenizer_eos(tok), (int) moqae_tokenizer_add_bos(tok),
               (int) moqae_tokenizer_add_eos(tok));
        for (int32_t id = 0; id < (int32_t) moqae_tokenizer_n_vocab(tok); id++) {
            if (moqae_tokenizer_is_eog(tok, id)) {
                printf(" %d", (int) id);
            }
        }
        printf("\n");
    } else if (do_decode) {
        for (int f = 0; f < n_files && rc == 0; f++) {
            rc = run_decode(tok, files[f], special, hex || n_files > 1);
        }
    } else if (fuzz_n) {
        rc = run_fuzz_threads(tok, strtol(fuzz_n, NULL, 10), fuzz_seed ? strtoull(fuzz_seed, NULL, 10) : 1,
                              n_threads);
    } else {
        for (int f = 0; f < n_files && rc == 0; f++) {
            rc = run_encode(tok, files[f], add_special, parse_special, timing);
        }
    }
    moqae_tokenizer_free(tok);
    free(files);
    return rc;
}
