/* A plain view of a host tern_model for the CUDA code (C++ never includes model.h, which is
 * C11 and owned by the CPU library). Filled by host_view.c. */
#ifndef TERN_CUDA_HOST_VIEW_H
#define TERN_CUDA_HOST_VIEW_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct tern_model tern_model;

typedef struct hv_matrix {
    const uint8_t *codes; /* packed T2 rows (native/src/layout.h), rows x cols/4 bytes */
    int64_t rows, cols;
    float scale;
} hv_matrix;

typedef struct hv_layer {
    const float *attn_norm, *attn_sub_norm, *ffn_norm, *ffn_sub_norm;
    hv_matrix wq, wk, wv, wo, w_gate, w_up, w_down;
} hv_layer;

typedef struct hv_embd {           /* the token embedding, read in place from the mapping */
    const uint8_t *data;
    int32_t type;
    int64_t row_bytes, n_embd;
} hv_embd;

typedef struct hv_model {
    int32_t n_vocab, n_embd, n_layer, n_head, n_head_kv, n_ff, head_dim;
    float rope_theta, rms_eps;
    int32_t activation, lm_head;
    const float *output_norm;
    hv_embd embd;
    const int8_t *head_q;      /* TERN_LM_HEAD_INT8: n_vocab x n_embd, or NULL */
    const float *head_scale;   /* per row */
    const uint8_t *head_data;  /* TERN_LM_HEAD_F16: the file's head rows */
    int32_t head_type;
    int64_t head_row_bytes;
} hv_model;

/* Fills v from m; returns 0. Layers are read with hv_layer_at. */
int32_t hv_model_view(const tern_model *m, hv_model *v);
void hv_layer_at(const tern_model *m, int32_t layer, hv_layer *out);
/* Dequantize embedding rows (any type the CPU loader accepts) into n x n_embd floats. */
void hv_embed_rows(const hv_embd *e, const int32_t *tokens, int32_t n, float *out);
/* Dequantize one LM-head row of the file's type into n_embd floats. */
void hv_dequant_row(int32_t type, const uint8_t *src, int64_t n, float *dst);
/* cos/sin of pos * theta^(-2i/d) in double rounded to float, as the CPU decoder's table. */
void hv_rope_table(int64_t pos, int32_t d, double theta, float *cos_t, float *sin_t);

#ifdef __cplusplus
}
#endif
#endif
