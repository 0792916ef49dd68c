/* The NEON GEMV loops, shared by kernels_neon.c (ARMv8.0) and kernels_neon_dotprod.c (ARMv8.2
 * sdot): each file defines MAC16(acc, a, b) — acc's int32 lanes += the products of 16 signed
 * bytes a and b — and NEON_NAME(f), the function name with its variant suffix, then includes
 * this file, so the same loops are compiled once per variant with that file's flags.
 * Include once per translation unit. */
#include <arm_neon.h>

#include "kernels.h"

/* One 128-weight block of one row (layout.h): half h covers bytes 16h..16h+15 of the block;
 * w = code - 1 in {-1, 0, 1}. */
static inline int32x4_t block_dot(int32x4_t acc, const uint8_t *blk, const int8_t *xb)
{
    const uint8x16_t three = vdupq_n_u8(3);
    const int8x16_t one = vdupq_n_s8(1);
    for (int h = 0; h < 2; h++) {
        const uint8x16_t v = vld1q_u8(blk + 16 * h);
        const uint8x16_t c[4] = {vshrq_n_u8(v, 6), vandq_u8(vshrq_n_u8(v, 4), three),
                                 vandq_u8(vshrq_n_u8(v, 2), three), vandq_u8(v, three)};
        for (int g = 0; g < 4; g++)
            acc = MAC16(acc, vsubq_s8(vreinterpretq_s8_u8(c[g]), one), vld1q_s8(xb + 32 * g + 16 * h));
    }
    return acc;
}

/* Two rows per pass share the activation loads. */
void NEON_NAME(tern_gemv_t2)(const uint8_t *w, int64_t k, const int8_t *x, int32_t *y, int64_t r0,
                             int64_t r1)
{
    const int64_t rb = tern_t2_row_bytes(k), nb = k / TERN_T2_BLOCK;
    int64_t r = r0;
    for (; r + 2 <= r1; r += 2) {
        const uint8_t *row = w + r * rb;
        int32x4_t a0 = vdupq_n_s32(0), a1 = a0;
        for (int64_t b = 0; b < nb; b++) {
            const int8_t *xb = x + b * TERN_T2_BLOCK;
            a0 = block_dot(a0, row + b * TERN_T2_BLOCK_BYTES, xb);
            a1 = block_dot(a1, row + rb + b * TERN_T2_BLOCK_BYTES, xb);
        }
        y[r] = vaddvq_s32(a0);
        y[r + 1] = vaddvq_s32(a1);
    }
    for (; r < r1; r++) {
        int32x4_t a = vdupq_n_s32(0);
        for (int64_t b = 0; b < nb; b++)
            a = block_dot(a, w + r * rb + b * TERN_T2_BLOCK_BYTES, x + b * TERN_T2_BLOCK);
        y[r] = vaddvq_s32(a);
    }
}

void NEON_NAME(tern_gemv_i8)(const int8_t *q, int64_t k, const int8_t *x, int32_t *y, int64_t r0,
                             int64_t r1)
{
    for (int64_t r = r0; r < r1; r++) {
        const int8_t *row = q + r * k;
        int32x4_t acc = vdupq_n_s32(0);
        int64_t i = 0;
        for (; i + 16 <= k; i += 16)
            acc = MAC16(acc, vld1q_s8(row + i), vld1q_s8(x + i));
        int32_t s = vaddvq_s32(acc);
        for (; i < k; i++) /* tail: plain C, as the scalar kernel */
            s += (int32_t)row[i] * x[i];
        y[r] = s;
    }
}
