/* AVX-512 VNNI GEMVs (compiled with -mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx512vnni).
 * T2: one zmm holds two 128-weight blocks (64 bytes). vpdpbusd multiplies the unsigned codes
 * by the signed activations and sums groups of four into int32 lanes; minus sum(x) gives the
 * ternary dot since w = code - 1. Four rows per pass share the activation registers. */
#include <immintrin.h>

#include "kernels.h"

#define PREFETCH_AHEAD 1024 /* bytes ahead in each row stream */

static int32_t sum_i8(const int8_t *x, int64_t k)
{
    const __m512i ones = _mm512_set1_epi8(1);
    __m512i acc = _mm512_setzero_si512();
    for (int64_t i = 0; i < k; i += 64) {
        const __mmask64 m = k - i >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << (k - i)) - 1);
        acc = _mm512_dpbusd_epi32(acc, ones, _mm512_maskz_loadu_epi8(m, x + i));
    }
    return _mm512_reduce_add_epi32(acc);
}

/* Activations of a block pair arranged like the codes: lane half 0 = block 2p, half 1 = 2p+1. */
static inline void load_x_pair(const int8_t *xp, __m512i xv[4])
{
    for (int g = 0; g < 4; g++) {
        const __m256i lo = _mm256_loadu_si256((const __m256i *)(xp + 32 * g));
        const __m256i hi = _mm256_loadu_si256((const __m256i *)(xp + 128 + 32 * g));
        xv[g] = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
    }
}

/* The last, unpaired block: upper halves zero, so they add nothing. */
static inline void load_x_single(const int8_t *xb, __m512i xv[4])
{
    for (int g = 0; g < 4; g++)
        xv[g] = _mm512_zextsi256_si512(_mm256_loadu_si256((const __m256i *)(xb + 32 * g)));
}

static inline __m512i dot_codes(__m512i acc, __m512i v, const __m512i xv[4])
{
    const __m512i mask = _mm512_set1_epi8(3);
    acc = _mm512_dpbusd_epi32(acc, _mm512_and_si512(_mm512_srli_epi16(v, 6), mask), xv[0]);
    acc = _mm512_dpbusd_epi32(acc, _mm512_and_si512(_mm512_srli_epi16(v, 4), mask), xv[1]);
    acc = _mm512_dpbusd_epi32(acc, _mm512_and_si512(_mm512_srli_epi16(v, 2), mask), xv[2]);
    return _mm512_dpbusd_epi32(acc, _mm512_and_si512(v, mask), xv[3]);
}

static inline __m512i load_single(const uint8_t *blk)
{
    return _mm512_zextsi256_si512(_mm256_loadu_si256((const __m256i *)blk));
}

static void rows4(const uint8_t *row, int64_t rb, int64_t nb, const int8_t *x, int32_t xsum,
                  int32_t *y)
{
    __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
    int64_t b = 0;
    for (; b + 2 <= nb; b += 2) {
        __m512i xv[4];
        load_x_pair(x + b * TERN_T2_BLOCK, xv);
        const uint8_t *p = row + b * TERN_T2_BLOCK_BYTES;
        _mm_prefetch((const char *)(p + PREFETCH_AHEAD), _MM_HINT_T0);
        _mm_prefetch((const char *)(p + rb + PREFETCH_AHEAD), _MM_HINT_T0);
        _mm_prefetch((const char *)(p + 2 * rb + PREFETCH_AHEAD), _MM_HINT_T0);
        _mm_prefetch((const char *)(p + 3 * rb + PREFETCH_AHEAD), _MM_HINT_T0);
        a0 = dot_codes(a0, _mm512_loadu_si512(p), xv);
        a1 = dot_codes(a1, _mm512_loadu_si512(p + rb), xv);
        a2 = dot_codes(a2, _mm512_loadu_si512(p + 2 * rb), xv);
        a3 = dot_codes(a3, _mm512_loadu_si512(p + 3 * rb), xv);
    }
    if (b < nb) {
        __m512i xv[4];
        load_x_single(x + b * TERN_T2_BLOCK, xv);
        const uint8_t *p = row + b * TERN_T2_BLOCK_BYTES;
        a0 = dot_codes(a0, load_single(p), xv);
        a1 = dot_codes(a1, load_single(p + rb), xv);
        a2 = dot_codes(a2, load_single(p + 2 * rb), xv);
        a3 = dot_codes(a3, load_single(p + 3 * rb), xv);
    }
    y[0] = _mm512_reduce_add_epi32(a0) - xsum;
    y[1] = _mm512_reduce_add_epi32(a1) - xsum;
    y[2] = _mm512_reduce_add_epi32(a2) - xsum;
    y[3] = _mm512_reduce_add_epi32(a3) - xsum;
}

static int32_t row1(const uint8_t *row, int64_t nb, const int8_t *x, int32_t xsum)
{
    __m512i a = _mm512_setzero_si512();
    int64_t b = 0;
    for (; b + 2 <= nb; b += 2) {
        __m512i xv[4];
        load_x_pair(x + b * TERN_T2_BLOCK, xv);
        a = dot_codes(a, _mm512_loadu_si512(row + b * TERN_T2_BLOCK_BYTES), xv);
    }
    if (b < nb) {
        __m512i xv[4];
        load_x_single(x + b * TERN_T2_BLOCK, xv);
        a = dot_codes(a, load_single(row + b * TERN_T2_BLOCK_BYTES), xv);
    }
    return _mm512_reduce_add_epi32(a) - xsum;
}

void tern_gemv_t2_avx512vnni(const uint8_t *w, int64_t k, const int8_t *x, int32_t *y,
                             int64_t r0, int64_t r1)
{
    const int64_t rb = tern_t2_row_bytes(k), nb = k / TERN_T2_BLOCK;
    const int32_t xsum = sum_i8(x, k);
    int64_t r = r0;
    for (; r + 4 <= r1; r += 4)
        rows4(w + r * rb, rb, nb, x, xsum, y + r);
    for (; r < r1; r++)
        y[r] = row1(w + r * rb, nb, x, xsum);
}

/* Int8 x int8 with vpdpbusd (unsigned x signed): the weights go in as q + 128 (an xor, cheaper
 * than a second vpdpbusd for sum(q)), so the sum is q . x + 128 * sum(x), and sum(x) is taken
 * once per call. Masked loads take any k: masked-off lanes have x = 0 and add nothing. */
static inline __mmask64 tail_mask(int64_t left)
{
    return left >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << left) - 1);
}

static void i8_rows(const int8_t *q, int64_t k, const int8_t *x, int32_t xsum, int32_t *y, int nr)
{
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    __m512i acc[4];
    for (int j = 0; j < nr; j++)
        acc[j] = _mm512_setzero_si512();
    for (int64_t i = 0; i < k; i += 64) {
        const __mmask64 m = tail_mask(k - i);
        const __m512i xv = _mm512_maskz_loadu_epi8(m, x + i);
        for (int j = 0; j < nr; j++) {
            const __m512i qu = _mm512_xor_si512(_mm512_maskz_loadu_epi8(m, q + j * k + i), flip);
            _mm_prefetch((const char *)(q + j * k + i + PREFETCH_AHEAD), _MM_HINT_T0);
            acc[j] = _mm512_dpbusd_epi32(acc[j], qu, xv);
        }
    }
    for (int j = 0; j < nr; j++)
        y[j] = _mm512_reduce_add_epi32(acc[j]) - 128 * xsum;
}

void tern_gemv_i8_avx512vnni(const int8_t *q, int64_t k, const int8_t *x, int32_t *y,
                             int64_t r0, int64_t r1)
{
    const int32_t xsum = sum_i8(x, k);
    int64_t r = r0;
    for (; r + 4 <= r1; r += 4)
        i8_rows(q + r * k, k, x, xsum, y + r, 4);
    for (; r < r1; r++)
        i8_rows(q + r * k, k, x, xsum, y + r, 1);
}
