/*
 * cuda/kv-codec.cuh — the KV ring's write side on the device: copy a micro-batch's K (after RoPE)
 * and V into the f16 staging window, and encode every chunk the micro-batch completes into its
 * record, where it was computed, byte for byte as kv-ring.c + kv-codec.c do: quantized keys turned
 * back to before RoPE with the ring's tables (kv-ring.c unrotate_chunk), the outlier token, the
 * Hadamard rotation, the searched scale and zero codes (moqae_kv_encode_k/_v: the same f32
 * operations in the same order, no fused multiply-add). Checked against the CPU encoder by
 * tests/tools/cuda-parity.c (on the device, and on the CPU through moqae_cuda_kv_encode_host). The
 * chunk's codec comes from the chunk table: an input per chunk (a fixed policy or the router).
 */
#pragma once

#include "common.cuh"

/* Geometry shared by the ring kernels (store, encode, attention). */
struct moqae_cuda_ring_geom {
    int       chunk;      /* C: tokens per chunk (32)                        */
    int       head_dim;   /* D                                               */
    int       v_group;    /* G                                               */
    int       n_head_kv;
    long long stage_rows; /* rows of the staging window per (layer, head): position p is row p % stage_rows */
    long long k_bytes[4]; /* record sizes per codec (kv-codec.h)             */
    long long v_bytes[4];
    long long k_pad[4];   /* the same padded to MOQAE_CUDA_REC_ALIGN         */
    long long v_pad[4];
};

/* RoPE, then the store: pairs (2i, 2i+1), i < n_rot/2, of every head of q [n_tok][n_head][D] and
 * k [n_tok][n_head_kv][D] rotated in place by rope_cs [n_tok][n_rot/2][2] (cos, sin of each token's
 * angles, computed on the host as graph.c rope_table does: ggml's angles, the C library's cosf/sinf;
 * the rotation is graph.c rope_head's), and the rotated k with v [n_tok][n_head_kv][D] written to this
 * layer's window stage_k/v [n_head_kv][stage_rows][D] f16 at rows n_past + t. One launch. */
int moqae_cuda_kv_rope_store(const struct moqae_cuda_ring_geom * g, float * q, float * k, const float * v, int64_t n_tok,
                             int64_t n_head, int64_t n_rot, const float * rope_cs, uint16_t * stage_k, uint16_t * stage_v,
                             const struct moqae_cuda_dyn * dyn, cudaStream_t stream);

/* Encode chunks table[dyn->enc_first .. + dyn->n_enc) of one layer from its staging window into its
 * arena (records at chunk.off + h * (k_pad + v_pad)); max_enc bounds dyn->n_enc (grid size).
 * Keys before RoPE: cs_t [D/2][2][C] (the ring's offsets table) and cs_p0 [n_chunks][D/2][2] (each
 * table entry's start), both as kv-ring.c computes them (moqae_kv_rope_fill); cs_t NULL: keys are
 * stored as staged (after RoPE). FP16 records always hold the staged keys. */
int moqae_cuda_kv_encode(const struct moqae_cuda_ring_geom * g, const uint16_t * stage_k, const uint16_t * stage_v,
                         uint8_t * arena, const struct moqae_cuda_chunk * table, const float * cs_t,
                         const float * cs_p0, int max_enc, const struct moqae_cuda_dyn * dyn, cudaStream_t stream);

/* The same for n_layers layers in one launch: layer z's staging window at stage_k/v + z * stage_stride
 * (elements) and its chunk table at table + z * table_stride (entries); the arena is shared (records at
 * absolute offsets). Decode steps encode the chunk they complete this way after every layer has run:
 * the step's own attention reads that chunk from the staging window, so only the next step needs it,
 * and one launch of n_layers x n_head_kv blocks fills the GPU where n_layers launches of n_head_kv
 * blocks each ran one after another. */
int moqae_cuda_kv_encode_layers(const struct moqae_cuda_ring_geom * g, const uint16_t * stage_k, const uint16_t * stage_v,
                                long long stage_stride, uint8_t * arena, const struct moqae_cuda_chunk * table,
                                long long table_stride, int n_layers, const float * cs_t, const float * cs_p0, int max_enc,
                                const struct moqae_cuda_dyn * dyn, cudaStream_t stream);

/* The encoder's phases run on the CPU, one chunk of one head (k, v: [C][D] f16 bits; cs_t, cs_p0 as
 * above for the chunk, or NULL): for testing the device code where there is no device. */
int moqae_cuda_kv_encode_host(int codec, int C, int D, int G, const uint16_t * k, const uint16_t * v,
                              const float * cs_t, const float * cs_p0, uint8_t * krec, uint8_t * vrec);

/* A demotion (kv-ring.c demote_fill, kv-cache.h's struct moqae_kv_demotion) as the device does it: the
 * record of one chunk of one layer at arena + src (every KV head, codec old_codec, padded layout) decoded as
 * kv-codec.c decodes it and encoded at new_codec into out + out (a buffer apart from the arena), byte for
 * byte as the CPU ring demotes. has_p0: FP16 keys (after RoPE) become a quantized record before RoPE,
 * turned back with the device's cs_t and the chunk's start rotation p0 [D/2][2]. */
struct moqae_cuda_demotion {
    long long src, out;
    int       old_codec, new_codec, has_p0, pad;
    float     p0[256];
};

/* Every job in one launch (n_jobs x n_head_kv blocks); jobs in device memory. */
int moqae_cuda_kv_demote(const struct moqae_cuda_ring_geom * g, const uint8_t * arena,
                         const struct moqae_cuda_demotion * jobs, int n_jobs, uint8_t * out, const float * cs_t,
                         cudaStream_t stream);

/* The same on the CPU, one head (krec, vrec: the old unpadded records; kout, vout: the new): tests. */
int moqae_cuda_kv_demote_host(int old_codec, int new_codec, int C, int D, int G, const uint8_t * krec,
                              const uint8_t * vrec, const float * cs_t, const float * cs_p0, uint8_t * kout,
                              uint8_t * vout);
