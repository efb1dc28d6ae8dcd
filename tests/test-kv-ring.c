/*
 * test-kv-ring.c — the KV ring without data (kv-cache.h's arena_ops, what the CUDA backend builds on)
 * against the ring with data (CTest). Two rings take the same micro-batches under the same budget
 * and overflow policy: ring A holds its records; ring B keeps only the bookkeeping and sends every
 * operation on its arena's bytes (record moves, demotions) to ops over an outside arena, into which
 * the test copies each new chunk's records from A (as the GPU encodes them where it computed them).
 * After every micro-batch the two chunk tables must be equal and the outside arena must hold A's
 * bytes over the whole prefix in use: the operations B sent reproduce, in order, what A did to its
 * own arena. Cases: shift, demote by recency, demote by learned weights, per-group routing votes,
 * records packed and padded to 16 bytes, micro-batches of 1 to 64 tokens; an operation that fails
 * must fail prepare with its status. Also: a model split into two rings (partial offload) decides
 * every record as one ring does; the GPU's demotion (its phases run on the CPU) against kv-codec.c.
 * main returns 1 on any failure.
 */
#include "backend-cuda.h"
#include "common.h"
#include "kv-cache.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int g_failures = 0;

#define CHECK(cond, ...)                                                                                   \
    do {                                                                                                   \
        if (!(cond)) {                                                                                     \
            fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__);                                           \
            fprintf(stderr, __VA_ARGS__);                                                                  \
            fprintf(stderr, "\n");                                                                         \
            g_failures++;                                                                                  \
            return;                                                                                        \
        }                                                                                                  \
    } while (0)

static uint64_t g_rng = 0x9e3779b97f4a7c15ull;

static uint32_t rnd(void) {
    g_rng ^= g_rng << 13;
    g_rng ^= g_rng >> 7;
    g_rng ^= g_rng << 17;
    return (uint32_t) (g_rng >> 16);
}

static float rnd_f(void) {
    return (float) (rnd() % 20001) / 10000.0f - 1.0f;
}

/* the outside arena and what was asked of it */
struct outside {
    uint8_t *             bytes;
    size_t                cap;
    int64_t               n_demote, n_move, fail_after; /* fail_after >= 0: that many calls succeed */
    struct moqae_kv_shape shape;
    int64_t               n_head_kv, align;
    const float *         cs_t; /* [D/2][2][C] */
};

static int out_step(struct outside * o) {
    if (o->fail_after == 0) {
        return moqae_fail(MOQAE_ERR_INTERNAL, "test: the outside arena failed");
    }
    o->fail_after -= o->fail_after > 0;
    return MOQAE_OK;
}

static size_t out_pad(const struct outside * o, size_t n) {
    const size_t a = o->align > 1 ? (size_t) o->align : 1;
    return (n + a - 1) / a * a;
}

/* x = R(-angle) x per pair (2i, 2i+1): cos at cs[2i * stride], sin at cs[(2i + 1) * stride] */
static void turn_back(float * x, const float * cs, int64_t stride, int64_t D) {
    for (int64_t i = 0; i < D / 2; i++) {
        const float c = cs[2 * i * stride], sn = cs[(2 * i + 1) * stride], a = x[2 * i], b = x[2 * i + 1];
        x[2 * i]     = a * c + b * sn;
        x[2 * i + 1] = b * c - a * sn;
    }
}

/* The demotion as the contract describes it, written here from kv-codec.h's functions: every head
 * decoded first (the new records may overlap the old), FP16 keys turned back to before RoPE, encoded. */
static int out_demote(void * user, const struct moqae_kv_demotion * d) {
    struct outside *             o = user;
    const struct moqae_kv_shape * sh = &o->shape;
    const int64_t                C = sh->chunk, D = sh->head_dim, H = o->n_head_kv;
    const enum moqae_kv_codec    oc = (enum moqae_kv_codec) d->old_codec, nc = (enum moqae_kv_codec) d->new_codec;
    const size_t ok = out_pad(o, moqae_kv_k_bytes(oc, sh)), ov = out_pad(o, moqae_kv_v_bytes(oc, sh));
    const size_t nk = out_pad(o, moqae_kv_k_bytes(nc, sh)), nv = out_pad(o, moqae_kv_v_bytes(nc, sh));
    int          st = out_step(o);
    if (st || d->dst > d->src || d->src + H * (ok + ov) > o->cap || nc <= oc) {
        return st ? st : moqae_fail(MOQAE_ERR_INTERNAL, "bad demotion");
    }
    float * kv = malloc(sizeof(float) * (size_t) (2 * H * C * D));
    if (!kv) {
        return moqae_fail(MOQAE_ERR_OUT_OF_MEMORY, "test: out of memory");
    }
    for (int64_t h = 0; h < H; h++) {
        float * k = kv + 2 * h * C * D, *v = k + C * D;
        moqae_kv_decode_k(oc, sh, o->bytes + d->src + (size_t) h * (ok + ov), k, D);
        moqae_kv_decode_v(oc, sh, o->bytes + d->src + (size_t) h * (ok + ov) + ok, v, D);
        for (int64_t t = 0; d->cs_p0 && t < C; t++) {
            turn_back(k + t * D, d->cs_p0, 1, D);
            turn_back(k + t * D, o->cs_t + t, C, D);
        }
    }
    for (int64_t h = 0; h < H; h++) {
        uint8_t * r = o->bytes + d->dst + (size_t) h * (nk + nv);
        memset(r, 0, nk + nv);
        moqae_kv_encode_k(nc, sh, kv + 2 * h * C * D, D, r);
        moqae_kv_encode_v(nc, sh, kv + 2 * h * C * D + C * D, D, r + nk);
    }
    free(kv);
    o->n_demote++;
    return MOQAE_OK;
}

static int out_move(void * user, size_t dst, size_t src, size_t n) {
    struct outside * o = user;
    int              st = out_step(o);
    if (!st && dst < src && src + n <= o->cap) {
        memmove(o->bytes + dst, o->bytes + src, n);
        o->n_move++;
        return MOQAE_OK;
    }
    return st ? st : moqae_fail(MOQAE_ERR_INTERNAL, "bad move: dst %zu src %zu n %zu", dst, src, n);
}

struct ring_case {
    const char *           name;
    enum moqae_kv_overflow overflow;
    int                    weighted, routed, align;
    double                 budget_chunks; /* the budget, in chunks of every layer at the policy's codec */
};

static void run_case(const struct ring_case * rc) {
    enum { L = 4, NKV = 2, D = 64, C = 32, NCTX = 640, NB = 64, G = 2 };
    const float weights[L] = { 1.0f, 3.0f, 0.5f, 2.0f };
    struct moqae_kv_config cfg;
    memset(&cfg, 0, sizeof(cfg));
    cfg.n_layer = L, cfg.n_head_kv = NKV, cfg.head_dim = D, cfg.n_ctx = NCTX, cfg.n_batch = NB, cfg.chunk = C;
    cfg.policy        = (struct moqae_kv_policy) { MOQAE_KV_CODEC_Q4, true };
    cfg.overflow      = rc->overflow;
    cfg.keys_pre_rope = true, cfg.n_rot = D, cfg.rope_base = 10000.0f;
    cfg.rec_align     = rc->align;
    cfg.n_group = 1, cfg.group_size = L;
    if (rc->routed) { /* experts fp16, int4, int2; one decision per group of 2 layers */
        cfg.n_expert  = 3;
        cfg.expert[0] = MOQAE_KV_CODEC_F16, cfg.expert[1] = MOQAE_KV_CODEC_Q4, cfg.expert[2] = MOQAE_KV_CODEC_Q2;
        cfg.n_group = G, cfg.group_size = L / G, cfg.expected_bits = 4.0;
    }
    cfg.demote_weight = rc->weighted ? weights : NULL;
    const struct moqae_kv_shape shape = { C, D, MOQAE_KV_V_GROUP };
    const size_t rec = (moqae_kv_k_bytes(MOQAE_KV_CODEC_Q4, &shape) + 15) / 16 * 16 +
                       (moqae_kv_v_bytes(MOQAE_KV_CODEC_Q4, &shape) + 15) / 16 * 16;
    cfg.budget = (int64_t) (rc->budget_chunks * (double) (rec * NKV * L));

    struct moqae_kv_cache *   a = NULL, *b = NULL;
    float                     cs_t[D * C], theta[D / 2];
    for (int64_t i = 0; i < D / 2; i++) { /* kv-ring.c's angles */
        theta[i] = (float) pow(10000.0, -2.0 * (double) i / (double) D);
    }
    moqae_kv_rope_fill(D, C, 0, theta, cs_t);
    struct outside            o   = { NULL, 0, 0, 0, -1, { C, D, MOQAE_KV_V_GROUP }, NKV, rc->align, cs_t };
    struct moqae_kv_arena_ops ops = { &o, out_move, out_demote };
    CHECK(moqae_kv_cache_new(&cfg, &a) == MOQAE_OK, "%s: ring A: %s", rc->name, moqae_last_error());
    struct moqae_kv_config cb = cfg;
    cb.arena_ops              = &ops;
    CHECK(moqae_kv_cache_new(&cb, &b) == MOQAE_OK, "%s: ring B: %s", rc->name, moqae_last_error());
    struct moqae_kv_table ta, tb;
    moqae_kv_cache_table(a, &ta);
    moqae_kv_cache_table(b, &tb);
    CHECK(tb.arena == NULL && ta.arena != NULL && ta.cap == tb.cap, "%s: capacities %zu / %zu", rc->name, ta.cap, tb.cap);
    o.cap   = tb.cap;
    o.bytes = calloc(1, o.cap ? o.cap : 1);
    float *   k     = malloc(sizeof(float) * NB * NKV * D);
    float *   v     = malloc(sizeof(float) * NB * NKV * D);
    uint8_t * votes = malloc((size_t) NB * G);
    int64_t   pos = 0, steps = 0, limit = rc->overflow == MOQAE_KV_OVERFLOW_SHIFT ? 2 * NCTX : NCTX;
    while (pos < limit && o.bytes && k && v && votes) {
        const int64_t n = 1 + (int64_t) (rnd() % (steps % 3 == 0 ? NB : 7));
        if (pos + n > limit) {
            break;
        }
        for (int64_t i = 0; i < n * NKV * D; i++) {
            k[i] = rnd_f(), v[i] = rnd_f();
        }
        for (int64_t i = 0; i < n * G; i++) { /* chunks and groups vote differently, with some noise */
            const int64_t chunk = (pos + i / G) / C, g = i % G;
            votes[i]            = (uint8_t) (rnd() % 5 == 0 ? rnd() % 3 : (uint64_t) (chunk * 5 + g) % 3);
        }
        const uint8_t * vp = rc->routed ? votes : NULL;
        const int       sa = moqae_kv_cache_prepare(a, n, vp), sb = moqae_kv_cache_prepare(b, n, vp);
        CHECK(sa == MOQAE_OK && sb == MOQAE_OK, "%s: prepare at %lld: %d / %d (%s)", rc->name, (long long) pos, sa, sb,
              moqae_last_error());
        for (int64_t l = 0; l < L; l++) {
            moqae_kv_cache_store(a, l, n, k, v, 0, 1);
        }
        moqae_kv_cache_table(a, &ta);
        moqae_kv_cache_table(b, &tb);
        const int64_t n_new = (pos + n) / C - pos / C;
        for (int64_t i = ta.n_chunks - n_new; i < ta.n_chunks; i++) { /* the new chunks, as the GPU encodes */
            const size_t from = ta.off[i * L], to = i + 1 < ta.n_chunks ? ta.off[(i + 1) * L] : ta.used;
            memcpy(o.bytes + tb.off[i * L], ta.arena + from, to - from);
        }
        moqae_kv_cache_commit(a, n);
        moqae_kv_cache_commit(b, n);
        pos += n, steps++;
        CHECK(ta.n_chunks == tb.n_chunks && ta.used == tb.used, "%s: at %lld: %lld/%lld chunks, %zu/%zu bytes", rc->name,
              (long long) pos, (long long) ta.n_chunks, (long long) tb.n_chunks, ta.used, tb.used);
        CHECK(!memcmp(ta.pos, tb.pos, (size_t) ta.n_chunks * sizeof(int64_t)) &&
                  !memcmp(ta.codec, tb.codec, (size_t) (ta.n_chunks * L)) &&
                  !memcmp(ta.off, tb.off, (size_t) (ta.n_chunks * L) * sizeof(size_t)) &&
                  !memcmp(ta.cs_p0, tb.cs_p0, (size_t) (ta.n_chunks * D) * sizeof(float)),
              "%s: at %lld: the chunk tables differ", rc->name, (long long) pos);
        size_t first = 0;
        while (first < ta.used && ta.arena[first] == o.bytes[first]) {
            first++;
        }
        CHECK(first == ta.used, "%s: at %lld: the outside arena differs from byte %zu of %zu", rc->name, (long long) pos,
              first, ta.used);
    }
    struct moqae_kv_stats sa, sb;
    moqae_kv_cache_stats(a, &sa);
    moqae_kv_cache_stats(b, &sb);
    printf("test-kv-ring: %-22s %4lld tokens in %3lld steps: %3lld chunks, records fp16/int8/int4/int2 %lld/%lld/%lld/%lld; "
           "outside arena: %lld demotions, %lld moves\n",
           rc->name, (long long) pos, (long long) steps, (long long) ta.n_chunks, (long long) sa.n_records[0],
           (long long) sa.n_records[1], (long long) sa.n_records[2], (long long) sa.n_records[3], (long long) o.n_demote,
           (long long) o.n_move);
    if (rc->overflow != MOQAE_KV_OVERFLOW_ERROR) {
        CHECK(o.n_move > 0, "%s: the budget never overflowed", rc->name);
    }
    if (rc->overflow == MOQAE_KV_OVERFLOW_DEMOTE) {
        CHECK(o.n_demote > 0 && sa.n_records[3] == sb.n_records[3] && sa.n_records[3] > 0,
              "%s: no demotion through the ops", rc->name);
    }

    /* an operation that fails fails prepare with its status: a new ring, one token at a time until
     * the budget overflows */
    if (rc->overflow != MOQAE_KV_OVERFLOW_ERROR) {
        moqae_kv_cache_clear(b);
        o.fail_after = 0;
        int st       = MOQAE_OK;
        for (int64_t i = 0; i < limit && !st; i++) {
            st = moqae_kv_cache_prepare(b, 1, rc->routed ? votes : NULL);
            if (!st) {
                moqae_kv_cache_commit(b, 1);
            }
        }
        CHECK(st == MOQAE_ERR_INTERNAL && strstr(moqae_last_error(), "outside arena failed"),
              "%s: a failing operation gave %d (%s)", rc->name, st, moqae_last_error());
    }
    moqae_kv_cache_free(a);
    moqae_kv_cache_free(b);
    free(o.bytes);
    free(k);
    free(v);
    free(votes);
}

/* The GPU's demotion (its phases run on the CPU: moqae_cuda_codec_demote_emulated) against kv-codec.c:
 * random chunks encoded at each codec, re-encoded at every lower one, keys after RoPE turned back (FP16
 * to quantized, keys before RoPE) or not; D 64 and 128. Needs a CUDA build (else: skipped, said so). */
static void test_gpu_demotion(void) {
    enum { C = 32, MAXD = 128 };
    static float    k[C * MAXD], v[C * MAXD], dk[C * MAXD], dv[C * MAXD];
    static uint8_t  krec[4 * C * MAXD], vrec[4 * C * MAXD], rk[4 * C * MAXD], rv[4 * C * MAXD];
    static uint8_t  gk[4 * C * MAXD], gv[4 * C * MAXD];
    float           cs_t[MAXD * C], theta[MAXD / 2], p0[MAXD];
    int64_t         n_pairs = 0;
    const int64_t   dims[2] = { 64, 128 };
    for (int di = 0; di < 2; di++) {
        const int64_t               D  = dims[di];
        const struct moqae_kv_shape sh = { C, D, MOQAE_KV_V_GROUP };
        for (int64_t i = 0; i < D / 2; i++) {
            theta[i] = (float) pow(10000.0, -2.0 * (double) i / (double) D);
        }
        moqae_kv_rope_fill(D, C, 0, theta, cs_t);
        for (int rep = 0; rep < 6; rep++) {
            moqae_kv_rope_fill(D, 1, 32 * (int64_t) (rnd() % 4096), theta, p0);
            for (int64_t i = 0; i < C * D; i++) { /* an outlier token now and then */
                k[i] = rnd_f() * (i / D == rep ? 8.0f : 1.0f), v[i] = rnd_f();
            }
            for (int oc = MOQAE_KV_CODEC_F16; oc < MOQAE_KV_CODEC_Q2; oc++) {
                for (int nc = oc + 1; nc <= MOQAE_KV_CODEC_Q2; nc++) {
                    for (int turn = 0; turn < (oc == MOQAE_KV_CODEC_F16 ? 2 : 1); turn++) {
                        const enum moqae_kv_codec o = (enum moqae_kv_codec) oc, n = (enum moqae_kv_codec) nc;
                        memset(krec, 0, sizeof(krec)), memset(vrec, 0, sizeof(vrec));
                        moqae_kv_encode_k(o, &sh, k, D, krec);
                        moqae_kv_encode_v(o, &sh, v, D, vrec);
                        memset(gk, 0, sizeof(gk)), memset(gv, 0, sizeof(gv));
                        const int st = moqae_cuda_codec_demote_emulated(o, n, &sh, krec, vrec, cs_t, turn ? p0 : NULL, gk, gv);
                        if (st == MOQAE_ERR_UNSUPPORTED && n_pairs == 0) {
                            printf("test-kv-ring: GPU demotion emulated: skipped (%s)\n", moqae_last_error());
                            return;
                        }
                        CHECK(st == MOQAE_OK, "GPU demotion %d -> %d: %s", oc, nc, moqae_last_error());
                        moqae_kv_decode_k(o, &sh, krec, dk, D);
                        moqae_kv_decode_v(o, &sh, vrec, dv, D);
                        for (int64_t t = 0; turn && t < C; t++) { /* kv-ring.c unrotate_chunk */
                            turn_back(dk + t * D, p0, 1, D);
                            turn_back(dk + t * D, cs_t + t, C, D);
                        }
                        memset(rk, 0, sizeof(rk)), memset(rv, 0, sizeof(rv));
                        moqae_kv_encode_k(n, &sh, dk, D, rk);
                        moqae_kv_encode_v(n, &sh, dv, D, rv);
                        CHECK(!memcmp(rk, gk, moqae_kv_k_bytes(n, &sh)) && !memcmp(rv, gv, moqae_kv_v_bytes(n, &sh)),
                              "GPU demotion D %lld %s -> %s (keys turned back: %d): records differ from kv-codec.c's",
                              (long long) D, moqae_kv_codec_name(o), moqae_kv_codec_name(n), turn);
                        n_pairs++;
                    }
                }
            }
        }
    }
    printf("test-kv-ring: GPU demotion emulated: %lld record pairs identical to kv-codec.c's\n", (long long) n_pairs);
}

/* Partial offload: one model's layers in two rings, [0, k) and [k, L) (layer0 = k), under a router
 * deciding per group of layers: every record's codec must be the one ring's of all L layers. */
static void test_split_rings(void) {
    enum { L = 6, NKV = 1, D = 64, C = 32, NCTX = 512, NB = 64, G = 3 };
    struct moqae_kv_config cfg;
    memset(&cfg, 0, sizeof(cfg));
    cfg.n_layer = L, cfg.n_head_kv = NKV, cfg.head_dim = D, cfg.n_ctx = NCTX, cfg.n_batch = NB, cfg.chunk = C;
    cfg.policy   = (struct moqae_kv_policy) { MOQAE_KV_CODEC_Q2, true };
    cfg.n_expert = 3, cfg.expert[0] = MOQAE_KV_CODEC_F16, cfg.expert[1] = MOQAE_KV_CODEC_Q4, cfg.expert[2] = MOQAE_KV_CODEC_Q2;
    cfg.n_group = G, cfg.group_size = L / G;
    for (int64_t k = 1; k < L; k++) {
        struct moqae_kv_cache * all = NULL, *lo = NULL, *hi = NULL;
        struct moqae_kv_config  cl = cfg, ch = cfg;
        cl.n_layer = k, ch.n_layer = L - k, ch.layer0 = k;
        CHECK(!moqae_kv_cache_new(&cfg, &all) && !moqae_kv_cache_new(&cl, &lo) && !moqae_kv_cache_new(&ch, &hi),
              "split rings at %lld: %s", (long long) k, moqae_last_error());
        uint8_t votes[NB * G];
        int64_t pos = 0;
        while (pos + NB <= NCTX) {
            for (int64_t i = 0; i < NB * G; i++) {
                votes[i] = (uint8_t) (((pos + i / G) / C * 7 + (i % G) * 5 + (int64_t) (rnd() % 2)) % 3);
            }
            CHECK(!moqae_kv_cache_prepare(all, NB, votes) && !moqae_kv_cache_prepare(lo, NB, votes) &&
                      !moqae_kv_cache_prepare(hi, NB, votes),
                  "split rings at %lld: prepare: %s", (long long) k, moqae_last_error());
            moqae_kv_cache_commit(all, NB), moqae_kv_cache_commit(lo, NB), moqae_kv_cache_commit(hi, NB);
            pos += NB;
        }
        struct moqae_kv_table ta, tl, th;
        moqae_kv_cache_table(all, &ta), moqae_kv_cache_table(lo, &tl), moqae_kv_cache_table(hi, &th);
        int64_t differ = 0, kinds = 0, seen[4] = { 0 };
        for (int64_t i = 0; i < ta.n_chunks; i++) {
            for (int64_t l = 0; l < L; l++) {
                const int c = ta.codec[i * L + l];
                differ += c != (l < k ? tl.codec[i * k + l] : th.codec[i * (L - k) + l - k]);
                seen[c]++;
            }
        }
        for (int e = 0; e < 4; e++) {
            kinds += seen[e] > 0;
        }
        CHECK(differ == 0 && ta.n_chunks == tl.n_chunks && ta.n_chunks == th.n_chunks && kinds >= 3,
              "split rings at layer %lld: %lld records differ (%lld codecs seen)", (long long) k, (long long) differ,
              (long long) kinds);
        moqae_kv_cache_free(all), moqae_kv_cache_free(lo), moqae_kv_cache_free(hi);
    }
    printf("test-kv-ring: split rings (partial offload, 3 groups of 2 layers, every split): same codecs\n");
}

int main(void) {
    test_split_rings();
    test_gpu_demotion();
    const struct ring_case cases[] = {
        { "shift, packed", MOQAE_KV_OVERFLOW_SHIFT, 0, 0, 0, 12.0 },
        { "shift, padded", MOQAE_KV_OVERFLOW_SHIFT, 0, 0, 16, 12.0 },
        { "demote recency", MOQAE_KV_OVERFLOW_DEMOTE, 0, 0, 16, 17.0 },
        { "demote weighted", MOQAE_KV_OVERFLOW_DEMOTE, 1, 0, 16, 17.0 },
        { "demote weighted, routed", MOQAE_KV_OVERFLOW_DEMOTE, 1, 1, 16, 17.0 },
        { "shift, routed", MOQAE_KV_OVERFLOW_SHIFT, 0, 1, 16, 14.0 },
        { "error, routed", MOQAE_KV_OVERFLOW_ERROR, 0, 1, 16, 400.0 },
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        run_case(&cases[i]);
    }
    if (g_failures) {
        fprintf(stderr, "test-kv-ring: %d failure(s)\n", g_failures);
        return 1;
    }
    printf("test-kv-ring: ok\n");
    return 0;
}
