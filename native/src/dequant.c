/* Rows of the embedding types: F32, F16, BF16 and the ggml block types Q8_0, Q4_0, Q6_K
 * (layouts of ggml-common.h; the same arithmetic as engine/quants.py). */
#include <string.h>

#include "f16.h"
#include "model.h"

int64_t tern_embd_row_bytes(int32_t type, int64_t n)
{
    switch (type) {
    case TERN_TYPE_F32: return 4 * n;
    case TERN_TYPE_F16:
    case TERN_TYPE_BF16: return 2 * n;
    case TERN_TYPE_Q8_0: return n % 32 ? -1 : n / 32 * 34;
    case TERN_TYPE_Q4_0: return n % 32 ? -1 : n / 32 * 18;
    case TERN_TYPE_Q6_K: return n % 256 ? -1 : n / 256 * 210;
    default: return -1;
    }
}

static uint16_t u16(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }

static void q6_k_block(const uint8_t *b, float *dst)
{
    const uint8_t *ql = b, *qh = b + 128;
    const int8_t *sc = (const int8_t *)(b + 192);
    const float d = tern_f16_to_f32(u16(b + 208));
    for (int w = 0; w < 256; w++) {
        const int h = w / 128, g = (w % 128) / 32, l = w % 32;
        const int low = (ql[64 * h + l + 32 * (g % 2)] >> (4 * (g / 2))) & 0x0f;
        const int high = (qh[32 * h + l] >> (2 * g)) & 0x03;
        const int q = (low | (high << 4)) - 32;
        dst[w] = (float)q * (d * (float)sc[w / 16]);
    }
}

void tern_dequant_row(int32_t type, const uint8_t *src, int64_t n, float *dst)
{
    switch (type) {
    case TERN_TYPE_F32:
        memcpy(dst, src, (size_t)n * 4);
        break;
    case TERN_TYPE_F16:
        for (int64_t i = 0; i < n; i++)
            dst[i] = tern_f16_to_f32(u16(src + 2 * i));
        break;
    case TERN_TYPE_BF16:
        for (int64_t i = 0; i < n; i++)
            dst[i] = tern_bf16_to_f32(u16(src + 2 * i));
        break;
    case TERN_TYPE_Q8_0:
        for (int64_t b = 0; b < n / 32; b++) {
            const uint8_t *blk = src + 34 * b;
            const float d = tern_f16_to_f32(u16(blk));
            for (int j = 0; j < 32; j++)
                dst[32 * b + j] = (float)(int8_t)blk[2 + j] * d;
        }
        break;
    case TERN_TYPE_Q4_0:
        for (int64_t b = 0; b < n / 32; b++) {
            const uint8_t *blk = src + 18 * b;
            const float d = tern_f16_to_f32(u16(blk));
            for (int j = 0; j < 16; j++) {
                dst[32 * b + j] = (float)((blk[2 + j] & 0x0f) - 8) * d;
                dst[32 * b + j + 16] = (float)((blk[2 + j] >> 4) - 8) * d;
            }
        }
        break;
    case TERN_TYPE_Q6_K:
        for (int64_t b = 0; b < n / 256; b++)
            q6_k_block(src + 210 * b, dst + 256 * b);
        break;
    default:
        break; /* unreachable: types are checked at model create */
    }
}
