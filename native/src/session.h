/* A session: KV cache, per-chunk scratch (shared and per thread) and the thread pool.
 * Everything tern_forward touches is allocated here, for TERN_CHUNK tokens and n_ctx. */
#ifndef TERN_SESSION_H
#define TERN_SESSION_H

#include <stdatomic.h>

#include "model.h"
#include "threadpool.h"

/* Rows per work item of wo / gate+up / down: 64..256, by tern_row_chunk (forward.c). */
#define ROW_CHUNK_MIN 64
#define ROW_CHUNK_MAX 256
#define HEAD_CHUNK 256 /* LM-head rows per work item */
#define ATTN_SPLIT 512 /* decode attention: positions per work item (forward.c) */

/* A phase's input: rows t0..n-1 of `in` (stride ld), RMS-normalized with w, then quantized. */
typedef struct phase_input {
    const float *in;
    int64_t ld;
    const float *w;
    int64_t width;
    int32_t t0;
} phase_input;

typedef struct thread_scratch {
    int8_t *xq;      /* max(n_embd, n_ff): a single token's quantized phase input */
    float *xs;       /* its activation scale */
    float *xf;       /* max(n_embd, n_ff): its normalized floats */
    int32_t *acc;    /* TERN_CHUNK x acc_rows: GEMM results of one work item */
    void *gemm;      /* TERN_GEMM_SCRATCH_BYTES, 64-aligned */
    float *scores;   /* n_ctx attention weights */
    float *row;      /* n_embd: a dequantized LM-head row */
    /* The current phase's input, set by input_phase: this thread's own buffers above (one
     * token: every thread that joins the phase quantizes it) or the session's shared ones (a
     * prompt chunk: an input phase, one token per item; forward.c). */
    const int8_t *in_q;
    const float *in_s, *in_f;
    int32_t phase;   /* phase.h: this thread's position in the chunk's phase sequence */
    phase_input pending; /* one token: quantized privately when its consuming phase opens */
    bool has_pending;
} thread_scratch;

struct tern_session {
    tern_model *m;
    int32_t n_ctx, n_past, kv_type;
    int64_t kv_dim, qkv_dim, width; /* n_head_kv*head_dim, n_embd + 2*kv_dim, max(n_embd, n_ff) */
    int64_t acc_rows;
    void *k_cache, *v_cache; /* n_layer x n_ctx x kv_dim, f16, f32 or int8 (kv_cache.h) */
    size_t kv_elem;          /* bytes per cached value */
    float *k_scale, *v_scale; /* int8 only: n_layer x n_ctx x n_head_kv row scales */
    float *x;        /* TERN_CHUNK x n_embd: the residual stream */
    float *qkv;      /* TERN_CHUNK x qkv_dim: q, k, v after RoPE */
    float *att;      /* TERN_CHUNK x n_embd: attention output */
    float *ffn;      /* TERN_CHUNK x n_ff: act(gate) * up */
    int8_t *xq;      /* TERN_CHUNK x width: a prompt chunk's quantized phase input */
    float *xs;       /* TERN_CHUNK: its activation scales */
    float *xf;       /* TERN_CHUNK x width: its normalized floats */
    float *rope_cos, *rope_sin; /* TERN_CHUNK x head_dim/2 */
    _Atomic int64_t *work;      /* phase.h: (next item, items done) per phase */
    float *attn_part;           /* decode attention: per KV head, split and query head of its
                                 * group: [m, l, o[head_dim]] (attn_prefill.h, partial) */
    _Atomic int32_t *attn_done; /* per KV head: splits done in the current layer */
    int32_t n_phases;
    tern_pool *pool;
    thread_scratch *ts;
    int32_t n_threads;
    _Atomic int cancel;
    tern_trace_fn trace;
    void *trace_user;
};

/* Runs one chunk of n <= TERN_CHUNK tokens at position s->n_past (forward.c). logits: where
 * to write n (all) or 1 (last token) rows, or NULL for none. */
void tern_forward_chunk(tern_session *s, const int32_t *tokens, int32_t n, float *logits, bool all);

#endif
