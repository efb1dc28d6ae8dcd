/*
 * cuda/attention.cu — see attention.cuh. Per key tile (32 keys: one ring chunk, or 32 positions of
 * the staging window) a block: decodes K and V into shared memory as f16 (quantized codes:
 * scale * code + zero in f32 as kv-codec.c decodes, then rounded to f16 for the tensor cores),
 * S = Q K^T (WMMA), masks by the attention rule, updates the running max / sum per row, rescales its
 * output rows and adds P V (WMMA). Reference: kv-ring.c moqae_kv_cache_attend (f32 and double).
 */
#include "attention.cuh"

#include <mma.h>

#define ATT_THREADS 128
#define ATT_TILE    32 /* keys per tile = the chunk size C */

static __constant__ float a_frac[16] = {
    0x1.000000p+0f, 0x1.ea4afap-1f, 0x1.d5818ep-1f, 0x1.c199bep-1f, 0x1.ae89fap-1f, 0x1.9c4918p-1f,
    0x1.8ace54p-1f, 0x1.7a1148p-1f, 0x1.6a09e6p-1f, 0x1.5ab07ep-1f, 0x1.4bfdaep-1f, 0x1.3dea64p-1f,
    0x1.306fe0p-1f, 0x1.2387a6p-1f, 0x1.172b84p-1f, 0x1.0b5586p-1f,
};

struct bases {
    float zl, zs, sb;
};

static __device__ __forceinline__ bases read_bases(const uint8_t * p) {
    bases b;
    b.zl = moqae_dev_f16_to_f32((uint16_t) (p[0] | (p[1] << 8)));
    b.zs = moqae_dev_f16_to_f32((uint16_t) (p[2] | (p[3] << 8)));
    b.sb = moqae_dev_f16_to_f32((uint16_t) (p[4] | (p[5] << 8)));
    return b;
}

static __device__ __forceinline__ float scale_of(float sb, unsigned a) {
    return ldexpf(__fmul_rn(sb, a_frac[a & 15u]), -(int) (a >> 4));
}

/* The 2b bytes of one 16-code block as words (b = 2: 1 word, 4: 2, 8: 4), 2b-byte aligned. */
template <int BITS> static __device__ __forceinline__ void load_block(const uint8_t * p, uint32_t * w) {
    if constexpr (BITS == 2) {
        w[0] = *(const uint32_t *) p;
    } else if constexpr (BITS == 4) {
        const uint2 v = *(const uint2 *) p;
        w[0] = v.x, w[1] = v.y;
    } else {
        const uint4 v = *(const uint4 *) p;
        w[0] = v.x, w[1] = v.y, w[2] = v.z, w[3] = v.w;
    }
}

/* Code e (< 16) of a block: byte e % 2b, bits b * (e / 2b) (kv-codec.h). */
template <int BITS> static __device__ __forceinline__ unsigned block_code(const uint32_t * w, int e) {
    const int byte = e % (2 * BITS), shift = BITS * (e / (2 * BITS));
    return ((w[byte / 4] >> (8 * (byte % 4))) >> shift) & ((1u << BITS) - 1u);
}

/* Keys of a quantized record -> ks[j][d] (ld halves per row). */
template <int BITS, int D>
static __device__ void decode_k_q(const uint8_t * __restrict__ rec, half * ks, int ld) {
    constexpr int   C = ATT_TILE, row_bytes = C * BITS / 8, codes = D * row_bytes;
    const uint8_t * zc = rec + codes, *sc = zc + D;
    const bases     b  = read_bases(sc + D);
    for (int idx = threadIdx.x; idx < D * (C / 16); idx += ATT_THREADS) {
        const int d = idx % D, kb = idx / D;
        uint32_t  w[4];
        load_block<BITS>(rec + d * row_bytes + kb * 2 * BITS, w);
        const float scale = scale_of(b.sb, sc[d]);
        const float zero  = __fadd_rn(b.zl, __fmul_rn(b.zs, (float) zc[d]));
#pragma unroll
        for (int e = 0; e < 16; e++) {
            ks[(kb * 16 + e) * ld + d] = __float2half(__fadd_rn(__fmul_rn(scale, (float) block_code<BITS>(w, e)), zero));
        }
    }
}

/* Values of a quantized record -> vs[j][d]. Groups of G along d; one scale code per token. */
template <int BITS, int D>
static __device__ void decode_v_q(const uint8_t * __restrict__ rec, int G, half * vs, int ld) {
    constexpr int   C = ATT_TILE, row_bytes = D * BITS / 8, codes = C * row_bytes;
    const int       n_groups = C * (D / G);
    const uint8_t * zc = rec + codes, *sc = zc + n_groups;
    const bases     b  = read_bases(sc + C);
    for (int idx = threadIdx.x; idx < C * (D / 16); idx += ATT_THREADS) {
        const int j = idx / (D / 16), kb = idx % (D / 16);
        uint32_t  w[4];
        load_block<BITS>(rec + j * row_bytes + kb * 2 * BITS, w);
        const float scale = scale_of(b.sb, sc[j]);
        const float zero  = __fadd_rn(b.zl, __fmul_rn(b.zs, (float) zc[j * (D / G) + kb * 16 / G]));
#pragma unroll
        for (int e = 0; e < 16; e++) {
            vs[j * ld + kb * 16 + e] = __float2half(__fadd_rn(__fmul_rn(scale, (float) block_code<BITS>(w, e)), zero));
        }
    }
}

/* Rows of f16 [32][D] from `src` (row j at src + row_of(j) * D), zero for rows >= n_valid. */
template <int D>
static __device__ void copy_rows_f16(const uint16_t * __restrict__ src, long long pos0, long long stage_rows,
                                     int n_valid, half * dst, int ld) {
    for (int idx = threadIdx.x; idx < ATT_TILE * (D / 8); idx += ATT_THREADS) {
        const int j = idx / (D / 8), c = idx % (D / 8);
        uint4     v = make_uint4(0, 0, 0, 0);
        if (j < n_valid) {
            v = *(const uint4 *) (src + ((pos0 + j) % stage_rows) * D + c * 8);
        }
        *(uint4 *) (dst + j * ld + c * 8) = v;
    }
}

template <int D>
static __device__ void decode_chunk(const struct moqae_cuda_ring_geom & g, const uint8_t * rk, int codec, half * ks,
                                    half * vs, int ld) {
    const uint8_t * rv = rk + g.k_pad[codec];
    switch (codec) {
        case 0: {
            /* keys transposed f16 [D][C]: pairs of tokens per 4-byte word */
            for (int idx = threadIdx.x; idx < D * (ATT_TILE / 2); idx += ATT_THREADS) {
                const int      d = idx % D, jj = idx / D;
                const uint32_t v = *(const uint32_t *) (rk + 2 * (d * ATT_TILE + 2 * jj));
                ks[(2 * jj) * ld + d]     = __ushort_as_half((unsigned short) (v & 0xffffu));
                ks[(2 * jj + 1) * ld + d] = __ushort_as_half((unsigned short) (v >> 16));
            }
            copy_rows_f16<D>((const uint16_t *) rv, 0, 1LL << 40, ATT_TILE, vs, ld);
            break;
        }
        case 1: decode_k_q<8, D>(rk, ks, ld); decode_v_q<8, D>(rv, g.v_group, vs, ld); break;
        case 2: decode_k_q<4, D>(rk, ks, ld); decode_v_q<4, D>(rv, g.v_group, vs, ld); break;
        default: decode_k_q<2, D>(rk, ks, ld); decode_v_q<2, D>(rv, g.v_group, vs, ld); break;
    }
}

/* Shared memory of one block (offsets in bytes, each 128-aligned). */
template <int D, int ROWS> struct att_layout {
    static constexpr int LDH = D + 8, LDS = ATT_TILE + 4, LDP = ATT_TILE + 8, LDO = D + 4;
    static constexpr int q   = 0;
    static constexpr int ql  = q + ((ROWS * LDH * 2 + 127) / 128) * 128; /* Q - f16(Q), also f16 */
    static constexpr int k   = ql + ((ROWS * LDH * 2 + 127) / 128) * 128;
    static constexpr int v   = k + ((ATT_TILE * LDH * 2 + 127) / 128) * 128;
    static constexpr int s   = v + ((ATT_TILE * LDH * 2 + 127) / 128) * 128;
    static constexpr int p   = s + ((ROWS * LDS * 4 + 127) / 128) * 128;
    static constexpr int o   = p + ((ROWS * LDP * 2 + 127) / 128) * 128;
    static constexpr int ml  = o + ((ROWS * LDO * 4 + 127) / 128) * 128;
    static constexpr int bytes = ml + 3 * ROWS * 4;
};

template <int D, int ROWS>
static __global__ void __launch_bounds__(ATT_THREADS)
attn_kernel(const struct moqae_cuda_ring_geom g, const struct moqae_cuda_attn_args a, int tpb) {
    using namespace nvcuda;
    using L = att_layout<D, ROWS>;
    extern __shared__ __align__(128) uint8_t sm[];
    half *  qs = (half *) (sm + L::q);
    half *  qsl = (half *) (sm + L::ql);
    half *  ks = (half *) (sm + L::k);
    half *  vs = (half *) (sm + L::v);
    float * ss = (float *) (sm + L::s);
    half *  ps = (half *) (sm + L::p);
    float * os = (float *) (sm + L::o);
    float * mrow = (float *) (sm + L::ml), *lrow = mrow + ROWS, *crow = lrow + ROWS;

    const int       tid = threadIdx.x, warp = tid / 32;
    const int       hk = blockIdx.x, qt = blockIdx.y, split = blockIdx.z;
    const int       group = a.n_head / g.n_head_kv, C = ATT_TILE;
    const long long n_past = a.dyn->n_past;
    const int       t_first = qt * tpb, t_last = min(a.n_tok, t_first + tpb) - 1;
    const long long p_last = n_past + t_last, own_first = (n_past + t_first) / C * C, own_last = p_last / C * C;

    /* ring chunks visible to some row: pos < own_last (the table is in position order) */
    int lo = 0, hi = a.dyn->n_chunks;
    while (lo < hi) {
        const int mid = (lo + hi) / 2;
        if (a.table[mid].pos < own_last) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    const int n_vis = lo, n_st = (int) ((p_last - own_first) / C) + 1, total = n_vis + n_st;
    const int per = (total + a.n_split - 1) / a.n_split;
    const int s0 = min(total, split * per), s1 = min(total, s0 + per);

    for (int e = tid; e < ROWS * D; e += ATT_THREADS) {
        const int r = e / D, d = e % D, t = t_first + r / group;
        float     v = 0.0f;
        if (r < tpb * group && t <= t_last) {
            v = a.q[((long long) t * a.n_head + hk * group + r % group) * D + d];
        }
        /* Q as a sum of two f16 (hi + lo): the scores keep ~22 bits of Q, as the CPU's f32 dot products
         * (one f16 Q moved SmolLM2's large attention logits by up to ~0.1) */
        const half hi      = __float2half(v);
        qs[r * L::LDH + d]  = hi;
        qsl[r * L::LDH + d] = __float2half(v - __half2float(hi));
        os[r * L::LDO + d]  = 0.0f;
    }
    if (tid < ROWS) {
        mrow[tid] = -INFINITY;
        lrow[tid] = 0.0f;
    }
    for (int it = s0; it < s1; it++) {
        const bool ring = it < n_vis;
        long long  tile_pos;
        __syncthreads(); /* the previous tile's ks/vs/ps are consumed */
        if (ring) {
            const moqae_cuda_chunk ch = a.table[it];
            tile_pos                  = ch.pos;
            decode_chunk<D>(g, a.arena + ch.off + (long long) hk * (g.k_pad[ch.codec] + g.v_pad[ch.codec]), ch.codec,
                            ks, vs, L::LDH);
        } else {
            tile_pos         = own_first + (long long) (it - n_vis) * C;
            const int nvalid = (int) min((long long) C, p_last - tile_pos + 1);
            copy_rows_f16<D>(a.stage_k + (long long) hk * g.stage_rows * D, tile_pos, g.stage_rows, nvalid, ks, L::LDH);
            copy_rows_f16<D>(a.stage_v + (long long) hk * g.stage_rows * D, tile_pos, g.stage_rows, nvalid, vs, L::LDH);
        }
        __syncthreads();
        /* S = Q K^T: (ROWS/16) x 2 fragments over the warps */
        for (int f = warp; f < (ROWS / 16) * 2; f += ATT_THREADS / 32) {
            const int rt = f / 2, ct = f % 2;
            wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
            wmma::fill_fragment(acc, 0.0f);
#pragma unroll
            for (int kk = 0; kk < D; kk += 16) {
                wmma::fragment<wmma::matrix_a, 16, 16, 16, half, wmma::row_major> fa;
                wmma::fragment<wmma::matrix_b, 16, 16, 16, half, wmma::col_major> fb;
                wmma::load_matrix_sync(fa, qs + rt * 16 * L::LDH + kk, L::LDH);
                wmma::load_matrix_sync(fb, ks + ct * 16 * L::LDH + kk, L::LDH);
                wmma::mma_sync(acc, fa, fb, acc);
                wmma::load_matrix_sync(fa, qsl + rt * 16 * L::LDH + kk, L::LDH);
                wmma::mma_sync(acc, fa, fb, acc);
            }
            wmma::store_matrix_sync(ss + rt * 16 * L::LDS + ct * 16, acc, L::LDS, wmma::mem_row_major);
        }
        __syncthreads();
        /* online softmax, one thread per row */
        if (tid < ROWS) {
            const int       r = tid, t = t_first + r / group;
            const bool      row_ok = r < tpb * group && t <= t_last;
            const long long p = n_past + t, own = p / C * C;
            float           sv[ATT_TILE];
            float           mx = mrow[r];
#pragma unroll
            for (int j = 0; j < ATT_TILE; j++) {
                const long long kp = tile_pos + j;
                const bool      ok = row_ok && (ring ? tile_pos < own : (kp >= own && kp <= p));
                sv[j]              = ok ? ss[r * L::LDS + j] * a.scale : -INFINITY;
                mx                 = fmaxf(mx, sv[j]);
            }
            float corr = 1.0f, sum = 0.0f;
            if (mx != -INFINITY) {
                corr = expf(mrow[r] - mx); /* exp(-inf) = 0 for the first tile */
#pragma unroll
                for (int j = 0; j < ATT_TILE; j++) {
                    const float pj = sv[j] == -INFINITY ? 0.0f : expf(sv[j] - mx);
                    sum += pj;
                    ps[r * L::LDP + j] = __float2half(pj);
                }
                mrow[r] = mx;
            } else {
#pragma unroll
                for (int j = 0; j < ATT_TILE; j++) {
                    ps[r * L::LDP + j] = __float2half(0.0f);
                }
            }
            lrow[r] = lrow[r] * corr + sum;
            crow[r] = corr;
        }
        __syncthreads();
        for (int e = tid; e < ROWS * D; e += ATT_THREADS) {
            os[(e / D) * L::LDO + e % D] *= crow[e / D];
        }
        __syncthreads();
        /* O += P V: (ROWS/16) x (D/16) fragments */
        for (int f = warp; f < (ROWS / 16) * (D / 16); f += ATT_THREADS / 32) {
            const int rt = f / (D / 16), ct = f % (D / 16);
            wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
            wmma::load_matrix_sync(acc, os + rt * 16 * L::LDO + ct * 16, L::LDO, wmma::mem_row_major);
#pragma unroll
            for (int kk = 0; kk < ATT_TILE; kk += 16) {
                wmma::fragment<wmma::matrix_a, 16, 16, 16, half, wmma::row_major> fa;
                wmma::fragment<wmma::matrix_b, 16, 16, 16, half, wmma::row_major> fb;
                wmma::load_matrix_sync(fa, ps + rt * 16 * L::LDP + kk, L::LDP);
                wmma::load_matrix_sync(fb, vs + kk * L::LDH + ct * 16, L::LDH);
                wmma::mma_sync(acc, fa, fb, acc);
            }
            wmma::store_matrix_sync(os + rt * 16 * L::LDO + ct * 16, acc, L::LDO, wmma::mem_row_major);
        }
    }
    __syncthreads();
    /* write: normalized output (one split) or the split's partial (m, l, unnormalized O) */
    const int n_qt = gridDim.y;
    for (int e = tid; e < ROWS * D; e += ATT_THREADS) {
        const int r = e / D, d = e % D, t = t_first + r / group;
        if (r >= tpb * group || t > t_last) {
            continue;
        }
        if (a.n_split == 1) {
            a.out[((long long) t * a.n_head + hk * group + r % group) * D + d] = os[r * L::LDO + d] / lrow[r];
        } else {
            const long long row = (((long long) split * g.n_head_kv + hk) * n_qt + qt) * ROWS + r;
            a.part[row * (D + 2) + d] = os[r * L::LDO + d];
            if (d == 0) {
                a.part[row * (D + 2) + D]     = mrow[r];
                a.part[row * (D + 2) + D + 1] = lrow[r];
            }
        }
    }
}

/* ================================================================================================
 * Version 2, decode (ROWS = 16): codes go to the tensor cores as exact f16 integers and the scales
 * and zeros are factored out of the products (K[j][d] = ks_d * code + kz_d, so
 * S = (Q o ks) code^T + Q . kz; V[j][d] = vs_j * code + vz_jg, so O += (P o vs) code + P vz):
 * a nibble pair becomes a half2 with one byte permute and one subtract (1024 + n is exact in f16),
 * instead of seven instructions per element. Keys are kept channel-major (K^T, as the records
 * store them), so an FP16 key record is a straight copy. Softmax runs 8 threads per row.
 * ================================================================================================ */

#define V2_ROWS 16

/* 4 codes (bytes b0..b3 of t, each < 256) -> two half2 (b0, b1), (b2, b3) holding 1024 + code. */
static __device__ __forceinline__ void bytes_to_h2(uint32_t t, uint32_t & lo, uint32_t & hi) {
    lo = __byte_perm(t, 0x64646464u, 0x4140);
    hi = __byte_perm(t, 0x64646464u, 0x4342);
}

static __device__ __forceinline__ uint32_t h2_minus_1024(uint32_t x) {
    half2 h = *(half2 *) &x;
    h       = __hsub2(h, __halves2half2(__ushort_as_half(0x6400), __ushort_as_half(0x6400)));
    return *(uint32_t *) &h;
}

/* The 16 codes of a block (2b bytes at p) as 16 f16 integers in element order: out[0..7] = elements
 * 0..15 packed two per word. */
template <int BITS> static __device__ __forceinline__ void block_to_h(const uint8_t * p, uint32_t * out) {
    uint32_t w[4];
    load_block<BITS>(p, w);
    uint32_t t[4]; /* element bytes in order: t[k] holds elements 4k .. 4k+3 */
    if constexpr (BITS == 8) {
        t[0] = w[0], t[1] = w[1], t[2] = w[2], t[3] = w[3];
    } else if constexpr (BITS == 4) { /* byte i = e_i | e_{i+8} << 4 */
        t[0] = w[0] & 0x0f0f0f0fu, t[1] = w[1] & 0x0f0f0f0fu;
        t[2] = (w[0] >> 4) & 0x0f0f0f0fu, t[3] = (w[1] >> 4) & 0x0f0f0f0fu;
    } else { /* byte i = e_i | e_{i+4} << 2 | e_{i+8} << 4 | e_{i+12} << 6 */
        t[0] = w[0] & 0x03030303u, t[1] = (w[0] >> 2) & 0x03030303u;
        t[2] = (w[0] >> 4) & 0x03030303u, t[3] = (w[0] >> 6) & 0x03030303u;
    }
#pragma unroll
    for (int k = 0; k < 4; k++) {
        uint32_t lo, hi;
        bytes_to_h2(t[k], lo, hi);
        out[2 * k]     = h2_minus_1024(lo);
        out[2 * k + 1] = h2_minus_1024(hi);
    }
}

template <int D> struct v2_layout {
    static constexpr int LDQ = D + 4, LDH = D + 8, LDK = ATT_TILE + 8, LDS = ATT_TILE + 4, LDP = ATT_TILE + 8,
                         LDO = D + 4, NG = D / 16; /* at most D/16 value groups */
    static constexpr int qf  = 0;                                                     /* f32 [16][LDQ] */
    static constexpr int qh  = qf + ((V2_ROWS * LDQ * 4 + 127) / 128) * 128;          /* f16 [16][LDH] */
    static constexpr int qhl = qh + ((V2_ROWS * LDH * 2 + 127) / 128) * 128;          /* f16 [16][LDH]: Q' - f16(Q') */
    static constexpr int kt  = qhl + ((V2_ROWS * LDH * 2 + 127) / 128) * 128;         /* f16 [D][LDK]  */
    static constexpr int vs  = kt + ((D * LDK * 2 + 127) / 128) * 128;                /* f16 [32][LDH] */
    static constexpr int ss  = vs + ((ATT_TILE * LDH * 2 + 127) / 128) * 128;         /* f32 [16][LDS] */
    static constexpr int ps  = ss + ((V2_ROWS * LDS * 4 + 127) / 128) * 128;          /* f16 [16][LDP] */
    static constexpr int os  = ps + ((V2_ROWS * LDP * 2 + 127) / 128) * 128;          /* f32 [16][LDO] */
    static constexpr int meta = os + ((V2_ROWS * LDO * 4 + 127) / 128) * 128;
    /* f32: kscale[D], kzero[D], vscale[32], vzero[32][NG], bias[16], vb[16][NG], m, l, corr [16] */
    static constexpr int bytes = meta + 4 * (2 * D + ATT_TILE + ATT_TILE * NG + V2_ROWS + V2_ROWS * NG + 3 * V2_ROWS);
};

template <int D>
static __device__ void v2_load_ring(const struct moqae_cuda_ring_geom & g, const uint8_t * rk, int codec, half * kt,
                                    half * vsh, float * ksc, float * kze, float * vsc, float * vze) {
    using L = v2_layout<D>;
    const uint8_t * rv = rk + g.k_pad[codec];
    const int       C = ATT_TILE, G = g.v_group, NGv = D / G;
    if (codec == 0) {
        for (int idx = threadIdx.x; idx < D * (C / 8); idx += ATT_THREADS) { /* K^T rows: 64 bytes each */
            const int d = idx / (C / 8), c = idx % (C / 8);
            *(uint4 *) (kt + d * L::LDK + c * 8) = *(const uint4 *) (rk + 2 * (d * C + c * 8));
        }
        copy_rows_f16<D>((const uint16_t *) rv, 0, 1LL << 40, C, vsh, L::LDH);
        for (int i = threadIdx.x; i < D; i += ATT_THREADS) {
            ksc[i] = 1.0f, kze[i] = 0.0f;
        }
        for (int i = threadIdx.x; i < C * NGv; i += ATT_THREADS) {
            vsc[i / NGv] = 1.0f, vze[i] = 0.0f;
        }
        return;
    }
    const int bits = codec == 1 ? 8 : codec == 2 ? 4 : 2;
    /* keys: D rows of C codes */
    {
        const int       row_bytes = C * bits / 8, codes = D * row_bytes;
        const uint8_t * zc = rk + codes, *sc = zc + D;
        const bases     b = read_bases(sc + D);
        for (int idx = threadIdx.x; idx < D * (C / 16); idx += ATT_THREADS) {
            const int d = idx / (C / 16), kb = idx % (C / 16);
            uint32_t  h[8];
            const uint8_t * p = rk + d * row_bytes + kb * 2 * bits;
            if (bits == 8) {
                block_to_h<8>(p, h);
            } else if (bits == 4) {
                block_to_h<4>(p, h);
            } else {
                block_to_h<2>(p, h);
            }
            uint4 * dst = (uint4 *) (kt + d * L::LDK + kb * 16);
            dst[0] = make_uint4(h[0], h[1], h[2], h[3]);
            dst[1] = make_uint4(h[4], h[5], h[6], h[7]);
        }
        for (int d = threadIdx.x; d < D; d += ATT_THREADS) {
            ksc[d] = scale_of(b.sb, sc[d]);
            kze[d] = __fadd_rn(b.zl, __fmul_rn(b.zs, (float) zc[d]));
        }
    }
    /* values: C rows of D codes, groups of G, one scale per token */
    {
        const int       row_bytes = D * bits / 8, codes = C * row_bytes, n_groups = C * NGv;
        const uint8_t * zc = rv + codes, *sc = zc + n_groups;
        const bases     b = read_bases(sc + C);
        for (int idx = threadIdx.x; idx < C * (D / 16); idx += ATT_THREADS) {
            const int j = idx / (D / 16), kb = idx % (D / 16);
            uint32_t  h[8];
            const uint8_t * p = rv + j * row_bytes + kb * 2 * bits;
            if (bits == 8) {
                block_to_h<8>(p, h);
            } else if (bits == 4) {
                block_to_h<4>(p, h);
            } else {
                block_to_h<2>(p, h);
            }
            uint4 * dst = (uint4 *) (vsh + j * L::LDH + kb * 16);
            dst[0] = make_uint4(h[0], h[1], h[2], h[3]);
            dst[1] = make_uint4(h[4], h[5], h[6], h[7]);
        }
        for (int i = threadIdx.x; i < n_groups; i += ATT_THREADS) {
            vze[i] = __fadd_rn(b.zl, __fmul_rn(b.zs, (float) zc[i]));
            if (i % NGv == 0) {
                vsc[i / NGv] = scale_of(b.sb, sc[i / NGv]);
            }
        }
    }
}

static __device__ __forceinline__ void cp_async16(void * smem, const void * gmem) {
    const unsigned sa = (unsigned) __cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(sa), "l"(gmem));
}
static __device__ __forceinline__ void cp_async_commit() {
    asm volatile("cp.async.commit_group;\n" ::);
}
static __device__ __forceinline__ void cp_async_wait1() {
    asm volatile("cp.async.wait_group 1;\n" ::);
}

/* Copy a chunk's record pair (key + value record of KV head hk, padded sizes) into shared memory. */
static __device__ __forceinline__ void prefetch_chunk(const struct moqae_cuda_ring_geom & g, const uint8_t * arena,
                                                      const moqae_cuda_chunk & ch, int hk, uint8_t * raw) {
    const long long bytes = g.k_pad[ch.codec] + g.v_pad[ch.codec];
    const uint8_t * src   = arena + ch.off + (long long) hk * bytes;
    for (long long o = (long long) threadIdx.x * 16; o < bytes; o += ATT_THREADS * 16) {
        cp_async16(raw + o, src + o);
    }
}

template <int D>
static __global__ void __launch_bounds__(ATT_THREADS)
attn_dec_kernel(const struct moqae_cuda_ring_geom g, const struct moqae_cuda_attn_args a, int tpb) {
    using namespace nvcuda;
    using L = v2_layout<D>;
    constexpr int ROWS = V2_ROWS;
    extern __shared__ __align__(128) uint8_t sm[];
    float * qf = (float *) (sm + L::qf);
    half *  qh = (half *) (sm + L::qh);
    half *  qhl = (half *) (sm + L::qhl);
    half *  kt = (half *) (sm + L::kt);
    half *  vsh = (half *) (sm + L::vs);
    float * ss = (float *) (sm + L::ss);
    half *  ps = (half *) (sm + L::ps);
    float * os = (float *) (sm + L::os);
    float * ksc = (float *) (sm + L::meta), *kze = ksc + D, *vsc = kze + D, *vze = vsc + ATT_TILE;
    float * bias = vze + ATT_TILE * L::NG, *vb = bias + ROWS, *mrow = vb + ROWS * L::NG, *lrow = mrow + ROWS,
          *crow = lrow + ROWS;

    const int       tid = threadIdx.x, warp = tid / 32;
    const int       hk = blockIdx.x, qt = blockIdx.y, split = blockIdx.z;
    const int       group = a.n_head / g.n_head_kv, C = ATT_TILE, NGv = D / g.v_group, G = g.v_group;
    const long long n_past = a.dyn->n_past;
    const int       t_first = qt * tpb, t_last = min(a.n_tok, t_first + tpb) - 1;
    const long long p_last = n_past + t_last, own_first = (n_past + t_first) / C * C, own_last = p_last / C * C;
    int lo = 0, hi = a.dyn->n_chunks;
    while (lo < hi) {
        const int mid = (lo + hi) / 2;
        if (a.table[mid].pos < own_last) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    const int n_vis = lo, n_st = (int) ((p_last - own_first) / C) + 1, total = n_vis + n_st;
    const int per = (total + a.n_split - 1) / a.n_split;
    const int s0 = min(total, split * per), s1 = min(total, s0 + per);

    for (int e = tid; e < ROWS * D; e += ATT_THREADS) {
        const int r = e / D, d = e % D, t = t_first + r / group;
        float     v = 0.0f;
        if (r < tpb * group && t <= t_last) {
            v = a.q[((long long) t * a.n_head + hk * group + r % group) * D + d];
        }
        qf[r * L::LDQ + d] = v;
        os[r * L::LDO + d] = 0.0f;
    }
    if (tid < ROWS) {
        mrow[tid] = -INFINITY;
        lrow[tid] = 0.0f;
    }
    /* softmax mapping: 8 threads per row, 4 keys each */
    const int sr = tid / 8, sj = (tid % 8) * 4;
    const int srow_t = t_first + sr / group;
    const bool srow_ok = sr < tpb * group && srow_t <= t_last;
    const long long sp = n_past + srow_t, sown = sp / C * C;
    /* ring tiles are copied into raw[2] one tile ahead (cp.async), so the global latency of tile
     * it + 1 hides behind the work on tile it; the table entry is read two tiles ahead */
    uint8_t *        raw[2] = { sm + ((L::bytes + 127) / 128) * 128, sm + ((L::bytes + 127) / 128) * 128 + a.raw_bytes };
    const int        ring_end = min(s1, n_vis);
    moqae_cuda_chunk cur = {}, nxt = {};
    if (s0 < ring_end) {
        cur = a.table[s0];
        prefetch_chunk(g, a.arena, cur, hk, raw[0]);
    }
    cp_async_commit();
    if (s0 + 1 < ring_end) {
        nxt = a.table[s0 + 1];
    }
    for (int it = s0; it < s1; it++) {
        const bool ring = it < n_vis;
        const int  b    = (it - s0) & 1;
        long long  tile_pos;
        bool       plain; /* f16 tile: scales 1, zeros 0 */
        __syncthreads(); /* raw[b ^ 1], kt, vsh of the previous tile are consumed */
        if (it + 1 < ring_end) {
            prefetch_chunk(g, a.arena, nxt, hk, raw[b ^ 1]);
        }
        cp_async_commit();
        const moqae_cuda_chunk ch = cur;
        cur                       = nxt;
        if (it + 2 < ring_end) {
            nxt = a.table[it + 2];
        }
        cp_async_wait1(); /* this thread's copies of tile it are complete */
        __syncthreads();  /* and everyone's */
        if (ring) {
            tile_pos = ch.pos;
            plain    = ch.codec == 0;
            v2_load_ring<D>(g, raw[b], ch.codec, kt, vsh, ksc, kze, vsc, vze);
        } else {
            tile_pos         = own_first + (long long) (it - n_vis) * C;
            plain            = true;
            const int nvalid = (int) min((long long) C, p_last - tile_pos + 1);
            const uint16_t * sk = a.stage_k + (long long) hk * g.stage_rows * D;
            for (int idx = tid; idx < C * D; idx += ATT_THREADS) { /* transpose into K^T */
                const int j = idx / D, d = idx % D;
                kt[d * L::LDK + j] = j < nvalid ? __ushort_as_half(sk[((tile_pos + j) % g.stage_rows) * D + d])
                                                : __float2half(0.0f);
            }
            copy_rows_f16<D>(a.stage_v + (long long) hk * g.stage_rows * D, tile_pos, g.stage_rows, nvalid, vsh, L::LDH);
        }
        __syncthreads();
        /* Q' = Q o kscale (f16) and bias = Q . kzero */
        for (int e = tid; e < ROWS * D; e += ATT_THREADS) {
            const int r = e / D, d = e % D;
            const float v      = plain ? qf[r * L::LDQ + d] : qf[r * L::LDQ + d] * ksc[d];
            const half  hi     = __float2half(v); /* hi + lo: ~22 bits of Q' (see attn_kernel) */
            qh[r * L::LDH + d]  = hi;
            qhl[r * L::LDH + d] = __float2half(v - __half2float(hi));
        }
        {
            float part = 0.0f;
            if (!plain) {
                for (int d = (tid % 8) * (D / 8); d < (tid % 8 + 1) * (D / 8); d++) {
                    part += qf[sr * L::LDQ + d] * kze[d];
                }
            }
            part += __shfl_xor_sync(0xffffffffu, part, 1);
            part += __shfl_xor_sync(0xffffffffu, part, 2);
            part += __shfl_xor_sync(0xffffffffu, part, 4);
            if (tid % 8 == 0) {
                bias[sr] = part;
            }
        }
        __syncthreads();
        if (warp < 2) { /* S = Q' K^T: one 16x16 fragment per warp */
            const int ct = warp;
            wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
            wmma::fill_fragment(acc, 0.0f);
#pragma unroll
            for (int kk = 0; kk < D; kk += 16) {
                wmma::fragment<wmma::matrix_a, 16, 16, 16, half, wmma::row_major> fa;
                wmma::fragment<wmma::matrix_b, 16, 16, 16, half, wmma::row_major> fb;
                wmma::load_matrix_sync(fa, qh + kk, L::LDH);
                wmma::load_matrix_sync(fb, kt + kk * L::LDK + ct * 16, L::LDK);
                wmma::mma_sync(acc, fa, fb, acc);
                wmma::load_matrix_sync(fa, qhl + kk, L::LDH);
                wmma::mma_sync(acc, fa, fb, acc);
            }
            wmma::store_matrix_sync(ss + ct * 16, acc, L::LDS, wmma::mem_row_major);
        }
        __syncthreads();
        {
            float sv[4], mx = -INFINITY;
#pragma unroll
            for (int u = 0; u < 4; u++) {
                const long long kp = tile_pos + sj + u;
                const bool ok = srow_ok && (ring ? tile_pos < sown : (kp >= sown && kp <= sp));
                sv[u]         = ok ? (ss[sr * L::LDS + sj + u] + bias[sr]) * a.scale : -INFINITY;
                mx            = fmaxf(mx, sv[u]);
            }
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 4));
            const float m_old = mrow[sr];
            const float m_new = fmaxf(m_old, mx);
            float       pu[4], sum = 0.0f;
#pragma unroll
            for (int u = 0; u < 4; u++) {
                pu[u] = m_new == -INFINITY || sv[u] == -INFINITY ? 0.0f : expf(sv[u] - m_new);
                sum += pu[u];
                ps[sr * L::LDP + sj + u] = __float2half(plain ? pu[u] : pu[u] * vsc[sj + u]);
            }
            sum += __shfl_xor_sync(0xffffffffu, sum, 1);
            sum += __shfl_xor_sync(0xffffffffu, sum, 2);
            sum += __shfl_xor_sync(0xffffffffu, sum, 4);
            for (int gi = 0; gi < NGv; gi++) { /* P . vzero per value group */
                float z = 0.0f;
                if (!plain) {
#pragma unroll
                    for (int u = 0; u < 4; u++) {
                        z += pu[u] * vze[(sj + u) * NGv + gi];
                    }
                }
                z += __shfl_xor_sync(0xffffffffu, z, 1);
                z += __shfl_xor_sync(0xffffffffu, z, 2);
                z += __shfl_xor_sync(0xffffffffu, z, 4);
                if (tid % 8 == 0) {
                    vb[sr * L::NG + gi] = z;
                }
            }
            __syncwarp();
            if (tid % 8 == 0) {
                const float corr = m_new == -INFINITY ? 1.0f : expf(m_old - m_new);
                lrow[sr]         = lrow[sr] * corr + sum;
                crow[sr]         = corr;
                mrow[sr]         = m_new;
            }
        }
        __syncthreads();
        for (int e = tid; e < ROWS * D; e += ATT_THREADS) {
            const int r = e / D, d = e % D;
            os[r * L::LDO + d] = os[r * L::LDO + d] * crow[r] + vb[r * L::NG + d / G];
        }
        __syncthreads();
        for (int f = warp; f < D / 16; f += ATT_THREADS / 32) { /* O += P' codes */
            wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
            wmma::load_matrix_sync(acc, os + f * 16, L::LDO, wmma::mem_row_major);
#pragma unroll
            for (int kk = 0; kk < ATT_TILE; kk += 16) {
                wmma::fragment<wmma::matrix_a, 16, 16, 16, half, wmma::row_major> fa;
                wmma::fragment<wmma::matrix_b, 16, 16, 16, half, wmma::row_major> fb;
                wmma::load_matrix_sync(fa, ps + kk, L::LDP);
                wmma::load_matrix_sync(fb, vsh + kk * L::LDH + f * 16, L::LDH);
                wmma::mma_sync(acc, fa, fb, acc);
            }
            wmma::store_matrix_sync(os + f * 16, acc, L::LDO, wmma::mem_row_major);
        }
    }
    __syncthreads();
    const int n_qt = gridDim.y;
    for (int e = tid; e < ROWS * D; e += ATT_THREADS) {
        const int r = e / D, d = e % D, t = t_first + r / group;
        if (r >= tpb * group || t > t_last) {
            continue;
        }
        if (a.n_split == 1) {
            a.out[((long long) t * a.n_head + hk * group + r % group) * D + d] = os[r * L::LDO + d] / lrow[r];
        } else {
            const long long row = (((long long) split * g.n_head_kv + hk) * n_qt + qt) * ROWS + r;
            a.part[row * (D + 2) + d] = os[r * L::LDO + d];
            if (d == 0) {
                a.part[row * (D + 2) + D]     = mrow[r];
                a.part[row * (D + 2) + D + 1] = lrow[r];
            }
        }
    }
}

static __global__ void merge_kernel(const struct moqae_cuda_ring_geom g, const struct moqae_cuda_attn_args a, int tpb,
                                    int rows, int n_qt) {
    const int D = g.head_dim, group = a.n_head / g.n_head_kv;
    const int r = blockIdx.x % rows, qt = blockIdx.x / rows % n_qt, hk = blockIdx.x / rows / n_qt;
    const int t = qt * tpb + r / group;
    if (r >= tpb * group || t >= a.n_tok) {
        return;
    }
    float mx = -INFINITY;
    for (int s = 0; s < a.n_split; s++) {
        const long long row = (((long long) s * g.n_head_kv + hk) * n_qt + qt) * rows + r;
        mx                  = fmaxf(mx, a.part[row * (D + 2) + D]);
    }
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float o = 0.0f, l = 0.0f;
        for (int s = 0; s < a.n_split; s++) {
            const long long row = (((long long) s * g.n_head_kv + hk) * n_qt + qt) * rows + r;
            const float     m   = a.part[row * (D + 2) + D];
            if (m == -INFINITY) {
                continue;
            }
            const float w = expf(m - mx);
            o += w * a.part[row * (D + 2) + d];
            l += w * a.part[row * (D + 2) + D + 1];
        }
        a.out[((long long) t * a.n_head + hk * group + r % group) * D + d] = o / l;
    }
}

bool moqae_cuda_attn_supported(int head_dim, int chunk) {
    return chunk == ATT_TILE && (head_dim == 64 || head_dim == 128);
}

int moqae_cuda_attn_rows(int64_t n_tok) {
    return n_tok <= 4 ? 16 : 64;
}

size_t moqae_cuda_attn_part_floats(const struct moqae_cuda_ring_geom * g, int64_t n_tok, int64_t n_head, int n_split) {
    const int     rows  = moqae_cuda_attn_rows(n_tok);
    const int64_t group = n_head / g->n_head_kv;
    const int64_t tpb   = rows / group;
    const int64_t n_qt  = (n_tok + tpb - 1) / tpb;
    return (size_t) n_split * (size_t) g->n_head_kv * (size_t) n_qt * (size_t) rows * (size_t) (g->head_dim + 2);
}

/* Which attention kernel: 1 = the generic one (attn_kernel), 2 = the factored decode kernel
 * (attn_dec_kernel, ROWS = 16 only). MOQAE_CUDA_ATTN=1 forces version 1 (for comparison). */
static int attn_version(int rows) {
    static int forced = -1;
    if (forced < 0) {
        const char * e = getenv("MOQAE_CUDA_ATTN");
        forced         = e && *e == '1' ? 1 : 0;
    }
    return rows == V2_ROWS && !forced ? 2 : 1;
}

template <int D, int ROWS>
static int launch(const struct moqae_cuda_ring_geom * g, const struct moqae_cuda_attn_args * a, cudaStream_t stream) {
    using L = att_layout<D, ROWS>;
    const bool  v2     = attn_version(ROWS) == 2;
    const int   v2base = ((v2_layout<D>::bytes + 127) / 128) * 128;
    const int   bytes  = v2 ? v2base + 2 * a->raw_bytes : L::bytes;
    static bool attr_set = false; /* same value for every caller: a race only repeats the call */
    if (!attr_set) {
        const int raw_max = (int) (g->k_pad[0] + g->v_pad[0]); /* FP16 records are the largest */
        MOQAE_CUDA_CHECK(cudaFuncSetAttribute(attn_kernel<D, ROWS>, cudaFuncAttributeMaxDynamicSharedMemorySize, L::bytes));
        MOQAE_CUDA_CHECK(cudaFuncSetAttribute(attn_dec_kernel<D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                              v2base + 2 * raw_max));
        attr_set = true;
    }
    if (v2 && (a->raw_bytes % 16 != 0 || a->raw_bytes > (int) (g->k_pad[0] + g->v_pad[0]))) {
        return moqae_fail(MOQAE_ERR_INTERNAL, "CUDA attention: bad record buffer size %d", a->raw_bytes);
    }
    const int group = a->n_head / g->n_head_kv;
    const int tpb   = ROWS / group;
    if (tpb < 1) {
        return moqae_fail(MOQAE_ERR_UNSUPPORTED, "CUDA attention: %d query heads per KV head exceed %d rows", group, ROWS);
    }
    const int  n_qt = (a->n_tok + tpb - 1) / tpb;
    const dim3 grid((unsigned) g->n_head_kv, (unsigned) n_qt, (unsigned) a->n_split);
    if (v2) {
        attn_dec_kernel<D><<<grid, ATT_THREADS, bytes, stream>>>(*g, *a, tpb);
    } else {
        attn_kernel<D, ROWS><<<grid, ATT_THREADS, bytes, stream>>>(*g, *a, tpb);
    }
    MOQAE_CUDA_LAUNCH_CHECK();
    if (a->n_split > 1) {
        merge_kernel<<<(unsigned) (g->n_head_kv * n_qt * ROWS), D, 0, stream>>>(*g, *a, tpb, ROWS, n_qt);
        MOQAE_CUDA_LAUNCH_CHECK();
    }
    return MOQAE_OK;
}

int moqae_cuda_attention(const struct moqae_cuda_ring_geom * g, const struct moqae_cuda_attn_args * a,
                         cudaStream_t stream) {
    const int rows = moqae_cuda_attn_rows(a->n_tok);
    if (g->chunk != ATT_TILE) {
        return moqae_fail(MOQAE_ERR_UNSUPPORTED, "CUDA attention: chunk size %d (only %d)", g->chunk, ATT_TILE);
    }
    if (g->head_dim == 64) {
        return rows == 16 ? launch<64, 16>(g, a, stream) : launch<64, 64>(g, a, stream);
    }
    if (g->head_dim == 128) {
        return rows == 16 ? launch<128, 16>(g, a, stream) : launch<128, 64>(g, a, stream);
    }
    return moqae_fail(MOQAE_ERR_UNSUPPORTED, "CUDA attention: head_dim %d (supported: 64, 128)", g->head_dim);
}
