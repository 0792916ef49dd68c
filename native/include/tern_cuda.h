/* Tern's optional CUDA backend (built with -DTERN_CUDA=ON; helper H7, issue 7).
 *
 * The same decoder as tern.h on an NVIDIA GPU: a CUDA model is made from a host tern_model
 * (which did every check and the repacking), its weights are copied to the GPU, and the host
 * model may be freed right after. The token embedding stays in the file mapping (one row is
 * dequantized on the host per token), so the mapping must outlive the CUDA model.
 *
 * These symbols exist only in a TERN_CUDA build. The library still loads and runs the CPU
 * path without a GPU or driver: the CUDA runtime is linked statically and finds the driver
 * lazily, and tern_cuda_available() says whether a device can be used. Status codes and
 * tern_last_error() as in tern.h; nothing prints, exits or aborts. */
#ifndef TERN_CUDA_H
#define TERN_CUDA_H
#include "tern.h"
#ifdef __cplusplus
extern "C" {
#endif

typedef struct tern_cuda_model tern_cuda_model;
typedef struct tern_cuda_session tern_cuda_session;

/* 1 if a CUDA device (compute capability >= 8.0) can be used, else 0 (tern_last_error says
 * why: no driver, no device, too old). */
TERN_API int32_t tern_cuda_available(void);
/* "NVIDIA H100 80GB HBM3 (sm_90, 132 SMs)" or NULL when none is available. */
TERN_API const char *tern_cuda_device_name(void);

/* Copies host's weights to device 0: q|k|v and gate|up fused, the LM head as host built it
 * (int8 rows, or f16/f32 rows for TERN_LM_HEAD_F16). host may be freed afterwards. */
TERN_API int32_t tern_cuda_model_create(const tern_model *host, tern_cuda_model **out);
TERN_API void tern_cuda_model_free(tern_cuda_model *model);
TERN_API uint64_t tern_cuda_model_device_bytes(const tern_cuda_model *model);

/* A KV cache of n_ctx positions (kv_type TERN_KV_F16, or TERN_KV_F32: the reference's
 * precision) and all scratch, on the GPU; decode (one token) runs as a CUDA graph captured at
 * the first single-token forward (TERN_CUDA_GRAPH=0 in the environment: plain launches).
 * TERN_CUDA_PERSISTENT=1 in the environment when a session's first decode runs: the layers of a
 * decode step run as one persistent cooperative kernel instead of one kernel per operation
 * (sm_90; measured no faster on an H100, docs/CUDA.md). Same semantics as the tern.h session
 * functions. */
TERN_API int32_t tern_cuda_session_create(tern_cuda_model *model, int32_t n_ctx, int32_t kv_type,
                                          tern_cuda_session **out);
TERN_API void tern_cuda_session_free(tern_cuda_session *session);
TERN_API int32_t tern_cuda_session_n_past(const tern_cuda_session *session);
TERN_API int32_t tern_cuda_session_truncate(tern_cuda_session *session, int32_t n);
TERN_API int32_t tern_cuda_session_copy(tern_cuda_session *dst, const tern_cuda_session *src);
TERN_API int32_t tern_cuda_forward(tern_cuda_session *session, const int32_t *tokens, int32_t n,
                                   float *out_logits, int32_t all_logits);
TERN_API void tern_cuda_cancel(tern_cuda_session *session);

/* The best logits of a one-token step, best first (higher logit, then lower id): entries
 * [0, exact) are exactly the vocabulary's best; ids past min(n_vocab, TERN_CUDA_TOP_K) are -1. */
#define TERN_CUDA_TOP_K 256
typedef struct tern_cuda_top {
    int32_t exact;
    int32_t ids[TERN_CUDA_TOP_K];
    float logits[TERN_CUDA_TOP_K];
} tern_cuda_top;
/* Decodes one token as tern_cuda_forward does, but selects the best logits on the GPU and
 * copies only those (2 kB instead of the vocabulary's logits: a sampler with top-k or greedy
 * needs no more). The whole logit vector of that step stays on the GPU until the next call that
 * changes the session: tern_cuda_last_logits copies it. */
TERN_API int32_t tern_cuda_decode_top(tern_cuda_session *session, int32_t token, tern_cuda_top *out);
TERN_API int32_t tern_cuda_last_logits(tern_cuda_session *session, float *out_logits);
/* Test entry: the GPU's selection over n host logits (vocabularies up to 1,048,576 tokens). */
TERN_API int32_t tern_cuda_top_test(const float *logits, int64_t n, tern_cuda_top *out);
/* 1 once decode (tern_cuda_forward's or tern_cuda_decode_top's) runs as a replayed CUDA graph
 * (2: a graph of the persistent decode kernel), 0 before the first decode or without graphs. */
TERN_API int32_t tern_cuda_session_graph_active(const tern_cuda_session *session);

/* Kernel test entry, the GPU twin of tern_kernel_test (op 0 gemv_t2, 1 gemm_t2, 2 gemv_i8,
 * 3 gemm_i8): y = n x rows int32 exact dot products of host buffers. */
TERN_API int32_t tern_cuda_kernel_test(int32_t op, const void *w, uint64_t w_size, int64_t rows,
                                       int64_t k, const int8_t *x, int64_t n, int32_t *y);

/* Device memory read bandwidth: a read-only kernel over `bytes`, median of reps, 1e9 B/s. */
TERN_API int32_t tern_cuda_bandwidth_probe(uint64_t bytes, int32_t reps, double *gb_per_s);

/* Seconds per decode GEMV of one matrix kind, timed as a CUDA graph over every layer's matrix
 * of that kind (so the bytes exceed the L2 cache), median of reps; *bytes: weight bytes per
 * launch. which: 0 q|k|v, 1 wo, 2 gate|up, 3 down, 4 LM head. With TERN_CUDA_PERSISTENT=1 a
 * ternary kind is timed as the persistent kernel runs it: that kind's step of every layer
 * (grid barrier, norm + quantization, dot products from shared memory, epilogue) with the next
 * layer's rows streaming into a second slot. */
TERN_API int32_t tern_cuda_gemv_time(tern_cuda_model *model, int32_t which, int32_t reps,
                                     double *seconds, double *bytes);

/* Seconds per link of a CUDA graph of `launches` kernels that each only read their own `bytes`
 * (distinct buffers), launched as tern_cuda_gemv_time launches the GEMVs, median of reps: what
 * that timing allows a kernel that moves the same bytes. */
TERN_API int32_t tern_cuda_read_chain_time(uint64_t bytes, int32_t launches, int32_t reps, double *seconds);

/* tern_cuda_read_chain_time for the bytes and launches tern_cuda_gemv_time times for `which`: the
 * floor of that shape's figure. */
TERN_API int32_t tern_cuda_gemv_read_floor(tern_cuda_model *model, int32_t which, int32_t reps, double *seconds);

/* Seconds of one replay of the session's decode graph on the GPU alone (no host work), median
 * of reps: top 0, tern_cuda_forward's (no copies), top 1, tern_cuda_decode_top's (its uploads and
 * the selection included); it rewrites the KV row at n_past, which the next forward writes again,
 * and n_past is unchanged. Needs a decoded token of that kind first (its graph is captured then). */
TERN_API int32_t tern_cuda_decode_time(tern_cuda_session *session, int32_t top, int32_t reps, double *seconds);

#ifdef __cplusplus
}
#endif
#endif
