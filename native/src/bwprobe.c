/* Memory read-bandwidth probe: the physical limit that decode (bound by bytes per token) is
 * measured against, taken in the same process as the benchmark.
 *
 * The buffer (larger than the last-level cache) is read in bursts of BURST_BYTES; in each
 * burst every thread reads its own contiguous share of the next slice of the buffer, so no
 * burst hits data a previous burst left in the cache (once the buffer is larger than L3).
 * Each burst is timed from a common start to the last thread's finish; the result is the
 * median burst. On a shared host a preempted vCPU stretches a few bursts, not the median.
 *
 * Loads are the widest the CPU runs (AVX-512, else AVX2, else plain 64-bit), chosen at run
 * time with per-function target attributes, so this file needs no -m flags of its own.
 */
#if !defined(_WIN32) && !defined(_POSIX_C_SOURCE)
#define _POSIX_C_SOURCE 200809L /* clock_gettime under -std=c11 */
#endif
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "error.h"
#include "kernels.h"
#include "tern.h"

#if defined(_WIN32)
#include <windows.h>
#else
#include <pthread.h>
#include <sched.h>
#include <time.h>
#endif

#define BURST_BYTES ((uint64_t)64 << 20)
#define MAX_THREADS 256
#define MAX_BURSTS 4096

/* ---- time and threads (the only OS-specific parts) ---- */

static double now_seconds(void)
{
#if defined(_WIN32)
    LARGE_INTEGER f, c;
    QueryPerformanceFrequency(&f);
    QueryPerformanceCounter(&c);
    return (double)c.QuadPart / (double)f.QuadPart;
#else
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
#endif
}

static void yield_cpu(void)
{
#if defined(_WIN32)
    SwitchToThread();
#else
    sched_yield();
#endif
}

/* ---- read loops ---- */

typedef uint64_t (*read_fn)(const uint8_t *p, uint64_t n);

static uint64_t read_plain(const uint8_t *p, uint64_t n)
{
    const uint64_t *q = (const uint64_t *)p;
    uint64_t a = 0, b = 0, c = 0, d = 0;
    for (uint64_t i = 0; i + 4 <= n / 8; i += 4) {
        a |= q[i], b |= q[i + 1], c |= q[i + 2], d |= q[i + 3];
    }
    return a | b | c | d;
}

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
#include <immintrin.h>

__attribute__((target("avx2"))) static uint64_t read_avx2(const uint8_t *p, uint64_t n)
{
    __m256i a = _mm256_setzero_si256(), b = a, c = a, d = a;
    for (uint64_t i = 0; i + 128 <= n; i += 128) {
        a = _mm256_or_si256(a, _mm256_load_si256((const __m256i *)(p + i)));
        b = _mm256_or_si256(b, _mm256_load_si256((const __m256i *)(p + i + 32)));
        c = _mm256_or_si256(c, _mm256_load_si256((const __m256i *)(p + i + 64)));
        d = _mm256_or_si256(d, _mm256_load_si256((const __m256i *)(p + i + 96)));
    }
    const __m256i v = _mm256_or_si256(_mm256_or_si256(a, b), _mm256_or_si256(c, d));
    return (uint64_t)_mm256_extract_epi64(v, 0) | (uint64_t)_mm256_extract_epi64(v, 3);
}

__attribute__((target("avx512f"))) static uint64_t read_avx512(const uint8_t *p, uint64_t n)
{
    __m512i a = _mm512_setzero_si512(), b = a, c = a, d = a;
    for (uint64_t i = 0; i + 256 <= n; i += 256) {
        a = _mm512_or_si512(a, _mm512_load_si512((const void *)(p + i)));
        b = _mm512_or_si512(b, _mm512_load_si512((const void *)(p + i + 64)));
        c = _mm512_or_si512(c, _mm512_load_si512((const void *)(p + i + 128)));
        d = _mm512_or_si512(d, _mm512_load_si512((const void *)(p + i + 192)));
    }
    const __m512i v = _mm512_or_si512(_mm512_or_si512(a, b), _mm512_or_si512(c, d));
    return (uint64_t)_mm512_reduce_or_epi64(v);
}

static read_fn pick_reader(void)
{
    const uint32_t f = tern_cpu_features();
    if (f & TERN_CPU_AVX512)
        return read_avx512;
    if (f & TERN_CPU_AVX2)
        return read_avx2;
    return read_plain;
}
#else
static read_fn pick_reader(void) { return read_plain; }
#endif

/* ---- the probe ---- */

typedef struct {
    const uint8_t *buf;
    uint64_t slices;       /* BURST_BYTES slices in the buffer */
    uint64_t share;        /* bytes per thread per burst (a multiple of 256) */
    int threads, bursts;
    read_fn reader;
    atomic_int arrived;    /* threads done with the current burst */
    atomic_int generation; /* bumped by the caller to start a burst; -1 ends the workers */
    _Atomic uint64_t sink; /* keeps the loads alive */
} probe;

static void read_share(probe *p, int burst, int tid)
{
    const uint64_t off = (uint64_t)burst % p->slices * BURST_BYTES + (uint64_t)tid * p->share;
    atomic_fetch_or_explicit(&p->sink, p->reader(p->buf + off, p->share), memory_order_relaxed);
}

/* Spin briefly, then yield: the other vCPU may be preempted for a whole time slice. */
static void wait_for(atomic_int *v, int until_not)
{
    for (int spins = 0; atomic_load_explicit(v, memory_order_acquire) == until_not; spins++)
        if (spins > 1000)
            yield_cpu();
}

static void worker_loop(probe *p, int tid)
{
    for (int gen = 0;;) {
        wait_for(&p->generation, gen);
        gen = atomic_load_explicit(&p->generation, memory_order_acquire);
        if (gen < 0)
            return;
        read_share(p, gen - 1, tid);
        atomic_fetch_add_explicit(&p->arrived, 1, memory_order_acq_rel);
    }
}

#if defined(_WIN32)
typedef HANDLE thread_t;
typedef struct { probe *p; int tid; } worker_arg;
static DWORD WINAPI worker_main(LPVOID a)
{
    worker_loop(((worker_arg *)a)->p, ((worker_arg *)a)->tid);
    return 0;
}
static bool thread_start(thread_t *t, worker_arg *a)
{
    *t = CreateThread(NULL, 0, worker_main, a, 0, NULL);
    return *t != NULL;
}
static void thread_join(thread_t t) { WaitForSingleObject(t, INFINITE), CloseHandle(t); }
#else
typedef pthread_t thread_t;
typedef struct { probe *p; int tid; } worker_arg;
static void *worker_main(void *a)
{
    worker_loop(((worker_arg *)a)->p, ((worker_arg *)a)->tid);
    return NULL;
}
static bool thread_start(thread_t *t, worker_arg *a) { return pthread_create(t, NULL, worker_main, a) == 0; }
static void thread_join(thread_t t) { pthread_join(t, NULL); }
#endif

static int cmp_double(const void *a, const void *b)
{
    const double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Runs the bursts with the workers already started; fills seconds[0..bursts). */
static void run_bursts(probe *p, double *seconds)
{
    for (int b = 0; b < p->bursts; b++) {
        atomic_store_explicit(&p->arrived, 0, memory_order_release);
        const double t0 = now_seconds();
        atomic_store_explicit(&p->generation, b + 1, memory_order_release);
        read_share(p, b, 0);
        for (int spins = 0; atomic_load_explicit(&p->arrived, memory_order_acquire) < p->threads - 1;
             spins++)
            if (spins > 1000)
                yield_cpu();
        seconds[b] = now_seconds() - t0;
    }
}

TERN_API int32_t tern_bandwidth_probe(uint64_t bytes, int32_t threads, int32_t reps,
                                      double *gb_per_s)
{
    if (!gb_per_s || threads < 1 || threads > MAX_THREADS || reps < 1 || bytes < BURST_BYTES ||
        bytes > ((uint64_t)1 << 40))
        return tern_fail(TERN_ERR_INVALID,
                         "bandwidth probe: need 1..%d threads, reps >= 1, %llu MiB..1 TiB",
                         MAX_THREADS, (unsigned long long)(BURST_BYTES >> 20));
    probe p;
    memset(&p, 0, sizeof p);
    p.slices = bytes / BURST_BYTES;
    p.threads = threads;
    p.share = (BURST_BYTES / (uint64_t)threads) & ~(uint64_t)255;
    const uint64_t total = p.slices * (uint64_t)reps, size = p.slices * BURST_BYTES;
    p.bursts = (int)(total > MAX_BURSTS ? MAX_BURSTS : total);
    p.reader = pick_reader();
    uint8_t *buf = aligned_alloc(4096, size);
    double *seconds = malloc(sizeof(double) * (size_t)p.bursts);
    thread_t *tids = malloc(sizeof(thread_t) * (size_t)threads);
    worker_arg *args = malloc(sizeof(worker_arg) * (size_t)threads);
    int started = 0;
    int32_t st = TERN_OK;
    if (!buf || !seconds || !tids || !args) {
        st = tern_fail(TERN_ERR_NOMEM, "bandwidth probe: cannot allocate %llu MiB",
                       (unsigned long long)(size >> 20));
        goto done;
    }
    memset(buf, 1, size); /* real pages, not the shared zero page */
    p.buf = buf;
    for (; started < threads - 1; started++) {
        args[started] = (worker_arg){&p, started + 1};
        if (!thread_start(&tids[started], &args[started])) {
            st = tern_fail(TERN_ERR_NOMEM, "bandwidth probe: cannot start thread %d", started + 1);
            break;
        }
    }
    if (st == TERN_OK) {
        run_bursts(&p, seconds);
        qsort(seconds, (size_t)p.bursts, sizeof(double), cmp_double);
        const double median = seconds[p.bursts / 2];
        *gb_per_s = (double)p.share * (double)threads / median / 1e9;
    }
    atomic_store_explicit(&p.generation, -1, memory_order_release);
    for (int i = 0; i < started; i++)
        thread_join(tids[i]);
done:
    free(buf);
    free(seconds);
    free(tids);
    free(args);
    return st;
}
