/*
 * cuda/ops.cu — see ops.cuh.
 */
#include "ops.cuh"

/* rms_norm_ref: the sum of squares in double, mean = f32(sum / n), y = (x * (1 / sqrt(mean + eps))) * w,
 * every f32 operation rounded on its own: the same values as the CPU (up to the double sum's order). */
static __global__ void rms_norm_kernel(const float * __restrict__ x, const float * __restrict__ w, float eps,
                                       int64_t n, float * __restrict__ y) {
    __shared__ double part[32];
    const float *     xr  = x + (int64_t) blockIdx.x * n;
    float *           yr  = y + (int64_t) blockIdx.x * n;
    double            sum = 0.0;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
        sum += (double) xr[i] * (double) xr[i];
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        sum += __shfl_xor_sync(0xffffffffu, sum, o);
    }
    if (threadIdx.x % 32 == 0) {
        part[threadIdx.x / 32] = sum;
    }
    __syncthreads();
    if (threadIdx.x < 32) {
        sum = threadIdx.x < blockDim.x / 32 ? part[threadIdx.x] : 0.0;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            sum += __shfl_xor_sync(0xffffffffu, sum, o);
        }
        if (threadIdx.x == 0) {
            part[0] = sum;
        }
    }
    __syncthreads();
    const float mean  = (float) (part[0] / (double) n);
    const float scale = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(mean, eps)));
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
        yr[i] = __fmul_rn(__fmul_rn(xr[i], scale), w[i]);
    }
}

int moqae_cuda_rms_norm(const float * x, const float * w, float eps, int64_t n, int64_t n_rows, float * y,
                        cudaStream_t stream) {
    if (n_rows <= 0) {
        return MOQAE_OK;
    }
    rms_norm_kernel<<<(unsigned) n_rows, 256, 0, stream>>>(x, w, eps, n, y);
    MOQAE_CUDA_LAUNCH_CHECK();
    return MOQAE_OK;
}

/* graph.c rope_head with the table rope_cs [n_tok][n_rot/2][2] (cos, sin) that the host computed as
 * graph.c rope_table does (ggml's angles), without fused multiply-adds: the CPU's values. */
static __global__ void rope_kernel(float * __restrict__ q, float * __restrict__ k, int64_t n_tok, int n_head,
                                   int n_head_kv, int head_dim, int half, const float * __restrict__ cs) {
    const int64_t per_tok = (int64_t) (n_head + n_head_kv) * half;
    const int64_t u       = (int64_t) blockIdx.x * blockDim.x + threadIdx.x;
    if (u >= n_tok * per_tok) {
        return;
    }
    const int64_t t = u / per_tok;
    const int     r = (int) (u % per_tok), h = r / half, i = r % half;
    float *       v = h < n_head ? q + (t * n_head + h) * head_dim : k + (t * n_head_kv + (h - n_head)) * head_dim;
    const float   c = cs[(t * half + i) * 2], sn = cs[(t * half + i) * 2 + 1];
    const float   x0 = v[2 * i], x1 = v[2 * i + 1];
    v[2 * i]         = __fsub_rn(__fmul_rn(x0, c), __fmul_rn(x1, sn));
    v[2 * i + 1]     = __fadd_rn(__fmul_rn(x0, sn), __fmul_rn(x1, c));
}

int moqae_cuda_rope(float * q, float * k, int64_t n_tok, int64_t n_head, int64_t n_head_kv, int64_t head_dim,
                    int64_t n_rot, const float * rope_cs, cudaStream_t stream) {
    const int64_t total = n_tok * (n_head + n_head_kv) * (n_rot / 2);
    if (total <= 0) {
        return MOQAE_OK;
    }
    rope_kernel<<<(unsigned) ((total + 255) / 256), 256, 0, stream>>>(q, k, n_tok, (int) n_head, (int) n_head_kv,
                                                                       (int) head_dim, (int) (n_rot / 2), rope_cs);
    MOQAE_CUDA_LAUNCH_CHECK();
    return MOQAE_OK;
}

static __global__ void swiglu_kernel(float * __restrict__ g, const float * __restrict__ u, int64_t n) {
    const int64_t i = (int64_t) blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        const float x = g[i];
        g[i]          = __fmul_rn(__fdiv_rn(x, __fadd_rn(1.0f, expf(-x))), u[i]); /* swiglu_ref's order */
    }
}

int moqae_cuda_swiglu(float * g, const float * u, int64_t n, cudaStream_t stream) {
    if (n <= 0) {
        return MOQAE_OK;
    }
    swiglu_kernel<<<(unsigned) ((n + 255) / 256), 256, 0, stream>>>(g, u, n);
    MOQAE_CUDA_LAUNCH_CHECK();
    return MOQAE_OK;
}
