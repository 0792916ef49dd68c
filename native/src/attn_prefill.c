/* Dispatch for the batched prefill attention (baseline-compiled: it only checks the CPU and the
 * shape before calling attn_avx512.c), and its test entry. */
#include <math.h>
#include <stdlib.h>

#include "attn_prefill.h"
#include "error.h"
#include "kernels.h"
#include "tern.h"

bool tern_attention_prefill_supported(int32_t heads, int32_t hd, size_t scratch_bytes)
{
#ifdef TERN_HAVE_ATTN_AVX512
    const tern_attn_args shape = {.heads = heads, .hd = hd};
    return (tern_cpu_features() & TERN_CPU_AVX512) && hd > 0 && hd % 16 == 0 && hd <= 256 &&
           heads > 0 && scratch_bytes >= tern_attention_scratch_min(&shape);
#else
    (void)heads, (void)hd, (void)scratch_bytes;
    return false;
#endif
}

bool tern_attention_prefill(const tern_attn_args *a, void *scratch, size_t scratch_bytes)
{
    if (!tern_attention_prefill_supported(a->heads, a->hd, scratch_bytes) || a->n <= 0 ||
        a->first < 0 || ((uintptr_t)scratch & 63) != 0)
        return false;
#ifdef TERN_HAVE_ATTN_AVX512
    tern_attention_f16_avx512(a, scratch, scratch_bytes);
    return true;
#else
    return false;
#endif
}

int32_t tern_attention_test(const float *q, const uint16_t *k, const uint16_t *v, int32_t first,
                            int32_t n, int32_t heads, int32_t hd, uint64_t scratch_bytes,
                            float *out)
{
    if (!q || !k || !v || !out || first < 0 || n < 1 || heads < 1 || hd < 1 ||
        scratch_bytes > ((uint64_t)1 << 30))
        return tern_fail(TERN_ERR_INVALID, "attention test: bad arguments");
    const tern_attn_args a = {.q = q, .ldq = (int64_t)heads * hd, .k = k, .v = v, .ldkv = hd,
                              .out = out, .ldo = (int64_t)heads * hd, .first = first, .n = n,
                              .heads = heads, .hd = hd, .scale = 1.0f / sqrtf((float)hd)};
    void *scratch = aligned_alloc(64, (scratch_bytes + 64) & ~(uint64_t)63);
    if (!scratch)
        return tern_fail(TERN_ERR_NOMEM, "attention test: no memory for scratch");
    const bool done = tern_attention_prefill(&a, scratch, scratch_bytes);
    free(scratch);
    return done ? TERN_OK
                : tern_fail(TERN_ERR_UNSUPPORTED, "attention test: shape or CPU not handled");
}
