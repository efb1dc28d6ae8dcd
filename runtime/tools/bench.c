/*
 * moqae-bench — prompt processing (ppN) and generation (tgN) speed, like llama-bench: random token
 * ids, optional context depth filled first (-d), median of -r repetitions, printed as a markdown
 * table. Generation decodes one token at a time without sampling (as llama-bench does).
 * --depth N fills the context once through the prefill path (timed: the "fill" row) and then runs
 * the generation repetitions from there, each adding its tokens: for 32k-128k depths, where
 * refilling before every repetition (-d) would cost minutes.
 */
#include "tool-common.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void usage(void) {
    fprintf(stderr, "usage: moqae-bench -m MODEL [-p N] [-n N] [-d DEPTH] [-t N] [-r REPS] [-b N] [--kv POLICY]\n"
                    "  -p N      prompt tokens (default 512; 0 = skip)\n"
                    "  -n N      generated tokens (default 128; 0 = skip)\n"
                    "  -d DEPTH  tokens already in the context before each test (default 0)\n"
                    "  -r REPS   repetitions, the median is reported (default 5)\n"
                    "  --depth N fill N tokens once (timed), then the tgN repetitions continue from there (no ppN)\n"
                    "  -c N      context size (default: what the tests need)\n"
                    "  -v        library logs (GPU memory of the model and the context)\n%s", TOOL_KV_USAGE);
}

static int cmp_double(const void * a, const void * b) {
    const double x = *(const double *) a, y = *(const double *) b;
    return x < y ? -1 : x > y;
}

/* Fill the context to `depth` tokens (not timed). */
static int fill(struct moqae_context * ctx, const int32_t * toks, int64_t depth) {
    moqae_context_reset(ctx);
    return depth > 0 ? moqae_decode(ctx, toks, depth, 0) : MOQAE_OK;
}

int main(int argc, char ** argv) {
    const char * model_path = NULL;
    struct moqae_context_params cp = moqae_context_default_params();
    int64_t      n_prompt = 512, n_gen = 128, depth = 0, n_threads = 0, reps = 5, n_batch = 512, n_ctx = 0;
    bool         once = false, verbose = false;
    for (int i = 1; i < argc; i++) {
        const char * a  = argv[i];
        bool         ok = true;
        if (!strcmp(a, "-m")) {
            ok = tool_arg_str(argc, argv, &i, a, &model_path);
        } else if (!strcmp(a, "-p")) {
            ok = tool_arg_i64(argc, argv, &i, a, 0, 1 << 20, &n_prompt);
        } else if (!strcmp(a, "-n")) {
            ok = tool_arg_i64(argc, argv, &i, a, 0, 1 << 20, &n_gen);
        } else if (!strcmp(a, "-d")) {
            ok = tool_arg_i64(argc, argv, &i, a, 0, 1 << 24, &depth);
        } else if (!strcmp(a, "--depth")) {
            ok   = tool_arg_i64(argc, argv, &i, a, 0, 1 << 24, &depth);
            once = true;
        } else if (!strcmp(a, "-c")) {
            ok = tool_arg_i64(argc, argv, &i, a, 1, 1 << 24, &n_ctx);
        } else if (!strcmp(a, "-v")) {
            verbose = true;
        } else if (!strcmp(a, "-t")) {
            ok = tool_arg_i64(argc, argv, &i, a, 1, 1024, &n_threads);
        } else if (!strcmp(a, "-r")) {
            ok = tool_arg_i64(argc, argv, &i, a, 1, 1000, &reps);
        } else if (!strcmp(a, "-b")) {
            ok = tool_arg_i64(argc, argv, &i, a, 1, 1 << 20, &n_batch);
        } else if (tool_arg_kv(argc, argv, &i, &cp, &ok)) {
            /* parsed */
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
    if (!model_path) {
        usage();
        return tool_error("no model given: use -m MODEL.gguf");
    }
    tool_install_logger(verbose);
    struct moqae_model * model = NULL;
    if (!tool_load_model(model_path, &model)) {
        return 1;
    }
    struct moqae_model_info info;
    moqae_model_get_info(model, &info);
    if (once) {
        n_prompt = 0;
    }
    const int64_t n_tot = once ? depth + n_gen * (reps + 1) : depth + (n_prompt > n_gen ? n_prompt : n_gen);
    if (n_ctx && n_ctx < n_tot) {
        return tool_error("-c %lld is below the %lld tokens the tests need", (long long) n_ctx, (long long) n_tot);
    }
    cp.n_ctx     = n_ctx ? n_ctx : n_tot;
    cp.n_batch   = n_batch;
    cp.n_threads = (int32_t) n_threads;
    struct moqae_context * ctx = NULL;
    int32_t *              toks = malloc((size_t) n_tot * sizeof(int32_t));
    double *               ts   = malloc((size_t) reps * sizeof(double));
    int                    rc   = 1;
    if (!toks || !ts) {
        tool_error("out of memory");
        goto done;
    }
    if (!tool_context_new(model, &cp, &ctx)) {
        goto done;
    }
    uint64_t x = 42;
    for (int64_t i = 0; i < n_tot; i++) { /* fixed pseudo-random ids, as llama-bench */
        x       = x * 6364136223846793005ull + 1442695040888963407ull;
        toks[i] = (int32_t) ((x >> 33) % (uint64_t) info.n_vocab);
    }
    const char * backend = tool_n_gpu_layers > 0 && moqae_has_cuda() ? "cuda" : moqae_cpu_backend();
    printf("| model | size | params | backend | threads | kv | test | t/s |\n");
    printf("| --- | ---: | ---: | --- | ---: | --- | --- | ---: |\n");
    if (once && depth > 0) { /* the one fill, timed */
        moqae_context_reset(ctx);
        const double t0 = tool_now();
        if (moqae_decode(ctx, toks, depth, 0)) {
            tool_error("%s", moqae_last_error());
            goto done;
        }
        const double dt = tool_now() - t0;
        printf("| %s | %.2f MiB | %.2f M | %s | %lld | %s | fill%lld | %.2f (%.2f s) |\n", info.name,
               (double) info.weight_bytes / 1048576.0, (double) info.n_params / 1e6, backend,
               (long long) (n_threads ? n_threads : 0), cp.router ? "router" : cp.kv ? cp.kv : "fp16", (long long) depth,
               (double) depth / dt, dt);
        fflush(stdout);
    }
    for (int test = 0; test < 2; test++) {
        const int64_t n = test == 0 ? n_prompt : n_gen;
        if (n == 0) {
            continue;
        }
        if (!once && fill(ctx, toks, depth)) { /* warm-up run, also checks the sizes */
            tool_error("%s", moqae_last_error());
            goto done;
        }
        for (int64_t r = -1; r < reps; r++) { /* r = -1 is a warm-up */
            if (!once && fill(ctx, toks, depth)) {
                tool_error("%s", moqae_last_error());
                goto done;
            }
            const int64_t at = once ? moqae_context_n_past(ctx) : depth; /* --depth: continue */
            const double t0 = tool_now();
            int          st = MOQAE_OK;
            if (test == 0) {
                st = moqae_decode(ctx, toks + at, n, 1);
            } else {
                for (int64_t i = 0; i < n && !st; i++) {
                    st = moqae_decode(ctx, toks + at + i, 1, 1);
                }
            }
            if (st) {
                tool_error("%s", moqae_last_error());
                goto done;
            }
            if (r >= 0) {
                ts[r] = (double) n / (tool_now() - t0);
            }
        }
        qsort(ts, (size_t) reps, sizeof(double), cmp_double);
        char name[64];
        if (depth > 0) {
            snprintf(name, sizeof(name), "%s%lld @ d%lld", test == 0 ? "pp" : "tg", (long long) n, (long long) depth);
        } else {
            snprintf(name, sizeof(name), "%s%lld", test == 0 ? "pp" : "tg", (long long) n);
        }
        const double med = reps % 2 ? ts[reps / 2] : 0.5 * (ts[reps / 2 - 1] + ts[reps / 2]);
        printf("| %s | %.2f MiB | %.2f M | %s | %lld | %s | %s | %.2f (min %.2f, max %.2f) |\n", info.name,
               (double) info.weight_bytes / 1048576.0, (double) info.n_params / 1e6, backend,
               (long long) (n_threads ? n_threads : 0), cp.router ? "router" : cp.kv ? cp.kv : "fp16", name, med, ts[0], ts[reps - 1]);
        fflush(stdout);
    }
    struct moqae_kv_stats ks;
    if (moqae_context_kv_stats(ctx, &ks) == MOQAE_OK) {
        tool_print_kv_stats(&ks, &cp);
    }
    rc = 0;
done:
    tool_context_free(ctx);
    moqae_model_free(model);
    free(toks);
    free(ts);
    return rc;
}
