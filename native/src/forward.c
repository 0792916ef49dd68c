/* One chunk of the BitNet decoder step on the thread pool (the arithmetic of
 * engine/reference.py). Per layer, five phases (phase.h: items from a counter, then a wait for
 * all items done — no per-phase meeting of threads):
 *   P1 Q/K/V rows, one head per item, with RoPE and the KV-cache store;  P2 attention;
 *   P3 wo rows added to the residual;  P4 gate and up rows, act(gate) * up;
 *   P5 down rows added to the residual.  Then the LM head.
 * Each GEMM phase's input is RMS-normalized and int8-quantized first: for one token, privately
 * by every thread that joins the phase (cheaper than a meeting); for a prompt chunk, in an input
 * phase of its own, one token per item, into shared buffers. */
#include <math.h>
#include <string.h>

#include "attn_prefill.h"
#include "f16.h"
#include "kv_cache.h"
#include "ops.h"
#include "phase.h"
#include "session.h"

typedef struct job {
    tern_session *s;
    int32_t n, first;
    float *logits;
    bool all;
} job;

static void trace(const job *j, const char *name, int32_t layer, const float *data, int32_t n, int64_t w)
{
    j->s->trace(j->s->trace_user, name, layer, data, n, (int32_t)w);
}

static void quantize_token(const job *j, const phase_input *in, int32_t t, float *xf, float *xs, int8_t *xq)
{
    tern_rms_norm(in->in + t * in->ld, in->w, in->width, j->s->m->rms_eps, xf);
    *xs = tern_quantize_row(xf, in->width, xq);
}

/* Sets ts->in_* for the next GEMM phase. One token: only records the input (prepare_input
 * computes it once that phase is known to have items). A prompt chunk: an input phase. */
static void input_phase(const job *j, thread_scratch *ts, phase_input in)
{
    tern_session *s = j->s;
    const int64_t w = in.width;
    if (j->n - in.t0 == 1) {
        ts->pending = in;
        ts->has_pending = true;
        ts->in_q = ts->xq, ts->in_s = ts->xs, ts->in_f = ts->xf;
        return;
    }
    ts->has_pending = false;
    phase ph;
    int64_t it;
    if (phase_open(s, ts, j->n - in.t0, &ph))
        while (phase_take(s, &ph, &it)) {
            quantize_token(j, &in, in.t0 + (int32_t)it, s->xf + it * w, &s->xs[it], s->xq + it * w);
            phase_done(s, &ph);
        }
    phase_wait(s, &ph);
    ts->in_q = s->xq, ts->in_s = s->xs, ts->in_f = s->xf;
}

static void prepare_input(const job *j, thread_scratch *ts)
{
    if (ts->has_pending) {
        quantize_token(j, &ts->pending, ts->pending.t0, ts->xf, ts->xs, ts->xq);
        ts->has_pending = false;
    }
}

/* acc[t * nr + i] = rows r0..r0+nr of w times this thread's quantized tokens. */
static void t2_rows(const job *j, thread_scratch *ts, const t2_matrix *w, int64_t r0, int64_t nr)
{
    const tern_kernels *k = j->s->m->kern;
    const uint8_t *wp = w->codes + r0 * tern_t2_row_bytes(w->cols);
    if (j->n == 1)
        k->gemv_t2(wp, w->cols, ts->in_q, ts->acc, 0, nr);
    else
        k->gemm_t2(wp, w->cols, ts->in_q, w->cols, j->n, ts->acc, nr, 0, nr, ts->gemm);
}

/* BitLinear's output scaling, in the reference's order: float(acc) / s * scale. The row loops
 * below are branch-free over restrict pointers so that the compiler vectorizes them. */
static inline float bitlinear_out(int32_t acc, float s, float scale) { return (float)acc / s * scale; }

enum out_mode { OUT_SET, OUT_ADD, OUT_RELU2, OUT_SILU, OUT_MUL };

static void store_rows(const int32_t *restrict acc, float s, float scale, float *restrict out,
                       int64_t nr, enum out_mode mode)
{
    switch (mode) {
    case OUT_SET:
        for (int64_t i = 0; i < nr; i++) out[i] = bitlinear_out(acc[i], s, scale);
        break;
    case OUT_ADD:
        for (int64_t i = 0; i < nr; i++) out[i] += bitlinear_out(acc[i], s, scale);
        break;
    case OUT_RELU2:
        for (int64_t i = 0; i < nr; i++) out[i] = tern_relu2(bitlinear_out(acc[i], s, scale));
        break;
    case OUT_SILU:
        for (int64_t i = 0; i < nr; i++) out[i] = tern_silu(bitlinear_out(acc[i], s, scale));
        break;
    case OUT_MUL:
        for (int64_t i = 0; i < nr; i++) out[i] *= bitlinear_out(acc[i], s, scale);
        break;
    }
}

/* ---- the phases: an item function each, run by run_phase ---- */

typedef void (*item_fn)(const job *j, thread_scratch *ts, const void *arg, int64_t it);

static void run_phase(const job *j, thread_scratch *ts, int64_t items, bool gemm, item_fn fn, const void *arg)
{
    tern_session *s = j->s;
    phase ph;
    int64_t it;
    if (phase_open(s, ts, items, &ph)) {
        if (gemm)
            prepare_input(j, ts);
        while (phase_take(s, &ph, &it)) {
            fn(j, ts, arg, it);
            phase_done(s, &ph);
        }
    }
    phase_wait(s, &ph);
}

/* P1 item: one head of Q, K or V, with RoPE (Q, K) and the cache store (K, V). */
static void qkv_item(const job *j, thread_scratch *ts, const void *arg, int64_t it)
{
    tern_session *s = j->s;
    const tern_model *m = s->m;
    const int32_t layer = *(const int32_t *)arg;
    const model_layer *L = &m->layers[layer];
    const int64_t hd = m->head_dim, e = m->n_embd, half = hd / 2;
    const int kind = it < m->n_head ? 0 : (it < m->n_head + m->n_head_kv ? 1 : 2);
    const int64_t head = kind == 0 ? it : (kind == 1 ? it - m->n_head : it - m->n_head - m->n_head_kv);
    const t2_matrix *w = kind == 0 ? &L->wq : (kind == 1 ? &L->wk : &L->wv);
    const int64_t r0 = head * hd, col = kind == 0 ? r0 : (kind == 1 ? e + r0 : e + s->kv_dim + r0);
    t2_rows(j, ts, w, r0, hd);
    for (int32_t t = 0; t < j->n; t++) {
        float *out = s->qkv + t * s->qkv_dim + col;
        store_rows(ts->acc + t * hd, ts->in_s[t], w->scale, out, hd, OUT_SET);
        if (kind != 2)
            tern_rope_head(out, (int32_t)hd, s->rope_cos + t * half, s->rope_sin + t * half);
        if (kind != 0)
            tern_kv_store(s, kind == 2, layer, j->first + t, head, out);
    }
}

/* P2 item (per-head path): token t, query head h. */
static void attention_item(const job *j, thread_scratch *ts, const void *arg, int64_t it)
{
    const tern_session *s = j->s;
    const tern_model *m = s->m;
    const int32_t layer = *(const int32_t *)arg, t = (int32_t)(it / m->n_head), h = (int32_t)(it % m->n_head);
    const int64_t hd = m->head_dim, g = h / (m->n_head / m->n_head_kv);
    const int32_t npos = j->first + t + 1;
    const float scale = (float)(1.0 / sqrt((double)hd));
    const float *q = s->qkv + t * s->qkv_dim + h * hd;
    float mx = -INFINITY;
    for (int32_t p = 0; p < npos; p++) {
        const float sc = tern_kv_dot(s, layer, p, g, q) * scale;
        ts->scores[p] = sc;
        mx = sc > mx ? sc : mx;
    }
    for (int32_t p = 0; p < npos; p++)
        ts->scores[p] = expf(ts->scores[p] - mx);
    const float sum = tern_sum(ts->scores, npos);
    float *out = s->att + t * m->n_embd + h * hd;
    memset(out, 0, (size_t)hd * sizeof(float));
    for (int32_t p = 0; p < npos; p++)
        tern_kv_axpy(s, layer, p, g, ts->scores[p] / sum, out);
}

/* The batched kernel's view of KV head g of a layer's cache (f16, or int8 with its row scales),
 * for tokens starting at position `first`; callers add the queries, the output and the range. */
static tern_attn_args cache_args(const job *j, int32_t layer, int64_t g)
{
    const tern_session *s = j->s;
    const tern_model *m = s->m;
    const int32_t hd = (int32_t)m->head_dim;
    const int64_t rows = tern_kv_row(s, layer, 0, g);
    tern_attn_args a = {.ldkv = hd, .first = j->first, .heads = (int32_t)(m->n_head / m->n_head_kv),
                        .hd = hd, .scale = (float)(1.0 / sqrt((double)hd))};
    if (s->kv_type == TERN_KV_INT8) {
        const int64_t scales = tern_kv_scale_at(s, layer, 0, g);
        a.k8 = (const int8_t *)s->k_cache + rows, a.v8 = (const int8_t *)s->v_cache + rows;
        a.ks = s->k_scale + scales, a.vs = s->v_scale + scales, a.lds = m->n_head_kv;
    } else {
        a.k = (const uint16_t *)s->k_cache + rows, a.v = (const uint16_t *)s->v_cache + rows;
    }
    return a;
}

/* P2 item with an f16 or int8 cache: attn_prefill.h's batched kernel (helper H4b), ATTN_TOKENS
 * tokens x the query heads of one KV group, so each converted K/V row serves every query row
 * that reads it — for decode too: the group's heads share it (2B4T at 3000 positions, one
 * thread: 3.2 tok/s against 1.4 with a pass per head). */
#define ATTN_TOKENS 16
static void attention_batched_item(const job *j, thread_scratch *ts, const void *arg, int64_t it)
{
    const tern_session *s = j->s;
    const tern_model *m = s->m;
    const int32_t layer = *(const int32_t *)arg;
    const int64_t g = it % m->n_head_kv, t0 = it / m->n_head_kv * ATTN_TOKENS;
    tern_attn_args a = cache_args(j, layer, g);
    a.q = s->qkv + t0 * s->qkv_dim + g * a.heads * a.hd, a.ldq = s->qkv_dim;
    a.out = s->att + t0 * m->n_embd + g * a.heads * a.hd, a.ldo = m->n_embd;
    a.first = j->first + (int32_t)t0;
    a.n = (int32_t)(j->n - t0 < ATTN_TOKENS ? j->n - t0 : ATTN_TOKENS);
    tern_attention_prefill(&a, ts->gemm, TERN_GEMM_SCRATCH_BYTES);
}

static bool batched_attention(const tern_session *s)
{
    const tern_model *m = s->m;
    return s->kv_type != TERN_KV_F32 &&
           tern_attention_prefill_supported(m->n_head / m->n_head_kv, m->head_dim, TERN_GEMM_SCRATCH_BYTES);
}

/* Decode over a long context: a KV head's positions are split in parts of ATTN_SPLIT (by
 * position only, so the thread count never changes the result), one work item each, so that
 * threads share the attention evenly (2B4T has 5 KV heads: 3 to 2 on two threads, and 5 of 8
 * threads busy). Each item leaves its part unnormalized; the last of a head's parts to finish
 * merges them in part order. */
static int32_t attention_splits(int32_t npos) { return (npos + ATTN_SPLIT - 1) / ATTN_SPLIT; }

static void attention_split_item(const job *j, thread_scratch *ts, const void *arg, int64_t it)
{
    tern_session *s = j->s;
    const tern_model *m = s->m;
    const int32_t layer = *(const int32_t *)arg;
    const int32_t group = (int32_t)(m->n_head / m->n_head_kv), hd = (int32_t)m->head_dim;
    const int32_t npos = j->first + 1, parts = attention_splits(npos);
    const int64_t g = it / parts, part = it % parts;
    const int64_t stride = hd + 2; /* [m, l, o[hd]] */
    tern_attn_args a = cache_args(j, layer, g);
    a.q = s->qkv + g * group * hd, a.ldq = s->qkv_dim, a.n = 1;
    a.begin = (int32_t)(part * ATTN_SPLIT), a.limit = (int32_t)((part + 1) * ATTN_SPLIT);
    a.partial = s->attn_part + (g * parts + part) * group * stride;
    tern_attention_prefill(&a, ts->gemm, TERN_GEMM_SCRATCH_BYTES);
    /* acq_rel: this part's writes are seen by the merging item, which sees every other's. */
    if (atomic_fetch_add_explicit(&s->attn_done[g], 1, memory_order_acq_rel) != parts - 1)
        return;
    atomic_store_explicit(&s->attn_done[g], 0, memory_order_relaxed); /* the next layer's count */
    const float *first = s->attn_part + g * parts * group * stride;
    for (int32_t h = 0; h < group; h++) {
        float mx = -INFINITY, sum = 0.0f;
        for (int32_t p = 0; p < parts; p++) {
            const float mp = first[(p * group + h) * stride];
            mx = mp > mx ? mp : mx;
        }
        float *out = s->att + (g * group + h) * hd;
        memset(out, 0, (size_t)hd * sizeof(float));
        for (int32_t p = 0; p < parts; p++) {
            const float *part_h = first + (p * group + h) * stride;
            if (part_h[1] == 0.0f)
                continue;
            const float w = expf(part_h[0] - mx);
            sum += part_h[1] * w;
            for (int32_t d = 0; d < hd; d++)
                out[d] += part_h[2 + d] * w;
        }
        const float inv = 1.0f / sum;
        for (int32_t d = 0; d < hd; d++)
            out[d] *= inv;
    }
}

static void attention_phase(const job *j, thread_scratch *ts, const int32_t *layer)
{
    const tern_session *s = j->s;
    const tern_model *m = s->m;
    if (batched_attention(s)) {
        const int32_t parts = attention_splits(j->first + 1);
        if (j->n == 1 && parts > 1)
            run_phase(j, ts, m->n_head_kv * parts, false, attention_split_item, layer);
        else
            run_phase(j, ts, m->n_head_kv * ((j->n + ATTN_TOKENS - 1) / ATTN_TOKENS), false,
                      attention_batched_item, layer);
    } else {
        run_phase(j, ts, (int64_t)j->n * m->n_head, false, attention_item, layer);
    }
}

/* Rows per item of a matrix phase: about four items per thread, in multiples of 64 rows, at
 * most 256. Long runs of contiguous rows stream faster (the hardware prefetcher restarts at
 * each jump to another item): 2B4T decode on 2 threads of the 2-vCPU host ran 5% faster with
 * 256 rows than with 64; more threads get smaller items, so the phase ends evenly. */
static int64_t row_chunk(const tern_session *s, int64_t rows)
{
    const int64_t c = rows / (4 * (int64_t)s->n_threads) / ROW_CHUNK_MIN * ROW_CHUNK_MIN;
    return c < ROW_CHUNK_MIN ? ROW_CHUNK_MIN : (c > ROW_CHUNK_MAX ? ROW_CHUNK_MAX : c);
}

static int64_t items_of(int64_t rows, int64_t chunk) { return (rows + chunk - 1) / chunk; }

/* P3 / P5 item: `chunk` rows of wo or down, added to the residual. */
typedef struct rows_arg {
    const t2_matrix *w;
    float *dst;
    int64_t ld, chunk;
} rows_arg;

static void residual_item(const job *j, thread_scratch *ts, const void *arg, int64_t it)
{
    const rows_arg *a = arg;
    const int64_t r0 = it * a->chunk, nr = a->w->rows - r0 < a->chunk ? a->w->rows - r0 : a->chunk;
    t2_rows(j, ts, a->w, r0, nr);
    for (int32_t t = 0; t < j->n; t++)
        store_rows(ts->acc + t * nr, ts->in_s[t], a->w->scale, a->dst + t * a->ld + r0, nr, OUT_ADD);
}

/* P4 item: `chunk` rows of gate and up: act(gate) * up. */
typedef struct gate_up_arg {
    const model_layer *L;
    int64_t chunk;
} gate_up_arg;

static void gate_up_item(const job *j, thread_scratch *ts, const void *arg, int64_t it)
{
    tern_session *s = j->s;
    const gate_up_arg *a = arg;
    const model_layer *L = a->L;
    const int64_t ff = s->m->n_ff, r0 = it * a->chunk, nr = ff - r0 < a->chunk ? ff - r0 : a->chunk;
    const bool relu2 = s->m->activation == TERN_ACT_RELU2;
    t2_rows(j, ts, &L->w_gate, r0, nr);
    for (int32_t t = 0; t < j->n; t++)
        store_rows(ts->acc + t * nr, ts->in_s[t], L->w_gate.scale, s->ffn + t * ff + r0, nr,
                   relu2 ? OUT_RELU2 : OUT_SILU);
    t2_rows(j, ts, &L->w_up, r0, nr);
    for (int32_t t = 0; t < j->n; t++)
        store_rows(ts->acc + t * nr, ts->in_s[t], L->w_up.scale, s->ffn + t * ff + r0, nr, OUT_MUL);
}

/* Thread 0 only, with every phase ended by a barrier (tracing): copies a column block of qkv
 * into the shared input buffer (free until the next input phase) to trace it. */
static void trace_qkv(const job *j, int32_t layer)
{
    const tern_session *s = j->s;
    const char *names[3] = {"q", "k", "v"};
    const int64_t cols[3] = {0, s->m->n_embd, s->m->n_embd + s->kv_dim};
    const int64_t widths[3] = {s->m->n_embd, s->kv_dim, s->kv_dim};
    for (int i = 0; i < 3; i++) {
        for (int32_t t = 0; t < j->n; t++)
            memcpy(s->xf + t * widths[i], s->qkv + t * s->qkv_dim + cols[i], (size_t)widths[i] * sizeof(float));
        trace(j, names[i], layer, s->xf, j->n, widths[i]);
    }
}

/* Every thread, after thread 0's trace calls: nobody moves the traced buffers meanwhile. */
static void trace_sync(const job *j)
{
    if (j->s->trace)
        tern_pool_barrier(j->s->pool);
}

static void layer_job(const job *j, thread_scratch *ts, int32_t layer, bool tr)
{
    tern_session *s = j->s;
    const tern_model *m = s->m;
    const model_layer *L = &m->layers[layer];
    const int64_t e = m->n_embd, ff = m->n_ff;

    input_phase(j, ts, (phase_input){s->x, e, L->attn_norm, e, 0});
    run_phase(j, ts, m->n_head + 2 * (int64_t)m->n_head_kv, true, qkv_item, &layer);
    if (tr) trace(j, "attn_norm", layer, ts->in_f, j->n, e);
    if (tr) trace_qkv(j, layer);
    trace_sync(j);

    attention_phase(j, ts, &layer);
    if (tr) trace(j, "attn", layer, s->att, j->n, e);
    trace_sync(j);

    input_phase(j, ts, (phase_input){s->att, e, L->attn_sub_norm, e, 0});
    const rows_arg wo = {&L->wo, s->x, e, row_chunk(s, e)};
    run_phase(j, ts, items_of(e, wo.chunk), true, residual_item, &wo);
    if (tr) trace(j, "attn_sub_norm", layer, ts->in_f, j->n, e);
    trace_sync(j);

    input_phase(j, ts, (phase_input){s->x, e, L->ffn_norm, e, 0});
    const gate_up_arg gate_up = {L, row_chunk(s, ff)};
    run_phase(j, ts, items_of(ff, gate_up.chunk), true, gate_up_item, &gate_up);
    if (tr) trace(j, "ffn_norm", layer, ts->in_f, j->n, e);
    if (tr) trace(j, "ffn_act", layer, s->ffn, j->n, ff);
    trace_sync(j);

    input_phase(j, ts, (phase_input){s->ffn, ff, L->ffn_sub_norm, ff, 0});
    const rows_arg down = {&L->w_down, s->x, e, row_chunk(s, e)};
    run_phase(j, ts, items_of(e, down.chunk), true, residual_item, &down);
    if (tr) trace(j, "ffn_sub_norm", layer, ts->in_f, j->n, ff);
    if (tr) trace(j, "out", layer, s->x, j->n, e);
    trace_sync(j);
}

/* LM-head item: HEAD_CHUNK vocabulary rows for the tokens t0..n-1. */
static void head_item(const job *j, thread_scratch *ts, const void *arg, int64_t it)
{
    const tern_model *m = j->s->m;
    const int32_t t0 = *(const int32_t *)arg, nt = j->n - t0;
    const int64_t e = m->n_embd, V = m->n_vocab, r0 = it * HEAD_CHUNK;
    const int64_t nr = V - r0 < HEAD_CHUNK ? V - r0 : HEAD_CHUNK;
    if (m->lm_head == TERN_LM_HEAD_INT8) {
        const int8_t *w = m->head_q + r0 * e;
        if (nt == 1)
            m->kern->gemv_i8(w, e, ts->in_q, ts->acc, 0, nr);
        else
            m->kern->gemm_i8(w, e, ts->in_q, e, nt, ts->acc, nr, 0, nr, ts->gemm);
        for (int32_t t = 0; t < nt; t++) {
            const int32_t *restrict acc = ts->acc + t * nr;
            const float *restrict hs = m->head_scale + r0;
            float *restrict out = j->logits + t * V + r0;
            for (int64_t i = 0; i < nr; i++)
                out[i] = bitlinear_out(acc[i], ts->in_s[t], hs[i]);
        }
        return;
    }
    const uint8_t *rows = m->head.data + r0 * m->head.row_bytes;
    if (m->head.type == TERN_TYPE_F16 && ((uintptr_t)rows & 1) == 0) {
        for (int32_t t = 0; t < nt; t++)
            m->kern->gemv_f16((const uint16_t *)(const void *)rows, e, ts->in_f + t * e, j->logits + t * V + r0, 0, nr);
        return;
    }
    for (int64_t i = 0; i < nr; i++) {
        tern_dequant_row(m->head.type, rows + i * m->head.row_bytes, e, ts->row);
        for (int32_t t = 0; t < nt; t++) {
            float acc = 0.0f;
            for (int64_t c = 0; c < e; c++)
                acc += ts->row[c] * ts->in_f[t * e + c];
            j->logits[t * V + r0 + i] = acc;
        }
    }
}

static void head_job(const job *j, thread_scratch *ts, bool tr)
{
    const tern_model *m = j->s->m;
    const int32_t t0 = j->all ? 0 : j->n - 1;
    input_phase(j, ts, (phase_input){j->s->x, m->n_embd, m->output_norm, m->n_embd, t0});
    run_phase(j, ts, (m->n_vocab + HEAD_CHUNK - 1) / HEAD_CHUNK, true, head_item, &t0);
    if (tr) trace(j, "output_norm", -1, ts->in_f, j->n - t0, m->n_embd);
}

static void chunk_job(void *ctx, int ith, int nth)
{
    const job *j = ctx;
    thread_scratch *ts = &j->s->ts[ith];
    (void)nth;
    ts->phase = 0;
    const bool tr = ith == 0 && j->s->trace;
    for (int32_t l = 0; l < j->s->m->n_layer; l++)
        layer_job(j, ts, l, tr);
    if (j->logits)
        head_job(j, ts, tr);
}

/* A lookup of one embedding row maps the whole 64 KB-aligned window around it (the kernel's
 * fault-around, which ignores MADV_RANDOM here): 64 KB resident per distinct token, ~250 MB for
 * a 4096-token context. Dropping the window after the copy keeps it at the row's size; the
 * window is clipped to the embedding so no weight page is dropped. */
#define LOOKUP_WINDOW 65536

static void release_lookup_window(const embd_matrix *e, int64_t n_rows, int32_t token)
{
    const uintptr_t lo = (uintptr_t)e->data, hi = lo + (uintptr_t)(e->row_bytes * n_rows);
    const uintptr_t row = lo + (uintptr_t)token * (uintptr_t)e->row_bytes;
    uintptr_t a = row / LOOKUP_WINDOW * LOOKUP_WINDOW;
    uintptr_t b = (row + (uintptr_t)e->row_bytes + LOOKUP_WINDOW - 1) / LOOKUP_WINDOW * LOOKUP_WINDOW;
    a = a < lo ? lo : a;
    b = b > hi ? hi : b;
    tern_os_release_pages((const void *)a, (uint64_t)(b - a));
}

void tern_forward_chunk(tern_session *s, const int32_t *tokens, int32_t n, float *logits, bool all)
{
    const tern_model *m = s->m;
    const int32_t half = m->head_dim / 2;
    for (int32_t t = 0; t < n; t++) {
        tern_dequant_row(m->token_embd.type, m->token_embd.data + (int64_t)tokens[t] * m->token_embd.row_bytes,
                         m->n_embd, s->x + (int64_t)t * m->n_embd);
        if (m->embd_lookup_release)
            release_lookup_window(&m->token_embd, m->n_vocab, tokens[t]);
        tern_rope_table(s->n_past + t, m->head_dim, (double)m->rope_theta, s->rope_cos + t * half,
                        s->rope_sin + t * half);
    }
    for (int32_t p = 0; p < 2 * s->n_phases; p++)
        atomic_store_explicit(&s->work[p], 0, memory_order_relaxed);
    job j = {s, n, s->n_past, logits, all};
    tern_pool_run(s->pool, chunk_job, &j);
}
