/*
 * common.h — internal helpers shared by every file of libmoqae: error reporting, logging,
 * checked size arithmetic, fp16/bf16 conversion. Not part of the public API (moqae.h is).
 */
#ifndef MOQAE_COMMON_H
#define MOQAE_COMMON_H

#include "moqae.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#if defined(__F16C__) || defined(__AVX2__)
#    include <immintrin.h>
#endif

#if defined(__GNUC__)
#    define MOQAE_PRINTF(a, b) __attribute__((format(printf, a, b)))
#else
#    define MOQAE_PRINTF(a, b)
#endif

/* Record a thread-local message for moqae_last_error() and return status (so callers can write
 * `return moqae_fail(MOQAE_ERR_FORMAT, "...")`). */
int moqae_fail(int status, const char * fmt, ...) MOQAE_PRINTF(2, 3);

/* Prefix the current thread-local message with more context ("loading x.gguf: "), return status. */
int moqae_fail_prefix(int status, const char * fmt, ...) MOQAE_PRINTF(2, 3);

void moqae_log(int level, const char * fmt, ...) MOQAE_PRINTF(2, 3);

/* Forget this thread's last error message. */
void moqae_clear_error(void);

/* 64-byte aligned allocation (free with free()); NULL on failure. */
void * moqae_aligned_alloc(size_t bytes);

/* Internal invariants only: a failure is a bug in libmoqae, not bad input. */
#define MOQAE_ASSERT(x)                                                                       \
    do {                                                                                      \
        if (!(x)) {                                                                           \
            fprintf(stderr, "%s:%d: MOQAE_ASSERT(%s) failed\n", __FILE__, __LINE__, #x);      \
            abort();                                                                          \
        }                                                                                     \
    } while (0)

/* Checked 64-bit arithmetic for sizes read from files: false on overflow. */
static inline int moqae_mul_ok(uint64_t a, uint64_t b, uint64_t * out) {
    return !__builtin_mul_overflow(a, b, out);
}
static inline int moqae_add_ok(uint64_t a, uint64_t b, uint64_t * out) {
    return !__builtin_add_overflow(a, b, out);
}

/* SHA-256 of n bytes as 64 lowercase hex digits and a NUL. */
void moqae_sha256_hex(const void * data, size_t n, char out[65]);

/* ---- half precision --------------------------------------------------------------------------- */

typedef uint16_t moqae_f16;  /* IEEE binary16 bits */
typedef uint16_t moqae_bf16; /* bfloat16 bits      */

static inline float moqae_f16_to_f32(moqae_f16 h) {
#if defined(__F16C__) || defined(__AVX2__)
    return _cvtsh_ss(h);
#else
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t       exp  = (h >> 10) & 0x1fu;
    uint32_t       man  = h & 0x3ffu;
    uint32_t       bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else { /* subnormal: normalise */
            int e = -1;
            do {
                e++;
                man <<= 1;
            } while ((man & 0x400u) == 0);
            bits = sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 0x3ffu) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (man << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
#endif
}

/* Round to nearest even, as numpy's astype(float16). */
static inline moqae_f16 moqae_f32_to_f16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    const uint32_t sign = (x >> 16) & 0x8000u;
    const uint32_t absx = x & 0x7fffffffu;
    if (absx >= 0x7f800000u) { /* inf or nan */
        return (moqae_f16)(sign | 0x7c00u | (absx > 0x7f800000u ? 0x200u : 0));
    }
    if (absx >= 0x477ff000u) { /* rounds to >= 65520: overflow to inf */
        return (moqae_f16)(sign | 0x7c00u);
    }
    if (absx < 0x38800000u) { /* below the smallest normal half: subnormal or zero */
        if (absx < 0x33000000u) {
            return (moqae_f16)sign;
        }
        const uint32_t e     = absx >> 23;
        const uint32_t m     = (absx & 0x7fffffu) | 0x800000u;
        const uint32_t shift = 126 - e; /* 14..24 */
        uint32_t       r     = m >> shift;
        const uint32_t rem   = m & ((1u << shift) - 1);
        const uint32_t half  = 1u << (shift - 1);
        if (rem > half || (rem == half && (r & 1u))) {
            r++;
        }
        return (moqae_f16)(sign | r);
    }
    uint32_t r = absx - 0x38000000u; /* rebias exponent 127 -> 15 */
    const uint32_t rem = r & 0x1fffu;
    r >>= 13;
    if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) {
        r++;
    }
    return (moqae_f16)(sign | r);
}

static inline float moqae_bf16_to_f32(moqae_bf16 h) {
    const uint32_t bits = (uint32_t)h << 16;
    float          f;
    memcpy(&f, &bits, 4);
    return f;
}

#endif /* MOQAE_COMMON_H */
