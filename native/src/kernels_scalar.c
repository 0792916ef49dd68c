/* The plain C twin of every kernel: always compiled, complete, and the definition of the
 * right answer for the SIMD variants (which must equal it exactly). */
#include "f16.h"
#include "kernels.h"

static int32_t dot_t2_row(const uint8_t *row, int64_t k, const int8_t *x)
{
    int32_t acc = 0;
    for (int64_t b = 0; b < k / TERN_T2_BLOCK; b++) {
        const uint8_t *blk = row + b * TERN_T2_BLOCK_BYTES;
        const int8_t *xb = x + b * TERN_T2_BLOCK;
        for (int j = 0; j < 32; j++) {
            const unsigned byte = blk[j];
            acc += ((int32_t)(byte >> 6) - 1) * xb[j];
            acc += ((int32_t)((byte >> 4) & 3u) - 1) * xb[j + 32];
            acc += ((int32_t)((byte >> 2) & 3u) - 1) * xb[j + 64];
            acc += ((int32_t)(byte & 3u) - 1) * xb[j + 96];
        }
    }
    return acc;
}

void tern_gemv_t2_scalar(const uint8_t *w, int64_t k, const int8_t *x, int32_t *y, int64_t r0,
                         int64_t r1)
{
    const int64_t rb = tern_t2_row_bytes(k);
    for (int64_t r = r0; r < r1; r++)
        y[r] = dot_t2_row(w + r * rb, k, x);
}

void tern_gemm_t2_scalar(const uint8_t *w, int64_t k, const int8_t *x, int64_t ldx, int64_t n,
                         int32_t *y, int64_t ldy, int64_t r0, int64_t r1, void *scratch)
{
    (void)scratch;
    for (int64_t t = 0; t < n; t++)
        tern_gemv_t2_scalar(w, k, x + t * ldx, y + t * ldy, r0, r1);
}

void tern_gemv_i8_scalar(const int8_t *q, int64_t k, const int8_t *x, int32_t *y, int64_t r0,
                         int64_t r1)
{
    for (int64_t r = r0; r < r1; r++) {
        const int8_t *row = q + r * k;
        int32_t acc = 0;
        for (int64_t i = 0; i < k; i++)
            acc += (int32_t)row[i] * x[i];
        y[r] = acc;
    }
}

void tern_gemm_i8_scalar(const int8_t *q, int64_t k, const int8_t *x, int64_t ldx, int64_t n,
                         int32_t *y, int64_t ldy, int64_t r0, int64_t r1, void *scratch)
{
    (void)scratch;
    for (int64_t t = 0; t < n; t++)
        tern_gemv_i8_scalar(q, k, x + t * ldx, y + t * ldy, r0, r1);
}

float tern_dot_f16_scalar(const uint16_t *a, const float *b, int64_t n)
{
    float acc = 0.0f;
    for (int64_t i = 0; i < n; i++)
        acc += tern_f16_to_f32(a[i]) * b[i];
    return acc;
}

void tern_axpy_f16_scalar(float *y, float a, const uint16_t *x, int64_t n)
{
    for (int64_t i = 0; i < n; i++)
        y[i] += a * tern_f16_to_f32(x[i]);
}

void tern_gemv_f16_scalar(const uint16_t *w, int64_t k, const float *x, float *y, int64_t r0,
                          int64_t r1)
{
    for (int64_t r = r0; r < r1; r++)
        y[r] = tern_dot_f16_scalar(w + r * k, x, k);
}
