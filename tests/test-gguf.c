/*
 * test-gguf.c — unit test of the GGUF reader (runtime/src/gguf.c). A small in-test writer builds
 * GGUF byte buffers in memory: a good file with every value type, then one malformed variant per
 * check the reader makes; each must give the right status AND a message naming the problem. Every
 * truncation of the good file and a few thousand random byte corruptions must fail cleanly (run it
 * under -fsanitize=address,undefined). It does not test tensor math or model loading (model.c).
 * MOQAE_TEST_GGUF=path also opens a real file; MOQAE_TEST_VERBOSE=1 prints each rejection message.
 * Reference for the byte layout: ggml docs/gguf.md.
 */
#include "gguf.h"

#include "common.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int g_failures = 0;

#define CHECK(cond, ...)                                                       \
    do {                                                                       \
        if (!(cond)) {                                                         \
            fprintf(stderr, "%s:%d: FAILED: %s: ", __FILE__, __LINE__, #cond); \
            fprintf(stderr, __VA_ARGS__);                                      \
            fprintf(stderr, "\n");                                             \
            g_failures++;                                                      \
        }                                                                      \
    } while (0)

/* ================================================================================================
 * In-test GGUF writer
 * ============================================================================================== */

struct buf {
    uint8_t * p;
    size_t    n, cap;
};

static void put(struct buf * b, const void * d, size_t n) {
    if (b->n + n > b->cap) {
        b->cap = (b->n + n) * 2 + 64;
        b->p   = realloc(b->p, b->cap);
        if (!b->p) {
            abort();
        }
    }
    memcpy(b->p + b->n, d, n);
    b->n += n;
}

static void put_u8(struct buf * b, uint8_t v) { put(b, &v, 1); }
static void put_u16(struct buf * b, uint16_t v) { put(b, &v, 2); }
static void put_u32(struct buf * b, uint32_t v) { put(b, &v, 4); }
static void put_u64(struct buf * b, uint64_t v) { put(b, &v, 8); }
static void put_f32(struct buf * b, float v) { put(b, &v, 4); }
static void put_f64(struct buf * b, double v) { put(b, &v, 8); }

static void put_str(struct buf * b, const char * s) {
    put_u64(b, strlen(s));
    put(b, s, strlen(s));
}

static void put_header(struct buf * b, uint32_t version, uint64_t n_tensors, uint64_t n_kv) {
    put(b, "GGUF", 4);
    put_u32(b, version);
    put_u64(b, n_tensors);
    put_u64(b, n_kv);
}

static void put_key(struct buf * b, const char * key, enum moqae_gguf_type t) {
    put_str(b, key);
    put_u32(b, (uint32_t) t);
}

static void put_tensor_info(struct buf * b, const char * name, uint32_t n_dims, const uint64_t * ne, uint32_t type,
                            uint64_t offset) {
    put_str(b, name);
    put_u32(b, n_dims);
    for (uint32_t d = 0; d < n_dims; d++) {
        put_u64(b, ne[d]);
    }
    put_u32(b, type);
    put_u64(b, offset);
}

static void pad_to(struct buf * b, size_t align, size_t from) {
    while ((b->n - from) % align != 0) {
        put_u8(b, 0);
    }
}

/* The good file: 19 kvs covering every value type, general.alignment = 64, two tensors. It ends
 * exactly at the end of the last tensor, so every shorter prefix must be rejected. */
#define GOOD_N_KV 19
#define GOOD_ALIGN 64
static const char * const k_strs[] = { "alpha", "", "\xce\xb3\xce\xb5\xce\xb9\xce\xb1" };

static struct buf make_good(uint32_t version) {
    struct buf b = { 0 };
    put_header(&b, version, 2, GOOD_N_KV);
    put_key(&b, "general.architecture", MOQAE_GGUF_STRING); put_str(&b, "llama");
    put_key(&b, "t.u8", MOQAE_GGUF_UINT8); put_u8(&b, 200);
    put_key(&b, "t.i8", MOQAE_GGUF_INT8); put_u8(&b, (uint8_t) -100);
    put_key(&b, "t.u16", MOQAE_GGUF_UINT16); put_u16(&b, 60000);
    put_key(&b, "t.i16", MOQAE_GGUF_INT16); put_u16(&b, (uint16_t) -30000);
    put_key(&b, "t.u32", MOQAE_GGUF_UINT32); put_u32(&b, 4000000000u);
    put_key(&b, "t.i32", MOQAE_GGUF_INT32); put_u32(&b, (uint32_t) -2000000000);
    put_key(&b, "t.f32", MOQAE_GGUF_FLOAT32); put_f32(&b, 1.5f);
    put_key(&b, "t.bool", MOQAE_GGUF_BOOL); put_u8(&b, 1);
    put_key(&b, "t.u64", MOQAE_GGUF_UINT64); put_u64(&b, 18000000000000000000ull);
    put_key(&b, "t.i64", MOQAE_GGUF_INT64); put_u64(&b, (uint64_t) -5);
    put_key(&b, "t.f64", MOQAE_GGUF_FLOAT64); put_f64(&b, -2.25);
    put_key(&b, "t.nan", MOQAE_GGUF_FLOAT32); put_f32(&b, NAN);
    put_key(&b, "t.strs", MOQAE_GGUF_ARRAY); put_u32(&b, MOQAE_GGUF_STRING); put_u64(&b, 3);
    for (int i = 0; i < 3; i++) {
        put_str(&b, k_strs[i]);
    }
    put_key(&b, "t.i32s", MOQAE_GGUF_ARRAY); put_u32(&b, MOQAE_GGUF_INT32); put_u64(&b, 3);
    put_u32(&b, 1); put_u32(&b, (uint32_t) -2); put_u32(&b, 3);
    put_key(&b, "t.f32s", MOQAE_GGUF_ARRAY); put_u32(&b, MOQAE_GGUF_FLOAT32); put_u64(&b, 2);
    put_f32(&b, 0.5f); put_f32(&b, -4.0f);
    put_key(&b, "t.bools", MOQAE_GGUF_ARRAY); put_u32(&b, MOQAE_GGUF_BOOL); put_u64(&b, 2);
    put_u8(&b, 0); put_u8(&b, 1);
    put_key(&b, "t.empty", MOQAE_GGUF_ARRAY); put_u32(&b, MOQAE_GGUF_UINT64); put_u64(&b, 0);
    put_key(&b, "general.alignment", MOQAE_GGUF_UINT32); put_u32(&b, GOOD_ALIGN);

    const uint64_t ne_f32[2] = { 8, 3 };  /* 96 bytes at offset 0 */
    const uint64_t ne_q4[2]  = { 64, 2 }; /* 4 blocks of 18 = 72 bytes at offset 128 */
    put_tensor_info(&b, "t.f32", 2, ne_f32, MOQAE_TYPE_F32, 0);
    put_tensor_info(&b, "blk.0.q4", 2, ne_q4, MOQAE_TYPE_Q4_0, 128);
    pad_to(&b, GOOD_ALIGN, 0);
    const size_t data = b.n;
    for (int i = 0; i < 24; i++) {
        put_f32(&b, (float) i);
    }
    pad_to(&b, GOOD_ALIGN, data);
    for (int i = 0; i < 72; i++) {
        put_u8(&b, (uint8_t) (i * 7));
    }
    return b;
}

/* Parse an exact-size heap copy, so ASan sees any read past the end. */
static int open_copy(const void * p, size_t n, struct moqae_gguf ** out) {
    void * copy = malloc(n ? n : 1);
    if (n) {
        memcpy(copy, p, n);
    }
    int rc = moqae_gguf_open_buffer(copy, n, out);
    if (rc != MOQAE_OK || !*out) {
        free(copy);
    }
    return rc; /* on success the caller frees (*out)->base after closing */
}

static void close_copy(struct moqae_gguf * g) {
    if (g) {
        const void * base = g->base;
        moqae_gguf_close(g);
        free((void *) base);
    }
}

/* Expect status and a message containing substr. */
static void expect_fail_(int line, const char * what, const struct buf * b, int status, const char * substr) {
    struct moqae_gguf * g  = NULL;
    int                 rc = open_copy(b->p, b->n, &g);
    if (rc != status || g != NULL || !strstr(moqae_last_error(), substr)) {
        fprintf(stderr, "%s:%d: FAILED: %s: got %s \"%s\", expected %s with \"%s\"\n", __FILE__, line, what,
                moqae_status_name(rc), moqae_last_error(), moqae_status_name(status), substr);
        g_failures++;
    } else if (getenv("MOQAE_TEST_VERBOSE")) {
        printf("  ok %-24s %s: %s\n", what, moqae_status_name(rc), moqae_last_error());
    }
    close_copy(g);
}
#define expect_fail(what, b, status, substr) expect_fail_(__LINE__, what, b, status, substr)

/* ================================================================================================
 * The good file
 * ============================================================================================== */

static void test_good(uint32_t version) {
    struct buf          b = make_good(version);
    struct moqae_gguf * g = NULL;
    int                 rc = open_copy(b.p, b.n, &g);
    CHECK(rc == MOQAE_OK, "v%u: %s %s", version, moqae_status_name(rc), moqae_last_error());
    if (rc != MOQAE_OK) {
        free(b.p);
        return;
    }
    CHECK(g->version == version, "%u", g->version);
    CHECK(g->n_kv == GOOD_N_KV && g->n_tensors == 2, "%llu %llu", (unsigned long long) g->n_kv,
          (unsigned long long) g->n_tensors);
    CHECK(g->alignment == GOOD_ALIGN, "%llu", (unsigned long long) g->alignment);
    CHECK(g->data_offset % GOOD_ALIGN == 0, "%llu", (unsigned long long) g->data_offset);

    uint32_t u32 = 0;
    int64_t  i64 = 0;
    float    f   = 0;
    bool     bl  = false;
    CHECK(moqae_gguf_get_u32(g, "t.u8", &u32) == MOQAE_OK && u32 == 200, "%u", u32);
    CHECK(moqae_gguf_get_u32(g, "t.u16", &u32) == MOQAE_OK && u32 == 60000, "%u", u32);
    CHECK(moqae_gguf_get_u32(g, "t.u32", &u32) == MOQAE_OK && u32 == 4000000000u, "%u", u32);
    CHECK(moqae_gguf_get_u32(g, "t.i8", &u32) == MOQAE_ERR_FORMAT && strstr(moqae_last_error(), "out of range"),
          "%s", moqae_last_error());
    CHECK(moqae_gguf_get_u32(g, "t.u64", &u32) == MOQAE_ERR_FORMAT, "u64 into u32");
    CHECK(moqae_gguf_get_u32(g, "t.f32", &u32) == MOQAE_ERR_FORMAT && strstr(moqae_last_error(), "expected an integer"),
          "%s", moqae_last_error());
    CHECK(moqae_gguf_get_i64(g, "t.i8", &i64) == MOQAE_OK && i64 == -100, "%lld", (long long) i64);
    CHECK(moqae_gguf_get_i64(g, "t.i16", &i64) == MOQAE_OK && i64 == -30000, "%lld", (long long) i64);
    CHECK(moqae_gguf_get_i64(g, "t.i32", &i64) == MOQAE_OK && i64 == -2000000000, "%lld", (long long) i64);
    CHECK(moqae_gguf_get_i64(g, "t.i64", &i64) == MOQAE_OK && i64 == -5, "%lld", (long long) i64);
    CHECK(moqae_gguf_get_i64(g, "t.u32", &i64) == MOQAE_OK && i64 == 4000000000ll, "%lld", (long long) i64);
    CHECK(moqae_gguf_get_i64(g, "t.u64", &i64) == MOQAE_ERR_FORMAT, "u64 above INT64_MAX");
    CHECK(moqae_gguf_get_f32(g, "t.f32", &f) == MOQAE_OK && f == 1.5f, "%g", f);
    CHECK(moqae_gguf_get_f32(g, "t.f64", &f) == MOQAE_OK && f == -2.25f, "%g", f);
    CHECK(moqae_gguf_get_f32(g, "t.nan", &f) == MOQAE_OK && isnan(f), "NaN metadata must load: %g", f);
    CHECK(moqae_gguf_get_f32(g, "general.architecture", &f) == MOQAE_ERR_FORMAT, "string as float");
    CHECK(moqae_gguf_get_bool(g, "t.bool", &bl) == MOQAE_OK && bl, "bool");
    CHECK(moqae_gguf_get_bool(g, "t.u8", &bl) == MOQAE_ERR_FORMAT, "u8 as bool");
    CHECK(moqae_gguf_get_u32(g, "no.such.key", &u32) == MOQAE_ERR_NOT_FOUND &&
              strstr(moqae_last_error(), "no.such.key"), "%s", moqae_last_error());
    CHECK(moqae_gguf_find_kv(g, "t.u") == NULL && moqae_gguf_find_kv(g, "t.u88") == NULL, "prefix lookups");

    struct moqae_gguf_str s = { 0 };
    CHECK(moqae_gguf_get_str(g, "general.architecture", &s) == MOQAE_OK && moqae_gguf_str_eq(s, "llama"), "arch");
    CHECK(!moqae_gguf_str_eq(s, "llam") && !moqae_gguf_str_eq(s, "llamas"), "str_eq length");
    CHECK(moqae_gguf_get_str(g, "t.u8", &s) == MOQAE_ERR_FORMAT, "u8 as string");

    const struct moqae_gguf_kv * kv = NULL;
    CHECK(moqae_gguf_get_arr(g, "t.strs", MOQAE_GGUF_STRING, &kv) == MOQAE_OK && kv && kv->arr_n == 3, "strs");
    if (kv && kv->arr_strs) {
        for (int i = 0; i < 3; i++) {
            CHECK(moqae_gguf_str_eq(kv->arr_strs[i], k_strs[i]), "strs[%d]", i);
        }
    }
    CHECK(moqae_gguf_get_arr(g, "t.strs", MOQAE_GGUF_INT32, &kv) == MOQAE_ERR_FORMAT &&
              strstr(moqae_last_error(), "array of string"), "%s", moqae_last_error());
    CHECK(moqae_gguf_get_arr(g, "t.u8", MOQAE_GGUF_INT32, &kv) == MOQAE_ERR_FORMAT, "scalar as array");
    kv = NULL;
    CHECK(moqae_gguf_get_arr(g, "t.i32s", MOQAE_GGUF_INT32, &kv) == MOQAE_OK && kv && kv->arr_n == 3, "i32s");
    if (kv) {
        CHECK(moqae_gguf_arr_i64(kv, 0) == 1 && moqae_gguf_arr_i64(kv, 1) == -2 && moqae_gguf_arr_i64(kv, 2) == 3,
              "i32 elements");
        CHECK(moqae_gguf_arr_f64(kv, 1) == -2.0, "i32 as f64");
    }
    kv = NULL;
    CHECK(moqae_gguf_get_arr(g, "t.f32s", MOQAE_GGUF_FLOAT32, &kv) == MOQAE_OK && kv && kv->arr_n == 2, "f32s");
    if (kv) {
        CHECK(moqae_gguf_arr_f64(kv, 0) == 0.5 && moqae_gguf_arr_f64(kv, 1) == -4.0, "f32 elements");
        CHECK(moqae_gguf_arr_i64(kv, 1) == -4, "f32 as i64");
    }
    kv = NULL;
    CHECK(moqae_gguf_get_arr(g, "t.bools", MOQAE_GGUF_BOOL, &kv) == MOQAE_OK && kv && moqae_gguf_arr_i64(kv, 1) == 1,
          "bools");
    kv = NULL;
    CHECK(moqae_gguf_get_arr(g, "t.empty", MOQAE_GGUF_UINT64, &kv) == MOQAE_OK && kv && kv->arr_n == 0, "empty");

    const struct moqae_gguf_tensor * t = moqae_gguf_find_tensor(g, "t.f32");
    CHECK(t && t->type == MOQAE_TYPE_F32 && t->n_dims == 2 && t->ne[0] == 8 && t->ne[1] == 3 && t->ne[2] == 1 &&
              t->ne[3] == 1 && t->n_bytes == 96 && t->offset == 0, "t.f32 info");
    if (t) {
        const float * x = t->data;
        CHECK(x[0] == 0.0f && x[23] == 23.0f, "t.f32 data");
        CHECK((const uint8_t *) t->data == g->base + g->data_offset, "t.f32 data pointer");
    }
    t = moqae_gguf_find_tensor(g, "blk.0.q4");
    CHECK(t && t->type == MOQAE_TYPE_Q4_0 && t->n_bytes == 72 && t->offset == 128 &&
              (const uint8_t *) t->data + 72 == g->base + g->size, "blk.0.q4 info");
    CHECK(moqae_gguf_find_tensor(g, "blk.0") == NULL, "tensor prefix lookup");
    close_copy(g);

    /* every prefix of the good file is an error, never a crash */
    int n_ok = 0;
    for (size_t n = 0; n < b.n; n++) {
        struct moqae_gguf * gt = NULL;
        if (open_copy(b.p, n, &gt) == MOQAE_OK) {
            n_ok++;
            fprintf(stderr, "truncated to %zu of %zu bytes was accepted\n", n, b.n);
        }
        CHECK(strlen(moqae_last_error()) > 0, "no message at truncation %zu", n);
        close_copy(gt);
    }
    CHECK(n_ok == 0, "%d truncations accepted", n_ok);
    free(b.p);
}

/* Random corruptions: any status is fine, a crash or sanitizer report is not. */
static void test_corruptions(void) {
    struct buf b    = make_good(3);
    uint64_t   seed = 12345;
    int        n_ok = 0;
    for (int it = 0; it < 4000; it++) {
        uint8_t * c = malloc(b.n);
        memcpy(c, b.p, b.n);
        const int n_flips = 1 + it % 4;
        for (int k = 0; k < n_flips; k++) {
            seed              = seed * 6364136223846793005ull + 1442695040888963407ull;
            const size_t  pos = (size_t) (seed >> 33) % b.n;
            const uint8_t v   = (uint8_t) (seed >> 17);
            c[pos]            = (it & 1) ? v : (uint8_t) (c[pos] ^ (1u << (v & 7)));
        }
        struct moqae_gguf * g = NULL;
        if (moqae_gguf_open_buffer(c, b.n, &g) == MOQAE_OK) {
            n_ok++;
            for (uint64_t i = 0; i < g->n_kv; i++) { /* read what the reader handed out */
                moqae_gguf_find_kv(g, "t.u8");
            }
            for (uint64_t i = 0; i < g->n_tensors; i++) {
                volatile uint8_t sum = 0;
                const uint8_t *  d   = g->tensors[i].data;
                for (uint64_t j = 0; j < g->tensors[i].n_bytes; j++) {
                    sum += d[j];
                }
            }
            moqae_gguf_close(g);
        }
        free(c);
    }
    printf("  corruptions: %d of 4000 still parse (values changed, layout intact)\n", n_ok);
    free(b.p);
}

/* ================================================================================================
 * Malformed headers and metadata
 * ============================================================================================== */

static void test_bad_headers(void) {
    struct buf b = make_good(3);
    memcpy(b.p, "GGJF", 4);
    expect_fail("wrong magic", &b, MOQAE_ERR_FORMAT, "magic is 'GGJF'");
    memcpy(b.p, "tjgg", 4);
    expect_fail("GGJT magic", &b, MOQAE_ERR_FORMAT, "pre-GGUF");
    memcpy(b.p, "GGUF", 4);
    const uint32_t versions[] = { 1, 4, 0x03000000u };
    const char *   msgs[]     = { "version 1", "version 4", "big-endian" };
    for (int i = 0; i < 3; i++) {
        memcpy(b.p + 4, &versions[i], 4);
        expect_fail(msgs[i], &b, MOQAE_ERR_FORMAT, msgs[i]);
    }
    free(b.p);

    struct buf e = { 0 };
    put(&e, "GGU", 3);
    expect_fail("3-byte file", &e, MOQAE_ERR_FORMAT, "file is 3 bytes, too small to be GGUF");
    e.n = 0;
    expect_fail("empty buffer", &e, MOQAE_ERR_FORMAT, "file is 0 bytes, too small to be GGUF");
    free(e.p);

    struct buf h = { 0 };
    put_header(&h, 3, 1ull << 60, 0);
    expect_fail("n_tensors 2^60", &h, MOQAE_ERR_FORMAT, "declares 1152921504606846976 tensors");
    h.n = 0;
    put_header(&h, 3, 0, 1ull << 62);
    expect_fail("n_kv 2^62", &h, MOQAE_ERR_FORMAT, "declares 4611686018427387904 metadata entries");
    h.n = 0;
    put_header(&h, 3, 0, 0);
    struct moqae_gguf * g = NULL;
    CHECK(open_copy(h.p, h.n, &g) == MOQAE_OK && g && g->n_kv == 0 && g->n_tensors == 0, "empty GGUF: %s",
          moqae_last_error());
    close_copy(g);
    free(h.p);
}

/* A file with one kv: header, key, then the caller's value bytes. */
static struct buf one_kv(const char * key, uint32_t type) {
    struct buf b = { 0 };
    put_header(&b, 3, 0, 1);
    put_key(&b, key, (enum moqae_gguf_type) type);
    return b;
}

static void test_bad_kvs(void) {
    struct buf b = one_kv("k.str", MOQAE_GGUF_STRING);
    put_u64(&b, 1000);
    put(&b, "abcdefgh", 8);
    expect_fail("string past EOF", &b, MOQAE_ERR_FORMAT, "string length 1000");
    free(b.p);

    b = (struct buf) { 0 };
    put_header(&b, 3, 0, 1);
    put_u64(&b, 1ull << 40); /* key length */
    put(&b, "key.and.some.bytes", 18);
    expect_fail("key past EOF", &b, MOQAE_ERR_FORMAT, "kv 0 key: string length 1099511627776");
    free(b.p);

    b = one_kv("k.arr", MOQAE_GGUF_ARRAY);
    put_u32(&b, MOQAE_GGUF_UINT64);
    put_u64(&b, 1ull << 61);
    put_u64(&b, 7);
    expect_fail("2^61 u64", &b, MOQAE_ERR_FORMAT, "array of 2305843009213693952 uint64");
    free(b.p);

    b = one_kv("k.arr", MOQAE_GGUF_ARRAY);
    put_u32(&b, MOQAE_GGUF_STRING);
    put_u64(&b, 1ull << 62);
    put_u64(&b, 1);
    put(&b, "x", 1);
    expect_fail("2^62 strings", &b, MOQAE_ERR_FORMAT, "array of 4611686018427387904 string");
    free(b.p);

    b = one_kv("k.arr", MOQAE_GGUF_ARRAY);
    put_u32(&b, MOQAE_GGUF_STRING);
    put_u64(&b, 2);
    put_str(&b, "ok");
    put_u64(&b, 99);
    put(&b, "short", 5);
    expect_fail("string element past EOF", &b, MOQAE_ERR_FORMAT, "element 1 of 2: string length 99");
    free(b.p);

    b = one_kv("k.bad13", 13);
    put_u32(&b, 0);
    expect_fail("value type 13", &b, MOQAE_ERR_FORMAT, "value type 13 is not a GGUF value type");
    free(b.p);
    b = one_kv("k.bad255", 255);
    put_u32(&b, 0);
    expect_fail("value type 255", &b, MOQAE_ERR_FORMAT, "value type 255 is not a GGUF value type");
    free(b.p);

    b = one_kv("k.arr", MOQAE_GGUF_ARRAY);
    put_u32(&b, 13);
    put_u64(&b, 1);
    put_u32(&b, 0);
    expect_fail("array element type 13", &b, MOQAE_ERR_FORMAT, "array element type 13");
    free(b.p);

    b = one_kv("k.nested", MOQAE_GGUF_ARRAY);
    put_u32(&b, MOQAE_GGUF_ARRAY);
    put_u64(&b, 1);
    put_u32(&b, MOQAE_GGUF_UINT8);
    put_u64(&b, 1);
    put_u8(&b, 1);
    expect_fail("nested array", &b, MOQAE_ERR_FORMAT, "nested arrays");
    free(b.p);

    b = one_kv("k.bool", MOQAE_GGUF_BOOL);
    put_u8(&b, 2);
    put(&b, "padding.....", 12);
    expect_fail("bool 2", &b, MOQAE_ERR_FORMAT, "bool value is 2");
    free(b.p);

    b = (struct buf) { 0 };
    put_header(&b, 3, 0, 2);
    put_key(&b, "k.dup", MOQAE_GGUF_UINT32);
    put_u32(&b, 1);
    put_key(&b, "k.dup", MOQAE_GGUF_FLOAT32);
    put_f32(&b, 2);
    expect_fail("duplicate key", &b, MOQAE_ERR_FORMAT, "duplicate metadata key 'k.dup' (kv 0 and kv 1)");
    free(b.p);

    b = one_kv("k.nan", MOQAE_GGUF_FLOAT64);
    put_f64(&b, NAN);
    struct moqae_gguf * g = NULL;
    double              v = 0;
    CHECK(open_copy(b.p, b.n, &g) == MOQAE_OK, "NaN f64: %s", moqae_last_error());
    if (g) {
        v = g->kv[0].val.f64;
        CHECK(isnan(v), "NaN f64 value");
    }
    close_copy(g);
    free(b.p);

    const uint32_t aligns[] = { 0, 3, 48 };
    for (int i = 0; i < 3; i++) {
        b = one_kv("general.alignment", MOQAE_GGUF_UINT32);
        put_u32(&b, aligns[i]);
        put(&b, "pad.", 4);
        char want[64];
        snprintf(want, sizeof want, "general.alignment = %u is not a power of two", aligns[i]);
        expect_fail("bad alignment", &b, MOQAE_ERR_FORMAT, want);
        free(b.p);
    }
    b = one_kv("general.alignment", MOQAE_GGUF_INT32);
    put_u32(&b, 32);
    put(&b, "pad.", 4);
    expect_fail("alignment type", &b, MOQAE_ERR_FORMAT, "general.alignment has type int32, expected uint32");
    free(b.p);
}

/* ================================================================================================
 * Malformed tensor infos
 * ============================================================================================== */

struct tdesc {
    const char * name;
    uint32_t     n_dims;
    uint64_t     ne[6];
    uint32_t     type;
    uint64_t     offset;
};

/* Header, optional general.alignment, n tensor infos, padding to the alignment, data_bytes of data. */
static struct buf make_tensors(const struct tdesc * t, int n, uint32_t align, uint64_t data_bytes) {
    struct buf b = { 0 };
    put_header(&b, 3, (uint64_t) n, align ? 1 : 0);
    if (align) {
        put_key(&b, "general.alignment", MOQAE_GGUF_UINT32);
        put_u32(&b, align);
    }
    for (int i = 0; i < n; i++) {
        put_tensor_info(&b, t[i].name, t[i].n_dims, t[i].ne, t[i].type, t[i].offset);
    }
    pad_to(&b, align ? align : 32, 0);
    for (uint64_t i = 0; i < data_bytes; i++) {
        put_u8(&b, (uint8_t) i);
    }
    return b;
}

static void expect_tensor_(int line, const char * what, struct tdesc t, uint64_t data_bytes, int status,
                           const char * substr) {
    struct buf b = make_tensors(&t, 1, 0, data_bytes);
    expect_fail_(line, what, &b, status, substr);
    free(b.p);
}
#define expect_tensor(what, t, bytes, status, substr) expect_tensor_(__LINE__, what, t, bytes, status, substr)

static void test_bad_tensors(void) {
    /* sanity: the single-tensor maker makes good files */
    const struct tdesc ok = { "w", 2, { 32, 2 }, MOQAE_TYPE_Q8_0, 0 };
    struct buf         b  = make_tensors(&ok, 1, 0, 68);
    struct moqae_gguf * g = NULL;
    CHECK(open_copy(b.p, b.n, &g) == MOQAE_OK && g->tensors[0].n_bytes == 68, "one Q8_0 tensor: %s",
          moqae_last_error());
    close_copy(g);
    free(b.p);
    const struct tdesc types[] = {
        { "f16", 1, { 3 }, MOQAE_TYPE_F16, 0 },   { "bf16", 1, { 5 }, MOQAE_TYPE_BF16, 0 },
        { "q41", 1, { 64 }, MOQAE_TYPE_Q4_1, 0 }, { "f32", 0, { 0 }, MOQAE_TYPE_F32, 0 },
    };
    const uint64_t bytes[] = { 6, 10, 40, 4 };
    for (int i = 0; i < 4; i++) {
        b = make_tensors(&types[i], 1, 0, bytes[i]);
        g = NULL;
        CHECK(open_copy(b.p, b.n, &g) == MOQAE_OK && g->tensors[0].n_bytes == bytes[i], "%s: %s", types[i].name,
              moqae_last_error());
        close_copy(g);
        free(b.p);
    }

    expect_tensor("n_dims 5", ((struct tdesc) { "blk.0.w", 5, { 1, 1, 1, 1, 1 }, MOQAE_TYPE_F32, 0 }), 4,
                  MOQAE_ERR_FORMAT, "tensor 0 'blk.0.w': n_dims = 5");
    expect_tensor("ne 0", ((struct tdesc) { "w", 2, { 4, 0 }, MOQAE_TYPE_F32, 0 }), 16, MOQAE_ERR_FORMAT,
                  "ne[1] = 0");
    expect_tensor("ne 2^63", ((struct tdesc) { "w", 1, { 1ull << 63 }, MOQAE_TYPE_F32, 0 }), 16, MOQAE_ERR_FORMAT,
                  "ne[0] = 9223372036854775808");
    expect_tensor("ne overflow", ((struct tdesc) { "w", 3, { 1ull << 32, 1ull << 20, 1ull << 20 }, MOQAE_TYPE_F32, 0 }),
                  16, MOQAE_ERR_FORMAT, "element count overflows 64 bits at ne[2]");
    expect_tensor("bytes overflow", ((struct tdesc) { "w", 2, { 1ull << 32, 1ull << 30 }, MOQAE_TYPE_F32, 0 }), 16,
                  MOQAE_ERR_FORMAT, "size in bytes overflows");
    expect_tensor("type 1234", ((struct tdesc) { "w", 1, { 32 }, 1234, 0 }), 128, MOQAE_ERR_FORMAT,
                  "unknown tensor type 1234");
    expect_tensor("Q5_K", ((struct tdesc) { "blk.0.ffn_up.weight", 1, { 256 }, 13, 0 }), 176, MOQAE_ERR_UNSUPPORTED,
                  "'blk.0.ffn_up.weight' has type Q5_K (13), which moqae does not support");
    expect_tensor("Q4_0_4_4", ((struct tdesc) { "w", 1, { 32 }, 31, 0 }), 18, MOQAE_ERR_UNSUPPORTED,
                  "ggml itself has removed it");
    expect_tensor("Q8_1 weights", ((struct tdesc) { "w", 1, { 32 }, MOQAE_TYPE_Q8_1, 0 }), 36, MOQAE_ERR_UNSUPPORTED,
                  "type Q8_1 (9)");
    expect_tensor("Q4_0 ne[0] 33", ((struct tdesc) { "w", 2, { 33, 2 }, MOQAE_TYPE_Q4_0, 0 }), 64, MOQAE_ERR_FORMAT,
                  "type Q4_0 needs ne[0] (33) to be a multiple of its block size 32");
    expect_tensor("misaligned offset", ((struct tdesc) { "w", 1, { 4 }, MOQAE_TYPE_F32, 4 }), 64, MOQAE_ERR_FORMAT,
                  "offset 4 is not a multiple of the alignment 32");
    expect_tensor("offset past end", ((struct tdesc) { "blk.0.attn_q.weight", 1, { 16 }, MOQAE_TYPE_F32, 32 }), 64,
                  MOQAE_ERR_FORMAT,
                  "tensor 0 'blk.0.attn_q.weight': offset 32 + 64 bytes runs past the end of the file");
    expect_tensor("offset 2^64-32", ((struct tdesc) { "w", 1, { 16 }, MOQAE_TYPE_F32, UINT64_MAX - 31 }), 64,
                  MOQAE_ERR_FORMAT, "runs past the end of the file");
    expect_tensor("long name",
                  ((struct tdesc) { "a.very.long.tensor.name.that.goes.on.and.on.past.the.ggml.limit.of.63", 1, { 1 },
                                    MOQAE_TYPE_F32, 0 }), 4, MOQAE_ERR_FORMAT, "longer than ggml's limit");

    const struct tdesc dup[2] = { { "w", 1, { 8 }, MOQAE_TYPE_F32, 0 }, { "w", 1, { 8 }, MOQAE_TYPE_F32, 32 } };
    b = make_tensors(dup, 2, 0, 64);
    expect_fail("duplicate tensor", &b, MOQAE_ERR_FORMAT, "duplicate tensor name 'w' (tensors 0 and 1)");
    free(b.p);

    /* alignment 1 is legal, but tensor data must still be aligned for its type (here the data
     * section starts at an odd offset) */
    const struct tdesc odd[2] = { { "a", 1, { 1 }, MOQAE_TYPE_F16, 0 }, { "b", 1, { 1 }, MOQAE_TYPE_F32, 2 } };
    b = make_tensors(odd, 2, 1, 6);
    expect_fail("misaligned data", &b, MOQAE_ERR_FORMAT, "-byte aligned (general.alignment = 1)");
    free(b.p);

    /* infos whose padding runs past the end */
    const struct tdesc one = { "w", 1, { 1 }, MOQAE_TYPE_F32, 0 };
    b = make_tensors(&one, 1, 0, 0);
    b.n -= 1;
    expect_fail("no data section", &b, MOQAE_ERR_FORMAT, "past the end of the file");
    free(b.p);
}

/* ================================================================================================
 * Files on disk and the type table
 * ============================================================================================== */

static void write_file(const char * path, const void * p, size_t n) {
    FILE * f = fopen(path, "wb");
    if (!f || fwrite(p, 1, n, f) != n) {
        abort();
    }
    fclose(f);
}

static void test_files(void) {
    struct moqae_gguf * g  = NULL;
    int                 rc = moqae_gguf_open("/nonexistent/dir/model.gguf", &g);
    CHECK(rc == MOQAE_ERR_IO && g == NULL && strstr(moqae_last_error(), "/nonexistent/dir/model.gguf") &&
              strstr(moqae_last_error(), "No such file"), "%s %s", moqae_status_name(rc), moqae_last_error());
    rc = moqae_gguf_open("/tmp", &g);
    CHECK(rc == MOQAE_ERR_IO && strstr(moqae_last_error(), "'/tmp'") && strstr(moqae_last_error(), "Is a directory"),
          "%s %s", moqae_status_name(rc), moqae_last_error());

    char path[] = "/tmp/test-gguf-XXXXXX";
    int  fd     = mkstemp(path);
    CHECK(fd >= 0, "mkstemp");
    if (fd < 0) {
        return;
    }
    close(fd);
    rc = moqae_gguf_open(path, &g);
    CHECK(rc == MOQAE_ERR_FORMAT && strstr(moqae_last_error(), "file is 0 bytes, too small to be GGUF"), "%s %s",
          moqae_status_name(rc), moqae_last_error());
    write_file(path, "hello", 5);
    rc = moqae_gguf_open(path, &g);
    CHECK(rc == MOQAE_ERR_FORMAT && strstr(moqae_last_error(), "magic is 'hell'"), "%s", moqae_last_error());

    struct buf b = make_good(3);
    write_file(path, b.p, b.n);
    rc = moqae_gguf_open(path, &g);
    CHECK(rc == MOQAE_OK && g && g->owns_map && g->n_tensors == 2, "%s", moqae_last_error());
    if (g) {
        const struct moqae_gguf_tensor * t = moqae_gguf_find_tensor(g, "t.f32");
        CHECK(t && ((const float *) t->data)[5] == 5.0f, "mapped data");
    }
    moqae_gguf_close(g);
    g = NULL;
    write_file(path, b.p, b.n - 1);
    rc = moqae_gguf_open(path, &g);
    CHECK(rc == MOQAE_ERR_FORMAT && strstr(moqae_last_error(), "runs past the end of the file"), "%s",
          moqae_last_error());
    free(b.p);
    unlink(path);
    moqae_gguf_close(NULL);
    CHECK(moqae_gguf_open_buffer(NULL, 5, &g) == MOQAE_ERR_INVALID_ARG, "NULL buffer");
}

static void test_types(void) {
    CHECK(moqae_type_block_size(MOQAE_TYPE_Q4_0) == 32 && moqae_type_block_bytes(MOQAE_TYPE_Q4_0) == 18, "Q4_0");
    CHECK(moqae_type_block_bytes(MOQAE_TYPE_Q4_1) == 20 && moqae_type_block_bytes(MOQAE_TYPE_Q8_0) == 34, "Q4_1 Q8_0");
    CHECK(moqae_type_block_bytes(MOQAE_TYPE_Q8_1) == 36, "Q8_1 as quant.h");
    CHECK(moqae_type_block_size(MOQAE_TYPE_BF16) == 1 && moqae_type_block_bytes(MOQAE_TYPE_BF16) == 2, "BF16");
    CHECK(moqae_type_row_bytes(MOQAE_TYPE_Q4_1, 576) == 360, "row bytes");
    CHECK(moqae_type_row_bytes(MOQAE_TYPE_F32, 7) == 28, "row bytes f32");
    CHECK(strcmp(moqae_type_name((enum moqae_type) 13), "Q5_K") == 0, "name 13");
    CHECK(strcmp(moqae_type_name((enum moqae_type) 1234), "unknown") == 0, "name 1234");
    CHECK(moqae_type_block_size((enum moqae_type) 1234) == 0 && moqae_type_block_size((enum moqae_type) 4) == 0,
          "unknown and removed types");
    CHECK(moqae_type_is_supported(MOQAE_TYPE_Q4_1) && !moqae_type_is_supported((enum moqae_type) 12) &&
              !moqae_type_is_supported(MOQAE_TYPE_Q8_1), "supported");
}

/* Optional: MOQAE_TEST_GGUF=/path/to/model.gguf opens a real file. */
static void test_real_file(void) {
    const char * path = getenv("MOQAE_TEST_GGUF");
    if (!path || !*path) {
        return;
    }
    struct moqae_gguf * g  = NULL;
    int                 rc = moqae_gguf_open(path, &g);
    CHECK(rc == MOQAE_OK, "%s: %s", path, moqae_last_error());
    if (g) {
        uint64_t bytes = 0;
        for (uint64_t i = 0; i < g->n_tensors; i++) {
            bytes += g->tensors[i].n_bytes;
        }
        printf("  %s: v%u, %llu kv, %llu tensors, %llu tensor bytes, data at %llu\n", path, g->version,
               (unsigned long long) g->n_kv, (unsigned long long) g->n_tensors, (unsigned long long) bytes,
               (unsigned long long) g->data_offset);
    }
    moqae_gguf_close(g);
}

int main(void) {
    test_types();
    test_good(2);
    test_good(3);
    test_bad_headers();
    test_bad_kvs();
    test_bad_tensors();
    test_files();
    test_corruptions();
    test_real_file();
    if (g_failures) {
        printf("test-gguf: %d FAILED\n", g_failures);
        return 1;
    }
    printf("test-gguf: all passed\n");
    return 0;
}
