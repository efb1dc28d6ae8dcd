/*
 * fuzz-router.c — libFuzzer harness for the router loader (runtime/src/router.c): arbitrary bytes are
 * loaded as a router for a tiny model; every input must give a status, never a crash, leak or
 * out-of-bounds read. A router that loads is then used: a context routes two chunks with it (the
 * votes of whatever weights the input holds) and the KV statistics are read.
 * The base model: $MOQAE_FUZZ_ROUTER_MODEL, default tests/fuzz/corpus-gguf/tiny-bytes-q4_0-tied.
 * Seeds: tests/fuzz/corpus-router/ (routers for that model, tests/fuzz/make_seeds.py). Build: scripts/fuzz.sh.
 */
#define _GNU_SOURCE /* memfd_create */

#include "memfd.h"
#include "moqae.h"

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

int LLVMFuzzerTestOneInput(const uint8_t * data, size_t size);

static struct moqae_model * g_model;

static void free_model(void) {
    moqae_model_free(g_model);
}

static struct moqae_model * base_model(void) {
    if (!g_model) {
        const char * path = getenv("MOQAE_FUZZ_ROUTER_MODEL");
        path = path ? path : "tests/fuzz/corpus-gguf/tiny-bytes-q4_0-tied";
        if (moqae_model_load(path, NULL, &g_model) != MOQAE_OK) {
            fprintf(stderr, "fuzz-router: cannot load the base model %s: %s\n", path, moqae_last_error());
            abort();
        }
        atexit(free_model);
    }
    return g_model;
}

/* Decode a context's worth of tokens through the router; kv_bits > 0: under that budget (bits per
 * element), so that the ring demotes records (in the file's learned order if it has one). */
static void use_router(struct moqae_model * model, const struct moqae_router * router, double kv_bits) {
    struct moqae_router_info ri;
    if (moqae_router_get_info(router, &ri) != MOQAE_OK) {
        abort();
    }
    struct moqae_context_params cp = moqae_context_default_params();
    cp.n_ctx       = kv_bits > 0.0 ? 136 : 2 * ri.chunk_size + 8;
    cp.n_batch     = ri.chunk_size + 3; /* micro-batches that straddle chunks */
    cp.n_threads   = 1;
    cp.router      = router;
    cp.kv_overflow = MOQAE_KV_OVERFLOW_POLICY_DEMOTE;
    cp.kv_bits     = kv_bits;
    struct moqae_context * ctx = NULL;
    if (moqae_context_new(model, &cp, &ctx) != MOQAE_OK) {
        return;
    }
    int32_t toks[136];
    for (int i = 0; i < 136; i++) {
        toks[i] = (int32_t) ((i * 37 + 11) % 200);
    }
    if (moqae_decode(ctx, toks, cp.n_ctx, 1) == MOQAE_OK) {
        struct moqae_kv_stats ks;
        (void) moqae_context_kv_stats(ctx, &ks);
    }
    moqae_context_free(ctx);
}

int LLVMFuzzerTestOneInput(const uint8_t * data, size_t size) {
    struct moqae_model * model = base_model();
    char                 path[64];
    const int            fd = fuzz_memfd("fuzz-router", data, size, path);
    if (fd < 0) {
        return 0;
    }
    struct moqae_router * router = NULL;
    if (moqae_router_load(model, path, &router) == MOQAE_OK) {
        use_router(model, router, 0.0);
        use_router(model, router, 6.0);
        moqae_router_free(router);
    }
    close(fd);
    return 0;
}
