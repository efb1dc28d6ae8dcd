/*
 * cuda/kv-codec.cu — see kv-codec.cuh. The encoder follows kv-codec.c step by step (and kv-ring.c's
 * turning of keys back to before RoPE), one block of ENC_THREADS threads per (chunk, KV head, keys or
 * values) of one layer. Its work is a fixed sequence of phases separated by barriers; each phase is a loop over
 * items (rows, groups, runs of groups x scale codes, output bytes) whose result does not depend on
 * which thread takes which item, and every sum the CPU makes in a given order is made by one thread
 * in that order. So the same phases run on the CPU too (encode_body with a host executor: how the
 * device code is tested without a device), and min/max reductions are plain loops of one thread.
 */
#include "kv-codec.cuh"
#include "kv-layout.cuh"

#define ENC_THREADS    256
#define ENC_C          32  /* chunk size (the GPU ring's)                            */
#define ENC_MAX_D      256

/* ---- f16 with directed rounding (kv-codec.c) ----------------------------------------------------- */

static __host__ __device__ uint16_t f16_down(float x) {
    uint16_t h = xf32_to_f16(x);
    if (xf16_to_f32(h) > x) {
        h = h == 0x0000u ? 0x8001u : (h & 0x8000u) ? (uint16_t) (h + 1) : (uint16_t) (h - 1);
    }
    return h;
}

static __host__ __device__ uint16_t f16_up(float x) {
    uint16_t h = xf32_to_f16(x);
    if (xf16_to_f32(h) < x) {
        h = h == 0x8000u ? 0x0001u : (h & 0x8000u) ? (uint16_t) (h - 1) : (uint16_t) (h + 1);
    }
    return h;
}

static __host__ __device__ __forceinline__ float quant_code(float x, float zero, float scale, float qmax) {
    if (!(scale > 0.0f)) {
        return 0.0f;
    }
    const float t = floorf(xadd(xdiv(xsub(x, zero), scale), 0.5f));
    return t > 0.0f ? (t < qmax ? t : qmax) : 0.0f;
}

/* ---- the block's shared state -------------------------------------------------------------------- */

/* Sized for head_dim <= MD (64, 128 or 256: the smallest that fits is launched, so that more blocks share
 * an SM). Groups: n <= C * D / 16 (G is a multiple of 16); runs x scale tries: keys D x 16, values C x 16. */
template <int MD> struct enc_smem {
    static constexpr int LDX        = MD + 1; /* padded rows: thread j on row j hits bank j + d */
    static constexpr int MAX_GROUPS = ENC_C * MD / 16;
    static constexpr int MAX_ITEMS  = (MD > ENC_C ? MD : ENC_C) * 16;
    float     x[ENC_C * LDX]; /* [C][LDX] the chunk of this head: as staged, then rotated             */
    float     lo[MAX_GROUPS], hi[MAX_GROUPS], r[MAX_GROUPS];
    float     mean[MD], dist[ENC_C];
    long long rsum[MAX_ITEMS];       /* the search: error sum of (run, scale try)                    */
    uint8_t   rz[MAX_GROUPS * 16];   /* zero code each group keeps under each scale try              */
    uint8_t   zc[MAX_GROUPS], sc[MAX_GROUPS];
    uint16_t  a0[MAX_ITEMS / 16];    /* each run's covering scale code                               */
    int       xi;                    /* keys: the outlier token                                      */
    float     lo_min, lo_max, need_max, zl, zs, sb, xz, xs;
    uint16_t  zlo16, zstep16, sbase16, xz16, xs16;
};

/* What one record pass needs besides the shared state. */
struct enc_args {
    bool            is_k;
    int             C, D, G, codec, stage_rows;
    long long       pos;     /* the chunk's first position: its rows are pos + j mod stage_rows */
    const uint16_t * stage;  /* [stage_rows][D] f16 of this (layer, head)                       */
    const float *   cs_t;    /* keys before RoPE: [D/2][2][C] (kv-codec.h); NULL: keys after RoPE */
    const float *   cs_p0;   /* [D/2][2] the chunk's start                                      */
    uint8_t *       rec;
    const uint8_t * src;     /* demotion: the old record (codec src_codec) read instead of stage */
    int             src_codec;
};

/* The args of one pass over a chunk of the staging window (no old record). */
static __host__ __device__ enc_args stage_args(bool is_k, int C, int D, int G, int codec, int stage_rows, long long pos,
                                               const uint16_t * stage, const float * cs_t, const float * cs_p0,
                                               uint8_t * rec) {
    enc_args a;
    a.is_k       = is_k;
    a.C          = C;
    a.D          = D;
    a.G          = G;
    a.codec      = codec;
    a.stage_rows = stage_rows;
    a.pos        = pos;
    a.stage      = stage;
    a.cs_t       = cs_t;
    a.cs_p0      = cs_p0;
    a.rec        = rec;
    a.src        = nullptr;
    a.src_codec  = 0;
    return a;
}

/* Element e of group i of the pass (keys: channel i, token e; values: token i / (D/G), columns
 * (i % (D/G)) * G + e). */
template <class S> static __host__ __device__ __forceinline__ const float * group_base(const S & s, const enc_args & a, int i) {
    if (a.is_k) {
        return s.x + i;
    }
    const int per = a.D / a.G;
    return s.x + (i / per) * S::LDX + (i % per) * a.G;
}

template <class S> static __host__ __device__ __forceinline__ float gx(const S & s, const enc_args & a, int i, int e) {
    return group_base(s, a, i)[a.is_k ? e * S::LDX : e];
}

/* Error sum of a group (m elements at base, stride apart, element skip left out) under (zero, scale):
 * kv-codec.c's group_err. Its ldexp(d * d, K) is d * d * 2^K here: d * d is exact in double and the
 * product stays a normal double (|d| < 2^17, K in [-260, 340]), so both are the same exact value; the
 * floor of a value >= 0 is its truncation. */
static __host__ __device__ __forceinline__ long long group_err(const float * base, int stride, int m, int skip,
                                                               float zero, float scale, float qmax, double p2k) {
    long long acc = 0;
    for (int e = 0; e < m; e++) {
        if (e == skip) {
            continue;
        }
        const float  v = base[e * stride];
        const float  d = xsub(v, xadd(xmul(scale, quant_code(v, zero, scale, qmax)), zero));
        const double t = (double) d * (double) d * p2k;
        acc += t < 0x1p48 ? (long long) t : (1LL << 48);
    }
    return acc;
}

/* ---- one record: the phases ---------------------------------------------------------------------
 * EX is the executor: ex.run(f) calls f(tid, n_threads) for every thread, ex.sync() is the barrier. */

/* The rotation of every row of s.x (keys over D, values in blocks of G), forward or back: kv-codec.c's
 * fwht, one butterfly stage at a time over all rows (each butterfly of a stage is independent; the same
 * sums in the same stage order), its final scaling folded into the last stage (the same rounding). */
template <class EX, class S> static __host__ __device__ void rotate_rows(EX & ex, S & s, const enc_args & a, bool inverse) {
    const int   n = kvl_rot_block(a.is_k ? a.D : a.G), half = a.D / 2, C = a.C;
    const float f = kvl_rot_factor(n, inverse);
    for (int h = 1; h < n; h *= 2) {
        const bool last = 2 * h == n;
        ex.run([&](int tid, int nt) {
            for (int u = tid; u < C * half; u += nt) {
                const int p = u % half, lo = ((p & ~(h - 1)) << 1) | (p & (h - 1));
                float *   y = s.x + (u / half) * S::LDX + lo;
                const float b = y[0], c = y[h];
                y[0]          = last ? xmul(xadd(b, c), f) : xadd(b, c);
                y[h]          = last ? xmul(xsub(b, c), f) : xsub(b, c);
            }
        });
        ex.sync();
    }
}

/* The old record a.src decoded into s.x [C][D] as kv-codec.c's moqae_kv_decode_k/_v decodes it: each
 * element scale * code + zero (product rounded first), the keys' outlier row, the inverse rotation
 * (a demotion: kv-ring.c demote_fill). */
template <class EX, class S> static __host__ __device__ void decode_record(EX & ex, S & s, const enc_args & a) {
    const int       C = a.C, D = a.D, G = a.G;
    const uint8_t * rec = a.src;
    if (a.src_codec == 0) { /* FP16: keys [D][C], values [C][D] */
        ex.run([&](int tid, int nt) {
            for (int e = tid; e < C * D; e += nt) {
                const int j = e / D, d = e % D;
                s.x[j * S::LDX + d] = xf16_to_f32(kvl_rd16(rec + (a.is_k ? 2 * (d * C + j) : 2 * e)));
            }
        });
        ex.sync();
        return;
    }
    const kvl_geom g  = a.is_k ? kvl_geom_k(a.src_codec, C, D) : kvl_geom_v(a.src_codec, C, D, G);
    const float    zl = xf16_to_f32(kvl_rd16(rec + g.off_bases)), zs = xf16_to_f32(kvl_rd16(rec + g.off_bases + 2));
    const float    sb = xf16_to_f32(kvl_rd16(rec + g.off_bases + 4));
    ex.run([&](int tid, int nt) {
        for (int u = tid; u < g.n_groups * g.n_elems; u += nt) {
            const int       i = u / g.n_elems, e = u % g.n_elems;
            const uint8_t * row = rec + i * g.n_elems * g.bits / 8;
            const float     scale = kvl_scale(sb, rec[g.off_sc + i / g.share]);
            const float     zero  = kvl_zero(zl, zs, rec[g.off_zc + i]);
            const float     x     = xadd(xmul(scale, (float) kvl_get_code(row, e, g.bits)), zero);
            const int       per   = D / G;
            s.x[a.is_k ? e * S::LDX + i : (i / per) * S::LDX + (i % per) * G + e] = x;
        }
    });
    ex.sync();
    if (a.is_k) { /* the outlier token's row, at its own precision */
        const int   xi = rec[g.off_x + 4];
        const float xz = xf16_to_f32(kvl_rd16(rec + g.off_x)), xs = xf16_to_f32(kvl_rd16(rec + g.off_x + 2));
        ex.run([&](int tid, int nt) {
            for (int d = tid; d < D; d += nt) {
                const unsigned lo = kvl_get_code(rec + d * C * g.bits / 8, xi, g.bits);
                const unsigned q  = kvl_get_code(rec + g.off_xhi, d, g.bits) << g.bits | lo;
                s.x[xi * S::LDX + d] = xadd(xmul(xs, (float) q), xz);
            }
        });
        ex.sync();
    }
    rotate_rows(ex, s, a, true);
}

template <class EX, class S> static __host__ __device__ void encode_record(EX & ex, S & s, const enc_args & a) {
    const int C = a.C, D = a.D, G = a.G;

    if (a.src) { /* a demotion: the old record, decoded (never to FP16) */
        decode_record(ex, s, a);
    } else { /* the staged rows (f16) */
        ex.run([&](int tid, int nt) {
            for (int e = tid; e < C * D; e += nt) {
                const int j = e / D, d = e % D;
                s.x[j * S::LDX + d] = xf16_to_f32(a.stage[((a.pos + j) % a.stage_rows) * D + d]);
            }
        });
        ex.sync();
    }
    if (a.codec == 0 && !a.src) { /* FP16: keys transposed [D][C], values as is [C][D]; the staged bits */
        ex.run([&](int tid, int nt) {
            for (int e = tid; e < C * D; e += nt) {
                const int j = e / D, d = e % D;
                const int o = a.is_k ? 2 * (d * C + j) : 2 * e;
                kvl_wr16(a.rec + o, a.stage[((a.pos + j) % a.stage_rows) * D + d]);
            }
        });
        ex.sync();
        return;
    }
    const int   bits = kvl_bits(a.codec);
    const float qmax = (float) ((1 << bits) - 1);
    if (a.is_k && a.cs_t) { /* kv-ring.c unrotate_chunk: R(-P0), then R(-t) */
        ex.run([&](int tid, int nt) {
            for (int u = tid; u < C * (D / 2); u += nt) {
                const int   j = u / (D / 2), i = u % (D / 2);
                float *     p = s.x + j * S::LDX + 2 * i;
                const float x = p[0], y = p[1];
                const float c0 = a.cs_p0[2 * i], s0 = a.cs_p0[2 * i + 1];
                const float t0 = xadd(xmul(x, c0), xmul(y, s0)), t1 = xsub(xmul(y, c0), xmul(x, s0));
                const float c1 = a.cs_t[(2 * i) * C + j], s1 = a.cs_t[(2 * i + 1) * C + j];
                p[0]           = xadd(xmul(t0, c1), xmul(t1, s1));
                p[1]           = xsub(xmul(t1, c1), xmul(t0, s1));
            }
        });
        ex.sync();
    }
    if (a.is_k) { /* the outlier token: farthest from the chunk's mean key */
        ex.run([&](int tid, int nt) {
            for (int d = tid; d < D; d += nt) {
                float acc = 0.0f;
                for (int j = 0; j < C; j++) {
                    acc = xadd(acc, s.x[j * S::LDX + d]);
                }
                s.mean[d] = xdiv(acc, (float) C);
            }
        });
        ex.sync();
        ex.run([&](int tid, int nt) {
            for (int j = tid; j < C; j += nt) {
                float dist = 0.0f;
                for (int d = 0; d < D; d++) {
                    const float t = xsub(s.x[j * S::LDX + d], s.mean[d]);
                    dist          = xadd(dist, xmul(t, t));
                }
                s.dist[j] = dist;
            }
        });
        ex.sync();
        ex.run([&](int tid, int nt) {
            if (tid == 0) {
                int   best = 0;
                float bd   = 0.0f;
                for (int j = 0; j < C; j++) {
                    if (j == 0 || s.dist[j] > bd) {
                        best = j;
                        bd   = s.dist[j];
                    }
                }
                s.xi = best;
            }
        });
        ex.sync();
    }
    rotate_rows(ex, s, a, false); /* each key row over D, each value row in blocks of G */

    /* ---- encode_q ---- */
    const kvl_geom g     = a.is_k ? kvl_geom_k(a.codec, C, D) : kvl_geom_v(a.codec, C, D, G);
    const int      n     = g.n_groups, m = g.n_elems, share = g.share, n_runs = n / share;
    const int      skip  = a.is_k ? s.xi : -1;
    const int      NS    = bits == 2 ? 16 : 8; /* MOQAE_KV_SEARCH_SCALES */
    uint8_t *      rec   = a.rec;
    ex.run([&](int tid, int nt) { /* group ranges without the outlier */
        for (int i = tid; i < n; i += nt) {
            float lo = INFINITY, hi = -INFINITY;
            for (int e = 0; e < m; e++) {
                if (e == skip) {
                    continue;
                }
                const float v = gx(s, a, i, e);
                lo            = v < lo ? v : lo;
                hi            = v > hi ? v : hi;
            }
            s.lo[i] = lo, s.hi[i] = hi;
        }
    });
    ex.sync();
    ex.run([&](int tid, int nt) { /* the zero base (min and max: any order) */
        if (tid == 0) {
            float lmin = INFINITY, lmax = -INFINITY;
            for (int i = 0; i < n; i++) {
                lmin = s.lo[i] < lmin ? s.lo[i] : lmin;
                lmax = s.lo[i] > lmax ? s.lo[i] : lmax;
            }
            s.zlo16   = f16_down(lmin);
            s.zl      = xf16_to_f32(s.zlo16);
            s.zstep16 = xf32_to_f16(xdiv(xsub(lmax, s.zl), 255.0f));
            s.zs      = xf16_to_f32(s.zstep16);
        }
    });
    ex.sync();
    ex.run([&](int tid, int nt) { /* zero codes that clip nothing, and the scale each group needs */
        for (int i = tid; i < n; i += nt) {
            unsigned z = 0;
            if (s.zs > 0.0f) {
                const float t = floorf(xdiv(xsub(s.lo[i], s.zl), s.zs));
                z             = t > 0.0f ? (t < 255.0f ? (unsigned) t : 255u) : 0u;
            }
            s.zc[i] = (uint8_t) z;
            s.r[i]  = xdiv(xsub(s.hi[i], kvl_zero(s.zl, s.zs, z)), qmax);
        }
    });
    ex.sync();
    ex.run([&](int tid, int nt) { /* the scale base; each run's covering scale code (binary search) */
        if (tid == 0) {
            float need_max = 0.0f;
            for (int i = 0; i < n; i++) {
                need_max = s.r[i] > need_max ? s.r[i] : need_max;
            }
            s.sbase16 = f16_up(need_max);
            s.sb      = xf16_to_f32(s.sbase16);
        }
    });
    ex.sync();
    ex.run([&](int tid, int nt) {
        for (int r = tid; r < n_runs; r += nt) {
            float need = s.r[r * share];
            for (int j = 1; j < share; j++) {
                need = s.r[r * share + j] > need ? s.r[r * share + j] : need;
            }
            unsigned lo = 0;
            if (kvl_scale(s.sb, 0) >= need) {
                unsigned hi = 256;
                while (hi - lo > 1) {
                    const unsigned mid = (lo + hi) / 2;
                    if (kvl_scale(s.sb, mid) >= need) {
                        lo = mid;
                    } else {
                        hi = mid;
                    }
                }
            }
            s.a0[r] = (uint16_t) lo;
        }
    });
    ex.sync();
    /* the search: per (run, scale try t) the groups' best zero codes and their error sum (any thread may
     * take any pair: the sums are of integers). A zero code tried twice (clamped, or the centred ones
     * meeting the one that clips nothing) has the same error and cannot win again: tried once. */
    ex.run([&](int tid, int nt) {
        const int lg = NS == 16 ? 4 : 3;
        for (int it = tid; it < n_runs * NS; it += nt) {
            const int      r = it >> lg, t = it & (NS - 1);
            const unsigned a0 = s.a0[r];
            int            E;
            (void) frexpf(xmul(kvl_scale(s.sb, a0), qmax), &E);
            const double   p2k = ldexp(1.0, 40 - 2 * E); /* MOQAE_KV_ERR_BITS */
            const unsigned aa  = a0 + (unsigned) t < 255u ? a0 + (unsigned) t : 255u;
            const float    sc  = kvl_scale(s.sb, aa);
            long long      sum = 0;
            for (int i = r * share; i < r * share + share; i++) {
                float cand[6];
                cand[0]         = (float) s.zc[i];
                const float cen = s.zs > 0.0f ? floorf(xadd(xdiv(xsub(xsub(xmul(xadd(s.lo[i], s.hi[i]), 0.5f),
                                                                           xmul(xmul(sc, qmax), 0.5f)),
                                                                      s.zl),
                                                                 s.zs),
                                                            0.5f))
                                              : 0.0f;
                for (int u = -2; u <= 2; u++) { /* MOQAE_KV_SEARCH_ZEROS */
                    cand[3 + u] = cen + (float) u;
                }
                const float * base  = group_base(s, a, i);
                const int     step  = a.is_k ? S::LDX : 1;
                long long     gbest = -1;
                uint8_t       zb    = 0;
                for (int k = 0; k < 6; k++) {
                    float z = s.zs > 0.0f ? cand[k] : 0.0f;
                    z       = z > 0.0f ? (z < 255.0f ? z : 255.0f) : 0.0f;
                    bool seen = false;
                    for (int j = 0; j < k; j++) {
                        seen |= cand[j] == z;
                    }
                    cand[k] = z;
                    if (seen) {
                        continue;
                    }
                    const long long e = group_err(base, step, m, skip, kvl_zero(s.zl, s.zs, (unsigned) z), sc, qmax, p2k);
                    if (gbest < 0 || e < gbest) {
                        gbest = e;
                        zb    = (uint8_t) z;
                    }
                }
                sum += gbest;
                s.rz[i * NS + t] = zb;
            }
            s.rsum[it] = sum;
        }
    });
    ex.sync();
    ex.run([&](int tid, int nt) { /* each run keeps its first scale try of least error */
        for (int r = tid; r < n_runs; r += nt) {
            int t_best = 0;
            for (int t = 1; t < NS; t++) {
                t_best = s.rsum[r * NS + t] < s.rsum[r * NS + t_best] ? t : t_best;
            }
            const unsigned a0 = s.a0[r];
            s.sc[r]           = (uint8_t) (a0 + (unsigned) t_best < 255u ? a0 + (unsigned) t_best : 255u);
            for (int i = r * share; i < r * share + share; i++) {
                s.zc[i] = s.rz[i * NS + t_best];
            }
        }
    });
    ex.sync();
    ex.run([&](int tid, int nt) { /* metadata bytes; the outlier's own zero and scale */
        for (int i = tid; i < n; i += nt) {
            rec[g.off_zc + i] = s.zc[i];
        }
        for (int r = tid; r < n_runs; r += nt) {
            rec[g.off_sc + r] = s.sc[r];
        }
        if (tid == 0) {
            kvl_wr16(rec + g.off_bases, s.zlo16);
            kvl_wr16(rec + g.off_bases + 2, s.zstep16);
            kvl_wr16(rec + g.off_bases + 4, s.sbase16);
            if (a.is_k) {
                const float * yx   = s.x + s.xi * S::LDX;
                float         xmin = yx[0], xmax = yx[0];
                for (int d = 1; d < D; d++) {
                    xmin = yx[d] < xmin ? yx[d] : xmin;
                    xmax = yx[d] > xmax ? yx[d] : xmax;
                }
                const float qmax2 = (float) ((1u << (2 * bits)) - 1u);
                s.xz16            = f16_down(xmin);
                s.xz              = xf16_to_f32(s.xz16);
                s.xs16            = f16_up(xdiv(xsub(xmax, s.xz), qmax2));
                s.xs              = xf16_to_f32(s.xs16);
                kvl_wr16(rec + g.off_x, s.xz16);
                kvl_wr16(rec + g.off_x + 2, s.xs16);
                rec[g.off_x + 4] = (uint8_t) s.xi;
            }
        }
    });
    ex.sync();
    /* codes, one output byte per item: byte B packs elements 16kk + rr + 2b*j (j < 8/b) of the
     * group-major element order, kk = B / 2b, rr = B % 2b, at bits b*j; keys: the outlier's column
     * gets the low b bits of its 2b-bit codes, the xhi row their high bits */
    ex.run([&](int tid, int nt) {
        const int   per_byte = 8 / bits, bpb = 2 * bits, codes_bytes = n * m * bits / 8;
        const float qmax2 = (float) ((1u << (2 * bits)) - 1u);
        const int   xrow  = a.is_k ? D * bits / 8 : 0;
        for (int B = tid; B < codes_bytes + xrow; B += nt) {
            const bool hi_row = B >= codes_bytes;
            const int  Bb = hi_row ? B - codes_bytes : B, kk = Bb / bpb, rr = Bb % bpb;
            unsigned   byte = 0;
            for (int j = 0; j < per_byte; j++) {
                const int L = 16 * kk + rr + bpb * j;
                unsigned  q;
                if (hi_row) { /* xhi: element L = channel L of the outlier's row */
                    q = (unsigned) quant_code(s.x[s.xi * S::LDX + L], s.xz, s.xs, qmax2) >> bits;
                } else {
                    const int i = L / m, e = L % m;
                    if (e == skip) {
                        q = (unsigned) quant_code(s.x[s.xi * S::LDX + i], s.xz, s.xs, qmax2) & ((1u << bits) - 1u);
                    } else {
                        const float scale = kvl_scale(s.sb, s.sc[i / share]);
                        const float zero  = kvl_zero(s.zl, s.zs, s.zc[i]);
                        q                 = (unsigned) quant_code(gx(s, a, i, e), zero, scale, qmax);
                    }
                }
                byte |= q << (bits * j);
            }
            rec[B] = (uint8_t) byte;
        }
    });
    ex.sync();
}

/* ---- store ------------------------------------------------------------------------------------- */

static __global__ void rope_store_kernel(float * __restrict__ q, float * __restrict__ k, const float * __restrict__ v,
                                         int64_t n_tok, int n_head, int n_head_kv, int D, int half,
                                         const float * __restrict__ cs, uint16_t * __restrict__ sk,
                                         uint16_t * __restrict__ sv, long long stage_rows,
                                         const struct moqae_cuda_dyn * __restrict__ dyn) {
    MOQAE_PDL_ENTER();
    const int64_t per_tok = (int64_t) (n_head + n_head_kv) * (D / 2); /* pairs */
    const int64_t u       = (int64_t) blockIdx.x * blockDim.x + threadIdx.x;
    if (u >= n_tok * per_tok) {
        return;
    }
    const int64_t t = u / per_tok;
    const int     r = (int) (u % per_tok), h = r / (D / 2), i = r % (D / 2);
    const bool    is_k = h >= n_head;
    float *       x    = is_k ? k + (t * n_head_kv + (h - n_head)) * D : q + (t * n_head + h) * D;
    float2        p    = make_float2(x[2 * i], x[2 * i + 1]);
    if (i < half) {
        p = moqae_dev_rope_pair(p.x, p.y, cs[(t * half + i) * 2], cs[(t * half + i) * 2 + 1]);
        x[2 * i] = p.x, x[2 * i + 1] = p.y;
    }
    if (is_k) {
        const int64_t row = (dyn->n_past + t) % stage_rows;
        const int64_t dst = ((int64_t) (h - n_head) * stage_rows + row) * D + 2 * i;
        const float * vp  = v + (t * n_head_kv + (h - n_head)) * D + 2 * i;
        sk[dst] = moqae_dev_f32_to_f16(p.x), sk[dst + 1] = moqae_dev_f32_to_f16(p.y);
        sv[dst] = moqae_dev_f32_to_f16(vp[0]), sv[dst + 1] = moqae_dev_f32_to_f16(vp[1]);
    }
}

int moqae_cuda_kv_rope_store(const struct moqae_cuda_ring_geom * g, float * q, float * k, const float * v, int64_t n_tok,
                             int64_t n_head, int64_t n_rot, const float * rope_cs, uint16_t * stage_k, uint16_t * stage_v,
                             const struct moqae_cuda_dyn * dyn, cudaStream_t stream) {
    const int64_t total = n_tok * (n_head + g->n_head_kv) * (g->head_dim / 2);
    if (total <= 0) {
        return MOQAE_OK;
    }
    (void) moqae_cuda_launch(rope_store_kernel, (unsigned) ((total + 255) / 256), 256, 0, stream, q, k, v, n_tok,
            (int) n_head, g->n_head_kv, g->head_dim, (int) (n_rot / 2), rope_cs, stage_k, stage_v, g->stage_rows, dyn);
    MOQAE_CUDA_LAUNCH_CHECK();
    return MOQAE_OK;
}

/* ---- encode ------------------------------------------------------------------------------------- */

struct dev_exec { /* __host__ too only so that encode_record's host instantiation type-checks */
    template <class F> __host__ __device__ __forceinline__ void run(F f) {
#ifdef __CUDA_ARCH__
        f((int) threadIdx.x, (int) blockDim.x);
#endif
    }
    __host__ __device__ __forceinline__ void sync() {
#ifdef __CUDA_ARCH__
        __syncthreads();
#endif
    }
};

/* One block per (chunk, KV head, keys or values) of a layer: blockIdx.y = 2 * head + (0 keys, 1 values). */
template <int MD>
static __global__ void __launch_bounds__(ENC_THREADS, 5)
encode_kernel(const struct moqae_cuda_ring_geom g, const uint16_t * __restrict__ stage_k,
              const uint16_t * __restrict__ stage_v, long long stage_stride, uint8_t * __restrict__ arena,
              const struct moqae_cuda_chunk * __restrict__ table, long long table_stride, const float * __restrict__ cs_t,
              const float * __restrict__ cs_p0, const struct moqae_cuda_dyn * __restrict__ dyn) {
    MOQAE_PDL_ENTER();
    extern __shared__ __align__(16) uint8_t smem_raw[];
    enc_smem<MD> & s = *(enc_smem<MD> *) smem_raw;
    const int      ci = blockIdx.x, h = blockIdx.y >> 1, pass = blockIdx.y & 1;
    if (ci >= dyn->n_enc) {
        return;
    }
    stage_k += (long long) blockIdx.z * stage_stride; /* layer z of the ones encoded together */
    stage_v += (long long) blockIdx.z * stage_stride;
    table += (long long) blockIdx.z * table_stride;
    const int              idx = dyn->enc_first + ci;
    const moqae_cuda_chunk ch  = table[idx];
    uint8_t *              rk  = arena + ch.off + (long long) h * (g.k_pad[ch.codec] + g.v_pad[ch.codec]);
    dev_exec               ex;
    const enc_args a = stage_args(pass == 0, g.chunk, g.head_dim, g.v_group, ch.codec, (int) g.stage_rows, ch.pos,
                                  (pass == 0 ? stage_k : stage_v) + (long long) h * g.stage_rows * g.head_dim, cs_t,
                                  cs_t ? cs_p0 + (long long) idx * g.head_dim : nullptr,
                                  pass == 0 ? rk : rk + g.k_pad[ch.codec]);
    encode_record(ex, s, a);
}

/* The encoder's shapes: chunk ENC_C, head_dim a multiple of 16 up to ENC_MAX_D, value groups of >= 16. */
static bool enc_shape_ok(int C, int D, int G) {
    return C == ENC_C && D <= ENC_MAX_D && D % 16 == 0 && G >= 16 && G % 16 == 0 && D % G == 0;
}

/* The smallest enc_smem<MD> that holds head_dim D. */
static int enc_md(int D) {
    return D <= 64 ? 64 : D <= 128 ? 128 : 256;
}

template <int MD>
static int encode_launch(const struct moqae_cuda_ring_geom * g, const uint16_t * stage_k, const uint16_t * stage_v,
                         long long stage_stride, uint8_t * arena, const struct moqae_cuda_chunk * table,
                         long long table_stride, int n_layers, const float * cs_t, const float * cs_p0, int max_enc,
                         const struct moqae_cuda_dyn * dyn, cudaStream_t stream) {
    static bool attr_set = false; /* same value for every caller: a race only repeats the call */
    if (!attr_set) {
        MOQAE_CUDA_CHECK(cudaFuncSetAttribute(encode_kernel<MD>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                              (int) sizeof(enc_smem<MD>)));
        attr_set = true;
    }
    (void) moqae_cuda_launch(encode_kernel<MD>,
            dim3((unsigned) max_enc, 2u * (unsigned) g->n_head_kv, (unsigned) n_layers), ENC_THREADS,
            sizeof(enc_smem<MD>), stream, *g, stage_k, stage_v, stage_stride, arena, table, table_stride, cs_t, cs_p0,
            dyn);
    MOQAE_CUDA_LAUNCH_CHECK();
    return MOQAE_OK;
}

int moqae_cuda_kv_encode(const struct moqae_cuda_ring_geom * g, const uint16_t * stage_k, const uint16_t * stage_v,
                         uint8_t * arena, const struct moqae_cuda_chunk * table, const float * cs_t,
                         const float * cs_p0, int max_enc, const struct moqae_cuda_dyn * dyn, cudaStream_t stream) {
    return moqae_cuda_kv_encode_layers(g, stage_k, stage_v, 0, arena, table, 0, 1, cs_t, cs_p0, max_enc, dyn, stream);
}

int moqae_cuda_kv_encode_layers(const struct moqae_cuda_ring_geom * g, const uint16_t * stage_k, const uint16_t * stage_v,
                                long long stage_stride, uint8_t * arena, const struct moqae_cuda_chunk * table,
                                long long table_stride, int n_layers, const float * cs_t, const float * cs_p0, int max_enc,
                                const struct moqae_cuda_dyn * dyn, cudaStream_t stream) {
    if (max_enc <= 0 || n_layers <= 0) {
        return MOQAE_OK;
    }
    if (!enc_shape_ok(g->chunk, g->head_dim, g->v_group)) {
        return moqae_fail(MOQAE_ERR_UNSUPPORTED,
                          "CUDA KV encoder: chunk %d / head_dim %d / value group %d (supported: %d / <= %d, a multiple of "
                          "16 / a multiple of 16 dividing head_dim)",
                          g->chunk, g->head_dim, g->v_group, ENC_C, ENC_MAX_D);
    }
    const int md = enc_md(g->head_dim);
    return md == 64    ? encode_launch<64>(g, stage_k, stage_v, stage_stride, arena, table, table_stride, n_layers, cs_t,
                                           cs_p0, max_enc, dyn, stream)
           : md == 128 ? encode_launch<128>(g, stage_k, stage_v, stage_stride, arena, table, table_stride, n_layers, cs_t,
                                            cs_p0, max_enc, dyn, stream)
                       : encode_launch<256>(g, stage_k, stage_v, stage_stride, arena, table, table_stride, n_layers,
                                            cs_t, cs_p0, max_enc, dyn, stream);
}

/* ---- demote ------------------------------------------------------------------------------------- */

/* The args of one pass (keys, then values) of a demotion of one head: FP16 keys (after RoPE) are
 * turned back to before RoPE with cs_t and p0 when the new codec is quantized and the ring's keys are
 * before RoPE (cs_t != NULL); quantized keys already are. */
static __host__ __device__ enc_args demote_args(bool is_k, int C, int D, int G, const uint8_t * src, int old_codec,
                                                uint8_t * rec, int new_codec, const float * cs_t, const float * p0) {
    const float * turn = old_codec == 0 ? cs_t : nullptr;
    enc_args      a    = stage_args(is_k, C, D, G, new_codec, C, 0, nullptr, turn, turn ? p0 : nullptr, rec);
    a.src              = src;
    a.src_codec        = old_codec;
    return a;
}

/* One block per (job, KV head, keys or values), as encode_kernel. */
template <int MD>
static __global__ void __launch_bounds__(ENC_THREADS, 5)
demote_kernel(const struct moqae_cuda_ring_geom g, const uint8_t * __restrict__ arena,
              const struct moqae_cuda_demotion * __restrict__ jobs, uint8_t * __restrict__ out,
              const float * __restrict__ cs_t) {
    MOQAE_PDL_ENTER();
    extern __shared__ __align__(16) uint8_t smem_raw[];
    enc_smem<MD> &                     s    = *(enc_smem<MD> *) smem_raw;
    const struct moqae_cuda_demotion & j    = jobs[blockIdx.x];
    const int                          h    = blockIdx.y >> 1, pass = blockIdx.y & 1;
    const uint8_t * rk = arena + j.src + (long long) h * (g.k_pad[j.old_codec] + g.v_pad[j.old_codec]);
    uint8_t *       wk = out + j.out + (long long) h * (g.k_pad[j.new_codec] + g.v_pad[j.new_codec]);
    dev_exec        ex;
    const enc_args  a = demote_args(pass == 0, g.chunk, g.head_dim, g.v_group, pass == 0 ? rk : rk + g.k_pad[j.old_codec],
                                    j.old_codec, pass == 0 ? wk : wk + g.k_pad[j.new_codec], j.new_codec,
                                    j.has_p0 ? cs_t : nullptr, j.p0);
    encode_record(ex, s, a);
}

template <int MD>
static int demote_launch(const struct moqae_cuda_ring_geom * g, const uint8_t * arena,
                         const struct moqae_cuda_demotion * jobs, int n_jobs, uint8_t * out, const float * cs_t,
                         cudaStream_t stream) {
    static bool attr_set = false; /* same value for every caller: a race only repeats the call */
    if (!attr_set) {
        MOQAE_CUDA_CHECK(cudaFuncSetAttribute(demote_kernel<MD>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                              (int) sizeof(enc_smem<MD>)));
        attr_set = true;
    }
    (void) moqae_cuda_launch(demote_kernel<MD>, dim3((unsigned) n_jobs, 2u * (unsigned) g->n_head_kv), ENC_THREADS,
            sizeof(enc_smem<MD>), stream, *g, arena, jobs, out, cs_t);
    MOQAE_CUDA_LAUNCH_CHECK();
    return MOQAE_OK;
}

int moqae_cuda_kv_demote(const struct moqae_cuda_ring_geom * g, const uint8_t * arena,
                         const struct moqae_cuda_demotion * jobs, int n_jobs, uint8_t * out, const float * cs_t,
                         cudaStream_t stream) {
    if (n_jobs <= 0) {
        return MOQAE_OK;
    }
    if (!enc_shape_ok(g->chunk, g->head_dim, g->v_group)) {
        return moqae_fail(MOQAE_ERR_UNSUPPORTED, "CUDA KV demotion: chunk %d / head_dim %d / value group %d", g->chunk,
                          g->head_dim, g->v_group);
    }
    const int md = enc_md(g->head_dim);
    return md == 64    ? demote_launch<64>(g, arena, jobs, n_jobs, out, cs_t, stream)
           : md == 128 ? demote_launch<128>(g, arena, jobs, n_jobs, out, cs_t, stream)
                       : demote_launch<256>(g, arena, jobs, n_jobs, out, cs_t, stream);
}

/* ---- the same phases on the CPU (tests: the device code without a device) ----------------------- */

struct host_exec { /* __device__ too only so that encode_record's device instantiation type-checks */
    int n_threads;
    template <class F> __host__ __device__ void run(F f) {
        for (int t = 0; t < n_threads; t++) {
            f(t, n_threads);
        }
    }
    __host__ __device__ void sync() {}
};

/* Both passes of a record pair on the CPU with the shared state the device would use (enc_smem<MD>). */
template <int MD> static int host_pair(const enc_args & ka, const enc_args & va) {
    enc_smem<MD> * s = (enc_smem<MD> *) malloc(sizeof(enc_smem<MD>));
    if (!s) {
        return moqae_fail(MOQAE_ERR_OUT_OF_MEMORY, "out of memory");
    }
    host_exec ex = { ENC_THREADS };
    encode_record(ex, *s, ka);
    encode_record(ex, *s, va);
    free(s);
    return MOQAE_OK;
}

static int host_pair_md(int D, const enc_args & ka, const enc_args & va) {
    const int md = enc_md(D);
    return md == 64 ? host_pair<64>(ka, va) : md == 128 ? host_pair<128>(ka, va) : host_pair<256>(ka, va);
}

int moqae_cuda_kv_encode_host(int codec, int C, int D, int G, const uint16_t * k, const uint16_t * v,
                              const float * cs_t, const float * cs_p0, uint8_t * krec, uint8_t * vrec) {
    if (!enc_shape_ok(C, D, G)) {
        return moqae_fail(MOQAE_ERR_UNSUPPORTED, "CUDA KV encoder: chunk %d / head_dim %d / value group %d", C, D, G);
    }
    return host_pair_md(D, stage_args(true, C, D, G, codec, C, 0, k, cs_t, cs_p0, krec),
                        stage_args(false, C, D, G, codec, C, 0, v, cs_t, cs_p0, vrec));
}

int moqae_cuda_kv_demote_host(int old_codec, int new_codec, int C, int D, int G, const uint8_t * krec,
                              const uint8_t * vrec, const float * cs_t, const float * cs_p0, uint8_t * kout,
                              uint8_t * vout) {
    if (!enc_shape_ok(C, D, G) || new_codec <= old_codec || new_codec > 3) {
        return moqae_fail(MOQAE_ERR_UNSUPPORTED, "CUDA KV demotion: codec %d -> %d, chunk %d / head_dim %d", old_codec,
                          new_codec, C, D);
    }
    return host_pair_md(D, demote_args(true, C, D, G, krec, old_codec, kout, new_codec, cs_p0 ? cs_t : nullptr, cs_p0),
                        demote_args(false, C, D, G, vrec, old_codec, vout, new_codec, cs_p0 ? cs_t : nullptr, cs_p0));
}
