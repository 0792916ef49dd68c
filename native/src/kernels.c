/* The variant table and its selection. H4b's prefill GEMMs (gemm_avx512.c, gemm_amx.c)
 * plug in here; CMake defines TERN_HAVE_GEMM_AVX512 / TERN_HAVE_GEMM_AMX when they exist. */
#include "kernels.h"

#include <stdlib.h>
#include <string.h>

#include "error.h"
#include "tern.h"

static const tern_kernels variants[] = {
    {.name = "scalar", .family = "scalar", .needs = 0, .score = 0,
     .gemv_t2 = tern_gemv_t2_scalar, .gemm_t2 = tern_gemm_t2_scalar,
     .gemv_i8 = tern_gemv_i8_scalar, .gemm_i8 = tern_gemm_i8_scalar,
     .dot_f16 = tern_dot_f16_scalar, .axpy_f16 = tern_axpy_f16_scalar,
     .gemv_f16 = tern_gemv_f16_scalar},
#if defined(__x86_64__) || defined(_M_X64)
    {.name = "avx2", .family = "avx2", .needs = TERN_CPU_AVX2, .score = 10,
     .gemv_t2 = tern_gemv_t2_avx2, .gemv_i8 = tern_gemv_i8_avx2,
     .dot_f16 = tern_dot_f16_avx2, .axpy_f16 = tern_axpy_f16_avx2, .gemv_f16 = tern_gemv_f16_avx2},
    {.name = "avx512-vnni", .family = "avx512",
     .needs = TERN_CPU_AVX2 | TERN_CPU_AVX512 | TERN_CPU_AVX512VNNI, .score = 20,
     .gemv_t2 = tern_gemv_t2_avx512vnni, .gemv_i8 = tern_gemv_i8_avx512vnni,
#ifdef TERN_HAVE_GEMM_AVX512
     .gemm_t2 = tern_gemm_t2_avx512vnni, .gemm_i8 = tern_gemm_i8_avx512vnni,
#endif
    },
#ifdef TERN_HAVE_GEMM_AMX
    {.name = "amx", .family = "amx",
     .needs = TERN_CPU_AVX2 | TERN_CPU_AVX512 | TERN_CPU_AVX512VNNI | TERN_CPU_AMX_INT8, .score = 30,
     .gemm_t2 = tern_gemm_t2_amx, .gemm_i8 = tern_gemm_i8_amx},
#endif
#endif
#if defined(__aarch64__) || defined(_M_ARM64)
    {.name = "neon", .family = "neon", .needs = TERN_CPU_NEON, .score = 10,
     .gemv_t2 = tern_gemv_t2_neon, .gemv_i8 = tern_gemv_i8_neon},
    {.name = "neon-dotprod", .family = "neon", .needs = TERN_CPU_NEON | TERN_CPU_DOTPROD, .score = 20,
     .gemv_t2 = tern_gemv_t2_neon_dotprod, .gemv_i8 = tern_gemv_i8_neon_dotprod},
#endif
};

#define N_VARIANTS (sizeof variants / sizeof variants[0])

/* One filled copy per variant: NULL entries taken from lower-scored runnable variants.
 * Table entries are listed in increasing score order. */
static tern_kernels filled[N_VARIANTS];
static bool filled_done;

static bool runnable(const tern_kernels *v) { return (tern_cpu_features() & v->needs) == v->needs; }

static void fill_all(void)
{
    if (filled_done)
        return;
    for (size_t i = 0; i < N_VARIANTS; i++) {
        tern_kernels v = variants[i];
        for (size_t j = i; j-- > 0;) {
            if (!runnable(&variants[j]))
                continue;
            if (!v.gemv_t2) v.gemv_t2 = filled[j].gemv_t2;
            if (!v.gemm_t2) v.gemm_t2 = filled[j].gemm_t2;
            if (!v.gemv_i8) v.gemv_i8 = filled[j].gemv_i8;
            if (!v.gemm_i8) v.gemm_i8 = filled[j].gemm_i8;
            if (!v.dot_f16) v.dot_f16 = filled[j].dot_f16;
            if (!v.axpy_f16) v.axpy_f16 = filled[j].axpy_f16;
            if (!v.gemv_f16) v.gemv_f16 = filled[j].gemv_f16;
        }
        filled[i] = v;
    }
    filled_done = true;
}

const tern_kernels *tern_kernels_by_name(const char *name)
{
    fill_all();
    for (size_t i = 0; i < N_VARIANTS; i++)
        if (strcmp(variants[i].name, name) == 0)
            return runnable(&variants[i]) ? &filled[i] : NULL;
    return NULL;
}

const tern_kernels *tern_kernels_select(void)
{
    fill_all();
    const char *force = getenv("TERN_ISA");
    const tern_kernels *best = NULL;
    for (size_t i = 0; i < N_VARIANTS; i++) {
        if (!runnable(&variants[i]))
            continue;
        if (force && *force && strcmp(variants[i].family, force) != 0)
            continue;
        if (!best || variants[i].score > best->score)
            best = &filled[i];
    }
    if (!best)
        tern_fail(TERN_ERR_UNSUPPORTED, "TERN_ISA=%s: no such kernel family runs on this CPU",
                  force ? force : "");
    return best;
}
