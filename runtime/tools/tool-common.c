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

bool tool_load_model(const char * path, struct moqae_model ** out) {
    if (!path) {
        tool_error("no model given: use -m MODEL.gguf");
        return false;
    }
    int st = moqae_model_load(path, NULL, out);
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
