/*
 * tool-common.c — see tool-common.h.
 */
#include "tool-common.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

int tool_error(const char * fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("error: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    return 1;
}

bool tool_arg_str(int argc, char ** argv, int * i, const char * opt, const char ** out) {
    if (*i + 1 >= argc) {
        tool_error("option %s needs a value", opt);
        return false;
    }
    *out = argv[++*i];
    return true;
}

bool tool_arg_i64(int argc, char ** argv, int * i, const char * opt, int64_t lo, int64_t hi, int64_t * out) {
    const char * s;
    if (!tool_arg_str(argc, argv, i, opt, &s)) {
        return false;
    }
    char * end = NULL;
    errno      = 0;
    long long v = strtoll(s, &end, 10);
    if (errno || end == s || *end != '\0' || v < lo || v > hi) {
        tool_error("option %s expects an integer in [%lld, %lld], got '%s'", opt, (long long) lo, (long long) hi, s);
        return false;
    }
    *out = v;
    return true;
}

bool tool_arg_f32(int argc, char ** argv, int * i, const char * opt, float lo, float hi, float * out) {
    const char * s;
    if (!tool_arg_str(argc, argv, i, opt, &s)) {
        return false;
    }
    char * end = NULL;
    errno      = 0;
    float v    = strtof(s, &end);
    if (errno || end == s || *end != '\0' || isnan(v) || v < lo || v > hi) {
        tool_error("option %s expects a number in [%g, %g], got '%s'", opt, (double) lo, (double) hi, s);
        return false;
    }
    *out = v;
    return true;
}

char * tool_read_file(const char * path, size_t * len) {
    FILE * f = fopen(path, "rb");
    if (!f) {
        tool_error("cannot open '%s': %s", path, strerror(errno));
        return NULL;
    }
    size_t cap = 1 << 16, n = 0;
    char * buf = malloc(cap + 1);
    while (buf) {
        size_t r = fread(buf + n, 1, cap - n, f);
        n += r;
        if (r == 0) {
            break;
        }
        if (n == cap) {
            char * nb = realloc(buf, cap * 2 + 1);
            if (!nb) {
                free(buf);
                buf = NULL;
                break;
            }
            buf = nb;
            cap *= 2;
        }
    }
    const bool err = ferror(f);
    fclose(f);
    if (!buf) {
        tool_error("out of memory reading '%s'", path);
        return NULL;
    }
    if (err) {
        free(buf);
        tool_error("cannot read '%s': %s", path, strerror(errno ? errno : EIO));
        return NULL;
    }
    buf[n] = '\0';
    *len   = n;
    return buf;
}

bool tool_tokenize(const struct moqae_model * m, const char * text, size_t len, bool add_special, bool parse_special,
                   int32_t ** tokens, int64_t * n) {
    int64_t cap = (int64_t) len + 16;
    *tokens     = malloc((size_t) cap * sizeof(int32_t));
    if (!*tokens) {
        tool_error("out of memory tokenizing %zu bytes", len);
        return false;
    }
    int st = moqae_tokenize(m, text, len, add_special, parse_special, *tokens, cap, n);
    if (st == MOQAE_ERR_BUFFER_TOO_SMALL) {
        free(*tokens);
        cap     = *n;
        *tokens = malloc((size_t) (cap ? cap : 1) * sizeof(int32_t));
        st      = *tokens ? moqae_tokenize(m, text, len, add_special, parse_special, *tokens, cap, n)
                          : MOQAE_ERR_OUT_OF_MEMORY;
    }
    if (st) {
        free(*tokens);
        *tokens = NULL;
        tool_error("tokenization failed: %s", moqae_last_error());
        return false;
    }
    return true;
}

int32_t tool_n_gpu_layers = 0;

bool tool_load_model(const char * path, struct moqae_model ** out) {
    if (!path) {
        tool_error("no model given: use -m MODEL.gguf");
        return false;
    }
    struct moqae_model_params mp = moqae_model_default_params();
    mp.n_gpu_layers              = tool_n_gpu_layers;
    int st = moqae_model_load(path, &mp, out);
    if (st) {
        tool_error("%s", moqae_last_error());
        return false;
    }
    return true;
}

double tool_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double) ts.tv_sec + (double) ts.tv_nsec * 1e-9;
}

static void log_to_stderr(int level, const char * msg, void * user) {
    const bool verbose = user != NULL;
    if (verbose || level >= MOQAE_LOG_WARN) {
        static const char * names[] = { "debug", "info", "warning", "error" };
        fprintf(stderr, "%s: %s\n", names[level < 0 || level > 3 ? 3 : level], msg);
    }
}

void tool_install_logger(bool verbose) {
    moqae_log_set(log_to_stderr, verbose ? (void *) 1 : NULL);
}

const char * const TOOL_KV_USAGE =
    "  --kv POLICY       KV cache: fp16, int8, int4, int2, sink+int8, sink+int4, sink+int2 (default fp16)\n"
    "  --kv-budget BYTES bytes for the encoded KV chunks (suffixes K, M, G; default: sized from -c)\n"
    "  --kv-bits B       KV budget of B effective bits per element over -c tokens (instead of --kv-budget)\n"
    "  --kv-overflow P   when the KV cache is full: error, shift (drop oldest chunks), demote (fewer bits)\n"
    "  --kv-chunk N      tokens per KV chunk: 32 (default) or 64\n"
    "  --kv-keys WHERE   quantize keys before RoPE (pre, default: the more exact) or after it (post: a faster\n"
    "                    decode attention on the GPU, a little more error; docs/KV-CODECS.md)\n"
    "  --router R.gguf   a MoQAE router picks each chunk's expert (instead of --kv)\n"
    "  -ngl N            layers to offload to CUDA: the last N and the output head (0 = CPU, default; 99 = all)\n";

static const char *          g_router_path; /* --router */
static struct moqae_router * g_router;

/* The value of option opt as the index of one of names[0..n) in *out; false, saying what it expects, if none. */
static bool arg_choice(int argc, char ** argv, int * i, const char * opt, const char * const * names, int n,
                       const char * expects, int32_t * out) {
    const char * s = NULL;
    if (!tool_arg_str(argc, argv, i, opt, &s)) {
        return false;
    }
    for (int k = 0; k < n; k++) {
        if (!strcmp(s, names[k])) {
            *out = k;
            return true;
        }
    }
    tool_error("%s expects %s, got '%s'", opt, expects, s);
    return false;
}

bool tool_arg_kv(int argc, char ** argv, int * i, struct moqae_context_params * cp, bool * ok) {
    const char * a = argv[*i];
    int64_t      v = 0;
    *ok            = true;
    if (!strcmp(a, "--kv")) {
        *ok = tool_arg_str(argc, argv, i, a, &cp->kv);
    } else if (!strcmp(a, "--router")) {
        *ok = tool_arg_str(argc, argv, i, a, &g_router_path);
    } else if (!strcmp(a, "-ngl") || !strcmp(a, "--n-gpu-layers")) {
        *ok = tool_arg_i64(argc, argv, i, a, 0, 100000, &v);
        tool_n_gpu_layers = (int32_t) v;
    } else if (!strcmp(a, "--kv-chunk")) {
        *ok = tool_arg_i64(argc, argv, i, a, 32, 64, &v);
        if (*ok && v != 32 && v != 64) {
            *ok = false;
            tool_error("--kv-chunk must be 32 or 64, got %lld", (long long) v);
        }
        cp->kv_chunk = (int32_t) v;
    } else if (!strcmp(a, "--kv-overflow")) { /* the names in enum moqae_kv_overflow_policy's order */
        static const char * const names[] = { "error", "shift", "demote" };
        *ok = arg_choice(argc, argv, i, a, names, 3, "error, shift or demote", &cp->kv_overflow);
    } else if (!strcmp(a, "--kv-keys")) { /* enum moqae_kv_keys's order */
        static const char * const names[] = { "pre", "post" };
        *ok = arg_choice(argc, argv, i, a, names, 2, "pre or post (keys quantized before or after RoPE)",
                         &cp->kv_keys);
    } else if (!strcmp(a, "--kv-bits")) {
        const char * s = NULL;
        if ((*ok = tool_arg_str(argc, argv, i, a, &s))) {
            char * end = NULL;
            cp->kv_bits = strtod(s, &end);
            if (end == s || *end != '\0' || !(cp->kv_bits >= 1.0 && cp->kv_bits <= 16.0)) {
                *ok = false;
                tool_error("--kv-bits expects bits per element between 1 and 16 (e.g. 3.5), got '%s'", s);
            }
        }
    } else if (!strcmp(a, "--kv-budget")) {
        const char * s = NULL;
        if ((*ok = tool_arg_str(argc, argv, i, a, &s))) {
            char *   end = NULL;
            double   x   = strtod(s, &end);
            double   mul = 1.0;
            if (end && (*end == 'K' || *end == 'k')) {
                mul = 1024.0, end++;
            } else if (end && (*end == 'M' || *end == 'm')) {
                mul = 1048576.0, end++;
            } else if (end && (*end == 'G' || *end == 'g')) {
                mul = 1073741824.0, end++;
            }
            if (end == s || *end != '\0' || !(x > 0) || x * mul > 1e15) {
                *ok = false;
                tool_error("--kv-budget expects a positive size in bytes (e.g. 64M), got '%s'", s);
            } else {
                cp->kv_budget = (int64_t) (x * mul);
            }
        }
    } else {
        return false;
    }
    return true;
}

bool tool_context_new(struct moqae_model * model, struct moqae_context_params * cp, struct moqae_context ** ctx) {
    if (g_router_path && !g_router) {
        if (cp->kv) {
            tool_error("give either --kv or --router, not both");
            return false;
        }
        if (moqae_router_load(model, g_router_path, &g_router)) {
            tool_error("%s", moqae_last_error());
            return false;
        }
    }
    cp->router = g_router;
    if (moqae_context_new(model, cp, ctx)) {
        tool_error("%s", moqae_last_error());
        return false;
    }
    return true;
}

void tool_context_free(struct moqae_context * ctx) {
    moqae_context_free(ctx);
    moqae_router_free(g_router);
    g_router = NULL;
}

void tool_print_kv_stats(const struct moqae_kv_stats * s, const struct moqae_context_params * cp) {
    const struct moqae_kv_stats ks = *s;
    fprintf(stderr,
            "kv cache:   %lld/%lld tokens, %s, chunks fp16 %lld int8 %lld int4 %lld int2 %lld, %.2f nominal / %.2f "
            "effective bits, %.2f MiB used, %.2f MiB reserved\n",
            (long long) ks.n_tokens, (long long) ks.n_ctx, cp->router ? "router" : cp->kv ? cp->kv : "fp16", (long long) ks.n_chunks[0],
            (long long) ks.n_chunks[1], (long long) ks.n_chunks[2], (long long) ks.n_chunks[3], ks.nominal_bits,
            ks.effective_bits, (double) ks.bytes_used / 1048576.0, (double) ks.bytes_reserved / 1048576.0);
}
