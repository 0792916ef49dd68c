/* Tern native library: ternary (W1.58 A8) kernels and the BitNet decoder step.
 * Knows nothing about Python. Every function that can fail returns an int32_t status
 * (TERN_OK = 0); the error text is fetched with tern_last_error() (per thread).
 * Nothing here prints, exits or aborts. */
#ifndef TERN_H
#define TERN_H
#include <stddef.h>
#include <stdint.h>
#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define TERN_API __declspec(dllexport)
#else
#define TERN_API __attribute__((visibility("default")))
#endif

#define TERN_OK 0
#define TERN_ERR_INVALID 1     /* a bad argument (NULL handle, n out of range, ...) */
#define TERN_ERR_FORMAT 2      /* tensor sizes, shapes, types or offsets disagree */
#define TERN_ERR_NOMEM 3       /* an allocation failed */
#define TERN_ERR_UNSUPPORTED 4 /* valid but not handled (tensor type, ISA, ...) */
#define TERN_ERR_CANCELLED 5   /* tern_cancel() stopped the call */
#define TERN_ERR_CONTEXT 6     /* the tokens do not fit in the session's context */

TERN_API const char *tern_version(void);
TERN_API const char *tern_last_error(void);

/* Name of the kernel variant chosen for this CPU (honours TERN_ISA), e.g. "avx512-vnni".
 * NULL if TERN_ISA names a family this CPU cannot run (see tern_last_error). */
TERN_API const char *tern_kernel_name(void);

/* ---- Kernel test entry: run one named variant on caller buffers (exact int32 results) ----
 * op: 0 = gemv_t2, 1 = gemm_t2, 2 = gemv_i8, 3 = gemm_i8. w: packed T2 rows (layout.h) or
 * int8 rows; w_size: its bytes; x: n tokens of k int8 each, token t at x + t*k; y: n x rows
 * int32, token t at y + t*rows; only rows [r0, r1) are written. */
TERN_API int32_t tern_kernel_test(const char *variant, int32_t op, const void *w, uint64_t w_size,
                                  int64_t rows, int64_t k, const int8_t *x, int64_t n,
                                  int32_t *y, int64_t r0, int64_t r1);

#ifdef __cplusplus
}
#endif
#endif
