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

/* stage_k/v: this layer's window [n_head_kv][stage_rows][D] f16; k, v: [n_tok][n_head_kv][D] f32. */
int moqae_cuda_kv_store(const struct moqae_cuda_ring_geom * g, uint16_t * stage_k, uint16_t * stage_v,
                        const float * k, const float * v, int64_t n_tok, const struct moqae_cuda_dyn * dyn,
                        cudaStream_t stream);

/* Encode chunks table[dyn->enc_first .. + dyn->n_enc) of one layer from its staging window into its
 * arena (records at chunk.off + h * (k_pad + v_pad)); max_enc bounds dyn->n_enc (grid size).
 * Keys before RoPE: cs_t [D/2][2][C] (the ring's offsets table) and cs_p0 [n_chunks][D/2][2] (each
 * table entry's start), both as kv-ring.c computes them (moqae_kv_rope_fill); cs_t NULL: keys are
 * stored as staged (after RoPE). FP16 records always hold the staged keys. */
int moqae_cuda_kv_encode(const struct moqae_cuda_ring_geom * g, const uint16_t * stage_k, const uint16_t * stage_v,
                         uint8_t * arena, const struct moqae_cuda_chunk * table, const float * cs_t,
                         const float * cs_p0, int max_enc, const struct moqae_cuda_dyn * dyn, cudaStream_t stream);

/* The encoder's phases run on the CPU, one chunk of one head (k, v: [C][D] f16 bits; cs_t, cs_p0 as
 * above for the chunk, or NULL): for testing the device code where there is no device. */
int moqae_cuda_kv_encode_host(int codec, int C, int D, int G, const uint16_t * k, const uint16_t * v,
                              const float * cs_t, const float * cs_p0, uint8_t * krec, uint8_t * vrec);

/* A demotion (kv-ring.c demote_fill, kv-cache.h's struct moqae_kv_demotion): the record of one chunk of
 * one layer at src (every KV head, codec old_codec, padded layout) decoded as kv-codec.c decodes it and
 * encoded one or more codecs lower into out (a buffer that does not overlap src), byte for byte as the
 * CPU ring demotes. cs_p0: host [D/2][2] when FP16 keys (after RoPE) become a quantized record before
 * RoPE (with the device's cs_t), else NULL. One block per KV head. */
int moqae_cuda_kv_demote(const struct moqae_cuda_ring_geom * g, const uint8_t * src, int old_codec, uint8_t * out,
                         int new_codec, const float * cs_t, const float * cs_p0, cudaStream_t stream);

/* The same on the CPU, one head (krec, vrec: the old unpadded records; kout, vout: the new): tests. */
int moqae_cuda_kv_demote_host(int old_codec, int new_codec, int C, int D, int G, const uint8_t * krec,
                              const uint8_t * vrec, const float * cs_t, const float * cs_p0, uint8_t * kout,
                              uint8_t * vout);
