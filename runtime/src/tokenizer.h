/*
 * tokenizer.h — tokenizers built from a GGUF vocabulary:
 *   - tokenizer.ggml.model = "gpt2": GPT-2 byte-level BPE, with the pre-tokenizer regexes named by
 *     tokenizer.ggml.pre ("smollm", "qwen2", "llama-bpe", "gpt2"; others silently get gpt2's)
 *   - tokenizer.ggml.model = "llama": SentencePiece-style (scores, byte fallback <0xXX>, "▁" spaces).
 * Control tokens (token_type 3, and <unk>) are matched in the text when parse_special is set;
 * user-defined tokens (type 4) always are, as in llama.cpp and HF (added tokens that are not special).
 * Implementation: tokenizer.c (loading, special tokens, pieces), tokenizer-bpe.c, tokenizer-spm.c.
 * References: HF `tokenizers` and `sentencepiece` (tests/test_tokenizer.py).
 */
#ifndef MOQAE_TOKENIZER_H
#define MOQAE_TOKENIZER_H

#include "gguf.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct moqae_tokenizer;

/* Build from g's tokenizer.* keys (copies what it needs: g may be closed afterwards).
 * MOQAE_ERR_FORMAT / MOQAE_ERR_NOT_FOUND / MOQAE_ERR_UNSUPPORTED with a message on bad input. */
int moqae_tokenizer_new(const struct moqae_gguf * g, struct moqae_tokenizer ** out);
void moqae_tokenizer_free(struct moqae_tokenizer * tok);

int64_t moqae_tokenizer_n_vocab(const struct moqae_tokenizer * tok);
int32_t moqae_tokenizer_bos(const struct moqae_tokenizer * tok); /* -1 if none */
int32_t moqae_tokenizer_eos(const struct moqae_tokenizer * tok); /* -1 if none */
bool    moqae_tokenizer_add_bos(const struct moqae_tokenizer * tok);
bool    moqae_tokenizer_add_eos(const struct moqae_tokenizer * tok);
bool    moqae_tokenizer_is_eog(const struct moqae_tokenizer * tok, int32_t id);

/* Same contracts as moqae_tokenize / moqae_token_to_piece / moqae_detokenize in moqae.h. */
int moqae_tokenizer_encode(const struct moqae_tokenizer * tok, const char * text, size_t len, bool add_special,
                           bool parse_special, int32_t * tokens, int64_t capacity, int64_t * n_tokens);
int moqae_tokenizer_piece(const struct moqae_tokenizer * tok, int32_t id, bool special, char * buf, size_t capacity,
                          size_t * n_written);
int moqae_tokenizer_decode(const struct moqae_tokenizer * tok, const int32_t * ids, int64_t n, bool special,
                           char * buf, size_t capacity, size_t * n_written);

#endif /* MOQAE_TOKENIZER_H */
