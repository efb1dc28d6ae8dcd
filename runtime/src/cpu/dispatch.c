/*
 * cpu/dispatch.c — picks the CPU kernel table once at run time: the widest ISA that both the build and
 * the CPU support (AVX-512 with BW/VL/DQ/VNNI, else AVX2 with FMA/F16C, else the scalar reference),
 * unless MOQAE_CPU=scalar|avx2|avx512 asks for one (falling back when it is unavailable). Compiled for
 * baseline x86-64 so it runs on any CPU; the feature checks live here and not in the SIMD files, which
 * may contain wide instructions anywhere. Reference: ggml-cpu's all-variants backend selection.
 * Also here, being ISA-free: the loop that covers a gemm with a SIMD file's register tiles.
 */
#if defined(__x86_64__) || defined(__i386__)
#    include <cpuid.h>
#endif
#include "kernels.h"

#include <stdlib.h>
#include <string.h>

/* __builtin_cpu_supports also checks that the OS saves the wide registers (XCR0). */
int moqae_cpu_has_avx2(void) {
#if defined(__x86_64__) && defined(__GNUC__)
    /* f16c from CPUID directly: __builtin_cpu_supports("f16c") needs clang >= 16 */
    unsigned a = 0, b = 0, c = 0, d = 0;
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __get_cpuid(1, &a, &b, &c, &d) &&
           (c & bit_F16C);
#else
    return 0;
#endif
}

int moqae_cpu_has_avx512(void) {
#if defined(__x86_64__) && defined(__GNUC__)
    /* DQ too: the file is compiled with -mavx512dq, so the compiler may emit its instructions. Every CPU
     * with AVX512-VNNI has DQ (Cascade Lake, Ice Lake, Zen 4 and later). */
    return moqae_cpu_has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512vnni");
#else
    return 0;
#endif
}

static const struct moqae_cpu_kernels * pick(void) {
    const struct moqae_cpu_kernels * avx512 = moqae_cpu_kernels_avx512();
    const struct moqae_cpu_kernels * avx2   = moqae_cpu_kernels_avx2();
    const char *                     want   = getenv("MOQAE_CPU");
    if (want && strcmp(want, "scalar") == 0) {
        return moqae_cpu_kernels_ref();
    }
    if (want && strcmp(want, "avx2") == 0 && avx2) {
        return avx2;
    }
    if (avx512) {
        return avx512;
    }
    if (avx2) {
        return avx2;
    }
    return moqae_cpu_kernels_ref();
}

const struct moqae_cpu_kernels * moqae_cpu_kernels(void) {
    /* Every thread computes the same answer, so a race only repeats the work. */
    static const struct moqae_cpu_kernels * chosen;
    const struct moqae_cpu_kernels *        k = __atomic_load_n(&chosen, __ATOMIC_ACQUIRE);
    if (!k) {
        k = pick();
        __atomic_store_n(&chosen, k, __ATOMIC_RELEASE);
    }
    return k;
}

void moqae_gemm_tiled(const struct moqae_gemm_tiles * k, int64_t n, int64_t n_rows, int64_t n_tok, const void * w,
                      size_t wrb, const void * x, size_t xrb, float * y, int64_t ldy) {
    const uint8_t * W = w;
    const uint8_t * X = x;
    int64_t         r = 0;
    if (n_tok < k->T) { /* decode-like: many rows per tile, one token at a time */
        for (; r + k->RD <= n_rows; r += k->RD) {
            for (int64_t t = 0; t < n_tok; t++) {
                k->rdx1(n, W + r * wrb, wrb, X + t * xrb, xrb, y + t * ldy + r, ldy);
            }
        }
    }
    for (; r + k->R <= n_rows; r += k->R) {
        int64_t t = 0;
        for (; t + k->T <= n_tok; t += k->T) {
            k->rxt(n, W + r * wrb, wrb, X + t * xrb, xrb, y + t * ldy + r, ldy);
        }
        for (; t < n_tok; t++) {
            k->rx1(n, W + r * wrb, wrb, X + t * xrb, xrb, y + t * ldy + r, ldy);
        }
    }
    for (; r < n_rows; r++) {
        int64_t t = 0;
        for (; t + k->T <= n_tok; t += k->T) {
            k->onext(n, W + r * wrb, wrb, X + t * xrb, xrb, y + t * ldy + r, ldy);
        }
        for (; t < n_tok; t++) {
            k->one(n, W + r * wrb, wrb, X + t * xrb, xrb, y + t * ldy + r, ldy);
        }
    }
}
