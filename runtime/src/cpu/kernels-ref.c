/*
 * cpu/kernels-ref.c — the scalar reference table: plain C, one element at a time, written to be read.
 * It is the oracle for kernels-avx2.c and kernels-avx512.c (tests/test-kernels.c), and is itself
 * checked against double-precision arithmetic on dequantized values in that test.
 * Quantization and dot products follow ggml's reference code (ggml-quants.c quantize_row_q8_0_ref,
 * quantize_row_q8_1_ref, ggml-cpu/quants.c ggml_vec_dot_*_generic): same rounding (roundf, half away
 * from zero), same fp16 scale and sum fields, per-block int32 sums, float accumulation across blocks;
 * float-vector dot products accumulate in double like ggml's ggml_float. Not fast; not threaded.
 */
#include "../common.h"
#include "../quant.h"
#include "kernels.h"

#include <math.h>

/* Round to nearest even, NaN forced quiet (ggml_compute_fp32_to_bf16). */
static inline moqae_bf16 f32_to_bf16_ref(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        return (moqae_bf16) ((u >> 16) | 64);
    }
    return (moqae_bf16) ((u + (0x7fffu + ((u >> 16) & 1u))) >> 16);
}

/* ================================================================================================
 * to_float
 * ================================================================================================ */

static void to_float_f32_ref(const void * x, float * y, int64_t n) {
    memcpy(y, x, (size_t) n * sizeof(float));
}

static void to_float_f16_ref(const void * x, float * y, int64_t n) {
    const moqae_f16 * h = x;
    for (int64_t i = 0; i < n; i++) {
        y[i] = moqae_f16_to_f32(h[i]);
    }
}

static void to_float_bf16_ref(const void * x, float * y, int64_t n) {
    const moqae_bf16 * h = x;
    for (int64_t i = 0; i < n; i++) {
        y[i] = moqae_bf16_to_f32(h[i]);
    }
}

static void to_float_q4_0_ref(const void * x, float * y, int64_t n) {
    const moqae_block_q4_0 * b = x;
    for (int64_t i = 0; i < n / MOQAE_QK4_0; i++) {
        const float d = moqae_f16_to_f32(b[i].d);
        for (int j = 0; j < MOQAE_QK4_0 / 2; j++) {
            y[i * MOQAE_QK4_0 + j]                   = d * (float) ((b[i].qs[j] & 0x0f) - 8);
            y[i * MOQAE_QK4_0 + j + MOQAE_QK4_0 / 2] = d * (float) ((b[i].qs[j] >> 4) - 8);
        }
    }
}

static void to_float_q4_1_ref(const void * x, float * y, int64_t n) {
    const moqae_block_q4_1 * b = x;
    for (int64_t i = 0; i < n / MOQAE_QK4_1; i++) {
        const float d = moqae_f16_to_f32(b[i].d);
        const float m = moqae_f16_to_f32(b[i].m);
        for (int j = 0; j < MOQAE_QK4_1 / 2; j++) {
            y[i * MOQAE_QK4_1 + j]                   = d * (float) (b[i].qs[j] & 0x0f) + m;
            y[i * MOQAE_QK4_1 + j + MOQAE_QK4_1 / 2] = d * (float) (b[i].qs[j] >> 4) + m;
        }
    }
}

static void to_float_q8_0_ref(const void * x, float * y, int64_t n) {
    const moqae_block_q8_0 * b = x;
    for (int64_t i = 0; i < n / MOQAE_QK8_0; i++) {
        const float d = moqae_f16_to_f32(b[i].d);
        for (int j = 0; j < MOQAE_QK8_0; j++) {
            y[i * MOQAE_QK8_0 + j] = d * (float) b[i].qs[j];
        }
    }
}

static void to_float_q8_1_ref(const void * x, float * y, int64_t n) {
    const moqae_block_q8_1 * b = x;
    for (int64_t i = 0; i < n / MOQAE_QK8_1; i++) {
        const float d = moqae_f16_to_f32(b[i].d);
        for (int j = 0; j < MOQAE_QK8_1; j++) {
            y[i * MOQAE_QK8_1 + j] = d * (float) b[i].qs[j];
        }
    }
}

/* ================================================================================================
 * from_float (activations)
 * ================================================================================================ */

static void from_float_f32_ref(const float * x, void * y, int64_t n) {
    memcpy(y, x, (size_t) n * sizeof(float));
}

static void from_float_f16_ref(const float * x, void * y, int64_t n) {
    moqae_f16 * h = y;
    for (int64_t i = 0; i < n; i++) {
        h[i] = moqae_f32_to_f16(x[i]);
    }
}

static void from_float_bf16_ref(const float * x, void * y, int64_t n) {
    moqae_bf16 * h = y;
    for (int64_t i = 0; i < n; i++) {
        h[i] = f32_to_bf16_ref(x[i]);
    }
}

/* d = amax/127, q = roundf(x/d) computed as x * (1/d), exactly as quantize_row_q8_0_ref. */
static void from_float_q8_0_ref(const float * x, void * y, int64_t n) {
    moqae_block_q8_0 * b = y;
    for (int64_t i = 0; i < n / MOQAE_QK8_0; i++) {
        const float * xb   = x + i * MOQAE_QK8_0;
        float         amax = 0.0f;
        for (int j = 0; j < MOQAE_QK8_0; j++) {
            amax = fmaxf(amax, fabsf(xb[j]));
        }
        const float d  = amax / 127.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        b[i].d         = moqae_f32_to_f16(d);
        for (int j = 0; j < MOQAE_QK8_0; j++) {
            b[i].qs[j] = (int8_t) roundf(xb[j] * id);
        }
    }
}

/* As Q8_0, plus s = fp16(d * sum(q)) with the integer sum converted to float (quantize_row_q8_1_ref). */
static void from_float_q8_1_ref(const float * x, void * y, int64_t n) {
    moqae_block_q8_1 * b = y;
    for (int64_t i = 0; i < n / MOQAE_QK8_1; i++) {
        const float * xb   = x + i * MOQAE_QK8_1;
        float         amax = 0.0f;
        for (int j = 0; j < MOQAE_QK8_1; j++) {
            amax = fmaxf(amax, fabsf(xb[j]));
        }
        const float d   = amax / 127.0f;
        const float id  = d != 0.0f ? 1.0f / d : 0.0f;
        int         sum = 0;
        b[i].d          = moqae_f32_to_f16(d);
        for (int j = 0; j < MOQAE_QK8_1; j++) {
            b[i].qs[j] = (int8_t) roundf(xb[j] * id);
            sum += b[i].qs[j];
        }
        b[i].s = moqae_f32_to_f16((float) sum * d);
    }
}

/* ================================================================================================
 * vec_dot: w in the weight type, x in its vec_dot_type
 * ================================================================================================ */

static void vec_dot_f32_ref(int64_t n, float * s, const void * w, const void * x) {
    const float * a   = w;
    const float * b   = x;
    double        sum = 0.0;
    for (int64_t i = 0; i < n; i++) {
        sum += (double) a[i] * (double) b[i];
    }
    *s = (float) sum;
}

static void vec_dot_f16_ref(int64_t n, float * s, const void * w, const void * x) {
    const moqae_f16 * a   = w;
    const moqae_f16 * b   = x;
    double            sum = 0.0;
    for (int64_t i = 0; i < n; i++) {
        sum += (double) (moqae_f16_to_f32(a[i]) * moqae_f16_to_f32(b[i]));
    }
    *s = (float) sum;
}

static void vec_dot_bf16_ref(int64_t n, float * s, const void * w, const void * x) {
    const moqae_bf16 * a   = w;
    const moqae_bf16 * b   = x;
    double             sum = 0.0;
    for (int64_t i = 0; i < n; i++) {
        sum += (double) (moqae_bf16_to_f32(a[i]) * moqae_bf16_to_f32(b[i]));
    }
    *s = (float) sum;
}

/* sum_b d_w * d_x * sum_j (q_j - 8) * x_j */
static void vec_dot_q4_0_q8_0_ref(int64_t n, float * s, const void * w, const void * x) {
    const moqae_block_q4_0 * a   = w;
    const moqae_block_q8_0 * b   = x;
    float                    sum = 0.0f;
    for (int64_t i = 0; i < n / MOQAE_QK4_0; i++) {
        int sumi = 0;
        for (int j = 0; j < MOQAE_QK4_0 / 2; j++) {
            sumi += ((a[i].qs[j] & 0x0f) - 8) * b[i].qs[j];
            sumi += ((a[i].qs[j] >> 4) - 8) * b[i].qs[j + MOQAE_QK4_0 / 2];
        }
        sum += (float) sumi * (moqae_f16_to_f32(a[i].d) * moqae_f16_to_f32(b[i].d));
    }
    *s = sum;
}

/* sum_b d_w * d_x * sum_j q_j * x_j + m_w * s_x: the min term uses the stored s = fp16(d_x * sum(x)). */
static void vec_dot_q4_1_q8_1_ref(int64_t n, float * s, const void * w, const void * x) {
    const moqae_block_q4_1 * a   = w;
    const moqae_block_q8_1 * b   = x;
    float                    sum = 0.0f;
    for (int64_t i = 0; i < n / MOQAE_QK4_1; i++) {
        int sumi = 0;
        for (int j = 0; j < MOQAE_QK4_1 / 2; j++) {
            sumi += (a[i].qs[j] & 0x0f) * b[i].qs[j];
            sumi += (a[i].qs[j] >> 4) * b[i].qs[j + MOQAE_QK4_1 / 2];
        }
        sum += (float) sumi * (moqae_f16_to_f32(a[i].d) * moqae_f16_to_f32(b[i].d)) +
               moqae_f16_to_f32(a[i].m) * moqae_f16_to_f32(b[i].s);
    }
    *s = sum;
}

static void vec_dot_q8_0_q8_0_ref(int64_t n, float * s, const void * w, const void * x) {
    const moqae_block_q8_0 * a   = w;
    const moqae_block_q8_0 * b   = x;
    float                    sum = 0.0f;
    for (int64_t i = 0; i < n / MOQAE_QK8_0; i++) {
        int sumi = 0;
        for (int j = 0; j < MOQAE_QK8_0; j++) {
            sumi += a[i].qs[j] * b[i].qs[j];
        }
        sum += (float) sumi * (moqae_f16_to_f32(a[i].d) * moqae_f16_to_f32(b[i].d));
    }
    *s = sum;
}

/* ================================================================================================
 * gemm: the reference just loops vec_dot, so it is bit-identical to it
 * ================================================================================================ */

#define MOQAE_GEMM_REF(name, vec_dot)                                                                     \
    static void name(int64_t n, int64_t n_rows, int64_t n_tok, const void * w, size_t w_row_bytes,       \
                     const void * x, size_t x_row_bytes, float * y, int64_t ldy) {                        \
        for (int64_t t = 0; t < n_tok; t++) {                                                             \
            for (int64_t r = 0; r < n_rows; r++) {                                                        \
                vec_dot(n, &y[t * ldy + r], (const char *) w + (size_t) r * w_row_bytes,                  \
                        (const char *) x + (size_t) t * x_row_bytes);                                     \
            }                                                                                             \
        }                                                                                                 \
    }

MOQAE_GEMM_REF(gemm_f32_ref, vec_dot_f32_ref)
MOQAE_GEMM_REF(gemm_f16_ref, vec_dot_f16_ref)
MOQAE_GEMM_REF(gemm_bf16_ref, vec_dot_bf16_ref)
MOQAE_GEMM_REF(gemm_q4_0_q8_0_ref, vec_dot_q4_0_q8_0_ref)
MOQAE_GEMM_REF(gemm_q4_1_q8_1_ref, vec_dot_q4_1_q8_1_ref)
MOQAE_GEMM_REF(gemm_q8_0_q8_0_ref, vec_dot_q8_0_q8_0_ref)

/* ================================================================================================
 * float ops
 * ================================================================================================ */

static float dot_f32_ref(int64_t n, const float * x, const float * y) {
    double sum = 0.0;
    for (int64_t i = 0; i < n; i++) {
        sum += (double) x[i] * (double) y[i];
    }
    return (float) sum;
}

static float dot_f32_f16_ref(int64_t n, const float * x, const uint16_t * y) {
    double sum = 0.0;
    for (int64_t i = 0; i < n; i++) {
        sum += (double) x[i] * (double) moqae_f16_to_f32(y[i]);
    }
    return (float) sum;
}

static void axpy_f16_ref(int64_t n, float a, const uint16_t * x, float * y) {
    for (int64_t i = 0; i < n; i++) {
        y[i] += a * moqae_f16_to_f32(x[i]);
    }
}

static void f32_to_f16_ref(int64_t n, const float * x, uint16_t * y) {
    for (int64_t i = 0; i < n; i++) {
        y[i] = moqae_f32_to_f16(x[i]);
    }
}

/* ggml: the sum of squares in ggml_float (double), scale = 1/sqrtf(mean + eps) in float, then the
 * normalised value times the weight (ggml's rms_norm followed by mul). */
static void rms_norm_ref(int64_t n, const float * x, const float * w, float eps, float * y) {
    double sum = 0.0;
    for (int64_t i = 0; i < n; i++) {
        sum += (double) x[i] * (double) x[i];
    }
    const float mean  = (float) (sum / (double) n);
    const float scale = 1.0f / sqrtf(mean + eps);
    for (int64_t i = 0; i < n; i++) {
        y[i] = (x[i] * scale) * w[i];
    }
}

/* silu(g) = g / (1 + exp(-g)) as ggml_silu_f32. */
static void swiglu_ref(int64_t n, float * g, const float * u) {
    for (int64_t i = 0; i < n; i++) {
        g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
    }
}

static void scale_ref(int64_t n, float a, float * y) {
    for (int64_t i = 0; i < n; i++) {
        y[i] *= a;
    }
}

static void softmax_ref(int64_t n, float a, float * y) {
    float mx = -INFINITY;
    for (int64_t i = 0; i < n; i++) {
        y[i] *= a;
        mx = y[i] > mx ? y[i] : mx;
    }
    double sum = 0.0;
    for (int64_t i = 0; i < n; i++) {
        y[i] = expf(y[i] - mx);
        sum += y[i];
    }
    const float r = (float) (1.0 / sum);
    for (int64_t i = 0; i < n; i++) {
        y[i] *= r;
    }
}

static void add_ref(int64_t n, const float * x, float * y) {
    for (int64_t i = 0; i < n; i++) {
        y[i] += x[i];
    }
}

/* ================================================================================================
 * the table
 * ================================================================================================ */

static const struct moqae_cpu_kernels kernels_ref = {
    .name = "scalar",
    .type =
        {
            [MOQAE_TYPE_F32]  = {MOQAE_TYPE_F32, to_float_f32_ref, from_float_f32_ref, vec_dot_f32_ref, gemm_f32_ref},
            [MOQAE_TYPE_F16]  = {MOQAE_TYPE_F16, to_float_f16_ref, from_float_f16_ref, vec_dot_f16_ref, gemm_f16_ref},
            [MOQAE_TYPE_BF16] = {MOQAE_TYPE_BF16, to_float_bf16_ref, from_float_bf16_ref, vec_dot_bf16_ref,
                                 gemm_bf16_ref},
            [MOQAE_TYPE_Q4_0] = {MOQAE_TYPE_Q8_0, to_float_q4_0_ref, NULL, vec_dot_q4_0_q8_0_ref, gemm_q4_0_q8_0_ref},
            [MOQAE_TYPE_Q4_1] = {MOQAE_TYPE_Q8_1, to_float_q4_1_ref, NULL, vec_dot_q4_1_q8_1_ref, gemm_q4_1_q8_1_ref},
            [MOQAE_TYPE_Q8_0] = {MOQAE_TYPE_Q8_0, to_float_q8_0_ref, from_float_q8_0_ref, vec_dot_q8_0_q8_0_ref,
                                 gemm_q8_0_q8_0_ref},
            [MOQAE_TYPE_Q8_1] = {MOQAE_TYPE_Q8_1, to_float_q8_1_ref, from_float_q8_1_ref, NULL, NULL},
        },
    .dot_f32     = dot_f32_ref,
    .dot_f32_f16 = dot_f32_f16_ref,
    .axpy_f16    = axpy_f16_ref,
    .f32_to_f16  = f32_to_f16_ref,
    .rms_norm    = rms_norm_ref,
    .swiglu      = swiglu_ref,
    .scale       = scale_ref,
    .softmax     = softmax_ref,
    .add         = add_ref,
};

const struct moqae_cpu_kernels * moqae_cpu_kernels_ref(void) {
    return &kernels_ref;
}
