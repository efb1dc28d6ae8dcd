/*
 * cuda/ops.cuh — the small ops of the llama block on the device, each the twin of a
 * cpu/kernels-ref.c or graph.c function, with its operations in its order and no fused multiply-add:
 * RMSNorm (rms_norm_ref), RoPE (graph.c rope_head, the table from rope_table), SwiGLU (swiglu_ref).
 * All f32, row-major [n_tok][...].
 */
#pragma once

#include "common.cuh"

/* y[t] = x[t] * w / sqrt(mean(x[t]^2) + eps), rows of n floats. */
int moqae_cuda_rms_norm(const float * x, const float * w, float eps, int64_t n, int64_t n_rows, float * y,
                        cudaStream_t stream);

/* Rotate pairs (2i, 2i+1), i < n_rot/2, of every head of q [n_tok][n_head][head_dim] and
 * k [n_tok][n_head_kv][head_dim] by rope_cs [n_tok][n_rot/2][2] (cos, sin of each token's angles,
 * computed on the host as graph.c rope_table does: ggml's angles, the C library's cosf/sinf). */
int moqae_cuda_rope(float * q, float * k, int64_t n_tok, int64_t n_head, int64_t n_head_kv, int64_t head_dim,
                    int64_t n_rot, const float * rope_cs, cudaStream_t stream);

/* g = silu(g) * u over n floats. */
int moqae_cuda_swiglu(float * g, const float * u, int64_t n, cudaStream_t stream);
