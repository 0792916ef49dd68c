/* NEON GEMVs with the ARMv8.2 dot product (compiled with -march=armv8.2-a+dotprod; chosen only
 * when the CPU reports it — every Apple M chip, most recent AArch64 servers). sdot multiplies
 * 16 signed bytes by 16 and adds each group of four into an int32 lane: a quarter of the
 * instructions of the widening-multiply variant (kernels_neon.c). */
#include <arm_neon.h>

#define MAC16(acc, a, b) vdotq_s32((acc), (a), (b))
#define NEON_NAME(f) f##_neon_dotprod
#include "kernels_neon_body.h"
