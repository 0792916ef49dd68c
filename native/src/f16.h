/* IEEE half <-> float conversion, portable (no F16C needed in baseline code). */
#ifndef TERN_F16_H
#define TERN_F16_H

#include <stdint.h>
#include <string.h>

/* 64K-entry table behind tern_f16_to_f32: built once by tern_f16_init() (library init). */
extern float tern_f16_table[65536];
void tern_f16_init(void);

static inline float tern_f16_to_f32(uint16_t h) { return tern_f16_table[h]; }

/* Round to nearest even, with overflow to infinity and subnormals, like F16C's vcvtps2ph. */
static inline uint16_t tern_f32_to_f16(float f)
{
    uint32_t x;
    memcpy(&x, &f, 4);
    const uint32_t sign = (x >> 16) & 0x8000u;
    uint32_t abs = x & 0x7fffffffu;
    if (abs >= 0x7f800000u) /* inf or nan */
        return (uint16_t)(sign | 0x7c00u | (abs > 0x7f800000u ? 0x200u : 0));
    if (abs >= 0x477ff000u) /* rounds to >= 65520: infinity */
        return (uint16_t)(sign | 0x7c00u);
    if (abs < 0x38800000u) { /* below 2^-14: subnormal half */
        if (abs < 0x33000000u)
            return (uint16_t)sign; /* below half the smallest subnormal */
        const uint32_t mant = (abs & 0x7fffffu) | 0x800000u;
        const int shift = 126 - (int)(abs >> 23); /* 14..24 */
        const uint32_t q = mant >> shift, rem = mant & ((1u << shift) - 1), half = 1u << (shift - 1);
        return (uint16_t)(sign | (q + (rem > half || (rem == half && (q & 1)))));
    }
    const uint32_t rounded = abs + 0xfffu + ((abs >> 13) & 1u);
    return (uint16_t)(sign | ((rounded - 0x38000000u) >> 13));
}

static inline float tern_bf16_to_f32(uint16_t h)
{
    const uint32_t x = (uint32_t)h << 16;
    float f;
    memcpy(&f, &x, 4);
    return f;
}

#endif
