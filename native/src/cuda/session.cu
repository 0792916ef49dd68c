/* tern_cuda_session: KV cache and scratch on the GPU, the decoder step enqueued on one stream,
 * and the one-token step captured once as a CUDA graph and replayed for every decoded token. */
#include <new>
#include <stdlib.h>
#include <string.h>

#include "persist.h"

int32_t matmul(const dmat &w, bool t2, const int8_t *xq, const act_meta *meta, int32_t n, float *out,
               int64_t ldo, int epi, cudaStream_t st)
{
    if (n == 1)
        return t2 ? launch_gemv_t2(w, xq, meta, out, epi, st) : launch_gemv_i8(w, xq, meta, out, epi, st);
    return launch_gemm(w, t2, xq, meta, n, out, ldo, epi, st);
}

/* TERN_CUDA_FUSED_NORM=0: decode with the separate norm + quantization kernels (A/B). */
static bool fused_norm_enabled(void)
{
    const char *env = getenv("TERN_CUDA_FUSED_NORM");
    return !(env && strcmp(env, "0") == 0);
}

/* Byte offset of layer l's rows in the K and V caches. */
static size_t layer_cache_at(const tern_cuda_session *s, int32_t l)
{
    return (size_t)l * (size_t)s->n_ctx * (size_t)s->m->kv_dim * s->kv_elem;
}

/* What every decode GEMV of a layer shares: the shape, the activation, and the q|k|v step's RoPE
 * tables and KV-cache rows (read only while a.rope is set). */
static fused_gemv decode_gemv_args(const tern_cuda_session *s, int32_t l)
{
    const size_t cache_at = layer_cache_at(s, l);
    const hv_model *h = &s->m->hv;
    fused_gemv a = {};
    a.relu2 = h->activation == TERN_ACT_RELU2;
    a.head_dim = h->head_dim;
    a.n_head = h->n_head;
    a.n_head_kv = h->n_head_kv;
    a.kv_f32 = s->kv_type == TERN_KV_F32;
    a.rope_cos = s->rope_cos;
    a.rope_sin = s->rope_sin;
    a.pos = s->pos;
    a.k_cache = s->k_cache + cache_at;
    a.v_cache = s->v_cache + cache_at;
    return a;
}

/* Layer l's decode attention over the cache (with nw: also att * nw and the attn_sub_norm
 * partials, for the fused-norm step). */
static int32_t decode_attention(tern_cuda_session *s, int32_t l, const float *nw = NULL, float *xw = NULL,
                                float2 *stats = NULL)
{
    const hv_model *h = &s->m->hv;
    const size_t cache_at = layer_cache_at(s, l);
    return launch_attention_decode(s->qkv, h->n_head, h->n_head_kv, h->head_dim, s->k_cache + cache_at,
                                   s->v_cache + cache_at, s->kv_type == TERN_KV_F32, s->pos, s->n_ctx, s->partial,
                                   s->counters, s->att, s->stream, nw, xw, stats);
}

/* The decode step without norm kernels: each kernel that produces a normalized GEMV's input
 * (the previous down or, for layer 0, norm_stats; attention's merging blocks; wo; gate|up)
 * also writes that input times the norm weights and per-block partial statistics, and the
 * GEMV quantizes it in every block (gemv_fused.cu). Phases of a layer use buffers 0, 1, 0, 1:
 * a kernel reads one and writes the other. */
static int32_t enqueue_layer_decode_fused(tern_cuda_session *s, int32_t l, int32_t *nparts)
{
    const tern_cuda_model *m = s->m;
    const hv_model *h = &m->hv;
    const cuda_layer *L = &m->layers[l];
    const int64_t e = h->n_embd, ff = h->n_ff;
    const bool last = l + 1 == h->n_layer; /* the output norm keeps its kernel (LM head input) */
    cudaStream_t st = s->stream;
    fused_gemv a = decode_gemv_args(s, l);
    a.eps = h->rms_eps;
    /* every GEMV releases its successor once its weight loads are issued (common.cuh) */
    a.early = 1;
    /* in: buffer b (nparts partials); out (next_nw set): buffer 1 - b */
    auto gemv = [&](const dmat &w, int b, int width, float *out, int epi, const float *next_nw) {
        a.w = w.w; a.rows = w.rows; a.nchunks = (int32_t)(w.cols / 64); a.scale = w.scale;
        a.width = width; a.out = out; a.epi = epi;
        a.in_xw = s->nxw[b]; a.in_stats = s->nstats[b]; a.in_nparts = *nparts;
        a.out_nw = next_nw;
        a.out_xw = next_nw ? s->nxw[1 - b] : NULL;
        a.out_stats = next_nw ? s->nstats[1 - b] : NULL;
        if (next_nw)
            *nparts = (int32_t)gemv_t2_fused_blocks(a);
        return launch_gemv_t2_fused(a, st);
    };
    a.rope = 1;
    TRY(gemv(L->qkv, 0, (int)e, s->qkv, EPI_STORE, NULL));
    a.rope = 0;
    TRY(decode_attention(s, l, L->attn_sub_norm, s->nxw[1], s->nstats[1]));
    *nparts = h->n_head_kv * kAttnStatParts; /* per warp of each KV group's merging block */
    TRY(gemv(L->wo, 1, (int)e, s->x, EPI_ADD, L->ffn_norm));
    a.glu = 1; /* the epilogue writes act(gate) * up: n_ff floats */
    TRY(gemv(L->gate_up, 0, (int)e, s->h, EPI_STORE, L->ffn_sub_norm));
    a.glu = 0;
    return gemv(L->down, 1, (int)ff, s->x, EPI_ADD, last ? NULL : m->layers[l + 1].attn_norm);
}

/* One decode step of a layer: norm+quant, q|k|v with RoPE and the KV store, attention,
 * norm+quant, wo, norm+quant, gate|up with the GLU, norm+quant, down. */
static int32_t enqueue_layer_decode(tern_cuda_session *s, int32_t l)
{
    const tern_cuda_model *m = s->m;
    const hv_model *h = &m->hv;
    const cuda_layer *L = &m->layers[l];
    const int64_t e = h->n_embd, ff = h->n_ff;
    cudaStream_t st = s->stream;
    fused_gemv a = decode_gemv_args(s, l);
    a.xq = s->xq;
    a.meta = s->meta;
    auto gemv = [&](const dmat &w, const float *x, const float *norm, int width, float *out, int epi) {
        a.w = w.w; a.rows = w.rows; a.nchunks = (int32_t)(w.cols / 64); a.scale = w.scale;
        a.width = width; a.out = out; a.epi = epi;
        TRY(launch_norm_quant(x, width, norm, width, h->rms_eps, 1, false, a.relu2, s->xq, s->meta, NULL, st));
        return launch_gemv_t2_fused(a, st);
    };
    a.rope = a.early = 1;
    TRY(gemv(L->qkv, s->x, L->attn_norm, (int)e, s->qkv, EPI_STORE));
    a.rope = a.early = 0;
    TRY(decode_attention(s, l));
    TRY(gemv(L->wo, s->att, L->attn_sub_norm, (int)e, s->x, EPI_ADD));
    a.glu = 1; /* the epilogue writes act(gate) * up: n_ff floats */
    TRY(gemv(L->gate_up, s->x, L->ffn_norm, (int)e, s->h, EPI_STORE));
    a.glu = 0;
    return gemv(L->down, s->h, L->ffn_sub_norm, (int)ff, s->x, EPI_ADD);
}

/* floats of the attention partials (prefill: 8 splits per token and head) */
static int64_t partial_floats(const tern_cuda_session *s)
{
    const hv_model *h = &s->m->hv;
    return (int64_t)TERN_CUDA_PREFILL_SPLIT * TERN_CUDA_CHUNK * h->n_head * (h->head_dim + 2);
}

static int32_t enqueue_layer(tern_cuda_session *s, int32_t l, int32_t n)
{
    const tern_cuda_model *m = s->m;
    const hv_model *h = &m->hv;
    const cuda_layer *L = &m->layers[l];
    const int64_t e = h->n_embd, ff = h->n_ff;
    const size_t cache_at = layer_cache_at(s, l);
    const bool f32 = s->kv_type == TERN_KV_F32;
    const bool relu2 = h->activation == TERN_ACT_RELU2;
    cudaStream_t st = s->stream;
    TRY(launch_norm_quant(s->x, e, L->attn_norm, e, h->rms_eps, n, false, relu2, s->xq, s->meta, NULL, st));
    TRY(matmul(L->qkv, true, s->xq, s->meta, n, s->qkv, m->qkv_dim, EPI_STORE, st));
    TRY(launch_rope_store(s->qkv, n, h->n_head, h->n_head_kv, h->head_dim, s->rope_cos, s->rope_sin, s->pos,
                          s->k_cache + cache_at, s->v_cache + cache_at, f32, st));
    if (f32) { /* the tiled kernel is built for the f16 cache (its tensor-core tile) only */
        /* a few tokens: up to 64 splits of the positions; a prompt: 8 per token (the partials
         * buffer's size) */
        const int32_t nsplit = n * TERN_CUDA_PREFILL_SPLIT >= TERN_CUDA_MAX_SPLIT ? TERN_CUDA_PREFILL_SPLIT
                                                                                 : TERN_CUDA_MAX_SPLIT / n;
        TRY(launch_attention(s->qkv, n, h->n_head, h->n_head_kv, h->head_dim, s->k_cache + cache_at,
                             s->v_cache + cache_at, f32, s->pos, nsplit, s->partial, s->counters, s->att, st));
    } else {
        TRY(launch_attention_tiled(s->qkv, n, h->n_head, h->n_head_kv, h->head_dim, s->k_cache + cache_at,
                                   s->v_cache + cache_at, s->pos, s->n_past, s->partial, partial_floats(s),
                                   s->counters, (int64_t)TERN_CUDA_CHUNK * h->n_head, s->att, st));
    }
    TRY(launch_norm_quant(s->att, e, L->attn_sub_norm, e, h->rms_eps, n, false, relu2, s->xq, s->meta, NULL, st));
    TRY(matmul(L->wo, true, s->xq, s->meta, n, s->x, e, EPI_ADD, st));
    TRY(launch_norm_quant(s->x, e, L->ffn_norm, e, h->rms_eps, n, false, relu2, s->xq, s->meta, NULL, st));
    TRY(matmul(L->gate_up, true, s->xq, s->meta, n, s->h, 2 * ff, EPI_STORE, st));
    TRY(launch_norm_quant(s->h, 2 * ff, L->ffn_sub_norm, ff, h->rms_eps, n, true, relu2, s->xq, s->meta, NULL, st));
    return matmul(L->down, true, s->xq, s->meta, n, s->x, e, EPI_ADD, st);
}

/* First row of LM-head range i of a one-token step (ranges of whole 64-row groups). */
static int64_t head_piece_start(int64_t n_vocab, int32_t i)
{
    const int64_t per = (n_vocab + 64 * TERN_CUDA_HEAD_PIECES - 1) / (64 * TERN_CUDA_HEAD_PIECES) * 64;
    const int64_t r = per * i;
    return r < n_vocab ? r : n_vocab;
}

/* Logits of LM-head rows [r0, r0 + rows) for one token. */
static int32_t launch_head_rows(tern_cuda_session *s, int64_t r0, int64_t rows)
{
    const tern_cuda_model *m = s->m;
    const int64_t e = m->hv.n_embd;
    if (m->head_kind == HEAD_I8) {
        const dmat piece = {m->head.w + r0 * m->head.cols, rows, m->head.cols, m->head.scale + r0};
        return launch_gemv_i8(piece, s->xq, s->meta, s->logits + r0, EPI_STORE, s->stream);
    }
    const size_t elem = m->head_kind == HEAD_F16 ? 2 : 4;
    return launch_gemv_float(static_cast<const uint8_t *>(m->head.w) + (size_t)r0 * (size_t)e * elem,
                             m->head_kind == HEAD_F16, rows, e, s->xf, 1, s->logits + r0, s->stream);
}

int32_t enqueue_forward(tern_cuda_session *s, int32_t n, bool want_logits, int32_t t0, bool whole_head)
{
    const tern_cuda_model *m = s->m;
    const hv_model *h = &m->hv;
    if (n == 1 && s->persist)
        TRY(launch_persist(s, s->persist, -1));
    else if (n == 1 && s->nxw[0] && fused_norm_enabled()) {
        TRY(launch_norm_stats(s->x, m->layers[0].attn_norm, h->n_embd, s->nxw[0], s->nstats[0], s->stream));
        int32_t nparts = 1;
        for (int32_t l = 0; l < h->n_layer; l++)
            TRY(enqueue_layer_decode_fused(s, l, &nparts));
    } else
        for (int32_t l = 0; l < h->n_layer; l++)
            TRY(n == 1 ? enqueue_layer_decode(s, l) : enqueue_layer(s, l, n));
    if (!want_logits)
        return TERN_OK;
    const int64_t e = h->n_embd;
    const int32_t nt = n - t0;
    TRY(launch_norm_quant(s->x + t0 * e, e, m->output_norm, e, h->rms_eps, nt, false, false, s->xq, s->meta,
                          m->head_kind == HEAD_I8 ? NULL : s->xf, s->stream));
    if (nt > 1 || whole_head) {
        if (m->head_kind == HEAD_I8)
            return matmul(m->head, false, s->xq, s->meta, nt, s->logits, h->n_vocab, EPI_STORE, s->stream);
        return launch_gemv_float(m->head.w, m->head_kind == HEAD_F16, h->n_vocab, e, s->xf, nt, s->logits, s->stream);
    }
    /* one token: the head in row ranges, each followed by an event the host's copy of its logits
     * waits for (forward_chunk), so the copies overlap the later ranges (H100, same machine:
     * 1,113 against 1,148 us per token end to end; the GPU step itself +19 us). While captured,
     * an external event record (a node of the decode graph; the flag is refused outside capture). */
    cudaStreamCaptureStatus cap = cudaStreamCaptureStatusNone;
    CUDA_TRY(cudaStreamIsCapturing(s->stream, &cap));
    const bool capturing = cap == cudaStreamCaptureStatusActive;
    for (int32_t i = 0; i < TERN_CUDA_HEAD_PIECES; i++) {
        const int64_t r0 = head_piece_start(h->n_vocab, i), rows = head_piece_start(h->n_vocab, i + 1) - r0;
        if (rows > 0) /* a small vocabulary has fewer ranges than pieces */
            TRY(launch_head_rows(s, r0, rows));
        CUDA_TRY(capturing ? cudaEventRecordWithFlags(s->head_done[i], s->stream, cudaEventRecordExternal)
                           : cudaEventRecord(s->head_done[i], s->stream));
    }
    return TERN_OK;
}

static int32_t session_alloc(tern_cuda_session *s)
{
    tern_cuda_model *m = s->m;
    const hv_model *h = &m->hv;
    const size_t T = TERN_CUDA_CHUNK, e = (size_t)h->n_embd, ff = (size_t)h->n_ff, half = (size_t)h->head_dim / 2;
    const size_t kv = (size_t)h->n_layer * (size_t)s->n_ctx * (size_t)m->kv_dim;
    const size_t width = e > ff ? e : ff;
    const size_t partial = (size_t)partial_floats(s);
    struct { void **p; size_t bytes; } want[] = {
        {(void **)&s->k_cache, kv * s->kv_elem}, {(void **)&s->v_cache, kv * s->kv_elem},
        {(void **)&s->x, T * e * 4}, {(void **)&s->qkv, T * (size_t)m->qkv_dim * 4},
        {(void **)&s->h, T * 2 * ff * 4}, {(void **)&s->att, T * e * 4}, {(void **)&s->xf, T * e * 4},
        {(void **)&s->partial, partial * 4}, {(void **)&s->logits, T * (size_t)h->n_vocab * 4},
        {(void **)&s->rope_cos, (size_t)s->n_ctx * half * 4}, {(void **)&s->rope_sin, (size_t)s->n_ctx * half * 4},
        {(void **)&s->xq, T * width}, {(void **)&s->meta, T * sizeof(act_meta)}, {(void **)&s->pos, 4},
        {(void **)&s->counters, T * (size_t)h->n_head * sizeof(int)},
    };
    for (size_t i = 0; i < sizeof want / sizeof want[0]; i++)
        if (cudaMalloc(want[i].p, want[i].bytes) != cudaSuccess) {
            *want[i].p = NULL;
            return tern_fail(TERN_ERR_NOMEM, "cuda session: cannot allocate %zu bytes of device memory "
                             "(%d positions)", want[i].bytes, s->n_ctx);
        }
    CUDA_TRY(cudaMemset(s->counters, 0, T * (size_t)h->n_head * sizeof(int)));
    CUDA_TRY(cudaMalloc((void **)&s->top_kept, TOP_LOGITS_SCRATCH_KEYS * sizeof(uint64_t)));
    CUDA_TRY(cudaMalloc((void **)&s->top_ticket, sizeof(int)));
    CUDA_TRY(cudaMemset(s->top_ticket, 0, sizeof(int)));
    CUDA_TRY(cudaHostAlloc((void **)&s->host_top, sizeof(tern_cuda_top), cudaHostAllocMapped));
    CUDA_TRY(cudaHostGetDevicePointer((void **)&s->dev_top, s->host_top, 0));
    /* fused-norm decode where every normalized width fits the GEMV's shared memory; partials:
     * at most one per block of the widest producer grid (wo/down: rows/8, gate|up: n_ff/8) or
     * kAttnStatParts per KV group */
    if (e <= (size_t)kFusedNormMaxWidth && ff <= (size_t)kFusedNormMaxWidth) {
        const size_t parts = width / 8 + 2 + (size_t)h->n_head_kv * kAttnStatParts;
        for (int b = 0; b < 2; b++) {
            CUDA_TRY(cudaMalloc((void **)&s->nxw[b], width * 4));
            CUDA_TRY(cudaMalloc((void **)&s->nstats[b], parts * sizeof(float2)));
        }
    }
    CUDA_TRY(cudaMallocHost((void **)&s->host_x, T * e * 4));
    CUDA_TRY(cudaMallocHost((void **)&s->host_pos, 4));
    /* RoPE tables for every position, computed as the CPU decoder computes them */
    float *c = (float *)malloc((size_t)s->n_ctx * half * 4), *sn = (float *)malloc((size_t)s->n_ctx * half * 4);
    int32_t st = TERN_OK;
    if (!c || !sn)
        st = tern_fail(TERN_ERR_NOMEM, "out of memory");
    for (int32_t p = 0; st == TERN_OK && p < s->n_ctx; p++)
        hv_rope_table(p, h->head_dim, (double)h->rope_theta, c + p * half, sn + p * half);
    if (st == TERN_OK && (cudaMemcpy(s->rope_cos, c, (size_t)s->n_ctx * half * 4, cudaMemcpyHostToDevice) != cudaSuccess ||
                          cudaMemcpy(s->rope_sin, sn, (size_t)s->n_ctx * half * 4, cudaMemcpyHostToDevice) != cudaSuccess))
        st = tern_fail(TERN_ERR_UNSUPPORTED, "cuda: copying RoPE tables");
    free(c);
    free(sn);
    return st;
}

extern "C" int32_t tern_cuda_session_create(tern_cuda_model *m, int32_t n_ctx, int32_t kv_type,
                                            tern_cuda_session **out)
{
    if (!m || !out)
        return tern_fail(TERN_ERR_INVALID, "tern_cuda_session_create: NULL argument");
    *out = NULL;
    if (n_ctx < 1 || n_ctx > (1 << 24))
        return tern_fail(TERN_ERR_INVALID, "n_ctx %d out of range", n_ctx);
    if (kv_type != TERN_KV_F16 && kv_type != TERN_KV_F32)
        return tern_fail(TERN_ERR_UNSUPPORTED, "cuda: KV cache type %d is not implemented (f16, f32)", kv_type);
    tern_cuda_session *s = new (std::nothrow) tern_cuda_session();
    if (!s)
        return tern_fail(TERN_ERR_NOMEM, "out of memory");
    s->m = m;
    s->n_ctx = n_ctx;
    s->kv_type = kv_type;
    s->kv_elem = kv_type == TERN_KV_F32 ? 4 : 2;
    int32_t st = TERN_OK;
    if (cudaStreamCreateWithFlags(&s->stream, cudaStreamNonBlocking) != cudaSuccess ||
        cudaStreamCreateWithFlags(&s->copy_stream, cudaStreamNonBlocking) != cudaSuccess)
        st = tern_fail(TERN_ERR_UNSUPPORTED, "cuda: cannot create a stream");
    for (int32_t i = 0; i < TERN_CUDA_HEAD_PIECES && st == TERN_OK; i++)
        if (cudaEventCreateWithFlags(&s->head_done[i], cudaEventDisableTiming) != cudaSuccess)
            st = tern_fail(TERN_ERR_UNSUPPORTED, "cuda: cannot create an event");
    if (st == TERN_OK)
        st = session_alloc(s);
    if (st != TERN_OK) {
        tern_cuda_session_free(s);
        return st;
    }
    *out = s;
    return TERN_OK;
}

extern "C" void tern_cuda_session_free(tern_cuda_session *s)
{
    if (!s)
        return;
    if (s->decode_graph)
        cudaGraphExecDestroy(s->decode_graph);
    if (s->top_graph)
        cudaGraphExecDestroy(s->top_graph);
    persist_free(s->persist);
    void *dev[] = {s->k_cache, s->v_cache, s->x, s->qkv, s->h, s->att, s->xf, s->partial, s->logits,
                   s->rope_cos, s->rope_sin, s->xq, s->meta, s->pos, s->counters, s->top_kept, s->top_ticket};
    for (size_t i = 0; i < sizeof dev / sizeof dev[0]; i++)
        cudaFree(dev[i]);
    for (int b = 0; b < 2; b++) {
        cudaFree(s->nxw[b]);
        cudaFree(s->nstats[b]);
    }
    cudaFreeHost(s->host_x);
    cudaFreeHost(s->host_pos);
    cudaFreeHost(s->host_top);
    for (int32_t i = 0; i < TERN_CUDA_HEAD_PIECES; i++)
        if (s->head_done[i])
            cudaEventDestroy(s->head_done[i]);
    if (s->copy_stream)
        cudaStreamDestroy(s->copy_stream);
    if (s->stream)
        cudaStreamDestroy(s->stream);
    delete s;
}

extern "C" int32_t tern_cuda_session_n_past(const tern_cuda_session *s) { return s ? s->n_past : 0; }

extern "C" int32_t tern_cuda_session_truncate(tern_cuda_session *s, int32_t n)
{
    if (!s)
        return tern_fail(TERN_ERR_INVALID, "tern_cuda_session_truncate: NULL session");
    if (n < 0 || n > s->n_past)
        return tern_fail(TERN_ERR_INVALID, "truncate(%d) outside [0, %d]", n, s->n_past);
    s->n_past = n;
    s->top_logits_valid = false;
    return TERN_OK;
}

extern "C" int32_t tern_cuda_session_copy(tern_cuda_session *dst, const tern_cuda_session *src)
{
    if (!dst || !src)
        return tern_fail(TERN_ERR_INVALID, "tern_cuda_session_copy: NULL session");
    if (dst->m != src->m || dst->kv_type != src->kv_type)
        return tern_fail(TERN_ERR_INVALID, "tern_cuda_session_copy: sessions of different models or KV types");
    if (src->n_past > dst->n_ctx)
        return tern_fail(TERN_ERR_CONTEXT, "tern_cuda_session_copy: %d positions do not fit a context of %d",
                         src->n_past, dst->n_ctx);
    const size_t row = (size_t)src->m->kv_dim * src->kv_elem, bytes = row * (size_t)src->n_past;
    for (int32_t l = 0; l < src->m->hv.n_layer; l++) {
        const size_t so = (size_t)l * (size_t)src->n_ctx * row, d0 = (size_t)l * (size_t)dst->n_ctx * row;
        CUDA_TRY(cudaMemcpy(dst->k_cache + d0, src->k_cache + so, bytes, cudaMemcpyDeviceToDevice));
        CUDA_TRY(cudaMemcpy(dst->v_cache + d0, src->v_cache + so, bytes, cudaMemcpyDeviceToDevice));
    }
    dst->n_past = src->n_past;
    dst->top_logits_valid = false;
    return TERN_OK;
}

extern "C" void tern_cuda_cancel(tern_cuda_session *s)
{
    if (s)
        s->cancel.store(1);
}

extern "C" int32_t tern_cuda_session_graph_active(const tern_cuda_session *s)
{
    return s && (s->decode_graph || s->top_graph) ? (s->persist ? 2 : 1) : 0;
}

static bool graphs_enabled(void)
{
    const char *env = getenv("TERN_CUDA_GRAPH");
    return !(env && strcmp(env, "0") == 0);
}

/* The host's embedding rows and position to the GPU (pinned buffers: a graph may hold the copies). */
static int32_t enqueue_uploads(tern_cuda_session *s, int32_t n)
{
    CUDA_TRY(cudaMemcpyAsync(s->x, s->host_x, (size_t)n * (size_t)s->m->hv.n_embd * 4, cudaMemcpyHostToDevice,
                             s->stream));
    CUDA_TRY(cudaMemcpyAsync(s->pos, s->host_pos, 4, cudaMemcpyHostToDevice, s->stream));
    return TERN_OK;
}

/* The host's part of a step before its launches: the embedding rows and position into the pinned
 * buffers, and for one token the persistent kernel's state once (before any capture: it allocates). */
static int32_t prepare_step(tern_cuda_session *s, const int32_t *tokens, int32_t n)
{
    hv_embed_rows(&s->m->hv.embd, tokens, n, s->host_x);
    *s->host_pos = s->n_past;
    if (n == 1 && !s->persist_tried) {
        s->persist_tried = true;
        TRY(persist_init(s, &s->persist));
    }
    return TERN_OK;
}

/* decode_top's step: the uploads, the decoder with its LM head in one piece (no range copies to
 * overlap), the selection written to host-mapped memory. */
static int32_t enqueue_top(tern_cuda_session *s)
{
    TRY(enqueue_uploads(s, 1));
    TRY(enqueue_forward(s, 1, true, 0, true));
    return launch_top_logits(s->logits, s->m->hv.n_vocab, s->top_kept, s->top_ticket, s->dev_top, s->stream);
}

/* The one-token step as a graph (top: decode_top's, from the uploads to the selection); a failed
 * capture leaves that step on plain launches. */
static cudaGraphExec_t capture_step(tern_cuda_session *s, bool top)
{
    if (!graphs_enabled())
        return NULL;
    cudaGraph_t graph = NULL;
    cudaGraphExec_t exec = NULL;
    if (cudaStreamBeginCapture(s->stream, cudaStreamCaptureModeThreadLocal) != cudaSuccess)
        return NULL;
    const int32_t st = top ? enqueue_top(s) : enqueue_forward(s, 1, true, 0);
    const cudaError_t end = cudaStreamEndCapture(s->stream, &graph);
    if (st == TERN_OK && end == cudaSuccess && graph && cudaGraphInstantiate(&exec, graph, 0) != cudaSuccess)
        exec = NULL;
    if (graph)
        cudaGraphDestroy(graph);
    cudaGetLastError(); /* a failed capture is not an error of the next call */
    return exec;
}

static int32_t forward_chunk(tern_cuda_session *s, const int32_t *tokens, int32_t n, float *logits, bool all)
{
    const int64_t V = s->m->hv.n_vocab;
    TRY(prepare_step(s, tokens, n));
    TRY(enqueue_uploads(s, n));
    if (n == 1 && logits && !s->graph_tried) {
        s->graph_tried = true;
        s->decode_graph = capture_step(s, false);
    }
    if (n == 1 && logits && s->decode_graph)
        CUDA_TRY(cudaGraphLaunch(s->decode_graph, s->stream));
    else
        TRY(enqueue_forward(s, n, logits != NULL, all ? 0 : n - 1));
    if (logits && n == 1) /* each range's logits as soon as its event fires: a copy of 513 kB to
                             pageable memory costs ~80 us after the step on an H100 host */
        for (int32_t i = 0; i < TERN_CUDA_HEAD_PIECES; i++) {
            const int64_t r0 = head_piece_start(V, i), r1 = head_piece_start(V, i + 1);
            CUDA_TRY(cudaStreamWaitEvent(s->copy_stream, s->head_done[i], 0));
            CUDA_TRY(cudaMemcpyAsync(logits + r0, s->logits + r0, (size_t)(r1 - r0) * 4, cudaMemcpyDeviceToHost,
                                     s->copy_stream));
        }
    else if (logits)
        CUDA_TRY(cudaMemcpyAsync(logits, s->logits, (size_t)((all ? n : 1) * V) * 4, cudaMemcpyDeviceToHost,
                                 s->stream));
    CUDA_TRY(cudaStreamSynchronize(s->stream));
    CUDA_TRY(cudaStreamSynchronize(s->copy_stream));
    return TERN_OK;
}

extern "C" int32_t tern_cuda_forward(tern_cuda_session *s, const int32_t *tokens, int32_t n, float *out_logits,
                                     int32_t all_logits)
{
    if (!s || !tokens || !out_logits || n < 1)
        return tern_fail(TERN_ERR_INVALID, "tern_cuda_forward: NULL argument or n = %d", n);
    if (n > s->n_ctx - s->n_past)
        return tern_fail(TERN_ERR_CONTEXT, "%d cached + %d new tokens exceed the context of %d", s->n_past, n,
                         s->n_ctx);
    for (int32_t i = 0; i < n; i++)
        if (tokens[i] < 0 || tokens[i] >= s->m->hv.n_vocab)
            return tern_fail(TERN_ERR_INVALID, "token id %d at %d outside [0, %d)", tokens[i], i, s->m->hv.n_vocab);
    s->cancel.store(0);
    s->top_logits_valid = false;
    const int32_t start = s->n_past;
    for (int32_t c = 0; c < n; c += TERN_CUDA_CHUNK) {
        if (s->cancel.load()) {
            s->n_past = start;
            return tern_fail(TERN_ERR_CANCELLED, "cancelled");
        }
        const int32_t len = n - c < TERN_CUDA_CHUNK ? n - c : TERN_CUDA_CHUNK;
        const bool last = c + len == n;
        float *logits = all_logits ? out_logits + (size_t)c * (size_t)s->m->hv.n_vocab : (last ? out_logits : NULL);
        const int32_t st = forward_chunk(s, tokens + c, len, logits, all_logits != 0);
        if (st != TERN_OK) {
            s->n_past = start;
            return st;
        }
        s->n_past += len;
    }
    return TERN_OK;
}

extern "C" int32_t tern_cuda_decode_top(tern_cuda_session *s, int32_t token, tern_cuda_top *out)
{
    if (!s || !out)
        return tern_fail(TERN_ERR_INVALID, "tern_cuda_decode_top: NULL argument");
    const tern_cuda_model *m = s->m;
    if (s->n_past >= s->n_ctx)
        return tern_fail(TERN_ERR_CONTEXT, "%d cached + 1 new token exceed the context of %d", s->n_past, s->n_ctx);
    if (token < 0 || token >= m->hv.n_vocab)
        return tern_fail(TERN_ERR_INVALID, "token id %d outside [0, %d)", token, m->hv.n_vocab);
    s->top_logits_valid = false;
    TRY(prepare_step(s, &token, 1));
    if (!s->top_tried) {
        s->top_tried = true;
        s->top_graph = capture_step(s, true);
    }
    if (s->top_graph)
        CUDA_TRY(cudaGraphLaunch(s->top_graph, s->stream));
    else
        TRY(enqueue_top(s));
    CUDA_TRY(cudaStreamSynchronize(s->stream));
    memcpy(out, s->host_top, sizeof *out);
    s->n_past += 1;
    s->top_logits_valid = true;
    return TERN_OK;
}

extern "C" int32_t tern_cuda_last_logits(tern_cuda_session *s, float *out)
{
    if (!s || !out)
        return tern_fail(TERN_ERR_INVALID, "tern_cuda_last_logits: NULL argument");
    if (!s->top_logits_valid)
        return tern_fail(TERN_ERR_INVALID, "tern_cuda_last_logits: the session changed since its last decode_top");
    CUDA_TRY(cudaMemcpy(out, s->logits, (size_t)s->m->hv.n_vocab * 4, cudaMemcpyDeviceToHost));
    return TERN_OK;
}
