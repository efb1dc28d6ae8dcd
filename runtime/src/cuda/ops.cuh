/*
 * cuda/ops.cuh — the small ops of the llama block on the device, each the twin of a
 * cpu/kernels-ref.c or graph.c function, with its operations in its order and no fused multiply-add:
 * RMSNorm (rms_norm_ref), SwiGLU (swiglu_ref); RoPE (graph.c rope_head) is fused with the KV store
 * (kv-codec.cuh, moqae_cuda_kv_rope_store).
 * All f32, row-major [n_tok][...].
 */
#pragma once

#include "common.cuh"

/* y[t] = x[t] * w / sqrt(mean(x[t]^2) + eps), rows of n floats. */
int moqae_cuda_rms_norm(const float * x, const float * w, float eps, int64_t n, int64_t n_rows, float * y,
                        cudaStream_t stream);

/* g = silu(g) * u over n floats. */
int moqae_cuda_swiglu(float * g, const float * u, int64_t n, cudaStream_t stream);
