/* The loaded model: repacked ternary matrices, norms, embedding and LM head. */
#ifndef TERN_MODEL_H
#define TERN_MODEL_H

#include <stdbool.h>
#include <stdint.h>

#include "kernels.h"
#include "tern.h"

typedef struct t2_matrix {
    const uint8_t *codes; /* packed T2 rows (layout.h): in the mmap (I2_S) or owned */
    uint8_t *owned;       /* non-NULL when repacked: freed with the model */
    int64_t rows, cols;
    float scale;
} t2_matrix;

typedef struct model_layer {
    float *attn_norm, *attn_sub_norm, *ffn_norm, *ffn_sub_norm;
    t2_matrix wq, wk, wv, wo, w_gate, w_up, w_down;
} model_layer;

/* An embedding-type matrix read in place from the file (n_vocab x n_embd). */
typedef struct embd_matrix {
    const uint8_t *data;
    int32_t type;
    int64_t row_bytes;
} embd_matrix;

struct tern_model {
    int32_t n_vocab, n_embd, n_layer, n_head, n_head_kv, n_ff, head_dim;
    float rope_theta, rms_eps;
    int32_t activation, lm_head;
    const tern_kernels *kern;
    model_layer *layers;
    float *output_norm;
    embd_matrix token_embd;
    embd_matrix head;        /* the f16/exact path: output.weight or the tied embedding */
    int8_t *head_q;          /* TERN_LM_HEAD_INT8: n_vocab x n_embd */
    float *head_scale;       /* per row */
    uint64_t alloc_bytes;
    bool embd_lookup_release; /* token_embd is a file mapping read only by row lookups */
};

/* Bytes of one row of n values of an embedding type, or -1 if the type/length cannot be. */
int64_t tern_embd_row_bytes(int32_t type, int64_t n);

/* Dequantize one row of an embedding-type matrix into n floats. */
void tern_dequant_row(int32_t type, const uint8_t *src, int64_t n, float *dst);

/* Bytes a ternary source tensor of rows x cols must have (I2_S: codes and its f32 scale), or -1. */
int64_t tern_ternary_src_bytes(int32_t type, int64_t rows, int64_t cols);

/* Fill m from the source tensor (already size-checked). Returns a TERN_* status. */
int32_t tern_repack(const tern_matrix *src, const char *name, t2_matrix *m, uint64_t *alloc_bytes);

/* Build the int8 LM-head copy from model->head; release_source: drop the source's pages
 * (a read-only file mapping) from the resident set as they are consumed. */
int32_t tern_build_int8_head(tern_model *model, bool release_source);

#endif
