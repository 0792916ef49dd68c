/* The CUDA model and session structs (model.cu, session.cu, probe.cu). */
#ifndef TERN_CUDA_MODEL_H
#define TERN_CUDA_MODEL_H

#include <atomic>

#include "common.cuh"
#include "host_view.h"

#define TERN_CUDA_CHUNK 512   /* tokens per prefill chunk (scratch is sized for it) */
#define TERN_CUDA_MAX_SPLIT 64    /* attention splits at most (partials buffer, merge) */
#define TERN_CUDA_PREFILL_SPLIT 8 /* attention splits per token in prefill (partials: 8 per token) */
#define TERN_CUDA_HEAD_PIECES 4   /* one-token LM head: row ranges whose logits are copied while the next runs */

enum head_kind { HEAD_I8 = 0, HEAD_F16 = 1, HEAD_F32 = 2 };

struct cuda_layer {
    dmat qkv, wo, gate_up, down; /* T2 codes; q|k|v and gate|up fused row-wise */
    float *attn_norm, *attn_sub_norm, *ffn_norm, *ffn_sub_norm;
};

struct tern_cuda_model {
    hv_model hv;               /* sizes, and the embedding in the file mapping */
    int64_t kv_dim, qkv_dim;
    cuda_layer *layers;
    float *output_norm;
    dmat head;                 /* HEAD_I8: int8 rows + per-row scales; else f16/f32 rows */
    int head_kind;
    void **allocs;             /* every device allocation, freed with the model */
    int32_t n_allocs, cap_allocs;
    uint64_t bytes;
};

struct persist_state;

struct tern_cuda_session {
    tern_cuda_model *m;
    int32_t n_ctx, n_past;
    cudaStream_t stream;
    /* one-token steps: the LM head runs in TERN_CUDA_HEAD_PIECES row ranges, each recording
     * head_done[i]; copy_stream copies a range's logits to the host while the next range runs */
    cudaStream_t copy_stream;
    cudaEvent_t head_done[TERN_CUDA_HEAD_PIECES];
    cudaGraphExec_t decode_graph; /* one-token step, captured at the first decode */
    bool graph_tried;
    /* tern_cuda_decode_top: its own graph (the uploads, the step with the LM head in one piece,
     * the selection), the selection's scratch, and its result in host-mapped memory */
    cudaGraphExec_t top_graph;
    bool top_tried;
    bool top_logits_valid;     /* s->logits holds the last decode_top step's logits */
    uint64_t *top_kept;
    int *top_ticket;
    tern_cuda_top *host_top, *dev_top;
    persist_state *persist;    /* the persistent decode step (persist.cu), or NULL: one kernel per operation */
    bool persist_tried;
    int32_t kv_type;           /* TERN_KV_F16 or TERN_KV_F32 (the reference's precision) */
    size_t kv_elem;
    char *k_cache, *v_cache;   /* n_layer x n_ctx x kv_dim values of kv_elem bytes */
    float *x, *qkv, *h, *att, *xf, *partial, *logits, *rope_cos, *rope_sin;
    int8_t *xq;
    act_meta *meta;
    /* fused-norm decode (TERN_CUDA_FUSED_NORM, default on; NULL where off): the next norm's
     * input times its weights and the producer blocks' partial statistics, two of each used in
     * turn, so a kernel never reads the buffer it writes */
    float *nxw[2];
    float2 *nstats[2];
    int *counters;             /* TERN_CUDA_CHUNK x n_head_kv split counters of the attention (zero) */
    int32_t *pos;              /* device: the chunk's first position (read by the graph) */
    float *host_x;             /* pinned: TERN_CUDA_CHUNK x n_embd embedding rows */
    int32_t *host_pos;         /* pinned */
    std::atomic<int> cancel;
};

/* Device allocation recorded in the model (freed by tern_cuda_model_free). */
int32_t model_alloc(tern_cuda_model *m, void **p, size_t bytes);

/* Enqueue the decoder for n tokens (positions from s->pos) on s->stream; logits rows for
 * tokens [t0, n) when want_logits. One token's LM head runs in TERN_CUDA_HEAD_PIECES ranges,
 * each recording its event, unless whole_head. */
int32_t enqueue_forward(tern_cuda_session *s, int32_t n, bool want_logits, int32_t t0, bool whole_head = false);

int32_t matmul(const dmat &w, bool t2, const int8_t *xq, const act_meta *meta, int32_t n, float *out,
               int64_t ldo, int epi, cudaStream_t st);

#endif
