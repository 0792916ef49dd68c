/* Causal attention of a block of tokens over an f16 KV cache, for the query heads of one KV
 * group (helper H4b; attn_prefill.c). Each converted K/V row serves every query row of the
 * block (tokens x the group's heads), which is what makes it pay for prompts; forward.c also
 * uses it for one decoded token (one pass over K/V for the group's heads).
 *
 * Token t (0 <= t < n) is at absolute position first + t and attends to cached positions
 * 0..first+t (which must already hold its own K/V). For head i of the group:
 *   out[t][i] = softmax_p(scale * q[t][i] . k[p]) . v[p]
 */
#ifndef TERN_ATTN_PREFILL_H
#define TERN_ATTN_PREFILL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct tern_attn_args {
    const float *q;        /* head i of token t at q + t*ldq + i*hd */
    int64_t ldq;
    const uint16_t *k, *v; /* f16 rows of this KV group: position p at k + p*ldkv */
    int64_t ldkv;
    float *out;            /* head i of token t at out + t*ldo + i*hd */
    int64_t ldo;
    int32_t first, n;      /* absolute position of token 0; number of tokens */
    int32_t heads, hd;     /* query heads of the group; head dimension */
    float scale;           /* usually 1 / sqrt(hd) */
    /* A part of the positions (decode split across threads): only positions in
     * [begin, limit) are attended, and with `partial` set the result is not normalized: head i
     * of token t gets [m, l, o[hd]] at partial + (t*heads + i)*(hd + 2), the running max of the
     * scaled scores, the sum of e^(score - m) and sum e^(score - m) v (m = -inf, l = 0: no
     * position). Zero-initialized args (begin 0, limit 0 = no limit, partial NULL): the whole
     * causal range, normalized into out. */
    int32_t begin, limit;
    float *partial;
    /* An int8 cache instead of f16 (k8 set): value i of position p is k8[p*ldkv + i] * ks[p*lds]
     * (the same for V); k and v are then unused. */
    const int8_t *k8, *v8;
    const float *ks, *vs;
    int64_t lds;
} tern_attn_args;

/* Runs the batched kernel if this CPU and the shape allow it (AVX-512 F, hd a multiple of 16
 * up to 256, scratch_bytes >= tern_attention_scratch_min); returns false, having done nothing,
 * otherwise, and the caller runs its per-head path. attn_prefill.c, baseline-compiled. */
bool tern_attention_prefill(const tern_attn_args *a, void *scratch, size_t scratch_bytes);
/* Whether tern_attention_prefill would run for this group size, head size and scratch (so that
 * every thread of a phase takes the same path before taking work items). */
bool tern_attention_prefill_supported(int32_t heads, int32_t hd, size_t scratch_bytes);
size_t tern_attention_scratch_min(const tern_attn_args *a);

/* attn_avx512.c (-mavx512f): the kernel itself, for the cases tern_attention_prefill accepts. */
void tern_attention_f16_avx512(const tern_attn_args *a, void *scratch, size_t scratch_bytes);

#endif
