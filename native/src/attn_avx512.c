/* Batched causal attention for prompt chunks, AVX-512 F (compiled with -mavx512f; see
 * attn_prefill.h for the contract).
 *
 * Per block of TB tokens and the heads of one KV group, positions are visited in blocks of PB:
 * the block's K rows are converted from f16 once and transposed (kt[d][p], so one FMA covers
 * 16 positions of one query row), its V rows converted (vf[p][d]); every query row of the
 * token block then uses them. Softmax is the online (running max) form, so scratch does not
 * grow with the context: per row a running max m, a running sum l and an output accumulator.
 */
#include <assert.h>
#include <immintrin.h>
#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <string.h>

#include "attn_prefill.h"

#define PB 64      /* positions per block: 4 zmm of scores per query row */
#define TB_MAX 16  /* tokens per block */
#define ROWS 4     /* query rows (heads) per score pass */

static_assert(PB == 4 * 16, "score passes hold 4 zmm per row");

/* ---- e^x for x <= 0 (x = -inf gives 0): 2^n * poly(r), |r| <= ln2/2, ~1 ulp ---- */
static inline __m512 exp_ps(__m512 x)
{
    const __m512 lo = _mm512_set1_ps(-88.0f);
    const __mmask16 tiny = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ);
    x = _mm512_max_ps(x, lo);
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.0f / 720.0f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_maskz_scalef_ps((__mmask16)~tiny, p, n);
}

/* ---- K/V block: f16 -> f32, K transposed ---- */

/* r[i] = 16 values of row i -> r[d] = value d of rows 0..15 */
static inline void transpose16(__m512 r[16])
{
    __m512 t[16], u[16];
    for (int k = 0; k < 8; k++) {
        t[2 * k] = _mm512_unpacklo_ps(r[2 * k], r[2 * k + 1]);
        t[2 * k + 1] = _mm512_unpackhi_ps(r[2 * k], r[2 * k + 1]);
    }
    for (int k = 0; k < 4; k++) {
        const __m512d a = _mm512_castps_pd(t[4 * k]), b = _mm512_castps_pd(t[4 * k + 1]);
        const __m512d c = _mm512_castps_pd(t[4 * k + 2]), d = _mm512_castps_pd(t[4 * k + 3]);
        u[4 * k] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
        u[4 * k + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
        u[4 * k + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
        u[4 * k + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
    }
    /* u[4k + c], 128-bit lane L: rows 4k..4k+3 of column 4L + c */
    for (int c = 0; c < 4; c++) {
        const __m512 x0 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0x44);
        const __m512 x1 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0xEE);
        const __m512 y0 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x44);
        const __m512 y1 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xEE);
        r[c] = _mm512_shuffle_f32x4(x0, y0, 0x88);
        r[4 + c] = _mm512_shuffle_f32x4(x0, y0, 0xDD);
        r[8 + c] = _mm512_shuffle_f32x4(x1, y1, 0x88);
        r[12 + c] = _mm512_shuffle_f32x4(x1, y1, 0xDD);
    }
}

static inline __m512 load_f16(const uint16_t *p)
{
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(const void *)p));
}

/* 16 values of a cached row, as floats: f16, or int8 times the row's scale. */
static inline __attribute__((always_inline)) __m512 load_row(const tern_attn_args *a, bool v, int32_t p,
                                                             int32_t dc, bool q8)
{
    if (!q8)
        return load_f16((v ? a->v : a->k) + (int64_t)p * a->ldkv + dc);
    const int8_t *row = (v ? a->v8 : a->k8) + (int64_t)p * a->ldkv + dc;
    const __m512 x = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(const void *)row)));
    return _mm512_mul_ps(x, _mm512_set1_ps((v ? a->vs : a->ks)[(int64_t)p * a->lds]));
}

/* kt[d * PB + j] = k[p0 + j][d], vf[j * hd + d] = v[p0 + j][d]; rows j >= np are zero. The next
 * block's rows are prefetched (the cache is read front to back). q8: the cache is int8. */
static inline __attribute__((always_inline)) void load_block_of(const tern_attn_args *a, int32_t p0, int32_t np,
                                                                float *kt, float *vf, bool q8)
{
    const int32_t hd = a->hd;
    for (int32_t j0 = 0; j0 < PB; j0 += 16) {
        for (int32_t dc = 0; dc < hd; dc += 16) {
            __m512 r[16];
            for (int32_t i = 0; i < 16; i++)
                r[i] = j0 + i < np ? load_row(a, false, p0 + j0 + i, dc, q8) : _mm512_setzero_ps();
            transpose16(r);
            for (int32_t i = 0; i < 16; i++)
                _mm512_store_ps(kt + (int64_t)(dc + i) * PB + j0, r[i]);
        }
    }
    const int64_t row_bytes = q8 ? hd : 2 * hd;
    const char *k = q8 ? (const char *)a->k8 : (const char *)a->k;
    const char *v = q8 ? (const char *)a->v8 : (const char *)a->v;
    for (int32_t j = 0; j < PB; j++) {
        const int64_t next = (int64_t)(p0 + PB + j) * a->ldkv * (row_bytes / hd);
        for (int64_t b = 0; b < row_bytes; b += 64) {
            _mm_prefetch(k + next + b, _MM_HINT_T0);
            _mm_prefetch(v + next + b, _MM_HINT_T0);
        }
        for (int32_t dc = 0; dc < hd; dc += 16)
            _mm512_store_ps(vf + (int64_t)j * hd + dc,
                            j < np ? load_row(a, true, p0 + j, dc, q8) : _mm512_setzero_ps());
    }
}

static void load_block(const tern_attn_args *a, int32_t p0, int32_t np, float *kt, float *vf)
{
    if (a->k8)
        load_block_of(a, p0, np, kt, vf, true);
    else
        load_block_of(a, p0, np, kt, vf, false);
}

/* ---- scores and the online softmax ---- */

/* s[r][0..PB) = q_r . k[p] for query rows q[r] (hd floats each), rows < nr. */
static inline __attribute__((always_inline)) void scores(const float *const q[ROWS], int nr,
                                                          const float *kt, int32_t hd,
                                                          float s[ROWS][PB])
{
    __m512 acc[ROWS][4];
#pragma GCC unroll 4
    for (int r = 0; r < nr; r++)
        for (int c = 0; c < 4; c++)
            acc[r][c] = _mm512_setzero_ps();
    for (int32_t d = 0; d < hd; d++) {
        const float *row = kt + (int64_t)d * PB;
        const __m512 k0 = _mm512_load_ps(row), k1 = _mm512_load_ps(row + 16);
        const __m512 k2 = _mm512_load_ps(row + 32), k3 = _mm512_load_ps(row + 48);
#pragma GCC unroll 4
        for (int r = 0; r < nr; r++) {
            const __m512 qb = _mm512_set1_ps(q[r][d]);
            acc[r][0] = _mm512_fmadd_ps(qb, k0, acc[r][0]);
            acc[r][1] = _mm512_fmadd_ps(qb, k1, acc[r][1]);
            acc[r][2] = _mm512_fmadd_ps(qb, k2, acc[r][2]);
            acc[r][3] = _mm512_fmadd_ps(qb, k3, acc[r][3]);
        }
    }
#pragma GCC unroll 4
    for (int r = 0; r < nr; r++)
        for (int c = 0; c < 4; c++)
            _mm512_storeu_ps(s[r] + 16 * c, acc[r][c]);
}

typedef struct {
    float *o;  /* hd accumulators */
    float *m;  /* running max of scaled scores */
    float *l;  /* running sum of e^(score - m) */
} row_state;

/* Softmax part of folding one block into a row: s holds its raw scores and gets
 * p = e^(scale * s - m_new) (0 past `valid`); m, l are updated. Returns the factor
 * e^(m_old - m_new) by which the row's output accumulator must be rescaled. */
static float softmax_block(const row_state *st, float *s, int32_t valid, float scale)
{
    __m512 x[4];
    __mmask16 mask[4];
    float bmax = -INFINITY;
    for (int c = 0; c < 4; c++) {
        const int32_t left = valid - 16 * c;
        mask[c] = left >= 16 ? (__mmask16)0xFFFF : left <= 0 ? 0 : (__mmask16)((1u << left) - 1u);
        x[c] = _mm512_mul_ps(_mm512_loadu_ps(s + 16 * c), _mm512_set1_ps(scale));
        if (mask[c]) {
            const float mc = _mm512_mask_reduce_max_ps(mask[c], x[c]);
            bmax = mc > bmax ? mc : bmax;
        }
    }
    const float m_new = *st->m > bmax ? *st->m : bmax;
    const float corr = expf(*st->m - m_new); /* 0 on the first block (m = -inf) */
    __m512 sum = _mm512_setzero_ps();
    for (int c = 0; c < 4; c++) {
        const __m512 p = _mm512_maskz_mov_ps(mask[c], exp_ps(_mm512_sub_ps(x[c], _mm512_set1_ps(m_new))));
        sum = _mm512_add_ps(sum, p);
        _mm512_storeu_ps(s + 16 * c, p);
    }
    *st->l = *st->l * corr + _mm512_reduce_add_ps(sum);
    *st->m = m_new;
    return corr;
}

/* o_r[0..16 nc) = o_r * corr_r + sum_j p_r[j] v[j] for nr (1 or 2) rows sharing each V load;
 * nc (<= 8) is a constant after inlining, so the accumulators stay in registers. */
static inline __attribute__((always_inline)) void pv_rows(float *const o[2], const float *const p[2],
                                                           const float corr[2], int nr, int nc,
                                                           const float *vf, int64_t ldv, int32_t valid)
{
    __m512 acc[2][8];
#pragma GCC unroll 2
    for (int r = 0; r < nr; r++)
#pragma GCC unroll 8
        for (int c = 0; c < nc; c++)
            acc[r][c] = _mm512_mul_ps(_mm512_loadu_ps(o[r] + 16 * c), _mm512_set1_ps(corr[r]));
    for (int32_t j = 0; j < valid; j++) {
        const float *vrow = vf + (int64_t)j * ldv;
        __m512 v[8];
#pragma GCC unroll 8
        for (int c = 0; c < nc; c++)
            v[c] = _mm512_load_ps(vrow + 16 * c);
#pragma GCC unroll 2
        for (int r = 0; r < nr; r++) {
            const __m512 pj = _mm512_set1_ps(p[r][j]);
#pragma GCC unroll 8
            for (int c = 0; c < nc; c++)
                acc[r][c] = _mm512_fmadd_ps(pj, v[c], acc[r][c]);
        }
    }
#pragma GCC unroll 2
    for (int r = 0; r < nr; r++)
#pragma GCC unroll 8
        for (int c = 0; c < nc; c++)
            _mm512_storeu_ps(o[r] + 16 * c, acc[r][c]);
}

/* P.V of up to two rows over the whole head, in 128-wide slices (8 accumulators per row). */
static void pv_pair(float *const o[2], const float *const p[2], const float corr[2], int nr,
                    const float *vf, int32_t hd, int32_t valid)
{
    for (int32_t d0 = 0; d0 < hd; d0 += 128) {
        float *const od[2] = {o[0] + d0, nr > 1 ? o[1] + d0 : NULL};
        const int nc = (hd - d0) / 16 < 8 ? (hd - d0) / 16 : 8;
        if (nc == 8 && nr == 2)
            pv_rows(od, p, corr, 2, 8, vf + d0, hd, valid);
        else if (nc == 8)
            pv_rows(od, p, corr, 1, 8, vf + d0, hd, valid);
        else
            for (int r = 0; r < nr; r++) /* a head size not a multiple of 128: one slice of 16 */
                for (int c = 0; c < nc; c++) {
                    float *const o1[2] = {od[r] + 16 * c, NULL};
                    const float *const p1[2] = {p[r], NULL};
                    const float c1[2] = {corr[r], 0.0f};
                    pv_rows(o1, p1, c1, 1, 1, vf + d0 + 16 * c, hd, valid);
                }
    }
}

/* ---- driver ---- */

typedef struct {
    float *kt, *vf, *o, *m, *l;
    int32_t tb;
} attn_scratch;

static size_t round64(size_t floats) { return (floats + 15) & ~(size_t)15; }

static size_t per_token_floats(const tern_attn_args *a)
{
    return round64((size_t)a->heads * (size_t)a->hd) + 2 * round64((size_t)a->heads);
}

size_t tern_attention_scratch_min(const tern_attn_args *a)
{
    return (2 * round64((size_t)PB * (size_t)a->hd) + per_token_floats(a)) * sizeof(float);
}

static attn_scratch split_scratch(const tern_attn_args *a, void *scratch, size_t bytes)
{
    attn_scratch sc;
    const size_t blk = round64((size_t)PB * (size_t)a->hd);
    sc.kt = scratch;
    sc.vf = sc.kt + blk;
    const size_t per_tok = per_token_floats(a);
    const size_t fit = (bytes / sizeof(float) - 2 * blk) / per_tok;
    sc.tb = (int32_t)(fit < TB_MAX ? fit : TB_MAX);
    sc.o = sc.vf + blk;
    sc.m = sc.o + round64((size_t)sc.tb * (size_t)a->heads * (size_t)a->hd);
    sc.l = sc.m + round64((size_t)sc.tb * (size_t)a->heads);
    return sc;
}

/* Tokens [t0, t0 + nt) of a over every position block they attend to. */
static void token_block(const tern_attn_args *a, const attn_scratch *sc, int32_t t0, int32_t nt)
{
    const int32_t H = a->heads, hd = a->hd;
    const int32_t limit = a->limit > 0 ? a->limit : INT32_MAX;
    int32_t end = a->first + t0 + nt; /* positions [begin, end) */
    end = end < limit ? end : limit;
    for (int32_t i = 0; i < nt * H; i++)
        sc->m[i] = -INFINITY, sc->l[i] = 0.0f;
    memset(sc->o, 0, sizeof(float) * (size_t)nt * (size_t)H * (size_t)hd);
    float s[ROWS][PB];
    for (int32_t p0 = a->begin; p0 < end; p0 += PB) {
        load_block(a, p0, end - p0 < PB ? end - p0 : PB, sc->kt, sc->vf);
        for (int32_t t = 0; t < nt; t++) {
            const int32_t own_end = a->first + t0 + t + 1; /* causal: up to the token itself */
            const int32_t npos = (own_end < end ? own_end : end) - p0;
            if (npos <= 0)
                continue;
            const int32_t valid = npos < PB ? npos : PB;
            for (int32_t h0 = 0; h0 < H; h0 += ROWS) {
                const int nr = H - h0 < ROWS ? H - h0 : ROWS;
                const float *q[ROWS];
                for (int r = 0; r < nr; r++)
                    q[r] = a->q + (int64_t)(t0 + t) * a->ldq + (int64_t)(h0 + r) * hd;
                switch (nr) {
                case 4: scores(q, 4, sc->kt, hd, s); break;
                case 3: scores(q, 3, sc->kt, hd, s); break;
                case 2: scores(q, 2, sc->kt, hd, s); break;
                default: scores(q, 1, sc->kt, hd, s); break;
                }
                float corr[ROWS];
                for (int r = 0; r < nr; r++) {
                    const int32_t row = t * H + h0 + r;
                    const row_state st = {sc->o + (int64_t)row * hd, sc->m + row, sc->l + row};
                    corr[r] = softmax_block(&st, s[r], valid, a->scale);
                }
                for (int r = 0; r < nr; r += 2) {
                    const int32_t row = t * H + h0 + r;
                    float *const o[2] = {sc->o + (int64_t)row * hd, sc->o + (int64_t)(row + 1) * hd};
                    const float *const p[2] = {s[r], s[r + 1 < ROWS ? r + 1 : r]};
                    const float c2[2] = {corr[r], r + 1 < nr ? corr[r + 1] : 0.0f};
                    pv_pair(o, p, c2, nr - r < 2 ? 1 : 2, sc->vf, hd, valid);
                }
            }
        }
    }
    if (a->partial) {
        for (int32_t row = 0; row < nt * H; row++) {
            float *dst = a->partial + ((int64_t)t0 * H + row) * (hd + 2);
            dst[0] = sc->m[row], dst[1] = sc->l[row];
            memcpy(dst + 2, sc->o + (int64_t)row * hd, sizeof(float) * (size_t)hd);
        }
        return;
    }
    for (int32_t t = 0; t < nt; t++)
        for (int32_t h = 0; h < H; h++) {
            const int32_t row = t * H + h;
            const __m512 inv = _mm512_set1_ps(1.0f / sc->l[row]);
            float *dst = a->out + (int64_t)(t0 + t) * a->ldo + (int64_t)h * hd;
            for (int32_t dc = 0; dc < hd; dc += 16)
                _mm512_storeu_ps(dst + dc, _mm512_mul_ps(_mm512_loadu_ps(sc->o + (int64_t)row * hd + dc), inv));
        }
}

void tern_attention_f16_avx512(const tern_attn_args *a, void *scratch, size_t scratch_bytes)
{
    const attn_scratch sc = split_scratch(a, scratch, scratch_bytes);
    for (int32_t t0 = 0; t0 < a->n; t0 += sc.tb)
        token_block(a, &sc, t0, a->n - t0 < sc.tb ? a->n - t0 : sc.tb);
}
