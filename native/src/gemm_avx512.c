/* AVX-512 VNNI GEMMs for prefill (compiled with -mavx512f -mavx512bw -mavx512vl -mavx512vnni).
 *
 * The weights of a panel of PANEL_ROWS rows are unpacked once into gemm_panel.h's layout as
 * unsigned bytes (T2: the codes 0..2; I8: q + 128), then every token block runs against the
 * panel: one 64-byte panel line is 16 rows x 4 k, multiplied by vpdpbusd with a broadcast
 * dword of one token's activations, so each accumulator lane is one (token, row) output.
 * A block is up to NT_MAX tokens x 32 rows = 2 * NT_MAX accumulators in registers.
 *
 * Correction for the unsigned weights: sum_k u[r][k] x[t][k] = w . x + bias * sum_k x[t][k]
 * with bias 1 (T2 codes) or 128 (I8), so bias * sum(x) is subtracted; sum(x) comes from a
 * vpdpbusd of ones with the same activation bytes, over the same k range.
 *
 * Tails: rows past the end are padded in the panel and masked on store; a token count that
 * is not a multiple of NT_MAX runs a smaller block; a K longer than the scratch holds runs in
 * k-chunks that accumulate into y; gemm_i8's K tail (K % 64) is added by the scalar loop.
 */
#include <immintrin.h>
#include <string.h>

#include "gemm_panel.h"

/* 8 tokens x 2 row groups = 16 accumulators: 12 measured slower (GCC spills around them). */
#define NT_MAX 8

typedef struct {
    const int8_t *x;    /* activations at the chunk's first k */
    int64_t ldx;
    int32_t *y;         /* output at the panel's first row */
    int64_t ldy;
    int64_t steps;      /* 64-wide k steps in this chunk */
    __mmask16 store[2]; /* valid rows of each row group */
    int32_t bias;       /* 1 (T2 codes) or 128 (I8 + 128) */
    bool accumulate;    /* add to y (a later k-chunk) instead of overwriting it */
} vnni_job;

static inline int32_t load_dword(const int8_t *p)
{
    int32_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* corr[t] = bias * sum of token t's activations over the chunk (a separate pass, so that
 * the main loop keeps all its registers for accumulators). */
static inline void token_sums(const int8_t *x, int64_t ldx, int64_t steps, int nt, int32_t bias,
                              int32_t *corr)
{
    const __m512i ones = _mm512_set1_epi8(1);
    for (int t = 0; t < nt; t++) {
        __m512i s = _mm512_setzero_si512();
        for (int64_t c = 0; c < steps; c++)
            s = _mm512_dpbusd_epi32(s, ones, _mm512_loadu_si512(x + t * ldx + c * TILE_K));
        corr[t] = bias * _mm512_reduce_add_epi32(s);
    }
}

/* nt tokens starting at x (row stride ldx) x 32 panel rows; nt is a constant after inlining. */
static inline __attribute__((always_inline)) void token_block(const vnni_job *job,
                                                              const int8_t *panel,
                                                              const int8_t *x, int32_t *y, int nt)
{
    int32_t corr[NT_MAX];
    token_sums(x, job->ldx, job->steps, nt, job->bias, corr);
    __m512i acc[NT_MAX][2];
    /* Fully unrolled token loops keep acc[][] in registers. */
#pragma GCC unroll 8
    for (int t = 0; t < nt; t++)
        acc[t][0] = acc[t][1] = _mm512_setzero_si512();
    for (int64_t c = 0; c < job->steps; c++) {
        const int8_t *lines = panel + 2 * c * TILE_BYTES;
        const int8_t *xc = x + c * TILE_K;
        for (int kk = 0; kk < TILE; kk++) {
            const __m512i w0 = _mm512_load_si512(lines + kk * TILE_K);
            const __m512i w1 = _mm512_load_si512(lines + TILE_BYTES + kk * TILE_K);
#pragma GCC unroll 8
            for (int t = 0; t < nt; t++) {
                const __m512i xb = _mm512_set1_epi32(load_dword(xc + t * job->ldx + 4 * kk));
                acc[t][0] = _mm512_dpbusd_epi32(acc[t][0], w0, xb);
                acc[t][1] = _mm512_dpbusd_epi32(acc[t][1], w1, xb);
            }
        }
    }
#pragma GCC unroll 8
    for (int t = 0; t < nt; t++) {
        int32_t *yt = y + t * job->ldy;
        for (int g = 0; g < 2; g++) {
            __m512i v = _mm512_sub_epi32(acc[t][g], _mm512_set1_epi32(corr[t]));
            if (job->accumulate)
                v = _mm512_add_epi32(v, _mm512_maskz_loadu_epi32(job->store[g], yt + g * TILE));
            _mm512_mask_storeu_epi32(yt + g * TILE, job->store[g], v);
        }
    }
}

#define TOKEN_BLOCK_CASE(nt)                                                                   \
    case nt:                                                                                   \
        token_block(job, panel, x, y, nt);                                                     \
        break;

static void run_panel(const vnni_job *job, const int8_t *panel, int64_t n)
{
    for (int64_t t = 0; t < n; t += NT_MAX) {
        const int8_t *x = job->x + t * job->ldx;
        int32_t *y = job->y + t * job->ldy;
        switch (n - t < NT_MAX ? (int)(n - t) : NT_MAX) {
            TOKEN_BLOCK_CASE(1) TOKEN_BLOCK_CASE(2) TOKEN_BLOCK_CASE(3) TOKEN_BLOCK_CASE(4)
            TOKEN_BLOCK_CASE(5) TOKEN_BLOCK_CASE(6) TOKEN_BLOCK_CASE(7) TOKEN_BLOCK_CASE(8)
                    }
    }
}

static void set_store_masks(vnni_job *job, int64_t nrows)
{
    for (int g = 0; g < 2; g++) {
        const int64_t left = nrows - g * TILE;
        const int rows = left <= 0 ? 0 : (int)(left < TILE ? left : TILE);
        job->store[g] = (__mmask16)((1u << rows) - 1u);
    }
}

void tern_gemm_t2_avx512vnni(const uint8_t *w, int64_t k, const int8_t *x, int64_t ldx,
                             int64_t n, int32_t *y, int64_t ldy, int64_t r0, int64_t r1,
                             void *scratch)
{
    if (n <= 0 || r1 <= r0)
        return;
    const int64_t row_bytes = tern_t2_row_bytes(k), nblocks = k / TERN_T2_BLOCK;
    const int64_t chunk_blocks = TERN_GEMM_SCRATCH_BYTES / (PANEL_ROWS * TERN_T2_BLOCK);
    int8_t *panel = scratch;
    for (int64_t r = r0; r < r1; r += PANEL_ROWS) {
        const int64_t nrows = r1 - r < PANEL_ROWS ? r1 - r : PANEL_ROWS;
        for (int64_t b0 = 0; b0 < nblocks; b0 += chunk_blocks) {
            const int64_t nb = nblocks - b0 < chunk_blocks ? nblocks - b0 : chunk_blocks;
            panel_unpack_t2(w + r * row_bytes, row_bytes, nrows, b0, nb, panel, 0);
            vnni_job job = {x + b0 * TERN_T2_BLOCK, ldx, y + r, ldy,
                            nb * TERN_T2_BLOCK / TILE_K, {0, 0}, 1, b0 > 0};
            set_store_masks(&job, nrows);
            run_panel(&job, panel, n);
        }
    }
}

void tern_gemm_i8_avx512vnni(const int8_t *q, int64_t k, const int8_t *x, int64_t ldx,
                             int64_t n, int32_t *y, int64_t ldy, int64_t r0, int64_t r1,
                             void *scratch)
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
    for (int64_t r = r0; r < r1; r += PANEL_ROWS) {
        const int64_t nrows = r1 - r < PANEL_ROWS ? r1 - r : PANEL_ROWS;
        for (int64_t s0 = 0; s0 * TILE_K < k64; s0 += chunk_steps) {
            const int64_t steps =
                k64 / TILE_K - s0 < chunk_steps ? k64 / TILE_K - s0 : chunk_steps;
            panel_unpack_i8(q + r * k, k, nrows, s0, steps, panel, 0x80);
            vnni_job job = {x + s0 * TILE_K, ldx, y + r, ldy, steps, {0, 0}, 128, s0 > 0};
            set_store_masks(&job, nrows);
            run_panel(&job, panel, n);
        }
    }
    if (k64 < k)
        gemm_i8_add_k_tail(q, k, k64, x, ldx, n, y, ldy, r0, r1);
}
