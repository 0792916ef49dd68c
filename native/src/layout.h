/* The packed weight layouts every kernel reads. Fixed: SIMD code adapts to these layouts,
 * never the other way round. Repacking from the file's format happens once, at load.
 *
 * Ternary matrix (BitLinear weight), "T2":
 *   rows x K weights w in {-1, 0, +1}, row-major, K a multiple of TERN_T2_BLOCK (128).
 *   Each row is K/128 blocks of 32 bytes. In a block, byte k (0..31) holds the 2-bit codes
 *   of weights k (bits 7-6), k+32 (bits 5-4), k+64 (bits 3-2) and k+96 (bits 1-0);
 *   code = w + 1, so codes are 0, 1, 2 (3 never occurs). One f32 scale per matrix: W = w * scale.
 *   2 bits per weight; a row is K/4 bytes; rows are contiguous (row r at r * K/4).
 *   This is bitnet.cpp's x86 I2_S block applied per row; because K is a multiple of 128,
 *   an I2_S tensor's flat array is already this layout and is used in place from the mmap.
 *
 *   Why codes (w + 1) and not signed values: int8 multiply-add instructions (vpdpbusd,
 *   maddubs) take one unsigned operand; code * x summed, minus sum(x), is exactly w . x.
 *
 * Int8 matrix (LM head copy), "I8":
 *   rows x K int8 values q, row-major, contiguous (row r at r * K), one f32 scale per row:
 *   W[r][k] ~= q[r][k] * scale[r], with scale[r] = max_k |W[r][k]| / 127 and
 *   q = round_half_even(W * (1 / scale)) in [-127, 127]. 8 bits per weight + 32 bits per row.
 *
 * Activations: one token is K int8 values a with one f32 scale s (x ~= a / s), from absmax
 * quantization: s = 127 / max(|x|, 1e-5), a = clamp(round_half_even(x * s), -128, 127).
 */
#ifndef TERN_LAYOUT_H
#define TERN_LAYOUT_H

#include <assert.h>
#include <stdint.h>

#define TERN_T2_BLOCK 128            /* weights per block */
#define TERN_T2_BLOCK_BYTES 32       /* bytes per block */
#define TERN_T2_BITS_PER_WEIGHT 2
#define TERN_T2_CODE_MINUS 0u        /* code of -1 */
#define TERN_T2_CODE_ZERO 1u         /* code of  0 */
#define TERN_T2_CODE_PLUS 2u         /* code of +1 */

static_assert(TERN_T2_BLOCK_BYTES * 8 == TERN_T2_BLOCK * TERN_T2_BITS_PER_WEIGHT,
              "a T2 block is 128 weights at 2 bits");
static_assert(TERN_T2_BLOCK == 4 * TERN_T2_BLOCK_BYTES, "4 weights per byte, 32 apart");

/* I8: 8 bits per weight plus one f32 scale per row. */
#define TERN_I8_BITS_PER_WEIGHT 8

/* Bytes of one packed T2 row of k weights (k a multiple of TERN_T2_BLOCK). */
static inline int64_t tern_t2_row_bytes(int64_t k) { return k / 4; }

#endif
