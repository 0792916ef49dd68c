/* The synchronization protocol of a forward chunk: a sequence of phases, each a set of work
 * items taken from an atomic counter, ended by waiting until every item is *done* — not until
 * every thread has *arrived*. A thread that is preempted while holding no item (the common
 * case on a shared 2-vCPU host) therefore stalls nobody: the others take all the items and go
 * on; when it runs again it finds the phases it missed closed and skips them. A thread only
 * joins a phase that still has items, and a phase's input is final from the moment the
 * previous phase is done until this one is done, so whatever it reads is stable while it can
 * still take an item. The job's end (tern_pool_run) is the one point where all threads meet.
 *
 * Every thread walks the same sequence of phases, numbered by ts->phase, one counter pair per
 * phase in session->work. With a trace hook set, every phase also ends with a pool barrier, and
 * forward.c adds one after thread 0's trace calls (the traced buffers must not move while it
 * reads them): tracing is for tests, not speed. */
#ifndef TERN_PHASE_H
#define TERN_PHASE_H

#include "session.h"

typedef struct phase {
    int32_t id;
    int64_t items;
} phase;

/* Starts the next phase of this thread; true if it still has items to take (or tracing). */
static inline bool phase_open(tern_session *s, thread_scratch *ts, int64_t items, phase *ph)
{
    ph->id = ts->phase++;
    ph->items = items;
    return s->trace || atomic_load_explicit(&s->work[2 * ph->id], memory_order_relaxed) < items;
}

/* Takes the next item; false when none is left. */
static inline bool phase_take(tern_session *s, const phase *ph, int64_t *it)
{
    *it = atomic_fetch_add_explicit(&s->work[2 * ph->id], 1, memory_order_relaxed);
    return *it < ph->items;
}

/* Publishes an item's results (release: the waiters see its writes). */
static inline void phase_done(tern_session *s, const phase *ph)
{
    atomic_fetch_add_explicit(&s->work[2 * ph->id + 1], 1, memory_order_release);
}

/* Waits until every item of the phase is done. */
static inline void phase_wait(tern_session *s, const phase *ph)
{
    tern_wait_at_least(&s->work[2 * ph->id + 1], ph->items);
    if (s->trace)
        tern_pool_barrier(s->pool);
}

#endif
