/*
 * tool-common.h — helpers shared by the three command-line tools (moqae-cli, moqae-perplexity,
 * moqae-bench): strict number parsing, reading a text file, loading a model and context with
 * messages that say what went wrong. The tools use only the public API (moqae.h).
 */
#ifndef MOQAE_TOOL_COMMON_H
#define MOQAE_TOOL_COMMON_H

#include "moqae.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Print "error: <fmt>" to stderr. Returns 1 (the tools' exit code for errors). */
int tool_error(const char * fmt, ...) __attribute__((format(printf, 1, 2)));

/* Parse the value of option `opt` (argv[*i + 1]), advancing *i. false (after printing an error) on a
 * missing value, trailing garbage, or a value outside [lo, hi]. */
bool tool_arg_i64(int argc, char ** argv, int * i, const char * opt, int64_t lo, int64_t hi, int64_t * out);
bool tool_arg_f32(int argc, char ** argv, int * i, const char * opt, float lo, float hi, float * out);
bool tool_arg_str(int argc, char ** argv, int * i, const char * opt, const char ** out);

/* If argv[*i] is a KV option (--kv POLICY, --kv-budget BYTES, --kv-overflow error|shift|demote,
 * --kv-chunk 32|64, --kv-keys pre|post, --router R.gguf) or -ngl N (into tool_n_gpu_layers), parse it into
 * cp and return true (*ok = false after printing an error on a bad value); false if it is not a KV option. */
bool tool_arg_kv(int argc, char ** argv, int * i, struct moqae_context_params * cp, bool * ok);

/* Create the context, loading the --router file first if one was given (sets cp->router). false
 * after printing an error. Free with tool_context_free (which frees the router too). */
bool tool_context_new(struct moqae_model * model, struct moqae_context_params * cp, struct moqae_context ** ctx);
void tool_context_free(struct moqae_context * ctx);

/* Usage lines of the KV options. */
extern const char * const TOOL_KV_USAGE;

/* One line describing the KV cache ("kv cache: ..."), to stderr. */
void tool_print_kv_stats(const struct moqae_kv_stats * ks, const struct moqae_context_params * cp);

/* Read a whole file. NULL (after printing an error naming the path) if it cannot be read. */
char * tool_read_file(const char * path, size_t * len);

/* Tokenize text (allocates *tokens). false after printing an error. */
bool tool_tokenize(const struct moqae_model * m, const char * text, size_t len, bool add_special, bool parse_special,
                   int32_t ** tokens, int64_t * n);

/* Layers to offload to CUDA (-ngl), read by tool_load_model; 0 = CPU only. */
extern int32_t tool_n_gpu_layers;

/* Load a model (offloading tool_n_gpu_layers); false after printing "error: <message>". */
bool tool_load_model(const char * path, struct moqae_model ** out);

/* Seconds from a monotonic clock. */
double tool_now(void);

/* Forward library logs of level >= WARN to stderr (or all with verbose). */
void tool_install_logger(bool verbose);

#endif /* MOQAE_TOOL_COMMON_H */
