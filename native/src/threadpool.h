/* A persistent pool: n threads (the caller is thread 0) run one job function together and
 * meet at its end. Inside a job, forward.c's phases wait on item counts (phase.h) rather than
 * on barriers. Waits spin briefly, then yield (on this shared 2-vCPU host the other thread is
 * often preempted), and idle workers sleep on a condvar. */
#ifndef TERN_THREADPOOL_H
#define TERN_THREADPOOL_H

#include <stdatomic.h>
#include <stdint.h>

typedef struct tern_pool tern_pool;
typedef void (*tern_job_fn)(void *ctx, int ith, int nth);

/* NULL on failure (tern_last_error set). */
tern_pool *tern_pool_create(int nth);
void tern_pool_free(tern_pool *pool);
int tern_pool_size(const tern_pool *pool);

/* Runs fn(ctx, ith, nth) on every thread; returns when all have finished. */
void tern_pool_run(tern_pool *pool, tern_job_fn fn, void *ctx);

/* Spin briefly, then yield, until *v >= target (acquire). */
void tern_wait_at_least(_Atomic int64_t *v, int64_t target);

/* Inside a job: wait until every thread of the pool has arrived. */
void tern_pool_barrier(tern_pool *pool);

#endif
