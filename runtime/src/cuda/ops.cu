/*
 * cuda/ops.cu — see ops.cuh.
 */
#include "ops.cuh"

/* rms_norm_ref: the sum of squares in double, mean = f32(sum / n), y = (x * (1 / sqrt(mean + eps))) * w,
 * every f32 operation rounded on its own: the same values as the CPU (up to the double sum's order). */
static __global__ void rms_norm_kernel(const float * __restrict__ x, const float * __restrict__ w, float eps,
                                       int64_t n, float * __restrict__ y) {
    MOQAE_PDL_ENTER();
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
    (void) moqae_cuda_launch(rms_norm_kernel, (unsigned) n_rows, 256, 0, stream, x, w, eps, n, y);
    MOQAE_CUDA_LAUNCH_CHECK();
    return MOQAE_OK;
}

static __global__ void swiglu_kernel(float * __restrict__ g, const float * __restrict__ u, int64_t n) {
    MOQAE_PDL_ENTER();
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
    (void) moqae_cuda_launch(swiglu_kernel, (unsigned) ((n + 255) / 256), 256, 0, stream, g, u, n);
    MOQAE_CUDA_LAUNCH_CHECK();
    return MOQAE_OK;
}
