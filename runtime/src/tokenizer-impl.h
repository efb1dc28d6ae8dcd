/*
 * tokenizer-impl.h — the tokenizer's internal state, shared by tokenizer.c (loading, special
 * tokens, the public calls), tokenizer-bpe.c (GPT-2 byte-level BPE and its pre-tokenizers) and
 * tokenizer-spm.c (SentencePiece-style BPE). Everything here is immutable after
 * moqae_tokenizer_new(): encode/decode keep their scratch on the caller's side, so one tokenizer
 * serves any number of threads at once. Not part of the public API.
 */
#ifndef MOQAE_TOKENIZER_IMPL_H
#define MOQAE_TOKENIZER_IMPL_H

#include "tokenizer.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* tokenizer.ggml.token_type values, as llama.cpp's enum llama_token_type. */
enum moqae_token_type {
    MOQAE_TOKEN_UNDEFINED    = 0,
    MOQAE_TOKEN_NORMAL       = 1,
    MOQAE_TOKEN_UNKNOWN      = 2,
    MOQAE_TOKEN_CONTROL      = 3,
    MOQAE_TOKEN_USER_DEFINED = 4,
    MOQAE_TOKEN_UNUSED       = 5,
    MOQAE_TOKEN_BYTE         = 6,
};

enum moqae_vocab_kind {
    MOQAE_VOCAB_BPE, /* tokenizer.ggml.model = "gpt2"  */
    MOQAE_VOCAB_SPM, /* tokenizer.ggml.model = "llama" */
};

/* tokenizer.ggml.pre: which regex splits the text before BPE (tokenizer-bpe.c spells them out). */
enum moqae_pre_kind {
    MOQAE_PRE_GPT2,      /* "gpt2" and anything unknown            */
    MOQAE_PRE_SMOLLM,    /* every \p{N} alone, then the gpt2 regex */
    MOQAE_PRE_QWEN2,     /* "qwen2": \p{N} one at a time           */
    MOQAE_PRE_LLAMA_BPE, /* "llama-bpe": \p{N}{1,3}, ignore_merges */
};

/* One merge rule (BPE): left and right token ids -> rank (position in tokenizer.ggml.merges) and
 * the merged token id. Open-addressing table keyed by (left << 32 | right); key UINT64_MAX = empty. */
struct moqae_tok_merge {
    uint64_t key;
    int32_t  rank;
    int32_t  id;
};

struct moqae_tokenizer {
    enum moqae_vocab_kind kind;
    enum moqae_pre_kind   pre;
    int64_t               n_vocab;

    /* Per token, [n_vocab]: type, SPM score, and two byte strings inside blob: the raw text from
     * the GGUF and the rendered piece (what the token decodes to: byte-level decoded for BPE,
     * "▁" -> " " for SPM, the byte for <0xXX>, "" for control tokens). */
    uint8_t *  type;
    float *    score;
    uint32_t * text_off;
    uint32_t * text_len;
    uint32_t * piece_off;
    uint32_t * piece_len;
    char *     blob;

    /* key bytes -> id for the tokens BPE/SPM may produce (NORMAL, and USER_DEFINED/UNUSED for SPM).
     * The key is the piece for BPE (raw bytes) and the text for SPM ("▁" kept). Open addressing,
     * -1 = empty, [tok_hash_mask + 1]. */
    int32_t * tok_hash;
    uint64_t  tok_hash_mask;

    /* BPE merges, [merge_mask + 1]. */
    struct moqae_tok_merge * merges;
    uint64_t                 merge_mask;
    int64_t                  n_merges;

    /* SPM: the codepoints that some mergeable token has right before a "▁" (ascending, [n_spm_glue];
     * -1 stands for an invalid byte). Text is cut into independent segments before every other "▁". */
    int32_t * spm_glue;
    int64_t   n_spm_glue;

    /* Token for each single byte: BPE the token whose piece is that byte, SPM <0xXX>; -1 if none. */
    int32_t byte_token[256];

    /* Tokens matched literally in the text (CONTROL and UNKNOWN only with parse_special; USER_DEFINED
     * always), [n_special], bucketed by first byte b in special[special_start[b] .. special_start[b+1]),
     * longest first within a bucket. */
    int32_t * special;
    int64_t   n_special;
    int64_t   special_start[257];

    int32_t bos, eos, unk, eot, eom; /* -1 if none */
    bool    add_bos, add_eos, add_space_prefix;
    bool    ignore_merges; /* llama-bpe: a pre-token that is a whole token skips BPE (HF ignore_merges) */

    int32_t eog[16]; /* end-of-generation ids, deduplicated */
    int     n_eog;
};

/* Ids written into a caller's buffer: always counts, writes only while n < cap. */
struct moqae_tok_out {
    int32_t * ids;
    int64_t   cap;
    int64_t   n;
};

static inline void moqae_tok_push(struct moqae_tok_out * o, int32_t id) {
    if (o->n < o->cap) {
        o->ids[o->n] = id;
    }
    o->n++;
}

/* Growable per-call scratch (owned by one encode call, freed by moqae_tok_scratch_free). */
struct moqae_tok_scratch {
    void * buf[6];
    size_t cap[6];
};

/* Make slot i hold at least bytes; returns NULL on allocation failure. */
void * moqae_tok_scratch_get(struct moqae_tok_scratch * s, int i, size_t bytes);
void   moqae_tok_scratch_free(struct moqae_tok_scratch * s);

/* Token id whose key (see tok_hash) is s[0..n), or -1. */
int32_t moqae_tok_lookup(const struct moqae_tokenizer * tok, const char * s, size_t n);

/* GPT-2 byte-level decoding of s[0..n) into out (at most n bytes); -1 if a character is not in the
 * byte alphabet (callers then keep the text as it is). */
int64_t moqae_tok_gpt2_decode(const char * s, size_t n, char * out);

/* Smallest power of two >= 2 * n (a hash table at most half full), at least 16. */
uint64_t moqae_tok_table_size(int64_t n);

/* Rank and merged id of the pair (left, right); false if there is no such merge. */
bool moqae_tok_merge_find(const struct moqae_tokenizer * tok, int32_t left, int32_t right, int32_t * rank,
                          int32_t * id);

/* Tokenize one fragment of plain text (no special tokens inside). Return MOQAE_OK or
 * MOQAE_ERR_OUT_OF_MEMORY. prev_special (SPM only): the fragment starts the text or follows a
 * special token, so add_space_prefix applies (llama.cpp's rule). */
int moqae_tok_bpe_encode(const struct moqae_tokenizer * tok, const char * text, size_t len,
                         struct moqae_tok_scratch * scratch, struct moqae_tok_out * out);
int moqae_tok_spm_encode(const struct moqae_tokenizer * tok, const char * text, size_t len, bool prev_special,
                         struct moqae_tok_scratch * scratch, struct moqae_tok_out * out);

/* Load-time helper of tokenizer.c: parse tokenizer.ggml.merges into tok->merges (BPE). */
int moqae_tok_bpe_load_merges(struct moqae_tokenizer * tok, const struct moqae_gguf * g);

#endif /* MOQAE_TOKENIZER_IMPL_H */
