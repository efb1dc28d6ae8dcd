/*
 * kv-codec-dump.c — the C KV codecs from the command line, for tests/test_kv_codec.py:
 *   kv-codec-dump k|v CODEC C D G IN.f32 OUT.bin [DECODED.f32]
 * IN holds R chunks of one KV head as raw little-endian float32 [R][C][D]; OUT gets the R records
 * (moqae_kv_encode_k / _v, each moqae_kv_k_bytes / _v_bytes long) back to back; DECODED, if given,
 * gets moqae_kv_decode_k / _v of those records as float32 [R][C][D]. CODEC: fp16, int8, int4, int2.
 *   kv-codec-dump --sizes C D G     one line per codec: name, key bytes, value bytes, effective bits
 * The reference it is compared with is train/kv_codec.py.
 */
#include "common.h"
#include "kv-codec.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int parse_codec(const char * s, enum moqae_kv_codec * c) {
    for (int i = 0; i < MOQAE_KV_CODEC_COUNT; i++) {
        if (strcmp(s, moqae_kv_codec_name((enum moqae_kv_codec) i)) == 0) {
            *c = (enum moqae_kv_codec) i;
            return 1;
        }
    }
    return 0;
}

static int write_all(const char * path, const void * p, size_t n) {
    FILE * f = fopen(path, "wb");
    if (!f || fwrite(p, 1, n, f) != n) {
        fprintf(stderr, "kv-codec-dump: cannot write %s\n", path);
        if (f) {
            fclose(f);
        }
        return 0;
    }
    return fclose(f) == 0;
}

int main(int argc, char ** argv) {
    if (argc == 5 && strcmp(argv[1], "--sizes") == 0) {
        const struct moqae_kv_shape s = {atoll(argv[2]), atoll(argv[3]), atoll(argv[4])};
        for (int i = 0; i < MOQAE_KV_CODEC_COUNT; i++) {
            const enum moqae_kv_codec c = (enum moqae_kv_codec) i;
            if (moqae_kv_shape_check(c, &s) != MOQAE_OK) {
                fprintf(stderr, "kv-codec-dump: %s\n", moqae_last_error());
                return 1;
            }
            printf("%s %zu %zu %.6f\n", moqae_kv_codec_name(c), moqae_kv_k_bytes(c, &s), moqae_kv_v_bytes(c, &s),
                   moqae_kv_effective_bits(c, &s));
        }
        return 0;
    }
    enum moqae_kv_codec c;
    if ((argc != 8 && argc != 9) || (strcmp(argv[1], "k") != 0 && strcmp(argv[1], "v") != 0) ||
        !parse_codec(argv[2], &c)) {
        fprintf(stderr, "usage: kv-codec-dump k|v fp16|int8|int4|int2 C D G IN.f32 OUT.bin [DECODED.f32]\n"
                        "       kv-codec-dump --sizes C D G\n");
        return 2;
    }
    const int                   keys = argv[1][0] == 'k';
    const struct moqae_kv_shape s    = {atoll(argv[3]), atoll(argv[4]), atoll(argv[5])};
    if (moqae_kv_shape_check(c, &s) != MOQAE_OK) {
        fprintf(stderr, "kv-codec-dump: %s\n", moqae_last_error());
        return 1;
    }
    FILE * f = fopen(argv[6], "rb");
    if (!f) {
        fprintf(stderr, "kv-codec-dump: cannot open %s\n", argv[6]);
        return 1;
    }
    fseek(f, 0, SEEK_END);
    const long   len   = ftell(f);
    const size_t chunk = (size_t) (s.chunk * s.head_dim);
    fseek(f, 0, SEEK_SET);
    if (len < 0 || (size_t) len % (chunk * 4) != 0) {
        fprintf(stderr, "kv-codec-dump: %s is not a whole number of [C][D] float32 chunks\n", argv[6]);
        fclose(f);
        return 1;
    }
    const size_t    n_rec = (size_t) len / (chunk * 4);
    const size_t    rb    = keys ? moqae_kv_k_bytes(c, &s) : moqae_kv_v_bytes(c, &s);
    float *         x     = malloc((size_t) len + 1);
    uint8_t *       out   = malloc(n_rec * rb + 1);
    float *         dec   = malloc((size_t) len + 1);
    if (!x || !out || !dec || fread(x, 1, (size_t) len, f) != (size_t) len) {
        fprintf(stderr, "kv-codec-dump: cannot read %s\n", argv[6]);
        fclose(f);
        return 1;
    }
    fclose(f);
    for (size_t r = 0; r < n_rec; r++) {
        if (keys) {
            moqae_kv_encode_k(c, &s, x + r * chunk, s.head_dim, out + r * rb);
            moqae_kv_decode_k(c, &s, out + r * rb, dec + r * chunk, s.head_dim);
        } else {
            moqae_kv_encode_v(c, &s, x + r * chunk, s.head_dim, out + r * rb);
            moqae_kv_decode_v(c, &s, out + r * rb, dec + r * chunk, s.head_dim);
        }
    }
    int ok = write_all(argv[7], out, n_rec * rb);
    if (ok && argc == 9) {
        ok = write_all(argv[8], dec, (size_t) len);
    }
    free(x);
    free(out);
    free(dec);
    return ok ? 0 : 1;
}
