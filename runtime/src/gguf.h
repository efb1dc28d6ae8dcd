/*
 * gguf.h — reader for GGUF v2/v3 files (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md).
 * The file is mmapped read-only; every header field, string and array length, tensor dimension,
 * type, offset and size is checked against the file length before anything is dereferenced, so a
 * truncated or malicious file gets MOQAE_ERR_FORMAT with a message, never a crash. It does not
 * interpret the metadata (model.c and tokenizer.c do).
 */
#ifndef MOQAE_GGUF_H
#define MOQAE_GGUF_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* GGUF metadata value types, numbered as in the spec. */
enum moqae_gguf_type {
    MOQAE_GGUF_UINT8   = 0,
    MOQAE_GGUF_INT8    = 1,
    MOQAE_GGUF_UINT16  = 2,
    MOQAE_GGUF_INT16   = 3,
    MOQAE_GGUF_UINT32  = 4,
    MOQAE_GGUF_INT32   = 5,
    MOQAE_GGUF_FLOAT32 = 6,
    MOQAE_GGUF_BOOL    = 7,
    MOQAE_GGUF_STRING  = 8,
    MOQAE_GGUF_ARRAY   = 9,
    MOQAE_GGUF_UINT64  = 10,
    MOQAE_GGUF_INT64   = 11,
    MOQAE_GGUF_FLOAT64 = 12,
    MOQAE_GGUF_TYPE_COUNT,
};

/* Tensor element types, numbered as ggml's enum ggml_type. Only the ones we compute with are named;
 * others are rejected at load with MOQAE_ERR_UNSUPPORTED. */
enum moqae_type {
    MOQAE_TYPE_F32  = 0,
    MOQAE_TYPE_F16  = 1,
    MOQAE_TYPE_Q4_0 = 2,
    MOQAE_TYPE_Q4_1 = 3,
    MOQAE_TYPE_Q8_0 = 8,
    MOQAE_TYPE_Q8_1 = 9, /* activations only (Q4_1 dot products) */
    MOQAE_TYPE_BF16 = 30,
    MOQAE_TYPE_COUNT = 40,
};

/* A string inside the mapped file: not NUL-terminated. */
struct moqae_gguf_str {
    const char * ptr;
    uint64_t     len;
};

struct moqae_gguf_kv {
    struct moqae_gguf_str key;
    enum moqae_gguf_type  type;
    /* For scalars: the value. For strings: str. For arrays: arr_type, arr_n and arr_data (pointer to
     * the first element in the file; string arrays are a sequence of (u64 len, bytes) records, read
     * them with moqae_gguf_arr_str). */
    union {
        uint64_t u64;
        int64_t  i64;
        double   f64;
        bool     b;
    } val;
    struct moqae_gguf_str str;
    enum moqae_gguf_type  arr_type;
    uint64_t              arr_n;
    const uint8_t *       arr_data;
    const struct moqae_gguf_str * arr_strs; /* for string arrays: arr_n entries (allocated) */
};

#define MOQAE_GGUF_MAX_DIMS 4

struct moqae_gguf_tensor {
    struct moqae_gguf_str name;
    uint32_t              n_dims;
    int64_t               ne[MOQAE_GGUF_MAX_DIMS]; /* ne[0] is the innermost (row length); unused = 1 */
    enum moqae_type       type;
    uint64_t              offset;  /* relative to the data section */
    uint64_t              n_bytes; /* validated: data section start + offset + n_bytes <= file size */
    const void *          data;    /* into the mapping */
};

struct moqae_gguf {
    uint32_t                   version;
    uint64_t                   n_kv;
    struct moqae_gguf_kv *     kv;      /* n_kv entries */
    uint64_t                   n_tensors;
    struct moqae_gguf_tensor * tensors; /* n_tensors entries */
    uint64_t                   alignment;
    const uint8_t *            base;    /* the mapping */
    uint64_t                   size;    /* file size */
    uint64_t                   data_offset;
    bool                       owns_map; /* munmap on close */
};

/* Open and validate path. On failure returns a status with moqae_last_error() set, *out NULL:
 * MOQAE_ERR_IO (message names the path and strerror), MOQAE_ERR_FORMAT (message names the field and
 * values but not the path: callers prefix it), MOQAE_ERR_UNSUPPORTED (a tensor type moqae lacks),
 * MOQAE_ERR_OUT_OF_MEMORY. The mapping is MAP_PRIVATE read-only; a file truncated by another process
 * while mapped can still SIGBUS, as with any mmap reader. */
int moqae_gguf_open(const char * path, struct moqae_gguf ** out);

/* Parse an in-memory buffer (not copied; must outlive the result). Used by fuzzers and tests. */
int moqae_gguf_open_buffer(const void * data, uint64_t size, struct moqae_gguf ** out);

/* Accepts NULL. */
void moqae_gguf_close(struct moqae_gguf * g);

/* Lookups: NULL when absent. */
const struct moqae_gguf_kv *     moqae_gguf_find_kv(const struct moqae_gguf * g, const char * key);
const struct moqae_gguf_tensor * moqae_gguf_find_tensor(const struct moqae_gguf * g, const char * name);

/* Typed getters. Integer getters accept any integer type whose value fits; they return
 * MOQAE_ERR_NOT_FOUND when absent and MOQAE_ERR_FORMAT (with a message naming the key) on a type
 * mismatch or out-of-range value. */
int moqae_gguf_get_u32(const struct moqae_gguf * g, const char * key, uint32_t * out);
int moqae_gguf_get_i64(const struct moqae_gguf * g, const char * key, int64_t * out);
int moqae_gguf_get_f32(const struct moqae_gguf * g, const char * key, float * out);
int moqae_gguf_get_bool(const struct moqae_gguf * g, const char * key, bool * out);
int moqae_gguf_get_str(const struct moqae_gguf * g, const char * key, struct moqae_gguf_str * out);
/* Array getter: checks the element type. */
int moqae_gguf_get_arr(const struct moqae_gguf * g, const char * key, enum moqae_gguf_type elem_type,
                       const struct moqae_gguf_kv ** out);

/* Element i of a numeric array as a double / int64 (caller checked i < arr_n). */
int64_t moqae_gguf_arr_i64(const struct moqae_gguf_kv * kv, uint64_t i);
double  moqae_gguf_arr_f64(const struct moqae_gguf_kv * kv, uint64_t i);

/* true if s equals the NUL-terminated c. */
bool moqae_gguf_str_eq(struct moqae_gguf_str s, const char * c);

/* Block size (elements) and bytes per block of a tensor type, as ggml defines them for every ggml type
 * (also those moqae cannot compute with); 0 for unknown or removed types. */
int64_t moqae_type_block_size(enum moqae_type t);
size_t  moqae_type_block_bytes(enum moqae_type t);
const char * moqae_type_name(enum moqae_type t);
/* Bytes of a row of n elements (n must be a multiple of the block size). */
size_t moqae_type_row_bytes(enum moqae_type t, int64_t n);
/* Whether moqae's kernels compute with weights of this type (F32, F16, BF16, Q8_0, Q4_0, Q4_1); the
 * reader rejects tensors of any other type with MOQAE_ERR_UNSUPPORTED. */
bool moqae_type_is_supported(enum moqae_type t);

#endif /* MOQAE_GGUF_H */
