/*
 * moqae-perplexity — perplexity of a model on a text file, by llama.cpp's method (consecutive
 * windows of -c tokens, the context cleared before each, only the second half of each window
 * scored; the computation is moqae_perplexity() in the library). Prints the running estimate per
 * window like llama-perplexity and ends with "Final estimate: PPL = X +/- Y".
 */
#include "tool-common.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void usage(void) {
    fprintf(stderr, "usage: moqae-perplexity -m MODEL -f FILE [-c N] [--chunks K] [-b N] [-t N] [--kv POLICY] [-v]\n"
                    "  -c N        window size in tokens (default 512)\n"
                    "  --chunks K  score at most K windows (default: all)\n"
                    "  -b N        micro-batch in tokens (default: the window size)\n"
                    "  -t N        threads (default: all CPUs)\n%s", TOOL_KV_USAGE);
}

struct progress_state {
    double                 t0;
    struct moqae_context * ctx;
    struct moqae_kv_stats  last; /* the KV cache after the last window */
    double                 sum_nominal, sum_effective, sum_frac[4]; /* over the windows so far */
    int64_t                n_windows;
};

static bool progress(int64_t chunk, int64_t n_chunks, double ppl, void * user) {
    struct progress_state * ps = user;
    moqae_context_kv_stats(ps->ctx, &ps->last);
    ps->sum_nominal += ps->last.nominal_bits;
    ps->sum_effective += ps->last.effective_bits;
    const int64_t n_rec = ps->last.n_records[0] + ps->last.n_records[1] + ps->last.n_records[2] + ps->last.n_records[3];
    for (int e = 0; e < 4 && n_rec > 0; e++) {
        ps->sum_frac[e] += (double) ps->last.n_records[e] / (double) n_rec;
    }
    ps->n_windows++;
    if (chunk == 0) {
        const double per = tool_now() - ps->t0;
        fprintf(stderr, "perplexity: %.2f seconds per window, about %.1f minutes for %lld windows\n", per,
                per * (double) n_chunks / 60.0, (long long) n_chunks);
    }
    printf("[%lld]%.4f,", (long long) chunk + 1, ppl);
    fflush(stdout);
    return true;
}

int main(int argc, char ** argv) {
    const char * model_path = NULL, *file = NULL;
    struct moqae_context_params cp = moqae_context_default_params();
    int64_t      n_ctx = 512, n_chunks = 0, n_batch = 0, n_threads = 0;
    bool         verbose = false;
    for (int i = 1; i < argc; i++) {
        const char * a  = argv[i];
        bool         ok = true;
        if (!strcmp(a, "-m") || !strcmp(a, "--model")) {
            ok = tool_arg_str(argc, argv, &i, a, &model_path);
        } else if (!strcmp(a, "-f") || !strcmp(a, "--file")) {
            ok = tool_arg_str(argc, argv, &i, a, &file);
        } else if (!strcmp(a, "-c") || !strcmp(a, "--ctx-size")) {
            ok = tool_arg_i64(argc, argv, &i, a, 4, (int64_t) 1 << 24, &n_ctx);
        } else if (!strcmp(a, "--chunks")) {
            ok = tool_arg_i64(argc, argv, &i, a, 1, INT64_MAX, &n_chunks);
        } else if (!strcmp(a, "-b") || !strcmp(a, "--batch-size")) {
            ok = tool_arg_i64(argc, argv, &i, a, 1, (int64_t) 1 << 24, &n_batch);
        } else if (!strcmp(a, "-t") || !strcmp(a, "--threads")) {
            ok = tool_arg_i64(argc, argv, &i, a, 1, 1024, &n_threads);
        } else if (tool_arg_kv(argc, argv, &i, &cp, &ok)) {
            /* parsed */
        } else if (!strcmp(a, "-v")) {
            verbose = true;
        } else if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            usage();
            return 0;
        } else {
            usage();
            return tool_error("unknown option '%s'", a);
        }
        if (!ok) {
            return 1;
        }
    }
    if (!model_path || !file) {
        usage();
        return tool_error("both -m MODEL and -f FILE are required");
    }
    tool_install_logger(verbose);
    size_t len  = 0;
    char * text = tool_read_file(file, &len);
    if (!text) {
        return 1;
    }
    if (len == 0) {
        free(text);
        return tool_error("text file '%s' is empty", file);
    }
    struct moqae_model *   model  = NULL;
    struct moqae_context * ctx    = NULL;
    int32_t *              tokens = NULL;
    int64_t                n_tok  = 0;
    int                    rc     = 1;
    if (!tool_load_model(model_path, &model) || !tool_tokenize(model, text, len, true, false, &tokens, &n_tok)) {
        goto done;
    }
    fprintf(stderr, "perplexity: tokenized %zu bytes into %lld tokens\n", len, (long long) n_tok);
    if (n_tok < 2 * n_ctx) {
        tool_error("need at least %lld tokens (2 windows of -c %lld) to compute perplexity, the text has %lld",
                   (long long) (2 * n_ctx), (long long) n_ctx, (long long) n_tok);
        goto done;
    }
    cp.n_ctx     = n_ctx;
    cp.n_batch   = n_batch ? n_batch : n_ctx;
    cp.n_threads = (int32_t) n_threads;
    if (!tool_context_new(model, &cp, &ctx)) {
        goto done;
    }
    struct moqae_ppl_params pp = moqae_ppl_default_params();
    pp.n_ctx     = n_ctx;
    pp.n_chunks  = n_chunks;
    pp.progress  = progress;
    struct progress_state ps = { tool_now(), ctx, { 0 }, 0.0, 0.0, { 0.0 }, 0 };
    const double          t0 = ps.t0;
    pp.user_data             = &ps;
    struct moqae_ppl_result res;
    const int64_t n_windows = n_tok / n_ctx;
    fprintf(stderr, "perplexity: %lld windows of %lld tokens, scoring %lld\n", (long long) n_windows,
            (long long) n_ctx, (long long) (n_chunks && n_chunks < n_windows ? n_chunks : n_windows));
    if (moqae_perplexity(ctx, tokens, n_tok, &pp, &res)) {
        printf("\n");
        tool_error("%s", moqae_last_error());
        goto done;
    }
    const double t1 = tool_now();
    printf("\n");
    fprintf(stderr, "perplexity: %lld windows, %lld tokens scored in %.1f s (%.1f tokens/s evaluated)\n",
            (long long) res.n_chunks, (long long) res.n_scored, t1 - t0,
            (double) (res.n_chunks * n_ctx) / (t1 - t0));
    tool_print_kv_stats(&ps.last, &cp); /* as the last window left it */
    if (ps.n_windows > 0) { /* the mean over windows, for tables (every window ends full) */
        const double n = (double) ps.n_windows;
        fprintf(stderr, "kv mean:    over %lld windows: %.3f nominal / %.3f effective bits; chunks fp16 %.1f%% int8 "
                "%.1f%% int4 %.1f%% int2 %.1f%%\n", (long long) ps.n_windows, ps.sum_nominal / n,
                ps.sum_effective / n, 100.0 * ps.sum_frac[0] / n, 100.0 * ps.sum_frac[1] / n,
                100.0 * ps.sum_frac[2] / n, 100.0 * ps.sum_frac[3] / n);
    }
    printf("Final estimate: PPL = %.4f +/- %.5f\n", res.ppl, res.ppl_err);
    rc = 0;
done:
    tool_context_free(ctx);
    moqae_model_free(model);
    free(tokens);
    free(text);
    return rc;
}
