/*
 * cpu/kernels.h — the CPU kernel table. Each op has a scalar reference (kernels-ref.c, the oracle)
 * and SIMD versions (kernels-avx2.c, kernels-avx512.c, each compiled with its own flags) with the
 * same signatures; moqae_cpu_kernels() picks one table at run time from the CPU's features, so one
 * binary runs on any x86-64. Tests compare every SIMD entry with the _ref entry.
 *
 * Matrix products: a weight matrix W is [n_rows][n_in] in its GGUF block type; activations X are
 * first converted row by row to the weight type's vec_dot_type (Q8_0 for Q4_0/Q8_0, Q8_1 for Q4_1,
 * F16 for F16, BF16 for BF16 (as ggml), F32 for F32), then Y[t][r] = dot(W[r], X[t]).
 */
#ifndef MOQAE_CPU_KERNELS_H
#define MOQAE_CPU_KERNELS_H

#include "../gguf.h"

#include <stddef.h>
#include <stdint.h>

/* Convert n floats (n a multiple of the type's block size) to type t's blocks. */
typedef void (*moqae_from_float_fn)(const float * x, void * y, int64_t n);
/* Convert n elements of blocks to floats. */
typedef void (*moqae_to_float_fn)(const void * x, float * y, int64_t n);
/* *s = dot of n elements: w in the weight type, x in its vec_dot_type. */
typedef void (*moqae_vec_dot_fn)(int64_t n, float * s, const void * w, const void * x);
/* Tile of a matrix product: for r < n_rows, t < n_tok:
 *   y[t * ldy + r] = dot(w + r * w_row_bytes, x + t * x_row_bytes) over n elements.
 * Implementations may block over rows and tokens for register reuse. Rows must keep their type's
 * natural alignment (4 bytes for F32, 2 for the others), as GGUF data does. */
typedef void (*moqae_gemm_fn)(int64_t n, int64_t n_rows, int64_t n_tok, const void * w, size_t w_row_bytes,
                              const void * x, size_t x_row_bytes, float * y, int64_t ldy);

struct moqae_type_kernels {
    enum moqae_type     vec_dot_type; /* what activations are converted to */
    moqae_to_float_fn   to_float;     /* NULL if unsupported as a weight   */
    moqae_from_float_fn from_float;   /* for types usable as vec_dot_type  */
    moqae_vec_dot_fn    vec_dot;
    moqae_gemm_fn       gemm;
};

struct moqae_cpu_kernels {
    const char * name; /* "scalar", "avx2", "avx512" */
    struct moqae_type_kernels type[MOQAE_TYPE_COUNT];

    /* ---- float ops on f32 vectors (n any size >= 1) ---- */
    /* sum(x[i]*y[i]) */
    float (*dot_f32)(int64_t n, const float * x, const float * y);
    /* sum(x[i]*f16(y[i])): attention scores against an f16 K cache */
    float (*dot_f32_f16)(int64_t n, const float * x, const uint16_t * y);
    /* y[i] += a * f16(x[i]): attention values from an f16 V cache */
    void (*axpy_f16)(int64_t n, float a, const uint16_t * x, float * y);
    /* y[i] = f16(x[i]) (round to nearest even) */
    void (*f32_to_f16)(int64_t n, const float * x, uint16_t * y);
    /* y[i] = x[i] * w[i] / sqrt(mean(x^2) + eps) */
    void (*rms_norm)(int64_t n, const float * x, const float * w, float eps, float * y);
    /* g[i] = silu(g[i]) * u[i] */
    void (*swiglu)(int64_t n, float * g, const float * u);
    /* y[i] *= a */
    void (*scale)(int64_t n, float a, float * y);
    /* attention weights: y[i] = exp(a * y[i] - m) / sum_j exp(a * y[j] - m), m = max_j a * y[j] */
    void (*softmax)(int64_t n, float a, float * y);
    /* y[i] += x[i] */
    void (*add)(int64_t n, const float * x, float * y);
};

/* The scalar reference table (always available). */
const struct moqae_cpu_kernels * moqae_cpu_kernels_ref(void);
/* SIMD tables, NULL when the build or the CPU lacks the ISA. */
const struct moqae_cpu_kernels * moqae_cpu_kernels_avx2(void);
const struct moqae_cpu_kernels * moqae_cpu_kernels_avx512(void);
/* The best table for this CPU; MOQAE_CPU=scalar|avx2|avx512 in the environment forces a choice
 * (falling back when unsupported). Thread-safe, computed once. */
const struct moqae_cpu_kernels * moqae_cpu_kernels(void);

/* ---- internal to src/cpu/: shared by the kernel files (dispatch.c defines these) ---- */

/* Whether this CPU (and OS) supports the ISA of the avx2 / avx512 table. */
int moqae_cpu_has_avx2(void);
int moqae_cpu_has_avx512(void);

/* A register tile of a gemm: the moqae_gemm_fn contract for a fixed n_rows x n_tok shape. */
typedef void (*moqae_tile_fn)(int64_t n, const uint8_t * w, size_t w_row_bytes, const uint8_t * x,
                              size_t x_row_bytes, float * y, int64_t ldy);
/* The tile shapes of one gemm: R x T for prefill, RD x 1 for decode (n_tok < T), and the tails. */
struct moqae_gemm_tiles {
    int           R, T, RD;
    moqae_tile_fn rxt, rx1, onext, one, rdx1; /* R x T, R x 1, 1 x T, 1 x 1, RD x 1 */
};
/* A moqae_gemm_fn made of tiles: blocks rows by R (RD when n_tok < T) and tokens by T. */
void moqae_gemm_tiled(const struct moqae_gemm_tiles * k, int64_t n, int64_t n_rows, int64_t n_tok, const void * w,
                      size_t w_row_bytes, const void * x, size_t x_row_bytes, float * y, int64_t ldy);

/* Decode streams the weights once, so a tile of R rows prefetches them (the hardware prefetcher lags
 * behind 4+ interleaved rows): the same offset in the rows of the first tile at least `ahead` bytes
 * on, or, for a single row or a tile over 256 KiB (which would not stay in L2), `ahead` / R bytes
 * further along each row. Returns the offset to add to the current address. Whole tiles 8 KiB ahead
 * beat in-row distances of 0.5-4 KiB by up to 2x on Zen 5 for short rows (docs/KERNELS.md). */
static inline size_t moqae_prefetch_offset(int R, size_t w_row_bytes, size_t ahead) {
    const size_t tile = (size_t) R * w_row_bytes;
    if (tile == 0 || tile > ((size_t) 256 << 10)) { /* 0: a single row (vec_dot) */
        return ahead / (size_t) R;
    }
    return (ahead + tile - 1) / tile * tile;
}

#endif /* MOQAE_CPU_KERNELS_H */
