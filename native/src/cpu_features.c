/* CPU feature detection: CPUID says what the core has, XGETBV says what the OS saves on a
 * context switch. A SIMD family counts only when both agree. */
#include "kernels.h"

#if defined(__x86_64__) || defined(__i386__) || defined(_M_X64)
#if defined(_MSC_VER)
#include <intrin.h>
static void cpuid(unsigned leaf, unsigned sub, unsigned r[4])
{
    int v[4];
    __cpuidex(v, (int)leaf, (int)sub);
    for (int i = 0; i < 4; i++)
        r[i] = (unsigned)v[i];
}
static uint64_t xgetbv0(void) { return _xgetbv(0); }
#else
#include <cpuid.h>
static void cpuid(unsigned leaf, unsigned sub, unsigned r[4])
{
    r[0] = r[1] = r[2] = r[3] = 0;
    __cpuid_count(leaf, sub, r[0], r[1], r[2], r[3]);
}
static uint64_t xgetbv0(void)
{
    uint32_t lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((uint64_t)hi << 32) | lo;
}
#endif

#define BIT(v, n) (((v) >> (n)) & 1u)

static uint32_t detect(void)
{
    unsigned l0[4], l1[4], l7[4] = {0}, l71[4] = {0};
    cpuid(0, 0, l0);
    cpuid(1, 0, l1);
    if (l0[0] >= 7) {
        cpuid(7, 0, l7);
        cpuid(7, 1, l71);
    }
    if (!BIT(l1[2], 27)) /* OSXSAVE: without it XGETBV is not available */
        return 0;
    const uint64_t xcr0 = xgetbv0();
    const bool os_ymm = (xcr0 & 0x6) == 0x6;            /* SSE + AVX state */
    const bool os_zmm = os_ymm && (xcr0 & 0xe0) == 0xe0; /* opmask, ZMM_Hi256, Hi16_ZMM */
    const bool os_tile = (xcr0 & 0x60000) == 0x60000;   /* XTILECFG + XTILEDATA */
    uint32_t f = 0;
    if (os_ymm && BIT(l7[1], 5) && BIT(l1[2], 12) && BIT(l1[2], 29))
        f |= TERN_CPU_AVX2;
    if (os_ymm && (f & TERN_CPU_AVX2) && BIT(l71[0], 4))
        f |= TERN_CPU_AVXVNNI;
    if (os_zmm && BIT(l7[1], 16) && BIT(l7[1], 17) && BIT(l7[1], 30) && BIT(l7[1], 31)) {
        f |= TERN_CPU_AVX512;
        if (BIT(l7[2], 11))
            f |= TERN_CPU_AVX512VNNI;
        if (BIT(l7[2], 1))
            f |= TERN_CPU_AVX512VBMI;
    }
    if (os_tile && BIT(l7[3], 24) && BIT(l7[3], 25) && tern_os_enable_amx())
        f |= TERN_CPU_AMX_INT8;
    return f;
}
#elif defined(__aarch64__) || defined(_M_ARM64)
static uint32_t detect(void) { return TERN_CPU_NEON | (tern_os_arm_dotprod() ? TERN_CPU_DOTPROD : 0); }
#else
static uint32_t detect(void) { return 0; }
#endif

static uint32_t cached_features;
static bool features_known;

uint32_t tern_cpu_features(void)
{
    /* Benign race: every thread computes the same value. Called first from the library's
     * init path, before any worker thread exists. */
    if (!features_known) {
        cached_features = detect();
        features_known = true;
    }
    return cached_features;
}
