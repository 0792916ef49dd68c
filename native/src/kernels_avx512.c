/* AVX-512 VNNI GEMVs (compiled with -mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx512vnni).
 * T2: one zmm holds two 128-weight blocks (64 bytes). vpdpbusd multiplies the unsigned codes
 * by the signed activations and sums groups of four into int32 lanes; minus sum(x) gives the
 * ternary dot since w = code - 1. Four rows per pass share the activation registers. */
#include <immintrin.h>

#include "kernels.h"

/* Each pass reads four rows side by side; every load also prefetches the same spot of the next
 * four rows. A row of 2B4T is short (640 or 1728 bytes of codes), too short for the hardware
 * streamer to run ahead of four interleaved streams; a fixed distance along the row landed in
 * rows this pass was about to read anyway. One group ahead measured +5% (T2) and +4% (int8
 * head) decode tokens/s on 2 threads of the 2-vCPU SPR host. */
#define PREFETCH_GROUPS 1

static int32_t sum_i8(const int8_t *x, int64_t k)
{
    const __m512i ones = _mm512_set1_epi8(1);
    __m512i acc = _mm512_setzero_si512();
    for (int64_t i = 0; i < k; i += 64) {
        const __mmask64 m = k - i >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << (k - i)) - 1);
        acc = _mm512_dpbusd_epi32(acc, ones, _mm512_maskz_loadu_epi8(m, x + i));
    }
    return _mm512_reduce_add_epi32(acc);
}

/* Activations of a block pair arranged like the codes: lane half 0 = block 2p, half 1 = 2p+1. */
static inline void load_x_pair(const int8_t *xp, __m512i xv[4])
{
    for (int g = 0; g < 4; g++) {
        const __m256i lo = _mm256_loadu_si256((const __m256i *)(xp + 32 * g));
        const __m256i hi = _mm256_loadu_si256((const __m256i *)(xp + 128 + 32 * g));
        xv[g] = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
    }
}

/* The last, unpaired block: upper halves zero, so they add nothing. */
static inline void load_x_single(const int8_t *xb, __m512i xv[4])
{
    for (int g = 0; g < 4; g++)
        xv[g] = _mm512_zextsi256_si512(_mm256_loadu_si256((const __m256i *)(xb + 32 * g)));
}

/* Codes are not shifted down: group g is masked in place (bits 7-6, 5-4, 3-2, 1-0), so its
 * vpdpbusd sums (code << (6 - 2g)) * x, each group into its own accumulator, shifted back when
 * the row is done — exact, since every lane of group g's sum is a multiple of 2^(6 - 2g). This
 * saves the three shifts per 64 bytes that competed with vpdpbusd for port 0. */
typedef struct group_acc {
    __m512i g[4];
} group_acc;

static inline void dot_codes(group_acc *a, __m512i v, const __m512i xv[4])
{
    a->g[0] = _mm512_dpbusd_epi32(a->g[0], _mm512_and_si512(v, _mm512_set1_epi8((char)0xC0)), xv[0]);
    a->g[1] = _mm512_dpbusd_epi32(a->g[1], _mm512_and_si512(v, _mm512_set1_epi8(0x30)), xv[1]);
    a->g[2] = _mm512_dpbusd_epi32(a->g[2], _mm512_and_si512(v, _mm512_set1_epi8(0x0C)), xv[2]);
    a->g[3] = _mm512_dpbusd_epi32(a->g[3], _mm512_and_si512(v, _mm512_set1_epi8(0x03)), xv[3]);
}

/* Adds the groups, shifted back, to total and clears them. */
static inline __m512i flush(group_acc *a, __m512i total)
{
    total = _mm512_add_epi32(total, _mm512_srai_epi32(a->g[0], 6));
    total = _mm512_add_epi32(total, _mm512_srai_epi32(a->g[1], 4));
    total = _mm512_add_epi32(total, _mm512_srai_epi32(a->g[2], 2));
    total = _mm512_add_epi32(total, a->g[3]);
    for (int i = 0; i < 4; i++)
        a->g[i] = _mm512_setzero_si512();
    return total;
}

static inline __m512i load_single(const uint8_t *blk)
{
    return _mm512_zextsi256_si512(_mm256_loadu_si256((const __m256i *)blk));
}

/* A lane gains at most 4 * (2 << 6) * 128 = 65536 per block pair: flush every 2^14 pairs. */
#define FLUSH_PAIRS 16384

/* nr (1..4) rows starting at row, stride rb; constant nr after inlining. */
static inline __attribute__((always_inline)) void rows_n(const uint8_t *row, int64_t rb, int64_t nb,
                                                         const int8_t *x, int32_t xsum, int32_t *y,
                                                         const int nr)
{
    group_acc a[4];
    __m512i total[4];
    for (int r = 0; r < nr; r++) {
        total[r] = _mm512_setzero_si512();
        for (int i = 0; i < 4; i++)
            a[r].g[i] = _mm512_setzero_si512();
    }
    int64_t b = 0;
    while (b + 2 <= nb) {
        const int64_t end = b + 2 * FLUSH_PAIRS < nb ? b + 2 * FLUSH_PAIRS : nb;
        for (; b + 2 <= end; b += 2) {
            __m512i xv[4];
            load_x_pair(x + b * TERN_T2_BLOCK, xv);
            const uint8_t *p = row + b * TERN_T2_BLOCK_BYTES;
            for (int r = 0; r < nr; r++) {
                _mm_prefetch((const char *)(p + (r + 4 * PREFETCH_GROUPS) * rb), _MM_HINT_T0);
                dot_codes(&a[r], _mm512_loadu_si512(p + r * rb), xv);
            }
        }
        for (int r = 0; r < nr; r++)
            total[r] = flush(&a[r], total[r]);
    }
    if (b < nb) {
        __m512i xv[4];
        load_x_single(x + b * TERN_T2_BLOCK, xv);
        const uint8_t *p = row + b * TERN_T2_BLOCK_BYTES;
        for (int r = 0; r < nr; r++) {
            dot_codes(&a[r], load_single(p + r * rb), xv);
            total[r] = flush(&a[r], total[r]);
        }
    }
    for (int r = 0; r < nr; r++)
        y[r] = _mm512_reduce_add_epi32(total[r]) - xsum;
}

void tern_gemv_t2_avx512vnni(const uint8_t *w, int64_t k, const int8_t *x, int32_t *y,
                             int64_t r0, int64_t r1)
{
    const int64_t rb = tern_t2_row_bytes(k), nb = k / TERN_T2_BLOCK;
    const int32_t xsum = sum_i8(x, k);
    int64_t r = r0;
    for (; r + 4 <= r1; r += 4)
        rows_n(w + r * rb, rb, nb, x, xsum, y + r, 4);
    for (; r < r1; r++)
        rows_n(w + r * rb, rb, nb, x, xsum, y + r, 1);
}

/* Int8 x int8 with vpdpbusd (unsigned x signed): the weights go in as q + 128 (an xor, cheaper
 * than a second vpdpbusd for sum(q)), so the sum is q . x + 128 * sum(x), and sum(x) is taken
 * once per call. Masked loads take any k: masked-off lanes have x = 0 and add nothing. */
static inline __mmask64 tail_mask(int64_t left)
{
    return left >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << left) - 1);
}

static void i8_rows(const int8_t *q, int64_t k, const int8_t *x, int32_t xsum, int32_t *y, int nr)
{
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    __m512i acc[4];
    for (int j = 0; j < nr; j++)
        acc[j] = _mm512_setzero_si512();
    for (int64_t i = 0; i < k; i += 64) {
        const __mmask64 m = tail_mask(k - i);
        const __m512i xv = _mm512_maskz_loadu_epi8(m, x + i);
        for (int j = 0; j < nr; j++) {
            const __m512i qu = _mm512_xor_si512(_mm512_maskz_loadu_epi8(m, q + j * k + i), flip);
            _mm_prefetch((const char *)(q + (j + 4 * PREFETCH_GROUPS) * k + i), _MM_HINT_T0);
            acc[j] = _mm512_dpbusd_epi32(acc[j], qu, xv);
        }
    }
    for (int j = 0; j < nr; j++)
        y[j] = _mm512_reduce_add_epi32(acc[j]) - 128 * xsum;
}

void tern_gemv_i8_avx512vnni(const int8_t *q, int64_t k, const int8_t *x, int32_t *y,
                             int64_t r0, int64_t r1)
{
    const int32_t xsum = sum_i8(x, k);
    int64_t r = r0;
    for (; r + 4 <= r1; r += 4)
        i8_rows(q + r * k, k, x, xsum, y + r, 4);
    for (; r < r1; r++)
        i8_rows(q + r * k, k, x, xsum, y + r, 1);
}
