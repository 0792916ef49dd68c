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

#include "kernels.h"

#define TILE 16                  /* rows of an A/B/C tile */
#define TILE_K 64                /* int8 k per tile row */
#define TILE_BYTES (TILE * TILE_K)
#define PANEL_ROWS 32            /* two B tiles side by side */

static_assert(TERN_T2_BLOCK == 2 * TILE_K, "a T2 block fills two B tiles");
static_assert(TERN_GEMM_SCRATCH_BYTES >= PANEL_ROWS * TERN_T2_BLOCK,
              "scratch holds at least one k-chunk of a panel");

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

/* ---- T2 unpacking ----
 * Gather dword m (packed bytes 4m..4m+3) of one block from 16 rows: byte j of lane n is
 * packed byte 4m + j of row n, whose 2-bit field f is the code of weight 4m + j + 32f.
 * Field f therefore fills B tile f / 2 of the block, tile row m + 8 (f % 2), exactly. */
static void unpack_t2_block(const uint8_t *blk, int64_t row_bytes, int rows, int8_t *tiles)
{
    const __m512i vindex = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9,
                                                                10, 11, 12, 13, 14, 15),
                                              _mm512_set1_epi32((int)row_bytes));
    const __mmask16 valid = (__mmask16)((1u << rows) - 1u);
    const __m512i zero_codes = _mm512_set1_epi8(0x55); /* code 1 (w = 0) in every field */
    const __m512i three = _mm512_set1_epi8(3), one = _mm512_set1_epi8(1);
    for (int m = 0; m < 8; m++) {
        const __m512i d = _mm512_mask_i32gather_epi32(zero_codes, valid, vindex, blk + 4 * m, 1);
        for (int f = 0; f < 4; f++) {
            const __m512i c = _mm512_and_si512(_mm512_srli_epi16(d, 6 - 2 * f), three);
            int8_t *dst = tiles + (f / 2) * 2 * TILE_BYTES + (m + 8 * (f % 2)) * TILE_K;
            _mm512_store_si512((__m512i *)dst, _mm512_sub_epi8(c, one));
        }
    }
}

/* Unpack rows [0, nrows) of the panel, blocks [b0, b0 + nb), into B tiles. */
static void unpack_t2_panel(const uint8_t *w, int64_t row_bytes, int64_t nrows, int64_t b0,
                            int64_t nb, int8_t *panel)
{
    for (int g = 0; g * TILE < nrows; g++) {
        const int64_t left = nrows - g * TILE;
        const int rows = (int)(left < TILE ? left : TILE);
        const uint8_t *base = w + (int64_t)g * TILE * row_bytes;
        for (int64_t b = 0; b < nb; b++)
            unpack_t2_block(base + (b0 + b) * TERN_T2_BLOCK_BYTES, row_bytes, rows,
                            panel + (4 * b + g) * TILE_BYTES);
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
            unpack_t2_panel(w + r * row_bytes, row_bytes, nrows, b0, nb, panel);
            const panel_job job = {x + b0 * TERN_T2_BLOCK, ldx, n, y + r, ldy, nrows,
                                   nb * TERN_T2_BLOCK / TILE_K, b0 > 0};
            run_panel(&job, panel, &shape);
        }
    }
    _tile_release();
}

/* ---- I8 (LM-head copy) ----
 * Gather dword kk of 16 rows straight into B tile row kk; rows and k past the end read 0. */
static void unpack_i8_step(const int8_t *q, int64_t k, int rows, int8_t *tile)
{
    const __m512i vindex = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9,
                                                                10, 11, 12, 13, 14, 15),
                                              _mm512_set1_epi32((int)k));
    const __mmask16 valid = (__mmask16)((1u << rows) - 1u);
    for (int kk = 0; kk < TILE; kk++) {
        const __m512i d =
            _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), valid, vindex, q + 4 * kk, 1);
        _mm512_store_si512((__m512i *)(tile + kk * TILE_K), d);
    }
}

static void add_k_tail_i8(const int8_t *q, int64_t k, int64_t k0, const int8_t *x, int64_t ldx,
                          int64_t n, int32_t *y, int64_t ldy, int64_t r0, int64_t r1)
{
    for (int64_t t = 0; t < n; t++)
        for (int64_t r = r0; r < r1; r++) {
            int32_t acc = 0;
            for (int64_t i = k0; i < k; i++)
                acc += (int32_t)q[r * k + i] * x[t * ldx + i];
            y[t * ldy + r] += acc;
        }
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
            for (int g = 0; g * TILE < nrows; g++) {
                const int64_t left = nrows - g * TILE;
                const int rows = (int)(left < TILE ? left : TILE);
                const int8_t *base = q + (r + (int64_t)g * TILE) * k + s0 * TILE_K;
                for (int64_t c = 0; c < steps; c++)
                    unpack_i8_step(base + c * TILE_K, k, rows, panel + (2 * c + g) * TILE_BYTES);
            }
            const panel_job job = {x + s0 * TILE_K, ldx, n, y + r, ldy, nrows, steps, s0 > 0};
            run_panel(&job, panel, &shape);
        }
    }
    _tile_release();
    if (k64 < k)
        add_k_tail_i8(q, k, k64, x, ldx, n, y, ldy, r0, r1);
}
