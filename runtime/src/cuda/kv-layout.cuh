/*
 * cuda/kv-layout.cuh — kv-codec.h's record layout as the device reads and writes it, shared by the
 * encoder (kv-codec.cu) and attention (attention.cu): record geometry, the scale and zero grids
 * (FRAC, 2^-e), where a code sits in a packed row, and the Walsh-Hadamard rotation. Everything here
 * is __host__ __device__ so that the encoder's phases can be run on the CPU as well (tests without a
 * device). The spec is kv-codec.h; the reference is kv-codec.c.
 */
#pragma once

#include "common.cuh"

/* kv-codec.c's FRAC[f] = f32(2^(-f/16)), bit for bit (device and host copies). */
#define MOQAE_CUDA_FRAC_INIT                                                                                     \
    { 0x1.000000p+0f, 0x1.ea4afap-1f, 0x1.d5818ep-1f, 0x1.c199bep-1f, 0x1.ae89fap-1f, 0x1.9c4918p-1f,          \
      0x1.8ace54p-1f, 0x1.7a1148p-1f, 0x1.6a09e6p-1f, 0x1.5ab07ep-1f, 0x1.4bfdaep-1f, 0x1.3dea64p-1f,          \
      0x1.306fe0p-1f, 0x1.2387a6p-1f, 0x1.172b84p-1f, 0x1.0b5586p-1f }

static __constant__ float kvl_frac_dev[16] = MOQAE_CUDA_FRAC_INIT;
static const float        kvl_frac_host[16] = MOQAE_CUDA_FRAC_INIT;

static __host__ __device__ __forceinline__ float kvl_frac(unsigned f) {
#ifdef __CUDA_ARCH__
    return kvl_frac_dev[f & 15u];
#else
    return kvl_frac_host[f & 15u];
#endif
}

/* 2^-e for e < 127, exactly. */
static __host__ __device__ __forceinline__ float kvl_pow2_neg(unsigned e) {
    const uint32_t bits = (127u - e) << 23;
#ifdef __CUDA_ARCH__
    return __uint_as_float(bits);
#else
    float f;
    memcpy(&f, &bits, 4);
    return f;
#endif
}

/* scale(a) = (sb * FRAC[a % 16]) * 2^-(a / 16): the second product is exact (kv-codec.c). */
static __host__ __device__ __forceinline__ float kvl_scale(float sb, unsigned a) {
    return xmul(xmul(sb, kvl_frac(a)), kvl_pow2_neg(a >> 4));
}

/* scale(a) / sbase: FRAC[a % 16] * 2^-(a / 16), exact in f32. */
static __host__ __device__ __forceinline__ float kvl_scale_rel(unsigned a) {
    return xmul(kvl_frac(a), kvl_pow2_neg(a >> 4));
}

/* zero(z) = zl + zs * z. */
static __host__ __device__ __forceinline__ float kvl_zero(float zl, float zs, unsigned z) {
    return xadd(zl, xmul(zs, (float) z));
}

static __host__ __device__ __forceinline__ uint16_t kvl_rd16(const uint8_t * p) {
    return (uint16_t) (p[0] | (p[1] << 8));
}

static __host__ __device__ __forceinline__ void kvl_wr16(uint8_t * p, uint16_t h) {
    p[0] = (uint8_t) (h & 0xffu);
    p[1] = (uint8_t) (h >> 8);
}

/* Bits of a codec (enum moqae_kv_codec): 16, 8, 4, 2. */
static __host__ __device__ __forceinline__ int kvl_bits(int codec) {
    return codec == 0 ? 16 : codec == 1 ? 8 : codec == 2 ? 4 : 2;
}

/* Geometry of a quantized record (kv-codec.h's layout): codes | xhi (keys) | zcode | scode | bases |
 * outlier fields (keys). Offsets in bytes from the record's start. */
struct kvl_geom {
    int bits, n_groups, n_elems, share;
    int off_xhi, off_zc, off_sc, off_bases, off_x; /* off_x: xz, xs, xi (keys only) */
};

static __host__ __device__ __forceinline__ kvl_geom kvl_geom_k(int codec, int C, int D) {
    kvl_geom g;
    g.bits     = kvl_bits(codec);
    g.n_groups = D;
    g.n_elems  = C;
    g.share    = 1;
    g.off_xhi  = D * C * g.bits / 8;
    g.off_zc   = g.off_xhi + D * g.bits / 8;
    g.off_sc   = g.off_zc + D;
    g.off_bases = g.off_sc + D;
    g.off_x    = g.off_bases + 6;
    return g;
}

static __host__ __device__ __forceinline__ kvl_geom kvl_geom_v(int codec, int C, int D, int G) {
    kvl_geom g;
    g.bits     = kvl_bits(codec);
    g.n_groups = C * (D / G);
    g.n_elems  = G;
    g.share    = D / G;
    g.off_xhi  = C * D * g.bits / 8;
    g.off_zc   = g.off_xhi;
    g.off_sc   = g.off_zc + g.n_groups;
    g.off_bases = g.off_sc + C;
    g.off_x    = g.off_bases + 6;
    return g;
}

/* Element e of a packed row of b-bit codes: byte and shift (blocks of 16 codes, 2b bytes each). */
static __host__ __device__ __forceinline__ int kvl_code_byte(int e, int bits) {
    return (e / 16) * 2 * bits + (e % 16) % (2 * bits);
}

static __host__ __device__ __forceinline__ int kvl_code_shift(int e, int bits) {
    return bits * ((e % 16) / (2 * bits));
}

static __host__ __device__ __forceinline__ unsigned kvl_get_code(const uint8_t * row, int e, int bits) {
    return ((unsigned) row[kvl_code_byte(e, bits)] >> kvl_code_shift(e, bits)) & ((1u << bits) - 1u);
}

/* The same for b in {2, 4, 8} (the quantized codecs) and e >= 0, without divisions: 2b divides 16, so
 * (e % 16) % 2b = e & (2b - 1) and (e % 16) / 2b is a shift (a device division by a run-time value
 * costs about 20 instructions; attention's decode loop reads codes this way per chunk). */
static __host__ __device__ __forceinline__ int kvl_code_byte_q(int e, int bits) {
    return (e >> 4) * 2 * bits + (e & (2 * bits - 1));
}

static __host__ __device__ __forceinline__ int kvl_code_shift_q(int e, int bits) {
    return bits * ((e & 15) >> (bits == 8 ? 4 : bits == 4 ? 3 : 2));
}

static __host__ __device__ __forceinline__ unsigned kvl_get_code_q(const uint8_t * row, int e, int bits) {
    return ((unsigned) row[kvl_code_byte_q(e, bits)] >> kvl_code_shift_q(e, bits)) & ((1u << bits) - 1u);
}

/* The rotation's block: the largest power of two dividing n, and its factors 2^-floor(m/2) (forward),
 * 2^-ceil(m/2) (back), n = 2^m. */
static __host__ __device__ __forceinline__ int kvl_rot_block(int n) {
    return n & -n;
}

static __host__ __device__ __forceinline__ float kvl_rot_factor(int n, bool inverse) {
    int m = 0;
    while ((1 << m) < n) {
        m++;
    }
    return kvl_pow2_neg((unsigned) (inverse ? (m + 1) / 2 : m / 2));
}
