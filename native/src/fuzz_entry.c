/* tern_fuzz_model: turns arbitrary bytes into tern_model_create parameters (small hparams,
 * tensor descriptors with fuzzed types, offsets, sizes and shapes, pointing into a copy of the
 * input as the "file") and, when the model loads, runs a 3-token prompt and one decode step. The libFuzzer
 * target (fuzz/fuzz_model.c) calls it; the tests replay the kept corpus through it. */
#include <stdlib.h>
#include <string.h>

#include "tern.h"

typedef struct reader {
    const uint8_t *p;
    size_t n;
} reader;

static uint32_t take(reader *r, int bytes)
{
    uint32_t v = 0;
    for (int i = 0; i < bytes; i++) {
        v = (v << 8) | (r->n ? *r->p : 0);
        if (r->n) {
            r->p++;
            r->n--;
        }
    }
    return v;
}

static const int32_t types[] = {TERN_TYPE_I2_S, TERN_TYPE_TQ2_0, TERN_TYPE_TQ1_0, TERN_TYPE_F16,
                                TERN_TYPE_BF16, TERN_TYPE_F32,   TERN_TYPE_Q8_0,  TERN_TYPE_Q4_0,
                                TERN_TYPE_Q6_K, 99};

/* A descriptor: usually the right shape, sometimes off by one; offset and size from the input
 * (size mostly what the file would need, to get past the size checks). */
static void matrix(reader *r, tern_matrix *m, const uint8_t *file, uint64_t file_size, int64_t rows,
                   int64_t cols)
{
    const uint32_t flags = take(r, 1);
    m->type = types[take(r, 1) % (sizeof types / sizeof types[0])];
    m->rows = rows + ((flags & 3) == 3 ? 1 : 0);
    m->cols = cols + ((flags & 12) == 12 ? 32 : 0);
    const uint64_t off = file_size ? take(r, 3) % (file_size + 64) : 0;
    m->data = file + off;
    m->size = (flags & 16) ? take(r, 3) : (file_size > off ? file_size - off : 0);
    const uint32_t sb = take(r, 4);
    float scale;
    memcpy(&scale, &sb, 4);
    m->scale = (flags & 32) ? scale : 0.25f;
}

int32_t tern_fuzz_model(const uint8_t *data, size_t size)
{
    reader r = {data, size};
    tern_model_params p;
    memset(&p, 0, sizeof p);
    p.n_embd = 128 * (1 + (int32_t)take(&r, 1) % 2);
    p.n_ff = 128 * (1 + (int32_t)take(&r, 1) % 3);
    p.n_layer = 1 + (int32_t)take(&r, 1) % 2;
    p.n_head = 1 << (take(&r, 1) % 3);
    p.n_head_kv = p.n_head >> (take(&r, 1) % 2);
    p.n_vocab = 1 + (int32_t)take(&r, 1);
    p.rope_theta = 10000.0f;
    p.rms_eps = 1e-5f;
    p.activation = (int32_t)take(&r, 1) % 3;
    p.lm_head = (int32_t)take(&r, 1) % 2;
    const size_t header = 64 + 150 * (size_t)p.n_layer; /* descriptor bytes read below, at most */
    const size_t file_size = size > header ? size - header : 0;
    uint8_t *file = malloc(file_size + 1);
    float *ones = malloc(sizeof(float) * 1024);
    tern_layer_params *layers = calloc((size_t)p.n_layer, sizeof *layers);
    if (!file || !ones || !layers) {
        free(file); free(ones); free(layers);
        return TERN_ERR_NOMEM;
    }
    memcpy(file, data + (size - file_size), file_size);
    for (int i = 0; i < 1024; i++)
        ones[i] = 1.0f;
    p.file_base = file;
    p.file_size = file_size;
    const int64_t e = p.n_embd, kv = p.n_head_kv ? (int64_t)p.n_head_kv * (e / p.n_head) : 0, ff = p.n_ff;
    matrix(&r, &p.token_embd, file, file_size, p.n_vocab, e);
    if (take(&r, 1) & 1)
        matrix(&r, &p.output, file, file_size, p.n_vocab, e);
    for (int32_t l = 0; l < p.n_layer; l++) {
        tern_layer_params *L = &layers[l];
        L->attn_norm = L->attn_sub_norm = L->ffn_norm = L->ffn_sub_norm = ones;
        matrix(&r, &L->wq, file, file_size, e, e);
        matrix(&r, &L->wk, file, file_size, kv, e);
        matrix(&r, &L->wv, file, file_size, kv, e);
        matrix(&r, &L->wo, file, file_size, e, e);
        matrix(&r, &L->w_gate, file, file_size, ff, e);
        matrix(&r, &L->w_up, file, file_size, ff, e);
        matrix(&r, &L->w_down, file, file_size, e, ff);
    }
    p.layers = layers;
    p.output_norm = ones;
    tern_model *m = NULL;
    int32_t st = tern_model_create(&p, &m);
    if (st == TERN_OK) {
        tern_session *s = NULL;
        const int32_t kv_type = (int32_t)take(&r, 1) % 3, threads = 1 + (int32_t)take(&r, 1) % 2;
        st = tern_session_create(m, 8, kv_type, threads, &s);
        if (st == TERN_OK) {
            const int32_t tokens[3] = {0, p.n_vocab - 1, p.n_vocab / 2};
            float *logits = malloc(sizeof(float) * 3 * (size_t)p.n_vocab);
            st = logits ? tern_forward(s, tokens, 3, logits, 1) : TERN_ERR_NOMEM;
            if (st == TERN_OK) /* and one decode step: the single-token path */
                st = tern_forward(s, tokens + 1, 1, logits, 0);
            free(logits);
            tern_session_free(s);
        }
        tern_model_free(m);
    }
    free(layers);
    free(ones);
    free(file);
    return st;
}
