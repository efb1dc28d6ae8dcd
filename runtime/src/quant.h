/*
 * quant.h — weight and activation block formats, byte for byte as ggml stores them in GGUF
 * (ggml-common.h). Shared by the C kernels and (later) CUDA. Each block holds QK consecutive
 * elements of one row; a row of n elements is n/QK blocks.
 */
#ifndef MOQAE_QUANT_H
#define MOQAE_QUANT_H

#include <assert.h>
#include <stdint.h>

#define MOQAE_QK4_0 32
#define MOQAE_QK4_1 32
#define MOQAE_QK8_0 32
#define MOQAE_QK8_1 32

/* Q4_0: x[i] = d * (q[i] - 8). qs[j] holds element j in its low nibble and element j+16 in its
 * high nibble (j < 16). */
typedef struct {
    uint16_t d;                   /* fp16 scale */
    uint8_t  qs[MOQAE_QK4_0 / 2]; /* nibbles    */
} moqae_block_q4_0;
static_assert(sizeof(moqae_block_q4_0) == 18, "q4_0 block size");

/* Q4_1: x[i] = d * q[i] + m, nibbles laid out as Q4_0. */
typedef struct {
    uint16_t d;                   /* fp16 scale */
    uint16_t m;                   /* fp16 min   */
    uint8_t  qs[MOQAE_QK4_1 / 2];
} moqae_block_q4_1;
static_assert(sizeof(moqae_block_q4_1) == 20, "q4_1 block size");

/* Q8_0: x[i] = d * q[i]. */
typedef struct {
    uint16_t d;              /* fp16 scale */
    int8_t   qs[MOQAE_QK8_0];
} moqae_block_q8_0;
static_assert(sizeof(moqae_block_q8_0) == 34, "q8_0 block size");

/* Q8_1 (activations for Q4_1 dot products): x[i] = d * q[i]; s = d * sum(q) lets the Q4_1 min
 * term be added once per block. */
typedef struct {
    uint16_t d; /* fp16 scale        */
    uint16_t s; /* fp16 d * sum(qs)  */
    int8_t   qs[MOQAE_QK8_1];
} moqae_block_q8_1;
static_assert(sizeof(moqae_block_q8_1) == 36, "q8_1 block size");

#endif /* MOQAE_QUANT_H */
