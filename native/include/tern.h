/* Tern native library: ternary (W1.58 A8) kernels and the BitNet decoder step.
 * Knows nothing about Python. Every function that can fail returns an int32_t status
 * (TERN_OK = 0); the error text is fetched with tern_last_error() (per thread).
 * Nothing here prints, exits or aborts. */
#ifndef TERN_H
#define TERN_H
#include <stddef.h>
#include <stdint.h>
#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define TERN_API __declspec(dllexport)
#else
#define TERN_API __attribute__((visibility("default")))
#endif

#define TERN_OK 0
#define TERN_ERR_INVALID 1     /* a bad argument (NULL handle, n out of range, ...) */
#define TERN_ERR_FORMAT 2      /* tensor sizes, shapes, types or offsets disagree */
#define TERN_ERR_NOMEM 3       /* an allocation failed */
#define TERN_ERR_UNSUPPORTED 4 /* valid but not handled (tensor type, ISA, ...) */
#define TERN_ERR_CANCELLED 5   /* tern_cancel() stopped the call */
#define TERN_ERR_CONTEXT 6     /* the tokens do not fit in the session's context */

TERN_API const char *tern_version(void);
TERN_API const char *tern_last_error(void);

/* Name of the kernel variant chosen for this CPU (honours TERN_ISA), e.g. "avx512-vnni".
 * NULL if TERN_ISA names a family this CPU cannot run (see tern_last_error). */
TERN_API const char *tern_kernel_name(void);

/* ---- Model ---------------------------------------------------------------------------- */

/* ggml type ids the loader accepts (bitnet.cpp's fork numbers I2_S 36). */
#define TERN_TYPE_F32 0
#define TERN_TYPE_F16 1
#define TERN_TYPE_Q4_0 2
#define TERN_TYPE_Q8_0 8
#define TERN_TYPE_Q6_K 14
#define TERN_TYPE_BF16 30
#define TERN_TYPE_TQ1_0 34
#define TERN_TYPE_TQ2_0 35
#define TERN_TYPE_I2_S 36

#define TERN_ACT_RELU2 0 /* relu(x)^2 gate (BitNet b1.58) */
#define TERN_ACT_SILU 1  /* SiLU gate (upstream arch "bitnet") */

#define TERN_LM_HEAD_INT8 0 /* int8 per-row copy made at load (default: half the bytes of f16) */
#define TERN_LM_HEAD_F16 1  /* the file's own head, f32 accumulation (the exact path) */

#define TERN_KV_F16 0 /* the default: 2 bytes per value */
#define TERN_KV_INT8 1 /* per-head-row absmax int8 K and V with f32 scales (~half of f16) */
#define TERN_KV_F32 2 /* the reference's precision (parity tests), twice the memory of f16 */

/* One weight matrix as stored in the file: rows x cols (ggml ne1 x ne0), row-major. */
typedef struct tern_matrix {
    const void *data; /* the tensor's bytes, inside [file_base, file_base + file_size) */
    uint64_t size;    /* bytes the file declares for the tensor */
    int32_t type;     /* TERN_TYPE_* */
    int64_t cols;     /* ne0: input features, the fastest dimension */
    int64_t rows;     /* ne1: output features */
    float scale;      /* ternary matrices: W = codes * scale, as the loader computed it (I2_S
                       * trailer, the TQ block scale, or absmean for float matrices, times any
                       * per-tensor .scale); float matrices are ternarized with this scale:
                       * code = clamp(round_half_even(w / scale), -1, 1). Unused for embeddings. */
} tern_matrix;

typedef struct tern_layer_params {
    const float *attn_norm;     /* n_embd (copied at load) */
    const float *attn_sub_norm; /* n_head * head_dim */
    const float *ffn_norm;      /* n_embd */
    const float *ffn_sub_norm;  /* n_ff */
    tern_matrix wq, wk, wv, wo, w_gate, w_up, w_down; /* ternary (I2_S, TQ1_0, TQ2_0, F16, BF16, F32) */
} tern_layer_params;

typedef struct tern_model_params {
    int32_t n_vocab, n_embd, n_layer, n_head, n_head_kv, n_ff;
    float rope_theta, rms_eps;
    int32_t activation; /* TERN_ACT_* */
    int32_t lm_head;    /* TERN_LM_HEAD_* */
    const void *file_base; /* the whole mapped file: every matrix must lie inside it */
    uint64_t file_size;
    int32_t release_sources; /* 1: file_base is a read-only file mapping; after repacking, the
                              * pages of sources no longer needed, and of the header before the
                              * first tensor, leave the resident set (madvise DONTNEED: they are
                              * re-read from the file if touched) */
    tern_matrix token_embd; /* n_vocab x n_embd: F32, F16, BF16, Q8_0, Q4_0 or Q6_K */
    tern_matrix output;     /* separate LM head of the same shape, or data == NULL (tied) */
    const float *output_norm;         /* n_embd (copied at load) */
    const tern_layer_params *layers;  /* n_layer entries */
} tern_model_params;

typedef struct tern_model tern_model;
typedef struct tern_session tern_session;

/* Checks every size, shape, type and range; repacks ternary matrices into the kernels' layout
 * (I2_S is used in place, so the mapping must outlive the model); copies norms; builds the
 * int8 LM head if asked. Ternary sources other than I2_S are not read again after this returns;
 * the embedding is read by row lookups (and is the head itself with TERN_LM_HEAD_F16 when tied). */
TERN_API int32_t tern_model_create(const tern_model_params *params, tern_model **out);
TERN_API void tern_model_free(tern_model *model);
/* Bytes the model allocated (repacked weights, int8 head, norms). */
TERN_API uint64_t tern_model_alloc_bytes(const tern_model *model);

/* ---- Session: a KV cache of n_ctx positions, scratch, and a thread pool ---------------- */

/* Any prompt length up to n_ctx runs, in internal chunks of TERN_CHUNK tokens; all scratch is
 * allocated here (none in tern_forward). threads: workers including the caller (<= 0: 1). */
#define TERN_CHUNK 128
TERN_API int32_t tern_session_create(tern_model *model, int32_t n_ctx, int32_t kv_type,
                                     int32_t threads, tern_session **out);
TERN_API void tern_session_free(tern_session *session);
TERN_API int32_t tern_set_threads(tern_session *session, int32_t threads);
TERN_API int32_t tern_session_n_past(const tern_session *session);
/* Keep the first n cached positions (0 <= n <= n_past). */
TERN_API int32_t tern_session_truncate(tern_session *session, int32_t n);
/* Copy src's cached positions into dst (same model, dst n_ctx >= src n_past, same KV type). */
TERN_API int32_t tern_session_copy(tern_session *dst, const tern_session *src);

/* Appends tokens[0..n) at n_past. out_logits: n_vocab floats (the last token) or, with
 * all_logits, n x n_vocab. On error (including cancel) n_past is unchanged. */
TERN_API int32_t tern_forward(tern_session *session, const int32_t *tokens, int32_t n,
                              float *out_logits, int32_t all_logits);
/* Asks a running tern_forward on this session to stop (safe from any thread). The flag is
 * cleared when the next tern_forward starts. */
TERN_API void tern_cancel(tern_session *session);

/* Debug hook: called on the calling thread of tern_forward with named activations
 * ("attn_norm", "q", "k", "v" (after RoPE), "attn", "attn_sub_norm", "ffn_norm", "ffn_act",
 * "ffn_sub_norm", "out"; layer -1 for "output_norm"), n_tok x width floats. While a hook is
 * set, every phase ends with all threads meeting (slower; for tests). */
typedef void (*tern_trace_fn)(void *user, const char *name, int32_t layer, const float *data,
                              int32_t n_tok, int32_t width);
TERN_API void tern_session_set_trace(tern_session *session, tern_trace_fn fn, void *user);

/* ---- Kernel test entry: run one named variant on caller buffers (exact int32 results) ----
 * op: 0 = gemv_t2, 1 = gemm_t2, 2 = gemv_i8, 3 = gemm_i8. w: packed T2 rows (layout.h) or
 * int8 rows; w_size: its bytes; x: n tokens of k int8 each, token t at x + t*k; y: n x rows
 * int32, token t at y + t*rows; only rows [r0, r1) are written. */
TERN_API int32_t tern_kernel_test(const char *variant, int32_t op, const void *w, uint64_t w_size,
                                  int64_t rows, int64_t k, const int8_t *x, int64_t n,
                                  int32_t *y, int64_t r0, int64_t r1);

/* Fuzzing entry (src/fuzz_entry.c): decodes arbitrary bytes into tern_model_create parameters
 * over a copy of the bytes, loads, and runs a 3-token prompt and one decode step; returns the
 * first non-OK status. Used by the libFuzzer target and by the tests replaying its corpus. */
TERN_API int32_t tern_fuzz_model(const uint8_t *data, size_t size);

/* ---- Memory read-bandwidth probe (native/src/bwprobe.c, helper H4b) --------------------
 * Streams a buffer of `bytes` (>= 64 MiB; make it larger than the last-level cache) with
 * `threads` threads (the caller included), in 64 MiB bursts for `reps` passes; *gb_per_s is
 * the median burst's rate in 1e9 bytes/s. The buffer is freed before returning. */
TERN_API int32_t tern_bandwidth_probe(uint64_t bytes, int32_t threads, int32_t reps,
                                      double *gb_per_s);

/* Test entry of the batched prefill attention (native/src/attn_prefill.c, helper H4b): q is
 * n x heads x hd floats, k and v (first + n) x hd f16 rows of one KV group, out like q.
 * TERN_ERR_UNSUPPORTED when this CPU or shape takes the per-head path instead. */
TERN_API int32_t tern_attention_test(const float *q, const uint16_t *k, const uint16_t *v,
                                     int32_t first, int32_t n, int32_t heads, int32_t hd,
                                     uint64_t scratch_bytes, float *out);

#ifdef __cplusplus
}
#endif
#endif
