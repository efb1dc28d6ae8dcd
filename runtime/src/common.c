/*
 * common.c — thread-local error messages and the process-wide log callback (see common.h).
 */
#include "common.h"

#include <stdarg.h>

#define MOQAE_ERR_MAX 1024

static _Thread_local char g_last_error[MOQAE_ERR_MAX];
static moqae_log_fn       g_log_fn   = NULL;
static void *             g_log_user = NULL;

int moqae_fail(int status, const char * fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(g_last_error, sizeof(g_last_error), fmt, ap);
    va_end(ap);
    return status;
}

int moqae_fail_prefix(int status, const char * fmt, ...) {
    char    prefix[MOQAE_ERR_MAX];
    char    old[MOQAE_ERR_MAX];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(prefix, sizeof(prefix), fmt, ap);
    va_end(ap);
    memcpy(old, g_last_error, sizeof(old));
    size_t lp = strlen(prefix);
    size_t lo = strlen(old);
    if (lp > MOQAE_ERR_MAX - 1) {
        lp = MOQAE_ERR_MAX - 1;
    }
    if (lo > MOQAE_ERR_MAX - 1 - lp) {
        lo = MOQAE_ERR_MAX - 1 - lp;
    }
    memcpy(g_last_error, prefix, lp);
    memcpy(g_last_error + lp, old, lo);
    g_last_error[lp + lo] = '\0';
    return status;
}

void moqae_clear_error(void) {
    g_last_error[0] = '\0';
}

const char * moqae_last_error(void) {
    return g_last_error;
}

const char * moqae_status_name(int status) {
    switch (status) {
        case MOQAE_OK: return "MOQAE_OK";
        case MOQAE_ERR_INVALID_ARG: return "MOQAE_ERR_INVALID_ARG";
        case MOQAE_ERR_IO: return "MOQAE_ERR_IO";
        case MOQAE_ERR_FORMAT: return "MOQAE_ERR_FORMAT";
        case MOQAE_ERR_UNSUPPORTED: return "MOQAE_ERR_UNSUPPORTED";
        case MOQAE_ERR_OUT_OF_MEMORY: return "MOQAE_ERR_OUT_OF_MEMORY";
        case MOQAE_ERR_CONTEXT_FULL: return "MOQAE_ERR_CONTEXT_FULL";
        case MOQAE_ERR_BUFFER_TOO_SMALL: return "MOQAE_ERR_BUFFER_TOO_SMALL";
        case MOQAE_ERR_INTERRUPTED: return "MOQAE_ERR_INTERRUPTED";
        case MOQAE_ERR_INVALID_TOKEN: return "MOQAE_ERR_INVALID_TOKEN";
        case MOQAE_ERR_NOT_FOUND: return "MOQAE_ERR_NOT_FOUND";
        case MOQAE_ERR_INTERNAL: return "MOQAE_ERR_INTERNAL";
        default: return "MOQAE_ERR_UNKNOWN";
    }
}

void moqae_log_set(moqae_log_fn fn, void * user_data) {
    g_log_fn   = fn;
    g_log_user = user_data;
}

void moqae_log(int level, const char * fmt, ...) {
    if (!g_log_fn) {
        return;
    }
    char    msg[MOQAE_ERR_MAX];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    g_log_fn(level, msg, g_log_user);
}

void * moqae_aligned_alloc(size_t bytes) {
    if (bytes == 0) {
        bytes = 64;
    }
    void * p = NULL;
    if (posix_memalign(&p, 64, (bytes + 63) & ~(size_t)63) != 0) {
        return NULL;
    }
    return p;
}
