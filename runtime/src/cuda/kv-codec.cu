/*
 * cuda/kv-codec.cu — see kv-codec.cuh. The encoder follows kv-codec.c's encode_q step by step; one
 * block of 128 threads encodes one (chunk, KV head) of one layer: group ranges in parallel, the
 * record-wide minima and maxima by exact reductions (order does not matter for min/max), then zero
 * codes, scale codes (binary search as on the CPU) and the packed codes, one output byte per thread.
 */
#include "kv-codec.cuh"

#define ENC_THREADS    128
#define ENC_MAX_CHUNK  32
#define ENC_MAX_D      256
#define ENC_MAX_GROUPS 512 /* C * D / 16 with C = 32, D = 256 */

/* kv-codec.c's FRAC[f] = f32(2^(-f/16)), bit for bit. */
static __constant__ float k_frac[16] = {
    0x1.000000p+0f, 0x1.ea4afap-1f, 0x1.d5818ep-1f, 0x1.c199bep-1f, 0x1.ae89fap-1f, 0x1.9c4918p-1f,
    0x1.8ace54p-1f, 0x1.7a1148p-1f, 0x1.6a09e6p-1f, 0x1.5ab07ep-1f, 0x1.4bfdaep-1f, 0x1.3dea64p-1f,
    0x1.306fe0p-1f, 0x1.2387a6p-1f, 0x1.172b84p-1f, 0x1.0b5586p-1f,
};

static __device__ __forceinline__ float scale_of(float sb, unsigned a) {
    return ldexpf(__fmul_rn(sb, k_frac[a & 15u]), -(int) (a >> 4)); /* times 2^-e: exact (no subnormals, kv-codec.c) */
}

static __device__ __forceinline__ float zero_of(float zl, float zs, unsigned z) {
    return __fadd_rn(zl, __fmul_rn(zs, (float) z));
}

static __device__ uint16_t f16_down(float x) {
    uint16_t h = moqae_dev_f32_to_f16(x);
    if (moqae_dev_f16_to_f32(h) > x) {
        h = h == 0x0000u ? 0x8001u : (h & 0x8000u) ? (uint16_t) (h + 1) : (uint16_t) (h - 1);
    }
    return h;
}

static __device__ uint16_t f16_up(float x) {
    uint16_t h = moqae_dev_f32_to_f16(x);
    if (moqae_dev_f16_to_f32(h) < x) {
        h = h == 0x8000u ? 0x0001u : (h & 0x8000u) ? (uint16_t) (h - 1) : (uint16_t) (h + 1);
    }
    return h;
}

/* ---- store ------------------------------------------------------------------------------------- */

static __global__ void store_kernel(uint16_t * __restrict__ sk, uint16_t * __restrict__ sv, const float * __restrict__ k,
                                    const float * __restrict__ v, int64_t n_tok, int n_head_kv, int D,
                                    long long stage_rows, const struct moqae_cuda_dyn * __restrict__ dyn) {
    const int64_t u = (int64_t) blockIdx.x * blockDim.x + threadIdx.x;
    if (u >= n_tok * n_head_kv * D) {
        return;
    }
    const int64_t t = u / ((int64_t) n_head_kv * D);
    const int     h = (int) (u / D % n_head_kv), d = (int) (u % D);
    const int64_t row = (dyn->n_past + t) % stage_rows;
    const int64_t dst = ((int64_t) h * stage_rows + row) * D + d;
    sk[dst]           = moqae_dev_f32_to_f16(k[u]);
    sv[dst]           = moqae_dev_f32_to_f16(v[u]);
}

int moqae_cuda_kv_store(const struct moqae_cuda_ring_geom * g, uint16_t * stage_k, uint16_t * stage_v,
                        const float * k, const float * v, int64_t n_tok, const struct moqae_cuda_dyn * dyn,
                        cudaStream_t stream) {
    const int64_t total = n_tok * g->n_head_kv * g->head_dim;
    store_kernel<<<(unsigned) ((total + 255) / 256), 256, 0, stream>>>(stage_k, stage_v, k, v, n_tok, g->n_head_kv,
                                                                       g->head_dim, g->stage_rows, dyn);
    MOQAE_CUDA_LAUNCH_CHECK();
    return MOQAE_OK;
}

/* ---- encode ------------------------------------------------------------------------------------- */

struct enc_smem {
    float   x[ENC_MAX_CHUNK * ENC_MAX_D]; /* [C][D] the chunk's values of this head */
    float   lo[ENC_MAX_GROUPS], hi[ENC_MAX_GROUPS], r[ENC_MAX_GROUPS], need[ENC_MAX_GROUPS];
    uint8_t zc[ENC_MAX_GROUPS], sc[ENC_MAX_GROUPS];
    float   red[2][32];
    float   zl, zs, sb;
};

/* Element e of group i: keys (is_k) group = channel i, element = token e; values group i = token
 * i / (D/G), columns (i % (D/G)) * G + e. */
static __device__ __forceinline__ float gx(const enc_smem & s, bool is_k, int D, int G, int i, int e) {
    return is_k ? s.x[e * D + i] : s.x[(i / (D / G)) * D + (i % (D / G)) * G + e];
}

/* Block-wide min and max (exact in any order). */
static __device__ void block_minmax(enc_smem & s, float a, float b, float * out_min, float * out_max) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        a = fminf(a, __shfl_xor_sync(0xffffffffu, a, o));
        b = fmaxf(b, __shfl_xor_sync(0xffffffffu, b, o));
    }
    if (threadIdx.x % 32 == 0) {
        s.red[0][threadIdx.x / 32] = a;
        s.red[1][threadIdx.x / 32] = b;
    }
    __syncthreads();
    a = s.red[0][0], b = s.red[1][0];
    for (int w = 1; w < ENC_THREADS / 32; w++) {
        a = fminf(a, s.red[0][w]);
        b = fmaxf(b, s.red[1][w]);
    }
    *out_min = a, *out_max = b;
    __syncthreads();
}

static __device__ void encode_q(enc_smem & s, bool is_k, int C, int D, int G, int bits, uint8_t * __restrict__ rec) {
    const int   tid = threadIdx.x;
    const int   n = is_k ? D : C * (D / G), m = is_k ? C : G, share = is_k ? 1 : D / G;
    const int   codes_bytes = n * m * bits / 8;
    const float qmax = (float) ((1 << bits) - 1);
    uint8_t *   zc = rec + codes_bytes;
    uint8_t *   sc = zc + n;
    uint8_t *   bp = sc + n / share;

    float lmin = INFINITY, lmax = -INFINITY;
    for (int i = tid; i < n; i += ENC_THREADS) {
        float a = gx(s, is_k, D, G, i, 0), b = a;
        for (int e = 1; e < m; e++) {
            const float v = gx(s, is_k, D, G, i, e);
            a = v < a ? v : a;
            b = v > b ? v : b;
        }
        s.lo[i] = a, s.hi[i] = b;
        lmin = fminf(lmin, a), lmax = fmaxf(lmax, a);
    }
    float lo_min, lo_max;
    block_minmax(s, lmin, lmax, &lo_min, &lo_max);
    const uint16_t zlo16   = f16_down(lo_min);
    const float    zl      = moqae_dev_f16_to_f32(zlo16);
    const uint16_t zstep16 = moqae_dev_f32_to_f16(__fdiv_rn(__fsub_rn(lo_max, zl), 255.0f));
    const float    zs      = moqae_dev_f16_to_f32(zstep16);

    float rmax = 0.0f;
    for (int i = tid; i < n; i += ENC_THREADS) {
        unsigned z = 0;
        if (zs > 0.0f) {
            const float t = floorf(__fdiv_rn(__fsub_rn(s.lo[i], zl), zs));
            z             = t > 0.0f ? (t < 255.0f ? (unsigned) t : 255u) : 0u;
        }
        s.zc[i]       = (uint8_t) z;
        zc[i]         = (uint8_t) z;
        const float r = __fdiv_rn(__fsub_rn(s.hi[i], zero_of(zl, zs, z)), qmax);
        s.r[i]        = r;
        rmax          = r > rmax ? r : rmax;
    }
    float dummy, need_max;
    block_minmax(s, 0.0f, rmax, &dummy, &need_max); /* also a barrier: s.r and s.zc are complete */
    need_max                = need_max > 0.0f ? need_max : 0.0f;
    const uint16_t sbase16  = f16_up(need_max);
    const float    sb       = moqae_dev_f16_to_f32(sbase16);
    for (int ri = tid; ri < n / share; ri += ENC_THREADS) {
        float need = s.r[ri * share];
        for (int j = 1; j < share; j++) {
            need = s.r[ri * share + j] > need ? s.r[ri * share + j] : need;
        }
        unsigned code = 0;
        if (scale_of(sb, 0) >= need) {
            unsigned a = 0, b = 256;
            while (b - a > 1) {
                const unsigned mid = (a + b) / 2;
                if (scale_of(sb, mid) >= need) {
                    a = mid;
                } else {
                    b = mid;
                }
            }
            code = a;
        }
        s.sc[ri] = (uint8_t) code;
        sc[ri]   = (uint8_t) code;
    }
    if (tid == 0) {
        bp[0] = (uint8_t) (zlo16 & 0xffu), bp[1] = (uint8_t) (zlo16 >> 8);
        bp[2] = (uint8_t) (zstep16 & 0xffu), bp[3] = (uint8_t) (zstep16 >> 8);
        bp[4] = (uint8_t) (sbase16 & 0xffu), bp[5] = (uint8_t) (sbase16 >> 8);
    }
    __syncthreads();
    /* codes: byte B of the code area packs elements 16*kk + r + 2b*j (j < 8/b) of the linear
     * element order (group-major), kk = B / (2b), r = B % (2b), at bits b*j */
    const int per_byte = 8 / bits, bpb = 2 * bits;
    for (int B = tid; B < codes_bytes; B += ENC_THREADS) {
        const int kk = B / bpb, rr = B % bpb;
        unsigned  byte = 0;
        for (int j = 0; j < per_byte; j++) {
            const int   L = 16 * kk + rr + bpb * j, i = L / m, e = L % m;
            const float scale = scale_of(sb, s.sc[i / share]);
            const float zero  = zero_of(zl, zs, s.zc[i]);
            unsigned    q     = 0;
            if (scale > 0.0f) {
                const float t = floorf(__fadd_rn(__fdiv_rn(__fsub_rn(gx(s, is_k, D, G, i, e), zero), scale), 0.5f));
                q             = t > 0.0f ? (t < qmax ? (unsigned) t : (unsigned) qmax) : 0u;
            }
            byte |= q << (bits * j);
        }
        rec[B] = (uint8_t) byte;
    }
    __syncthreads();
}

static __global__ void __launch_bounds__(ENC_THREADS)
encode_kernel(const struct moqae_cuda_ring_geom g, const uint16_t * __restrict__ stage_k,
              const uint16_t * __restrict__ stage_v, uint8_t * __restrict__ arena,
              const struct moqae_cuda_chunk * __restrict__ table, const struct moqae_cuda_dyn * __restrict__ dyn) {
    extern __shared__ __align__(16) uint8_t smem_raw[];
    enc_smem & s = *(enc_smem *) smem_raw;
    const int  ci = blockIdx.x, h = blockIdx.y;
    if (ci >= dyn->n_enc) {
        return;
    }
    const moqae_cuda_chunk ch = table[dyn->enc_first + ci];
    const int              C = g.chunk, D = g.head_dim, G = g.v_group, codec = ch.codec;
    uint8_t * rk = arena + ch.off + (long long) h * (g.k_pad[codec] + g.v_pad[codec]);
    uint8_t * rv = rk + g.k_pad[codec];
    for (int pass = 0; pass < 2; pass++) {
        const uint16_t * st = (pass == 0 ? stage_k : stage_v) + (long long) h * g.stage_rows * D;
        for (int e = threadIdx.x; e < C * D; e += ENC_THREADS) {
            const int j = e / D, d = e % D;
            s.x[e]      = moqae_dev_f16_to_f32(st[((ch.pos + j) % g.stage_rows) * D + d]);
        }
        __syncthreads();
        uint8_t * rec = pass == 0 ? rk : rv;
        if (codec == 0) { /* FP16: keys transposed [D][C], values as is [C][D]; the staged f16 bits */
            for (int e = threadIdx.x; e < C * D; e += ENC_THREADS) {
                const int      j = e / D, d = e % D;
                const uint16_t hbits = st[((ch.pos + j) % g.stage_rows) * D + d];
                const int      o = pass == 0 ? 2 * (d * C + j) : 2 * e;
                rec[o] = (uint8_t) (hbits & 0xffu), rec[o + 1] = (uint8_t) (hbits >> 8);
            }
            __syncthreads();
        } else {
            encode_q(s, pass == 0, C, D, G, codec == 1 ? 8 : codec == 2 ? 4 : 2, rec);
        }
    }
}

int moqae_cuda_kv_encode(const struct moqae_cuda_ring_geom * g, const uint16_t * stage_k, const uint16_t * stage_v,
                         uint8_t * arena, const struct moqae_cuda_chunk * table, int max_enc,
                         const struct moqae_cuda_dyn * dyn, cudaStream_t stream) {
    if (max_enc <= 0) {
        return MOQAE_OK;
    }
    if (g->chunk > ENC_MAX_CHUNK || g->head_dim > ENC_MAX_D) {
        return moqae_fail(MOQAE_ERR_UNSUPPORTED, "CUDA KV encoder: chunk %d / head_dim %d above %d / %d", g->chunk,
                          g->head_dim, ENC_MAX_CHUNK, ENC_MAX_D);
    }
    static bool attr_set = false; /* same value for every caller: a race only repeats the call */
    if (!attr_set) {
        MOQAE_CUDA_CHECK(cudaFuncSetAttribute(encode_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                              (int) sizeof(enc_smem)));
        attr_set = true;
    }
    encode_kernel<<<dim3((unsigned) max_enc, (unsigned) g->n_head_kv), ENC_THREADS, sizeof(enc_smem), stream>>>(
        *g, stage_k, stage_v, arena, table, dyn);
    MOQAE_CUDA_LAUNCH_CHECK();
    return MOQAE_OK;
}
