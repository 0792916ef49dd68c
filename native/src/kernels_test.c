/* tern_kernel_test: lets the Python tests call one specific variant on their own buffers,
 * so every variant the host runs can be compared with the scalar one. */
#include <stdlib.h>

#include "error.h"
#include "kernels.h"
#include "tern.h"

static int32_t check_args(int32_t op, uint64_t w_size, int64_t rows, int64_t k, int64_t n,
                          int64_t r0, int64_t r1)
{
    if (op < 0 || op > 3)
        return tern_fail(TERN_ERR_INVALID, "kernel test: op %d is not 0..3", op);
    if (rows < 0 || k <= 0 || n <= 0 || r0 < 0 || r1 < r0 || r1 > rows)
        return tern_fail(TERN_ERR_INVALID, "kernel test: bad sizes rows=%lld k=%lld n=%lld [%lld,%lld)",
                         (long long)rows, (long long)k, (long long)n, (long long)r0, (long long)r1);
    const bool t2 = op < 2;
    if (t2 && k % TERN_T2_BLOCK != 0)
        return tern_fail(TERN_ERR_INVALID, "kernel test: k=%lld is not a multiple of %d",
                         (long long)k, TERN_T2_BLOCK);
    const uint64_t need = (uint64_t)rows * (uint64_t)(t2 ? tern_t2_row_bytes(k) : k);
    if (w_size < need)
        return tern_fail(TERN_ERR_INVALID, "kernel test: %llu weight bytes, need %llu",
                         (unsigned long long)w_size, (unsigned long long)need);
    if ((op == 0 || op == 2) && n != 1)
        return tern_fail(TERN_ERR_INVALID, "kernel test: a GEMV takes one token, got %lld", (long long)n);
    return TERN_OK;
}

int32_t tern_kernel_test(const char *variant, int32_t op, const void *w, uint64_t w_size,
                         int64_t rows, int64_t k, const int8_t *x, int64_t n, int32_t *y,
                         int64_t r0, int64_t r1)
{
    tern_lib_init();
    const int32_t st = check_args(op, w_size, rows, k, n, r0, r1);
    if (st != TERN_OK)
        return st;
    const tern_kernels *kv = variant ? tern_kernels_by_name(variant) : NULL;
    if (!kv)
        return tern_fail(TERN_ERR_UNSUPPORTED, "kernel variant '%s' is unknown or cannot run here",
                         variant ? variant : "(null)");
    void *scratch = NULL;
    if (op == 1 || op == 3) {
        scratch = aligned_alloc(64, TERN_GEMM_SCRATCH_BYTES);
        if (!scratch)
            return tern_fail(TERN_ERR_NOMEM, "kernel test: no memory for scratch");
    }
    switch (op) {
    case 0: kv->gemv_t2(w, k, x, y, r0, r1); break;
    case 1: kv->gemm_t2(w, k, x, k, n, y, rows, r0, r1, scratch); break;
    case 2: kv->gemv_i8(w, k, x, y, r0, r1); break;
    default: kv->gemm_i8(w, k, x, k, n, y, rows, r0, r1, scratch); break;
    }
    free(scratch);
    return TERN_OK;
}
