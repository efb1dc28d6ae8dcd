/*
 * cuda/matmul.cu — see matmul.cuh. Block formats (quant.h, ggml's): Q4_0 {f16 d; u8 qs[16]}
 * x = d * (q - 8); Q4_1 {f16 d, m; u8 qs[16]} x = d * q + m; Q8_0 {f16 d; i8 qs[32]} x = d * q; element
 * j < 16 in the low nibble of qs[j], element j + 16 in its high nibble. F16 and F32 rows are read as
 * blocks of 32 elements too. Rows keep 2-byte alignment (GGUF's), so quantized blocks are read with
 * 2-byte loads (4-byte for Q4_1, whose 20-byte blocks keep 4).
 * Weights with integer codes take activations quantized as the CPU quantizes them (cpu/kernels-ref.c
 * from_float_q8_0_ref / _q8_1_ref: d = amax / 127, q = roundf(x * (1 / d)), d and s = d * sum(q)
 * rounded to f16) and every block's integer dot product is exact, combined with the CPU's formula
 * (float) sumi * (d_w * d_x) (+ m_w * s_x): the GPU's products differ from the CPU's only in the
 * order of the per-block float sums (docs/RESULTS.md, issue 7: greedy parity).
 */
#include "matmul.cuh"
#include "q8.cuh"

#include <mma.h>

/* ---- dequantization of one block of 32 elements ------------------------------------------------- */

template <int TYPE> struct block_info;
template <> struct block_info<MOQAE_TYPE_F32> { static constexpr int bytes = 128; };
template <> struct block_info<MOQAE_TYPE_F16> { static constexpr int bytes = 64; };
template <> struct block_info<MOQAE_TYPE_Q4_0> { static constexpr int bytes = 18; };
template <> struct block_info<MOQAE_TYPE_Q4_1> { static constexpr int bytes = 20; };
template <> struct block_info<MOQAE_TYPE_Q8_0> { static constexpr int bytes = 34; };

/* Quantized rows on the device (moqae_cuda_repack_rows): the codes of the row's nb blocks (16 bytes
 * each for Q4_0/Q4_1, 32 for Q8_0; 16-byte aligned), then their scales (f16 d; Q4_1: f16 d, f16 m). */
template <int TYPE> struct plane {
    static constexpr int code = TYPE == MOQAE_TYPE_Q8_0 ? 32 : 16;
    static constexpr int scale = TYPE == MOQAE_TYPE_Q4_1 ? 4 : 2;
};

template <int TYPE> static __device__ __forceinline__ const uint8_t * codes_of(const uint8_t * row, int64_t b) {
    return row + b * plane<TYPE>::code;
}

template <int TYPE> static __device__ __forceinline__ const uint8_t * scale_of(const uint8_t * row, int64_t nb, int64_t b) {
    return row + nb * plane<TYPE>::code + b * plane<TYPE>::scale;
}

/* The 16 elements half*16 .. half*16+15 of block b of a row of nb blocks. */
template <int TYPE>
static __device__ __forceinline__ void deq16(const uint8_t * row, int64_t nb, int64_t b, int half, float * out) {
    if constexpr (TYPE == MOQAE_TYPE_F32) {
        const float4 * p = (const float4 *) (row + b * 128 + half * 64);
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const float4 v = p[i];
            out[4 * i] = v.x, out[4 * i + 1] = v.y, out[4 * i + 2] = v.z, out[4 * i + 3] = v.w;
        }
    } else if constexpr (TYPE == MOQAE_TYPE_F16) {
        const uint16_t * p = (const uint16_t *) (row + b * 64 + half * 32);
#pragma unroll
        for (int i = 0; i < 16; i++) {
            out[i] = moqae_dev_f16_to_f32(p[i]);
        }
    } else if constexpr (TYPE == MOQAE_TYPE_Q4_0) { /* byte j: element j (low nibble), j + 16 (high) */
        const uint8_t * q  = codes_of<TYPE>(row, b);
        const float     d  = moqae_dev_f16_to_f32(*(const uint16_t *) scale_of<TYPE>(row, nb, b));
        const int       sh = half * 4;
#pragma unroll
        for (int i = 0; i < 16; i++) {
            out[i] = __fmul_rn(d, (float) ((int) ((q[i] >> sh) & 15u) - 8));
        }
    } else if constexpr (TYPE == MOQAE_TYPE_Q4_1) {
        const uint8_t *  q  = codes_of<TYPE>(row, b);
        const uint32_t   dm = *(const uint32_t *) scale_of<TYPE>(row, nb, b);
        const float      d = moqae_dev_f16_to_f32((uint16_t) (dm & 0xffffu)), m = moqae_dev_f16_to_f32((uint16_t) (dm >> 16));
        const int        sh = half * 4;
#pragma unroll
        for (int i = 0; i < 16; i++) {
            out[i] = __fadd_rn(__fmul_rn(d, (float) ((q[i] >> sh) & 15u)), m);
        }
    } else { /* Q8_0 */
        const int8_t * q = (const int8_t *) codes_of<TYPE>(row, b) + half * 16;
        const float    d = moqae_dev_f16_to_f32(*(const uint16_t *) scale_of<TYPE>(row, nb, b));
#pragma unroll
        for (int i = 0; i < 16; i++) {
            out[i] = __fmul_rn(d, (float) q[i]);
        }
    }
}

/* ---- activations quantized as the CPU does (one block of 32 per thread) -------------------------- */

/* One warp per block of 32 (blocks of 4 warps). */
static __global__ void quantize_kernel(const float * __restrict__ x, int64_t nb_total, q8x * __restrict__ xq) {
    MOQAE_PDL_ENTER();
    const int64_t b = ((int64_t) blockIdx.x * blockDim.x + threadIdx.x) / 32;
    if (b >= nb_total) {
        return;
    }
    quantize_warp(x[b * 32 + (threadIdx.x & 31)], xq + b);
}

/* rms_norm_ref (ops.cu's rms_norm_kernel) fused with the quantization of its output row. */
static __global__ void rms_norm_quant_kernel(const float * __restrict__ x, const float * __restrict__ w, float eps,
                                             int64_t n, float * __restrict__ y, q8x * __restrict__ xq) {
    MOQAE_PDL_ENTER();
    __shared__ double part[32];
    const float *     xr  = x + (int64_t) blockIdx.x * n;
    float *           yr  = y + (int64_t) blockIdx.x * n;
    double            sum = 0.0;
    if (threadIdx.x < 256) { /* the sum over 256 threads in rms_norm_kernel's order; all warps quantize */
#pragma unroll 8
        for (int i = threadIdx.x; i < (int) n; i += 256) {
            sum += (double) xr[i] * (double) xr[i];
        }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        sum += __shfl_xor_sync(0xffffffffu, sum, o);
    }
    if (threadIdx.x % 32 == 0 && threadIdx.x < 256) {
        part[threadIdx.x / 32] = sum;
    }
    __syncthreads();
    if (threadIdx.x < 32) {
        sum = threadIdx.x < 256 / 32 ? part[threadIdx.x] : 0.0;
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
    const int   lane  = threadIdx.x & 31;
#pragma unroll 2
    for (int b = threadIdx.x / 32; b < (int) (n / 32); b += blockDim.x / 32) { /* one warp per block of 32 */
        const float v       = __fmul_rn(__fmul_rn(xr[b * 32 + lane], scale), w[b * 32 + lane]);
        yr[b * 32 + lane]   = v;
        quantize_warp(v, xq + (int64_t) blockIdx.x * (n / 32) + b);
    }
}

/* swiglu_ref (g = silu(g) * u) fused with the quantization of g, one warp per block of 32. */
static __global__ void swiglu_quant_kernel(float * __restrict__ g, const float * __restrict__ u, int64_t nb_total,
                                           q8x * __restrict__ xq) {
    MOQAE_PDL_ENTER();
    const int64_t b = ((int64_t) blockIdx.x * blockDim.x + threadIdx.x) / 32;
    if (b >= nb_total) {
        return;
    }
    const int64_t i = b * 32 + (threadIdx.x & 31);
    const float   x = g[i];
    const float   v = __fmul_rn(__fdiv_rn(x, __fadd_rn(1.0f, expf(-x))), u[i]);
    g[i]            = v;
    quantize_warp(v, xq + b);
}

/* ---- mat-vec, f32 activations (F32 and F16 weights): one warp per row, lanes over blocks -------- */

#define MMV_ROWS_PER_BLOCK 4

template <int TYPE>
static __global__ void __launch_bounds__(32 * MMV_ROWS_PER_BLOCK)
mmv_kernel(const uint8_t * __restrict__ w, size_t row_bytes, int64_t n_cols, int64_t n_rows,
           const float * __restrict__ x, int n_tok, float * __restrict__ y, int64_t ldy, int accumulate) {
    MOQAE_PDL_ENTER();
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
        deq16<TYPE>(wr, nb, b, 0, v);
        deq16<TYPE>(wr, nb, b, 1, v + 16);
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

/* ---- mat-vec on integer codes (decode: n_tok <= 8), version 5: one lane per quant block ----------
 * Each lane takes a whole block: its codes in one 16-byte load (Q8_0: two) from the row's code plane,
 * its scale from the scale plane, and the activation block's 32 codes in two 16-byte loads; the
 * block's integer sum is exact, so every block's value is the CPU's. `wpr` warps share a row's
 * blocks (4 for rows of >= 2048 columns: 32 blocks per warp and pass) and each warp group takes
 * MMVQ_R rows, so that an activation block read serves MMVQ_R rows. Version 4 took half a block per
 * lane from the GGUF layout (18-byte Q4_0 blocks: 2-byte loads), 2.6x the load instructions. */

#define MMVQ_R 2 /* rows per warp group */

/* A weight block: its codes as 32-bit words (Q4: w[0..3], the 16 bytes of nibbles; Q8_0: w[0..7])
 * and its scale word (Q4_0/Q8_0: f16 d; Q4_1: f16 d, f16 m). */
template <int TYPE> struct wq_blk {
    int      w[TYPE == MOQAE_TYPE_Q8_0 ? 8 : 4];
    uint32_t dm;
};

template <int TYPE> static __device__ __forceinline__ wq_blk<TYPE> load_blk(const uint8_t * row, int64_t nb, int64_t b) {
    wq_blk<TYPE>  r;
    const int4 *  p = (const int4 *) codes_of<TYPE>(row, b);
    const int4    a = p[0];
    r.w[0] = a.x, r.w[1] = a.y, r.w[2] = a.z, r.w[3] = a.w;
    if constexpr (TYPE == MOQAE_TYPE_Q8_0) {
        const int4 c = p[1];
        r.w[4] = c.x, r.w[5] = c.y, r.w[6] = c.z, r.w[7] = c.w;
    }
    const uint8_t * sc = scale_of<TYPE>(row, nb, b);
    r.dm               = TYPE == MOQAE_TYPE_Q4_1 ? *(const uint32_t *) sc : (uint32_t) *(const uint16_t *) sc;
    return r;
}

/* An activation block: its 32 int8 codes as 8 words and (d, s). */
struct xq_blk {
    int    q[8];
    float2 ds;
};

static __device__ __forceinline__ xq_blk load_xblk(const q8x * xb) {
    const int4 * p = (const int4 *) xb;
    const int4   a = p[0], c = p[1];
    xq_blk       r;
    r.q[0] = a.x, r.q[1] = a.y, r.q[2] = a.z, r.q[3] = a.w, r.q[4] = c.x, r.q[5] = c.y, r.q[6] = c.z, r.q[7] = c.w;
    r.ds = make_float2(xb->d, xb->s);
    return r;
}

/* The exact integer sum of a block, with Q4_0's offset -8 folded in. Q4: byte j holds element j (low
 * nibble) and j + 16 (high), so word k's low nibbles meet activation word k and its high nibbles word
 * k + 4. */
template <int TYPE> static __device__ __forceinline__ int blk_dot_q8(const wq_blk<TYPE> & wq, const xq_blk & x) {
    int s = 0;
    if constexpr (TYPE == MOQAE_TYPE_Q8_0) {
#pragma unroll
        for (int k = 0; k < 8; k++) {
            s = __dp4a(wq.w[k], x.q[k], s);
        }
    } else {
#pragma unroll
        for (int k = 0; k < 4; k++) {
            s = __dp4a(wq.w[k] & 0x0f0f0f0f, x.q[k], s);
            s = __dp4a((wq.w[k] >> 4) & 0x0f0f0f0f, x.q[k + 4], s);
        }
        if constexpr (TYPE == MOQAE_TYPE_Q4_0) {
            int xs = 0;
#pragma unroll
            for (int k = 0; k < 8; k++) {
                xs = __dp4a(x.q[k], 0x01010101, xs);
            }
            s -= 8 * xs;
        }
    }
    return s;
}

/* A block's value from its whole integer sum: (float) sumi * (d_w * d_x) (+ m_w * s_x), as
 * cpu/kernels-ref.c vec_dot. */
template <int TYPE> static __device__ __forceinline__ float block_value_q8(uint32_t dm, int sumi, float2 ds) {
    if constexpr (TYPE == MOQAE_TYPE_Q4_1) {
        const float dw = moqae_dev_f16_to_f32((uint16_t) (dm & 0xffffu)), mw = moqae_dev_f16_to_f32((uint16_t) (dm >> 16));
        return __fadd_rn(__fmul_rn((float) sumi, __fmul_rn(dw, ds.x)), __fmul_rn(mw, ds.y));
    } else {
        return __fmul_rn((float) sumi, __fmul_rn(moqae_dev_f16_to_f32((uint16_t) dm), ds.x));
    }
}

/* Where the mat-vec's rows go: rows [0, end0) to y0 (ld0 floats per token), [end0, end1) to y1, the
 * rest to y2: the products of weights stored one after the other (Q, K, V; gate, up) in one launch. */
struct mm_out {
    float * y0, *y1, *y2;
    int64_t end0, end1, ld0, ld1, ld2;
};

static __device__ __forceinline__ float * mm_out_at(const mm_out & o, int64_t row, int t) {
    if (row < o.end0) {
        return o.y0 + (int64_t) t * o.ld0 + row;
    }
    if (row < o.end1) {
        return o.y1 + (int64_t) t * o.ld1 + (row - o.end0);
    }
    return o.y2 + (int64_t) t * o.ld2 + (row - o.end1);
}

/* UNROLL passes of the group over the row are loaded before any is used (one memory latency per
 * UNROLL passes); 2 for one token, 1 for up to 8 (registers). */
template <int TYPE, int NT>
static __global__ void __launch_bounds__(128, NT == 1 ? 8 : 4)
mmvq_kernel(const uint8_t * __restrict__ w, size_t row_bytes, int64_t n_cols, int64_t n_rows,
            const q8x * __restrict__ xq, int n_tok, const mm_out o, int accumulate, int wpr) {
    MOQAE_PDL_ENTER();
    constexpr int UNROLL = NT == 1 ? 2 : 1;
    __shared__ float red[4][MMVQ_R][NT];
    const int     warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int     grp = warp / wpr, wi = warp % wpr, n_grp = 4 / wpr;
    const int64_t row0 = ((int64_t) blockIdx.x * n_grp + grp) * MMVQ_R;
    const int64_t nb   = n_cols / 32;
    const int     step = wpr * 32;
    float         acc[MMVQ_R][NT];
#pragma unroll
    for (int r = 0; r < MMVQ_R; r++) {
#pragma unroll
        for (int t = 0; t < NT; t++) {
            acc[r][t] = 0.0f;
        }
    }
    for (int64_t b0 = wi * 32; b0 < nb; b0 += UNROLL * step) {
        wq_blk<TYPE> wv[UNROLL][MMVQ_R];
        bool         ok[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; u++) {
            const int64_t b = b0 + u * step + lane;
            ok[u]           = b < nb;
            const int64_t bb = ok[u] ? b : 0;
#pragma unroll
            for (int r = 0; r < MMVQ_R; r++) {
                const int64_t row = row0 + r < n_rows ? row0 + r : 0;
                wv[u][r]          = load_blk<TYPE>(w + row * row_bytes, nb, bb);
            }
        }
#pragma unroll
        for (int u = 0; u < UNROLL; u++) {
            const int64_t bb = ok[u] ? b0 + u * step + lane : 0;
#pragma unroll
            for (int t = 0; t < NT; t++) {
                if (t < n_tok && ok[u]) {
                    const xq_blk x = load_xblk(xq + (int64_t) t * nb + bb);
#pragma unroll
                    for (int r = 0; r < MMVQ_R; r++) {
                        acc[r][t] += block_value_q8<TYPE>(wv[u][r].dm, blk_dot_q8<TYPE>(wv[u][r], x), x.ds);
                    }
                }
            }
        }
    }
#pragma unroll
    for (int r = 0; r < MMVQ_R; r++) {
#pragma unroll
        for (int t = 0; t < NT; t++) {
            float s = acc[r][t];
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) {
                s += __shfl_xor_sync(0xffffffffu, s, o);
            }
            if (lane == 0) {
                red[warp][r][t] = s;
            }
        }
    }
    __syncthreads();
    const int     r = threadIdx.x / NT % MMVQ_R, t = threadIdx.x % NT, g = threadIdx.x / (NT * MMVQ_R);
    const int64_t row = ((int64_t) blockIdx.x * n_grp + g) * MMVQ_R + r;
    if (g < n_grp && t < n_tok && row < n_rows) {
        float s = 0.0f;
        for (int k = 0; k < wpr; k++) {
            s += red[g * wpr + k][r][t];
        }
        float * yp = mm_out_at(o, row, t);
        *yp        = accumulate ? *yp + s : s;
    }
}

/* ---- mat-mat on int8 tensor cores (prefill): 64 tokens x 64 rows per block, KB quant blocks (of 32)
 * per stage between two barriers: each thread's loads of a stage are issued together; each k-step of
 * one block is one mma.m16n8k32 s8 per 16 x 8 tile, whose exact integer sums are scaled into f32
 * accumulators with the CPU's per-block formula, block after block (KB does not change the result) ---- */

#define IMMA_BT 64 /* tokens per tile */
#define IMMA_BR 64 /* rows per tile   */
#define IMMA_KB 4  /* quant blocks per stage */

static __device__ __forceinline__ void mma_s8(int (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                                              uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

/* A warp's 32 tokens x 32 rows of outputs (tile t0, r0; the warp's wt, wr; lane g, q of the mma m16n8
 * accumulator layout) into y. */
static __device__ __forceinline__ void imma_store(const float (&acc)[2][4][4], float * __restrict__ y, int64_t ldy,
                                                  int64_t n_tok, int64_t n_rows, int64_t t0, int64_t r0, int wt, int wr,
                                                  int g, int q, int accumulate) {
#pragma unroll
    for (int mt = 0; mt < 2; mt++) {
#pragma unroll
        for (int nt = 0; nt < 4; nt++) {
#pragma unroll
            for (int i = 0; i < 4; i++) {
                const int64_t tok = t0 + wt + 16 * mt + g + 8 * (i / 2), row = r0 + wr + 8 * nt + 2 * q + (i % 2);
                if (tok < n_tok && row < n_rows) {
                    float * yp = y + tok * ldy + row;
                    *yp        = accumulate ? *yp + acc[mt][nt][i] : acc[mt][nt][i];
                }
            }
        }
    }
}

/* bytes per shared row: KB blocks of 32 codes + 16, an odd multiple of 4 words (KB 1: 12, KB 4: 36), so
 * that the rows g = 0..7 read at word q land in distinct banks */
template <int KB> struct imma_ld { static constexpr int v = 32 * KB + 16; };

template <int TYPE, int KB>
static __global__ void __launch_bounds__(128)
imma_kernel(const uint8_t * __restrict__ w, size_t row_bytes, int64_t n_cols, int64_t n_rows, const q8x * __restrict__ xq,
            int64_t n_tok, float * __restrict__ y, int64_t ldy, int accumulate) {
    MOQAE_PDL_ENTER();
    constexpr int LD = imma_ld<KB>::v;
    __shared__ __align__(16) uint8_t xs[IMMA_BT * LD];
    __shared__ __align__(16) uint8_t ws[IMMA_BR * LD];
    __shared__ float                 dx[KB][IMMA_BT], sx[KB][IMMA_BT], dw[KB][IMMA_BR], mw[KB][IMMA_BR];
    const int     tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane >> 2, q = lane & 3;
    const int64_t r0 = (int64_t) blockIdx.x * IMMA_BR, t0 = (int64_t) blockIdx.y * IMMA_BT;
    const int64_t nb = n_cols / 32;
    const int     wt = (warp / 2) * 32, wr = (warp % 2) * 32; /* this warp's 32 tokens x 32 rows */
    float         acc[2][4][4] = {};
    for (int64_t b0 = 0; b0 < nb; b0 += KB) {
        const int nk = (int) min((int64_t) KB, nb - b0); /* blocks in this stage (the last may have fewer) */
        { /* activations: 64 tokens x KB blocks of 32 int8, two threads per token */
            const int tok = tid / 2, hf = tid % 2;
#pragma unroll
            for (int kb = 0; kb < KB; kb++) {
                uint4 v = make_uint4(0, 0, 0, 0);
                float d = 0.0f, s = 0.0f;
                if (t0 + tok < n_tok && kb < nk) {
                    const q8x * xb = xq + (t0 + tok) * nb + b0 + kb;
                    const uint2 lo = *(const uint2 *) &xb->q[4 * hf], hi = *(const uint2 *) &xb->q[4 * hf + 2]; /* 8-aligned */
                    v              = make_uint4(lo.x, lo.y, hi.x, hi.y);
                    d = xb->d, s = xb->s;
                }
                *(uint4 *) (xs + tok * LD + 32 * kb + 16 * hf) = v;
                if (hf == 0) {
                    dx[kb][tok] = d, sx[kb][tok] = s;
                }
            }
        }
        { /* weights: 64 rows x KB blocks as int8 codes (Q4_0: q - 8), two threads per row */
            const int row = tid / 2, hf = tid % 2;
#pragma unroll
            for (int kb = 0; kb < KB; kb++) {
                uint32_t c[4] = { 0, 0, 0, 0 };
                float    d = 0.0f, m = 0.0f;
                if (r0 + row < n_rows && kb < nk) {
                    const uint8_t * wr = w + (r0 + row) * row_bytes;
                    const uint8_t * sc = scale_of<TYPE>(wr, nb, b0 + kb);
                    if constexpr (TYPE == MOQAE_TYPE_Q8_0) { /* codes 16 hf .. 16 hf + 15 */
                        const uint4 v = *(const uint4 *) (codes_of<TYPE>(wr, b0 + kb) + 16 * hf);
                        d             = moqae_dev_f16_to_f32(*(const uint16_t *) sc);
                        c[0] = v.x, c[1] = v.y, c[2] = v.z, c[3] = v.w;
                    } else {
                        const uint4    v     = *(const uint4 *) codes_of<TYPE>(wr, b0 + kb); /* the 16 bytes of nibbles */
                        const uint32_t qs[4] = { v.x, v.y, v.z, v.w };
                        if constexpr (TYPE == MOQAE_TYPE_Q4_0) {
                            d = moqae_dev_f16_to_f32(*(const uint16_t *) sc);
                        } else {
                            const uint32_t dm = *(const uint32_t *) sc;
                            d                 = moqae_dev_f16_to_f32((uint16_t) (dm & 0xffffu));
                            m                 = moqae_dev_f16_to_f32((uint16_t) (dm >> 16));
                        }
                        /* elements 16 hf .. 16 hf + 15: low nibbles (hf 0) or high nibbles (hf 1) of the 16 bytes */
#pragma unroll
                        for (int k = 0; k < 4; k++) {
                            uint32_t u = (qs[k] >> (4 * hf)) & 0x0f0f0f0fu;
                            if constexpr (TYPE == MOQAE_TYPE_Q4_0) {
                                u = __vsub4(u, 0x08080808u);
                            }
                            c[k] = u;
                        }
                    }
                }
                *(uint4 *) (ws + row * LD + 32 * kb + 16 * hf) = make_uint4(c[0], c[1], c[2], c[3]);
                if (hf == 0) {
                    dw[kb][row] = d, mw[kb][row] = m;
                }
            }
        }
        __syncthreads();
#pragma unroll
        for (int kb = 0; kb < KB; kb++) {
#pragma unroll
            for (int mt = 0; mt < 2; mt++) {
                const uint8_t * xa = xs + (wt + 16 * mt + g) * LD + 32 * kb + 4 * q;
                const uint32_t  a0 = *(const uint32_t *) xa, a1 = *(const uint32_t *) (xa + 8 * LD);
                const uint32_t  a2 = *(const uint32_t *) (xa + 16), a3 = *(const uint32_t *) (xa + 8 * LD + 16);
                const float     dx0 = dx[kb][wt + 16 * mt + g], dx1 = dx[kb][wt + 16 * mt + g + 8];
                const float     sx0 = sx[kb][wt + 16 * mt + g], sx1 = sx[kb][wt + 16 * mt + g + 8];
#pragma unroll
                for (int nt = 0; nt < 4; nt++) {
                    const uint8_t * wb = ws + (wr + 8 * nt + g) * LD + 32 * kb + 4 * q;
                    int             c[4] = { 0, 0, 0, 0 };
                    mma_s8(c, a0, a1, a2, a3, *(const uint32_t *) wb, *(const uint32_t *) (wb + 16));
                    const int   rr  = wr + 8 * nt + 2 * q;
                    const float dw0 = dw[kb][rr], dw1 = dw[kb][rr + 1];
                    float *     ac  = acc[mt][nt];
                    /* a stage's missing blocks (kb >= nk) have codes and scales 0: the sums are unchanged */
                    ac[0] = fmaf((float) c[0], __fmul_rn(dw0, dx0), ac[0]);
                    ac[1] = fmaf((float) c[1], __fmul_rn(dw1, dx0), ac[1]);
                    ac[2] = fmaf((float) c[2], __fmul_rn(dw0, dx1), ac[2]);
                    ac[3] = fmaf((float) c[3], __fmul_rn(dw1, dx1), ac[3]);
                    if constexpr (TYPE == MOQAE_TYPE_Q4_1) {
                        const float mw0 = mw[kb][rr], mw1 = mw[kb][rr + 1];
                        ac[0] = fmaf(mw0, sx0, ac[0]);
                        ac[1] = fmaf(mw1, sx0, ac[1]);
                        ac[2] = fmaf(mw0, sx1, ac[2]);
                        ac[3] = fmaf(mw1, sx1, ac[3]);
                    }
                }
            }
        }
        __syncthreads();
    }
    imma_store(acc, y, ldy, n_tok, n_rows, t0, r0, wt, wr, g, q, accumulate);
}

/* ---- the same products with the stages copied ahead (cp.async, two buffers): 64 tokens x 64 rows per
 * block, IMMP_KB quant blocks per stage. The copies of stage s + 1 run while stage s is multiplied, one
 * barrier per stage. Weights stay packed in shared memory (Q4: 16 bytes of nibbles per block, unpacked
 * into the mma's B fragment: elements 4q..4q+3 are the low nibbles of bytes 4q..4q+3, elements
 * 16+4q.. their high nibbles) with their f16 scales; every output's sum is imma_kernel's, term by term
 * in the same order (block after block, the same fmaf chain), so the values are identical. Q4_0 and
 * Q8_0 only: Q4_1 (its minimum terms: 128 registers, 4 blocks per SM) measured 2-4% slower than
 * imma_kernel on SmolLM2 (docs/CUDA-KERNELS.md), so Q4_1 keeps imma_kernel. ---- */

#define IMMP_KB 4 /* quant blocks per stage */

template <int TYPE> struct immp_stage {
    static_assert(TYPE == MOQAE_TYPE_Q4_0 || TYPE == MOQAE_TYPE_Q8_0, "immp: Q4_0 and Q8_0");
    static constexpr int XLD = 32 * IMMP_KB + 16;                  /* activation bytes per token (imma_ld)     */
    static constexpr int WC  = plane<TYPE>::code;                  /* code bytes per weight block              */
    static constexpr int WLD = WC * IMMP_KB + 16;                  /* 20 or 36 words: rows g = 0..7 at word q
                                                                      of distinct banks                       */
    static constexpr int WS  = 2 * IMMP_KB;                        /* f16 scale bytes per row and stage        */
    uint8_t xs[IMMA_BT * XLD];
    float2  ds[IMMP_KB][IMMA_BT]; /* each activation block's (d, s): one 8-byte copy (s unused here; copying d
                                     alone took the Q4_0 kernel from 87 to 112 registers) */
    uint8_t ws[IMMA_BR * WLD];
    uint8_t sc[IMMA_BR * WS];
};

/* Issue the copies of the stage of blocks b0 .. b0 + IMMP_KB - 1 (those < nb). Rows and tokens past the
 * ends are not copied: their outputs are never stored. A 4-byte unit of two f16 scales may start at block
 * nb - 1 and end in the row's padding (rows are padded to 16 bytes, and 2 nb is not a multiple of 16 when
 * nb is odd); the blocks >= nb are skipped by the product. */
template <int TYPE>
static __device__ __forceinline__ void immp_issue(immp_stage<TYPE> & st, const uint8_t * __restrict__ w, size_t row_bytes,
                                                  int64_t nb, int64_t n_rows, const q8x * __restrict__ xq, int64_t n_tok,
                                                  int64_t r0, int64_t t0, int64_t b0) {
    using S          = immp_stage<TYPE>;
    const int tid    = threadIdx.x;
    const int nk     = (int) min((int64_t) IMMP_KB, nb - b0);
    constexpr int WP = S::WC / 16;                /* 16-byte parts per weight block */
    constexpr int SU = S::WS / 4;                 /* 4-byte units of 2 scales per row */
#pragma unroll
    for (int it = tid; it < IMMA_BT * IMMP_KB * 2; it += 128) {
        const int tok = it / (IMMP_KB * 2), kb = (it / 2) % IMMP_KB, hf = it % 2;
        if (t0 + tok < n_tok && kb < nk) {
            cp_async16(st.xs + tok * S::XLD + 32 * kb + 16 * hf, (const uint8_t *) (xq + (t0 + tok) * nb + b0 + kb) + 16 * hf);
        }
    }
#pragma unroll
    for (int it = tid; it < IMMA_BT * IMMP_KB; it += 128) {
        const int tok = it / IMMP_KB, kb = it % IMMP_KB;
        if (t0 + tok < n_tok && kb < nk) {
            cp_async8(&st.ds[kb][tok], &xq[(t0 + tok) * nb + b0 + kb].d);
        }
    }
#pragma unroll
    for (int it = tid; it < IMMA_BR * IMMP_KB * WP; it += 128) {
        const int row = it / (IMMP_KB * WP), kb = (it / WP) % IMMP_KB, part = it % WP;
        if (r0 + row < n_rows && kb < nk) {
            cp_async16(st.ws + row * S::WLD + S::WC * kb + 16 * part,
                       codes_of<TYPE>(w + (r0 + row) * row_bytes, b0 + kb) + 16 * part);
        }
    }
#pragma unroll
    for (int it = tid; it < IMMA_BR * SU; it += 128) {
        const int row = it / SU, u = it % SU;
        if (r0 + row < n_rows && 2 * u < nk) {
            cp_async4(st.sc + row * S::WS + 4 * u, scale_of<TYPE>(w + (r0 + row) * row_bytes, nb, b0) + 4 * u);
        }
    }
}

template <int TYPE>
static __global__ void __launch_bounds__(128)
immp_kernel(const uint8_t * __restrict__ w, size_t row_bytes, int64_t n_cols, int64_t n_rows, const q8x * __restrict__ xq,
            int64_t n_tok, float * __restrict__ y, int64_t ldy, int accumulate) {
    MOQAE_PDL_ENTER();
    using S = immp_stage<TYPE>;
    __shared__ __align__(16) S st[2];
    const int     tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane >> 2, q = lane & 3;
    const int64_t r0 = (int64_t) blockIdx.x * IMMA_BR, t0 = (int64_t) blockIdx.y * IMMA_BT;
    const int64_t nb = n_cols / 32;
    const int     wt = (warp / 2) * 32, wr = (warp % 2) * 32; /* this warp's 32 tokens x 32 rows */
    float         acc[2][4][4] = {};
    immp_issue<TYPE>(st[0], w, row_bytes, nb, n_rows, xq, n_tok, r0, t0, 0);
    cp_async_commit();
    int cur = 0;
    for (int64_t b0 = 0; b0 < nb; b0 += IMMP_KB, cur ^= 1) {
        cp_async_wait0();
        __syncthreads(); /* stage b0 is in st[cur] for every thread; st[cur ^ 1] is no longer read */
        if (b0 + IMMP_KB < nb) {
            immp_issue<TYPE>(st[cur ^ 1], w, row_bytes, nb, n_rows, xq, n_tok, r0, t0, b0 + IMMP_KB);
        }
        cp_async_commit();
        const S & s  = st[cur];
        const int nk = (int) min((int64_t) IMMP_KB, nb - b0);
#pragma unroll
        for (int kb = 0; kb < IMMP_KB; kb++) {
            if (kb >= nk) {
                break;
            }
            uint32_t bf[4][2];
            float    dw[4][2];
#pragma unroll
            for (int nt = 0; nt < 4; nt++) {
                const uint8_t * wb = s.ws + (wr + 8 * nt + g) * S::WLD + S::WC * kb + 4 * q;
                if constexpr (TYPE == MOQAE_TYPE_Q8_0) {
                    bf[nt][0] = *(const uint32_t *) wb, bf[nt][1] = *(const uint32_t *) (wb + 16);
                } else {
                    const uint32_t u = *(const uint32_t *) wb;
                    bf[nt][0]        = __vsub4(u & 0x0f0f0f0fu, 0x08080808u);
                    bf[nt][1]        = __vsub4((u >> 4) & 0x0f0f0f0fu, 0x08080808u);
                }
                const int rr = wr + 8 * nt + 2 * q;
                dw[nt][0]    = moqae_dev_f16_to_f32(*(const uint16_t *) (s.sc + rr * S::WS + 2 * kb));
                dw[nt][1]    = moqae_dev_f16_to_f32(*(const uint16_t *) (s.sc + (rr + 1) * S::WS + 2 * kb));
            }
#pragma unroll
            for (int mt = 0; mt < 2; mt++) {
                const uint8_t * xa = s.xs + (wt + 16 * mt + g) * S::XLD + 32 * kb + 4 * q;
                const uint32_t  a0 = *(const uint32_t *) xa, a1 = *(const uint32_t *) (xa + 8 * S::XLD);
                const uint32_t  a2 = *(const uint32_t *) (xa + 16), a3 = *(const uint32_t *) (xa + 8 * S::XLD + 16);
                const float     x0 = s.ds[kb][wt + 16 * mt + g].x, x1 = s.ds[kb][wt + 16 * mt + g + 8].x;
#pragma unroll
                for (int nt = 0; nt < 4; nt++) {
                    int c[4] = { 0, 0, 0, 0 };
                    mma_s8(c, a0, a1, a2, a3, bf[nt][0], bf[nt][1]);
                    float * ac = acc[mt][nt];
                    ac[0] = fmaf((float) c[0], __fmul_rn(dw[nt][0], x0), ac[0]);
                    ac[1] = fmaf((float) c[1], __fmul_rn(dw[nt][1], x0), ac[1]);
                    ac[2] = fmaf((float) c[2], __fmul_rn(dw[nt][0], x1), ac[2]);
                    ac[3] = fmaf((float) c[3], __fmul_rn(dw[nt][1], x1), ac[3]);
                }
            }
        }
    }
    cp_async_wait0(); /* nothing is in flight past the loop (the last stage issues no copies); kept for safety */
    imma_store(acc, y, ldy, n_tok, n_rows, t0, r0, wt, wr, g, q, accumulate);
}

/* ---- mat-mat for F16/F32 weights on f16 tensor cores: 64 tokens x 64 rows per block ------------- */

#define MMA_BT  64 /* tokens per tile */
#define MMA_BR  64 /* rows per tile   */
#define MMA_LDS 40 /* halves per smem row: 32 + 8 (16-byte multiple, staggers banks) */
#define MMA_LDC 68 /* floats per row of the output staging tile */

template <int TYPE>
static __global__ void __launch_bounds__(128)
mma_kernel(const uint8_t * __restrict__ w, size_t row_bytes, int64_t n_cols, int64_t n_rows,
           const float * __restrict__ x, int64_t n_tok, float * __restrict__ y, int64_t ldy, int accumulate) {
    MOQAE_PDL_ENTER();
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
        {
            const int row = tid / 2, half_ = tid % 2;
            float     v[16];
            if (r0 + row < n_rows) {
                deq16<TYPE>(w + (r0 + row) * row_bytes, nb, b, half_, v);
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
    MOQAE_PDL_ENTER();
    const int64_t t = blockIdx.y;
    const int64_t nh = n_cols / 16; /* half-blocks */
    const uint8_t * row = w + (int64_t) ids[t] * row_bytes;
    for (int64_t h = (int64_t) blockIdx.x * blockDim.x + threadIdx.x; h < nh; h += (int64_t) gridDim.x * blockDim.x) {
        float v[16];
        deq16<TYPE>(row, n_cols / 32, h / 2, (int) (h % 2), v);
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
typedef void (*mmvq_fn)(const uint8_t *, size_t, int64_t, int64_t, const q8x *, int, mm_out, int, int);
typedef void (*imma_fn)(const uint8_t *, size_t, int64_t, int64_t, const q8x *, int64_t, float *, int64_t, int);

struct type_ops {
    mmv_fn  mmv;     /* f32 activations (F32, F16 weights)               */
    mma_fn  mma;
    rows_fn rows;
    mmvq_fn mmvq1;   /* integer codes, one token; NULL for F32, F16     */
    mmvq_fn mmvq8;   /* integer codes, up to 8 tokens                   */
    imma_fn immp;    /* the default: stages copied ahead (Q4_0, Q8_0); Q4_1 imma_kernel<IMMA_KB> */
    imma_fn imma;    /* IMMA_KB blocks per stage (MOQAE_CUDA_IMMA=4, for comparison) */
    imma_fn imma1;   /* one block per stage (MOQAE_CUDA_IMMA=1: the earlier kernel's stages, for comparison) */
};

template <int TYPE> static constexpr imma_fn default_imma() {
    if constexpr (TYPE == MOQAE_TYPE_Q4_1) {
        return imma_kernel<TYPE, IMMA_KB>;
    } else {
        return immp_kernel<TYPE>;
    }
}

template <int TYPE> static constexpr type_ops make_ops() {
    if constexpr (TYPE == MOQAE_TYPE_Q4_0 || TYPE == MOQAE_TYPE_Q4_1 || TYPE == MOQAE_TYPE_Q8_0) {
        return type_ops{ nullptr, nullptr, get_rows_kernel<TYPE>, mmvq_kernel<TYPE, 1>, mmvq_kernel<TYPE, 8>,
                         default_imma<TYPE>(), imma_kernel<TYPE, IMMA_KB>, imma_kernel<TYPE, 1> };
    } else {
        return type_ops{ mmv_kernel<TYPE>, mma_kernel<TYPE>, get_rows_kernel<TYPE>, nullptr, nullptr, nullptr, nullptr, nullptr };
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

bool moqae_cuda_type_quantized(enum moqae_type type) {
    const type_ops * o = ops_of(type);
    return o && o->imma;
}

enum moqae_cuda_mm_kernel moqae_cuda_mm_pick(enum moqae_type type, int64_t n_cols, int64_t n_tok) {
    const type_ops * o = ops_of(type);
    if (!o || n_cols % 32 != 0 || n_tok < 1) {
        return MOQAE_CUDA_MM_NONE;
    }
    if (o->imma) {
        return n_tok <= MOQAE_CUDA_MMV_MAX_T ? MOQAE_CUDA_MM_MMVQ : MOQAE_CUDA_MM_IMMA;
    }
    return n_tok <= MOQAE_CUDA_MMV_MAX_T ? MOQAE_CUDA_MM_MMV : MOQAE_CUDA_MM_MMA;
}

size_t moqae_cuda_weight_row_bytes(enum moqae_type type, int64_t n_cols, size_t gguf_row_bytes) {
    return moqae_cuda_type_quantized(type) ? (gguf_row_bytes + 15) / 16 * 16 : gguf_row_bytes;
}

void moqae_cuda_repack_rows(enum moqae_type type, int64_t n_cols, int64_t n_rows, const uint8_t * src, size_t src_row_bytes,
                            uint8_t * dst) {
    const size_t  dst_row = moqae_cuda_weight_row_bytes(type, n_cols, src_row_bytes);
    const int64_t nb = n_cols / 32;
    if (!moqae_cuda_type_quantized(type)) {
        memcpy(dst, src, (size_t) n_rows * src_row_bytes);
        return;
    }
    /* GGUF blocks: Q4_0 f16 d + 16 code bytes; Q4_1 f16 d, f16 m + 16; Q8_0 f16 d + 32 */
    const size_t sb = type == MOQAE_TYPE_Q4_1 ? 4 : 2, cb = type == MOQAE_TYPE_Q8_0 ? 32 : 16, bb = sb + cb;
    for (int64_t r = 0; r < n_rows; r++) {
        const uint8_t * s = src + (size_t) r * src_row_bytes;
        uint8_t *       d = dst + (size_t) r * dst_row;
        for (int64_t b = 0; b < nb; b++) {
            memcpy(d + (size_t) b * cb, s + (size_t) b * bb + sb, cb);
            memcpy(d + (size_t) nb * cb + (size_t) b * sb, s + (size_t) b * bb, sb);
        }
        memset(d + (size_t) nb * bb, 0, dst_row - (size_t) nb * bb);
    }
}

size_t moqae_cuda_quant_bytes(int64_t n_tok, int64_t n_cols) {
    return (size_t) n_tok * (size_t) (n_cols / 32) * sizeof(q8x);
}

int moqae_cuda_quantize(const float * x, int64_t n_tok, int64_t n_cols, void * xq, cudaStream_t stream) {
    if (n_cols % 32 != 0) {
        return moqae_fail(MOQAE_ERR_UNSUPPORTED, "CUDA: activations of %lld columns (not a multiple of 32)", (long long) n_cols);
    }
    const int64_t nb = n_tok * (n_cols / 32);
    if (nb > 0) {
        (void) moqae_cuda_launch(quantize_kernel, (unsigned) ((nb + 3) / 4), 128, 0, stream, x, nb, (q8x *) xq);
        MOQAE_CUDA_LAUNCH_CHECK();
    }
    return MOQAE_OK;
}

int moqae_cuda_rms_norm_quant(const float * x, const float * w, float eps, int64_t n, int64_t n_rows, float * y, void * xq,
                              cudaStream_t stream) {
    if (n % 32 != 0) {
        return moqae_fail(MOQAE_ERR_UNSUPPORTED, "CUDA: activations of %lld columns (not a multiple of 32)", (long long) n);
    }
    if (n_rows > 0) {
        (void) moqae_cuda_launch(rms_norm_quant_kernel, (unsigned) n_rows, 1024, 0, stream, x, w, eps, n, y,
                (q8x *) xq);
        MOQAE_CUDA_LAUNCH_CHECK();
    }
    return MOQAE_OK;
}

int moqae_cuda_swiglu_quant(float * g, const float * u, int64_t n_tok, int64_t n, void * xq, cudaStream_t stream) {
    if (n % 32 != 0) {
        return moqae_fail(MOQAE_ERR_UNSUPPORTED, "CUDA: activations of %lld columns (not a multiple of 32)", (long long) n);
    }
    const int64_t nb = n_tok * (n / 32);
    if (nb > 0) {
        (void) moqae_cuda_launch(swiglu_quant_kernel, (unsigned) ((nb + 3) / 4), 128, 0, stream, g, u, nb, (q8x *) xq);
        MOQAE_CUDA_LAUNCH_CHECK();
    }
    return MOQAE_OK;
}

static void launch_mmvq(const type_ops * ops, const uint8_t * w, size_t row_bytes, int64_t n_cols, int64_t n_rows,
                        const void * xq, int64_t n_tok, const mm_out & o, int acc, cudaStream_t stream) {
    const int64_t  nb     = n_cols / 32;
    /* warps per row, 32 blocks each per pass: two for rows of >= 64 blocks (four for rows of >= 128, session 7's
     * choice, measured 5% slower on the 7B shape: docs/RESULTS.md, issue 7, session 11); MOQAE_CUDA_WPR=4 / =1
     * for comparison */
    static const int wmax = [] {
        const int v = atoi(moqae_cuda_switch("MOQAE_CUDA_WPR"));
        return v == 1 || v == 4 ? v : 2;
    }();
    const int      wpr    = nb >= 64 ? std::min(wmax, nb >= 128 ? 4 : 2) : 1;
    const int64_t  rpb    = (4 / wpr) * MMVQ_R;              /* rows per thread block                */
    const unsigned blocks = (unsigned) ((n_rows + rpb - 1) / rpb);
    (void) moqae_cuda_launch((n_tok == 1 ? ops->mmvq1 : ops->mmvq8), blocks, 128, 0, stream, w, row_bytes, n_cols,
            n_rows, (const q8x *) xq, (int) n_tok, o, acc, wpr);
}

int moqae_cuda_matmul_imma(const struct moqae_cuda_weight * w, const void * xq, int64_t n_tok, float * y, int64_t ldy,
                           bool accumulate, int variant, cudaStream_t stream) {
    const type_ops * ops = ops_of(w->type);
    if (!ops || !ops->immp || w->n_cols % 32 != 0 || n_tok < 1) {
        return moqae_fail(MOQAE_ERR_UNSUPPORTED, "CUDA: no int8 mat-mat for weight type %s with %lld columns",
                          moqae_type_name(w->type), (long long) w->n_cols);
    }
    const dim3    grid((unsigned) ((w->n_rows + IMMA_BR - 1) / IMMA_BR), (unsigned) ((n_tok + IMMA_BT - 1) / IMMA_BT));
    const imma_fn k = variant == 1 ? ops->imma1 : variant == 4 ? ops->imma : ops->immp;
    (void) moqae_cuda_launch(k, grid, 128, 0, stream, w->data, w->row_bytes, w->n_cols, w->n_rows, (const q8x *) xq,
            n_tok, y, ldy, accumulate ? 1 : 0);
    MOQAE_CUDA_LAUNCH_CHECK();
    return MOQAE_OK;
}

int moqae_cuda_matmul(const struct moqae_cuda_weight * w, const float * x, const void * xq, int64_t n_tok, float * y,
                      int64_t ldy, bool accumulate, cudaStream_t stream) {
    const type_ops * ops = ops_of(w->type);
    const int        acc = accumulate ? 1 : 0;
    switch (moqae_cuda_mm_pick(w->type, w->n_cols, n_tok)) {
        case MOQAE_CUDA_MM_MMV: {
            const unsigned blocks = (unsigned) ((w->n_rows + MMV_ROWS_PER_BLOCK - 1) / MMV_ROWS_PER_BLOCK);
            (void) moqae_cuda_launch(ops->mmv, blocks, 32 * MMV_ROWS_PER_BLOCK, 0, stream, w->data, w->row_bytes,
                    w->n_cols, w->n_rows, x, (int) n_tok, y, ldy, acc);
            break;
        }
        case MOQAE_CUDA_MM_MMVQ: {
            const mm_out o = { y, y, y, w->n_rows, w->n_rows, ldy, ldy, ldy };
            launch_mmvq(ops, w->data, w->row_bytes, w->n_cols, w->n_rows, xq, n_tok, o, acc, stream);
            break;
        }
        case MOQAE_CUDA_MM_IMMA: {
            /* MOQAE_CUDA_IMMA=1 / =4: the earlier kernel with one / IMMA_KB blocks per stage, no copies ahead */
            static const char sw = *moqae_cuda_switch("MOQAE_CUDA_IMMA");
            return moqae_cuda_matmul_imma(w, xq, n_tok, y, ldy, accumulate, sw == '1' ? 1 : sw == '4' ? 4 : 0, stream);
        }
        case MOQAE_CUDA_MM_MMA: {
            const dim3 grid((unsigned) ((w->n_rows + MMA_BR - 1) / MMA_BR), (unsigned) ((n_tok + MMA_BT - 1) / MMA_BT));
            (void) moqae_cuda_launch(ops->mma, grid, 128, 0, stream, w->data, w->row_bytes, w->n_cols, w->n_rows, x,
                    n_tok, y, ldy, acc);
            break;
        }
        default:
            return moqae_fail(MOQAE_ERR_UNSUPPORTED, "CUDA: no matrix product for weight type %s with %lld columns",
                              moqae_type_name(w->type), (long long) w->n_cols);
    }
    MOQAE_CUDA_LAUNCH_CHECK();
    return MOQAE_OK;
}

int moqae_cuda_matmul_seq(const struct moqae_cuda_weight * const * ws, float * const * ys, int n, const float * x,
                          const void * xq, int64_t n_tok, cudaStream_t stream) {
    bool one = n >= 1 && n <= 3 && moqae_cuda_mm_pick(ws[0]->type, ws[0]->n_cols, n_tok) == MOQAE_CUDA_MM_MMVQ;
    for (int i = 1; i < n && one; i++) { /* rows stored one after the other, in the same layout */
        const struct moqae_cuda_weight *a = ws[i - 1], *b = ws[i];
        one = b->type == a->type && b->n_cols == a->n_cols && b->row_bytes == a->row_bytes &&
              b->data == a->data + (size_t) a->n_rows * a->row_bytes;
    }
    if (!one) {
        for (int i = 0; i < n; i++) {
            MOQAE_TRY(moqae_cuda_matmul(ws[i], x, xq, n_tok, ys[i], ws[i]->n_rows, false, stream));
        }
        return MOQAE_OK;
    }
    const int64_t r0 = ws[0]->n_rows, r1 = n > 1 ? ws[1]->n_rows : 0, r2 = n > 2 ? ws[2]->n_rows : 0;
    const mm_out  o  = { ys[0], n > 1 ? ys[1] : ys[0], n > 2 ? ys[2] : ys[0], r0, r0 + r1, r0, r1, r2 };
    launch_mmvq(ops_of(ws[0]->type), ws[0]->data, ws[0]->row_bytes, ws[0]->n_cols, r0 + r1 + r2, xq, n_tok, o, 0, stream);
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
    (void) moqae_cuda_launch(ops->rows, dim3(blocks, (unsigned) n_tok), 128, 0, stream, w->data, w->row_bytes,
            w->n_cols, ids, x);
    MOQAE_CUDA_LAUNCH_CHECK();
    return MOQAE_OK;
}
