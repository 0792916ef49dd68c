/* Load-time repacking of ternary source tensors into the T2 layout (layout.h).
 * I2_S (x86) is the T2 layout already and is used in place; TQ2_0, TQ1_0 and float matrices
 * are unpacked row by row into an owned buffer. A packed code 3 (not ternary) is an error. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "error.h"
#include "f16.h"
#include "model.h"

#define QK_K 256
#define TQ2_BLOCK_BYTES 66
#define TQ1_BLOCK_BYTES 54

int64_t tern_ternary_src_bytes(int32_t type, int64_t rows, int64_t cols)
{
    const int64_t n = rows * cols; /* callers bound rows, cols <= 2^31 */
    switch (type) {
    case TERN_TYPE_I2_S: return cols % TERN_T2_BLOCK ? -1 : n / 4 + 4; /* codes + f32 scale */
    case TERN_TYPE_TQ2_0: return cols % QK_K ? -1 : n / QK_K * TQ2_BLOCK_BYTES;
    case TERN_TYPE_TQ1_0: return cols % QK_K ? -1 : n / QK_K * TQ1_BLOCK_BYTES;
    case TERN_TYPE_F32: return cols % TERN_T2_BLOCK ? -1 : 4 * n;
    case TERN_TYPE_F16:
    case TERN_TYPE_BF16: return cols % TERN_T2_BLOCK ? -1 : 2 * n;
    default: return -1;
    }
}

/* Any 2-bit field equal to 3 in these bytes? */
static bool has_code3(const uint8_t *p, int64_t n)
{
    uint8_t acc = 0;
    for (int64_t i = 0; i < n; i++)
        acc |= p[i] & (p[i] >> 1);
    return (acc & 0x55) != 0;
}

/* TQ2_0 block half h: byte 32h + m holds weight 128h + 32j + m at bit shift 2j, which is a T2
 * block with the four 2-bit fields in reverse order. */
static uint8_t reverse_fields(uint8_t b)
{
    return (uint8_t)(((b & 0x03) << 6) | ((b & 0x0c) << 2) | ((b & 0x30) >> 2) | ((b & 0xc0) >> 6));
}

static void tq2_row(const uint8_t *src, int64_t cols, uint8_t *dst)
{
    for (int64_t b = 0; b < cols / QK_K; b++)
        for (int i = 0; i < 64; i++)
            dst[64 * b + i] = reverse_fields(src[TQ2_BLOCK_BYTES * b + i]);
}

/* TQ1_0 (ggml-quants.c): qs[0:32] hold weights 0..159 (weight 32n + m in byte m), qs[32:48]
 * hold 160..239 (160 + 16n + m in byte 32 + m), qh[0:4] hold 240..255 (240 + 4n + j in byte j).
 * Trit n of a byte is ((uint8_t)(byte * 3^n) * 3) >> 8. */
static void tq1_block(const uint8_t *blk, uint8_t codes[QK_K])
{
    static const uint8_t pow3[5] = {1, 3, 9, 27, 81};
    static const int groups[3][3] = {{0, 32, 5}, {160, 16, 5}, {240, 4, 4}};
    int col = 0;
    for (int g = 0; g < 3; g++) {
        const int first = groups[g][0], nbytes = groups[g][1], ntrits = groups[g][2];
        for (int n = 0; n < ntrits; n++)
            for (int m = 0; m < nbytes; m++) {
                const uint8_t q = (uint8_t)(blk[col + m] * pow3[n]);
                codes[first + nbytes * n + m] = (uint8_t)(((uint16_t)q * 3) >> 8);
            }
        col += nbytes;
    }
}

/* 128 codes (0..2) -> one T2 block (layout.h). */
static void pack_block(const uint8_t codes[TERN_T2_BLOCK], uint8_t *dst)
{
    for (int j = 0; j < 32; j++)
        dst[j] = (uint8_t)((codes[j] << 6) | (codes[j + 32] << 4) | (codes[j + 64] << 2) | codes[j + 96]);
}

static void tq1_row(const uint8_t *src, int64_t cols, uint8_t *dst)
{
    uint8_t codes[QK_K];
    for (int64_t b = 0; b < cols / QK_K; b++) {
        tq1_block(src + TQ1_BLOCK_BYTES * b, codes);
        pack_block(codes, dst + 64 * b);
        pack_block(codes + TERN_T2_BLOCK, dst + 64 * b + 32);
    }
}

/* code = clamp(rint(w / scale), -1, 1) + 1 in float32, as quants.ternary_codes. */
static bool float_row(int32_t type, const uint8_t *src, int64_t cols, float scale, uint8_t *dst)
{
    uint8_t codes[TERN_T2_BLOCK];
    for (int64_t b = 0; b < cols / TERN_T2_BLOCK; b++) {
        for (int i = 0; i < TERN_T2_BLOCK; i++) {
            const int64_t k = b * TERN_T2_BLOCK + i;
            float w;
            if (type == TERN_TYPE_F32)
                memcpy(&w, src + 4 * k, 4);
            else {
                const uint16_t h = (uint16_t)(src[2 * k] | (src[2 * k + 1] << 8));
                w = type == TERN_TYPE_F16 ? tern_f16_to_f32(h) : tern_bf16_to_f32(h);
            }
            if (!isfinite(w))
                return false;
            const float r = nearbyintf(w / scale);
            codes[i] = r < 0.0f ? 0u : (r > 0.0f ? 2u : 1u);
        }
        pack_block(codes, dst + TERN_T2_BLOCK_BYTES * b);
    }
    return true;
}

int32_t tern_repack(const tern_matrix *src, const char *name, t2_matrix *m, uint64_t *alloc_bytes)
{
    const uint8_t *data = src->data;
    const int64_t rows = src->rows, cols = src->cols, rb = tern_t2_row_bytes(cols);
    m->rows = rows;
    m->cols = cols;
    m->scale = src->scale;
    m->owned = NULL;
    if (src->type == TERN_TYPE_I2_S) {
        if (has_code3(data, rows * rb))
            return tern_fail(TERN_ERR_FORMAT, "%s: packed code 3 is not a ternary value", name);
        m->codes = data;
        return TERN_OK;
    }
    const bool is_float = src->type == TERN_TYPE_F32 || src->type == TERN_TYPE_F16 || src->type == TERN_TYPE_BF16;
    if (is_float && !(src->scale > 0.0f))
        return tern_fail(TERN_ERR_FORMAT, "%s: ternarization scale %g must be positive", name, src->scale);
    const size_t bytes = ((size_t)(rows * rb) + 63) / 64 * 64;
    uint8_t *dst = aligned_alloc(64, bytes);
    if (!dst)
        return tern_fail(TERN_ERR_NOMEM, "%s: cannot allocate %zu bytes for the packed weights", name, bytes);
    const int64_t src_row = tern_ternary_src_bytes(src->type, 1, cols);
    for (int64_t r = 0; r < rows; r++) {
        const uint8_t *s = data + r * src_row;
        uint8_t *d = dst + r * rb;
        if (src->type == TERN_TYPE_TQ2_0)
            tq2_row(s, cols, d);
        else if (src->type == TERN_TYPE_TQ1_0)
            tq1_row(s, cols, d);
        else if (!float_row(src->type, s, cols, src->scale, d)) {
            free(dst);
            return tern_fail(TERN_ERR_FORMAT, "%s: non-finite weight in row %lld", name, (long long)r);
        }
    }
    if (src->type == TERN_TYPE_TQ2_0 && has_code3(dst, rows * rb)) {
        free(dst);
        return tern_fail(TERN_ERR_FORMAT, "%s: packed code 3 is not a ternary value", name);
    }
    m->codes = dst;
    m->owned = dst;
    *alloc_bytes += bytes;
    return TERN_OK;
}
