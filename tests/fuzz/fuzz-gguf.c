/*
 * fuzz-gguf.c — libFuzzer harness for the GGUF reader (runtime/src/gguf.c): every input must give a
 * status, never a crash, leak or out-of-bounds read. Build with -DMOQAE_FUZZ=ON (clang); seed the
 * corpus with small GGUF files (models/make_tiny.py, tests/test-gguf.c's good file). It reads the
 * tensor bytes the reader hands out so that a wrong bound shows up under ASan.
 */
#include "gguf.h"

#include <stddef.h>
#include <stdint.h>

int LLVMFuzzerTestOneInput(const uint8_t * data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t * data, size_t size) {
    struct moqae_gguf * g = NULL;
    if (moqae_gguf_open_buffer(data, size, &g) != 0) {
        return 0;
    }
    volatile uint8_t sink = 0;
    for (uint64_t i = 0; i < g->n_tensors; i++) {
        const uint8_t * p = g->tensors[i].data;
        sink ^= p[0];
        sink ^= p[g->tensors[i].n_bytes - 1];
    }
    for (uint64_t i = 0; i < g->n_kv; i++) {
        const struct moqae_gguf_kv * kv = &g->kv[i];
        for (uint64_t j = 0; kv->arr_strs && j < kv->arr_n; j++) {
            if (kv->arr_strs[j].len > 0) {
                sink ^= (uint8_t) kv->arr_strs[j].ptr[kv->arr_strs[j].len - 1];
            }
        }
    }
    moqae_gguf_close(g);
    return 0;
}
