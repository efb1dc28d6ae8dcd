/*
 * cuda/q8.cuh — activations quantized to 8-bit blocks of 32 exactly as the CPU's from_float_q8_0_ref /
 * _q8_1_ref do (the values of the products with integer weights): the device layout, and one block
 * quantized by one warp. Shared by matmul.cu (RMSNorm, SwiGLU, plain quantization) and attention.cu
 * (the merge of the attention's splits quantizes its output for the output projection).
 */
#pragma once

#include "common.cuh"

struct __align__(16) q8x { /* x = d * q; d = f32(f16(amax / 127)), s = f32(f16(d_unrounded * sum(q))); 48 bytes:
                              the codes are read with 16-byte loads */
    int   q[8];
    float d, s;
};

/* One block of 32 activations quantized as from_float_q8_0_ref / _q8_1_ref, by one warp: element
 * `lane` in each lane (coalesced loads and stores; amax and the integer sum do not depend on the
 * order, so the values are the CPU's). */
static __device__ __forceinline__ void quantize_warp(float v, q8x * out) {
    const int lane = threadIdx.x & 31;
    float     amax = fabsf(v);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
    }
    const float d  = __fdiv_rn(amax, 127.0f);
    const float id = d != 0.0f ? __fdiv_rn(1.0f, d) : 0.0f;
    const int   q  = (int) roundf(__fmul_rn(v, id)); /* roundf: halves away from zero */
    int         sum = q;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        sum += __shfl_xor_sync(0xffffffffu, sum, o);
    }
    ((int8_t *) out->q)[lane] = (int8_t) q;
    if (lane == 0) {
        out->d = moqae_dev_f16_to_f32(moqae_dev_f32_to_f16(d));
        out->s = moqae_dev_f16_to_f32(moqae_dev_f32_to_f16(__fmul_rn((float) sum, d)));
    }
}
