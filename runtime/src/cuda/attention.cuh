/*
 * cuda/attention.cuh — mixed-bit attention over the GPU ring under kv-cache.h's rule: a query at
 * position p attends to every completed chunk before its own (read from the chunk table, each at
 * its own codec: no dequantized copy of the cache) and to the tokens of its own chunk up to p (the
 * f16 staging window). Quantized records hold Hadamard-rotated data and, by default, keys turned
 * back to before RoPE (kv-codec.h, kv-ring.c): the kernels rotate them forward with the ring's
 * tables. Three kernels, one choice point (moqae_cuda_attn_pick):
 *  - prefill (micro-batches of more than 4 tokens): a block of 16 warps takes 256 query rows, decodes
 *    each tile once into shared memory (f16 keys after RoPE, quantized ones on tensor cores as v3 does;
 *    values turned back; two buffers, the next tile decoded before this one's products), and each warp
 *    keeps its 16 rows' scores, weights and outputs in registers (mma m16n8k16, online softmax on the
 *    accumulators);
 *  - generic (decode fallback, micro-batches of 2-4 tokens, MOQAE_CUDA_ATTN=1): a block takes ROWS query
 *    rows, decodes each key tile into shared memory (codes -> f32 -> inverse Hadamard -> RoPE -> f16)
 *    and scores / weights it on tensor cores (WMMA, f32 accumulate), online softmax in f32;
 *  - v3 (decode, one token, up to 4 query heads per KV head): every warp walks its own chunks with
 *    no block barrier, its records copied ahead by cp.async; the keys' inverse Hadamard is split into
 *    a 16-point stage on tensor cores (codes straight from the record into mma fragments, scales in
 *    the other operand) and the rest in registers, RoPE and the dot product in f32; values are summed
 *    in the rotated space and turned back once at the end.
 * A merge kernel combines flash-decoding splits. Reference: kv-ring.c moqae_kv_cache_attend.
 */
#pragma once

#include "kv-codec.cuh"

struct moqae_cuda_attn_args {
    const float *                   q;       /* [n_tok][n_head][D] after RoPE                  */
    float *                         out;     /* [n_tok][n_head][D]                             */
    void *                          xq;      /* not NULL: out also quantized there (matmul.cuh's
                                                moqae_cuda_quantize layout), for the output
                                                projection                                     */
    float *                         part;    /* split partials (moqae_cuda_attn_part_floats)   */
    const uint8_t *                 arena;   /* this layer's records                           */
    const uint16_t *                stage_k; /* this layer's window [n_head_kv][stage_rows][D]  */
    const uint16_t *                stage_v;
    const struct moqae_cuda_chunk * table;
    const float *                   cs_t;    /* keys before RoPE: [D/2][2][C]; NULL: after RoPE */
    const float *                   cs_p0;   /* [n_chunks][D/2][2], by table index             */
    const struct moqae_cuda_dyn *   dyn;
    int                             n_tok, n_head, n_split;
    int                             raw_bytes; /* largest padded quantized record pair (key + value)
                                                  the ring may hold (multiple of 16): v3's copy
                                                  buffers                                          */
    float                           scale;
    int                             kernel;    /* 0: moqae_cuda_attn_pick's choice; tests may name one */
    int                             pv_cores;  /* set by the launcher from MOQAE_CUDA_PV: 1 (=0): v3 sums
                                                  INT4 and INT2 values on CUDA cores (the fourth
                                                  increment's path, for comparison); 3 (=4): INT2 values
                                                  on CUDA cores (session 7's); otherwise on tensor
                                                  cores (D 128, one query head per KV head)        */
    int                             walk_mixed; /* set by the launcher from MOQAE_CUDA_WALK=0: v3's warps
                                                  take their chunks in table order whatever the codec
                                                  (session 7's walk, for comparison); otherwise INT4
                                                  chunks first, then the others                    */
    int                             pf_keys_gen; /* set by the launcher from MOQAE_CUDA_PFK=0: the prefill
                                                  kernel decodes quantized keys per row on CUDA cores;
                                                  otherwise on tensor cores (4 warps)              */
};

/* Which kernel: the one choice point ("supported" derives from it). */
enum moqae_cuda_attn_kernel {
    MOQAE_CUDA_ATTN_NONE = 0,
    MOQAE_CUDA_ATTN_GENERIC, /* tile decode into shared memory + WMMA: prefill, decode fallback */
    MOQAE_CUDA_ATTN_V3,      /* decode of one token, group <= 4: warp-independent chunk walk     */
    MOQAE_CUDA_ATTN_PF,      /* micro-batches of more than 4 tokens: 128 rows per tile decode,
                                S, P and O in registers                                           */
};
enum moqae_cuda_attn_kernel moqae_cuda_attn_pick(int head_dim, int chunk, int group, int64_t n_tok);

/* Whether some kernel exists for this head_dim (64, 128) and chunk size (32). */
bool moqae_cuda_attn_supported(int head_dim, int chunk);

/* Rows per block for a micro-batch of n_tok tokens (the generic kernel's 16 up to 4 tokens, the
 * prefill kernel's 128 above); the partials are laid out with it. */
int moqae_cuda_attn_rows(int64_t n_tok);

/* Floats the partials of n_split splits need for n_tok tokens. */
size_t moqae_cuda_attn_part_floats(const struct moqae_cuda_ring_geom * g, int64_t n_tok, int64_t n_head, int n_split);

/* Splits of a decode step (fixed for the context: its graph replays them) for contexts of up to
 * max_tiles tiles: for v3, as many blocks as fit on the device at once (its occupancy with this
 * ring's copy buffers), else several per SM. */
int moqae_cuda_attn_decode_split(const struct moqae_cuda_ring_geom * g, int raw_bytes, int group, int n_sm,
                                 int64_t max_tiles, int * n_split);

int moqae_cuda_attention(const struct moqae_cuda_ring_geom * g, const struct moqae_cuda_attn_args * a,
                         cudaStream_t stream);
