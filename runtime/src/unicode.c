/*
 * unicode.c — UTF-8 decoding, codepoint classes and GPT-2's byte alphabet (see unicode.h).
 * The class tables are generated (gen-unicode.py -> unicode-data.h); their reference is the
 * Oniguruma inside HF tokenizers, checked codepoint by codepoint when the tables were generated.
 * The decoder follows RFC 3629 (Table 3-7 of the Unicode standard: well-formed byte sequences).
 */
#include "unicode.h"

#include "unicode-data.h"

int moqae_utf8_decode(const uint8_t * s, size_t n, int32_t * cp) {
    const uint32_t b0 = s[0];
    if (b0 < 0x80) {
        *cp = (int32_t) b0;
        return 1;
    }
    int      len;
    uint32_t v;
    uint32_t lo = 0x80, hi = 0xBF; /* allowed range of the second byte (Table 3-7) */
    if (b0 >= 0xC2 && b0 <= 0xDF) {
        len = 2;
        v   = b0 & 0x1F;
    } else if (b0 >= 0xE0 && b0 <= 0xEF) {
        len = 3;
        v   = b0 & 0x0F;
        if (b0 == 0xE0) {
            lo = 0xA0; /* no overlong forms */
        } else if (b0 == 0xED) {
            hi = 0x9F; /* no surrogates */
        }
    } else if (b0 >= 0xF0 && b0 <= 0xF4) {
        len = 4;
        v   = b0 & 0x07;
        if (b0 == 0xF0) {
            lo = 0x90;
        } else if (b0 == 0xF4) {
            hi = 0x8F; /* nothing above U+10FFFF */
        }
    } else {
        *cp = -1; /* continuation byte, C0, C1, F5..FF */
        return 1;
    }
    if ((size_t) len > n) {
        *cp = -1;
        return 1;
    }
    for (int i = 1; i < len; i++) {
        const uint32_t b = s[i];
        if (i == 1 ? (b < lo || b > hi) : (b < 0x80 || b > 0xBF)) {
            *cp = -1;
            return 1;
        }
        v = (v << 6) | (b & 0x3F);
    }
    *cp = (int32_t) v;
    return len;
}

int moqae_utf8_encode(int32_t cp, uint8_t out[4]) {
    if (cp < 0) {
        return 0;
    }
    if (cp < 0x80) {
        out[0] = (uint8_t) cp;
        return 1;
    }
    if (cp < 0x800) {
        out[0] = (uint8_t) (0xC0 | (cp >> 6));
        out[1] = (uint8_t) (0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        if (cp >= 0xD800 && cp <= 0xDFFF) {
            return 0;
        }
        out[0] = (uint8_t) (0xE0 | (cp >> 12));
        out[1] = (uint8_t) (0x80 | ((cp >> 6) & 0x3F));
        out[2] = (uint8_t) (0x80 | (cp & 0x3F));
        return 3;
    }
    if (cp <= 0x10FFFF) {
        out[0] = (uint8_t) (0xF0 | (cp >> 18));
        out[1] = (uint8_t) (0x80 | ((cp >> 12) & 0x3F));
        out[2] = (uint8_t) (0x80 | ((cp >> 6) & 0x3F));
        out[3] = (uint8_t) (0x80 | (cp & 0x3F));
        return 4;
    }
    return 0;
}

enum moqae_cp_class moqae_cp_class(int32_t cp) {
    if (cp < 0) {
        return MOQAE_CP_OTHER;
    }
    if (cp < 256) {
        return (enum moqae_cp_class) moqae_unicode_latin1[cp];
    }
    /* Last run whose start is <= cp (the first run starts at 0). */
    const uint32_t key = ((uint32_t) cp << 2) | 3u;
    int            lo = 0, hi = MOQAE_UNICODE_N_RUNS - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        if (moqae_unicode_runs[mid] <= key) {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    return (enum moqae_cp_class) (moqae_unicode_runs[lo] & 3u);
}

const char * moqae_unicode_version(void) {
    return MOQAE_UNICODE_VERSION;
}

/* The bytes GPT-2 keeps as themselves: printable Latin-1 without the space and the soft hyphen. */
static int gpt2_is_direct(uint32_t b) {
    return (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
}

int32_t moqae_gpt2_byte_to_cp(uint8_t b) {
    if (gpt2_is_direct(b)) {
        return b;
    }
    int32_t k = 0; /* how many indirect bytes come before b */
    for (uint32_t x = 0; x < b; x++) {
        k += !gpt2_is_direct(x);
    }
    return 256 + k;
}

int moqae_gpt2_cp_to_byte(int32_t cp) {
    if (cp >= 0 && cp < 256) {
        return gpt2_is_direct((uint32_t) cp) ? cp : -1;
    }
    if (cp < 256 || cp >= 256 + 68) { /* 68 = 256 - 188 direct bytes */
        return -1;
    }
    int32_t k = cp - 256;
    for (uint32_t x = 0; x < 256; x++) {
        if (!gpt2_is_direct(x) && k-- == 0) {
            return (int) x;
        }
    }
    return -1;
}
