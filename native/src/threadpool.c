#include "threadpool.h"

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdlib.h>

#include "error.h"
#include "tern.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define cpu_relax() _mm_pause()
#elif defined(__aarch64__)
#define cpu_relax() __asm__ volatile("yield")
#else
#define cpu_relax() ((void)0)
#endif

#define SPINS_BEFORE_YIELD 2000     /* pause loops, roughly 10-50 us */
#define YIELDS_BEFORE_SLEEP 20000   /* between jobs only: a token loop keeps workers hot */

struct tern_pool {
    int nth;
    pthread_t *threads;
    _Atomic uint64_t generation; /* bumped per job */
    _Atomic int quit;
    tern_job_fn fn;
    void *ctx;
    /* barrier */
    _Atomic int arrived;
    _Atomic uint64_t barrier_phase;
    /* idle sleep */
    pthread_mutex_t mutex;
    pthread_cond_t cond;
};

typedef struct worker_arg {
    tern_pool *pool;
    int ith;
} worker_arg;

static void wait_phase(_Atomic uint64_t *v, uint64_t seen)
{
    for (int i = 0; atomic_load_explicit(v, memory_order_acquire) == seen; i++) {
        if (i < SPINS_BEFORE_YIELD)
            cpu_relax();
        else
            sched_yield();
    }
}

void tern_wait_at_least(_Atomic int64_t *v, int64_t target)
{
    for (int i = 0; atomic_load_explicit(v, memory_order_acquire) < target; i++) {
        if (i < SPINS_BEFORE_YIELD)
            cpu_relax();
        else
            sched_yield();
    }
}

void tern_pool_barrier(tern_pool *p)
{
    if (p->nth == 1)
        return;
    const uint64_t phase = atomic_load_explicit(&p->barrier_phase, memory_order_acquire);
    if (atomic_fetch_add_explicit(&p->arrived, 1, memory_order_acq_rel) == p->nth - 1) {
        atomic_store_explicit(&p->arrived, 0, memory_order_relaxed);
        atomic_fetch_add_explicit(&p->barrier_phase, 1, memory_order_release);
        return;
    }
    wait_phase(&p->barrier_phase, phase);
}

static bool wait_job(tern_pool *p, uint64_t seen)
{
    for (int i = 0; i < SPINS_BEFORE_YIELD + YIELDS_BEFORE_SLEEP; i++) {
        if (atomic_load_explicit(&p->generation, memory_order_acquire) != seen)
            return !atomic_load(&p->quit);
        if (i < SPINS_BEFORE_YIELD)
            cpu_relax();
        else
            sched_yield();
    }
    pthread_mutex_lock(&p->mutex);
    while (atomic_load(&p->generation) == seen)
        pthread_cond_wait(&p->cond, &p->mutex);
    pthread_mutex_unlock(&p->mutex);
    return !atomic_load(&p->quit);
}

static void *worker_main(void *arg)
{
    worker_arg *w = arg;
    tern_pool *p = w->pool;
    const int ith = w->ith;
    free(w);
    uint64_t seen = 0;
    while (wait_job(p, seen)) {
        seen = atomic_load(&p->generation);
        p->fn(p->ctx, ith, p->nth);
        tern_pool_barrier(p); /* the job's end */
    }
    return NULL;
}

static void wake_all(tern_pool *p)
{
    pthread_mutex_lock(&p->mutex);
    atomic_fetch_add(&p->generation, 1);
    pthread_cond_broadcast(&p->cond);
    pthread_mutex_unlock(&p->mutex);
}

tern_pool *tern_pool_create(int nth)
{
    tern_pool *p = calloc(1, sizeof *p);
    if (!p) {
        tern_fail(TERN_ERR_NOMEM, "thread pool: out of memory");
        return NULL;
    }
    p->nth = nth < 1 ? 1 : nth;
    pthread_mutex_init(&p->mutex, NULL);
    pthread_cond_init(&p->cond, NULL);
    p->threads = calloc((size_t)p->nth, sizeof(pthread_t));
    if (!p->threads) {
        tern_pool_free(p);
        tern_fail(TERN_ERR_NOMEM, "thread pool: out of memory");
        return NULL;
    }
    for (int i = 1; i < p->nth; i++) {
        worker_arg *w = malloc(sizeof *w);
        if (w) {
            w->pool = p;
            w->ith = i;
        }
        if (!w || pthread_create(&p->threads[i], NULL, worker_main, w) != 0) {
            free(w);
            p->nth = i; /* the threads started so far are joined by free */
            tern_pool_free(p);
            tern_fail(TERN_ERR_NOMEM, "thread pool: cannot start thread %d", i);
            return NULL;
        }
    }
    return p;
}

void tern_pool_run(tern_pool *p, tern_job_fn fn, void *ctx)
{
    p->fn = fn;
    p->ctx = ctx;
    if (p->nth > 1)
        wake_all(p);
    fn(ctx, 0, p->nth);
    tern_pool_barrier(p);
}

int tern_pool_size(const tern_pool *p) { return p->nth; }

void tern_pool_free(tern_pool *p)
{
    if (!p)
        return;
    if (p->threads) {
        atomic_store(&p->quit, 1);
        if (p->nth > 1)
            wake_all(p);
        for (int i = 1; i < p->nth; i++)
            pthread_join(p->threads[i], NULL);
    }
    pthread_mutex_destroy(&p->mutex);
    pthread_cond_destroy(&p->cond);
    free(p->threads);
    free(p);
}
