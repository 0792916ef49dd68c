/* The only CUDA-build file that reads the CPU library's internal model struct (model.h). */
#include "host_view.h"

#include "../model.h"
#include "../ops.h"

static hv_matrix view(const t2_matrix *t)
{
    hv_matrix out = {t->codes, t->rows, t->cols, t->scale};
    return out;
}

int32_t hv_model_view(const tern_model *m, hv_model *v)
{
    v->n_vocab = m->n_vocab; v->n_embd = m->n_embd; v->n_layer = m->n_layer;
    v->n_head = m->n_head; v->n_head_kv = m->n_head_kv; v->n_ff = m->n_ff;
    v->head_dim = m->head_dim; v->rope_theta = m->rope_theta; v->rms_eps = m->rms_eps;
    v->activation = m->activation; v->lm_head = m->lm_head;
    v->output_norm = m->output_norm;
    v->embd.data = m->token_embd.data; v->embd.type = m->token_embd.type;
    v->embd.row_bytes = m->token_embd.row_bytes; v->embd.n_embd = m->n_embd;
    v->head_q = m->head_q; v->head_scale = m->head_scale;
    v->head_data = m->head.data; v->head_type = m->head.type; v->head_row_bytes = m->head.row_bytes;
    return 0;
}

void hv_layer_at(const tern_model *m, int32_t layer, hv_layer *out)
{
    const model_layer *L = &m->layers[layer];
    out->attn_norm = L->attn_norm; out->attn_sub_norm = L->attn_sub_norm;
    out->ffn_norm = L->ffn_norm; out->ffn_sub_norm = L->ffn_sub_norm;
    out->wq = view(&L->wq); out->wk = view(&L->wk); out->wv = view(&L->wv); out->wo = view(&L->wo);
    out->w_gate = view(&L->w_gate); out->w_up = view(&L->w_up); out->w_down = view(&L->w_down);
}

void hv_embed_rows(const hv_embd *e, const int32_t *tokens, int32_t n, float *out)
{
    for (int32_t t = 0; t < n; t++)
        tern_dequant_row(e->type, e->data + (int64_t)tokens[t] * e->row_bytes, e->n_embd,
                         out + (int64_t)t * e->n_embd);
}

void hv_dequant_row(int32_t type, const uint8_t *src, int64_t n, float *dst)
{
    tern_dequant_row(type, src, n, dst);
}

void hv_rope_table(int64_t pos, int32_t d, double theta, float *cos_t, float *sin_t)
{
    tern_rope_table(pos, d, theta, cos_t, sin_t);
}
