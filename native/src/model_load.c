/* tern_model_create: every size, shape, type and range is checked before anything is read;
 * a bad input returns TERN_ERR_FORMAT / TERN_ERR_INVALID with the tensor named. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "error.h"
#include "f16.h"
#include "model.h"

#define MAX_DIM (1LL << 31)

static int32_t check_range(const tern_model_params *p, const void *data, uint64_t size, const char *name)
{
    if (!data)
        return tern_fail(TERN_ERR_INVALID, "%s: no data", name);
    const uintptr_t base = (uintptr_t)p->file_base, at = (uintptr_t)data;
    if (!p->file_base || at < base || at - base > p->file_size || size > p->file_size - (at - base))
        return tern_fail(TERN_ERR_FORMAT, "%s: %llu bytes at offset %lld lie outside the %llu-byte file",
                         name, (unsigned long long)size, (long long)(at - base), (unsigned long long)p->file_size);
    return TERN_OK;
}

static int32_t check_ternary(const tern_model_params *p, const tern_matrix *t, const char *name,
                             int64_t rows, int64_t cols)
{
    if (t->rows != rows || t->cols != cols)
        return tern_fail(TERN_ERR_FORMAT, "%s: shape %lld x %lld, expected %lld x %lld", name,
                         (long long)t->rows, (long long)t->cols, (long long)rows, (long long)cols);
    const int64_t need = tern_ternary_src_bytes(t->type, rows, cols);
    if (need < 0)
        return tern_fail(TERN_ERR_UNSUPPORTED, "%s: type %d with %lld columns is not a supported ternary matrix",
                         name, t->type, (long long)cols);
    if (t->size < (uint64_t)need)
        return tern_fail(TERN_ERR_FORMAT, "%s: %llu bytes, its shape needs %lld", name,
                         (unsigned long long)t->size, (long long)need);
    if (!isfinite(t->scale))
        return tern_fail(TERN_ERR_FORMAT, "%s: scale %g is not finite", name, t->scale);
    return check_range(p, t->data, (uint64_t)need, name);
}

static int32_t check_embd(const tern_model_params *p, const tern_matrix *t, const char *name, embd_matrix *out)
{
    if (t->rows != p->n_vocab || t->cols != p->n_embd)
        return tern_fail(TERN_ERR_FORMAT, "%s: shape %lld x %lld, expected %d x %d", name,
                         (long long)t->rows, (long long)t->cols, p->n_vocab, p->n_embd);
    const int64_t rb = tern_embd_row_bytes(t->type, t->cols);
    if (rb < 0)
        return tern_fail(TERN_ERR_UNSUPPORTED, "%s: type %d is not a supported embedding type", name, t->type);
    if (t->size < (uint64_t)(rb * t->rows))
        return tern_fail(TERN_ERR_FORMAT, "%s: %llu bytes, its shape needs %lld", name,
                         (unsigned long long)t->size, (long long)(rb * t->rows));
    out->data = t->data;
    out->type = t->type;
    out->row_bytes = rb;
    return check_range(p, t->data, (uint64_t)(rb * t->rows), name);
}

static int32_t check_hparams(const tern_model_params *p)
{
    const int32_t v[] = {p->n_vocab, p->n_embd, p->n_layer, p->n_head, p->n_head_kv, p->n_ff};
    for (int i = 0; i < 6; i++)
        if (v[i] <= 0 || v[i] >= (1 << 24))
            return tern_fail(TERN_ERR_INVALID, "hyperparameter %d = %d out of range", i, v[i]);
    if (p->n_embd % p->n_head || p->n_head % p->n_head_kv || (p->n_embd / p->n_head) % 2)
        return tern_fail(TERN_ERR_INVALID, "%d heads / %d KV heads do not fit embedding %d", p->n_head,
                         p->n_head_kv, p->n_embd);
    if (p->n_embd % TERN_T2_BLOCK || p->n_ff % TERN_T2_BLOCK)
        return tern_fail(TERN_ERR_UNSUPPORTED, "embedding %d / FFN %d not multiples of %d", p->n_embd,
                         p->n_ff, TERN_T2_BLOCK);
    if (!(p->rope_theta > 0.0f) || !(p->rms_eps > 0.0f) || !isfinite(p->rope_theta))
        return tern_fail(TERN_ERR_INVALID, "rope base %g / rms epsilon %g out of range", p->rope_theta, p->rms_eps);
    if (p->activation != TERN_ACT_RELU2 && p->activation != TERN_ACT_SILU)
        return tern_fail(TERN_ERR_INVALID, "unknown activation %d", p->activation);
    if (p->lm_head != TERN_LM_HEAD_INT8 && p->lm_head != TERN_LM_HEAD_F16)
        return tern_fail(TERN_ERR_INVALID, "unknown LM head kind %d", p->lm_head);
    if (!p->layers || !p->output_norm)
        return tern_fail(TERN_ERR_INVALID, "no layers / output norm given");
    return TERN_OK;
}

static float *copy_norm(const float *src, int64_t n, const char *name, tern_model *m, int32_t *st)
{
    if (!src) {
        *st = tern_fail(TERN_ERR_INVALID, "%s: no data", name);
        return NULL;
    }
    float *dst = malloc((size_t)n * sizeof(float));
    if (!dst) {
        *st = tern_fail(TERN_ERR_NOMEM, "%s: out of memory", name);
        return NULL;
    }
    memcpy(dst, src, (size_t)n * sizeof(float));
    m->alloc_bytes += (uint64_t)n * sizeof(float);
    return dst;
}

static int32_t load_layer(const tern_model_params *p, int32_t i, tern_model *m)
{
    const tern_layer_params *lp = &p->layers[i];
    model_layer *l = &m->layers[i];
    const int64_t e = p->n_embd, kv = (int64_t)p->n_head_kv * m->head_dim, ff = p->n_ff;
    const struct { const tern_matrix *src; t2_matrix *dst; const char *what; int64_t rows, cols; } mats[] = {
        {&lp->wq, &l->wq, "attn_q", e, e},          {&lp->wk, &l->wk, "attn_k", kv, e},
        {&lp->wv, &l->wv, "attn_v", kv, e},         {&lp->wo, &l->wo, "attn_output", e, e},
        {&lp->w_gate, &l->w_gate, "ffn_gate", ff, e}, {&lp->w_up, &l->w_up, "ffn_up", ff, e},
        {&lp->w_down, &l->w_down, "ffn_down", e, ff},
    };
    char name[64];
    for (size_t j = 0; j < sizeof mats / sizeof mats[0]; j++) {
        snprintf(name, sizeof name, "blk.%d.%s.weight", i, mats[j].what);
        int32_t st = check_ternary(p, mats[j].src, name, mats[j].rows, mats[j].cols);
        if (st == TERN_OK)
            st = tern_repack(mats[j].src, name, mats[j].dst, &m->alloc_bytes);
        if (st != TERN_OK)
            return st;
        if (p->release_sources && mats[j].dst->owned)
            tern_os_release_pages(mats[j].src->data, mats[j].src->size);
    }
    int32_t st = TERN_OK;
    snprintf(name, sizeof name, "blk.%d.norms", i);
    if (!(l->attn_norm = copy_norm(lp->attn_norm, e, name, m, &st)) ||
        !(l->attn_sub_norm = copy_norm(lp->attn_sub_norm, e, name, m, &st)) ||
        !(l->ffn_norm = copy_norm(lp->ffn_norm, e, name, m, &st)) ||
        !(l->ffn_sub_norm = copy_norm(lp->ffn_sub_norm, ff, name, m, &st)))
        return st;
    return TERN_OK;
}

/* The lowest of ptr and lowest, counting only pointers into the mapped file. */
static const uint8_t *lower_in_file(const tern_model_params *p, const void *ptr, const uint8_t *lowest)
{
    const uint8_t *base = p->file_base, *q = ptr;
    return q && q >= base && q < base + p->file_size && q < lowest ? q : lowest;
}

/* The file's header (metadata: a vocabulary is ~8 MB) was read by the caller before the model
 * was made and is not read again: its pages leave the resident set like the repacked sources. */
static void release_header(const tern_model_params *p)
{
    const uint8_t *lowest = (const uint8_t *)p->file_base + p->file_size;
    lowest = lower_in_file(p, p->token_embd.data, lowest);
    lowest = lower_in_file(p, p->output.data, lowest);
    lowest = lower_in_file(p, p->output_norm, lowest);
    for (int32_t i = 0; i < p->n_layer; i++) {
        const tern_layer_params *l = &p->layers[i];
        const void *ptrs[] = {l->attn_norm, l->attn_sub_norm, l->ffn_norm, l->ffn_sub_norm,
                              l->wq.data, l->wk.data, l->wv.data, l->wo.data,
                              l->w_gate.data, l->w_up.data, l->w_down.data};
        for (size_t j = 0; j < sizeof ptrs / sizeof ptrs[0]; j++)
            lowest = lower_in_file(p, ptrs[j], lowest);
    }
    tern_os_release_pages(p->file_base, (uint64_t)(lowest - (const uint8_t *)p->file_base));
}

static int32_t load(const tern_model_params *p, tern_model *m)
{
    m->n_vocab = p->n_vocab; m->n_embd = p->n_embd; m->n_layer = p->n_layer;
    m->n_head = p->n_head; m->n_head_kv = p->n_head_kv; m->n_ff = p->n_ff;
    m->head_dim = p->n_embd / p->n_head;
    m->rope_theta = p->rope_theta; m->rms_eps = p->rms_eps;
    m->activation = p->activation; m->lm_head = p->lm_head;
    int32_t st = check_embd(p, &p->token_embd, "token_embd.weight", &m->token_embd);
    if (st != TERN_OK)
        return st;
    if (p->output.data) {
        if ((st = check_embd(p, &p->output, "output.weight", &m->head)) != TERN_OK)
            return st;
    } else {
        m->head = m->token_embd;
    }
    m->layers = calloc((size_t)p->n_layer, sizeof *m->layers);
    if (!m->layers)
        return tern_fail(TERN_ERR_NOMEM, "out of memory for %d layers", p->n_layer);
    for (int32_t i = 0; i < p->n_layer; i++)
        if ((st = load_layer(p, i, m)) != TERN_OK)
            return st;
    if (!(m->output_norm = copy_norm(p->output_norm, p->n_embd, "output_norm.weight", m, &st)))
        return st;
    if (p->lm_head == TERN_LM_HEAD_INT8 && (st = tern_build_int8_head(m, p->release_sources != 0)) != TERN_OK)
        return st;
    /* The embedding only looked up (int8 head, or a separate output.weight): forward.c drops
     * the pages each lookup maps (see release_lookup_window). */
    if (p->release_sources)
        release_header(p);
    m->embd_lookup_release = p->release_sources &&
                             (p->lm_head == TERN_LM_HEAD_INT8 || m->head.data != m->token_embd.data);
    return TERN_OK;
}

int32_t tern_model_create(const tern_model_params *params, tern_model **out)
{
    if (!params || !out)
        return tern_fail(TERN_ERR_INVALID, "tern_model_create: NULL argument");
    *out = NULL;
    tern_lib_init();
    int32_t st = check_hparams(params);
    if (st != TERN_OK)
        return st;
    tern_model *m = calloc(1, sizeof *m);
    if (!m)
        return tern_fail(TERN_ERR_NOMEM, "out of memory");
    m->kern = tern_kernels_select();
    st = m->kern ? load(params, m) : TERN_ERR_UNSUPPORTED;
    if (st != TERN_OK) {
        tern_model_free(m);
        return st;
    }
    *out = m;
    return TERN_OK;
}

static void free_matrix(t2_matrix *t) { free(t->owned); }

void tern_model_free(tern_model *m)
{
    if (!m)
        return;
    for (int32_t i = 0; m->layers && i < m->n_layer; i++) {
        model_layer *l = &m->layers[i];
        free_matrix(&l->wq); free_matrix(&l->wk); free_matrix(&l->wv); free_matrix(&l->wo);
        free_matrix(&l->w_gate); free_matrix(&l->w_up); free_matrix(&l->w_down);
        free(l->attn_norm); free(l->attn_sub_norm); free(l->ffn_norm); free(l->ffn_sub_norm);
    }
    free(m->layers);
    free(m->output_norm);
    free(m->head_q);
    free(m->head_scale);
    free(m);
}

uint64_t tern_model_alloc_bytes(const tern_model *m) { return m ? m->alloc_bytes : 0; }
