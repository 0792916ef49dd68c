/* The kernel variant table: W1.58 x A8 (ternary T2 rows x int8 activations) and int8 x int8
 * (the LM-head copy), each as GEMV (one token, decode) and GEMM (n tokens, prefill).
 * Layouts are in layout.h. All kernels produce exact int32 dot products; the caller applies
 * weight and activation scales.
 *
 * Row ranges: every kernel computes rows [r0, r1) only, so the thread pool splits rows.
 * Any r0 <= r1 is valid (no alignment required). Outputs are indexed by absolute row.
 *
 * A variant is chosen once, at init, from CPUID + XGETBV (cpu_features.c): the runnable
 * variant with the highest score wins; TERN_ISA=scalar|avx2|avx512|neon|amx forces a family.
 * A variant may leave entries NULL: they are taken from the best runnable variant with a
 * lower score (so "amx" only supplies GEMMs and reuses the avx512 GEMVs). The scalar variant
 * is always compiled and complete. Every SIMD entry handles every size it can be given.
 */
#ifndef TERN_KERNELS_H
#define TERN_KERNELS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "layout.h"

/* Ternary GEMV: y[r] = sum_k w[r][k] * x[k] for r in [r0, r1).
 * w: packed T2 matrix (row r at w + r*k/4); k: row length, a multiple of 128. */
typedef void (*tern_gemv_t2_fn)(const uint8_t *w, int64_t k, const int8_t *x, int32_t *y,
                                int64_t r0, int64_t r1);

/* Ternary GEMM: y[t*ldy + r] = sum_k w[r][k] * x[t*ldx + k], t in [0, n), r in [r0, r1).
 * scratch: TERN_GEMM_SCRATCH_BYTES bytes, 64-byte aligned, private to the calling thread. */
typedef void (*tern_gemm_t2_fn)(const uint8_t *w, int64_t k, const int8_t *x, int64_t ldx,
                                int64_t n, int32_t *y, int64_t ldy, int64_t r0, int64_t r1,
                                void *scratch);

/* Int8 GEMV: y[r] = sum_k q[r*k + kk] * x[kk]; k any positive length. */
typedef void (*tern_gemv_i8_fn)(const int8_t *q, int64_t k, const int8_t *x, int32_t *y,
                                int64_t r0, int64_t r1);

/* Int8 GEMM: y[t*ldy + r] = sum_kk q[r*k + kk] * x[t*ldx + kk]. Same scratch as above. */
typedef void (*tern_gemm_i8_fn)(const int8_t *q, int64_t k, const int8_t *x, int64_t ldx,
                                int64_t n, int32_t *y, int64_t ldy, int64_t r0, int64_t r1,
                                void *scratch);

#define TERN_GEMM_SCRATCH_BYTES (256 * 1024)

/* Float helpers over f16 data (KV cache, the exact f16 LM head); f32 accumulation. Variants
 * may sum in a different order: results agree to rounding, not bit for bit. */
typedef float (*tern_dot_f16_fn)(const uint16_t *a, const float *b, int64_t n);
typedef void (*tern_axpy_f16_fn)(float *y, float a, const uint16_t *x, int64_t n); /* y += a*x */
typedef void (*tern_gemv_f16_fn)(const uint16_t *w, int64_t k, const float *x, float *y,
                                 int64_t r0, int64_t r1); /* y[r] = w[r] . x */

/* CPU feature bits (cpu_features.c). A bit is set only when the OS also saves the state. */
enum {
    TERN_CPU_AVX2 = 1u << 0,        /* AVX2 + FMA + F16C, OS saves ymm */
    TERN_CPU_AVX512 = 1u << 1,      /* AVX-512 F/BW/VL/DQ, OS saves zmm/opmask */
    TERN_CPU_AVX512VNNI = 1u << 2,
    TERN_CPU_AVX512VBMI = 1u << 3,
    TERN_CPU_AVXVNNI = 1u << 4,
    TERN_CPU_AMX_INT8 = 1u << 5,    /* AMX-TILE + AMX-INT8, OS grants tile state */
    TERN_CPU_NEON = 1u << 6,
    TERN_CPU_DOTPROD = 1u << 7,
};

typedef struct tern_kernels {
    const char *name;     /* e.g. "scalar", "avx2", "avx512-vnni", "amx" */
    const char *family;   /* the TERN_ISA value that forces it */
    uint32_t needs;       /* TERN_CPU_* bits that must all be present */
    int score;            /* higher wins among runnable variants */
    tern_gemv_t2_fn gemv_t2;
    tern_gemm_t2_fn gemm_t2;
    tern_gemv_i8_fn gemv_i8;
    tern_gemm_i8_fn gemm_i8;
    tern_dot_f16_fn dot_f16;
    tern_axpy_f16_fn axpy_f16;
    tern_gemv_f16_fn gemv_f16;
} tern_kernels;

/* One-time library init (f16 table, CPU features, variant table); idempotent, thread-safe. */
void tern_lib_init(void);

/* Features of this CPU (cached after the first call). Requests AMX tile permission on Linux. */
uint32_t tern_cpu_features(void);

/* The chosen variant with every entry filled (never NULL). Reads TERN_ISA once.
 * Returns NULL with tern_last_error set only if TERN_ISA names a family this CPU cannot run. */
const tern_kernels *tern_kernels_select(void);

/* The complete variant by name (entries filled from lower-scored runnable variants), or NULL
 * if unknown or not runnable here. For tests that call one specific variant. */
const tern_kernels *tern_kernels_by_name(const char *name);

/* ---- Variant entry points (one file per ISA, compiled with its own -m flags) ---- */

/* kernels_scalar.c */
void tern_gemv_t2_scalar(const uint8_t *w, int64_t k, const int8_t *x, int32_t *y, int64_t r0,
                         int64_t r1);
void tern_gemm_t2_scalar(const uint8_t *w, int64_t k, const int8_t *x, int64_t ldx, int64_t n,
                         int32_t *y, int64_t ldy, int64_t r0, int64_t r1, void *scratch);
void tern_gemv_i8_scalar(const int8_t *q, int64_t k, const int8_t *x, int32_t *y, int64_t r0,
                         int64_t r1);
void tern_gemm_i8_scalar(const int8_t *q, int64_t k, const int8_t *x, int64_t ldx, int64_t n,
                         int32_t *y, int64_t ldy, int64_t r0, int64_t r1, void *scratch);

float tern_dot_f16_scalar(const uint16_t *a, const float *b, int64_t n);
void tern_axpy_f16_scalar(float *y, float a, const uint16_t *x, int64_t n);
void tern_gemv_f16_scalar(const uint16_t *w, int64_t k, const float *x, float *y, int64_t r0,
                          int64_t r1);

/* kernels_avx2.c */
void tern_gemv_t2_avx2(const uint8_t *w, int64_t k, const int8_t *x, int32_t *y, int64_t r0,
                       int64_t r1);
void tern_gemv_i8_avx2(const int8_t *q, int64_t k, const int8_t *x, int32_t *y, int64_t r0,
                       int64_t r1);
float tern_dot_f16_avx2(const uint16_t *a, const float *b, int64_t n);
void tern_axpy_f16_avx2(float *y, float a, const uint16_t *x, int64_t n);
void tern_gemv_f16_avx2(const uint16_t *w, int64_t k, const float *x, float *y, int64_t r0,
                        int64_t r1);

/* kernels_avx512.c (AVX-512 VNNI GEMVs) */
void tern_gemv_t2_avx512vnni(const uint8_t *w, int64_t k, const int8_t *x, int32_t *y,
                             int64_t r0, int64_t r1);
void tern_gemv_i8_avx512vnni(const int8_t *q, int64_t k, const int8_t *x, int32_t *y,
                             int64_t r0, int64_t r1);

/* kernels_neon.c (AArch64) */
void tern_gemv_t2_neon(const uint8_t *w, int64_t k, const int8_t *x, int32_t *y, int64_t r0,
                       int64_t r1);
void tern_gemv_i8_neon(const int8_t *q, int64_t k, const int8_t *x, int32_t *y, int64_t r0,
                       int64_t r1);

/* kernels_neon_dotprod.c (AArch64 with the ARMv8.2 dot product) */
void tern_gemv_t2_neon_dotprod(const uint8_t *w, int64_t k, const int8_t *x, int32_t *y,
                               int64_t r0, int64_t r1);
void tern_gemv_i8_neon_dotprod(const int8_t *q, int64_t k, const int8_t *x, int32_t *y,
                               int64_t r0, int64_t r1);

/* gemm_avx512.c (helper H4b): AVX-512 VNNI GEMMs for prefill. */
void tern_gemm_t2_avx512vnni(const uint8_t *w, int64_t k, const int8_t *x, int64_t ldx,
                             int64_t n, int32_t *y, int64_t ldy, int64_t r0, int64_t r1,
                             void *scratch);
void tern_gemm_i8_avx512vnni(const int8_t *q, int64_t k, const int8_t *x, int64_t ldx,
                             int64_t n, int32_t *y, int64_t ldy, int64_t r0, int64_t r1,
                             void *scratch);

/* gemm_amx.c (helper H4b): AMX-INT8 GEMMs for prefill. Each call configures the tiles of
 * the calling thread itself (tile config is per thread). */
void tern_gemm_t2_amx(const uint8_t *w, int64_t k, const int8_t *x, int64_t ldx, int64_t n,
                      int32_t *y, int64_t ldy, int64_t r0, int64_t r1, void *scratch);
void tern_gemm_i8_amx(const int8_t *q, int64_t k, const int8_t *x, int64_t ldx, int64_t n,
                      int32_t *y, int64_t ldy, int64_t r0, int64_t r1, void *scratch);

/* platform.c: the one file with OS-specific calls. */
bool tern_os_enable_amx(void);   /* Linux: arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) */
bool tern_os_arm_dotprod(void);  /* AArch64: the OS reports the ARMv8.2 dot product */
/* Online CPUs (>= 1). */
int tern_os_cpu_count(void);
/* Drop the whole pages inside [p, p + n) of a read-only file mapping from the resident set. */
void tern_os_release_pages(const void *p, uint64_t n);

#endif
