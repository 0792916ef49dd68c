#include "ops.h"

#include <math.h>
#if defined(__SSE__)
#include <xmmintrin.h>
#endif

/* numpy's float32 pairwise summation (8 interleaved partial sums per block of <= 128, halves
 * split at a multiple of 8), so that norms round exactly as the reference's np.mean does. */
static float pairwise(const float *a, int64_t n)
{
    if (n < 8) {
        float r = 0.0f;
        for (int64_t i = 0; i < n; i++)
            r += a[i];
        return r;
    }
    if (n <= 128) {
        float r[8];
        for (int j = 0; j < 8; j++)
            r[j] = a[j];
        int64_t i = 8;
        for (; i < n - (n % 8); i += 8)
            for (int j = 0; j < 8; j++)
                r[j] += a[i + j];
        float res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        for (; i < n; i++)
            res += a[i];
        return res;
    }
    int64_t n2 = n / 2;
    n2 -= n2 % 8;
    return pairwise(a, n2) + pairwise(a + n2, n - n2);
}

float tern_sum(const float *a, int64_t n) { return 0.0f + pairwise(a, n); }

void tern_rms_norm(const float *x, const float *w, int64_t n, float eps, float *y)
{
    /* y holds the squares first */
    for (int64_t i = 0; i < n; i++)
        y[i] = x[i] * x[i];
    const float r = sqrtf(tern_sum(y, n) / (float)n + eps);
    for (int64_t i = 0; i < n; i++)
        y[i] = x[i] / r * w[i];
}

float tern_quantize_row(const float *x, int64_t n, int8_t *q)
{
    /* 16 running maxima (max is exact in any order; a NaN is skipped in each, as before): no
     * loop-carried chain, so it vectorizes (H4b: the one-chain loop was ~7% of a prompt) */
    float m[16] = {0};
    int64_t i = 0;
#if defined(__SSE__)
    /* GCC keeps the portable loop below scalar: maxps(a, m) is exactly `a > m ? a : m` */
    const __m128 sign = _mm_set1_ps(-0.0f);
    __m128 mv[4] = {_mm_setzero_ps(), _mm_setzero_ps(), _mm_setzero_ps(), _mm_setzero_ps()};
    for (; i + 16 <= n; i += 16)
        for (int j = 0; j < 4; j++)
            mv[j] = _mm_max_ps(_mm_andnot_ps(sign, _mm_loadu_ps(x + i + 4 * j)), mv[j]);
    for (int j = 0; j < 4; j++)
        _mm_storeu_ps(m + 4 * j, mv[j]);
#endif
    for (; i + 16 <= n; i += 16)
        for (int j = 0; j < 16; j++) {
            const float a = fabsf(x[i + j]);
            m[j] = a > m[j] ? a : m[j];
        }
    for (; i < n; i++) {
        const float a = fabsf(x[i]);
        m[0] = a > m[0] ? a : m[0];
    }
    float amax = 0.0f;
    for (int j = 0; j < 16; j++)
        amax = m[j] > amax ? m[j] : amax;
    const float s = 127.0f / (amax > 1e-5f ? amax : 1e-5f);
    /* |x * s| <= 127 (+ rounding), far below 2^22: adding and subtracting 1.5 * 2^23 rounds
     * half to even exactly as nearbyintf does, without a libm call per element (H4b). */
    const float magic = 12582912.0f;
    for (i = 0; i < n; i++) {
        const float p = x[i] * s;
        float v = (p + magic) - magic;
        /* NaN (inf or NaN activations, from a hostile file's weights) fails both tests and
         * becomes -128, as the SIMD conversions make it: converting NaN to int is undefined. */
        v = v >= -128.0f ? v : -128.0f;
        v = v <= 127.0f ? v : 127.0f;
        q[i] = (int8_t)v;
    }
    return s;
}

void tern_rope_table(int64_t pos, int32_t d, double theta, float *cos_t, float *sin_t)
{
    for (int32_t i = 0; i < d / 2; i++) {
        const double inv_freq = pow(theta, -(double)(2 * i) / (double)d);
        const double a = (double)pos * inv_freq;
        cos_t[i] = (float)cos(a);
        sin_t[i] = (float)sin(a);
    }
}

void tern_rope_head(float *x, int32_t d, const float *cos_t, const float *sin_t)
{
    const int32_t half = d / 2;
    for (int32_t i = 0; i < half; i++) {
        const float x1 = x[i], x2 = x[i + half];
        x[i] = x1 * cos_t[i] - x2 * sin_t[i];
        x[i + half] = x2 * cos_t[i] + x1 * sin_t[i];
    }
}

float tern_silu(float x) { return x / (1.0f + expf(-x)); }
