/*
 * backend-cuda-stub.c — backend-cuda.h for builds without MOQAE_CUDA: no device, every entry point
 * says so. With MOQAE_CUDA=ON this file compiles to nothing and cuda/backend.cu provides them.
 */
#include "backend-cuda.h"

#ifndef MOQAE_CUDA
#    include "common.h"

bool moqae_cuda_available(void) {
    return false;
}

int moqae_cuda_model_new(const struct moqae_model * m, int n_gpu_layers, struct moqae_cuda_model ** out) {
    (void) m;
    (void) n_gpu_layers;
    *out = NULL;
    return moqae_fail(MOQAE_ERR_UNSUPPORTED, "this build of libmoqae has no CUDA backend (configure with -DMOQAE_CUDA=ON)");
}

int64_t moqae_cuda_model_n_layers(const struct moqae_cuda_model * cm) {
    (void) cm;
    return 0;
}

void moqae_cuda_model_free(struct moqae_cuda_model * cm) {
    (void) cm;
}

int moqae_cuda_context_new(const struct moqae_model * m, const struct moqae_kv_config * cfg,
                           struct moqae_cuda_context ** out) {
    (void) m;
    (void) cfg;
    *out = NULL;
    return moqae_fail(MOQAE_ERR_UNSUPPORTED, "this build of libmoqae has no CUDA backend");
}

void moqae_cuda_context_free(struct moqae_cuda_context * cc) {
    (void) cc;
}

void moqae_cuda_context_clear(struct moqae_cuda_context * cc) {
    (void) cc;
}

int64_t moqae_cuda_n_tokens(const struct moqae_cuda_context * cc) {
    (void) cc;
    return 0;
}

void moqae_cuda_kv_stats(const struct moqae_cuda_context * cc, struct moqae_kv_stats * out) {
    (void) cc;
    memset(out, 0, sizeof(*out));
}

int moqae_cuda_codec_encode(enum moqae_kv_codec c, const struct moqae_kv_shape * s, const float * k, const float * v,
                            const float * cs_t, const float * cs_p0, uint8_t * krec, uint8_t * vrec) {
    (void) c, (void) s, (void) k, (void) v, (void) cs_t, (void) cs_p0, (void) krec, (void) vrec;
    return moqae_fail(MOQAE_ERR_UNSUPPORTED, "this build of libmoqae has no CUDA backend");
}

int moqae_cuda_imma_check(enum moqae_type type, int64_t n_rows, int64_t n_cols, int64_t n_tok, const uint8_t * rows,
                          const float * x, float * y) {
    (void) type, (void) n_rows, (void) n_cols, (void) n_tok, (void) rows, (void) x, (void) y;
    return moqae_fail(MOQAE_ERR_UNSUPPORTED, "this build of libmoqae has no CUDA backend");
}

int moqae_cuda_codec_encode_emulated(enum moqae_kv_codec c, const struct moqae_kv_shape * s, const float * k,
                                     const float * v, const float * cs_t, const float * cs_p0, uint8_t * krec,
                                     uint8_t * vrec) {
    (void) c, (void) s, (void) k, (void) v, (void) cs_t, (void) cs_p0, (void) krec, (void) vrec;
    return moqae_fail(MOQAE_ERR_UNSUPPORTED, "this build of libmoqae has no CUDA backend");
}

int moqae_cuda_codec_demote_emulated(enum moqae_kv_codec old_codec, enum moqae_kv_codec new_codec,
                                     const struct moqae_kv_shape * s, const uint8_t * krec, const uint8_t * vrec,
                                     const float * cs_t, const float * cs_p0, uint8_t * kout, uint8_t * vout) {
    (void) old_codec, (void) new_codec, (void) s, (void) krec, (void) vrec, (void) cs_t, (void) cs_p0, (void) kout,
        (void) vout;
    return moqae_fail(MOQAE_ERR_UNSUPPORTED, "this build of libmoqae has no CUDA backend");
}

int moqae_cuda_attn_check(const struct moqae_cuda_attn_case * tc, float * out) {
    (void) tc, (void) out;
    return moqae_fail(MOQAE_ERR_UNSUPPORTED, "this build of libmoqae has no CUDA backend");
}

int moqae_cuda_chunk_codecs(const struct moqae_cuda_context * cc, uint8_t * codecs, int64_t cap, int64_t * n) {
    (void) cc, (void) codecs, (void) cap;
    *n = 0;
    return moqae_fail(MOQAE_ERR_UNSUPPORTED, "this build of libmoqae has no CUDA backend");
}

int moqae_cuda_forward(struct moqae_cuda_context * cc, const struct moqae_cuda_job * job) {
    (void) cc;
    (void) job;
    return moqae_fail(MOQAE_ERR_UNSUPPORTED, "this build of libmoqae has no CUDA backend");
}
#else
typedef int moqae_backend_cuda_stub_unused; /* ISO C forbids an empty translation unit */
#endif
