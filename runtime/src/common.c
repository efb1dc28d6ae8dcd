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

/* ---- SHA-256 (FIPS 180-4), for the model fingerprint that routers carry -------------------------- */

static uint32_t rotr32(uint32_t x, int n) {
    return (x >> n) | (x << (32 - n));
}

static void sha256_block(uint32_t h[8], const uint8_t * p) {
    static const uint32_t k[64] = {
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
        0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
        0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
        0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
        0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
        0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
        0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
        0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
    };
    uint32_t w[64];
    for (int i = 0; i < 16; i++) {
        w[i] = (uint32_t) p[4 * i] << 24 | (uint32_t) p[4 * i + 1] << 16 | (uint32_t) p[4 * i + 2] << 8 | p[4 * i + 3];
    }
    for (int i = 16; i < 64; i++) {
        const uint32_t s0 = rotr32(w[i - 15], 7) ^ rotr32(w[i - 15], 18) ^ (w[i - 15] >> 3);
        const uint32_t s1 = rotr32(w[i - 2], 17) ^ rotr32(w[i - 2], 19) ^ (w[i - 2] >> 10);
        w[i]              = w[i - 16] + s0 + w[i - 7] + s1;
    }
    uint32_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4], f = h[5], g = h[6], hh = h[7];
    for (int i = 0; i < 64; i++) {
        const uint32_t t1 = hh + (rotr32(e, 6) ^ rotr32(e, 11) ^ rotr32(e, 25)) + ((e & f) ^ (~e & g)) + k[i] + w[i];
        const uint32_t t2 = (rotr32(a, 2) ^ rotr32(a, 13) ^ rotr32(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
        hh = g;
        g  = f;
        f  = e;
        e  = d + t1;
        d  = c;
        c  = b;
        b  = a;
        a  = t1 + t2;
    }
    h[0] += a, h[1] += b, h[2] += c, h[3] += d, h[4] += e, h[5] += f, h[6] += g, h[7] += hh;
}

void moqae_sha256_hex(const void * data, size_t n, char out[65]) {
    uint32_t        h[8] = { 0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                             0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19 };
    const uint8_t * p    = data;
    size_t          i    = 0;
    for (; i + 64 <= n; i += 64) {
        sha256_block(h, p + i);
    }
    uint8_t tail[128] = { 0 };
    const size_t rest = n - i;
    if (rest) {
        memcpy(tail, p + i, rest);
    }
    tail[rest]           = 0x80;
    const size_t   tlen  = rest + 9 <= 64 ? 64 : 128;
    const uint64_t nbits = (uint64_t) n * 8u;
    for (int j = 0; j < 8; j++) {
        tail[tlen - 1 - j] = (uint8_t) (nbits >> (8 * j));
    }
    sha256_block(h, tail);
    if (tlen == 128) {
        sha256_block(h, tail + 64);
    }
    for (int j = 0; j < 8; j++) {
        snprintf(out + 8 * j, 9, "%08x", h[j]);
    }
}
