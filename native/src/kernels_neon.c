/* NEON GEMVs (AArch64 baseline, ARMv8.0: no dotprod needed). The signed weights (T2 codes minus
 * one) or int8 head values are multiplied by the activations with widening vmull_s8 and
 * pairwise-accumulated into int32 lanes (every product fits int16: |q * x| <= 16384). */
#include <arm_neon.h>

static inline int32x4_t mla_s8(int32x4_t acc, int8x16_t a, int8x16_t b)
{
    acc = vpadalq_s16(acc, vmull_s8(vget_low_s8(a), vget_low_s8(b)));
    return vpadalq_s16(acc, vmull_high_s8(a, b));
}

#define MAC16(acc, a, b) mla_s8((acc), (a), (b))
#define NEON_NAME(f) f##_neon
#include "kernels_neon_body.h"
