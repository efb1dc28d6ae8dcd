/*
 * cuda/matmul.cuh — matrix products with weights in their GGUF block formats (quant.h), on the
 * device: Y[t][r] (+)= W[r] . X[t], X f32 [n_tok][n_cols], Y f32 [n_tok][ldy]. Weights with integer
 * codes (Q4_0, Q4_1, Q8_0) multiply activations quantized to 8 bits per block of 32 exactly as the
 * CPU quantizes them (moqae_cuda_quantize; cpu/kernels-ref.c from_float_q8_0/_q8_1), with exact
 * integer sums per block: decode (n_tok <= 8) a dp4a mat-vec, prefill an int8 tensor-core mat-mat
 * (mma m16n8k32), both combining blocks with the CPU's formula. F32/F16 weights: an f32 mat-vec and
 * an f16 WMMA mat-mat. Also the embedding lookup. Reference: cpu/kernels-ref.c.
 */
#pragma once

#include "common.cuh"

extern "C" {
#include "../gguf.h"
}

/* A weight matrix in device memory. Quantized rows (Q4_0, Q4_1, Q8_0) hold their GGUF blocks' bytes in
 * two planes: every block's codes (16 bytes, Q8_0 32), then every block's scales (f16 d; Q4_1 d, m),
 * each row padded to 16 bytes, so that a block's codes are one aligned 16-byte load
 * (moqae_cuda_repack_rows); F32/F16 rows as in the file. */
struct moqae_cuda_weight {
    enum moqae_type type;
    int64_t         n_cols, n_rows;
    size_t          row_bytes; /* on the device (moqae_cuda_weight_row_bytes) */
    const uint8_t * data;      /* [n_rows][row_bytes] device */
};

/* Bytes of one device row of a weight whose GGUF rows have gguf_row_bytes. */
size_t moqae_cuda_weight_row_bytes(enum moqae_type type, int64_t n_cols, size_t gguf_row_bytes);
/* n_rows GGUF rows (src, src_row_bytes apart) in the device layout, into host memory dst
 * (n_rows * moqae_cuda_weight_row_bytes bytes). */
void moqae_cuda_repack_rows(enum moqae_type type, int64_t n_cols, int64_t n_rows, const uint8_t * src, size_t src_row_bytes,
                            uint8_t * dst);

/* Which kernel a product uses: the one choice point (supported = not NONE). */
enum moqae_cuda_mm_kernel {
    MOQAE_CUDA_MM_NONE = 0,
    MOQAE_CUDA_MM_MMV,  /* F32/F16 weights, n_tok <= MOQAE_CUDA_MMV_MAX_T: f32 mat-vec   */
    MOQAE_CUDA_MM_MMA,  /* F32/F16 weights: f16 tensor-core mat-mat                      */
    MOQAE_CUDA_MM_MMVQ, /* integer codes, n_tok <= MOQAE_CUDA_MMV_MAX_T: dp4a mat-vec     */
    MOQAE_CUDA_MM_IMMA, /* integer codes: int8 tensor-core mat-mat                       */
};
#define MOQAE_CUDA_MMV_MAX_T 8

enum moqae_cuda_mm_kernel moqae_cuda_mm_pick(enum moqae_type type, int64_t n_cols, int64_t n_tok);
bool                      moqae_cuda_type_supported(enum moqae_type type);
/* Whether products with this weight type take quantized activations (moqae_cuda_quantize). */
bool                      moqae_cuda_type_quantized(enum moqae_type type);

/* Activations x [n_tok][n_cols] quantized to 8-bit blocks of 32 (the CPU's Q8_0/Q8_1 values, scale
 * and block sum, one device layout for both) into xq: moqae_cuda_quant_bytes(n_tok, n_cols) bytes. */
size_t moqae_cuda_quant_bytes(int64_t n_tok, int64_t n_cols);
int    moqae_cuda_quantize(const float * x, int64_t n_tok, int64_t n_cols, void * xq, cudaStream_t stream);

/* Fused: y = ops.cu's RMSNorm of x (rows of n floats), and xq its quantization; g = SwiGLU(g, u)
 * ([n_tok][n]) and xq its quantization. The same values as the unfused ops. */
int moqae_cuda_rms_norm_quant(const float * x, const float * w, float eps, int64_t n, int64_t n_rows, float * y, void * xq,
                              cudaStream_t stream);
int moqae_cuda_swiglu_quant(float * g, const float * u, int64_t n_tok, int64_t n, void * xq, cudaStream_t stream);

/* y[t * ldy + r] = (accumulate ? y : 0) + W[r] . x[t]   for r < n_rows, t < n_tok. x: f32 [n_tok][n_cols]
 * (read for F32/F16 weights); xq: its moqae_cuda_quantize output (read for quantized weights). */
int moqae_cuda_matmul(const struct moqae_cuda_weight * w, const float * x, const void * xq, int64_t n_tok, float * y,
                      int64_t ldy, bool accumulate, cudaStream_t stream);

/* The int8 tensor-core product (MOQAE_CUDA_MM_IMMA) with a given kernel: 0 the default (stages copied
 * ahead), 4 / 1 the earlier kernel with 4 / 1 quant blocks per stage; all give the same values. */
int moqae_cuda_matmul_imma(const struct moqae_cuda_weight * w, const void * xq, int64_t n_tok, float * y, int64_t ldy,
                           bool accumulate, int variant, cudaStream_t stream);

/* ys[i] = ws[i] . x ([n_tok][ws[i]->n_rows] each) for n <= 3 weights read with the same activations: one
 * launch when the weights' rows follow one another on the device in one layout and the product is a
 * mat-vec (the upload stores a layer's Q, K, V and gate, up so), else one product each. */
int moqae_cuda_matmul_seq(const struct moqae_cuda_weight * const * ws, float * const * ys, int n, const float * x,
                          const void * xq, int64_t n_tok, cudaStream_t stream);

/* x[t][:] = dequantized row ids[t] of w (n_cols floats each). */
int moqae_cuda_get_rows(const struct moqae_cuda_weight * w, const int32_t * ids, int64_t n_tok, float * x,
                        cudaStream_t stream);
