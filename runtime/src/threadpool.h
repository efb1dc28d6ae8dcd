/*
 * threadpool.h — a fixed pool of worker threads kept alive for a context's lifetime. The caller is
 * thread 0 of every job: moqae_threadpool_run(fn) runs fn(arg, ith, nth) on all nth threads and
 * returns when all are done. Inside a job, moqae_threadpool_barrier() synchronises the nth threads
 * (spinning), so a whole forward pass is one job with a barrier between ops (as ggml's graph
 * compute), not one wake-up per op. Idle workers spin briefly, then sleep on a condition variable.
 */
#ifndef MOQAE_THREADPOOL_H
#define MOQAE_THREADPOOL_H

struct moqae_threadpool;

typedef void (*moqae_task_fn)(void * arg, int ith, int nth);

/* n_threads >= 1 (the caller counts as one). */
int  moqae_threadpool_new(int n_threads, struct moqae_threadpool ** out);
void moqae_threadpool_free(struct moqae_threadpool * tp); /* accepts NULL; joins workers */
int  moqae_threadpool_n(const struct moqae_threadpool * tp);
void moqae_threadpool_run(struct moqae_threadpool * tp, moqae_task_fn fn, void * arg);
void moqae_threadpool_barrier(struct moqae_threadpool * tp);

#endif /* MOQAE_THREADPOOL_H */
