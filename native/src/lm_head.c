/* The default LM head: an int8 per-row copy of the head matrix made at load (layout.h "I8"),
 * half the bytes of f16 (Microsoft measured +0.06% perplexity for a Q8_0 head). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "error.h"
#include "model.h"

#define RELEASE_ROWS 1024 /* source rows between page releases (~5 MB of f16 at 2560) */

int32_t tern_build_int8_head(tern_model *m, bool release_source)
{
    const int64_t rows = m->n_vocab, cols = m->n_embd;
    const size_t bytes = ((size_t)(rows * cols) + 63) / 64 * 64;
    m->head_q = aligned_alloc(64, bytes);
    m->head_scale = malloc((size_t)rows * sizeof(float));
    float *row = malloc((size_t)cols * sizeof(float));
    if (!m->head_q || !m->head_scale || !row) {
        free(row);
        return tern_fail(TERN_ERR_NOMEM, "cannot allocate the int8 LM head (%zu bytes)", bytes);
    }
    m->alloc_bytes += bytes + (size_t)rows * sizeof(float);
    for (int64_t r = 0; r < rows; r++) {
        tern_dequant_row(m->head.type, m->head.data + r * m->head.row_bytes, cols, row);
        /* branch-free (vectorizable) max and non-finite test: exponent bits all ones */
        float amax = 0.0f;
        uint32_t bad = 0;
        for (int64_t k = 0; k < cols; k++) {
            uint32_t bits;
            memcpy(&bits, &row[k], 4);
            bad |= (bits & 0x7f800000u) == 0x7f800000u;
            const float a = fabsf(row[k]);
            amax = a > amax ? a : amax;
        }
        if (bad) {
            free(row);
            return tern_fail(TERN_ERR_FORMAT, "LM head: non-finite value in row %lld", (long long)r);
        }
        const float scale = amax / 127.0f;
        int8_t *q = m->head_q + r * cols;
        /* |row / scale| <= 127: the 1.5 * 2^23 trick rounds half to even (see ops.c) */
        const float magic = 12582912.0f, inv = scale > 0.0f ? 1.0f / scale : 0.0f;
        for (int64_t k = 0; k < cols; k++) {
            const float v = (row[k] * inv + magic) - magic;
            q[k] = (int8_t)(v < -127.0f ? -127.0f : (v > 127.0f ? 127.0f : v));
        }
        m->head_scale[r] = scale;
        /* Drop source pages as we go, so the f16 head and its int8 copy are never both
         * resident in full: that would be the load's peak RSS. */
        if (release_source && (r + 1) % RELEASE_ROWS == 0)
            tern_os_release_pages(m->head.data + (r + 1 - RELEASE_ROWS) * m->head.row_bytes,
                                  (uint64_t)(RELEASE_ROWS * m->head.row_bytes));
    }
    if (release_source)
        tern_os_release_pages(m->head.data, (uint64_t)(rows * m->head.row_bytes));
    free(row);
    return TERN_OK;
}
