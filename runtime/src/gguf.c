/*
 * gguf.c — GGUF v2/v3 reader: maps the file read-only and checks every header field, string and
 * array length, value type, tensor shape, type, offset and size against the file length before
 * dereferencing anything, so a truncated or hostile file gets a status and a message naming the
 * field and its value, never a crash. It does not interpret metadata (model.c, tokenizer.c do) and
 * does not read tensor data. Little-endian files on little-endian hosts only.
 * Reference: the GGUF spec (ggml docs/gguf.md) and the `gguf` Python package (gguf_reader.py);
 * the ggml type table mirrors ggml.h's enum ggml_type.
 */
#include "gguf.h"

#include "common.h"

#include <errno.h>
#include <fcntl.h>
#include <float.h>
#include <math.h>
#include <stdarg.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#    error "gguf.c reads GGUF's little-endian fields with memcpy: a big-endian host needs byte swaps"
#endif

/* ================================================================================================
 * Type tables
 * ============================================================================================== */

/* Every value ggml's enum ggml_type has had (0..41 as of gguf-py 0.19). Removed types keep their
 * number so that an old file gets a message naming them. blck/bytes as ggml's type_traits. */
struct type_info {
    const char * name;
    uint16_t     blck;    /* elements per block; 0 for removed types */
    uint16_t     bytes;   /* bytes per block */
    bool         removed; /* ggml dropped it (Q4_2, Q4_3, the repacked Q4_0_x_y / IQ4_NL_x_y) */
};

static const struct type_info k_types[] = {
    [0] = { "F32", 1, 4, false },        [1] = { "F16", 1, 2, false },
    [2] = { "Q4_0", 32, 18, false },     [3] = { "Q4_1", 32, 20, false },
    [4] = { "Q4_2", 0, 0, true },        [5] = { "Q4_3", 0, 0, true },
    [6] = { "Q5_0", 32, 22, false },     [7] = { "Q5_1", 32, 24, false },
    [8] = { "Q8_0", 32, 34, false },     [9] = { "Q8_1", 32, 36, false }, /* fp16 d and s: quant.h */
    [10] = { "Q2_K", 256, 84, false },   [11] = { "Q3_K", 256, 110, false },
    [12] = { "Q4_K", 256, 144, false },  [13] = { "Q5_K", 256, 176, false },
    [14] = { "Q6_K", 256, 210, false },  [15] = { "Q8_K", 256, 292, false },
    [16] = { "IQ2_XXS", 256, 66, false }, [17] = { "IQ2_XS", 256, 74, false },
    [18] = { "IQ3_XXS", 256, 98, false }, [19] = { "IQ1_S", 256, 50, false },
    [20] = { "IQ4_NL", 32, 18, false },  [21] = { "IQ3_S", 256, 110, false },
    [22] = { "IQ2_S", 256, 82, false },  [23] = { "IQ4_XS", 256, 136, false },
    [24] = { "I8", 1, 1, false },        [25] = { "I16", 1, 2, false },
    [26] = { "I32", 1, 4, false },       [27] = { "I64", 1, 8, false },
    [28] = { "F64", 1, 8, false },       [29] = { "IQ1_M", 256, 56, false },
    [30] = { "BF16", 1, 2, false },      [31] = { "Q4_0_4_4", 0, 0, true },
    [32] = { "Q4_0_4_8", 0, 0, true },   [33] = { "Q4_0_8_8", 0, 0, true },
    [34] = { "TQ1_0", 256, 54, false },  [35] = { "TQ2_0", 256, 66, false },
    [36] = { "IQ4_NL_4_4", 0, 0, true }, [37] = { "IQ4_NL_4_8", 0, 0, true },
    [38] = { "IQ4_NL_8_8", 0, 0, true }, [39] = { "MXFP4", 32, 17, false },
    [40] = { "NVFP4", 64, 36, false },   [41] = { "Q1_0", 128, 18, false },
};
#define N_GGML_TYPES ((int) (sizeof(k_types) / sizeof(k_types[0])))

static const struct type_info * type_info(enum moqae_type t) {
    const int i = (int) t;
    return (i >= 0 && i < N_GGML_TYPES) ? &k_types[i] : NULL;
}

int64_t moqae_type_block_size(enum moqae_type t) {
    const struct type_info * ti = type_info(t);
    return ti ? ti->blck : 0;
}

size_t moqae_type_block_bytes(enum moqae_type t) {
    const struct type_info * ti = type_info(t);
    return ti ? ti->bytes : 0;
}

const char * moqae_type_name(enum moqae_type t) {
    const struct type_info * ti = type_info(t);
    return ti ? ti->name : "unknown";
}

size_t moqae_type_row_bytes(enum moqae_type t, int64_t n) {
    const struct type_info * ti = type_info(t);
    if (!ti || ti->blck == 0) {
        return 0;
    }
    MOQAE_ASSERT(n >= 0 && n % ti->blck == 0);
    return (size_t) (n / ti->blck) * ti->bytes;
}

/* The weight types the CPU kernels compute with. Add a type here only with its kernels. */
bool moqae_type_is_supported(enum moqae_type t) {
    switch (t) {
        case MOQAE_TYPE_F32:
        case MOQAE_TYPE_F16:
        case MOQAE_TYPE_BF16:
        case MOQAE_TYPE_Q8_0:
        case MOQAE_TYPE_Q4_0:
        case MOQAE_TYPE_Q4_1:
            return true;
        default:
            return false;
    }
}
#define SUPPORTED_TYPES_TEXT "F32, F16, BF16, Q8_0, Q4_0, Q4_1"

/* Bytes of one scalar of each metadata value type (0: string, array). */
static const uint8_t k_value_size[MOQAE_GGUF_TYPE_COUNT] = { 1, 1, 2, 2, 4, 4, 4, 1, 0, 0, 8, 8, 8 };

static const char * const k_value_name[MOQAE_GGUF_TYPE_COUNT] = {
    "uint8", "int8", "uint16", "int16", "uint32", "int32", "float32",
    "bool",  "string", "array", "uint64", "int64", "float64",
};

static const char * value_type_name(enum moqae_gguf_type t) {
    return ((int) t >= 0 && (int) t < MOQAE_GGUF_TYPE_COUNT) ? k_value_name[t] : "invalid";
}

static bool value_type_is_int(enum moqae_gguf_type t) {
    return t == MOQAE_GGUF_UINT8 || t == MOQAE_GGUF_INT8 || t == MOQAE_GGUF_UINT16 || t == MOQAE_GGUF_INT16 ||
           t == MOQAE_GGUF_UINT32 || t == MOQAE_GGUF_INT32 || t == MOQAE_GGUF_UINT64 || t == MOQAE_GGUF_INT64;
}

/* ================================================================================================
 * Helpers: names in messages, a bounds-checked reader, the name index
 * ============================================================================================== */

#define NAME_SHOW 72 /* characters of a key or tensor name quoted in a message */

/* A printable, bounded copy of a file string for messages: names come from the file, so they may be
 * huge or hold control bytes. buf has NAME_SHOW + 4 bytes. */
static const char * show(struct moqae_gguf_str s, char * buf) {
    uint64_t n = s.len < NAME_SHOW ? s.len : NAME_SHOW;
    for (uint64_t i = 0; i < n; i++) {
        const unsigned char c = (unsigned char) s.ptr[i];
        buf[i]                = (c >= 0x20 && c < 0x7f) ? (char) c : '?';
    }
    if (s.len > NAME_SHOW) {
        memcpy(buf + n, "...", 3);
        n += 3;
    }
    buf[n] = '\0';
    return buf;
}

typedef unsigned long long ull; /* for printf of uint64_t without PRIu64 noise */

/* Cursor over [base, base + size). Invariant: pos <= size, so size - pos never wraps. */
struct rd {
    const uint8_t * base;
    uint64_t        size;
    uint64_t        pos;
};

static uint64_t rd_left(const struct rd * r) {
    return r->size - r->pos;
}

static bool rd_bytes(struct rd * r, void * out, uint64_t n) {
    if (n > rd_left(r)) {
        return false;
    }
    memcpy(out, r->base + r->pos, (size_t) n);
    r->pos += n;
    return true;
}

static bool rd_u32(struct rd * r, uint32_t * v) {
    return rd_bytes(r, v, 4);
}

static bool rd_u64(struct rd * r, uint64_t * v) {
    return rd_bytes(r, v, 8);
}

/* A (u64 length, bytes) string. On failure pos is unchanged (fail_str looks at why). */
static bool rd_str(struct rd * r, struct moqae_gguf_str * s) {
    uint64_t len;
    if (rd_left(r) < 8) {
        return false;
    }
    memcpy(&len, r->base + r->pos, 8);
    if (len > rd_left(r) - 8) {
        return false;
    }
    s->len = len;
    s->ptr = (const char *) (r->base + r->pos + 8);
    r->pos += 8 + len;
    return true;
}

/* "what" describes the field: formatted only on the error path. */
static int fail_truncated(const struct rd * r, uint64_t need, const char * fmt, ...) MOQAE_PRINTF(3, 4);
static int fail_truncated(const struct rd * r, uint64_t need, const char * fmt, ...) {
    char    what[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(what, sizeof what, fmt, ap);
    va_end(ap);
    return moqae_fail(MOQAE_ERR_FORMAT,
                      "truncated file: %s at offset %llu needs %llu bytes, only %llu left (file is %llu bytes)",
                      what, (ull) r->pos, (ull) need, (ull) rd_left(r), (ull) r->size);
}

/* Message for a failed rd_str: either its length field or its bytes run past the end. */
static int fail_str(const struct rd * r, const char * fmt, ...) MOQAE_PRINTF(2, 3);
static int fail_str(const struct rd * r, const char * fmt, ...) {
    char    what[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(what, sizeof what, fmt, ap);
    va_end(ap);
    if (rd_left(r) < 8) {
        return fail_truncated(r, 8, "%s (string length)", what);
    }
    uint64_t len;
    memcpy(&len, r->base + r->pos, 8);
    return moqae_fail(MOQAE_ERR_FORMAT,
                      "%s: string length %llu at offset %llu runs past the end of the file (%llu bytes left of %llu)",
                      what, (ull) len, (ull) r->pos, (ull) (rd_left(r) - 8), (ull) r->size);
}

/* Open-addressing hash of names (kv keys, tensor names) -> index + 1; 0 marks an empty slot. The
 * name is the first member of both moqae_gguf_kv and moqae_gguf_tensor, reached through stride. */
struct name_index {
    uint64_t * slots;
    uint64_t   mask;
};

static uint64_t hash_name(const char * p, uint64_t n) {
    uint64_t h = 1469598103934665603ull; /* FNV-1a */
    for (uint64_t i = 0; i < n; i++) {
        h = (h ^ (unsigned char) p[i]) * 1099511628211ull;
    }
    return h;
}

static const struct moqae_gguf_str * item_name(const void * items, size_t stride, uint64_t i) {
    return (const struct moqae_gguf_str *) ((const char *) items + (size_t) i * stride);
}

static bool name_eq(const struct moqae_gguf_str * a, const char * p, uint64_t n) {
    return a->len == n && (n == 0 || memcmp(a->ptr, p, (size_t) n) == 0);
}

/* Builds the index of n items. Returns MOQAE_OK, MOQAE_ERR_OUT_OF_MEMORY, or MOQAE_ERR_FORMAT with
 * *dup_a < *dup_b the indices of the first duplicate found (the caller writes the message). */
static int index_build(struct name_index * ix, const void * items, size_t stride, uint64_t n, uint64_t * dup_a,
                       uint64_t * dup_b) {
    uint64_t cap = 8;
    while (cap < 2 * n) { /* n <= file size / 13, so this cannot overflow */
        cap *= 2;
    }
    ix->slots = calloc((size_t) cap, sizeof(uint64_t));
    if (!ix->slots) {
        return moqae_fail(MOQAE_ERR_OUT_OF_MEMORY, "out of memory for a %llu-entry name index", (ull) n);
    }
    ix->mask = cap - 1;
    for (uint64_t i = 0; i < n; i++) {
        const struct moqae_gguf_str * s = item_name(items, stride, i);
        uint64_t                      h = hash_name(s->ptr, s->len) & ix->mask;
        while (ix->slots[h] != 0) {
            if (name_eq(item_name(items, stride, ix->slots[h] - 1), s->ptr, s->len)) {
                *dup_a = ix->slots[h] - 1;
                *dup_b = i;
                return MOQAE_ERR_FORMAT;
            }
            h = (h + 1) & ix->mask;
        }
        ix->slots[h] = i + 1;
    }
    return MOQAE_OK;
}

static const void * index_find(const struct name_index * ix, const void * items, size_t stride, const char * key) {
    if (!ix->slots || !key) {
        return NULL;
    }
    const uint64_t n = strlen(key);
    uint64_t       h = hash_name(key, n) & ix->mask;
    while (ix->slots[h] != 0) {
        const struct moqae_gguf_str * s = item_name(items, stride, ix->slots[h] - 1);
        if (name_eq(s, key, n)) {
            return s;
        }
        h = (h + 1) & ix->mask;
    }
    return NULL;
}

/* ================================================================================================
 * The handle: the public struct plus the name indices
 * ============================================================================================== */

struct gguf_impl {
    struct moqae_gguf pub; /* first member: callers only see this */
    struct name_index kv_index;
    struct name_index tensor_index;
};

static struct gguf_impl * impl(const struct moqae_gguf * g) {
    return (struct gguf_impl *) g;
}

void moqae_gguf_close(struct moqae_gguf * g) {
    if (!g) {
        return;
    }
    for (uint64_t i = 0; g->kv && i < g->n_kv; i++) { /* n_kv may be the header's count if kv was never allocated */
        free((void *) g->kv[i].arr_strs);
    }
    free(g->kv);
    free(g->tensors);
    free(impl(g)->kv_index.slots);
    free(impl(g)->tensor_index.slots);
    if (g->owns_map && g->base) {
        munmap((void *) g->base, (size_t) g->size);
    }
    free(g);
}

/* ================================================================================================
 * Header and metadata
 * ============================================================================================== */

#define HEADER_BYTES   24u /* magic, version, n_tensors (u64), n_kv (u64) */
#define MIN_KV_BYTES   13u /* key length (8) + value type (4) + the smallest value (1) */
#define MIN_INFO_BYTES 24u /* name length (8) + n_dims (4) + type (4) + offset (8), zero dims */
#define MAX_NAME_LEN   63u /* ggml's GGML_MAX_NAME (64) including the NUL: llama.cpp rejects longer */

static int fail_magic(const uint8_t * m) {
    char shown[5];
    for (int i = 0; i < 4; i++) {
        shown[i] = (m[i] >= 0x20 && m[i] < 0x7f) ? (char) m[i] : '.';
    }
    shown[4] = '\0';
    if (memcmp(m, "FUGG", 4) == 0) {
        return moqae_fail(MOQAE_ERR_FORMAT,
                          "magic is 'FUGG': a byte-swapped GGUF; moqae reads little-endian files only");
    }
    if (memcmp(m, "lmgg", 4) == 0 || memcmp(m, "fmgg", 4) == 0 || memcmp(m, "tjgg", 4) == 0) {
        return moqae_fail(MOQAE_ERR_FORMAT,
                          "magic is '%s': a pre-GGUF llama.cpp file (GGML/GGMF/GGJT); convert it to GGUF with "
                          "llama.cpp", shown);
    }
    return moqae_fail(MOQAE_ERR_FORMAT, "not a GGUF file: magic is '%s' (%02x %02x %02x %02x), expected 'GGUF'", shown,
                      m[0], m[1], m[2], m[3]);
}

static int parse_header(struct rd * r, struct moqae_gguf * g) {
    if (r->size < 4) {
        return moqae_fail(MOQAE_ERR_FORMAT, "file is %llu bytes, too small to be GGUF (the header is %u bytes)",
                          (ull) r->size, HEADER_BYTES);
    }
    if (memcmp(r->base, "GGUF", 4) != 0) {
        return fail_magic(r->base);
    }
    if (r->size < HEADER_BYTES) {
        return moqae_fail(MOQAE_ERR_FORMAT, "file is %llu bytes, too small to be GGUF (the header is %u bytes)",
                          (ull) r->size, HEADER_BYTES);
    }
    r->pos = 4;
    uint32_t version;
    rd_u32(r, &version);
    const uint32_t swapped = __builtin_bswap32(version);
    if (version != 2 && version != 3) {
        if (swapped >= 1 && swapped <= 3) {
            return moqae_fail(MOQAE_ERR_FORMAT,
                              "big-endian GGUF (version field 0x%08x is %u byte-swapped); moqae reads little-endian "
                              "files only (convert with gguf-convert-endian)", version, swapped);
        }
        if (version == 1) {
            return moqae_fail(MOQAE_ERR_FORMAT, "GGUF version 1 is not supported (moqae reads versions 2 and 3); "
                                                "regenerate the file with a current converter");
        }
        return moqae_fail(MOQAE_ERR_FORMAT, "unsupported GGUF version %u (moqae reads versions 2 and 3)", version);
    }
    g->version = version;
    rd_u64(r, &g->n_tensors);
    rd_u64(r, &g->n_kv);

    /* Every entry occupies at least a few bytes, so the counts are bounded by the file size: check
     * that before allocating anything sized by them. */
    const uint64_t avail = r->size - HEADER_BYTES;
    if (g->n_tensors > avail / MIN_INFO_BYTES) {
        return moqae_fail(MOQAE_ERR_FORMAT,
                          "header declares %llu tensors, but a %llu-byte file has room for at most %llu tensor infos",
                          (ull) g->n_tensors, (ull) r->size, (ull) (avail / MIN_INFO_BYTES));
    }
    if (g->n_kv > avail / MIN_KV_BYTES) {
        return moqae_fail(MOQAE_ERR_FORMAT,
                          "header declares %llu metadata entries, but a %llu-byte file has room for at most %llu",
                          (ull) g->n_kv, (ull) r->size, (ull) (avail / MIN_KV_BYTES));
    }
    uint64_t need = 0;
    if (!moqae_add_ok(g->n_tensors * MIN_INFO_BYTES, g->n_kv * MIN_KV_BYTES, &need) || need > avail) {
        return moqae_fail(MOQAE_ERR_FORMAT,
                          "header declares %llu metadata entries and %llu tensors, which need more than the %llu bytes "
                          "of the file", (ull) g->n_kv, (ull) g->n_tensors, (ull) r->size);
    }
    return MOQAE_OK;
}

/* One scalar (not string, not array) of type t at the cursor into kv->val. */
static int parse_scalar(struct rd * r, enum moqae_gguf_type t, struct moqae_gguf_kv * kv, uint64_t i,
                        const char * key) {
    uint8_t b[8];
    if (!rd_bytes(r, b, k_value_size[t])) {
        return fail_truncated(r, k_value_size[t], "kv %llu '%s' (%s value)", (ull) i, key, k_value_name[t]);
    }
    switch (t) {
        case MOQAE_GGUF_UINT8: kv->val.u64 = b[0]; break;
        case MOQAE_GGUF_INT8: kv->val.i64 = (int8_t) b[0]; break;
        case MOQAE_GGUF_UINT16: { uint16_t v; memcpy(&v, b, 2); kv->val.u64 = v; break; }
        case MOQAE_GGUF_INT16: { int16_t v; memcpy(&v, b, 2); kv->val.i64 = v; break; }
        case MOQAE_GGUF_UINT32: { uint32_t v; memcpy(&v, b, 4); kv->val.u64 = v; break; }
        case MOQAE_GGUF_INT32: { int32_t v; memcpy(&v, b, 4); kv->val.i64 = v; break; }
        case MOQAE_GGUF_UINT64: memcpy(&kv->val.u64, b, 8); break;
        case MOQAE_GGUF_INT64: memcpy(&kv->val.i64, b, 8); break;
        case MOQAE_GGUF_FLOAT32: { float v; memcpy(&v, b, 4); kv->val.f64 = v; break; } /* NaN allowed */
        case MOQAE_GGUF_FLOAT64: memcpy(&kv->val.f64, b, 8); break;
        case MOQAE_GGUF_BOOL:
            if (b[0] > 1) {
                return moqae_fail(MOQAE_ERR_FORMAT, "kv %llu '%s': bool value is %u (must be 0 or 1)", (ull) i, key,
                                  b[0]);
            }
            kv->val.b = b[0] == 1;
            break;
        default: MOQAE_ASSERT(0 && "not a scalar type");
    }
    return MOQAE_OK;
}

static int parse_array(struct rd * r, struct moqae_gguf_kv * kv, uint64_t i, const char * key) {
    uint32_t at;
    if (!rd_u32(r, &at)) {
        return fail_truncated(r, 4, "kv %llu '%s' (array element type)", (ull) i, key);
    }
    if (at >= MOQAE_GGUF_TYPE_COUNT) {
        return moqae_fail(MOQAE_ERR_FORMAT, "kv %llu '%s': array element type %u is not a GGUF value type (0..%d)",
                          (ull) i, key, at, MOQAE_GGUF_TYPE_COUNT - 1);
    }
    if (at == MOQAE_GGUF_ARRAY) {
        return moqae_fail(MOQAE_ERR_FORMAT, "kv %llu '%s': nested arrays (arrays of arrays) are not supported",
                          (ull) i, key);
    }
    uint64_t n;
    if (!rd_u64(r, &n)) {
        return fail_truncated(r, 8, "kv %llu '%s' (array length)", (ull) i, key);
    }
    kv->arr_type = (enum moqae_gguf_type) at;
    kv->arr_n    = n;
    kv->arr_data = r->base + r->pos;
    const uint64_t esz = at == MOQAE_GGUF_STRING ? 8 : k_value_size[at]; /* a string is >= its length */
    uint64_t       total;
    if (!moqae_mul_ok(n, esz, &total) || total > rd_left(r)) {
        return moqae_fail(MOQAE_ERR_FORMAT,
                          "kv %llu '%s': array of %llu %s at offset %llu runs past the end of the file "
                          "(%llu bytes left of %llu)", (ull) i, key, (ull) n, k_value_name[at], (ull) r->pos,
                          (ull) rd_left(r), (ull) r->size);
    }
    if (at != MOQAE_GGUF_STRING) {
        if (at == MOQAE_GGUF_BOOL) {
            for (uint64_t j = 0; j < n; j++) {
                if (kv->arr_data[j] > 1) {
                    return moqae_fail(MOQAE_ERR_FORMAT, "kv %llu '%s': bool element %llu is %u (must be 0 or 1)",
                                      (ull) i, key, (ull) j, kv->arr_data[j]);
                }
            }
        }
        r->pos += total;
        return MOQAE_OK;
    }
    if (n == 0) {
        return MOQAE_OK;
    }
    /* n * 8 <= bytes left, so this allocation is at most twice the rest of the file. */
    struct moqae_gguf_str * strs = malloc((size_t) n * sizeof *strs);
    if (!strs) {
        return moqae_fail(MOQAE_ERR_OUT_OF_MEMORY, "kv %llu '%s': out of memory for %llu strings", (ull) i, key,
                          (ull) n);
    }
    kv->arr_strs = strs; /* freed by moqae_gguf_close, also on error */
    for (uint64_t j = 0; j < n; j++) {
        if (!rd_str(r, &strs[j])) {
            return fail_str(r, "kv %llu '%s' element %llu of %llu", (ull) i, key, (ull) j, (ull) n);
        }
    }
    return MOQAE_OK;
}

static int parse_kv(struct rd * r, struct moqae_gguf_kv * kv, uint64_t i) {
    char name[NAME_SHOW + 4];
    if (!rd_str(r, &kv->key)) {
        return fail_str(r, "kv %llu key", (ull) i);
    }
    const char * key = show(kv->key, name);
    uint32_t     t;
    if (!rd_u32(r, &t)) {
        return fail_truncated(r, 4, "kv %llu '%s' (value type)", (ull) i, key);
    }
    if (t >= MOQAE_GGUF_TYPE_COUNT) {
        return moqae_fail(MOQAE_ERR_FORMAT, "kv %llu '%s': value type %u is not a GGUF value type (0..%d)", (ull) i,
                          key, t, MOQAE_GGUF_TYPE_COUNT - 1);
    }
    kv->type = (enum moqae_gguf_type) t;
    if (t == MOQAE_GGUF_STRING) {
        if (!rd_str(r, &kv->str)) {
            return fail_str(r, "kv %llu '%s' value", (ull) i, key);
        }
        return MOQAE_OK;
    }
    if (t == MOQAE_GGUF_ARRAY) {
        return parse_array(r, kv, i, key);
    }
    return parse_scalar(r, kv->type, kv, i, key);
}

static int parse_kvs(struct rd * r, struct gguf_impl * gi) {
    struct moqae_gguf * g    = &gi->pub;
    const uint64_t      n_kv = g->n_kv;
    g->n_kv                  = 0; /* counts entries close() must free, grows as we parse */
    if (n_kv > 0) {
        /* n_kv <= file size / 13 (parse_header), so the product cannot overflow. */
        g->kv = calloc((size_t) n_kv, sizeof *g->kv);
        if (!g->kv) {
            return moqae_fail(MOQAE_ERR_OUT_OF_MEMORY, "out of memory for %llu metadata entries", (ull) n_kv);
        }
    }
    for (uint64_t i = 0; i < n_kv; i++) {
        g->n_kv = i + 1;
        int rc  = parse_kv(r, &g->kv[i], i);
        if (rc != MOQAE_OK) {
            return rc;
        }
    }
    uint64_t a = 0, b = 0;
    int      rc = index_build(&gi->kv_index, g->kv, sizeof *g->kv, g->n_kv, &a, &b);
    if (rc == MOQAE_ERR_FORMAT) {
        char name[NAME_SHOW + 4];
        return moqae_fail(MOQAE_ERR_FORMAT, "duplicate metadata key '%s' (kv %llu and kv %llu)",
                          show(g->kv[b].key, name), (ull) a, (ull) b);
    }
    if (rc != MOQAE_OK) {
        return rc;
    }

    g->alignment                    = 32; /* the spec's default */
    const struct moqae_gguf_kv * al = moqae_gguf_find_kv(g, "general.alignment");
    if (al) {
        if (al->type != MOQAE_GGUF_UINT32) {
            return moqae_fail(MOQAE_ERR_FORMAT, "general.alignment has type %s, expected uint32",
                              value_type_name(al->type));
        }
        if (al->val.u64 == 0 || (al->val.u64 & (al->val.u64 - 1)) != 0) {
            return moqae_fail(MOQAE_ERR_FORMAT, "general.alignment = %llu is not a power of two", (ull) al->val.u64);
        }
        g->alignment = al->val.u64;
    }
    return MOQAE_OK;
}

/* ================================================================================================
 * Tensor infos
 * ============================================================================================== */

/* Name, shape and type of tensor i; its size in bytes. The offset is checked later (parse_tensors),
 * once the data section's start is known. */
static int parse_tensor_info(struct rd * r, struct moqae_gguf_tensor * t, uint64_t i) {
    char name[NAME_SHOW + 4];
    if (!rd_str(r, &t->name)) {
        return fail_str(r, "tensor %llu name", (ull) i);
    }
    const char * nm = show(t->name, name);
    if (t->name.len > MAX_NAME_LEN) {
        return moqae_fail(MOQAE_ERR_FORMAT, "tensor %llu '%s': name is %llu bytes, longer than ggml's limit of %u",
                          (ull) i, nm, (ull) t->name.len, MAX_NAME_LEN);
    }
    if (!rd_u32(r, &t->n_dims)) {
        return fail_truncated(r, 4, "tensor %llu '%s' (n_dims)", (ull) i, nm);
    }
    if (t->n_dims > MOQAE_GGUF_MAX_DIMS) {
        return moqae_fail(MOQAE_ERR_FORMAT, "tensor %llu '%s': n_dims = %u, at most %d are supported", (ull) i, nm,
                          t->n_dims, MOQAE_GGUF_MAX_DIMS);
    }
    uint64_t n_elem = 1;
    for (int d = 0; d < MOQAE_GGUF_MAX_DIMS; d++) {
        t->ne[d] = 1;
    }
    for (uint32_t d = 0; d < t->n_dims; d++) {
        uint64_t ne;
        if (!rd_u64(r, &ne)) {
            return fail_truncated(r, 8, "tensor %llu '%s' (ne[%u])", (ull) i, nm, d);
        }
        if (ne == 0 || ne > (uint64_t) INT64_MAX) {
            return moqae_fail(MOQAE_ERR_FORMAT, "tensor %llu '%s': ne[%u] = %llu (each dimension must be 1..2^63-1)",
                              (ull) i, nm, d, (ull) ne);
        }
        if (!moqae_mul_ok(n_elem, ne, &n_elem) || n_elem > (uint64_t) INT64_MAX) {
            return moqae_fail(MOQAE_ERR_FORMAT, "tensor %llu '%s': element count overflows 64 bits at ne[%u] = %llu",
                              (ull) i, nm, d, (ull) ne);
        }
        t->ne[d] = (int64_t) ne;
    }
    uint32_t type;
    if (!rd_u32(r, &type)) {
        return fail_truncated(r, 4, "tensor %llu '%s' (type)", (ull) i, nm);
    }
    if (type >= (uint32_t) N_GGML_TYPES) {
        return moqae_fail(MOQAE_ERR_FORMAT, "tensor %llu '%s': unknown tensor type %u", (ull) i, nm, type);
    }
    const struct type_info * ti = &k_types[type];
    t->type                     = (enum moqae_type) type;
    if (!moqae_type_is_supported(t->type)) {
        return moqae_fail(MOQAE_ERR_UNSUPPORTED, "tensor %llu '%s' has type %s (%u), which moqae does not support%s "
                          "(it reads " SUPPORTED_TYPES_TEXT ")", (ull) i, nm, ti->name, type,
                          ti->removed ? "; ggml itself has removed it" : "");
    }
    if (t->ne[0] % ti->blck != 0) {
        return moqae_fail(MOQAE_ERR_FORMAT,
                          "tensor %llu '%s': type %s needs ne[0] (%lld) to be a multiple of its block size %u",
                          (ull) i, nm, ti->name, (long long) t->ne[0], ti->blck);
    }
    /* rows * bytes per row; n_elem fits in int64 but the byte count (up to 4 bytes an element) may not */
    const uint64_t row = (uint64_t) (t->ne[0] / ti->blck) * ti->bytes;
    if (!moqae_mul_ok(row, n_elem / (uint64_t) t->ne[0], &t->n_bytes)) {
        return moqae_fail(MOQAE_ERR_FORMAT, "tensor %llu '%s': its size in bytes overflows 64 bits", (ull) i, nm);
    }
    if (!rd_u64(r, &t->offset)) {
        return fail_truncated(r, 8, "tensor %llu '%s' (offset)", (ull) i, nm);
    }
    return MOQAE_OK;
}

static int check_tensor_data(struct moqae_gguf * g, struct moqae_gguf_tensor * t, uint64_t i) {
    char           name[NAME_SHOW + 4];
    const char *   nm = show(t->name, name);
    uint64_t       start, end;
    if (t->offset % g->alignment != 0) {
        return moqae_fail(MOQAE_ERR_FORMAT, "tensor %llu '%s': offset %llu is not a multiple of the alignment %llu",
                          (ull) i, nm, (ull) t->offset, (ull) g->alignment);
    }
    if (!moqae_add_ok(g->data_offset, t->offset, &start) || !moqae_add_ok(start, t->n_bytes, &end) || end > g->size) {
        return moqae_fail(MOQAE_ERR_FORMAT, "tensor %llu '%s': offset %llu + %llu bytes runs past the end of the file "
                          "(%llu bytes, tensor data starts at %llu)", (ull) i, nm, (ull) t->offset,
                          (ull) t->n_bytes, (ull) g->size, (ull) g->data_offset);
    }
    /* Kernels read blocks through uint16_t fields and F32 rows as floats: with a file alignment of
     * 1 or 2 the data could be misaligned for its type (undefined behaviour in C). */
    const uint64_t natural = t->type == MOQAE_TYPE_F32 ? 4 : 2;
    if (start % natural != 0) {
        return moqae_fail(MOQAE_ERR_FORMAT, "tensor %llu '%s': %s data at file offset %llu is not %llu-byte aligned "
                          "(general.alignment = %llu)", (ull) i, nm, moqae_type_name(t->type), (ull) start,
                          (ull) natural, (ull) g->alignment);
    }
    t->data = g->base + start;
    return MOQAE_OK;
}

static int parse_tensors(struct rd * r, struct gguf_impl * gi) {
    struct moqae_gguf * g = &gi->pub;
    if (g->n_tensors > 0) {
        /* n_tensors <= file size / 24 (parse_header): no overflow. */
        g->tensors = calloc((size_t) g->n_tensors, sizeof *g->tensors);
        if (!g->tensors) {
            return moqae_fail(MOQAE_ERR_OUT_OF_MEMORY, "out of memory for %llu tensor infos", (ull) g->n_tensors);
        }
    }
    for (uint64_t i = 0; i < g->n_tensors; i++) {
        int rc = parse_tensor_info(r, &g->tensors[i], i);
        if (rc != MOQAE_OK) {
            return rc;
        }
    }
    uint64_t a = 0, b = 0;
    int      rc = index_build(&gi->tensor_index, g->tensors, sizeof *g->tensors, g->n_tensors, &a, &b);
    if (rc == MOQAE_ERR_FORMAT) {
        char name[NAME_SHOW + 4];
        return moqae_fail(MOQAE_ERR_FORMAT, "duplicate tensor name '%s' (tensors %llu and %llu)",
                          show(g->tensors[b].name, name), (ull) a, (ull) b);
    }
    if (rc != MOQAE_OK) {
        return rc;
    }

    /* The data section starts at the end of the tensor infos, padded to the alignment. A file
     * without tensors may end before that padding. */
    const uint64_t pad = (g->alignment - r->pos % g->alignment) % g->alignment;
    if (!moqae_add_ok(r->pos, pad, &g->data_offset)) {
        return moqae_fail(MOQAE_ERR_FORMAT, "tensor data offset overflows"); /* unreachable: pos <= size */
    }
    if (g->n_tensors == 0) {
        return MOQAE_OK;
    }
    if (g->data_offset > g->size) {
        return moqae_fail(MOQAE_ERR_FORMAT, "truncated file: tensor data would start at offset %llu (tensor infos end "
                          "at %llu, padded to %llu), past the end of the file (%llu bytes)", (ull) g->data_offset,
                          (ull) r->pos, (ull) g->alignment, (ull) g->size);
    }
    for (uint64_t i = 0; i < g->n_tensors; i++) {
        rc = check_tensor_data(g, &g->tensors[i], i);
        if (rc != MOQAE_OK) {
            return rc;
        }
    }
    return MOQAE_OK;
}

/* ================================================================================================
 * Opening
 * ============================================================================================== */

/* Parses [base, base + size) into a new handle. On failure frees it (and unmaps if owns_map). */
static int parse(const uint8_t * base, uint64_t size, bool owns_map, struct moqae_gguf ** out) {
    struct gguf_impl * gi = calloc(1, sizeof *gi);
    if (!gi) {
        if (owns_map) {
            munmap((void *) base, (size_t) size);
        }
        return moqae_fail(MOQAE_ERR_OUT_OF_MEMORY, "out of memory");
    }
    struct moqae_gguf * g = &gi->pub;
    g->base               = base;
    g->size               = size;
    g->owns_map           = owns_map;
    struct rd r           = { base, size, 0 };
    int       rc          = parse_header(&r, g);
    if (rc == MOQAE_OK) {
        rc = parse_kvs(&r, gi);
    }
    if (rc == MOQAE_OK) {
        rc = parse_tensors(&r, gi);
    }
    if (rc != MOQAE_OK) {
        moqae_gguf_close(g);
        return rc;
    }
    *out = g;
    return MOQAE_OK;
}

int moqae_gguf_open_buffer(const void * data, uint64_t size, struct moqae_gguf ** out) {
    if (!out) {
        return moqae_fail(MOQAE_ERR_INVALID_ARG, "moqae_gguf_open_buffer: out is NULL");
    }
    *out = NULL;
    if (!data && size > 0) {
        return moqae_fail(MOQAE_ERR_INVALID_ARG, "moqae_gguf_open_buffer: data is NULL but size is %llu", (ull) size);
    }
    static const uint8_t empty[1] = { 0 };
    return parse(data ? (const uint8_t *) data : empty, size, false, out);
}

int moqae_gguf_open(const char * path, struct moqae_gguf ** out) {
    if (!out) {
        return moqae_fail(MOQAE_ERR_INVALID_ARG, "moqae_gguf_open: out is NULL");
    }
    *out = NULL;
    if (!path) {
        return moqae_fail(MOQAE_ERR_INVALID_ARG, "moqae_gguf_open: path is NULL");
    }
    const int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        return moqae_fail(MOQAE_ERR_IO, "cannot open '%s': %s", path, strerror(errno));
    }
    struct stat st;
    if (fstat(fd, &st) != 0) {
        const int e = errno;
        close(fd);
        return moqae_fail(MOQAE_ERR_IO, "cannot stat '%s': %s", path, strerror(e));
    }
    if (S_ISDIR(st.st_mode)) {
        close(fd);
        return moqae_fail(MOQAE_ERR_IO, "cannot open '%s': %s", path, strerror(EISDIR));
    }
    if (!S_ISREG(st.st_mode)) {
        close(fd);
        return moqae_fail(MOQAE_ERR_IO, "cannot open '%s': not a regular file", path);
    }
    const uint64_t size = (uint64_t) st.st_size;
    if (size < HEADER_BYTES) { /* also: mmap of 0 bytes fails */
        uint8_t head[HEADER_BYTES];
        ssize_t n = size > 0 ? pread(fd, head, (size_t) size, 0) : 0;
        close(fd);
        if (n >= 4 && memcmp(head, "GGUF", 4) != 0) {
            return fail_magic(head);
        }
        return moqae_fail(MOQAE_ERR_FORMAT, "file is %llu bytes, too small to be GGUF (the header is %u bytes)",
                          (ull) size, HEADER_BYTES);
    }
    if (size > (uint64_t) SIZE_MAX) {
        close(fd);
        return moqae_fail(MOQAE_ERR_IO, "cannot map '%s': %llu bytes do not fit in the address space", path,
                          (ull) size);
    }
    void * map = mmap(NULL, (size_t) size, PROT_READ, MAP_PRIVATE, fd, 0);
    const int e = errno;
    close(fd); /* the mapping keeps the file alive */
    if (map == MAP_FAILED) {
        return moqae_fail(MOQAE_ERR_IO, "cannot mmap '%s' (%llu bytes): %s", path, (ull) size, strerror(e));
    }
    /* Format errors do not repeat the path: callers prefix it (model.c: "PATH: ...") */
    return parse((const uint8_t *) map, size, true, out);
}

/* ================================================================================================
 * Lookups and typed getters
 * ============================================================================================== */

const struct moqae_gguf_kv * moqae_gguf_find_kv(const struct moqae_gguf * g, const char * key) {
    if (!g) {
        return NULL;
    }
    return index_find(&impl(g)->kv_index, g->kv, sizeof *g->kv, key);
}

const struct moqae_gguf_tensor * moqae_gguf_find_tensor(const struct moqae_gguf * g, const char * name) {
    if (!g) {
        return NULL;
    }
    return index_find(&impl(g)->tensor_index, g->tensors, sizeof *g->tensors, name);
}

bool moqae_gguf_str_eq(struct moqae_gguf_str s, const char * c) {
    return c && name_eq(&s, c, strlen(c));
}

static const struct moqae_gguf_kv * find_or_fail(const struct moqae_gguf * g, const char * key, int * rc) {
    const struct moqae_gguf_kv * kv = moqae_gguf_find_kv(g, key);
    *rc = kv ? MOQAE_OK : moqae_fail(MOQAE_ERR_NOT_FOUND, "metadata key '%s' is missing", key ? key : "(null)");
    return kv;
}

/* An integer kv as sign + magnitude. */
static void int_value(const struct moqae_gguf_kv * kv, bool * neg, uint64_t * mag) {
    const bool is_signed = kv->type == MOQAE_GGUF_INT8 || kv->type == MOQAE_GGUF_INT16 ||
                           kv->type == MOQAE_GGUF_INT32 || kv->type == MOQAE_GGUF_INT64;
    *neg = is_signed && kv->val.i64 < 0;
    *mag = *neg ? (uint64_t) 0 - (uint64_t) kv->val.i64 : kv->val.u64;
}

int moqae_gguf_get_u32(const struct moqae_gguf * g, const char * key, uint32_t * out) {
    int                          rc;
    const struct moqae_gguf_kv * kv = find_or_fail(g, key, &rc);
    if (!kv) {
        return rc;
    }
    if (!value_type_is_int(kv->type)) {
        return moqae_fail(MOQAE_ERR_FORMAT, "metadata key '%s' has type %s, expected an integer", key,
                          value_type_name(kv->type));
    }
    bool     neg;
    uint64_t mag;
    int_value(kv, &neg, &mag);
    if (neg || mag > UINT32_MAX) {
        return moqae_fail(MOQAE_ERR_FORMAT, "metadata key '%s' = %s%llu is out of range for uint32", key,
                          neg ? "-" : "", (ull) mag);
    }
    *out = (uint32_t) mag;
    return MOQAE_OK;
}

int moqae_gguf_get_i64(const struct moqae_gguf * g, const char * key, int64_t * out) {
    int                          rc;
    const struct moqae_gguf_kv * kv = find_or_fail(g, key, &rc);
    if (!kv) {
        return rc;
    }
    if (!value_type_is_int(kv->type)) {
        return moqae_fail(MOQAE_ERR_FORMAT, "metadata key '%s' has type %s, expected an integer", key,
                          value_type_name(kv->type));
    }
    if (kv->type == MOQAE_GGUF_UINT64 && kv->val.u64 > (uint64_t) INT64_MAX) {
        return moqae_fail(MOQAE_ERR_FORMAT, "metadata key '%s' = %llu is out of range for int64", key,
                          (ull) kv->val.u64);
    }
    *out = kv->val.i64; /* unsigned values <= INT64_MAX read the same through either member */
    return MOQAE_OK;
}

int moqae_gguf_get_f32(const struct moqae_gguf * g, const char * key, float * out) {
    int                          rc;
    const struct moqae_gguf_kv * kv = find_or_fail(g, key, &rc);
    if (!kv) {
        return rc;
    }
    double v;
    if (kv->type == MOQAE_GGUF_FLOAT32 || kv->type == MOQAE_GGUF_FLOAT64) {
        v = kv->val.f64;
    } else if (value_type_is_int(kv->type)) {
        bool     neg;
        uint64_t mag;
        int_value(kv, &neg, &mag);
        v = neg ? -(double) mag : (double) mag;
    } else {
        return moqae_fail(MOQAE_ERR_FORMAT, "metadata key '%s' has type %s, expected a number", key,
                          value_type_name(kv->type));
    }
    if (isfinite(v) && (v > FLT_MAX || v < -FLT_MAX)) {
        return moqae_fail(MOQAE_ERR_FORMAT, "metadata key '%s' = %g is out of range for float32", key, v);
    }
    *out = (float) v; /* NaN and infinities pass through: the caller decides what they mean */
    return MOQAE_OK;
}

int moqae_gguf_get_bool(const struct moqae_gguf * g, const char * key, bool * out) {
    int                          rc;
    const struct moqae_gguf_kv * kv = find_or_fail(g, key, &rc);
    if (!kv) {
        return rc;
    }
    if (kv->type != MOQAE_GGUF_BOOL) {
        return moqae_fail(MOQAE_ERR_FORMAT, "metadata key '%s' has type %s, expected bool", key,
                          value_type_name(kv->type));
    }
    *out = kv->val.b;
    return MOQAE_OK;
}

int moqae_gguf_get_str(const struct moqae_gguf * g, const char * key, struct moqae_gguf_str * out) {
    int                          rc;
    const struct moqae_gguf_kv * kv = find_or_fail(g, key, &rc);
    if (!kv) {
        return rc;
    }
    if (kv->type != MOQAE_GGUF_STRING) {
        return moqae_fail(MOQAE_ERR_FORMAT, "metadata key '%s' has type %s, expected string", key,
                          value_type_name(kv->type));
    }
    *out = kv->str;
    return MOQAE_OK;
}

int moqae_gguf_get_arr(const struct moqae_gguf * g, const char * key, enum moqae_gguf_type elem_type,
                       const struct moqae_gguf_kv ** out) {
    int                          rc;
    const struct moqae_gguf_kv * kv = find_or_fail(g, key, &rc);
    if (!kv) {
        return rc;
    }
    if (kv->type != MOQAE_GGUF_ARRAY) {
        return moqae_fail(MOQAE_ERR_FORMAT, "metadata key '%s' has type %s, expected an array of %s", key,
                          value_type_name(kv->type), value_type_name(elem_type));
    }
    if (kv->arr_type != elem_type) {
        return moqae_fail(MOQAE_ERR_FORMAT, "metadata key '%s' is an array of %s, expected an array of %s", key,
                          value_type_name(kv->arr_type), value_type_name(elem_type));
    }
    *out = kv;
    return MOQAE_OK;
}

/* Element i of a numeric (or bool) array; the array bytes were bounds-checked at parse time. */
enum elem_kind { ELEM_SIGNED, ELEM_UNSIGNED, ELEM_FLOAT };

static enum elem_kind arr_elem(const struct moqae_gguf_kv * kv, uint64_t i, int64_t * s, uint64_t * u, double * f) {
    MOQAE_ASSERT(kv->type == MOQAE_GGUF_ARRAY && i < kv->arr_n && kv->arr_type != MOQAE_GGUF_STRING);
    const uint8_t * p = kv->arr_data + i * k_value_size[kv->arr_type];
    switch (kv->arr_type) {
        case MOQAE_GGUF_UINT8:
        case MOQAE_GGUF_BOOL: *u = *p; return ELEM_UNSIGNED;
        case MOQAE_GGUF_INT8: *s = (int8_t) *p; return ELEM_SIGNED;
        case MOQAE_GGUF_UINT16: { uint16_t v; memcpy(&v, p, 2); *u = v; return ELEM_UNSIGNED; }
        case MOQAE_GGUF_INT16: { int16_t v; memcpy(&v, p, 2); *s = v; return ELEM_SIGNED; }
        case MOQAE_GGUF_UINT32: { uint32_t v; memcpy(&v, p, 4); *u = v; return ELEM_UNSIGNED; }
        case MOQAE_GGUF_INT32: { int32_t v; memcpy(&v, p, 4); *s = v; return ELEM_SIGNED; }
        case MOQAE_GGUF_UINT64: memcpy(u, p, 8); return ELEM_UNSIGNED;
        case MOQAE_GGUF_INT64: memcpy(s, p, 8); return ELEM_SIGNED;
        case MOQAE_GGUF_FLOAT32: { float v; memcpy(&v, p, 4); *f = v; return ELEM_FLOAT; }
        case MOQAE_GGUF_FLOAT64: memcpy(f, p, 8); return ELEM_FLOAT;
        default: MOQAE_ASSERT(0 && "not a numeric array"); return ELEM_SIGNED;
    }
}

int64_t moqae_gguf_arr_i64(const struct moqae_gguf_kv * kv, uint64_t i) {
    int64_t  s = 0;
    uint64_t u = 0;
    double   f = 0;
    switch (arr_elem(kv, i, &s, &u, &f)) {
        case ELEM_SIGNED: return s;
        case ELEM_UNSIGNED: return u > (uint64_t) INT64_MAX ? INT64_MAX : (int64_t) u; /* saturate */
        case ELEM_FLOAT: break;
    }
    /* float -> int64 is undefined for NaN and outside the range: saturate, NaN reads as 0 */
    if (isnan(f)) {
        return 0;
    }
    if (f >= 9223372036854775807.0) {
        return INT64_MAX;
    }
    if (f <= -9223372036854775808.0) {
        return INT64_MIN;
    }
    return (int64_t) f;
}

double moqae_gguf_arr_f64(const struct moqae_gguf_kv * kv, uint64_t i) {
    int64_t  s = 0;
    uint64_t u = 0;
    double   f = 0;
    switch (arr_elem(kv, i, &s, &u, &f)) {
        case ELEM_SIGNED: return (double) s;
        case ELEM_UNSIGNED: return (double) u;
        case ELEM_FLOAT: break;
    }
    return f;
}
