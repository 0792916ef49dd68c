/* Weight-panel unpacking shared by the prefill GEMMs (gemm_avx512.c, gemm_amx.c; both are
 * compiled with at least AVX-512 F/BW/VL). A panel holds PANEL_ROWS rows of a matrix as int8
 * in the AMX B-tile ("VNNI") layout, one 64-k step at a time:
 *
 *   step c, row group g (16 rows): TILE_BYTES at (2c + g) * TILE_BYTES;
 *   in it, byte kk * 64 + 4n + j = weight (row 16g + n, k = 64c + 4kk + j).
 *
 * AMX loads a group as a B tile; AVX-512 VNNI loads one 64-byte line (16 rows x 4 k) and
 * multiplies it with a broadcast dword of activations. Rows past the end read as weight 0.
 */
#ifndef TERN_GEMM_PANEL_H
#define TERN_GEMM_PANEL_H

#include <immintrin.h>

#include "kernels.h"

#define TILE 16                  /* rows of a B tile */
#define TILE_K 64                /* int8 k per tile row */
#define TILE_BYTES (TILE * TILE_K)
#define PANEL_ROWS 32            /* two row groups side by side */

static_assert(TERN_T2_BLOCK == 2 * TILE_K, "a T2 block fills two k-steps");
static_assert(TERN_GEMM_SCRATCH_BYTES >= PANEL_ROWS * TERN_T2_BLOCK,
              "scratch holds at least one block of a panel");

static inline __m512i panel_row_offsets(int64_t row_stride)
{
    return _mm512_mullo_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
        _mm512_set1_epi32((int)row_stride));
}

/* One T2 block (128 k) of `rows` (1..16) rows starting at blk, into steps 2b and 2b + 1 at
 * dst (= the group's tile of step 2b). code_bias is subtracted from every 2-bit code: 1 gives
 * signed weights (AMX tdpbssd), 0 the unsigned codes (vpdpbusd, corrected by -sum(x)).
 *
 * Why the gather works: dword m of a block holds packed bytes 4m..4m+3; byte j's 2-bit field
 * f is the code of weight 4m + j + 32f, i.e. step f / 2, tile row m + 8 (f % 2), byte 4n + j. */
static inline void panel_unpack_t2_block(const uint8_t *blk, int64_t row_bytes, int rows,
                                         int8_t *dst, int code_bias)
{
    const __m512i offsets = panel_row_offsets(row_bytes);
    const __mmask16 valid = (__mmask16)((1u << rows) - 1u);
    const __m512i zero_codes = _mm512_set1_epi8(0x55); /* code 1 (w = 0) in every field */
    const __m512i three = _mm512_set1_epi8(3), bias = _mm512_set1_epi8((char)code_bias);
    for (int m = 0; m < 8; m++) {
        const __m512i d = _mm512_mask_i32gather_epi32(zero_codes, valid, offsets, blk + 4 * m, 1);
        for (int f = 0; f < 4; f++) {
            const __m512i c = _mm512_and_si512(_mm512_srli_epi16(d, 6 - 2 * f), three);
            int8_t *line = dst + (f / 2) * 2 * TILE_BYTES + (m + 8 * (f % 2)) * TILE_K;
            _mm512_store_si512((__m512i *)line, _mm512_sub_epi8(c, bias));
        }
    }
}

/* Blocks [b0, b0 + nb) of rows [0, nrows) of a T2 panel starting at w. */
static inline void panel_unpack_t2(const uint8_t *w, int64_t row_bytes, int64_t nrows, int64_t b0,
                                   int64_t nb, int8_t *panel, int code_bias)
{
    for (int g = 0; g * TILE < nrows; g++) {
        const int64_t left = nrows - g * TILE;
        const int rows = (int)(left < TILE ? left : TILE);
        const uint8_t *base = w + (int64_t)g * TILE * row_bytes + b0 * TERN_T2_BLOCK_BYTES;
        for (int64_t b = 0; b < nb; b++)
            panel_unpack_t2_block(base + b * TERN_T2_BLOCK_BYTES, row_bytes, rows,
                                  panel + (4 * b + g) * TILE_BYTES, code_bias);
    }
}

/* Steps [s0, s0 + steps) of rows [0, nrows) of an I8 matrix (row length k) starting at q.
 * flip = 0x80 stores q + 128 as unsigned (vpdpbusd, corrected by -128 sum(x)); 0 keeps q. */
static inline void panel_unpack_i8(const int8_t *q, int64_t k, int64_t nrows, int64_t s0,
                                   int64_t steps, int8_t *panel, int flip)
{
    const __m512i offsets = panel_row_offsets(k);
    const __m512i flips = _mm512_set1_epi8((char)flip);
    for (int g = 0; g * TILE < nrows; g++) {
        const int64_t left = nrows - g * TILE;
        const __mmask16 valid = (__mmask16)((1u << (left < TILE ? left : TILE)) - 1u);
        const int8_t *base = q + (int64_t)g * TILE * k + s0 * TILE_K;
        for (int64_t c = 0; c < steps; c++) {
            int8_t *tile = panel + (2 * c + g) * TILE_BYTES;
            for (int kk = 0; kk < TILE; kk++) {
                const __m512i d = _mm512_mask_i32gather_epi32(
                    _mm512_setzero_si512(), valid, offsets, base + c * TILE_K + 4 * kk, 1);
                _mm512_store_si512((__m512i *)(tile + kk * TILE_K), _mm512_xor_si512(d, flips));
            }
        }
    }
}

/* Adds the I8 products over k in [k0, k) (the part not a multiple of TILE_K) to y. */
static inline void gemm_i8_add_k_tail(const int8_t *q, int64_t k, int64_t k0, const int8_t *x,
                                      int64_t ldx, int64_t n, int32_t *y, int64_t ldy,
                                      int64_t r0, int64_t r1)
{
    for (int64_t t = 0; t < n; t++)
        for (int64_t r = r0; r < r1; r++) {
            int32_t acc = 0;
            for (int64_t i = k0; i < k; i++)
                acc += (int32_t)q[r * k + i] * x[t * ldx + i];
            y[t * ldy + r] += acc;
        }
}

#endif
