/*
 * fuzz-gguf.c — libFuzzer harness for the GGUF reader (runtime/src/gguf.c) and the loaders on top of
 * it: every input must give a status, never a crash, leak or out-of-bounds read. On a file the reader
 * accepts it reads the first and last byte of every tensor and string it hands out (a wrong bound
 * shows up under ASan), calls every typed getter on every key, builds the tokenizer from the metadata
 * (tokenizer.c's validation) and loads the whole file as a model through a memfd (model.c's checks).
 * Seeds: tests/fuzz/corpus-gguf/ (tests/fuzz/make_seeds.py). Build: scripts/fuzz.sh.
 */
#define _GNU_SOURCE /* memfd_create */

#include "common.h"
#include "memfd.h"
#include "gguf.h"
#include "moqae.h"
#include "tokenizer.h"

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t * data, size_t size);

static volatile uint8_t g_sink;

static void touch_str(struct moqae_gguf_str s) {
    if (s.len > 0) {
        g_sink ^= (uint8_t) s.ptr[0] ^ (uint8_t) s.ptr[s.len - 1];
    }
}

/* Every getter on every key: type mismatches must be statuses. */
static void read_metadata(const struct moqae_gguf * g) {
    char key[256];
    for (uint64_t i = 0; i < g->n_kv; i++) {
        const struct moqae_gguf_kv * kv = &g->kv[i];
        touch_str(kv->key);
        touch_str(kv->str);
        for (uint64_t j = 0; kv->arr_strs && j < kv->arr_n; j++) {
            touch_str(kv->arr_strs[j]);
        }
        if (kv->type == MOQAE_GGUF_ARRAY && kv->arr_type != MOQAE_GGUF_STRING && kv->arr_type != MOQAE_GGUF_ARRAY &&
            kv->arr_n > 0) {
            g_sink ^= (uint8_t) moqae_gguf_arr_i64(kv, kv->arr_n - 1);
            g_sink ^= (uint8_t) (moqae_gguf_arr_f64(kv, 0) > 0.0); /* a double cast to a byte would be UB */
        }
        if (kv->key.len >= sizeof(key)) {
            continue;
        }
        memcpy(key, kv->key.ptr, kv->key.len);
        key[kv->key.len] = '\0'; /* a key with a NUL inside finds an earlier key or none: both fine */
        uint32_t u32;
        int64_t  i64;
        float    f32;
        bool     b;
        struct moqae_gguf_str        s;
        const struct moqae_gguf_kv * arr;
        (void) moqae_gguf_get_u32(g, key, &u32);
        (void) moqae_gguf_get_i64(g, key, &i64);
        (void) moqae_gguf_get_f32(g, key, &f32);
        (void) moqae_gguf_get_bool(g, key, &b);
        if (moqae_gguf_get_str(g, key, &s) == MOQAE_OK) {
            touch_str(s);
        }
        for (int t = 0; t < MOQAE_GGUF_TYPE_COUNT; t++) {
            (void) moqae_gguf_get_arr(g, key, (enum moqae_gguf_type) t, &arr);
        }
    }
}

/* Build the tokenizer from the metadata and use it once. */
static void load_tokenizer(const struct moqae_gguf * g) {
    struct moqae_tokenizer * tok = NULL;
    if (moqae_tokenizer_new(g, &tok) != MOQAE_OK) {
        return;
    }
    static const char text[] = "Hello <|im_start|> world\xe2\x96\x81 \xff<s>";
    int32_t           ids[64];
    int64_t           n = 0;
    if (moqae_tokenizer_encode(tok, text, sizeof(text) - 1, true, true, ids, 64, &n) == MOQAE_OK) {
        char   out[256];
        size_t len = 0;
        (void) moqae_tokenizer_decode(tok, ids, n, true, out, sizeof(out), &len);
    }
    moqae_tokenizer_free(tok);
}

/* The model loader takes a path: hand it the bytes through a memfd. */
static void load_model(const uint8_t * data, size_t size) {
    char      path[64];
    const int fd = fuzz_memfd("fuzz-gguf", data, size, path);
    if (fd < 0) {
        return;
    }
    struct moqae_model * model = NULL;
    if (moqae_model_load(path, NULL, &model) == MOQAE_OK) {
        struct moqae_model_info info;
        (void) moqae_model_get_info(model, &info);
        moqae_model_free(model);
    }
    close(fd);
}

int LLVMFuzzerTestOneInput(const uint8_t * data, size_t size) {
    struct moqae_gguf * g = NULL;
    if (moqae_gguf_open_buffer(data, size, &g) != 0) {
        return 0;
    }
    for (uint64_t i = 0; i < g->n_tensors; i++) {
        const uint8_t * p = g->tensors[i].data;
        touch_str(g->tensors[i].name);
        if (g->tensors[i].n_bytes > 0) {
            g_sink ^= p[0] ^ p[g->tensors[i].n_bytes - 1];
        }
        (void) moqae_gguf_find_tensor(g, "token_embd.weight");
    }
    read_metadata(g);
    load_tokenizer(g);
    const bool has_arch = moqae_gguf_find_kv(g, "general.architecture") != NULL;
    moqae_gguf_close(g);
    if (has_arch) {
        load_model(data, size);
    }
    return 0;
}
