/*
 * cuda/common.cuh — what every CUDA file of libmoqae shares: the check macro (every CUDA call goes
 * through MOQAE_CUDA_CHECK, which records "expr failed: reason (file:line)" and returns
 * MOQAE_ERR_INTERNAL, as ggml's CUDA_CHECK but returning a status instead of aborting), the
 * per-micro-batch dynamic state that kernels read from device memory (so that one captured CUDA
 * graph serves every decode step), the GPU chunk table entry, and f16 helpers that match common.h
 * bit for bit. .cuh files export host launchers only; kernels are static in their .cu.
 */
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>
#include <stdlib.h>

extern "C" {
#include "../common.h"
}

#define MOQAE_CUDA_CHECK(expr)                                                                             \
    do {                                                                                                   \
        cudaError_t err_ = (expr);                                                                         \
        if (err_ != cudaSuccess) {                                                                         \
            return moqae_fail(MOQAE_ERR_INTERNAL, "CUDA: %s failed: %s (%s:%d)", #expr,                    \
                              cudaGetErrorString(err_), __FILE__, __LINE__);                               \
        }                                                                                                  \
    } while (0)

/* After a kernel launch: the launch's own error (bad configuration), as a status. */
#define MOQAE_CUDA_LAUNCH_CHECK() MOQAE_CUDA_CHECK(cudaGetLastError())

/* A comparison switch's value (the environment variable `name`, "" when unset), for the MOQAE_CUDA_*
 * variables that select an earlier path; call sites keep it in a function-local static (read once). */
static inline const char * moqae_cuda_switch(const char * name) {
    const char * e = getenv(name);
    return e ? e : "";
}

/* Programmatic dependent launch (sm_90): during a decode step (moqae_cuda_pdl_decode, set by the backend)
 * moqae_cuda_launch starts a kernel with it, so that the kernel may be scheduled while the one before it in
 * the stream (or the decode graph) finishes, instead of after a drain and a launch. Every kernel begins with
 * MOQAE_PDL_ENTER(): it waits until the kernel before it has completed and its writes are visible (so nothing
 * is read or overwritten early), then lets the next one be scheduled (which happens once every block of this
 * one has begun). Without the attribute, or before sm_90, both are no-ops. Prefill launches without it: its
 * kernels have many blocks and long tails, and measured slower with it (docs/RESULTS.md, issue 7, session 11).
 * MOQAE_CUDA_PDL=0 launches without it everywhere, for comparison. */
extern thread_local bool moqae_cuda_pdl_decode;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define MOQAE_PDL_ENTER()                                                                                  \
    asm volatile("griddepcontrol.wait;\n\tgriddepcontrol.launch_dependents;" ::: "memory")
#else
#define MOQAE_PDL_ENTER() ((void) 0)
#endif

static inline bool moqae_cuda_pdl_on() {
    static const int on = [] {
        int dev = 0, major = 0;
        if (*moqae_cuda_switch("MOQAE_CUDA_PDL") == '0' || cudaGetDevice(&dev) != cudaSuccess ||
            cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) {
            cudaGetLastError();
            return 0;
        }
        return major >= 9 ? 1 : 0;
    }();
    return on != 0;
}

/* kernel<<<grid, block, smem, stream>>>(args...), with programmatic dependent launch where available. A bad
 * launch's error is returned and, as for <<<>>>, left for cudaGetLastError (the callers' MOQAE_CUDA_LAUNCH_CHECK). */
template <typename... KArgs, typename... Args>
static inline cudaError_t moqae_cuda_launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem,
                                            cudaStream_t stream, Args &&... args) {
    cudaLaunchAttribute attr;
    attr.id                                         = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr.val.programmaticStreamSerializationAllowed = 1;
    cudaLaunchConfig_t cfg                          = {};
    cfg.gridDim                                     = grid;
    cfg.blockDim                                    = block;
    cfg.dynamicSmemBytes                            = smem;
    cfg.stream                                      = stream;
    cfg.attrs                                       = &attr;
    cfg.numAttrs                                    = moqae_cuda_pdl_decode && moqae_cuda_pdl_on() ? 1 : 0;
    return cudaLaunchKernelEx(&cfg, kernel, static_cast<KArgs>(args)...);
}

/* Propagate a status. */
#define MOQAE_TRY(expr)                                                                                    \
    do {                                                                                                   \
        int st_ = (expr);                                                                                  \
        if (st_) {                                                                                         \
            return st_;                                                                                    \
        }                                                                                                  \
    } while (0)

/* Dynamic state of the micro-batch being computed, written by the host before the launches (one
 * small copy), read by the kernels whose work depends on the position: RoPE, the KV store, the
 * encoder and attention. Shapes that do not change (n_tok for the decode graph) stay arguments. */
struct moqae_cuda_dyn {
    long long n_past;    /* position of the micro-batch's first token                        */
    int       n_tok;     /* tokens in the micro-batch                                        */
    int       n_chunks;  /* entries of the chunk table, including the ones this batch completes */
    int       enc_first; /* table index of the first chunk this micro-batch completes        */
    int       n_enc;     /* chunks it completes (encoded after the store)                    */
};

/* One completed chunk of the GPU ring (same meaning as kv-ring.c's struct chunk). Its records sit at
 * `off` in every layer's arena: per KV head a key record then a value record, each padded to 16
 * bytes on the GPU so that kernels can use 16-byte loads (the record bytes themselves are the CPU
 * codec's, byte for byte). */
struct moqae_cuda_chunk {
    long long pos;   /* position of the chunk's first token */
    long long off;   /* byte offset in each layer's arena   */
    int       codec; /* enum moqae_kv_codec                 */
    int       pad;
};

#define MOQAE_CUDA_REC_ALIGN 16

static inline size_t moqae_cuda_align(size_t n) {
    return (n + MOQAE_CUDA_REC_ALIGN - 1) / MOQAE_CUDA_REC_ALIGN * MOQAE_CUDA_REC_ALIGN;
}

/* ---- device helpers -------------------------------------------------------------------------- */

static __device__ __forceinline__ float moqae_dev_f16_to_f32(uint16_t h) {
    return __half2float(__ushort_as_half(h));
}

/* Round to nearest even (common.h's moqae_f32_to_f16, which __float2half_rn equals for finite and
 * infinite inputs; NaN keeps a quiet NaN as there). */
static __device__ __forceinline__ uint16_t moqae_dev_f32_to_f16(float f) {
    return __half_as_ushort(__float2half_rn(f));
}

/* ---- exact f32 arithmetic, host and device ------------------------------------------------------
 * The KV encoder must give kv-codec.c's bytes: every operation rounded on its own, no fused
 * multiply-add (nvcc contracts a*b+c into an FMA by default; the _rn intrinsics are never fused).
 * The host side (x86-64 baseline: no FMA instructions) is what lets the encoder's phases run on the
 * CPU too, for testing the device code without a device. */

static __host__ __device__ __forceinline__ float xmul(float a, float b) {
#ifdef __CUDA_ARCH__
    return __fmul_rn(a, b);
#else
    return a * b;
#endif
}

static __host__ __device__ __forceinline__ float xadd(float a, float b) {
#ifdef __CUDA_ARCH__
    return __fadd_rn(a, b);
#else
    return a + b;
#endif
}

static __host__ __device__ __forceinline__ float xsub(float a, float b) {
#ifdef __CUDA_ARCH__
    return __fsub_rn(a, b);
#else
    return a - b;
#endif
}

static __host__ __device__ __forceinline__ float xdiv(float a, float b) {
#ifdef __CUDA_ARCH__
    return __fdiv_rn(a, b);
#else
    return a / b;
#endif
}

static __host__ __device__ __forceinline__ float xf16_to_f32(uint16_t h) {
#ifdef __CUDA_ARCH__
    return __half2float(__ushort_as_half(h));
#else
    return moqae_f16_to_f32(h);
#endif
}

static __host__ __device__ __forceinline__ uint16_t xf32_to_f16(float f) {
#ifdef __CUDA_ARCH__
    return __half_as_ushort(__float2half_rn(f));
#else
    return moqae_f32_to_f16(f);
#endif
}

/* cp.async (sm_80+): global -> shared memory without registers; a group completes in order. 16 bytes
 * bypass L1 (.cg), 4 and 8 bytes go through it (.ca: the only form of those sizes). */
static __device__ __forceinline__ void cp_async16(void * smem, const void * gmem) {
    const unsigned sa = (unsigned) __cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(sa), "l"(gmem));
}
static __device__ __forceinline__ void cp_async8(void * smem, const void * gmem) {
    const unsigned sa = (unsigned) __cvta_generic_to_shared(smem);
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8;\n" ::"r"(sa), "l"(gmem));
}
static __device__ __forceinline__ void cp_async4(void * smem, const void * gmem) {
    const unsigned sa = (unsigned) __cvta_generic_to_shared(smem);
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(sa), "l"(gmem));
}
static __device__ __forceinline__ void cp_async_commit() {
    asm volatile("cp.async.commit_group;\n" ::);
}
static __device__ __forceinline__ void cp_async_wait1() {
    asm volatile("cp.async.wait_group 1;\n" ::);
}
static __device__ __forceinline__ void cp_async_wait0() {
    asm volatile("cp.async.wait_group 0;\n" ::);
}

/* graph.c rope_head's rotation of one pair (x0, x1) by (cos c, sin sn), without fused multiply-adds:
 * the CPU's values. */
static __device__ __forceinline__ float2 moqae_dev_rope_pair(float x0, float x1, float c, float sn) {
    return make_float2(__fsub_rn(__fmul_rn(x0, c), __fmul_rn(x1, sn)), __fadd_rn(__fmul_rn(x0, sn), __fmul_rn(x1, c)));
}
