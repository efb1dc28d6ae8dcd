/*
 * moqae-cli — generate text from a prompt: tokenizes the prompt, runs it through the model in
 * micro-batches, then samples one token at a time, streaming each piece to stdout. Prints prompt and
 * generation speed and the KV cache's size to stderr at the end. Ctrl-C stops generation cleanly.
 */
#include "tool-common.h"

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static struct moqae_context * volatile g_ctx  = NULL;
static volatile sig_atomic_t           g_stop = 0;

static void on_sigint(int sig) {
    (void) sig;
    g_stop = 1;
    if (g_ctx) {
        moqae_context_interrupt(g_ctx);
    }
}

static void usage(void) {
    fprintf(stderr,
            "usage: moqae-cli -m MODEL [-p TEXT | -f FILE] [-n N] [-c N] [-b N] [-t N] [-s SEED] [--temp T]\n"
            "                 [--top-k K] [--top-p P] [--min-p P] [--repeat-penalty R] [--repeat-last-n N]\n"
            "                 [--kv POLICY] [--kv-budget BYTES | --kv-bits B] [--kv-overflow P] [--no-special] [-v]\n"
            "  -m MODEL          GGUF model file\n"
            "  -p TEXT           prompt text            -f FILE  read the prompt from FILE\n"
            "  -n N              tokens to generate (default 128; -1 = until end of text or context full)\n"
            "  -c N              context size in tokens (default: 4096, or the model's if smaller; 0 = model's)\n"
            "  -b N              prompt micro-batch in tokens (default 512)\n"
            "  -t N              threads (default: all CPUs)\n"
            "  -s SEED           RNG seed (default 0)\n"
            "  --temp T          temperature (default 0.8; 0 = greedy)\n"
            "  --top-k K --top-p P --min-p P --repeat-penalty R --repeat-last-n N   sampling (defaults 40 0.95 0.05 1.0 64)\n"
            "%s"
            "  --no-special      treat <|...|> in the prompt as plain text\n"
            "  -v                verbose library logs\n", TOOL_KV_USAGE);
}

struct cli_opts {
    const char *                model, *prompt, *file;
    int64_t                     n_predict, n_ctx, n_batch, n_threads;
    bool                        parse_special, verbose;
    struct moqae_sampler_params sp;
    struct moqae_context_params cp;
};

static bool parse_args(int argc, char ** argv, struct cli_opts * o) {
    int64_t v;
    for (int i = 1; i < argc; i++) {
        const char * a = argv[i];
        bool         ok = true;
        if (!strcmp(a, "-m") || !strcmp(a, "--model")) {
            ok = tool_arg_str(argc, argv, &i, a, &o->model);
        } else if (!strcmp(a, "-p") || !strcmp(a, "--prompt")) {
            ok = tool_arg_str(argc, argv, &i, a, &o->prompt);
        } else if (!strcmp(a, "-f") || !strcmp(a, "--file")) {
            ok = tool_arg_str(argc, argv, &i, a, &o->file);
        } else if (!strcmp(a, "-n") || !strcmp(a, "--n-predict")) {
            ok = tool_arg_i64(argc, argv, &i, a, -1, INT32_MAX, &o->n_predict);
        } else if (!strcmp(a, "-c") || !strcmp(a, "--ctx-size")) {
            ok = tool_arg_i64(argc, argv, &i, a, 0, (int64_t) 1 << 24, &o->n_ctx);
        } else if (!strcmp(a, "-b") || !strcmp(a, "--batch-size")) {
            ok = tool_arg_i64(argc, argv, &i, a, 1, (int64_t) 1 << 20, &o->n_batch);
        } else if (!strcmp(a, "-t") || !strcmp(a, "--threads")) {
            ok = tool_arg_i64(argc, argv, &i, a, 1, 1024, &o->n_threads);
        } else if (!strcmp(a, "-s") || !strcmp(a, "--seed")) {
            ok        = tool_arg_i64(argc, argv, &i, a, 0, INT64_MAX, &v);
            o->sp.seed = (uint64_t) v;
        } else if (!strcmp(a, "--temp")) {
            ok = tool_arg_f32(argc, argv, &i, a, 0.0f, 100.0f, &o->sp.temp);
        } else if (!strcmp(a, "--top-k")) {
            ok          = tool_arg_i64(argc, argv, &i, a, 0, INT32_MAX, &v);
            o->sp.top_k = (int32_t) v;
        } else if (!strcmp(a, "--top-p")) {
            ok = tool_arg_f32(argc, argv, &i, a, 0.0f, 1.0f, &o->sp.top_p);
        } else if (!strcmp(a, "--min-p")) {
            ok = tool_arg_f32(argc, argv, &i, a, 0.0f, 1.0f, &o->sp.min_p);
        } else if (!strcmp(a, "--repeat-penalty")) {
            ok = tool_arg_f32(argc, argv, &i, a, 0.01f, 100.0f, &o->sp.repeat_penalty);
        } else if (!strcmp(a, "--repeat-last-n")) {
            ok                  = tool_arg_i64(argc, argv, &i, a, 0, 1 << 20, &v);
            o->sp.repeat_last_n = (int32_t) v;
        } else if (tool_arg_kv(argc, argv, &i, &o->cp, &ok)) {
            /* parsed */
        } else if (!strcmp(a, "--no-special")) {
            o->parse_special = false;
        } else if (!strcmp(a, "-v") || !strcmp(a, "--verbose")) {
            o->verbose = true;
        } else if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            usage();
            exit(0);
        } else {
            usage();
            tool_error("unknown option '%s'", a);
            return false;
        }
        if (!ok) {
            return false;
        }
    }
    if (!o->model) {
        usage();
        tool_error("no model given: use -m MODEL.gguf");
        return false;
    }
    if (o->prompt && o->file) {
        tool_error("give either -p or -f, not both");
        return false;
    }
    return true;
}

/* Generate up to n_predict tokens after the prompt; returns the number generated. */
static int64_t generate(struct moqae_model * model, struct moqae_context * ctx, struct moqae_sampler * smpl,
                        int64_t n_vocab, int64_t n_predict, int * status) {
    int64_t n_gen = 0;
    char    piece[256];
    while ((n_predict < 0 || n_gen < n_predict) && !g_stop) { /* g_stop: also a Ctrl-C a decode missed */
        const float * logits = NULL;
        int32_t       tok    = 0;
        if ((*status = moqae_context_logits(ctx, 0, &logits)) || (*status = moqae_sampler_sample(smpl, logits, n_vocab, &tok))) {
            return n_gen;
        }
        moqae_sampler_accept(smpl, tok);
        if (moqae_token_is_eog(model, tok)) {
            break;
        }
        size_t n = 0;
        if (moqae_token_to_piece(model, tok, false, piece, sizeof(piece), &n) == MOQAE_OK) {
            fwrite(piece, 1, n, stdout);
            fflush(stdout);
        }
        n_gen++;
        if (n_predict >= 0 && n_gen == n_predict) {
            break; /* the last token needs no decode */
        }
        int st = moqae_decode(ctx, &tok, 1, 1);
        if (st == MOQAE_ERR_INTERRUPTED) {
            break;
        }
        if (st == MOQAE_ERR_CONTEXT_FULL) {
            fprintf(stderr, "\n[context full after %lld tokens: stopping (%s)]\n",
                    (long long) moqae_context_n_past(ctx), moqae_last_error());
            break;
        }
        if (st) {
            *status = st;
            return n_gen;
        }
    }
    return n_gen;
}

int main(int argc, char ** argv) {
    struct cli_opts o = { 0 };
    o.n_predict       = 128;
    o.n_ctx           = -1;
    o.parse_special   = true;
    o.sp              = moqae_sampler_default_params();
    o.cp              = moqae_context_default_params();
    if (!parse_args(argc, argv, &o)) {
        return 1;
    }
    tool_install_logger(o.verbose);

    char * text = NULL;
    size_t len  = 0;
    if (o.file) {
        if (!(text = tool_read_file(o.file, &len))) {
            return 1;
        }
        if (len == 0) {
            free(text);
            return tool_error("prompt file '%s' is empty", o.file);
        }
    } else {
        text = strdup(o.prompt ? o.prompt : "");
        if (!text) {
            return tool_error("out of memory copying the prompt");
        }
        len = strlen(text);
    }
    struct moqae_model * model = NULL;
    if (!tool_load_model(o.model, &model)) {
        free(text);
        return 1;
    }
    struct moqae_model_info info;
    moqae_model_get_info(model, &info);

    int32_t * prompt   = NULL;
    int64_t   n_prompt = 0;
    int       rc       = 1;
    struct moqae_context * ctx  = NULL;
    struct moqae_sampler * smpl = NULL;
    if (!tool_tokenize(model, text, len, true, o.parse_special, &prompt, &n_prompt)) {
        goto done;
    }
    if (n_prompt == 0) {
        tool_error("the prompt is empty: give one with -p TEXT or -f FILE");
        goto done;
    }
    struct moqae_context_params cp = o.cp;
    cp.n_ctx     = o.n_ctx >= 0 ? o.n_ctx : (info.n_ctx_train < 4096 ? info.n_ctx_train : 4096);
    cp.n_batch   = o.n_batch;
    cp.n_threads = (int32_t) o.n_threads;
    if (!tool_context_new(model, &cp, &ctx)) {
        goto done;
    }
    if (moqae_sampler_new(&o.sp, &smpl)) {
        tool_error("%s", moqae_last_error());
        goto done;
    }
    const int64_t n_ctx = moqae_context_n_ctx(ctx);
    if (n_prompt >= n_ctx && cp.kv_overflow != MOQAE_KV_OVERFLOW_POLICY_SHIFT) {
        tool_error("the prompt has %lld tokens but the context holds %lld: use a larger -c or a shorter prompt",
                   (long long) n_prompt, (long long) n_ctx);
        goto done;
    }
    g_ctx = ctx;
    signal(SIGINT, on_sigint);

    fwrite(text, 1, len, stdout);
    fflush(stdout);
    /* The prompt goes in pieces of n_batch with a check of g_stop between them: moqae_decode clears
     * the interrupt request when it starts, so a Ctrl-C landing just before a call would be lost. */
    const double  t0    = tool_now();
    const int64_t piece = cp.n_batch > 0 ? cp.n_batch : 512;
    int           st    = MOQAE_OK;
    for (int64_t i = 0; i < n_prompt && st == MOQAE_OK; i += piece) {
        if (g_stop) {
            st = MOQAE_ERR_INTERRUPTED;
            break;
        }
        const int64_t n = n_prompt - i < piece ? n_prompt - i : piece;
        st              = moqae_decode(ctx, prompt + i, n, i + n == n_prompt ? 1 : 0);
    }
    const double t1 = tool_now();
    for (int64_t i = 0; i < n_prompt; i++) {
        moqae_sampler_accept(smpl, prompt[i]);
    }
    int64_t n_gen = 0;
    if (st == MOQAE_OK) {
        n_gen = generate(model, ctx, smpl, info.n_vocab, o.n_predict, &st);
    }
    const double t2 = tool_now();
    fputc('\n', stdout);
    g_ctx = NULL;
    if (st && st != MOQAE_ERR_INTERRUPTED) {
        tool_error("%s", moqae_last_error());
        goto done;
    }
    fprintf(stderr, "\nprompt:     %6lld tokens in %8.3f s = %8.2f tokens/s\n", (long long) n_prompt, t1 - t0,
            (double) n_prompt / (t1 - t0));
    fprintf(stderr, "generation: %6lld tokens in %8.3f s = %8.2f tokens/s\n", (long long) n_gen, t2 - t1,
            n_gen > 0 ? (double) n_gen / (t2 - t1) : 0.0);
    struct moqae_kv_stats ks;
    moqae_context_kv_stats(ctx, &ks);
    tool_print_kv_stats(&ks, &cp);
    if (g_stop) {
        fprintf(stderr, "interrupted\n");
    }
    rc = 0;
done:
    moqae_sampler_free(smpl);
    tool_context_free(ctx);
    moqae_model_free(model);
    free(prompt);
    free(text);
    return rc;
}
