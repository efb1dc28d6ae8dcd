/*
 * cuda/attention.cu — see attention.cuh. Three kernels over the same tile walk (ring chunks visible to
 * the rows, then the staging window's tiles), a merge kernel for flash-decoding splits, and the
 * choice between them. Record layouts: kv-codec.h (kv-layout.cuh reads them); keys of quantized
 * records are rotated (Hadamard over D) and, unless MOQAE_KV_KEYS=post, turned back to before RoPE:
 *   score(q, key at P0 + t) = q . R(P0 + t) k = (R(-t) R(-P0) q) . k,   k = f_D * H_D * y
 * with y = scale * code + zero the record's rotated row and f_D = 2^-ceil(log2(D)/2); values are
 * y = H_G-rotated groups, so sum_j p_j v_j = f_G H_G (sum_j p_j y_j): they are summed rotated and
 * turned back once. Reference: kv-ring.c moqae_kv_cache_attend with kv-codec.c's primitives.
 */
#include "attention.cuh"
#include "kv-layout.cuh"
#include "matmul.cuh"
#include "q8.cuh"

#include <algorithm>
#include <mma.h>

#define ATT_THREADS 128
#define ATT_TILE    32 /* keys per tile = the chunk size C */

/* ================================================================================================
 * Shared pieces
 * ================================================================================================ */

struct rec_bases {
    float zl, zs, sb;
};

static __device__ __forceinline__ rec_bases read_bases(const uint8_t * p) {
    return { xf16_to_f32(kvl_rd16(p)), xf16_to_f32(kvl_rd16(p + 2)), xf16_to_f32(kvl_rd16(p + 4)) };
}

/* Walsh-Hadamard butterflies over blocks of n elements (a power of two >= E) of a row spread over the
 * warp, E consecutive elements per lane; unnormalized. */
template <int E> static __device__ __forceinline__ void warp_fwht(float (&v)[E], int n) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int h = 1; h < E; h *= 2) {
#pragma unroll
        for (int e = 0; e < E; e++) {
            if ((e & h) == 0) {
                const float x = v[e], y = v[e + h];
                v[e]          = x + y;
                v[e + h]      = x - y;
            }
        }
    }
    for (int h = E; h < n; h *= 2) {
        const int   m   = h / E;
        const float sgn = (lane & m) ? -1.0f : 1.0f; /* sgn v + o: o - v or v + o, rounded as either (one FFMA) */
#pragma unroll
        for (int e = 0; e < E; e++) {
            const float o = __shfl_xor_sync(0xffffffffu, v[e], m);
            v[e]          = fmaf(sgn, v[e], o);
        }
    }
}

static __device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        v += __shfl_xor_sync(0xffffffffu, v, o);
    }
    return v;
}

static __device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    }
    return v;
}

/* The ring chunks visible to a query whose own chunk starts at own_last: pos < own_last (the table
 * is in position order). */
static __device__ __forceinline__ int visible_chunks(const struct moqae_cuda_chunk * table, int n_chunks,
                                                     long long own_last) {
    int lo = 0, hi = n_chunks;
    while (lo < hi) {
        const int mid = (lo + hi) / 2;
        if (table[mid].pos < own_last) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    return lo;
}

/* The tiles a block of a micro-batch walks (generic and prefill kernels): its tokens t_first..t_last
 * (blockIdx.y, tpb tokens a block), the ring chunks visible to its last row (n_vis), then the staging
 * window's tiles from its first row's chunk (own_first) to its last position (p_last); its split
 * (blockIdx.z) takes the tiles s0..s1 - 1 of that walk. */
struct tile_walk {
    int       t_first, t_last, n_vis, s0, s1;
    long long p_last, own_first;
};

static __device__ __forceinline__ tile_walk tile_walk_of(const struct moqae_cuda_attn_args & a, int tpb) {
    constexpr int   C = ATT_TILE;
    const long long n_past = a.dyn->n_past;
    tile_walk       w;
    w.t_first                = (int) blockIdx.y * tpb;
    w.t_last                 = min(a.n_tok, w.t_first + tpb) - 1;
    w.p_last                 = n_past + w.t_last;
    w.own_first              = (n_past + w.t_first) / C * C;
    w.n_vis                  = visible_chunks(a.table, a.dyn->n_chunks, w.p_last / C * C);
    const int total          = w.n_vis + (int) ((w.p_last - w.own_first) / C) + 1;
    const int per            = (total + a.n_split - 1) / a.n_split;
    w.s0                     = min(total, (int) blockIdx.z * per);
    w.s1                     = min(total, w.s0 + per);
    return w;
}

/* The block's query rows (row r: token t_first + r / group of the walk, head hk * group + r % group) times
 * scale into shared memory as two f16 planes hi + lo, so that the scores keep ~22 bits of Q, as the CPU's
 * f32 dot products; rows past the block's tokens are zero. ZO: the f32 output tile os is zeroed in the
 * same pass. rows x D elements, NT threads. */
template <int D, int NT, bool ZO>
static __device__ __forceinline__ void load_q_split(const struct moqae_cuda_attn_args & a, const tile_walk & w, int hk,
                                                    int group, int tpb, int rows, float scale, half * qs, half * qsl,
                                                    int ldh, float * os, int ldo) {
    for (int e = threadIdx.x; e < rows * D; e += NT) {
        const int r = e / D, d = e % D, t = w.t_first + r / group;
        float     v = 0.0f;
        if (r < tpb * group && t <= w.t_last) {
            v = a.q[((long long) t * a.n_head + hk * group + r % group) * D + d] * scale;
        }
        const half hi    = __float2half(v);
        qs[r * ldh + d]  = hi;
        qsl[r * ldh + d] = __float2half(v - __half2float(hi));
        if constexpr (ZO) {
            os[r * ldo + d] = 0.0f;
        }
    }
}

/* ================================================================================================
 * Generic kernel: a tile decoded into shared memory (f16), WMMA for S = Q K^T and O += P V
 * ================================================================================================ */

/* Rows of f16 [32][D] from `src` (row j at src + row_of(j) * D), zero for rows >= n_valid; NT threads. */
template <int D, int NT = ATT_THREADS>
static __device__ void copy_rows_f16(const uint16_t * __restrict__ src, long long pos0, long long stage_rows,
                                     int n_valid, half * dst, int ld) {
    for (int idx = threadIdx.x; idx < ATT_TILE * (D / 8); idx += NT) {
        const int j = idx / (D / 8), c = idx % (D / 8);
        uint4     v = make_uint4(0, 0, 0, 0);
        if (j < n_valid) {
            v = *(const uint4 *) (src + ((pos0 + j) % stage_rows) * D + c * 8);
        }
        *(uint4 *) (dst + j * ld + c * 8) = v;
    }
}

/* Keys of a quantized record -> ks[j][d] f16, after RoPE: one warp per key row, E channels per lane:
 * decode (as kv-codec.c: the outlier row from its 2b-bit codes), inverse Hadamard over D, then R(t)
 * and R(P0) (keys before RoPE; cs_t NULL: stored after RoPE). NT threads. */
template <int D, int NT = ATT_THREADS>
static __device__ void gen_decode_k(const uint8_t * __restrict__ rk, int codec, const float * __restrict__ cs_t,
                                    const float * __restrict__ cs_p0c, half * ks, int ld, const float2 * cst = nullptr,
                                    int j0 = -1, int jstep = NT / 32) { /* rows j0, j0 + jstep, ...; -1: the warp's */
    constexpr int  C = ATT_TILE, E = D / 32;
    const kvl_geom g = kvl_geom_k(codec, C, D);
    const int      bits = g.bits, RB = C * bits / 8, lane = threadIdx.x & 31;
    const rec_bases b  = read_bases(rk + g.off_bases);
    const float     xz = xf16_to_f32(kvl_rd16(rk + g.off_x)), xs = xf16_to_f32(kvl_rd16(rk + g.off_x + 2));
    const int       xi = rk[g.off_x + 4];
    const float     f  = kvl_rot_factor(D, true);
    float           sc[E], zr[E];
#pragma unroll
    for (int e = 0; e < E; e++) {
        const int d = lane * E + e;
        sc[e]       = kvl_scale(b.sb, rk[g.off_sc + d]);
        zr[e]       = kvl_zero(b.zl, b.zs, rk[g.off_zc + d]);
    }
    for (int j = j0 < 0 ? (int) threadIdx.x / 32 : j0; j < C; j += jstep) {
        float v[E];
#pragma unroll
        for (int e = 0; e < E; e++) {
            const int      d    = lane * E + e;
            const unsigned code = kvl_get_code_q(rk + d * RB, j, bits);
            if (j == xi) {
                const unsigned hi = kvl_get_code_q(rk + g.off_xhi, d, bits);
                v[e]              = xadd(xmul(xs, (float) ((hi << bits) | code)), xz);
            } else {
                v[e] = xadd(xmul(sc[e], (float) code), zr[e]);
            }
        }
        warp_fwht<E>(v, D);
#pragma unroll
        for (int e = 0; e < E; e++) {
            v[e] *= f;
        }
        if (cs_t) {
#pragma unroll
            for (int p = 0; p < E / 2; p++) {
                const int    i  = lane * (E / 2) + p;
                const float2 t1 = cst ? cst[j * (D / 2) + i] : make_float2(cs_t[(2 * i) * C + j], cs_t[(2 * i + 1) * C + j]);
                const float  c1 = t1.x, s1 = t1.y;
                const float c0 = cs_p0c[2 * i], s0 = cs_p0c[2 * i + 1];
                const float x1 = v[2 * p] * c1 - v[2 * p + 1] * s1, y1 = v[2 * p] * s1 + v[2 * p + 1] * c1;
                v[2 * p]       = x1 * c0 - y1 * s0;
                v[2 * p + 1]   = x1 * s0 + y1 * c0;
            }
        }
#pragma unroll
        for (int e = 0; e < E; e++) {
            ks[j * ld + lane * E + e] = __float2half(v[e]);
        }
    }
}

/* Values of a quantized record -> vs[j][d] f16: decode, inverse Hadamard per block of rot_block(G). */
template <int D, int NT = ATT_THREADS>
static __device__ void gen_decode_v(const uint8_t * __restrict__ rv, int codec, int G, half * vs, int ld, int j0 = -1,
                                    int jstep = NT / 32) {
    constexpr int   C = ATT_TILE, E = D / 32;
    const kvl_geom  g = kvl_geom_v(codec, C, D, G);
    const int       bits = g.bits, RB = D * bits / 8, lane = threadIdx.x & 31, NG = D / G;
    const rec_bases b = read_bases(rv + g.off_bases);
    const int       n = kvl_rot_block(G);
    const float     f = kvl_rot_factor(n, true);
    for (int j = j0 < 0 ? (int) threadIdx.x / 32 : j0; j < C; j += jstep) {
        const float scale = kvl_scale(b.sb, rv[g.off_sc + j]);
        const float zero  = kvl_zero(b.zl, b.zs, rv[g.off_zc + j * NG + lane * E / G]); /* G >= 16 > E: one group */
        float       v[E];
#pragma unroll
        for (int e = 0; e < E; e++) {
            const int d = lane * E + e;
            v[e] = xadd(xmul(scale, (float) kvl_get_code_q(rv + j * RB, d, bits)), zero);
        }
        warp_fwht<E>(v, n);
#pragma unroll
        for (int e = 0; e < E; e++) {
            vs[j * ld + lane * E + e] = __float2half(v[e] * f);
        }
    }
}

template <int D, int NT = ATT_THREADS>
static __device__ void gen_decode_chunk(const struct moqae_cuda_ring_geom & g, const uint8_t * rk, int codec,
                                        const float * cs_t, const float * cs_p0c, half * ks, half * vs, int ld,
                                        const float2 * cst = nullptr) {
    const uint8_t * rv = rk + g.k_pad[codec];
    if (codec == 0) { /* keys transposed f16 [D][C] (after RoPE): pairs of tokens per 4-byte word */
        for (int idx = threadIdx.x; idx < D * (ATT_TILE / 2); idx += NT) {
            const int      d = idx % D, jj = idx / D;
            const uint32_t v = *(const uint32_t *) (rk + 2 * (d * ATT_TILE + 2 * jj));
            ks[(2 * jj) * ld + d]     = __ushort_as_half((unsigned short) (v & 0xffffu));
            ks[(2 * jj + 1) * ld + d] = __ushort_as_half((unsigned short) (v >> 16));
        }
        copy_rows_f16<D, NT>((const uint16_t *) rv, 0, 1LL << 40, ATT_TILE, vs, ld);
        return;
    }
    gen_decode_k<D, NT>(rk, codec, cs_t, cs_p0c, ks, ld, cst);
    gen_decode_v<D, NT>(rv, codec, g.v_group, vs, ld);
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
    static constexpr int pl  = p + ((ROWS * LDP * 2 + 127) / 128) * 128; /* P - f16(P) */
    static constexpr int o   = pl + ((ROWS * LDP * 2 + 127) / 128) * 128;
    static constexpr int ml  = o + ((ROWS * LDO * 4 + 127) / 128) * 128;
    static constexpr int bytes = ml + 3 * ROWS * 4;
};

template <int D, int ROWS>
static __global__ void __launch_bounds__(ATT_THREADS)
attn_kernel(const struct moqae_cuda_ring_geom g, const struct moqae_cuda_attn_args a, int tpb) {
    MOQAE_PDL_ENTER();
    using namespace nvcuda;
    using L = att_layout<D, ROWS>;
    extern __shared__ __align__(128) uint8_t sm[];
    half *  qs = (half *) (sm + L::q);
    half *  qsl = (half *) (sm + L::ql);
    half *  ks = (half *) (sm + L::k);
    half *  vs = (half *) (sm + L::v);
    float * ss = (float *) (sm + L::s);
    half *  ps = (half *) (sm + L::p);
    half *  psl = (half *) (sm + L::pl);
    float * os = (float *) (sm + L::o);
    float * mrow = (float *) (sm + L::ml), *lrow = mrow + ROWS, *crow = lrow + ROWS;

    const int       tid = threadIdx.x, warp = tid / 32;
    const int       hk = blockIdx.x, qt = blockIdx.y, split = blockIdx.z;
    const int       group = a.n_head / g.n_head_kv, C = ATT_TILE;
    const long long n_past = a.dyn->n_past;
    const tile_walk w = tile_walk_of(a, tpb);
    const int       t_first = w.t_first, t_last = w.t_last, n_vis = w.n_vis, s0 = w.s0, s1 = w.s1;
    const long long p_last = w.p_last, own_first = w.own_first;

    load_q_split<D, ATT_THREADS, true>(a, w, hk, group, tpb, ROWS, 1.0f, qs, qsl, L::LDH, os, L::LDO);
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
            gen_decode_chunk<D>(g, a.arena + ch.off + (long long) hk * (g.k_pad[ch.codec] + g.v_pad[ch.codec]), ch.codec,
                                a.cs_t, a.cs_t ? a.cs_p0 + (long long) it * D : nullptr, ks, vs, L::LDH);
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
                    const half  ph = __float2half(pj);
                    sum += pj;
                    ps[r * L::LDP + j]  = ph;
                    psl[r * L::LDP + j] = __float2half(pj - __half2float(ph)); /* P hi + lo, as Q */
                }
                mrow[r] = mx;
            } else {
#pragma unroll
                for (int j = 0; j < ATT_TILE; j++) {
                    ps[r * L::LDP + j]  = __float2half(0.0f);
                    psl[r * L::LDP + j] = __float2half(0.0f);
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
                wmma::load_matrix_sync(fb, vs + kk * L::LDH + ct * 16, L::LDH);
                wmma::load_matrix_sync(fa, ps + rt * 16 * L::LDP + kk, L::LDP);
                wmma::mma_sync(acc, fa, fb, acc);
                wmma::load_matrix_sync(fa, psl + rt * 16 * L::LDP + kk, L::LDP);
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
 * Version 3, decode of one token: warps walk chunks on their own (no block barrier in the loop)
 * ================================================================================================
 * Each warp takes every V3_WARPS-th tile of the block's split and keeps its own running max, sum and
 * outputs; the block merges its warps once at the end. A quantized chunk's records (and its RoPE
 * start) are copied into the warp's buffer one tile ahead with cp.async. Keys of a quantized record:
 *   stage 1 (tensor cores, mma m16n8k16): U_a = Y_a . diag(s_a / sb) H_16 for each 16-channel block
 *     a, tokens as rows; codes enter the A fragments straight from the record as f16 1024 + code,
 *     and the accumulators start at (zero / sb - 1024 s / sb) H_16, so U_a = (y / sb)_a H_16;
 *   stage 2 (registers): the D/16-point butterflies across the blocks a, in each thread's own
 *     accumulators, giving K' = H_D (y / sb) for its 4 tokens and 2 * D/16 channel pairs;
 *   score_t = sb f_D sum_i (c_ti alpha_ti + s_ti beta_ti) with (c, s) = cos, sin of t theta_i and
 *     alpha = x q0_u + y q0_w, beta = x q0_w - y q0_u, q0 = R(-P0) q (the pair (x, y) of K').
 * The outlier token is scored apart (its own codes, in lane-channel layout). Values: each lane owns
 * D/32 channels, sums p_j (scale_j code_j) + p_j zero_j in the rotated space (CUDA cores), and the
 * warp turns its sum back once at the end. FP16 chunks and the staging window: one token per lane
 * for the scores, D/32 channels per lane for the values, plain f32. */

#define V3_WARPS   8
#define V3_THREADS (32 * V3_WARPS)

static __device__ __forceinline__ void mma16816(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                                uint32_t b0, uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

/* bytes [c0, c1, ., .] (each < 2048 - 1024) -> half2 (1024 + c0, 1024 + c1) */
static __device__ __forceinline__ uint32_t h2_1024(uint32_t x) {
    return __byte_perm(x, 0x64646464u, 0x4140);
}

/* Four 8x8 b16 matrices from shared memory, transposed: lane l gives the address of row l % 8 of
 * matrix l / 8 (16 bytes each) and receives, from matrix i, the b16 column l / 4 of rows 2 (l % 4)
 * (low half) and 2 (l % 4) + 1 (high half) in r[i]. */
static __device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], const void * smem_row) {
    const unsigned sa = (unsigned) __cvta_generic_to_shared(smem_row);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(sa));
}

static __device__ __forceinline__ half2 u32_as_h2(uint32_t x) {
    half2 h;
    memcpy(&h, &x, 4);
    return h;
}
static __device__ __forceinline__ uint32_t h2_as_u32(half2 h) {
    uint32_t x;
    memcpy(&x, &h, 4);
    return x;
}

/* nibbles 0 and 4 of x (bits 0-3 and 16-19) -> half2 (1024 + n0, 1024 + n4): one LOP3 (a & b) | c with
 * k = 0x64006400 in a register that ptxas cannot see as a constant (with two immediates it emits an AND
 * and an OR: 2 of the ~12 instructions per key mma) */
static __device__ __forceinline__ uint32_t h2_1024_nib(uint32_t x, uint32_t k) {
    uint32_t d;
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(x), "n"(0x000f000f), "r"(k));
    return d;
}

/* 2-bit codes at bits 0 and 16 of x -> half2 (1024 + c0, 1024 + c1): one LOP3, k as in h2_1024_nib */
static __device__ __forceinline__ uint32_t h2_1024_crumb(uint32_t x, uint32_t k) {
    uint32_t d;
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(x), "n"(0x00030003), "r"(k));
    return d;
}

/* A quantized key record's per-channel terms, E channels per lane of the warp: shat[d] = channel d's scale
 * relative to sb as f16 (0 when sb is 0), corr[d] = the 16-point stage of zero_d / sb - 1024 shat[d] (the
 * accumulators' start: the codes enter the mma as 1024 + code). rel(code): kvl_scale_rel, looked up where
 * the caller keeps its table. */
template <int E, class REL>
static __device__ __forceinline__ void key_channel_setup(const uint8_t * rk, const kvl_geom & gk, const rec_bases & b,
                                                         float isb, half * shat, float * corr, REL rel) {
    const int lane = threadIdx.x & 31;
    float     w[E];
#pragma unroll
    for (int e = 0; e < E; e++) {
        const int  d  = lane * E + e;
        const half hh = __float2half(b.sb > 0.0f ? rel((unsigned) rk[gk.off_sc + d]) : 0.0f);
        shat[d]       = hh;
        w[e]          = kvl_zero(b.zl, b.zs, rk[gk.off_zc + d]) * isb - 1024.0f * __half2float(hh);
    }
    warp_fwht<E>(w, 16);
#pragma unroll
    for (int e = 0; e < E; e++) {
        corr[lane * E + e] = w[e];
    }
}

/* Bytes of v3's shared memory: queries, the RoPE offsets table, kv-layout's FRAC table (lanes index it
 * by their own scale codes: in constant memory each distinct address of a warp is a serialized replay),
 * per warp two copy buffers, the record's relative scales (f16), the stage-1 start values and R(-P0) q. */
template <int D, int MM> struct v3_layout {
    static constexpr int CSTLD = D / 2 + 4; /* float2 per t row: 4 mod 16 keeps the 64-bit loads conflict-free */
    static constexpr int qs    = 0;
    static constexpr int cst   = qs + MM * D * 4;
    static constexpr int frac  = cst + ATT_TILE * CSTLD * 8;
    static constexpr int walk  = frac + 16 * 4; /* per warp: its walk's window base and mask */
    static constexpr int warps = walk + 2 * 4 * 8;
    static constexpr int warp_fixed = D * 2 + D * 4 + MM * D * 4; /* shat, corr, q0 */
};

static __host__ __device__ __forceinline__ int v3_raw_stride(int raw_bytes, int D) {
    return ((raw_bytes + 15) / 16) * 16 + D * 4; /* record pair, then the chunk's cs_p0 */
}

/* The last steps of one key product (16 tokens x 16 channels per 16-channel block ab, on tensor
 * cores), shared by the INT4 (ldmatrix) and the INT8 / INT2 paths of attn_v3_kernel: only the token
 * held by an accumulator row differs between them. Stage 2 of the keys' inverse Hadamard: butterflies
 * across the D/16 blocks of the accumulators. */
template <int NA> static __device__ __forceinline__ void v3_stage2(float (&acc)[NA][4]) {
#pragma unroll
    for (int h = 1; h < NA; h *= 2) {
#pragma unroll
        for (int ab = 0; ab < NA; ab++) {
            if ((ab & h) == 0) {
#pragma unroll
                for (int r = 0; r < 4; r++) {
                    const float x = acc[ab][r], y = acc[ab + h][r];
                    acc[ab][r]     = x + y;
                    acc[ab + h][r] = x - y;
                }
            }
        }
    }
}

/* A key product's A fragment for INT8 / INT2 records (v3_key_product, v3_key_post): codes of channel rows 2 q4,
 * 2 q4 + 1 (A0, A1) and + 8, + 9 (A2, A3) of the 16-channel block at r0, tokens 16 mt + g8 (A0, A2) and + 8 (A1,
 * A3), as f16 1024 + code. INT2: word mt of each channel row (8 bytes a row); byte g8 % 4 of two rows into bytes 0
 * and 2 (one byte-permute), then the 2-bit code of the token by a shift and one LOP3. */
static __device__ __forceinline__ void key_a_bytes(uint32_t & A0, uint32_t & A1, uint32_t & A2, uint32_t & A3,
                                                   const uint8_t * r0, int bits, int RB, int mt, uint32_t k6464) {
    const int g8 = (threadIdx.x & 31) >> 2;
    if (bits == 8) {
        const int o0 = 16 * mt + g8, o1 = o0 + 8;
        A0 = h2_1024(r0[o0] | ((uint32_t) r0[RB + o0] << 8));
        A1 = h2_1024(r0[o1] | ((uint32_t) r0[RB + o1] << 8));
        A2 = h2_1024(r0[8 * RB + o0] | ((uint32_t) r0[9 * RB + o0] << 8));
        A3 = h2_1024(r0[8 * RB + o1] | ((uint32_t) r0[9 * RB + o1] << 8));
    } else {
        const uint32_t * w   = (const uint32_t *) r0 + mt;
        const uint32_t   ps  = 0x4400u + 0x1111u * (uint32_t) (g8 & 3);
        const int        sh  = 2 * (g8 >> 2);
        const uint32_t   x01 = __byte_perm(w[0], w[2], ps), x89 = __byte_perm(w[16], w[18], ps);
        A0 = h2_1024_crumb(x01 >> sh, k6464), A1 = h2_1024_crumb(x01 >> (sh + 4), k6464);
        A2 = h2_1024_crumb(x89 >> sh, k6464), A3 = h2_1024_crumb(x89 >> (sh + 4), k6464);
    }
}

/* A key record's outlier token: its index, and its row (rotated, E channels per lane) from its 2b-bit codes. */
template <int E>
static __device__ __forceinline__ int outlier_row(const uint8_t * rk, const kvl_geom & gk, int bits, int RB,
                                                  float (&yx)[E]) {
    const int   lane = threadIdx.x & 31, xi = rk[gk.off_x + 4];
    const float xz = xf16_to_f32(kvl_rd16(rk + gk.off_x)), xs = xf16_to_f32(kvl_rd16(rk + gk.off_x + 2));
#pragma unroll
    for (int e = 0; e < E; e++) {
        const int      d  = lane * E + e;
        const unsigned lo = kvl_get_code_q(rk + d * RB, xi, bits), hi = kvl_get_code_q(rk + gk.off_xhi, d, bits);
        yx[e]             = xadd(xmul(xs, (float) ((hi << bits) | lo)), xz);
    }
    return xi;
}

/* Stage 1 of the keys of a quantized record (attn_v3_kernel and the prefill's pf_keys_tc): for each
 * 16-channel block ab, the product of 16 tokens' codes (A: INT4 through ldmatrix.trans, product u = hi:
 * tokens tau + hi (+ 8); INT8 / INT2 by byte or word loads, product mt = hi: tokens 16 hi + g8 (+ 8)) with
 * the record's relative scales and the signs of H_16 (B, n-tile nt), the accumulators started at the
 * zero terms (corr). rk: the record in shared memory; shat, corr: the record's relative scales (f16)
 * and stage-1 start values (v3_key_setup). */
template <int NA>
static __device__ __forceinline__ void v3_key_product(float (&acc)[NA][4], const uint8_t * rk, bool nib4, int bits,
                                                      int RB, int hi, int nt, const half * shat, const float * corr,
                                                      uint32_t s01, uint32_t s89, uint32_t k6464) {
    const int lane = threadIdx.x & 31, q4 = lane & 3;
    if (nib4) { /* the codes of 8 channel rows x 32 tokens are one 8x8 b16 matrix (16 bytes a row) */
#pragma unroll
        for (int ab = 0; ab < NA; ab += 2) {
            uint32_t r[4];
            ldsm_x4_trans(r, rk + (16 * ab + lane) * 16);
#pragma unroll
            for (int k = 0; k < 2; k++) {
                const float2 cr = *(const float2 *) (corr + 16 * (ab + k) + 8 * nt + 2 * q4);
                acc[ab + k][0] = cr.x, acc[ab + k][1] = cr.y, acc[ab + k][2] = cr.x, acc[ab + k][3] = cr.y;
                const uint32_t x0 = r[2 * k] >> (8 * hi), x1 = r[2 * k + 1] >> (8 * hi);
                const uint32_t b01 = *(const uint32_t *) (shat + 16 * (ab + k) + 2 * q4) ^ s01;
                const uint32_t b89 = *(const uint32_t *) (shat + 16 * (ab + k) + 2 * q4 + 8) ^ s89;
                mma16816(acc[ab + k], h2_1024_nib(x0, k6464), h2_1024_nib(x0 >> 4, k6464), h2_1024_nib(x1, k6464),
                         h2_1024_nib(x1 >> 4, k6464), b01, b89);
            }
        }
        return;
    }
#pragma unroll
    for (int ab = 0; ab < NA; ab++) { /* INT8 / INT2: two channel rows per A register */
        const float2 cr = *(const float2 *) (corr + 16 * ab + 8 * nt + 2 * q4);
        acc[ab][0] = cr.x, acc[ab][1] = cr.y, acc[ab][2] = cr.x, acc[ab][3] = cr.y;
        const uint8_t * r0 = rk + (16 * ab + 2 * q4) * RB;
        uint32_t        A0, A1, A2, A3;
        key_a_bytes(A0, A1, A2, A3, r0, bits, RB, hi, k6464);
        const uint32_t b01 = *(const uint32_t *) (shat + 16 * ab + 2 * q4) ^ s01;
        const uint32_t b89 = *(const uint32_t *) (shat + 16 * ab + 2 * q4 + 8) ^ s89;
        mma16816(acc[ab], A0, A1, A2, A3, b01, b89);
    }
}

/* RoPE (the tile's R(t), when pre) and the dot products with R(-P0) q: acc[ab][2 hh], acc[ab][2 hh + 1]
 * are the pair (2i, 2i + 1), i = 8 ab + 4 nt + q4 (columns 2 q4, 2 q4 + 1 of the nt-th B tile), of the
 * key at token t0 + 8 hh (accumulator rows g8 and g8 + 8); sc[n][hh] gathers this lane's part of the
 * score of query row n (q0s [MM][D], cst [C][CSTLD] float2). */
template <int D, int MM>
static __device__ __forceinline__ void v3_score_rows(const float (&acc)[D / 16][4], int nt, int q4, int t0, bool pre,
                                                     const float2 * cst, const float * q0s, float (&sc)[MM][2]) {
    constexpr int CSTLD = v3_layout<D, MM>::CSTLD;
#pragma unroll
    for (int ab = 0; ab < D / 16; ab++) {
        const int i = 8 * ab + 4 * nt + q4;
#pragma unroll
        for (int hh = 0; hh < 2; hh++) {
            const int    t  = t0 + 8 * hh;
            const float  x = acc[ab][2 * hh], y = acc[ab][2 * hh + 1];
            const float2 cs = pre ? cst[t * CSTLD + i] : make_float2(1.0f, 0.0f);
#pragma unroll
            for (int n = 0; n < MM; n++) {
                const float2 qq    = *(const float2 *) (q0s + n * D + 2 * i);
                const float  alpha = x * qq.x + y * qq.y, beta = x * qq.y - y * qq.x;
                sc[n][hh] += cs.x * alpha + cs.y * beta;
            }
        }
    }
}

/* Whole scores: the sum over the 4 lanes (q4) of an accumulator row group; the lanes whose token lies
 * in this product (q4 / 2 == sel) keep the score of their row half q4 % 2 in mine. */
template <int MM>
static __device__ __forceinline__ void v3_whole_scores(float (&sc)[MM][2], int q4, int sel, float (&mine)[MM]) {
#pragma unroll
    for (int n = 0; n < MM; n++) {
#pragma unroll
        for (int hh = 0; hh < 2; hh++) {
            sc[n][hh] += __shfl_xor_sync(0xffffffffu, sc[n][hh], 1);
            sc[n][hh] += __shfl_xor_sync(0xffffffffu, sc[n][hh], 2);
        }
        if ((q4 >> 1) == sel) {
            mine[n] = (q4 & 1) ? sc[n][1] : sc[n][0];
        }
    }
}

/* nibbles 4 and 20 of x (bits 4-7 and 20-23) -> half2 (1024 + 16 n4, 1024 + 16 n20): h2_1024_nib's LOP3 for
 * the high nibbles, with no shift (the code enters the product 16 times larger) */
static __device__ __forceinline__ uint32_t h2_1024_nib_hi(uint32_t x, uint32_t k) {
    uint32_t d;
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(x), "n"(0x00f000f0), "r"(k));
    return d;
}

/* Keys stored after RoPE (--kv-keys post): score_t = f_D q . H y_t = f_D (H q) . y_t, y_t = sb rel . code_t + zero,
 * so the Hadamard moves to the query (qh = H q, once per kernel) and a record's keys are one product of its
 * BITS-bit codes with w = qh rel (per channel; B columns 2n, 2n + 1: hi and lo f16 of query row n, in the
 * warp's wq [8][D + 8], columns past 2 MM zero) on tensor cores: 16 mma per record, no per-token transform.
 * The codes enter as 1024 + code (v3_key_product's A fragments; INT4's high nibbles, the rows g8 + 8, as
 * 1024 + 16 code), so a row's sum over f_D sb is its accumulator less 1024 W (W = sum of w), plus
 * Z = sum_c qh_c zero_c / sb. The outlier token is scored apart. s[n]: the score of the lane's token tq. */
template <int D, int MM, int BITS>
static __device__ __forceinline__ void v3_key_post(const uint8_t * rk, const rec_bases & b, float isb, float sbe,
                                                   float f_d, int tq, const float * qh, half * wq, const float * frac,
                                                   uint32_t k6464, float (&s)[MM]) {
    constexpr int  E = D / 32, NA = D / 16, LDW = D + 8, RB = ATT_TILE * BITS / 8;
    const kvl_geom gk   = kvl_geom_k(BITS == 8 ? 1 : BITS == 4 ? 2 : 3, ATT_TILE, D);
    const int      lane = threadIdx.x & 31, g8 = lane >> 2, q4 = lane & 3;
    static_assert(E == 4 || E == 2, "v3_key_post: D 64 or 128");
    /* the lane's E channels: scale and zero codes in one load each (the offsets are multiples of 4) */
    const uint8_t * scp = rk + gk.off_sc + lane * E, *zcp = rk + gk.off_zc + lane * E;
    const uint32_t  scw = E == 4 ? *(const uint32_t *) scp : *(const uint16_t *) scp;
    const uint32_t  zcw = E == 4 ? *(const uint32_t *) zcp : *(const uint16_t *) zcp;
    const float    keep = b.sb > 0.0f ? 1.0f : 0.0f; /* an all-zero record has no scales */
    float          wsum[MM], zsum[MM];
#pragma unroll
    for (int n = 0; n < MM; n++) {
        uint32_t whi[E / 2], wlo[E / 2];
        float    ws = 0.0f, zs = 0.0f;
#pragma unroll
        for (int e = 0; e < E; e++) {
            const unsigned sa  = (scw >> (8 * e)) & 255u;
            /* kvl_scale_rel: FRAC[a % 16] 2^-(a / 16), the power of two by the exponent (exact, no subnormals) */
            const float    rel = __int_as_float(__float_as_int(frac[sa & 15u]) - (int) ((sa >> 4) << 23)) * keep;
            const float    h = qh[n * D + lane * E + e], w = h * rel;
            const half     wh = __float2half_rn(w), wl = __float2half_rn(w - __half2float(wh));
            const uint32_t sh = 16 * (e & 1);
            whi[e / 2]        = (e & 1 ? whi[e / 2] : 0u) | ((uint32_t) __half_as_ushort(wh) << sh);
            wlo[e / 2]        = (e & 1 ? wlo[e / 2] : 0u) | ((uint32_t) __half_as_ushort(wl) << sh);
            ws += __half2float(wh) + __half2float(wl);
            zs += h * (kvl_zero(b.zl, b.zs, (zcw >> (8 * e)) & 255u) * isb);
        }
        if constexpr (E == 4) {
            *(uint2 *) (wq + 2 * n * LDW + lane * E)       = make_uint2(whi[0], whi[1]);
            *(uint2 *) (wq + (2 * n + 1) * LDW + lane * E) = make_uint2(wlo[0], wlo[1]);
        } else {
            *(uint32_t *) (wq + 2 * n * LDW + lane * E)       = whi[0];
            *(uint32_t *) (wq + (2 * n + 1) * LDW + lane * E) = wlo[0];
        }
        wsum[n] = ws, zsum[n] = zs;
    }
    __syncwarp();
    const uint32_t * wb = (const uint32_t *) (wq + g8 * LDW + 2 * q4); /* B column g8, rows 2 q4 (+ 8) */
    float            acc[2][4] = {};
    if constexpr (BITS == 4) {
#pragma unroll
        for (int ab = 0; ab < NA; ab += 2) { /* one ldmatrix.trans per two 16-channel blocks */
            uint32_t r[4];
            ldsm_x4_trans(r, rk + (16 * ab + lane) * 16);
#pragma unroll
            for (int k = 0; k < 2; k++) { /* bytes 0 and 2 of r: product 0; bytes 1 and 3: product 1 */
                const uint32_t b0 = wb[8 * (ab + k)], b1 = wb[8 * (ab + k) + 4];
                const uint32_t x0 = r[2 * k], x1 = r[2 * k + 1], y0 = x0 >> 8, y1 = x1 >> 8;
                mma16816(acc[0], h2_1024_nib(x0, k6464), h2_1024_nib_hi(x0, k6464), h2_1024_nib(x1, k6464),
                         h2_1024_nib_hi(x1, k6464), b0, b1);
                mma16816(acc[1], h2_1024_nib(y0, k6464), h2_1024_nib_hi(y0, k6464), h2_1024_nib(y1, k6464),
                         h2_1024_nib_hi(y1, k6464), b0, b1);
            }
        }
    } else {
#pragma unroll
        for (int ab = 0; ab < NA; ab++) { /* INT8 / INT2: v3_key_product's byte and word loads */
            const uint32_t  b0 = wb[8 * ab], b1 = wb[8 * ab + 4];
            const uint8_t * r0 = rk + (16 * ab + 2 * q4) * RB;
#pragma unroll
            for (int mt = 0; mt < 2; mt++) {
                uint32_t A0, A1, A2, A3;
                key_a_bytes(A0, A1, A2, A3, r0, BITS, RB, mt, k6464);
                mma16816(acc[mt], A0, A1, A2, A3, b0, b1);
            }
        }
    }
    float     yx[E]; /* the outlier token's row, dotted with H q directly */
    const int xi = outlier_row<E>(rk, gk, BITS, RB, yx);
    /* row g8 (+ 8) of product u, columns 2n, 2n + 1 sit in lane 4 g8 + n; this lane's token tq is row half
     * q4 % 2 of product q4 / 2 (both paths' token order, as v3_key_product's) */
    constexpr float FHI = BITS == 4 ? 1.0f / 16.0f : 1.0f; /* INT4's rows g8 + 8 hold 1024 + 16 code */
#pragma unroll
    for (int n = 0; n < MM; n++) {
        float part = 0.0f;
#pragma unroll
        for (int e = 0; e < E; e++) {
            part += qh[n * D + lane * E + e] * yx[e];
        }
        const float sx = warp_sum(part) * f_d;
        const float W = warp_sum(wsum[n]), Z = warp_sum(zsum[n]);
        float       mine = 0.0f;
#pragma unroll
        for (int u = 0; u < 2; u++) {
            const float h0 = __shfl_sync(0xffffffffu, acc[u][0] + acc[u][1], 4 * g8 + n);
            const float h1 = __shfl_sync(0xffffffffu, acc[u][2] + acc[u][3], 4 * g8 + n);
            if ((q4 >> 1) == u) {
                mine = (q4 & 1) ? h1 * FHI + (Z - 1024.0f * FHI * W) : h0 + (Z - 1024.0f * W);
            }
        }
        s[n] = tq == xi ? sx : mine * (sbe * f_d);
    }
}

/* The values' B operand for this lane's token tq: w = p rel 2^14 (p the softmax weight, rel the token's
 * relative scale: w <= 2^14) as hi + lo f16 in one word (products with codes exact in f32). */
static __device__ __forceinline__ uint32_t v3_weight_hilo(const uint8_t * rv, const kvl_geom & gv, int tq, float p,
                                                          const float * frac) {
    const unsigned sa = rv[gv.off_sc + tq];
    const float    w  = p * xmul(frac[sa & 15u], kvl_pow2_neg(sa >> 4)) * 16384.0f;
    const half     wh = __float2half_rn(w);
    const half     wl = __float2half_rn(w - __half2float(wh));
    return (uint32_t) __half_as_ushort(wh) | ((uint32_t) __half_as_ushort(wl) << 16);
}

/* Values of an INT4 record on tensor cores (D 128, one query row), the product transposed: channels
 * as M, the chunk's 32 tokens as K, the weights as N. O[ch] += sum_j p_j scale_j code_j[ch]
 * + sum_j p_j zero_j,g(ch), scale_j = sb rel_j. The codes are token-major rows of 64 bytes (byte B of a
 * row: channels 16 (B / 8) + B % 8 (low nibble) and + 8 (high)); ldmatrix.trans of 8 token rows x 16
 * bytes hands lane (g8, q4) tokens 2 q4, 2 q4 + 1 (low, high half) of bytes 2 g8, 2 g8 + 1, i.e. one
 * half2 of each of 4 channels: a mask makes it an A register, the code c as the f16 subnormal c 2^-24
 * (nibble c = 0, 2) or 16 c 2^-24 (c = 1, 3), exact, no offset to subtract. B: w_j = p_j rel_j 2^14
 * (<= 2^14) as hi + lo f16 in the even / odd columns (every lane's accumulators get hi and lo of two
 * channel rows); products exact, f32 sums. Per 16 tokens 2 ldmatrix.x4 give 8 A tiles = 128 channels:
 * 16 mma per record instead of 32 x (shuffle, load, 4 converts, 4 FMA) per lane. The four lanes of a
 * quad hold the same rows; lane q4 keeps tile x = q4 / 2, row half q4 % 2: orot4[e] is the channel
 * 32 q4 + 16 (g8 / 4) + 2 (g8 % 4) + e / 2 + 8 (e % 2). tq: the lane's token (INT4 key order); p: its
 * weight; vrow: the lane's ldmatrix row offset. */
template <bool NRM>
static __device__ __forceinline__ uint32_t v3_code_h2(uint32_t x, uint32_t m) {
    if (NRM) { /* normal f16: 1024 + c - 1024 (exact) */
        const uint32_t h = (x & m) | 0x64006400u;
        return h2_as_u32(__hsub2(u32_as_h2(h), __floats2half2_rn(1024.0f, 1024.0f)));
    }
    return x & m; /* the subnormal c 2^-24 */
}

template <bool NRM>
static __device__ __forceinline__ void v3_values_int4_tc(const uint8_t * rv, const kvl_geom gv, int NG, int tq,
                                                         int lgrp4, int vrow, float p, const float * frac,
                                                         float (&orot4)[4]) {
    const int       lane = threadIdx.x & 31, g8 = lane >> 2, q4 = lane & 3;
    const rec_bases b    = read_bases(rv + gv.off_bases);
    const uint32_t  pk   = v3_weight_hilo(rv, gv, tq, p, frac);
    float           zs   = 0.0f; /* sum_j p_j zero_j of this lane's group */
    for (int grp = 0; grp < NG; grp++) {
        const float zb = warp_sum(p * kvl_zero(b.zl, b.zs, rv[gv.off_zc + tq * NG + grp]));
        zs             = lgrp4 == grp ? zb : zs;
    }
    const uint32_t bsel = (g8 & 1) ? 0x7632u : 0x5410u; /* column g8: hi (even) or lo (odd) halves */
    float          acc[2][4][4] = {};
#pragma unroll
    for (int ks = 0; ks < 2; ks++) {
        /* B: weights of tokens 16 ks + 2 q4, + 1 (b0) and + 8, + 9 (b1), held by lanes 16 ks + 4 q4 + 0, 2, 1, 3 */
        const int      sl = 16 * ks + 4 * q4;
        const uint32_t u0 = __shfl_sync(0xffffffffu, pk, sl), u1 = __shfl_sync(0xffffffffu, pk, sl + 2);
        const uint32_t u8 = __shfl_sync(0xffffffffu, pk, sl + 1), u9 = __shfl_sync(0xffffffffu, pk, sl + 3);
        const uint32_t b0 = __byte_perm(u0, u1, bsel), b1 = __byte_perm(u8, u9, bsel);
#pragma unroll
        for (int x = 0; x < 2; x++) {
            /* matrices: tokens 16 ks + 0..7 / 8..15 (k halves) x bytes 32 x + 0..15 / 16..31 (row halves) */
            uint32_t r[4];
            ldsm_x4_trans(r, rv + vrow + ks * 16 * 64 + 32 * x);
            uint32_t lo[4], hi[4];
#pragma unroll
            for (int i = 0; i < 4; i++) {
                lo[i] = r[i], hi[i] = r[i] >> 8;
            }
#pragma unroll
            for (int c = 0; c < 4; c++) {
                const uint32_t m = (c & 1) ? 0x00f000f0u : 0x000f000fu;
                const uint32_t(&v)[4] = c < 2 ? lo : hi;
                mma16816(acc[x][c], v3_code_h2<NRM>(v[0], m), v3_code_h2<NRM>(v[1], m), v3_code_h2<NRM>(v[2], m),
                         v3_code_h2<NRM>(v[3], m), b0, b1);
            }
        }
    }
    /* nibble c of the 16-bit word at bytes B, B + 1: channel offsets 0, 8, 1, 9; codes scaled 2^-24 (c even)
     * or 2^-20 (c odd), weights 2^14 */
    const bool  xs = q4 >> 1, hs = q4 & 1;
    const float f0 = xmul(b.sb, NRM ? 1.0f / 16384.0f : 1024.0f), f1 = xmul(b.sb, NRM ? 1.0f / 262144.0f : 64.0f);
#pragma unroll
    for (int c = 0; c < 4; c++) {
        const float s0 = xs ? (hs ? acc[1][c][2] : acc[1][c][0]) : (hs ? acc[0][c][2] : acc[0][c][0]);
        const float s1 = xs ? (hs ? acc[1][c][3] : acc[1][c][1]) : (hs ? acc[0][c][3] : acc[0][c][1]);
        orot4[c] += (s0 + s1) * ((c & 1) ? f1 : f0) + zs;
    }
}

/* Values of an INT2 record on tensor cores (D 128, one query row): v3_values_int4_tc's transposed
 * product for 2-bit codes. A token's row is 32 bytes (byte B: channels 16 (B / 4) + B % 4 + 4 s, at
 * bits 2 s), so one ldmatrix.x4.trans per 16 tokens covers the whole row: lane (g8, q4) receives bytes
 * 2 g8, 2 g8 + 1 (and 16 + ...) of tokens 2 q4, 2 q4 + 1; the pair (byte lb, shift s) picks an A tile,
 * the code c as the f16 subnormal c 4^s 2^-24 by one mask. 16 mma per record. Rows of tile (lb, s):
 * channels 16 (g8 / 2) + 2 (g8 % 2) + lb + 4 s (+ 64 for the second 16 bytes). The lanes holding the
 * tokens follow the INT2 key path (token g8 + 8 q4); the sums reach orot's order (channel 4 lane + e)
 * through the warp's buffer buf (D floats). */
static __device__ __forceinline__ void v3_values_int2_tc(const uint8_t * rv, const kvl_geom gv, int tq, float p,
                                                         const float * frac, float * buf, float (&orot)[4]) {
    const int       lane = threadIdx.x & 31, g8 = lane >> 2, q4 = lane & 3;
    const rec_bases b    = read_bases(rv + gv.off_bases);
    const uint32_t  pk   = v3_weight_hilo(rv, gv, tq, p, frac);
    const uint32_t  bsel = (g8 & 1) ? 0x7632u : 0x5410u; /* column g8: hi (even) or lo (odd) halves */
    const int       vrow = ((lane >> 4) * 8 + (lane & 7)) * 32 + 16 * ((lane >> 3) & 1);
    float           acc[2][4][4] = {};
#pragma unroll
    for (int ks = 0; ks < 2; ks++) {
        /* B: weights of tokens t = 16 ks + 2 q4, + 1 (b0) and + 8, + 9 (b1), held by lanes 4 (t % 8) + t / 8 */
        const int      t0 = 16 * ks + 2 * q4;
        const uint32_t u0 = __shfl_sync(0xffffffffu, pk, 4 * (t0 & 7) + (t0 >> 3));
        const uint32_t u1 = __shfl_sync(0xffffffffu, pk, 4 * ((t0 + 1) & 7) + ((t0 + 1) >> 3));
        const uint32_t u8 = __shfl_sync(0xffffffffu, pk, 4 * (t0 & 7) + ((t0 + 8) >> 3));
        const uint32_t u9 = __shfl_sync(0xffffffffu, pk, 4 * ((t0 + 1) & 7) + ((t0 + 9) >> 3));
        const uint32_t b0 = __byte_perm(u0, u1, bsel), b1 = __byte_perm(u8, u9, bsel);
        uint32_t       r[4];
        ldsm_x4_trans(r, rv + vrow + ks * 16 * 32);
#pragma unroll
        for (int lb = 0; lb < 2; lb++) {
#pragma unroll
            for (int sh = 0; sh < 4; sh++) {
                const uint32_t m = 0x00030003u << (2 * sh);
                mma16816(acc[lb][sh], (r[0] >> (8 * lb)) & m, (r[1] >> (8 * lb)) & m, (r[2] >> (8 * lb)) & m,
                         (r[3] >> (8 * lb)) & m, b0, b1);
            }
        }
    }
    /* codes scaled 4^s 2^-24, weights 2^14: lane q4 writes the tiles of shift s = q4 */
    const float f = xmul(b.sb, kvl_pow2_neg((unsigned) (2 * q4)) * 1024.0f);
#pragma unroll
    for (int lb = 0; lb < 2; lb++) {
#pragma unroll
        for (int rh = 0; rh < 2; rh++) {
            float v = 0.0f;
#pragma unroll
            for (int sh = 0; sh < 4; sh++) {
                v = q4 == sh ? acc[lb][sh][2 * rh] + acc[lb][sh][2 * rh + 1] : v;
            }
            buf[16 * (g8 >> 1) + 2 * (g8 & 1) + lb + 4 * q4 + 64 * rh] = v * f;
        }
    }
    __syncwarp();
    const float4 o = *(const float4 *) (buf + 4 * lane);
    orot[0] += o.x, orot[1] += o.y, orot[2] += o.z, orot[3] += o.w;
    __syncwarp();
}

template <int D, int MM, bool POST>
static __global__ void __launch_bounds__(V3_THREADS, 2)
attn_v3_kernel(const struct moqae_cuda_ring_geom g, const struct moqae_cuda_attn_args a) {
    MOQAE_PDL_ENTER();
    using L = v3_layout<D, MM>;
    constexpr int C = ATT_TILE, E = D / 32, NA = D / 16, CSTLD = L::CSTLD;
    extern __shared__ __align__(128) uint8_t sm[];
    const int     raw_stride = v3_raw_stride(a.raw_bytes, D);
    const int     warp_bytes = 2 * raw_stride + L::warp_fixed;
    const int     tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g8 = lane >> 2, q4 = lane & 3;
    float *       qs   = (float *) (sm + L::qs);
    float2 *      cst  = (float2 *) (sm + L::cst);
    float *       frac = (float *) (sm + L::frac);
    uint8_t *     wb   = sm + L::warps + warp * warp_bytes;
    uint8_t *     raw0 = wb, *raw1 = wb + raw_stride;
    half *        shat = (half *) (wb + 2 * raw_stride);
    float *       corr = (float *) (wb + 2 * raw_stride + D * 2);
    float *       q0s  = (float *) (wb + 2 * raw_stride + D * 6);
    half *        wq   = (half *) (sm + L::cst) + warp * 8 * (D + 8); /* keys after RoPE: the R(t) table's place */
    static_assert(V3_WARPS * 8 * (D + 8) * 2 <= ATT_TILE * L::CSTLD * 8, "v3_key_post's B columns");

    const int       hk = blockIdx.x, split = blockIdx.z;
    const int       m_rows = a.n_head / g.n_head_kv; /* query heads of this KV head (<= MM) */
    const bool      pre = !POST && a.cs_t != nullptr; /* keys before RoPE (POST: launch_v3 found cs_t null) */
    const long long n_past = a.dyn->n_past, own = n_past / C * C;
    const int       n_vis = visible_chunks(a.table, a.dyn->n_chunks, own);
    const int       total = n_vis + 1; /* + the own chunk's tile in the staging window */
    const int       per = (total + a.n_split - 1) / a.n_split;
    const int       s0 = min(total, split * per), s1 = min(total, s0 + per);
    const float     f_d = kvl_rot_factor(D, true);

    for (int e = tid; e < MM * D; e += V3_THREADS) {
        const int n = e / D;
        qs[e]       = n < m_rows ? a.q[(long long) (hk * m_rows + n) * D + e % D] * a.scale : 0.0f;
    }
    if (tid < 16) {
        frac[tid] = kvl_frac((unsigned) tid);
    }
    if (pre) {
#pragma unroll 8 /* the table's loads issued together, coalesced: this setup is every call's fixed cost */
        for (int e = tid; e < C * (D / 2); e += V3_THREADS) {
            const int t = e % C, i = e / C;
            cst[t * CSTLD + i] = make_float2(a.cs_t[(2 * i) * C + t], a.cs_t[(2 * i + 1) * C + t]);
        }
    }
    __syncthreads();

    if constexpr (POST) { /* keys after RoPE: q0s = H q for the whole walk, wq's unused B columns zero (v3_key_post) */
        for (int e = lane; e < (8 - 2 * MM) * (D + 8) / 2; e += 32) {
            ((uint32_t *) (wq + 2 * MM * (D + 8)))[e] = 0u;
        }
#pragma unroll
        for (int n = 0; n < MM; n++) {
            float v[E];
#pragma unroll
            for (int e = 0; e < E; e++) {
                v[e] = qs[n * D + lane * E + e];
            }
            warp_fwht<E>(v, D);
#pragma unroll
            for (int e = 0; e < E; e++) {
                q0s[n * D + lane * E + e] = v[e];
            }
        }
    }

    /* B-fragment signs of H_16[k][n] for k = 2q4 + {0, 1} (+8), n = 8 nt + g8 (half sign bits) */
    uint32_t sg01[2], sg89[2];
#pragma unroll
    for (int nt = 0; nt < 2; nt++) {
        const int n = 8 * nt + g8, k = 2 * q4;
        sg01[nt]    = ((uint32_t) (__popc(k & n) & 1) << 15) | ((uint32_t) (__popc((k + 1) & n) & 1) << 31);
        sg89[nt]    = ((uint32_t) (__popc((k + 8) & n) & 1) << 15) | ((uint32_t) (__popc((k + 9) & n) & 1) << 31);
    }
    float m_run[MM], l_run[MM], op[MM][E], orot[MM][E];
#pragma unroll
    for (int n = 0; n < MM; n++) {
        m_run[n] = -INFINITY, l_run[n] = 0.0f;
#pragma unroll
        for (int e = 0; e < E; e++) {
            op[n][e] = 0.0f, orot[n][e] = 0.0f;
        }
    }
    /* A quantized chunk's token held by this lane after the scores: INT4 keys (ldmatrix path) give the
     * rows g8 and g8 + 8 of the u-th product the tokens tau + u and tau + 8 + u, tau = 2 g8 (+ 8 for
     * g8 >= 4), and the lane keeps u = q4 / 2, row half q4 % 2; INT8 / INT2 keys give the rows of the
     * mt-th product the tokens 16 mt + g8 (+ 8). */
    const int tau = g8 < 4 ? 2 * g8 : 2 * g8 + 8;
    /* value groups: G is a multiple of 16 (kv-codec.h), so a lane's E <= 4 channels lie in one group */
    const int G = POST ? 64 : g.v_group; /* POST: launch_v3 checked that G is 64 (every D v3 takes: kv-codec.h) */
    const int NG = D / G, lgrp = lane * E / G;
    const int tq4 = tau + (q4 >> 1) + 8 * (q4 & 1), tq28 = g8 + 8 * q4;
    const uint32_t k6464 = 0x64006400u | ((uint32_t) a.raw_bytes >> 31); /* raw_bytes >= 0: h2_1024_nib's k */
    /* INT4 values on tensor cores (D 128, MM 1; v3_values_int4_tc): this lane's value channels lie in
     * one 16-channel block, 32 q4 + 16 (g8 / 4); its group, and its ldmatrix row address in a record */
    constexpr bool PV_TC = D == 128 && MM == 1;
    const bool     pv_tc = PV_TC && a.pv_cores != 1;
    const int      lgrp4 = (32 * q4 + 16 * (g8 >> 2)) / G;
    const int      vrow  = ((lane >> 4) * 8 + (lane & 7)) * (D / 2) + 16 * ((lane >> 3) & 1);
    float          orot4[E]; /* INT4 values' rotated sums in v3_values_int4_tc's channel order */
#pragma unroll
    for (int e = 0; e < E; e++) {
        orot4[e] = 0.0f;
    }

    auto issue = [&](int it, uint8_t * buf) {
        if (it < s1 && it < n_vis) {
            const moqae_cuda_chunk ch = a.table[it];
            if (ch.codec != 0) {
                const int       bytes = (int) (g.k_pad[ch.codec] + g.v_pad[ch.codec]);
                const uint8_t * src   = a.arena + ch.off + (long long) hk * bytes;
                for (int o = lane * 16; o < bytes; o += 512) {
                    cp_async16(buf + o, src + o);
                }
                if (pre) {
                    const uint8_t * cs = (const uint8_t *) (a.cs_p0 + (long long) it * D);
                    for (int o = lane * 16; o < D * 4; o += 512) {
                        cp_async16(buf + raw_stride - D * 4 + o, cs + o);
                    }
                }
            }
        }
        cp_async_commit();
    };

    /* The warp's walk over its tiles s0 + warp + V3_WARPS j: its INT4 chunks first (pass 0), then the
     * others and the staging tile (pass 1), so that the warps of an SM run one key and value path at a
     * time (a ring of mixed codecs otherwise stalls a third of the cycles on instruction fetch: the
     * paths together exceed the instruction cache). Candidates are tested 32 at a time (one table
     * load per lane, a ballot); the order is fixed, so results repeat from run to run. */
    constexpr int PASS1 = 1 << 30;                           /* window base | PASS1 in pass 1 */
    unsigned *    walk  = (unsigned *) (sm + L::walk) + 2 * warp; /* base, mask: in shared memory, v3
                                                                    is at its 128 registers */
    auto window = [&](int base) { /* candidates base + V3_WARPS j, j < 32 */
        const int t = (base & (PASS1 - 1)) + V3_WARPS * lane;
        bool      m = false;
        if (t < s1) {
            const bool q4 = t < n_vis && a.table[t].codec == 2; /* MOQAE_KV_CODEC_Q4 */
            m             = a.walk_mixed ? base < PASS1 : (base < PASS1) == q4;
        }
        walk[0] = (unsigned) base; /* every lane writes the same values and reads its own */
        walk[1] = __ballot_sync(0xffffffffu, m);
    };
    auto advance = [&]() -> int { /* the walk's next tile, or s1 at its end */
        for (;;) {
            const int      base = (int) walk[0];
            const unsigned mask = walk[1];
            if (mask) {
                walk[1] = mask & (mask - 1);
                return (base & (PASS1 - 1)) + V3_WARPS * (__ffs(mask) - 1);
            }
            if ((base & (PASS1 - 1)) + V3_WARPS * 32 < s1) {
                window(base + V3_WARPS * 32);
            } else if (base < PASS1) {
                window((s0 + warp) | PASS1);
            } else {
                return s1;
            }
        }
    };
    window(s0 + warp);
    int it = advance();
    issue(it, raw0);
    for (int k = 0; it < s1; k++) {
        uint8_t * cur = (k & 1) ? raw1 : raw0;
        const int nx  = advance();
        issue(nx, (k & 1) ? raw0 : raw1);
        cp_async_wait1();
        __syncwarp();
        const bool       ring = it < n_vis;
        moqae_cuda_chunk ch   = {};
        if (ring) {
            ch = a.table[it];
        }
        const bool      quant = ring && ch.codec != 0;
        const bool      nib4  = ch.codec == 2; /* MOQAE_KV_CODEC_Q4 */
        const int       tq    = nib4 ? tq4 : tq28;
        const long long tile_pos = ring ? ch.pos : own;
        float           s[MM], p[MM];

        /* ---- scores ---- */
        if (quant) {
            const uint8_t * rk   = cur;
            const kvl_geom  gk   = kvl_geom_k(ch.codec, C, D);
            const int       bits = gk.bits, RB = C * bits / 8;
            const rec_bases b    = read_bases(rk + gk.off_bases);
            const float     sbe  = b.sb > 0.0f ? b.sb : 1.0f, isb = 1.0f / sbe;
            const float2 *  csp  = (const float2 *) (cur + raw_stride - D * 4);
            if constexpr (POST) {
                if (nib4) {
                    v3_key_post<D, MM, 4>(rk, b, isb, sbe, f_d, tq, q0s, wq, frac, k6464, s);
                } else if (bits == 8) {
                    v3_key_post<D, MM, 8>(rk, b, isb, sbe, f_d, tq, q0s, wq, frac, k6464, s);
                } else {
                    v3_key_post<D, MM, 2>(rk, b, isb, sbe, f_d, tq, q0s, wq, frac, k6464, s);
                }
            } else {
                float mine[MM]; /* this lane's token tq */
                /* kvl_scale_rel with the FRAC table in shared memory */
                key_channel_setup<E>(rk, gk, b, isb, shat, corr,
                                     [&](unsigned sa) { return xmul(frac[sa & 15u], kvl_pow2_neg(sa >> 4)); });
#pragma unroll
                for (int pp = 0; pp < E / 2; pp++) { /* R(-P0) q for the lane's pairs */
                    const int    i  = lane * (E / 2) + pp;
                    const float2 c0 = pre ? csp[i] : make_float2(1.0f, 0.0f);
#pragma unroll
                    for (int n = 0; n < MM; n++) {
                        const float qu = qs[n * D + 2 * i], qw = qs[n * D + 2 * i + 1];
                        q0s[n * D + 2 * i]     = qu * c0.x + qw * c0.y;
                        q0s[n * D + 2 * i + 1] = qw * c0.x - qu * c0.y;
                    }
                }
                __syncwarp();
                if (nib4) {
                    /* INT4: the codes of 8 channel rows x 32 tokens are one 8x8 b16 matrix (16 bytes a row);
                     * ldmatrix.trans hands lane (g8, q4) channels 2 q4, 2 q4 + 1 of bytes 2 g8 and 2 g8 + 1, i.e.
                     * tokens tau, tau + 1 (low nibbles) and tau + 8, tau + 9 (high nibbles): byte u of the
                     * pair is the u-th product's A fragment, one mask per register. */
#pragma unroll 1
                    for (int u = 0; u < 2; u++) {
                        float sc[MM][2];
#pragma unroll
                        for (int n = 0; n < MM; n++) {
                            sc[n][0] = sc[n][1] = 0.0f;
                        }
#pragma unroll 1
                        for (int nt = 0; nt < 2; nt++) {
                            const uint32_t s01 = nt ? sg01[1] : sg01[0], s89 = nt ? sg89[1] : sg89[0];
                            float          acc[NA][4];
                            v3_key_product<NA>(acc, rk, true, 4, RB, u, nt, shat, corr, s01, s89, k6464);
                            v3_stage2(acc);
                            v3_score_rows<D, MM>(acc, nt, q4, tau + u, pre, cst, q0s, sc);
                        }
                        v3_whole_scores(sc, q4, u, mine);
                    }
                } else { /* INT8 / INT2: byte loads, two channel rows per A register */
#pragma unroll 1
                    for (int mt = 0; mt < 2; mt++) {
                        float sc[MM][2];
#pragma unroll
                        for (int n = 0; n < MM; n++) {
                            sc[n][0] = sc[n][1] = 0.0f;
                        }
#pragma unroll
                        for (int nt = 0; nt < 2; nt++) {
                            float acc[NA][4];
                            v3_key_product<NA>(acc, rk, false, bits, RB, mt, nt, shat, corr, sg01[nt], sg89[nt], k6464);
                            v3_stage2(acc);
                            v3_score_rows<D, MM>(acc, nt, q4, 16 * mt + g8, pre, cst, q0s, sc);
                        }
                        v3_whole_scores(sc, q4, mt, mine);
                    }
                }
                float     yx[E]; /* the outlier token, scored apart */
                const int xi = outlier_row<E>(rk, gk, bits, RB, yx);
                warp_fwht<E>(yx, D);
#pragma unroll
                for (int n = 0; n < MM; n++) {
                    float part = 0.0f;
#pragma unroll
                    for (int pp = 0; pp < E / 2; pp++) {
                        const int    i  = lane * (E / 2) + pp;
                        const float2 qq = *(const float2 *) (q0s + n * D + 2 * i);
                        const float2 cs = pre ? cst[xi * CSTLD + i] : make_float2(1.0f, 0.0f);
                        const float  x = yx[2 * pp], y = yx[2 * pp + 1];
                        part += cs.x * (x * qq.x + y * qq.y) + cs.y * (x * qq.y - y * qq.x);
                    }
                    const float sx = warp_sum(part) * f_d;
                    s[n]           = tq == xi ? sx : mine[n] * (sbe * f_d);
                }
            }
        } else {
            /* FP16 record (K^T [D][C], after RoPE) or the staging window (rows, after RoPE): lane = token */
#pragma unroll
            for (int n = 0; n < MM; n++) {
                s[n] = 0.0f;
            }
            if (ring) {
                const uint16_t * kt = (const uint16_t *) (a.arena + ch.off + (long long) hk * (g.k_pad[0] + g.v_pad[0]));
#pragma unroll 8
                for (int d = 0; d < D; d++) {
                    const float kv = moqae_dev_f16_to_f32(kt[d * C + lane]);
#pragma unroll
                    for (int n = 0; n < MM; n++) {
                        s[n] += qs[n * D + d] * kv;
                    }
                }
            } else {
                const uint16_t * row = a.stage_k + ((long long) hk * g.stage_rows + (tile_pos + lane) % g.stage_rows) * D;
#pragma unroll 4
                for (int d = 0; d < D; d += 8) {
                    const uint4 w = *(const uint4 *) (row + d);
                    const uint32_t ww[4] = { w.x, w.y, w.z, w.w };
#pragma unroll
                    for (int u = 0; u < 4; u++) {
                        const float2 kv = __half22float2(*(const half2 *) &ww[u]);
#pragma unroll
                        for (int n = 0; n < MM; n++) {
                            s[n] += qs[n * D + d + 2 * u] * kv.x + qs[n * D + d + 2 * u + 1] * kv.y;
                        }
                    }
                }
                if (tile_pos + lane > n_past) {
#pragma unroll
                    for (int n = 0; n < MM; n++) {
                        s[n] = -INFINITY;
                    }
                }
            }
        }

        /* ---- online softmax over the tile (one token per lane) ---- */
#pragma unroll
        for (int n = 0; n < MM; n++) {
            const float mx    = warp_max(s[n]);
            const float m_new = fmaxf(m_run[n], mx);
            const float cr    = m_run[n] == -INFINITY ? 0.0f : expf(m_run[n] - m_new);
            p[n]              = s[n] == -INFINITY ? 0.0f : expf(s[n] - m_new);
            l_run[n]          = l_run[n] * cr + warp_sum(p[n]);
            m_run[n]          = m_new;
#pragma unroll
            for (int e = 0; e < E; e++) {
                op[n][e] *= cr, orot[n][e] *= cr;
            }
            if constexpr (PV_TC) {
#pragma unroll
                for (int e = 0; e < E; e++) {
                    orot4[e] *= cr;
                }
            }
        }

        /* ---- values ---- */
        bool pv_done = false;
        if constexpr (PV_TC) {
            if (quant && nib4 && pv_tc) {
                const uint8_t * rv = cur + g.k_pad[ch.codec];
                const kvl_geom  gv = kvl_geom_v(2, C, D, G);
                if (a.pv_cores == 2) {
                    v3_values_int4_tc<true>(rv, gv, NG, tq, lgrp4, vrow, p[0], frac, orot4);
                } else {
                    v3_values_int4_tc<false>(rv, gv, NG, tq, lgrp4, vrow, p[0], frac, orot4);
                }
                pv_done = true;
            }
        }
        if (pv_done) {
        } else if (quant) {
            const uint8_t * rv   = cur + g.k_pad[ch.codec];
            const kvl_geom  gv   = kvl_geom_v(ch.codec, C, D, G);
            const int       bits = gv.bits, RBv = D * bits / 8, d0 = lane * E;
            const rec_bases b    = read_bases(rv + gv.off_bases);
            const unsigned  sa   = rv[gv.off_sc + tq]; /* kvl_scale, FRAC from shared memory */
            const float     vsc  = xmul(xmul(b.sb, frac[sa & 15u]), kvl_pow2_neg(sa >> 4));
            float           pv[MM];
#pragma unroll
            for (int n = 0; n < MM; n++) {
                pv[n] = p[n] * vsc;
            }
            for (int grp = 0; grp < NG; grp++) { /* sum_j p_j zero_j per value group */
                const float z = kvl_zero(b.zl, b.zs, rv[gv.off_zc + tq * NG + grp]);
#pragma unroll
                for (int n = 0; n < MM; n++) {
                    const float zb = warp_sum(p[n] * z);
                    if (lgrp == grp) {
#pragma unroll
                        for (int e = 0; e < E; e++) {
                            orot[n][e] += zb;
                        }
                    }
                }
            }
            bool tc2 = false;
            if constexpr (PV_TC) { /* INT2 codes on tensor cores; corr is free until the next chunk's keys */
                if (pv_tc && bits == 2 && a.pv_cores != 3) {
                    v3_values_int2_tc(rv, gv, tq, p[0], frac, corr, orot[0]);
                    tc2 = true;
                }
            }
            const int      off = kvl_code_byte_q(d0, bits), sh = kvl_code_shift_q(d0, bits);
            const uint32_t msk = bits == 8 ? 0xffffffffu : bits == 4 ? 0x0f0f0f0fu : 0x03030303u;
            if (!tc2) {
#pragma unroll
                for (int j = 0; j < C; j++) {
                    const int r8 = j & 7, src = nib4 ? 4 * ((r8 >> 1) + 4 * (j >> 4)) + 2 * (r8 & 1) + ((j >> 3) & 1)
                                                     : (r8 << 2) | (j >> 3); /* the lane holding token j */
                    float     pj[MM];
#pragma unroll
                    for (int n = 0; n < MM; n++) {
                        pj[n] = __shfl_sync(0xffffffffu, pv[n], src);
                    }
                    const uint8_t * rp = rv + j * RBv + off;
                    uint32_t        w  = E == 4 ? *(const uint32_t *) rp : (uint32_t) *(const uint16_t *) rp;
                    w                  = (w >> sh) & msk;
#pragma unroll
                    for (int e = 0; e < E; e++) {
                        const float cf = __int_as_float((int) __byte_perm(w, 0x4b000000u, 0x7440 + e)) - 8388608.0f;
#pragma unroll
                        for (int n = 0; n < MM; n++) {
                            orot[n][e] += pj[n] * cf;
                        }
                    }
                }
            }
        } else {
            const uint16_t * vbase;
            if (ring) {
                vbase = (const uint16_t *) (a.arena + ch.off + (long long) hk * (g.k_pad[0] + g.v_pad[0]) + g.k_pad[0]);
            } else {
                vbase = a.stage_v + (long long) hk * g.stage_rows * D;
            }
            const int srows = (int) g.stage_rows, sbase = ring ? 0 : (int) (tile_pos % g.stage_rows); /* one 64-bit modulo */
#pragma unroll 4
            for (int j = 0; j < C; j++) {
                float pj[MM];
#pragma unroll
                for (int n = 0; n < MM; n++) {
                    pj[n] = __shfl_sync(0xffffffffu, p[n], j);
                }
                const int        rj   = sbase + j, rowi = rj >= srows && !ring ? rj - srows : rj;
                const uint16_t * rp   = vbase + rowi * D + lane * E;
                float            vv[E];
                if constexpr (E == 4) {
                    const uint2  w  = *(const uint2 *) rp;
                    const float2 v0 = __half22float2(*(const half2 *) &w.x), v1 = __half22float2(*(const half2 *) &w.y);
                    vv[0] = v0.x, vv[1] = v0.y, vv[2] = v1.x, vv[3] = v1.y;
                } else {
                    const uint32_t w  = *(const uint32_t *) rp;
                    const float2   v0 = __half22float2(*(const half2 *) &w);
                    vv[0] = v0.x, vv[1] = v0.y;
                }
#pragma unroll
                for (int n = 0; n < MM; n++) {
#pragma unroll
                    for (int e = 0; e < E; e++) {
                        op[n][e] += pj[n] * vv[e];
                    }
                }
            }
        }
        __syncwarp(); /* every lane is done with cur before it is refilled */
        it = nx;
    }
    cp_async_wait0();
    if constexpr (PV_TC) { /* INT4 value sums into the lane-channel order (channel 4 lane + e), through raw0 */
        __syncwarp();
        float * ob = (float *) raw0;
#pragma unroll
        for (int e = 0; e < E; e++) {
            ob[32 * q4 + 16 * (g8 >> 2) + 2 * (g8 & 3) + (e >> 1) + 8 * (e & 1)] = orot4[e];
        }
        __syncwarp();
#pragma unroll
        for (int e = 0; e < E; e++) {
            orot[0][e] += ob[lane * E + e];
        }
    }

    /* the warp's rotated value sums turned back, then the block's warps merged */
    {
        const int   nb = kvl_rot_block(G);
        const float fg = kvl_rot_factor(nb, true);
#pragma unroll
        for (int n = 0; n < MM; n++) {
            warp_fwht<E>(orot[n], nb);
#pragma unroll
            for (int e = 0; e < E; e++) {
                op[n][e] += orot[n][e] * fg;
            }
        }
    }
    __syncthreads(); /* the copy buffers become the merge area */
    float * mw = (float *) (sm + L::warps);     /* [V3_WARPS][MM] running max       */
    float * lw = mw + V3_WARPS * MM;           /* [V3_WARPS][MM] running sum       */
    float * ow = lw + V3_WARPS * MM;           /* [V3_WARPS][MM][D] outputs        */
    if (lane == 0) {
#pragma unroll
        for (int n = 0; n < MM; n++) {
            mw[warp * MM + n] = m_run[n];
            lw[warp * MM + n] = l_run[n];
        }
    }
#pragma unroll
    for (int n = 0; n < MM; n++) {
#pragma unroll
        for (int e = 0; e < E; e++) {
            ow[(warp * MM + n) * D + lane * E + e] = op[n][e];
        }
    }
    __syncthreads();
    for (int idx = tid; idx < m_rows * D; idx += V3_THREADS) {
        const int n = idx / D, d = idx % D;
        float     mx = -INFINITY;
        for (int w = 0; w < V3_WARPS; w++) {
            mx = fmaxf(mx, mw[w * MM + n]);
        }
        float o = 0.0f, l = 0.0f;
        if (mx != -INFINITY) {
            for (int w = 0; w < V3_WARPS; w++) {
                const float mv = mw[w * MM + n];
                if (mv != -INFINITY) {
                    const float f = expf(mv - mx);
                    o += f * ow[(w * MM + n) * D + d];
                    l += f * lw[w * MM + n];
                }
            }
        }
        if (a.n_split == 1) {
            a.out[(long long) (hk * m_rows + n) * D + d] = o / l;
        } else {
            const long long row = ((long long) split * g.n_head_kv + hk) * m_rows + n;
            a.part[row * (D + 2) + d] = o;
            if (d == 0) {
                a.part[row * (D + 2) + D]     = mx;
                a.part[row * (D + 2) + D + 1] = l;
            }
        }
    }
}

/* ================================================================================================
 * Prefill: 256 query rows per block, one tile decoded per 256 rows, scores and weights in registers
 * ================================================================================================
 * The generic kernel's rule and tile walk, for micro-batches (n_tok > 4): the block's 16 warps decode
 * a tile into shared memory together (f16 keys after RoPE, values turned back; a quantized record's
 * keys on tensor cores by warps 0-3 (pf_keys_tc), its outlier key row by warp 4, its values by the
 * others), the next tile into the other buffer while this one is multiplied; then each warp takes
 * 16 query rows: S = Q K^T (mma m16n8k16, Q as hi + lo f16 from shared memory, K by ldmatrix), the
 * mask and the online softmax on the accumulators, P (hi + lo) straight from the accumulators into
 * the A fragments of O += P V (V by ldmatrix.trans), O in registers for the whole walk (FlashAttention-2's
 * order). The generic kernel kept S, P and O in shared memory with a barrier between each step, and
 * took 64 rows per tile decode. */

static int pf_warps() { /* MOQAE_CUDA_PF=128: 8 warps (128 rows) per block, 2 blocks per SM */
    static const int w = strcmp(moqae_cuda_switch("MOQAE_CUDA_PF"), "128") ? 16 : 8;
    return w;
}

/* W warps of 16 rows each: 16 (256 rows, the default) or 8 (MOQAE_CUDA_PF=128) */
template <int D, int W> struct pf_layout {
    static constexpr int ROWS  = 16 * W;
    static constexpr int LDH   = D + 8; /* halves per row: 16-byte rows 4 banks apart (ldmatrix without conflicts) */
    static constexpr int q     = 0;
    static constexpr int ql    = q + ROWS * LDH * 2;
    static constexpr int k     = ql + ROWS * LDH * 2;           /* two buffers of K [C][LDH] and V [C][LDH] */
    static constexpr int v     = k + ATT_TILE * LDH * 2;
    static constexpr int kvb   = 2 * ATT_TILE * LDH * 2;         /* the second buffer's offset */
    static constexpr int cst   = k + 2 * kvb; /* R(t): [C][D/2] float2 (cs_t transposed) */
    /* the 4 key warps' scratch (pf_keys_tc): a key record (INT8 at most: D C codes + 3 D + 11 bytes), then
     * the relative scales (f16) and the stage-1 start values (f32) */
    static constexpr int KRAW  = D * ATT_TILE + 4 * D + 64;
    static constexpr int KW    = KRAW + D * 2 + D * 4;
    static constexpr int kw    = cst + ATT_TILE * (D / 2) * 8;
    static constexpr int bytes = kw + 4 * KW;
};

/* Four 8x8 b16 matrices from shared memory (sa: a shared-space address): lane l gives the address of
 * row l % 8 of matrix l / 8 and receives, from matrix i, row l / 4, columns 2 (l % 4) and 2 (l % 4) + 1,
 * in r[i]; _t: ldsm_x4_trans's. */
static __device__ __forceinline__ void ldsm_x4_at(uint32_t (&r)[4], unsigned sa) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(sa));
}

static __device__ __forceinline__ void ldsm_x4_trans_at(uint32_t (&r)[4], unsigned sa) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(sa));
}

static __device__ __forceinline__ uint32_t pack_h2(float lo_col, float hi_col) {
    return h2_as_u32(__floats2half2_rn(lo_col, hi_col));
}

static __device__ __forceinline__ uint32_t pack_h2_rest(float a, float b) { /* what f16 rounding left of (a, b) */
    const float2 r = __half22float2(__floats2half2_rn(a, b));
    return h2_as_u32(__floats2half2_rn(a - r.x, b - r.y));
}

/* Keys of a quantized record on tensor cores for the prefill kernel, written as f16 after RoPE: v3's
 * stage 1 (the 16-point inverse Hadamard in mma m16n8k16, codes straight into the A fragments, the
 * relative scales with the signs in B, the accumulators started at the zero terms) and stage 2 (the
 * D/16-point butterflies in registers), then times sb f_D, R(t) and R(P0). unit 0..3 is v3's (u, nt) of
 * the INT4 path or (mt, nt) of the INT8 / INT2 path: 16 tokens x D/2 channels. rk: the key record in
 * the warp's shared scratch (16-byte aligned); shat, corr: the warp's scratch. The outlier token is
 * not written (its codes are the low bits of a wider code: the caller decodes it apart). */
template <int D>
static __device__ void pf_keys_tc(const uint8_t * rk, int codec, int unit, const float2 * cst, const float * cs_p0c,
                                  half * kd, int ld, half * shat, float * corr, uint32_t k6464) {
    constexpr int   C = ATT_TILE, E = D / 32, NA = D / 16;
    const int       lane = threadIdx.x & 31, g8 = lane >> 2, q4 = lane & 3;
    const kvl_geom  gk   = kvl_geom_k(codec, C, D);
    const int       bits = gk.bits, RB = C * bits / 8, xi = rk[gk.off_x + 4];
    const rec_bases b    = read_bases(rk + gk.off_bases);
    const float     sbe = b.sb > 0.0f ? b.sb : 1.0f, isb = 1.0f / sbe;
    key_channel_setup<E>(rk, gk, b, isb, shat, corr, [](unsigned sa) { return kvl_scale_rel(sa); });
    __syncwarp();
    const int nt = unit & 1, hi = unit >> 1; /* hi: u (INT4) or mt (INT8 / INT2) */
    uint32_t  s01, s89;                      /* B-fragment signs of H_16 (attn_v3_kernel's sg01 / sg89) */
    {
        const int n = 8 * nt + g8, k = 2 * q4;
        s01         = ((uint32_t) (__popc(k & n) & 1) << 15) | ((uint32_t) (__popc((k + 1) & n) & 1) << 31);
        s89         = ((uint32_t) (__popc((k + 8) & n) & 1) << 15) | ((uint32_t) (__popc((k + 9) & n) & 1) << 31);
    }
    float acc[NA][4];
    v3_key_product<NA>(acc, rk, codec == 2 /* MOQAE_KV_CODEC_Q4 */, bits, RB, hi, nt, shat, corr, s01, s89, k6464);
    v3_stage2(acc);
    /* accumulator row half hh holds token t (v3_score_rows' t0 + 8 hh), the pair (2i, 2i + 1), i = 8 ab + 4 nt + q4 */
    const float f   = sbe * kvl_rot_factor(D, true);
    const int   tau = g8 < 4 ? 2 * g8 : 2 * g8 + 8;
#pragma unroll
    for (int hh = 0; hh < 2; hh++) {
        const int t = codec == 2 ? tau + hi + 8 * hh : 16 * hi + g8 + 8 * hh;
        if (t == xi) {
            continue;
        }
#pragma unroll
        for (int ab = 0; ab < NA; ab++) {
            const int i = 8 * ab + 4 * nt + q4;
            float     x = acc[ab][2 * hh] * f, y = acc[ab][2 * hh + 1] * f;
            if (cst) { /* R(t), then R(P0), as gen_decode_k */
                const float2 t1 = cst[t * (D / 2) + i];
                const float  c0 = cs_p0c[2 * i], s0 = cs_p0c[2 * i + 1];
                const float  x1 = x * t1.x - y * t1.y, y1 = x * t1.y + y * t1.x;
                x = x1 * c0 - y1 * s0;
                y = x1 * s0 + y1 * c0;
            }
            *(half2 *) (kd + t * ld + 2 * i) = __floats2half2_rn(x, y);
        }
    }
}

template <int D, int W>
static __global__ void __launch_bounds__(32 * W, 16 / W)
attn_pf_kernel(const struct moqae_cuda_ring_geom g, const struct moqae_cuda_attn_args a, int tpb) {
    MOQAE_PDL_ENTER();
    using L = pf_layout<D, W>;
    constexpr int LDH = L::LDH, C = ATT_TILE, NO = D / 8, PF_ROWS = L::ROWS, PF_THREADS = 32 * W;
    extern __shared__ __align__(128) uint8_t sm[];
    half *    qs = (half *) (sm + L::q), *qsl = (half *) (sm + L::ql), *ks = (half *) (sm + L::k), *vs = (half *) (sm + L::v);
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g8 = lane >> 2, q4 = lane & 3;
    const int       hk = blockIdx.x, qt = blockIdx.y, split = blockIdx.z;
    const int       group = a.n_head / g.n_head_kv;
    const long long n_past = a.dyn->n_past;
    const tile_walk w = tile_walk_of(a, tpb);
    const int       t_first = w.t_first, t_last = w.t_last, n_vis = w.n_vis, s0 = w.s0, s1 = w.s1;
    const long long p_last = w.p_last, own_first = w.own_first;

    load_q_split<D, PF_THREADS, false>(a, w, hk, group, tpb, PF_ROWS, a.scale, qs, qsl, LDH, nullptr, 0);
    float2 * cst = a.cs_t ? (float2 *) (sm + L::cst) : nullptr; /* a row's pairs in consecutive words */
    const uint32_t k6464 = 0x64006400u | ((uint32_t) a.raw_bytes >> 31); /* raw_bytes >= 0: h2_1024_nib's k */
    if (cst) {
        for (int e = tid; e < C * (D / 2); e += PF_THREADS) {
            const int t = e % C, i = e / C;
            cst[t * (D / 2) + i] = make_float2(a.cs_t[(2 * i) * C + t], a.cs_t[(2 * i + 1) * C + t]);
        }
    }
    /* this lane's rows: 16 warp + g8 (+ 8); their positions and own chunks, relative to own_first (a
     * micro-batch's span, int; ring tiles lie before it) */
    bool row_ok[2];
    int  p_row[2], own_row[2];
#pragma unroll
    for (int rr = 0; rr < 2; rr++) {
        const int       r = 16 * warp + g8 + 8 * rr, t = t_first + r / group;
        const long long p = n_past + min(t, t_last);
        row_ok[rr]        = r < tpb * group && t <= t_last;
        p_row[rr]         = (int) (p - own_first);
        own_row[rr]       = (int) (p / C * C - own_first);
    }
    float m_run[2] = { -INFINITY, -INFINITY }, l_run[2] = { 0.0f, 0.0f };
    float o[NO][4];
#pragma unroll
    for (int n = 0; n < NO; n++) {
        o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
    }
    /* ldmatrix row addresses (shared space, bytes): Q rows 16 warp + l % 16, channels 8 (l / 16); K keys
     * l % 8 + 8 (l / 16), channels 8 ((l / 8) % 2); V keys l % 8 + 8 ((l / 8) % 2), channels 8 (l / 16) */
    const unsigned qa_at  = (unsigned) __cvta_generic_to_shared(qs + (16 * warp + (lane & 15)) * LDH + 8 * (lane >> 4));
    const unsigned qla_at = qa_at + (L::ql - L::q);
    const unsigned kb_at  = (unsigned) __cvta_generic_to_shared(ks + ((lane & 7) + 8 * (lane >> 4)) * LDH + 8 * ((lane >> 3) & 1));
    const unsigned vb_at  = (unsigned) __cvta_generic_to_shared(vs + ((lane & 7) + 8 * ((lane >> 3) & 1)) * LDH + 8 * (lane >> 4));

    /* tile it into buffer b (K after RoPE, V turned back, f16) */
    auto decode = [&](int it, int b) {
        half * kd = ks + b * (L::kvb / 2), *vd = vs + b * (L::kvb / 2);
        if (it < n_vis) {
            const moqae_cuda_chunk ch    = a.table[it];
            const uint8_t *        rec   = a.arena + ch.off + (long long) hk * (g.k_pad[ch.codec] + g.v_pad[ch.codec]);
            const float *          cs_p0 = a.cs_t ? a.cs_p0 + (long long) it * D : nullptr;
            if (ch.codec == 0 || a.pf_keys_gen) {
                gen_decode_chunk<D, PF_THREADS>(g, rec, ch.codec, a.cs_t, cs_p0, kd, vd, LDH, cst);
            } else if (warp < 4) { /* keys on tensor cores, a quarter each */
                uint8_t * kw = sm + L::kw + warp * L::KW;
                for (int off = lane * 16; off < (int) g.k_pad[ch.codec]; off += 512) {
                    *(uint4 *) (kw + off) = *(const uint4 *) (rec + off);
                }
                __syncwarp();
                pf_keys_tc<D>(kw, ch.codec, warp, cst, cs_p0, kd, LDH, (half *) (kw + L::KRAW),
                              (float *) (kw + L::KRAW + D * 2), k6464);
            } else if (warp == 4) { /* the outlier key token */
                const int xi = rec[kvl_geom_k(ch.codec, C, D).off_x + 4];
                gen_decode_k<D, PF_THREADS>(rec, ch.codec, a.cs_t, cs_p0, kd, LDH, cst, xi, C);
            } else {
                gen_decode_v<D, PF_THREADS>(rec + g.k_pad[ch.codec], ch.codec, g.v_group, vd, LDH, warp - 5, W - 5);
            }
        } else {
            const long long tile_pos = own_first + (long long) (it - n_vis) * C;
            const int       nvalid   = (int) min((long long) C, p_last - tile_pos + 1);
            copy_rows_f16<D, PF_THREADS>(a.stage_k + (long long) hk * g.stage_rows * D, tile_pos, g.stage_rows, nvalid, kd, LDH);
            copy_rows_f16<D, PF_THREADS>(a.stage_v + (long long) hk * g.stage_rows * D, tile_pos, g.stage_rows, nvalid, vd, LDH);
        }
    };
    /* One barrier per tile: the next tile is decoded into the other buffer before this one's products,
     * so that warps done with their share of the decode go on to the tensor cores. */
    __syncthreads(); /* Q and the RoPE table are written */
    if (s0 < s1) {
        decode(s0, 0);
    }
    for (int it = s0; it < s1; it++) {
        const bool ring = it < n_vis;
        const int  b    = (it - s0) & 1;
        __syncthreads(); /* tile it is decoded; the other buffer's last tile is consumed */
        if (it + 1 < s1) {
            decode(it + 1, b ^ 1);
        }
        const long long tile_pos = ring ? a.table[it].pos : own_first + (long long) (it - n_vis) * C;
        const int tile_rel = (int) max(tile_pos - own_first, -(1LL << 30)); /* ring tiles: only its sign matters */
        const unsigned kb_b = kb_at + b * L::kvb, vb_b = vb_at + b * L::kvb;
        /* S = (Q scale) K^T: 16 rows x 32 keys, four n-tiles of 8 keys */
        float s[4][4];
#pragma unroll
        for (int n = 0; n < 4; n++) {
            s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
        }
#pragma unroll
        for (int kk = 0; kk < D / 16; kk++) {
            uint32_t qa[4], ql[4];
            ldsm_x4_at(qa, qa_at + 32 * kk);
            ldsm_x4_at(ql, qla_at + 32 * kk);
#pragma unroll
            for (int np = 0; np < 2; np++) { /* keys 16 np + 0..7 (b: matrices 0, 1) and + 8..15 (2, 3) */
                uint32_t kb[4];
                ldsm_x4_at(kb, kb_b + 2 * (16 * np * LDH + 16 * kk));
                mma16816(s[2 * np], qa[0], qa[1], qa[2], qa[3], kb[0], kb[1]);
                mma16816(s[2 * np], ql[0], ql[1], ql[2], ql[3], kb[0], kb[1]);
                mma16816(s[2 * np + 1], qa[0], qa[1], qa[2], qa[3], kb[2], kb[3]);
                mma16816(s[2 * np + 1], ql[0], ql[1], ql[2], ql[3], kb[2], kb[3]);
            }
        }
        /* the rule (kv-cache.h): a ring chunk before the row's own chunk, the row's own tokens up to it */
#pragma unroll
        for (int rr = 0; rr < 2; rr++) {
            const bool vis_ring = row_ok[rr] && tile_rel < own_row[rr];
#pragma unroll
            for (int n = 0; n < 4; n++) {
#pragma unroll
                for (int c = 0; c < 2; c++) {
                    const int kp = tile_rel + 8 * n + 2 * q4 + c;
                    const bool      ok = ring ? vis_ring : row_ok[rr] && kp >= own_row[rr] && kp <= p_row[rr];
                    s[n][2 * rr + c]   = ok ? s[n][2 * rr + c] : -INFINITY;
                }
            }
        }
        /* online softmax: a row's 32 scores lie in the 4 lanes of its quad */
        float corr[2];
#pragma unroll
        for (int rr = 0; rr < 2; rr++) {
            float mx = -INFINITY;
#pragma unroll
            for (int n = 0; n < 4; n++) {
                mx = fmaxf(mx, fmaxf(s[n][2 * rr], s[n][2 * rr + 1]));
            }
            mx                = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx                = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            const float m_new = fmaxf(m_run[rr], mx);
            corr[rr]          = m_run[rr] == -INFINITY ? (m_new == -INFINITY ? 1.0f : 0.0f) : expf(m_run[rr] - m_new);
            float sum         = 0.0f;
#pragma unroll
            for (int n = 0; n < 4; n++) {
#pragma unroll
                for (int c = 0; c < 2; c++) {
                    const float x    = s[n][2 * rr + c];
                    const float pj   = x == -INFINITY ? 0.0f : expf(x - m_new);
                    s[n][2 * rr + c] = pj;
                    sum += pj;
                }
            }
            l_run[rr] = l_run[rr] * corr[rr] + sum; /* this lane's part; the quad is summed at the end */
            m_run[rr] = m_new;
        }
#pragma unroll
        for (int n = 0; n < NO; n++) {
            o[n][0] *= corr[0], o[n][1] *= corr[0], o[n][2] *= corr[1], o[n][3] *= corr[1];
        }
        /* O += P V: P's accumulators are the A fragments (keys 16 kh + ...), hi + lo */
#pragma unroll
        for (int kh = 0; kh < 2; kh++) {
            const uint32_t pa0 = pack_h2(s[2 * kh][0], s[2 * kh][1]), pa1 = pack_h2(s[2 * kh][2], s[2 * kh][3]);
            const uint32_t pa2 = pack_h2(s[2 * kh + 1][0], s[2 * kh + 1][1]), pa3 = pack_h2(s[2 * kh + 1][2], s[2 * kh + 1][3]);
            const uint32_t pl0 = pack_h2_rest(s[2 * kh][0], s[2 * kh][1]), pl1 = pack_h2_rest(s[2 * kh][2], s[2 * kh][3]);
            const uint32_t pl2 = pack_h2_rest(s[2 * kh + 1][0], s[2 * kh + 1][1]);
            const uint32_t pl3 = pack_h2_rest(s[2 * kh + 1][2], s[2 * kh + 1][3]);
#pragma unroll
            for (int dt = 0; dt < D / 16; dt++) { /* channels 16 dt + 0..7 (b: matrices 0, 1) and + 8..15 (2, 3) */
                uint32_t vb[4];
                ldsm_x4_trans_at(vb, vb_b + 2 * (16 * kh * LDH + 16 * dt));
                mma16816(o[2 * dt], pa0, pa1, pa2, pa3, vb[0], vb[1]);
                mma16816(o[2 * dt], pl0, pl1, pl2, pl3, vb[0], vb[1]);
                mma16816(o[2 * dt + 1], pa0, pa1, pa2, pa3, vb[2], vb[3]);
                mma16816(o[2 * dt + 1], pl0, pl1, pl2, pl3, vb[2], vb[3]);
            }
        }
    }
    /* write: normalized output (one split) or the split's partial (m, l, unnormalized O) */
    const int n_qt = gridDim.y;
#pragma unroll
    for (int rr = 0; rr < 2; rr++) {
        float l = l_run[rr];
        l += __shfl_xor_sync(0xffffffffu, l, 1);
        l += __shfl_xor_sync(0xffffffffu, l, 2);
        const int r = 16 * warp + g8 + 8 * rr, t = t_first + r / group;
        if (!row_ok[rr]) {
            continue;
        }
        if (a.n_split == 1) {
            float * dst = a.out + ((long long) t * a.n_head + hk * group + r % group) * D + 2 * q4;
            const float il = 1.0f / l;
#pragma unroll
            for (int n = 0; n < NO; n++) {
                *(float2 *) (dst + 8 * n) = make_float2(o[n][2 * rr] * il, o[n][2 * rr + 1] * il);
            }
        } else {
            const long long row = (((long long) split * g.n_head_kv + hk) * n_qt + qt) * PF_ROWS + r;
            float *         dst = a.part + row * (D + 2);
#pragma unroll
            for (int n = 0; n < NO; n++) {
                dst[8 * n + 2 * q4]     = o[n][2 * rr];
                dst[8 * n + 2 * q4 + 1] = o[n][2 * rr + 1];
            }
            if (q4 == 0) {
                dst[D]     = m_run[rr];
                dst[D + 1] = l;
            }
        }
    }
}

/* ================================================================================================
 * Merge of the splits, choice and launch
 * ================================================================================================ */

static __global__ void merge_kernel(const struct moqae_cuda_ring_geom g, const struct moqae_cuda_attn_args a, int tpb,
                                    int rows, int n_qt) {
    MOQAE_PDL_ENTER();
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
        const long long i = ((long long) t * a.n_head + hk * group + r % group) * D + d;
        a.out[i]          = o / l;
        if (a.xq) { /* a warp's 32 channels are one quant block (D is a multiple of 32) */
            quantize_warp(o / l, (q8x *) a.xq + i / 32);
        }
    }
}

/* The output's quantization when no merge ran (one split). */
static int quantize_unmerged(const struct moqae_cuda_attn_args * a, int D, cudaStream_t stream) {
    return a->xq && a->n_split == 1 ? moqae_cuda_quantize(a->out, a->n_tok, (int64_t) a->n_head * D, a->xq, stream)
                                    : MOQAE_OK;
}

enum moqae_cuda_attn_kernel moqae_cuda_attn_pick(int head_dim, int chunk, int group, int64_t n_tok) {
    if (chunk != ATT_TILE || (head_dim != 64 && head_dim != 128) || group < 1) {
        return MOQAE_CUDA_ATTN_NONE;
    }
    /* MOQAE_CUDA_ATTN=1: the generic kernel everywhere (the earlier prefill, comparison) */
    static const bool forced = *moqae_cuda_switch("MOQAE_CUDA_ATTN") == '1';
    if (group > 64) {
        return MOQAE_CUDA_ATTN_NONE;
    }
    if (forced) {
        return MOQAE_CUDA_ATTN_GENERIC;
    }
    return n_tok == 1 && group <= 4 ? MOQAE_CUDA_ATTN_V3 : n_tok > 4 ? MOQAE_CUDA_ATTN_PF : MOQAE_CUDA_ATTN_GENERIC;
}

bool moqae_cuda_attn_supported(int head_dim, int chunk) {
    return moqae_cuda_attn_pick(head_dim, chunk, 1, 64) != MOQAE_CUDA_ATTN_NONE;
}

int moqae_cuda_attn_rows(int64_t n_tok) {
    return n_tok <= 4 ? 16 : 16 * pf_warps();
}

size_t moqae_cuda_attn_part_floats(const struct moqae_cuda_ring_geom * g, int64_t n_tok, int64_t n_head, int n_split) {
    const int64_t group = n_head / g->n_head_kv;
    size_t        most  = 0;
    for (int rows : { moqae_cuda_attn_rows(n_tok), 64, 128, 256 }) { /* the generic kernel's 64 (MOQAE_CUDA_ATTN=1), the
                                                                           prefill kernel's 128 and 256 */
        const int64_t tpb  = std::max<int64_t>(1, rows / group);
        const int64_t n_qt = (n_tok + tpb - 1) / tpb;
        most = std::max(most, (size_t) n_qt * (size_t) std::max<int64_t>(rows, group));
    }
    return (size_t) n_split * (size_t) g->n_head_kv * most * (size_t) (g->head_dim + 2);
}

/* The generic and prefill kernels' launch: one block per (KV head, tile of `rows` query rows, split) with
 * `threads` threads and `bytes` of shared memory, run with the arguments ka (a's, plus the kernel's
 * switches), then the merge of the splits and the quantization of the output. */
typedef void (*tile_kernel_fn)(const struct moqae_cuda_ring_geom, const struct moqae_cuda_attn_args, int);

static int launch_tiles(tile_kernel_fn kernel, int rows, int threads, int bytes, const struct moqae_cuda_ring_geom * g,
                        const struct moqae_cuda_attn_args * a, const struct moqae_cuda_attn_args & ka,
                        cudaStream_t stream) {
    const int group = a->n_head / g->n_head_kv;
    const int tpb   = rows / group;
    if (tpb < 1) {
        return moqae_fail(MOQAE_ERR_UNSUPPORTED, "CUDA attention: %d query heads per KV head exceed %d rows", group, rows);
    }
    const int  n_qt = (a->n_tok + tpb - 1) / tpb;
    const dim3 grid((unsigned) g->n_head_kv, (unsigned) n_qt, (unsigned) a->n_split);
    (void) moqae_cuda_launch(kernel, grid, threads, bytes, stream, *g, ka, tpb);
    MOQAE_CUDA_LAUNCH_CHECK();
    if (a->n_split > 1) {
        (void) moqae_cuda_launch(merge_kernel, (unsigned) (g->n_head_kv * n_qt * rows), g->head_dim, 0, stream, *g, *a,
                tpb, rows, n_qt);
        MOQAE_CUDA_LAUNCH_CHECK();
    }
    return quantize_unmerged(a, g->head_dim, stream);
}

template <int D, int ROWS>
static int launch_generic(const struct moqae_cuda_ring_geom * g, const struct moqae_cuda_attn_args * a, cudaStream_t stream) {
    using L = att_layout<D, ROWS>;
    static bool attr_set = false; /* same value for every caller: a race only repeats the call */
    if (!attr_set) {
        MOQAE_CUDA_CHECK(cudaFuncSetAttribute(attn_kernel<D, ROWS>, cudaFuncAttributeMaxDynamicSharedMemorySize, L::bytes));
        attr_set = true;
    }
    return launch_tiles(attn_kernel<D, ROWS>, ROWS, ATT_THREADS, L::bytes, g, a, *a, stream);
}

template <int D, int W>
static int launch_pf(const struct moqae_cuda_ring_geom * g, const struct moqae_cuda_attn_args * a, cudaStream_t stream) {
    using L = pf_layout<D, W>;
    constexpr int PF_ROWS = L::ROWS;
    static bool   attr_set = false; /* same value for every caller: a race only repeats the call */
    if (!attr_set) {
        MOQAE_CUDA_CHECK(cudaFuncSetAttribute(attn_pf_kernel<D, W>, cudaFuncAttributeMaxDynamicSharedMemorySize, L::bytes));
        attr_set = true;
    }
    /* MOQAE_CUDA_PFK=0: keys decoded per row on CUDA cores (5d0f7e3's decode) */
    static const int keys_gen = *moqae_cuda_switch("MOQAE_CUDA_PFK") == '0' ? 1 : 0;
    struct moqae_cuda_attn_args aa = *a;
    aa.pf_keys_gen                 = keys_gen;
    return launch_tiles(attn_pf_kernel<D, W>, PF_ROWS, 32 * W, L::bytes, g, a, aa, stream);
}

template <int D, int MM>
static int launch_v3(const struct moqae_cuda_ring_geom * g, const struct moqae_cuda_attn_args * a, cudaStream_t stream) {
    using L = v3_layout<D, MM>;
    const int bytes = L::warps + V3_WARPS * (2 * v3_raw_stride(a->raw_bytes, D) + L::warp_fixed);
    const bool post = a->cs_t == nullptr; /* keys stored after RoPE */
    if (post && g->v_group != 64) { /* attn_v3_kernel<D, MM, true> takes value groups of 64 (kv-codec.h's default) */
        return moqae_fail(MOQAE_ERR_INTERNAL, "CUDA attention: value groups of %d with keys after RoPE", g->v_group);
    }
    const auto kernel = post ? attn_v3_kernel<D, MM, true> : attn_v3_kernel<D, MM, false>;
    static int attr[2] = {}; /* the largest size set so far */
    if (bytes > attr[post]) {
        MOQAE_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
        attr[post] = bytes;
    }
    const int group = a->n_head / g->n_head_kv;
    /* MOQAE_CUDA_PV=0: INT4 and INT2 values on CUDA cores; =2: tensor cores, INT4 codes as normal f16; =4:
     * INT2 values on CUDA cores (session 7's paths) */
    static const char pv       = *moqae_cuda_switch("MOQAE_CUDA_PV");
    static const int  pv_cores = pv == '0' ? 1 : pv == '2' ? 2 : pv == '4' ? 3 : 0;
    /* MOQAE_CUDA_WALK=0: chunks in table order whatever the codec */
    static const int walk_mixed = *moqae_cuda_switch("MOQAE_CUDA_WALK") == '0' ? 1 : 0;
    struct moqae_cuda_attn_args aa = *a;
    aa.pv_cores                    = pv_cores;
    aa.walk_mixed                  = walk_mixed;
    (void) moqae_cuda_launch(kernel, dim3((unsigned) g->n_head_kv, 1, (unsigned) a->n_split), V3_THREADS, bytes, stream,
            *g, aa);
    MOQAE_CUDA_LAUNCH_CHECK();
    if (a->n_split > 1) {
        (void) moqae_cuda_launch(merge_kernel, (unsigned) (g->n_head_kv * group), D, 0, stream, *g, *a, 1, group, 1);
        MOQAE_CUDA_LAUNCH_CHECK();
    }
    return quantize_unmerged(a, D, stream);
}

template <int D, int MM> static int v3_blocks_per_sm(int raw_bytes, int * out) {
    using L = v3_layout<D, MM>;
    const int bytes = L::warps + V3_WARPS * (2 * v3_raw_stride(raw_bytes, D) + L::warp_fixed);
    /* both key placements: the same shared memory, both bounded to 2 blocks per SM */
    MOQAE_CUDA_CHECK(cudaFuncSetAttribute(attn_v3_kernel<D, MM, false>, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
    MOQAE_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(out, attn_v3_kernel<D, MM, false>, V3_THREADS, (size_t) bytes));
    return MOQAE_OK;
}

int moqae_cuda_attn_decode_split(const struct moqae_cuda_ring_geom * g, int raw_bytes, int group, int n_sm,
                                 int64_t max_tiles, int * n_split) {
    const int nkv = g->n_head_kv;
    if (moqae_cuda_attn_pick(g->head_dim, g->chunk, group, 1) != MOQAE_CUDA_ATTN_V3) {
        /* generic: several blocks per SM, no split shorter than 8 tiles */
        *n_split = (int) std::max<int64_t>(1, std::min<int64_t>((6 * n_sm + nkv - 1) / nkv, max_tiles / 8));
        return MOQAE_OK;
    }
    int per_sm = 0;
    if (g->head_dim == 64) {
        MOQAE_TRY((group == 1 ? v3_blocks_per_sm<64, 1>(raw_bytes, &per_sm) : v3_blocks_per_sm<64, 4>(raw_bytes, &per_sm)));
    } else {
        MOQAE_TRY((group == 1 ? v3_blocks_per_sm<128, 1>(raw_bytes, &per_sm) : v3_blocks_per_sm<128, 4>(raw_bytes, &per_sm)));
    }
    /* one wave: every block resident at once (a second, partly empty wave would cost a whole one),
     * but at least 2 tiles per warp of the longest context */
    const int64_t slots = (int64_t) std::max(per_sm, 1) * n_sm;
    *n_split = (int) std::max<int64_t>(1, std::min<int64_t>(slots / nkv, max_tiles / (2 * V3_WARPS)));
    return MOQAE_OK;
}

int moqae_cuda_attention(const struct moqae_cuda_ring_geom * g, const struct moqae_cuda_attn_args * a,
                         cudaStream_t stream) {
    const int                   group = a->n_head / g->n_head_kv;
    enum moqae_cuda_attn_kernel k     = moqae_cuda_attn_pick(g->head_dim, g->chunk, group, a->n_tok);
    if (k != MOQAE_CUDA_ATTN_NONE && (a->kernel == MOQAE_CUDA_ATTN_GENERIC || a->kernel == MOQAE_CUDA_ATTN_PF)) {
        k = (enum moqae_cuda_attn_kernel) a->kernel;
    }
    switch (k) {
        case MOQAE_CUDA_ATTN_PF:
            if (pf_warps() == 8) {
                return g->head_dim == 64 ? launch_pf<64, 8>(g, a, stream) : launch_pf<128, 8>(g, a, stream);
            }
            return g->head_dim == 64 ? launch_pf<64, 16>(g, a, stream) : launch_pf<128, 16>(g, a, stream);
        case MOQAE_CUDA_ATTN_V3:
            if (g->head_dim == 64) {
                return group == 1 ? launch_v3<64, 1>(g, a, stream) : launch_v3<64, 4>(g, a, stream);
            }
            return group == 1 ? launch_v3<128, 1>(g, a, stream) : launch_v3<128, 4>(g, a, stream);
        case MOQAE_CUDA_ATTN_GENERIC: {
            const bool small = moqae_cuda_attn_rows(a->n_tok) == 16;
            if (g->head_dim == 64) {
                return small ? launch_generic<64, 16>(g, a, stream) : launch_generic<64, 64>(g, a, stream);
            }
            return small ? launch_generic<128, 16>(g, a, stream) : launch_generic<128, 64>(g, a, stream);
        }
        default:
            return moqae_fail(MOQAE_ERR_UNSUPPORTED, "CUDA attention: head_dim %d, chunk %d, %d query heads per KV head",
                              g->head_dim, g->chunk, group);
    }
}
