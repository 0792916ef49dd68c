/* AMX-INT8 GEMMs for prefill (compiled with -mamx-tile -mamx-int8 -mavx512f -mavx512bw
 * -mavx512vl; every CPU with AMX-INT8 has those AVX-512 subsets).
 *
 * C (tokens x rows, int32) += A (tokens x 64 int8 activations, read in place from x)
 *                            * B (64 x rows weights, in the tile "VNNI" layout).
 * A B tile covers 16 rows and 64 k: tile row kk holds, for each of the 16 rows n, the 4
 * weights k = 4kk..4kk+3 as 4 consecutive bytes (n * 4 + j). The weights of a panel of
 * PANEL_ROWS rows are unpacked once into that layout (int8, in the caller's scratch, so in
 * L2), then every token tile of the call runs against the panel. 2 x 2 register blocking:
 * tiles 0-3 accumulate C for 32 tokens x 32 rows, tiles 4-5 hold A, 6-7 hold B.
 *
 * Tails: a token or row count that is not a multiple of 16 gets a tile configuration with
 * fewer rows (A, C) or fewer column bytes (B, C), so loads and stores touch only valid data;
 * no size is handed elsewhere. A K longer than the scratch holds runs in k-chunks that
 * accumulate into y. gemm_i8's K tail (K % 64) is added by the scalar loop.
 */
#include <immintrin.h>
#include <string.h>

#include "gemm_panel.h"

/* ---- tile configuration ---- */

typedef struct {
    uint8_t palette;
    uint8_t start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

/* Tiles 0..3: C[i][j] = tokens of A i x rows of B j (C index 2i + j); 4, 5: A; 6, 7: B.
 * m[i]: token rows of A tile i (0 = unused); nr[j]: weight rows of B tile j (0 = unused). */
static void configure(const int m[2], const int nr[2])
{
    tile_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int i = 0; i < 2; i++) {
        for (int j = 0; j < 2; j++) {
            const bool used = m[i] > 0 && nr[j] > 0;
            cfg.rows[2 * i + j] = used ? (uint8_t)m[i] : 0;
            cfg.colsb[2 * i + j] = used ? (uint16_t)(4 * nr[j]) : 0;
        }
        cfg.rows[4 + i] = (uint8_t)m[i];
        cfg.colsb[4 + i] = m[i] ? TILE_K : 0;
        cfg.rows[6 + i] = nr[i] ? TILE : 0;
        cfg.colsb[6 + i] = (uint16_t)(4 * nr[i]);
    }
    _tile_loadconfig(&cfg);
}

typedef struct {
    int m[2], nr[2];
} tile_shape;

static void ensure_shape(tile_shape *cur, int m0, int m1, int n0, int n1)
{
    if (cur->m[0] == m0 && cur->m[1] == m1 && cur->nr[0] == n0 && cur->nr[1] == n1)
        return;
    cur->m[0] = m0, cur->m[1] = m1, cur->nr[0] = n0, cur->nr[1] = n1;
    configure(cur->m, cur->nr);
}

/* ---- the tile loop: all tokens against one unpacked panel ---- */

typedef struct {
    const int8_t *x;    /* activations at the chunk's first k */
    int64_t ldx, n;
    int32_t *y;         /* output at the panel's first row */
    int64_t ldy;
    int64_t nrows;      /* valid rows in the panel (1..PANEL_ROWS) */
    int64_t chunks;     /* 64-wide k steps in this chunk */
    bool accumulate;    /* add to y (a later k-chunk) instead of overwriting it */
} panel_job;

/* panel: chunks x 2 B tiles of TILE_BYTES each, B tile j of step c at (2c + j) * TILE_BYTES. */
static void run_panel(const panel_job *job, const int8_t *panel, tile_shape *shape)
{
    const int n0 = (int)(job->nrows < TILE ? job->nrows : TILE);
    const int n1 = (int)(job->nrows - n0);
    const size_t sx = (size_t)job->ldx, sy = (size_t)job->ldy * sizeof(int32_t);
    for (int64_t t = 0; t < job->n; t += 2 * TILE) {
        const int64_t left = job->n - t;
        const int m0 = (int)(left < TILE ? left : TILE);
        const int m1 = (int)(left - m0 < TILE ? left - m0 : TILE);
        ensure_shape(shape, m0, m1, n0, n1);
        int32_t *y0 = job->y + t * job->ldy, *y1 = y0 + (int64_t)TILE * job->ldy;
        if (job->accumulate) {
            _tile_loadd(0, y0, sy);
            if (n1) _tile_loadd(1, y0 + TILE, sy);
            if (m1) _tile_loadd(2, y1, sy);
            if (m1 && n1) _tile_loadd(3, y1 + TILE, sy);
        } else {
            _tile_zero(0);
            if (n1) _tile_zero(1);
            if (m1) _tile_zero(2);
            if (m1 && n1) _tile_zero(3);
        }
        const int8_t *x0 = job->x + t * job->ldx, *x1 = x0 + (int64_t)TILE * job->ldx;
        for (int64_t c = 0; c < job->chunks; c++) {
            const int8_t *b = panel + 2 * c * TILE_BYTES;
            _tile_loadd(4, x0 + c * TILE_K, sx);
            _tile_loadd(6, b, TILE_K);
            _tile_dpbssd(0, 4, 6);
            if (n1) {
                _tile_loadd(7, b + TILE_BYTES, TILE_K);
                _tile_dpbssd(1, 4, 7);
            }
            if (m1) {
                _tile_loadd(5, x1 + c * TILE_K, sx);
                _tile_dpbssd(2, 5, 6);
                if (n1) _tile_dpbssd(3, 5, 7);
            }
        }
        _tile_stored(0, y0, sy);
        if (n1) _tile_stored(1, y0 + TILE, sy);
        if (m1) _tile_stored(2, y1, sy);
        if (m1 && n1) _tile_stored(3, y1 + TILE, sy);
    }
}

void tern_gemm_t2_amx(const uint8_t *w, int64_t k, const int8_t *x, int64_t ldx, int64_t n,
                      int32_t *y, int64_t ldy, int64_t r0, int64_t r1, void *scratch)
{
    if (n <= 0 || r1 <= r0)
        return;
    const int64_t row_bytes = tern_t2_row_bytes(k), nblocks = k / TERN_T2_BLOCK;
    const int64_t chunk_blocks = TERN_GEMM_SCRATCH_BYTES / (PANEL_ROWS * TERN_T2_BLOCK);
    int8_t *panel = scratch;
    tile_shape shape = {{-1, -1}, {-1, -1}};
    for (int64_t r = r0; r < r1; r += PANEL_ROWS) {
        const int64_t nrows = r1 - r < PANEL_ROWS ? r1 - r : PANEL_ROWS;
        for (int64_t b0 = 0; b0 < nblocks; b0 += chunk_blocks) {
            const int64_t nb = nblocks - b0 < chunk_blocks ? nblocks - b0 : chunk_blocks;
            panel_unpack_t2(w + r * row_bytes, row_bytes, nrows, b0, nb, panel, 1);
            const panel_job job = {x + b0 * TERN_T2_BLOCK, ldx, n, y + r, ldy, nrows,
                                   nb * TERN_T2_BLOCK / TILE_K, b0 > 0};
            run_panel(&job, panel, &shape);
        }
    }
    _tile_release();
}

void tern_gemm_i8_amx(const int8_t *q, int64_t k, const int8_t *x, int64_t ldx, int64_t n,
                      int32_t *y, int64_t ldy, int64_t r0, int64_t r1, void *scratch)
{
    if (n <= 0 || r1 <= r0)
        return;
    const int64_t k64 = k - k % TILE_K;
    if (k64 == 0) {
        tern_gemm_i8_scalar(q, k, x, ldx, n, y, ldy, r0, r1, scratch);
        return;
    }
    const int64_t chunk_steps = TERN_GEMM_SCRATCH_BYTES / (2 * TILE_BYTES);
    int8_t *panel = scratch;
    tile_shape shape = {{-1, -1}, {-1, -1}};
    for (int64_t r = r0; r < r1; r += PANEL_ROWS) {
        const int64_t nrows = r1 - r < PANEL_ROWS ? r1 - r : PANEL_ROWS;
        for (int64_t s0 = 0; s0 * TILE_K < k64; s0 += chunk_steps) {
            const int64_t steps =
                k64 / TILE_K - s0 < chunk_steps ? k64 / TILE_K - s0 : chunk_steps;
            panel_unpack_i8(q + r * k, k, nrows, s0, steps, panel, 0);
            const panel_job job = {x + s0 * TILE_K, ldx, n, y + r, ldy, nrows, steps, s0 > 0};
            run_panel(&job, panel, &shape);
        }
    }
    _tile_release();
    if (k64 < k)
        gemm_i8_add_k_tail(q, k, k64, x, ldx, n, y, ldy, r0, r1);
}
