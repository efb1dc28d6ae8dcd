/*
 * cuda/matmul.cu — see matmul.cuh. Block formats (quant.h, ggml's): Q4_0 {f16 d; u8 qs[16]}
 * x = d * (q - 8); Q4_1 {f16 d, m; u8 qs[16]} x = d * q + m; Q8_0 {f16 d; i8 qs[32]} x = d * q; element
 * j < 16 in the low nibble of qs[j], element j + 16 in its high nibble. F16 and F32 rows are read as
 * blocks of 32 elements too. Rows keep 2-byte alignment (GGUF's), so quantized blocks are read with
 * 2-byte loads (4-byte for Q4_1, whose 20-byte blocks keep 4).
 */
#include "matmul.cuh"

#include <mma.h>

/* ---- dequantization of one block of 32 elements ------------------------------------------------- */

template <int TYPE> struct block_info;
template <> struct block_info<MOQAE_TYPE_F32> { static constexpr int bytes = 128; };
template <> struct block_info<MOQAE_TYPE_F16> { static constexpr int bytes = 64; };
template <> struct block_info<MOQAE_TYPE_Q4_0> { static constexpr int bytes = 18; };
template <> struct block_info<MOQAE_TYPE_Q4_1> { static constexpr int bytes = 20; };
template <> struct block_info<MOQAE_TYPE_Q8_0> { static constexpr int bytes = 34; };

/* The 16 elements half*16 .. half*16+15 of block b of a row. */
template <int TYPE>
static __device__ __forceinline__ void deq16(const uint8_t * row, int64_t b, int half, float * out) {
    const uint8_t * blk = row + b * block_info<TYPE>::bytes;
    if constexpr (TYPE == MOQAE_TYPE_F32) {
        const float4 * p = (const float4 *) (blk + half * 64);
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const float4 v = p[i];
            out[4 * i] = v.x, out[4 * i + 1] = v.y, out[4 * i + 2] = v.z, out[4 * i + 3] = v.w;
        }
    } else if constexpr (TYPE == MOQAE_TYPE_F16) {
        const uint16_t * p = (const uint16_t *) (blk + half * 32);
#pragma unroll
        for (int i = 0; i < 16; i++) {
            out[i] = moqae_dev_f16_to_f32(p[i]);
        }
    } else if constexpr (TYPE == MOQAE_TYPE_Q4_0) {
        const uint16_t * p = (const uint16_t *) blk;
        const float      d = moqae_dev_f16_to_f32(p[0]);
        const int        sh = half * 4;
#pragma unroll
        for (int i = 0; i < 8; i++) {
            const unsigned v = p[1 + i];
            out[2 * i]       = d * (float) ((int) ((v >> sh) & 15u) - 8);
            out[2 * i + 1]   = d * (float) ((int) ((v >> (8 + sh)) & 15u) - 8);
        }
    } else if constexpr (TYPE == MOQAE_TYPE_Q4_1) {
        const uint32_t * p  = (const uint32_t *) blk;
        const uint32_t   dm = p[0];
        const float      d = moqae_dev_f16_to_f32((uint16_t) (dm & 0xffffu)), m = moqae_dev_f16_to_f32((uint16_t) (dm >> 16));
        const int        sh = half * 4;
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const uint32_t v = p[1 + i];
#pragma unroll
            for (int k = 0; k < 4; k++) {
                out[4 * i + k] = d * (float) ((v >> (8 * k + sh)) & 15u) + m;
            }
        }
    } else { /* Q8_0 */
        const uint16_t * p = (const uint16_t *) blk;
        const float      d = moqae_dev_f16_to_f32(p[0]);
#pragma unroll
        for (int i = 0; i < 8; i++) {
            const unsigned v = p[1 + half * 8 + i];
            out[2 * i]       = d * (float) (int8_t) (v & 0xffu);
            out[2 * i + 1]   = d * (float) (int8_t) (v >> 8);
        }
    }
}

/* ---- mat-vec: one warp per row, lanes over blocks ------------------------------------------------ */

#define MMV_ROWS_PER_BLOCK 4

template <int TYPE>
static __global__ void __launch_bounds__(32 * MMV_ROWS_PER_BLOCK)
mmv_kernel(const uint8_t * __restrict__ w, size_t row_bytes, int64_t n_cols, int64_t n_rows,
           const float * __restrict__ x, int n_tok, float * __restrict__ y, int64_t ldy, int accumulate) {
    const int64_t row  = (int64_t) blockIdx.x * MMV_ROWS_PER_BLOCK + threadIdx.x / 32;
    const int     lane = threadIdx.x % 32;
    if (row >= n_rows) {
        return;
    }
    const uint8_t * wr = w + row * row_bytes;
    const int64_t   nb = n_cols / 32;
    float           acc[MOQAE_CUDA_MMV_MAX_T];
#pragma unroll
    for (int t = 0; t < MOQAE_CUDA_MMV_MAX_T; t++) {
        acc[t] = 0.0f;
    }
    for (int64_t b = lane; b < nb; b += 32) {
        float v[32];
        deq16<TYPE>(wr, b, 0, v);
        deq16<TYPE>(wr, b, 1, v + 16);
#pragma unroll
        for (int t = 0; t < MOQAE_CUDA_MMV_MAX_T; t++) {
            if (t < n_tok) {
                const float4 * xp = (const float4 *) (x + (int64_t) t * n_cols + b * 32);
                float          s  = 0.0f;
#pragma unroll
                for (int i = 0; i < 8; i++) {
                    const float4 xv = xp[i];
                    s += v[4 * i] * xv.x + v[4 * i + 1] * xv.y + v[4 * i + 2] * xv.z + v[4 * i + 3] * xv.w;
                }
                acc[t] += s;
            }
        }
    }
#pragma unroll
    for (int t = 0; t < MOQAE_CUDA_MMV_MAX_T; t++) {
        if (t < n_tok) {
            float s = acc[t];
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) {
                s += __shfl_xor_sync(0xffffffffu, s, o);
            }
            if (lane == 0) {
                float * yp = y + (int64_t) t * ldy + row;
                *yp        = accumulate ? *yp + s : s;
            }
        }
    }
}

/* ---- mat-vec, version 2 (one token): activations quantized once to 8 bits per block of 32 (as the
 * CPU's Q8_0/Q8_1 and llama.cpp's mmvq), integer dot products (dp4a), 4 rows per warp so that each
 * activation block, held in registers, serves 4 weight rows: version 1 re-read 128 bytes of f32
 * activations per 18-byte weight block from L1 (ncu: L1 92% busy, DRAM 8%). -------------------------- */

#define MMVQ_ROWS_PER_WARP 4

struct __align__(8) q8x { /* one quantized activation block: x = d * q, s = d * sum(q) */
    int   q[8];
    float d, s;
};

static __global__ void quantize_x_kernel(const float * __restrict__ x, int64_t nb, q8x * __restrict__ xq) {
    const int64_t b = (int64_t) blockIdx.x * blockDim.x + threadIdx.x;
    if (b >= nb) {
        return;
    }
    const float4 * p = (const float4 *) (x + b * 32);
    float          v[32], amax = 0.0f;
#pragma unroll
    for (int i = 0; i < 8; i++) {
        const float4 f = p[i];
        v[4 * i] = f.x, v[4 * i + 1] = f.y, v[4 * i + 2] = f.z, v[4 * i + 3] = f.w;
    }
#pragma unroll
    for (int i = 0; i < 32; i++) {
        amax = fmaxf(amax, fabsf(v[i]));
    }
    const float d  = amax / 127.0f, id = d > 0.0f ? 1.0f / d : 0.0f;
    int         sum = 0;
    q8x         out;
#pragma unroll
    for (int k = 0; k < 8; k++) {
        unsigned w = 0;
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const int q = __float2int_rn(v[4 * k + j] * id);
            sum += q;
            w |= ((unsigned) q & 0xffu) << (8 * j);
        }
        out.q[k] = (int) w;
    }
    out.d = d;
    out.s = d * (float) sum;
    xq[b] = out;
}

/* sum over the block of w * x for one weight block (types with integer codes). */
template <int TYPE>
static __device__ __forceinline__ float block_dot_q8(const uint8_t * blk, const q8x & xb) {
    if constexpr (TYPE == MOQAE_TYPE_Q4_0) {
        const uint16_t * p = (const uint16_t *) blk;
        int              sumi = 0;
#pragma unroll
        for (int k = 0; k < 4; k++) {
            const int w = (int) ((unsigned) p[1 + 2 * k] | ((unsigned) p[2 + 2 * k] << 16));
            sumi        = __dp4a(w & 0x0f0f0f0f, xb.q[k], sumi);
            sumi        = __dp4a((w >> 4) & 0x0f0f0f0f, xb.q[4 + k], sumi);
        }
        return moqae_dev_f16_to_f32(p[0]) * (xb.d * (float) sumi - 8.0f * xb.s);
    } else if constexpr (TYPE == MOQAE_TYPE_Q4_1) {
        const uint32_t * p = (const uint32_t *) blk;
        int              sumi = 0;
#pragma unroll
        for (int k = 0; k < 4; k++) {
            const int w = (int) p[1 + k];
            sumi        = __dp4a(w & 0x0f0f0f0f, xb.q[k], sumi);
            sumi        = __dp4a((w >> 4) & 0x0f0f0f0f, xb.q[4 + k], sumi);
        }
        const float dw = moqae_dev_f16_to_f32((uint16_t) (p[0] & 0xffffu)), mw = moqae_dev_f16_to_f32((uint16_t) (p[0] >> 16));
        return dw * xb.d * (float) sumi + mw * xb.s;
    } else { /* Q8_0 */
        const uint16_t * p = (const uint16_t *) blk;
        int              sumi = 0;
#pragma unroll
        for (int k = 0; k < 8; k++) {
            const int w = (int) ((unsigned) p[1 + 2 * k] | ((unsigned) p[2 + 2 * k] << 16));
            sumi        = __dp4a(w, xb.q[k], sumi);
        }
        return moqae_dev_f16_to_f32(p[0]) * xb.d * (float) sumi;
    }
}

template <int TYPE>
static __global__ void __launch_bounds__(128)
mmvq_kernel(const uint8_t * __restrict__ w, size_t row_bytes, int64_t n_cols, int64_t n_rows,
            const q8x * __restrict__ xq, float * __restrict__ y, int accumulate) {
    const int64_t row0 = ((int64_t) blockIdx.x * 4 + threadIdx.x / 32) * MMVQ_ROWS_PER_WARP;
    const int     lane = threadIdx.x % 32;
    const int64_t nb   = n_cols / 32;
    float         acc[MMVQ_ROWS_PER_WARP] = {};
    for (int64_t b = lane; b < nb; b += 32) {
        const q8x xb = xq[b];
#pragma unroll
        for (int r = 0; r < MMVQ_ROWS_PER_WARP; r++) {
            if (row0 + r < n_rows) {
                acc[r] += block_dot_q8<TYPE>(w + (row0 + r) * row_bytes + b * block_info<TYPE>::bytes, xb);
            }
        }
    }
#pragma unroll
    for (int r = 0; r < MMVQ_ROWS_PER_WARP; r++) {
        float s = acc[r];
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            s += __shfl_xor_sync(0xffffffffu, s, o);
        }
        if (lane == 0 && row0 + r < n_rows) {
            y[row0 + r] = accumulate ? y[row0 + r] + s : s;
        }
    }
}

/* ---- mat-mat on tensor cores: 64 tokens x 64 rows per block, K in steps of one block (32) -------- */

#define MMA_BT  64 /* tokens per tile */
#define MMA_BR  64 /* rows per tile   */
#define MMA_LDS 40 /* halves per smem row: 32 + 8 (16-byte multiple, staggers banks) */
#define MMA_LDC 68 /* floats per row of the output staging tile */

template <int TYPE>
static __global__ void __launch_bounds__(128)
mma_kernel(const uint8_t * __restrict__ w, size_t row_bytes, int64_t n_cols, int64_t n_rows,
           const float * __restrict__ x, int64_t n_tok, float * __restrict__ y, int64_t ldy, int accumulate) {
    using namespace nvcuda;
    __shared__ __align__(32) half  xs[MMA_BT * MMA_LDS];
    __shared__ __align__(32) half  ws[MMA_BR * MMA_LDS];
    __shared__ __align__(32) float cs[MMA_BT * MMA_LDC];
    const int     tid  = threadIdx.x, warp = tid / 32;
    const int64_t r0   = (int64_t) blockIdx.x * MMA_BR, t0 = (int64_t) blockIdx.y * MMA_BT;
    const int64_t nb   = n_cols / 32;
    const int     wt   = (warp / 2) * 32, wr = (warp % 2) * 32; /* this warp's 32x32 sub-tile */

    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
    for (int i = 0; i < 2; i++) {
#pragma unroll
        for (int j = 0; j < 2; j++) {
            wmma::fill_fragment(acc[i][j], 0.0f);
        }
    }
    for (int64_t b = 0; b < nb; b++) {
        /* activations: 64 tokens x 32 floats, 4 float4 per thread */
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const int     e4 = tid + i * 128, tok = e4 / 8, c4 = e4 % 8;
            float4        v  = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            if (t0 + tok < n_tok) {
                v = *(const float4 *) (x + (t0 + tok) * n_cols + b * 32 + c4 * 4);
            }
            half * d = xs + tok * MMA_LDS + c4 * 4;
            d[0] = __float2half(v.x), d[1] = __float2half(v.y), d[2] = __float2half(v.z), d[3] = __float2half(v.w);
        }
        /* weights: 64 rows x one block, two threads per row */
        {
            const int row = tid / 2, half_ = tid % 2;
            float     v[16];
            if (r0 + row < n_rows) {
                deq16<TYPE>(w + (r0 + row) * row_bytes, b, half_, v);
            } else {
#pragma unroll
                for (int i = 0; i < 16; i++) {
                    v[i] = 0.0f;
                }
            }
            half * d = ws + row * MMA_LDS + half_ * 16;
#pragma unroll
            for (int i = 0; i < 16; i++) {
                d[i] = __float2half(v[i]);
            }
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < 32; kk += 16) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, half, wmma::row_major> fa[2];
            wmma::fragment<wmma::matrix_b, 16, 16, 16, half, wmma::col_major> fb[2];
#pragma unroll
            for (int i = 0; i < 2; i++) {
                wmma::load_matrix_sync(fa[i], xs + (wt + 16 * i) * MMA_LDS + kk, MMA_LDS);
                wmma::load_matrix_sync(fb[i], ws + (wr + 16 * i) * MMA_LDS + kk, MMA_LDS);
            }
#pragma unroll
            for (int i = 0; i < 2; i++) {
#pragma unroll
                for (int j = 0; j < 2; j++) {
                    wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
                }
            }
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 2; i++) {
#pragma unroll
        for (int j = 0; j < 2; j++) {
            wmma::store_matrix_sync(cs + (wt + 16 * i) * MMA_LDC + wr + 16 * j, acc[i][j], MMA_LDC, wmma::mem_row_major);
        }
    }
    __syncthreads();
    for (int e = tid; e < MMA_BT * MMA_BR; e += 128) {
        const int tok = e / MMA_BR, r = e % MMA_BR;
        if (t0 + tok < n_tok && r0 + r < n_rows) {
            float * yp = y + (t0 + tok) * ldy + r0 + r;
            const float v = cs[tok * MMA_LDC + r];
            *yp = accumulate ? *yp + v : v;
        }
    }
}

/* ---- embedding rows ------------------------------------------------------------------------------- */

template <int TYPE>
static __global__ void get_rows_kernel(const uint8_t * __restrict__ w, size_t row_bytes, int64_t n_cols,
                                       const int32_t * __restrict__ ids, float * __restrict__ x) {
    const int64_t t = blockIdx.y;
    const int64_t nh = n_cols / 16; /* half-blocks */
    const uint8_t * row = w + (int64_t) ids[t] * row_bytes;
    for (int64_t h = (int64_t) blockIdx.x * blockDim.x + threadIdx.x; h < nh; h += (int64_t) gridDim.x * blockDim.x) {
        float v[16];
        deq16<TYPE>(row, h / 2, (int) (h % 2), v);
#pragma unroll
        for (int i = 0; i < 16; i++) {
            x[t * n_cols + h * 16 + i] = v[i];
        }
    }
}

/* ---- the op table ---------------------------------------------------------------------------------- */

typedef void (*mmv_fn)(const uint8_t *, size_t, int64_t, int64_t, const float *, int, float *, int64_t, int);
typedef void (*mma_fn)(const uint8_t *, size_t, int64_t, int64_t, const float *, int64_t, float *, int64_t, int);
typedef void (*rows_fn)(const uint8_t *, size_t, int64_t, const int32_t *, float *);
typedef void (*mmvq_fn)(const uint8_t *, size_t, int64_t, int64_t, const q8x *, float *, int);

struct type_ops {
    mmv_fn  mmv;
    mma_fn  mma;
    rows_fn rows;
    mmvq_fn mmvq; /* NULL: no integer codes (F32, F16) */
};

template <int TYPE> static constexpr type_ops make_ops() {
    if constexpr (TYPE == MOQAE_TYPE_Q4_0 || TYPE == MOQAE_TYPE_Q4_1 || TYPE == MOQAE_TYPE_Q8_0) {
        return type_ops{ mmv_kernel<TYPE>, mma_kernel<TYPE>, get_rows_kernel<TYPE>, mmvq_kernel<TYPE> };
    } else {
        return type_ops{ mmv_kernel<TYPE>, mma_kernel<TYPE>, get_rows_kernel<TYPE>, nullptr };
    }
}

static const type_ops * ops_of(enum moqae_type t) {
    static const type_ops f32 = make_ops<MOQAE_TYPE_F32>(), f16 = make_ops<MOQAE_TYPE_F16>(),
                          q40 = make_ops<MOQAE_TYPE_Q4_0>(), q41 = make_ops<MOQAE_TYPE_Q4_1>(),
                          q80 = make_ops<MOQAE_TYPE_Q8_0>();
    switch (t) {
        case MOQAE_TYPE_F32: return &f32;
        case MOQAE_TYPE_F16: return &f16;
        case MOQAE_TYPE_Q4_0: return &q40;
        case MOQAE_TYPE_Q4_1: return &q41;
        case MOQAE_TYPE_Q8_0: return &q80;
        default: return nullptr;
    }
}

bool moqae_cuda_type_supported(enum moqae_type type) {
    return ops_of(type) != nullptr;
}

enum moqae_cuda_mm_kernel moqae_cuda_mm_pick(enum moqae_type type, int64_t n_cols, int64_t n_tok) {
    if (!ops_of(type) || n_cols % 32 != 0 || n_tok < 1) {
        return MOQAE_CUDA_MM_NONE;
    }
    return n_tok <= MOQAE_CUDA_MMV_MAX_T ? MOQAE_CUDA_MM_MMV : MOQAE_CUDA_MM_MMA;
}

size_t moqae_cuda_matmul_scratch_bytes(int64_t max_cols) {
    return (size_t) (max_cols / 32) * sizeof(q8x);
}

int moqae_cuda_matmul(const struct moqae_cuda_weight * w, const float * x, int64_t n_tok, float * y, int64_t ldy,
                      bool accumulate, void * xq_scratch, cudaStream_t stream) {
    const type_ops * ops = ops_of(w->type);
    switch (moqae_cuda_mm_pick(w->type, w->n_cols, n_tok)) {
        case MOQAE_CUDA_MM_MMV: {
            static int v1 = -1; /* MOQAE_CUDA_MMV=1: the f32 mat-vec everywhere (comparison) */
            if (v1 < 0) {
                const char * e = getenv("MOQAE_CUDA_MMV");
                v1             = e && *e == '1';
            }
            /* the integer mat-vec costs one more launch (the quantization): worth it on large
             * matrices (7B: 2.2x), not on SmolLM2's 576-wide ones (tg128 660 -> 516 t/s on the H100) */
            if (n_tok == 1 && ops->mmvq && !v1 && xq_scratch && w->n_rows * w->n_cols >= ((int64_t) 1 << 22)) {
                const int64_t nb = w->n_cols / 32;
                quantize_x_kernel<<<(unsigned) ((nb + 127) / 128), 128, 0, stream>>>(x, nb, (q8x *) xq_scratch);
                MOQAE_CUDA_LAUNCH_CHECK();
                const unsigned blocks = (unsigned) ((w->n_rows + 4 * MMVQ_ROWS_PER_WARP - 1) / (4 * MMVQ_ROWS_PER_WARP));
                ops->mmvq<<<blocks, 128, 0, stream>>>(w->data, w->row_bytes, w->n_cols, w->n_rows, (const q8x *) xq_scratch,
                                                      y, accumulate);
                break;
            }
            const unsigned blocks = (unsigned) ((w->n_rows + MMV_ROWS_PER_BLOCK - 1) / MMV_ROWS_PER_BLOCK);
            ops->mmv<<<blocks, 32 * MMV_ROWS_PER_BLOCK, 0, stream>>>(w->data, w->row_bytes, w->n_cols, w->n_rows, x,
                                                                      (int) n_tok, y, ldy, accumulate);
            break;
        }
        case MOQAE_CUDA_MM_MMA: {
            const dim3 grid((unsigned) ((w->n_rows + MMA_BR - 1) / MMA_BR), (unsigned) ((n_tok + MMA_BT - 1) / MMA_BT));
            ops->mma<<<grid, 128, 0, stream>>>(w->data, w->row_bytes, w->n_cols, w->n_rows, x, n_tok, y, ldy, accumulate);
            break;
        }
        default:
            return moqae_fail(MOQAE_ERR_UNSUPPORTED, "CUDA: no matrix product for weight type %s with %lld columns",
                              moqae_type_name(w->type), (long long) w->n_cols);
    }
    MOQAE_CUDA_LAUNCH_CHECK();
    return MOQAE_OK;
}

int moqae_cuda_get_rows(const struct moqae_cuda_weight * w, const int32_t * ids, int64_t n_tok, float * x,
                        cudaStream_t stream) {
    const type_ops * ops = ops_of(w->type);
    if (!ops || w->n_cols % 32 != 0) {
        return moqae_fail(MOQAE_ERR_UNSUPPORTED, "CUDA: no embedding lookup for type %s", moqae_type_name(w->type));
    }
    const int64_t  nh     = w->n_cols / 16;
    const unsigned blocks = (unsigned) ((nh + 127) / 128);
    ops->rows<<<dim3(blocks, (unsigned) n_tok), 128, 0, stream>>>(w->data, w->row_bytes, w->n_cols, ids, x);
    MOQAE_CUDA_LAUNCH_CHECK();
    return MOQAE_OK;
}
