/*
 * threadpool.c — see threadpool.h. Workers wait for a new job generation; the barrier is a
 * counter + generation pair (sense reversal) spun on with a pause hint.
 */
#include "threadpool.h"

#include "common.h"

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>

#if defined(__x86_64__) || defined(__i386__)
#    include <immintrin.h>
#    define MOQAE_PAUSE() _mm_pause()
#else
#    define MOQAE_PAUSE() ((void) 0)
#endif

/* Idle workers spin this many pauses (~ a millisecond) before sleeping: decode calls come back to
 * back, and a sleep/wake costs tens of microseconds per token. */
#define MOQAE_SPIN_BEFORE_SLEEP (1 << 16)

/* A thread waiting at a barrier spins this many pauses (a few microseconds: the usual wait when
 * every thread has a core) before yielding its core on each further check. Without the yield, a
 * machine with more runnable threads than cores loses whole scheduler slices per barrier. */
#define MOQAE_SPIN_BEFORE_YIELD (1 << 10)

struct moqae_worker {
    struct moqae_threadpool * tp;
    int                       ith;
    pthread_t                 thread;
};

struct moqae_threadpool {
    int                   n;
    struct moqae_worker * workers; /* n - 1 entries */

    pthread_mutex_t mutex;
    pthread_cond_t  cond;
    atomic_int      job_gen; /* incremented for every job       */
    atomic_int      n_done;  /* workers finished the current job */
    atomic_bool     stop;
    moqae_task_fn   fn;
    void *          arg;

    atomic_int bar_count;
    atomic_int bar_gen;
};

static void * worker_main(void * p) {
    struct moqae_worker *     w    = p;
    struct moqae_threadpool * tp   = w->tp;
    int                       seen = 0;
    for (;;) {
        int spins = 0;
        while (atomic_load_explicit(&tp->job_gen, memory_order_acquire) == seen &&
               !atomic_load_explicit(&tp->stop, memory_order_acquire)) {
            if (++spins < MOQAE_SPIN_BEFORE_SLEEP) {
                MOQAE_PAUSE();
                continue;
            }
            pthread_mutex_lock(&tp->mutex);
            while (atomic_load(&tp->job_gen) == seen && !atomic_load(&tp->stop)) {
                pthread_cond_wait(&tp->cond, &tp->mutex);
            }
            pthread_mutex_unlock(&tp->mutex);
        }
        if (atomic_load(&tp->stop)) {
            return NULL;
        }
        seen = atomic_load(&tp->job_gen);
        tp->fn(tp->arg, w->ith, tp->n);
        atomic_fetch_add_explicit(&tp->n_done, 1, memory_order_release);
    }
}

int moqae_threadpool_new(int n_threads, struct moqae_threadpool ** out) {
    *out = NULL;
    if (n_threads < 1 || n_threads > 1024) {
        return moqae_fail(MOQAE_ERR_INVALID_ARG, "n_threads must be in 1..1024, got %d", n_threads);
    }
    struct moqae_threadpool * tp = calloc(1, sizeof(*tp));
    if (!tp) {
        return moqae_fail(MOQAE_ERR_OUT_OF_MEMORY, "out of memory for the thread pool");
    }
    tp->n       = n_threads;
    tp->workers = calloc((size_t) n_threads, sizeof(*tp->workers));
    if (!tp->workers) {
        free(tp);
        return moqae_fail(MOQAE_ERR_OUT_OF_MEMORY, "out of memory for the thread pool");
    }
    pthread_mutex_init(&tp->mutex, NULL);
    pthread_cond_init(&tp->cond, NULL);
    for (int i = 1; i < n_threads; i++) {
        struct moqae_worker * w = &tp->workers[i - 1];
        w->tp                   = tp;
        w->ith                  = i;
        if (pthread_create(&w->thread, NULL, worker_main, w) != 0) {
            tp->n = i; /* join the ones already started */
            moqae_threadpool_free(tp);
            return moqae_fail(MOQAE_ERR_OUT_OF_MEMORY, "could not start worker thread %d of %d", i, n_threads);
        }
    }
    *out = tp;
    return MOQAE_OK;
}

void moqae_threadpool_free(struct moqae_threadpool * tp) {
    if (!tp) {
        return;
    }
    pthread_mutex_lock(&tp->mutex);
    atomic_store(&tp->stop, true);
    pthread_cond_broadcast(&tp->cond);
    pthread_mutex_unlock(&tp->mutex);
    for (int i = 1; i < tp->n; i++) {
        pthread_join(tp->workers[i - 1].thread, NULL);
    }
    pthread_mutex_destroy(&tp->mutex);
    pthread_cond_destroy(&tp->cond);
    free(tp->workers);
    free(tp);
}

int moqae_threadpool_n(const struct moqae_threadpool * tp) {
    return tp->n;
}

void moqae_threadpool_run(struct moqae_threadpool * tp, moqae_task_fn fn, void * arg) {
    if (tp->n == 1) {
        fn(arg, 0, 1);
        return;
    }
    tp->fn  = fn;
    tp->arg = arg;
    atomic_store(&tp->n_done, 0);
    pthread_mutex_lock(&tp->mutex);
    atomic_fetch_add_explicit(&tp->job_gen, 1, memory_order_release);
    pthread_cond_broadcast(&tp->cond);
    pthread_mutex_unlock(&tp->mutex);
    fn(arg, 0, tp->n);
    int spins = 0;
    while (atomic_load_explicit(&tp->n_done, memory_order_acquire) != tp->n - 1) {
        if (++spins < MOQAE_SPIN_BEFORE_YIELD) {
            MOQAE_PAUSE();
        } else {
            sched_yield();
        }
    }
}

void moqae_threadpool_barrier(struct moqae_threadpool * tp) {
    if (tp->n == 1) {
        return;
    }
    const int gen = atomic_load_explicit(&tp->bar_gen, memory_order_acquire);
    if (atomic_fetch_add_explicit(&tp->bar_count, 1, memory_order_acq_rel) == tp->n - 1) {
        atomic_store_explicit(&tp->bar_count, 0, memory_order_relaxed);
        atomic_fetch_add_explicit(&tp->bar_gen, 1, memory_order_release);
    } else {
        int spins = 0;
        while (atomic_load_explicit(&tp->bar_gen, memory_order_acquire) == gen) {
            if (++spins < MOQAE_SPIN_BEFORE_YIELD) {
                MOQAE_PAUSE();
            } else {
                sched_yield(); /* oversubscribed: let the thread we wait for run */
            }
        }
    }
}
