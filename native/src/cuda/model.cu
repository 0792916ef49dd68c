/* tern_cuda_model: the host model's weights copied to the GPU, q|k|v and gate|up fused. */
#include <stdlib.h>
#include <string.h>

#include "model.h"

int32_t model_alloc(tern_cuda_model *m, void **p, size_t bytes)
{
    *p = NULL;
    if (m->n_allocs == m->cap_allocs) {
        const int32_t cap = m->cap_allocs ? 2 * m->cap_allocs : 64;
        void **grown = (void **)realloc(m->allocs, (size_t)cap * sizeof(void *));
        if (!grown)
            return tern_fail(TERN_ERR_NOMEM, "cuda model: out of host memory");
        m->allocs = grown;
        m->cap_allocs = cap;
    }
    const cudaError_t err = cudaMalloc(p, bytes ? bytes : 16);
    if (err != cudaSuccess) {
        *p = NULL;
        return tern_fail(TERN_ERR_NOMEM, "cuda: cannot allocate %zu bytes of device memory: %s", bytes,
                         cudaGetErrorString(err));
    }
    m->allocs[m->n_allocs++] = *p;
    m->bytes += bytes;
    return TERN_OK;
}

static int32_t upload(tern_cuda_model *m, void **dst, const void *src, size_t bytes)
{
    int32_t st = model_alloc(m, dst, bytes);
    if (st != TERN_OK)
        return st;
    CUDA_TRY(cudaMemcpy(*dst, src, bytes, cudaMemcpyHostToDevice));
    return TERN_OK;
}

static int32_t upload_floats(tern_cuda_model *m, float **dst, const float *src, int64_t n)
{
    return upload(m, (void **)dst, src, (size_t)n * sizeof(float));
}

/* Rows of several T2 matrices of the same width stacked into one, with a per-row scale. */
static int32_t fuse(tern_cuda_model *m, const hv_matrix *parts, int np, dmat *out)
{
    int64_t rows = 0;
    for (int i = 0; i < np; i++) {
        if (parts[i].cols != parts[0].cols)
            return tern_fail(TERN_ERR_FORMAT, "cuda model: fused matrices of widths %lld and %lld",
                             (long long)parts[0].cols, (long long)parts[i].cols);
        rows += parts[i].rows;
    }
    const int64_t rb = parts[0].cols / 4;
    uint8_t *w;
    float *scale;
    int32_t st = model_alloc(m, (void **)&w, (size_t)(rows * rb));
    if (st == TERN_OK)
        st = model_alloc(m, (void **)&scale, (size_t)rows * sizeof(float));
    if (st != TERN_OK)
        return st;
    float *host_scale = (float *)malloc((size_t)rows * sizeof(float));
    if (!host_scale)
        return tern_fail(TERN_ERR_NOMEM, "cuda model: out of host memory");
    int64_t r = 0;
    for (int i = 0; i < np && st == TERN_OK; i++) {
        const cudaError_t err = cudaMemcpy(w + r * rb, parts[i].codes, (size_t)(parts[i].rows * rb),
                                           cudaMemcpyHostToDevice);
        if (err != cudaSuccess)
            st = tern_fail(TERN_ERR_UNSUPPORTED, "cuda: copying weights: %s", cudaGetErrorString(err));
        for (int64_t j = 0; j < parts[i].rows; j++)
            host_scale[r + j] = parts[i].scale;
        r += parts[i].rows;
    }
    if (st == TERN_OK && cudaMemcpy(scale, host_scale, (size_t)rows * sizeof(float), cudaMemcpyHostToDevice) != cudaSuccess)
        st = tern_fail(TERN_ERR_UNSUPPORTED, "cuda: copying scales");
    free(host_scale);
    *out = dmat{w, rows, parts[0].cols, scale};
    return st;
}

static int32_t upload_layer(tern_cuda_model *m, const tern_model *host, int32_t l)
{
    hv_layer L;
    hv_layer_at(host, l, &L);
    cuda_layer *d = &m->layers[l];
    const int64_t e = m->hv.n_embd, ff = m->hv.n_ff;
    const hv_matrix qkv[3] = {L.wq, L.wk, L.wv}, gu[2] = {L.w_gate, L.w_up};
    int32_t st = fuse(m, qkv, 3, &d->qkv);
    if (st == TERN_OK) st = fuse(m, &L.wo, 1, &d->wo);
    if (st == TERN_OK) st = fuse(m, gu, 2, &d->gate_up);
    if (st == TERN_OK) st = fuse(m, &L.w_down, 1, &d->down);
    if (st == TERN_OK) st = upload_floats(m, &d->attn_norm, L.attn_norm, e);
    if (st == TERN_OK) st = upload_floats(m, &d->attn_sub_norm, L.attn_sub_norm, e);
    if (st == TERN_OK) st = upload_floats(m, &d->ffn_norm, L.ffn_norm, e);
    if (st == TERN_OK) st = upload_floats(m, &d->ffn_sub_norm, L.ffn_sub_norm, ff);
    if (st == TERN_OK && (d->qkv.rows != m->qkv_dim || d->gate_up.rows != 2 * ff || d->down.cols != ff))
        st = tern_fail(TERN_ERR_FORMAT, "cuda model: layer %d has unexpected matrix shapes", l);
    return st;
}

/* The LM head as the host built it: int8 rows, the file's f16 rows, or other types as f32. */
static int32_t upload_head(tern_cuda_model *m)
{
    const hv_model *h = &m->hv;
    const int64_t V = h->n_vocab, e = h->n_embd;
    if (h->lm_head == TERN_LM_HEAD_INT8) {
        if (!h->head_q || !h->head_scale)
            return tern_fail(TERN_ERR_INVALID, "cuda model: the host model has no int8 LM head");
        m->head_kind = HEAD_I8;
        int32_t st = upload(m, (void **)&m->head.w, h->head_q, (size_t)(V * e));
        if (st == TERN_OK)
            st = upload_floats(m, (float **)&m->head.scale, h->head_scale, V);
        m->head.rows = V;
        m->head.cols = e;
        return st;
    }
    m->head.rows = V;
    m->head.cols = e;
    m->head.scale = NULL;
    if (h->head_type == TERN_TYPE_F16) {
        m->head_kind = HEAD_F16;
        return upload(m, (void **)&m->head.w, h->head_data, (size_t)(V * e * 2));
    }
    m->head_kind = HEAD_F32;
    int32_t st = model_alloc(m, (void **)&m->head.w, (size_t)(V * e) * sizeof(float));
    const int64_t rows_per_copy = 1024;
    float *buf = (float *)malloc((size_t)(rows_per_copy * e) * sizeof(float));
    if (!buf)
        return tern_fail(TERN_ERR_NOMEM, "cuda model: out of host memory");
    for (int64_t r0 = 0; r0 < V && st == TERN_OK; r0 += rows_per_copy) {
        const int64_t nr = V - r0 < rows_per_copy ? V - r0 : rows_per_copy;
        for (int64_t i = 0; i < nr; i++)
            hv_dequant_row(h->head_type, h->head_data + (r0 + i) * h->head_row_bytes, e, buf + i * e);
        if (cudaMemcpy((float *)m->head.w + r0 * e, buf, (size_t)(nr * e) * sizeof(float),
                       cudaMemcpyHostToDevice) != cudaSuccess)
            st = tern_fail(TERN_ERR_UNSUPPORTED, "cuda: copying the LM head");
    }
    free(buf);
    return st;
}

extern "C" int32_t tern_cuda_model_create(const tern_model *host, tern_cuda_model **out)
{
    if (!host || !out)
        return tern_fail(TERN_ERR_INVALID, "tern_cuda_model_create: NULL argument");
    *out = NULL;
    if (!tern_cuda_available())
        return TERN_ERR_UNSUPPORTED; /* the reason is already in tern_last_error */
    CUDA_TRY(cudaSetDevice(0));
    tern_cuda_model *m = (tern_cuda_model *)calloc(1, sizeof *m);
    if (!m)
        return tern_fail(TERN_ERR_NOMEM, "out of memory");
    hv_model_view(host, &m->hv);
    const hv_model *h = &m->hv;
    m->kv_dim = (int64_t)h->n_head_kv * h->head_dim;
    m->qkv_dim = h->n_embd + 2 * m->kv_dim;
    int32_t st = TERN_OK;
    if (h->n_embd % 128 != 0 || h->n_ff % 128 != 0)
        st = tern_fail(TERN_ERR_UNSUPPORTED, "cuda model: n_embd %d and n_ff %d must be multiples of 128",
                       h->n_embd, h->n_ff);
    m->layers = (cuda_layer *)calloc((size_t)h->n_layer, sizeof(cuda_layer));
    if (st == TERN_OK && !m->layers)
        st = tern_fail(TERN_ERR_NOMEM, "out of memory");
    for (int32_t l = 0; l < h->n_layer && st == TERN_OK; l++)
        st = upload_layer(m, host, l);
    if (st == TERN_OK)
        st = upload_floats(m, &m->output_norm, h->output_norm, h->n_embd);
    if (st == TERN_OK)
        st = upload_head(m);
    /* host pointers other than the embedding's die with the host model */
    m->hv.output_norm = NULL;
    m->hv.head_q = NULL;
    m->hv.head_scale = NULL;
    m->hv.head_data = NULL;
    if (st != TERN_OK) {
        tern_cuda_model_free(m);
        return st;
    }
    *out = m;
    return TERN_OK;
}

extern "C" void tern_cuda_model_free(tern_cuda_model *m)
{
    if (!m)
        return;
    for (int32_t i = 0; i < m->n_allocs; i++)
        cudaFree(m->allocs[i]);
    free(m->allocs);
    free(m->layers);
    free(m);
}

extern "C" uint64_t tern_cuda_model_device_bytes(const tern_cuda_model *m) { return m ? m->bytes : 0; }
