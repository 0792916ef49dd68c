/* AVX2 GEMVs (compiled with -mavx2 -mfma -mf16c). T2: maddubs of the unsigned codes with the
 * signed activations, then minus sum(x) since w = code - 1. Four rows per pass share the
 * activation loads; the row-count tail runs one row at a time. */
#include <immintrin.h>

#include "kernels.h"

static inline int32_t hsum_i32(__m256i v)
{
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}

static int32_t sum_i8(const int8_t *x, int64_t k)
{
    const __m256i ones16 = _mm256_set1_epi16(1);
    __m256i acc = _mm256_setzero_si256();
    int64_t i = 0;
    for (; i + 32 <= k; i += 32) {
        const __m256i v = _mm256_loadu_si256((const __m256i *)(x + i));
        const __m256i lo = _mm256_cvtepi8_epi16(_mm256_castsi256_si128(v));
        const __m256i hi = _mm256_cvtepi8_epi16(_mm256_extracti128_si256(v, 1));
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_add_epi16(lo, hi), ones16));
    }
    int32_t s = hsum_i32(acc);
    for (; i < k; i++)
        s += x[i];
    return s;
}

/* codes . x for one 128-weight block, as 8 int32 partial sums. */
static inline __m256i block_dot(const uint8_t *blk, const __m256i xv[4])
{
    const __m256i mask = _mm256_set1_epi8(3);
    const __m256i ones16 = _mm256_set1_epi16(1);
    const __m256i v = _mm256_loadu_si256((const __m256i *)blk);
    const __m256i c0 = _mm256_and_si256(_mm256_srli_epi16(v, 6), mask);
    const __m256i c1 = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
    const __m256i c2 = _mm256_and_si256(_mm256_srli_epi16(v, 2), mask);
    const __m256i c3 = _mm256_and_si256(v, mask);
    /* Each maddubs lane is at most 2 * 2 * 128 = 512 in magnitude: no i16 saturation. */
    __m256i s = _mm256_add_epi16(_mm256_maddubs_epi16(c0, xv[0]), _mm256_maddubs_epi16(c1, xv[1]));
    s = _mm256_add_epi16(s, _mm256_add_epi16(_mm256_maddubs_epi16(c2, xv[2]),
                                             _mm256_maddubs_epi16(c3, xv[3])));
    return _mm256_madd_epi16(s, ones16);
}

static inline void load_x(const int8_t *xb, __m256i xv[4])
{
    for (int g = 0; g < 4; g++)
        xv[g] = _mm256_loadu_si256((const __m256i *)(xb + 32 * g));
}

void tern_gemv_t2_avx2(const uint8_t *w, int64_t k, const int8_t *x, int32_t *y, int64_t r0,
                       int64_t r1)
{
    const int64_t rb = tern_t2_row_bytes(k), nb = k / TERN_T2_BLOCK;
    const int32_t xsum = sum_i8(x, k);
    int64_t r = r0;
    for (; r + 4 <= r1; r += 4) {
        const uint8_t *row = w + r * rb;
        __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
        for (int64_t b = 0; b < nb; b++) {
            __m256i xv[4];
            load_x(x + b * TERN_T2_BLOCK, xv);
            const uint8_t *blk = row + b * TERN_T2_BLOCK_BYTES;
            _mm_prefetch((const char *)(blk + 512), _MM_HINT_T0);
            _mm_prefetch((const char *)(blk + rb + 512), _MM_HINT_T0);
            _mm_prefetch((const char *)(blk + 2 * rb + 512), _MM_HINT_T0);
            _mm_prefetch((const char *)(blk + 3 * rb + 512), _MM_HINT_T0);
            a0 = _mm256_add_epi32(a0, block_dot(blk, xv));
            a1 = _mm256_add_epi32(a1, block_dot(blk + rb, xv));
            a2 = _mm256_add_epi32(a2, block_dot(blk + 2 * rb, xv));
            a3 = _mm256_add_epi32(a3, block_dot(blk + 3 * rb, xv));
        }
        y[r] = hsum_i32(a0) - xsum;
        y[r + 1] = hsum_i32(a1) - xsum;
        y[r + 2] = hsum_i32(a2) - xsum;
        y[r + 3] = hsum_i32(a3) - xsum;
    }
    for (; r < r1; r++) {
        const uint8_t *row = w + r * rb;
        __m256i a = _mm256_setzero_si256();
        for (int64_t b = 0; b < nb; b++) {
            __m256i xv[4];
            load_x(x + b * TERN_T2_BLOCK, xv);
            a = _mm256_add_epi32(a, block_dot(row + b * TERN_T2_BLOCK_BYTES, xv));
        }
        y[r] = hsum_i32(a) - xsum;
    }
}

/* Int8 x int8: sign-extend to int16 and madd, exact for every input including -128
 * (the maddubs sign trick is not: |-128| * -128 overflows). */
static int32_t dot_i8(const int8_t *q, const int8_t *x, int64_t k)
{
    __m256i acc = _mm256_setzero_si256();
    int64_t i = 0;
    for (; i + 32 <= k; i += 32) {
        const __m256i qv = _mm256_loadu_si256((const __m256i *)(q + i));
        const __m256i xv = _mm256_loadu_si256((const __m256i *)(x + i));
        const __m256i ql = _mm256_cvtepi8_epi16(_mm256_castsi256_si128(qv));
        const __m256i qh = _mm256_cvtepi8_epi16(_mm256_extracti128_si256(qv, 1));
        const __m256i xl = _mm256_cvtepi8_epi16(_mm256_castsi256_si128(xv));
        const __m256i xh = _mm256_cvtepi8_epi16(_mm256_extracti128_si256(xv, 1));
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(ql, xl));
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(qh, xh));
    }
    int32_t s = hsum_i32(acc);
    for (; i < k; i++)
        s += (int32_t)q[i] * x[i];
    return s;
}

void tern_gemv_i8_avx2(const int8_t *q, int64_t k, const int8_t *x, int32_t *y, int64_t r0,
                       int64_t r1)
{
    for (int64_t r = r0; r < r1; r++) {
        _mm_prefetch((const char *)(q + (r + 1) * k), _MM_HINT_T0);
        y[r] = dot_i8(q + r * k, x, k);
    }
}

/* ---- f16 helpers (F16C) ---- */

static inline float hsum_ps(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline __m256 load_f16(const uint16_t *p)
{
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
}

float tern_dot_f16_avx2(const uint16_t *a, const float *b, int64_t n)
{
    __m256 acc0 = _mm256_setzero_ps(), acc1 = acc0;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        acc0 = _mm256_fmadd_ps(load_f16(a + i), _mm256_loadu_ps(b + i), acc0);
        acc1 = _mm256_fmadd_ps(load_f16(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
    }
    float s = hsum_ps(_mm256_add_ps(acc0, acc1));
    for (; i < n; i++)
        s += _cvtsh_ss(a[i]) * b[i];
    return s;
}

void tern_axpy_f16_avx2(float *y, float a, const uint16_t *x, int64_t n)
{
    const __m256 av = _mm256_set1_ps(a);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, load_f16(x + i), _mm256_loadu_ps(y + i)));
    for (; i < n; i++)
        y[i] += a * _cvtsh_ss(x[i]);
}

void tern_gemv_f16_avx2(const uint16_t *w, int64_t k, const float *x, float *y, int64_t r0,
                        int64_t r1)
{
    for (int64_t r = r0; r < r1; r++) {
        _mm_prefetch((const char *)(w + (r + 1) * k), _MM_HINT_T0);
        y[r] = tern_dot_f16_avx2(w + r * k, x, k);
    }
}
