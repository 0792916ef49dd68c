/* Sessions: creation (every buffer tern_forward needs), threads, truncate/copy, forward. */
#include "session.h"

#include <stdlib.h>
#include <string.h>

#include "error.h"
#include "kv_cache.h"

/* Uninitialised: pages become resident only when first written (the KV cache fills as the
 * context grows; positions >= n_past are never read). */
static void *lazy_alloc(size_t bytes, uint64_t *total)
{
    const size_t rounded = (bytes + 4095) / 4096 * 4096;
    void *p = aligned_alloc(4096, rounded ? rounded : 4096);
    if (p)
        *total += rounded;
    return p;
}

static void *zalloc(size_t bytes, uint64_t *total)
{
    const size_t rounded = (bytes + 63) / 64 * 64;
    void *p = aligned_alloc(64, rounded ? rounded : 64);
    if (p) {
        memset(p, 0, rounded);
        *total += rounded;
    }
    return p;
}

static void free_scratch(tern_session *s)
{
    for (int32_t i = 0; s->ts && i < s->n_threads; i++) {
        thread_scratch *t = &s->ts[i];
        free(t->xq); free(t->xs); free(t->xf); free(t->acc); free(t->gemm); free(t->scores); free(t->row);
    }
    free(s->ts);
    s->ts = NULL;
    s->n_threads = 0;
}

static int32_t alloc_threads(tern_session *s, int32_t n)
{
    uint64_t total = 0;
    const size_t T = TERN_CHUNK;
    s->ts = calloc((size_t)n, sizeof *s->ts);
    if (!s->ts)
        return tern_fail(TERN_ERR_NOMEM, "session: out of memory for %d threads", n);
    s->n_threads = n;
    for (int32_t i = 0; i < n; i++) {
        thread_scratch *t = &s->ts[i];
        /* One row: a thread quantizes privately only single-token inputs (forward.c). */
        t->xq = zalloc((size_t)s->width, &total);
        t->xs = zalloc(sizeof(float), &total);
        t->xf = zalloc((size_t)s->width * sizeof(float), &total);
        t->acc = zalloc(T * (size_t)s->acc_rows * sizeof(int32_t), &total);
        t->gemm = zalloc(TERN_GEMM_SCRATCH_BYTES, &total);
        t->scores = zalloc((size_t)s->n_ctx * sizeof(float), &total);
        t->row = zalloc((size_t)s->m->n_embd * sizeof(float), &total);
        if (!t->xq || !t->xs || !t->xf || !t->acc || !t->gemm || !t->scores || !t->row)
            return tern_fail(TERN_ERR_NOMEM, "session: out of memory for thread scratch");
    }
    tern_pool_free(s->pool);
    s->pool = tern_pool_create(n);
    return s->pool ? TERN_OK : TERN_ERR_NOMEM;
}

int32_t tern_set_threads(tern_session *s, int32_t threads)
{
    if (!s)
        return tern_fail(TERN_ERR_INVALID, "tern_set_threads: NULL session");
    if (threads < 1)
        threads = 1;
    if (threads > 256)
        return tern_fail(TERN_ERR_INVALID, "tern_set_threads: %d threads is too many", threads);
    if (threads == s->n_threads && s->pool)
        return TERN_OK;
    free_scratch(s);
    return alloc_threads(s, threads);
}

static int32_t alloc_shared(tern_session *s)
{
    const tern_model *m = s->m;
    const size_t T = TERN_CHUNK;
    const size_t kv = (size_t)m->n_layer * (size_t)s->n_ctx * (size_t)s->kv_dim;
    uint64_t total = 0;
    s->k_cache = lazy_alloc(kv * s->kv_elem, &total);
    s->v_cache = lazy_alloc(kv * s->kv_elem, &total);
    if (s->kv_type == TERN_KV_INT8) {
        const size_t rows = (size_t)m->n_layer * (size_t)s->n_ctx * (size_t)m->n_head_kv;
        s->k_scale = lazy_alloc(rows * sizeof(float), &total);
        s->v_scale = lazy_alloc(rows * sizeof(float), &total);
        if (!s->k_scale || !s->v_scale)
            return tern_fail(TERN_ERR_NOMEM, "session: cannot allocate the int8 KV scales");
    }
    s->x = zalloc(T * (size_t)m->n_embd * sizeof(float), &total);
    s->qkv = zalloc(T * (size_t)s->qkv_dim * sizeof(float), &total);
    s->att = zalloc(T * (size_t)m->n_embd * sizeof(float), &total);
    s->ffn = zalloc(T * (size_t)m->n_ff * sizeof(float), &total);
    s->xq = zalloc(T * (size_t)s->width, &total);
    s->xs = zalloc(T * sizeof(float), &total);
    s->xf = zalloc(T * (size_t)s->width * sizeof(float), &total);
    s->rope_cos = zalloc(T * (size_t)m->head_dim / 2 * sizeof(float), &total);
    s->rope_sin = zalloc(T * (size_t)m->head_dim / 2 * sizeof(float), &total);
    s->n_phases = m->n_layer * 9 + 2; /* per layer 5, plus 4 input phases for prompt chunks */
    s->work = zalloc(2 * (size_t)s->n_phases * sizeof(*s->work), &total);
    const size_t splits = ((size_t)s->n_ctx + ATTN_SPLIT - 1) / ATTN_SPLIT;
    s->attn_part = zalloc(splits * (size_t)m->n_head * ((size_t)m->head_dim + 2) * sizeof(float), &total);
    s->attn_done = zalloc((size_t)m->n_head_kv * sizeof(*s->attn_done), &total);
    if (!s->k_cache || !s->v_cache || !s->x || !s->qkv || !s->att || !s->ffn || !s->rope_cos ||
        !s->rope_sin || !s->work || !s->xq || !s->xs || !s->xf || !s->attn_part || !s->attn_done)
        return tern_fail(TERN_ERR_NOMEM, "session: cannot allocate the KV cache and scratch "
                         "(%d positions)", s->n_ctx);
    return TERN_OK;
}

int32_t tern_session_create(tern_model *m, int32_t n_ctx, int32_t kv_type, int32_t threads,
                            tern_session **out)
{
    if (!m || !out)
        return tern_fail(TERN_ERR_INVALID, "tern_session_create: NULL argument");
    *out = NULL;
    if (n_ctx < 1 || n_ctx > (1 << 24))
        return tern_fail(TERN_ERR_INVALID, "n_ctx %d out of range", n_ctx);
    if (kv_type != TERN_KV_F16 && kv_type != TERN_KV_F32 && kv_type != TERN_KV_INT8)
        return tern_fail(TERN_ERR_INVALID, "unknown KV cache type %d", kv_type);
    tern_session *s = calloc(1, sizeof *s);
    if (!s)
        return tern_fail(TERN_ERR_NOMEM, "out of memory");
    s->m = m;
    s->n_ctx = n_ctx;
    s->kv_type = kv_type;
    s->kv_elem = kv_type == TERN_KV_F32 ? sizeof(float) : (kv_type == TERN_KV_INT8 ? 1 : sizeof(uint16_t));
    s->kv_dim = (int64_t)m->n_head_kv * m->head_dim;
    s->qkv_dim = m->n_embd + 2 * s->kv_dim;
    s->width = m->n_embd > m->n_ff ? m->n_embd : m->n_ff;
    s->acc_rows = HEAD_CHUNK > ROW_CHUNK_MAX ? HEAD_CHUNK : ROW_CHUNK_MAX;
    s->acc_rows = s->acc_rows > m->head_dim ? s->acc_rows : m->head_dim;
    int32_t st = alloc_shared(s);
    if (st == TERN_OK)
        st = tern_set_threads(s, threads);
    if (st != TERN_OK) {
        tern_session_free(s);
        return st;
    }
    *out = s;
    return TERN_OK;
}

void tern_session_free(tern_session *s)
{
    if (!s)
        return;
    tern_pool_free(s->pool);
    free_scratch(s);
    free(s->k_cache); free(s->v_cache); free(s->k_scale); free(s->v_scale); free(s->x); free(s->qkv); free(s->att); free(s->ffn);
    free(s->rope_cos); free(s->rope_sin); free(s->work); free(s->xq); free(s->xs); free(s->xf);
    free(s->attn_part); free((void *)s->attn_done);
    free(s);
}

int32_t tern_session_n_past(const tern_session *s) { return s ? s->n_past : 0; }

int32_t tern_session_truncate(tern_session *s, int32_t n)
{
    if (!s)
        return tern_fail(TERN_ERR_INVALID, "tern_session_truncate: NULL session");
    if (n < 0 || n > s->n_past)
        return tern_fail(TERN_ERR_INVALID, "truncate(%d) outside [0, %d]", n, s->n_past);
    s->n_past = n;
    return TERN_OK;
}

int32_t tern_session_copy(tern_session *dst, const tern_session *src)
{
    if (!dst || !src)
        return tern_fail(TERN_ERR_INVALID, "tern_session_copy: NULL session");
    if (dst->m != src->m || dst->kv_type != src->kv_type)
        return tern_fail(TERN_ERR_INVALID, "tern_session_copy: sessions of different models or KV types");
    if (src->n_past > dst->n_ctx)
        return tern_fail(TERN_ERR_CONTEXT, "tern_session_copy: %d positions do not fit a context of %d",
                         src->n_past, dst->n_ctx);
    const size_t bytes = (size_t)src->m->head_dim * (size_t)src->n_past * src->kv_elem;
    for (int32_t l = 0; l < src->m->n_layer; l++) {
        for (int64_t g = 0; g < src->m->n_head_kv; g++) {
            const size_t so = (size_t)tern_kv_row(src, l, 0, g) * src->kv_elem;
            const size_t d0 = (size_t)tern_kv_row(dst, l, 0, g) * dst->kv_elem;
            memcpy((char *)dst->k_cache + d0, (const char *)src->k_cache + so, bytes);
            memcpy((char *)dst->v_cache + d0, (const char *)src->v_cache + so, bytes);
        }
        if (src->kv_type == TERN_KV_INT8) {
            const size_t nh = (size_t)src->m->n_head_kv, sb = nh * (size_t)src->n_past * sizeof(float);
            memcpy(dst->k_scale + (size_t)l * dst->n_ctx * nh, src->k_scale + (size_t)l * src->n_ctx * nh, sb);
            memcpy(dst->v_scale + (size_t)l * dst->n_ctx * nh, src->v_scale + (size_t)l * src->n_ctx * nh, sb);
        }
    }
    dst->n_past = src->n_past;
    return TERN_OK;
}

void tern_cancel(tern_session *s)
{
    if (s)
        atomic_store(&s->cancel, 1);
}

void tern_session_set_trace(tern_session *s, tern_trace_fn fn, void *user)
{
    if (s) {
        s->trace = fn;
        s->trace_user = user;
    }
}

int32_t tern_forward(tern_session *s, const int32_t *tokens, int32_t n, float *out_logits,
                     int32_t all_logits)
{
    if (!s || !tokens || !out_logits || n < 1)
        return tern_fail(TERN_ERR_INVALID, "tern_forward: NULL argument or n = %d", n);
    if (n > s->n_ctx - s->n_past)
        return tern_fail(TERN_ERR_CONTEXT, "%d cached + %d new tokens exceed the context of %d",
                         s->n_past, n, s->n_ctx);
    for (int32_t i = 0; i < n; i++)
        if (tokens[i] < 0 || tokens[i] >= s->m->n_vocab)
            return tern_fail(TERN_ERR_INVALID, "token id %d at %d outside [0, %d)", tokens[i], i, s->m->n_vocab);
    atomic_store(&s->cancel, 0);
    const int32_t start = s->n_past;
    for (int32_t c = 0; c < n; c += TERN_CHUNK) {
        if (atomic_load(&s->cancel)) {
            s->n_past = start;
            return tern_fail(TERN_ERR_CANCELLED, "cancelled");
        }
        const int32_t len = n - c < TERN_CHUNK ? n - c : TERN_CHUNK;
        const bool last = c + len == n;
        float *logits = all_logits ? out_logits + (size_t)c * (size_t)s->m->n_vocab
                                   : (last ? out_logits : NULL);
        tern_forward_chunk(s, tokens + c, len, logits, all_logits != 0);
        s->n_past += len;
    }
    return TERN_OK;
}
