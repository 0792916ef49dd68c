/* The default LM head: an int8 per-row copy of the head matrix made at load (layout.h "I8"),
 * half the bytes of f16 (Microsoft measured +0.06% perplexity for a Q8_0 head). Built by every
 * CPU of the machine (a temporary pool), a block of rows per work item. */
#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "error.h"
#include "model.h"
#include "threadpool.h"

#define BLOCK_ROWS 1024 /* rows per work item (~5 MB of f16 at 2560) */
#define MAX_THREADS 8

typedef struct head_job {
    tern_model *m;
    bool release_source;
    _Atomic int64_t next;
    _Atomic int64_t bad_row; /* first non-finite row found, or -1; -2: out of memory */
} head_job;

/* One row: false if it holds a non-finite value. */
static bool quantize_row(const float *row, int64_t cols, int8_t *q, float *scale_out)
{
    float amax = 0.0f;
    uint32_t bad = 0; /* branch-free (vectorizable): exponent bits all ones */
    for (int64_t k = 0; k < cols; k++) {
        uint32_t bits;
        memcpy(&bits, &row[k], 4);
        bad |= (bits & 0x7f800000u) == 0x7f800000u;
        const float a = fabsf(row[k]);
        amax = a > amax ? a : amax;
    }
    const float scale = amax / 127.0f, inv = scale > 0.0f ? 1.0f / scale : 0.0f;
    const float magic = 12582912.0f; /* |row / scale| <= 127: rounds half to even (ops.c) */
    for (int64_t k = 0; k < cols; k++) {
        float v = (row[k] * inv + magic) - magic;
        /* NaN fails both tests (converting it to int is undefined); its row is refused */
        v = v >= -127.0f ? v : -127.0f;
        q[k] = (int8_t)(v <= 127.0f ? v : 127.0f);
    }
    *scale_out = scale;
    return !bad;
}

static void head_work(void *ctx, int ith, int nth)
{
    head_job *j = ctx;
    tern_model *m = j->m;
    const int64_t rows = m->n_vocab, cols = m->n_embd, rb = m->head.row_bytes;
    float *row = malloc((size_t)cols * sizeof(float));
    if (!row) {
        atomic_store(&j->bad_row, -2);
        return;
    }
    for (int64_t b = atomic_fetch_add(&j->next, 1); b * BLOCK_ROWS < rows; b = atomic_fetch_add(&j->next, 1)) {
        const int64_t r0 = b * BLOCK_ROWS, r1 = r0 + BLOCK_ROWS < rows ? r0 + BLOCK_ROWS : rows;
        for (int64_t r = r0; r < r1; r++) {
            tern_dequant_row(m->head.type, m->head.data + r * rb, cols, row);
            if (!quantize_row(row, cols, m->head_q + r * cols, &m->head_scale[r])) {
                int64_t none = -1;
                atomic_compare_exchange_strong(&j->bad_row, &none, r);
            }
        }
        /* Drop source pages as we go, so the f16 head and its int8 copy are never both
         * resident in full: that would be the load's peak RSS. */
        if (j->release_source)
            tern_os_release_pages(m->head.data + r0 * rb, (uint64_t)((r1 - r0) * rb));
    }
    free(row);
    (void)ith, (void)nth;
}

int32_t tern_build_int8_head(tern_model *m, bool release_source)
{
    const int64_t rows = m->n_vocab, cols = m->n_embd;
    const size_t bytes = ((size_t)(rows * cols) + 63) / 64 * 64;
    m->head_q = aligned_alloc(64, bytes);
    m->head_scale = malloc((size_t)rows * sizeof(float));
    if (!m->head_q || !m->head_scale)
        return tern_fail(TERN_ERR_NOMEM, "cannot allocate the int8 LM head (%zu bytes)", bytes);
    m->alloc_bytes += bytes + (size_t)rows * sizeof(float);
    const int cpus = tern_os_cpu_count();
    tern_pool *pool = tern_pool_create(cpus < MAX_THREADS ? cpus : MAX_THREADS);
    if (!pool)
        return TERN_ERR_NOMEM;
    head_job j = {.m = m, .release_source = release_source};
    atomic_init(&j.next, 0);
    atomic_init(&j.bad_row, -1);
    tern_pool_run(pool, head_work, &j);
    tern_pool_free(pool);
    const int64_t bad = atomic_load(&j.bad_row);
    if (bad == -2)
        return tern_fail(TERN_ERR_NOMEM, "LM head: out of memory");
    if (bad >= 0)
        return tern_fail(TERN_ERR_FORMAT, "LM head: non-finite value in row %lld", (long long)bad);
    return TERN_OK;
}
