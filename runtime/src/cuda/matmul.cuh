/*
 * cuda/matmul.cuh — matrix products with weights in their GGUF block formats (quant.h), on the
 * device: Y[t][r] (+)= W[r] . X[t], X f32 [n_tok][n_cols], Y f32 [n_tok][ldy]. Decode (n_tok <= 8)
 * runs a mat-vec that dequantizes each weight block in registers (weights read once: bandwidth
 * bound); prefill runs a tensor-core (WMMA f16, f32 accumulate) mat-mat that dequantizes weight
 * tiles into shared memory (no f16 copy of the weights; our own kernel since cuBLAS is not part of
 * the toolkit the build may rely on). Also the embedding lookup. Reference: cpu/kernels-ref.c.
 */
#pragma once

#include "common.cuh"

extern "C" {
#include "../gguf.h"
}

/* A weight matrix in device memory. */
struct moqae_cuda_weight {
    enum moqae_type type;
    int64_t         n_cols, n_rows;
    size_t          row_bytes;
    const uint8_t * data; /* [n_rows][row_bytes] device */
};

/* Which kernel a product uses: the one choice point (supported = not NONE). */
enum moqae_cuda_mm_kernel {
    MOQAE_CUDA_MM_NONE = 0,
    MOQAE_CUDA_MM_MMV, /* mat-vec, n_tok <= MOQAE_CUDA_MMV_MAX_T */
    MOQAE_CUDA_MM_MMA, /* tensor-core mat-mat                    */
};
#define MOQAE_CUDA_MMV_MAX_T 8

enum moqae_cuda_mm_kernel moqae_cuda_mm_pick(enum moqae_type type, int64_t n_cols, int64_t n_tok);
bool                      moqae_cuda_type_supported(enum moqae_type type);

/* y[t * ldy + r] = (accumulate ? y : 0) + W[r] . x[t]   for r < n_rows, t < n_tok. xq_scratch: device
 * memory of moqae_cuda_matmul_scratch_bytes(n_cols) for one token's 8-bit activations (the integer
 * mat-vec of Q4_0/Q4_1/Q8_0 weights; MOQAE_CUDA_MMV=1 or NULL: the f32 mat-vec). */
int moqae_cuda_matmul(const struct moqae_cuda_weight * w, const float * x, int64_t n_tok, float * y, int64_t ldy,
                      bool accumulate, void * xq_scratch, cudaStream_t stream);
size_t moqae_cuda_matmul_scratch_bytes(int64_t max_cols);

/* x[t][:] = dequantized row ids[t] of w (n_cols floats each). */
int moqae_cuda_get_rows(const struct moqae_cuda_weight * w, const int32_t * ids, int64_t n_tok, float * x,
                        cudaStream_t stream);
