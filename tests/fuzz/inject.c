/*
 * inject.c — an LD_PRELOAD fault-injection shim for the tools' reliability tests: chosen heap
 * allocations fail (every allocation failure in libmoqae and the tools must become a clean "out of
 * memory" error, never a crash), and a Ctrl-C can be delivered at an exact point (right after the
 * N-th fflush(stdout), i.e. after moqae-cli echoes the prompt or prints a piece), which an outside
 * signal can only hit by chance. Not a fuzzer and not part of the CMake build:
 * tests/test_reliability.py compiles it with `cc -shared -fPIC -O1 -o inject.so tests/fuzz/inject.c`.
 * Environment:
 *   FAILMALLOC_NTH=N        the N-th counted allocation (1-based) returns NULL; 0 or unset: none fails
 *   FAILMALLOC_PERSIST=1    ... and so does every counted allocation after it (a real OOM)
 *   FAILMALLOC_MIN=BYTES    count only requests of at least BYTES (default 0: all)
 *   FAILMALLOC_REPORT=PATH  at exit, write "count C failed F" (counted calls, injected failures)
 *   INJECT_SIGINT_FLUSH=N   raise(SIGINT) right after the N-th fflush(stdout) returns
 * Allocation covers malloc, calloc, realloc (growth), posix_memalign, aligned_alloc and memalign;
 * glibc routes its own internal allocations (strdup, fopen ...) through these too. It calls glibc's
 * __libc_* and _IO_fflush entry points, so it needs glibc, and it must not be combined with ASan
 * (which replaces malloc itself).
 */
#define _GNU_SOURCE

#include <errno.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>

extern void * __libc_malloc(size_t n);
extern void * __libc_calloc(size_t n, size_t size);
extern void * __libc_realloc(void * p, size_t n);
extern void * __libc_memalign(size_t align, size_t n);
extern int    _IO_fflush(FILE * f);

static atomic_long g_count;
static atomic_long g_failed;
static long        g_nth     = -1; /* -1: not configured yet */
static int         g_persist = 0;
static size_t      g_min     = 0;

static void configure(void) {
    /* getenv does not allocate, so this is safe inside malloc. Racing threads compute the same values. */
    const char * s = getenv("FAILMALLOC_NTH");
    g_persist      = getenv("FAILMALLOC_PERSIST") && getenv("FAILMALLOC_PERSIST")[0] == '1';
    g_min          = getenv("FAILMALLOC_MIN") ? (size_t) strtoull(getenv("FAILMALLOC_MIN"), NULL, 10) : 0;
    g_nth          = s ? strtol(s, NULL, 10) : 0;
}

/* Whether this request fails. */
static int should_fail(size_t n) {
    if (g_nth < 0) {
        configure();
    }
    if (n < g_min) {
        return 0;
    }
    const long i = atomic_fetch_add(&g_count, 1) + 1;
    if (g_nth > 0 && (i == g_nth || (g_persist && i > g_nth))) {
        atomic_fetch_add(&g_failed, 1);
        return 1;
    }
    return 0;
}

void * malloc(size_t n) {
    if (should_fail(n)) {
        errno = ENOMEM;
        return NULL;
    }
    return __libc_malloc(n);
}

void * calloc(size_t n, size_t size) {
    if (should_fail(n * size)) {
        errno = ENOMEM;
        return NULL;
    }
    return __libc_calloc(n, size);
}

void * realloc(void * p, size_t n) {
    if (n > 0 && should_fail(n)) {
        errno = ENOMEM;
        return NULL;
    }
    return __libc_realloc(p, n);
}

void * memalign(size_t align, size_t n) {
    if (should_fail(n)) {
        errno = ENOMEM;
        return NULL;
    }
    return __libc_memalign(align, n);
}

void * aligned_alloc(size_t align, size_t n) {
    return memalign(align, n);
}

int posix_memalign(void ** out, size_t align, size_t n) {
    if (align < sizeof(void *) || (align & (align - 1)) != 0) {
        return EINVAL;
    }
    if (should_fail(n)) {
        return ENOMEM;
    }
    void * p = __libc_memalign(align, n);
    if (!p) {
        return ENOMEM;
    }
    *out = p;
    return 0;
}

static atomic_long g_flushes;

int fflush(FILE * f) {
    const int    rc = _IO_fflush(f);
    const char * s  = getenv("INJECT_SIGINT_FLUSH");
    if (f == stdout && s && atomic_fetch_add(&g_flushes, 1) + 1 == strtol(s, NULL, 10)) {
        raise(SIGINT);
    }
    return rc;
}

__attribute__((destructor)) static void report(void) {
    const char * path = getenv("FAILMALLOC_REPORT");
    if (!path) {
        return;
    }
    FILE * f = fopen(path, "w"); /* may itself fail when the failures persist: then no report */
    if (f) {
        fprintf(f, "count %ld failed %ld\n", atomic_load(&g_count), atomic_load(&g_failed));
        fclose(f);
    }
}
