/*
 * cuda/kv-codec.cuh — the KV ring's write side on the device: copy a micro-batch's K (after RoPE)
 * and V into the f16 staging window, and encode every chunk the micro-batch completes into its
 * record, where it was computed, byte for byte as kv-codec.c's moqae_kv_encode_k/_v (the same f32
 * operations in the same order, no fused multiply-add: tested against the CPU encoder). The chunk's
 * codec comes from the chunk table (an input per chunk: fixed policy today, the router's decision
 * later).
 * TODO(issue 7): this encoder (and attention.cu's decoders) implement the record layout of kv-codec.h
 * as it stood until 2026-11-23 07:33 (asymmetric per-channel keys / per-token value groups, no
 * rotation); they were byte-identical to the CPU encoder then (checked on the H100). The CPU codec
 * has since gained the Hadamard rotation, the outlier key token and the scale/zero search: port them.
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
 * arena (records at chunk.off + h * (k_pad + v_pad)); max_enc bounds dyn->n_enc (grid size). */
int moqae_cuda_kv_encode(const struct moqae_cuda_ring_geom * g, const uint16_t * stage_k, const uint16_t * stage_v,
                         uint8_t * arena, const struct moqae_cuda_chunk * table, int max_enc,
                         const struct moqae_cuda_dyn * dyn, cudaStream_t stream);
