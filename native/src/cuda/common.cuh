/* Shared definitions of the CUDA backend: device structs, launch helpers and the kernels'
 * host-side entry points (each .cu file defines the launchers of its kernels). */
#ifndef TERN_CUDA_COMMON_CUH
#define TERN_CUDA_COMMON_CUH

#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

extern "C" {
#include "../error.h"
}
#include "tern_cuda.h"

/* Per-token activation quantization: x ~= q / s, and sum(q) (the T2 kernels multiply the
 * unsigned codes w + 1 and subtract it). */
struct act_meta {
    float s;
    int32_t sum;
};

/* Epilogues of the matrix kernels: v = float(acc) / s * scale[row] (BitLinear, the order of
 * the CPU decoder), stored, added into the output, or the raw int32 dot (kernel tests). */
enum epilogue { EPI_STORE = 0, EPI_ADD = 1, EPI_RAW = 2 };

/* One weight matrix on the GPU. T2: packed codes, rows x cols/4 bytes; I8: rows x cols. */
struct dmat {
    const uint8_t *w;
    int64_t rows, cols;
    const float *scale; /* per row */
};

/* Returns the status of a call that failed (its message is already set). */
#define TRY(expr)                   \
    do {                            \
        const int32_t st_ = (expr); \
        if (st_ != TERN_OK)         \
            return st_;             \
    } while (0)

#define CUDA_TRY(call)                                                                      \
    do {                                                                                    \
        cudaError_t err_ = (call);                                                          \
        if (err_ != cudaSuccess)                                                            \
            return tern_fail(TERN_ERR_UNSUPPORTED, "cuda: %s: %s (%s:%d)", #call,           \
                             cudaGetErrorString(err_), __FILE__, __LINE__);                 \
    } while (0)

/* Programmatic dependent launch (Hopper): with TERN_CUDA_PDL unset or not 0, a kernel on a
 * session's stream may start while its predecessor finishes, and does only read-only work
 * (weight loads) before grid_wait(), which returns once the predecessor's writes are visible.
 * What a predecessor wrote is then read with __ldcg (L2), never through the read-only cache
 * (ld.global.nc, which const __restrict__ pointers compile to): PTX allows .nc only for data that
 * stays read-only for the kernel's whole lifetime, and a kernel launched early lives while its
 * predecessor writes. The int8 LM head, reading its input that way in the decode graph, computed
 * with stale values (relative error ~1 against prefill, H100; sixth session, docs/CUDA.md). */
__device__ __forceinline__ void grid_wait()
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

/* Lets the next kernel on the stream (launched with programmatic serialization) start now
 * rather than when this grid's blocks exit: its blocks become resident and issue their weight
 * loads while this kernel runs. Safe because every kernel does only read-only work on constant
 * data before grid_wait(), and grid_wait() returns only once the whole predecessor grid (which
 * itself waited on its own predecessor) has completed. Called in decode (one token) by the norm
 * and attention kernels, small grids followed by a GEMV or a norm (H100, interleaved runs on one
 * machine: 615 tokens/s against 603 without), and by every fused-norm decode GEMV once its weight
 * loads are issued: the q|k|v GEMV's successor, the decode attention, fetches the cached K/V rows
 * before its wait, and each GEMV's successor GEMV issues its weight loads (GPU step on an H100:
 * 1,070 us with every GEMV releasing, 1,121 with only q|k|v, 1,171 with none; third session,
 * docs/CUDA.md). Earlier, with the norm kernels between the GEMVs and the prefill-style decode
 * attention, releasing from the GEMVs measured slower (568 against 595 tokens/s). Prefill keeps
 * the implicit trigger at block exit (docs/CUDA.md). */
__device__ __forceinline__ void grid_launch_dependents()
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

/* Activation quantization's rounding: half to even, clamped to [-128, 127], as one conversion
 * instead of rint, two clamps and a conversion (the same value for every finite input; the
 * decode GEMVs quantize their whole input in every block, so this counts: H100 GPU step 1,051 ->
 * 1,008 us). */
__device__ __forceinline__ int round_sat_s8(float x)
{
    int q;
    asm("cvt.rni.sat.s8.f32 %0, %1;" : "=r"(q) : "f"(x));
    return q;
}

/* One block's arrival at a counter, by one thread after a block barrier: the acq_rel atomic
 * publishes every write the block made before the barrier (release is cumulative over the
 * barrier), and the block that arrives last sees every earlier block's writes after the next
 * barrier, without a fence by every thread. Returns the count before this arrival. */
__device__ __forceinline__ int arrive_acq_rel(int *counter)
{
    int old;
    asm volatile("atom.acq_rel.gpu.global.add.s32 %0, [%1], 1;" : "=r"(old) : "l"(counter) : "memory");
    return old;
}

/* The GLU's gate activation, rounded step by step as the CPU's tern_relu2 / tern_silu. */
__device__ __forceinline__ float act(float g, bool relu2)
{
    if (relu2) {
        const float r = g > 0.0f ? g : 0.0f;
        return __fmul_rn(r, r);
    }
    return __fdiv_rn(g, __fadd_rn(1.0f, expf(-g)));
}

/* Whether the kernels run code compiled for sm_90 or later, where the Hopper instructions
 * (griddepcontrol, TMA bulk copies) exist. A GPU newer than the library's SASS (sm_100,
 * sm_120, ...) runs the driver's compilation of the sm_80 PTX, which has none of them: launched
 * as a dependent launch there, a kernel would not wait for its predecessor (grid_wait() is
 * empty). */
bool sm90_code(void);
bool pdl_enabled(void);

/* A launch on st with programmatic dependent launch (where enabled) and `smem` bytes of dynamic
 * shared memory. */
template <typename... KArgs, typename... Args>
cudaError_t launch_k_smem(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t st,
                          Args... args)
{
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid;
    cfg.blockDim = block;
    cfg.dynamicSmemBytes = smem;
    cfg.stream = st;
    cudaLaunchAttribute attr;
    attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr.val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = &attr;
    cfg.numAttrs = st != 0 && pdl_enabled() ? 1 : 0;
    return cudaLaunchKernelEx(&cfg, kernel, static_cast<KArgs>(args)...);
}

template <typename... KArgs, typename... Args>
cudaError_t launch_k(void (*kernel)(KArgs...), dim3 grid, dim3 block, cudaStream_t st, Args... args)
{
    return launch_k_smem(kernel, grid, block, 0, st, args...);
}

#define LAUNCH(what, ...)                                                                   \
    do {                                                                                    \
        const cudaError_t e_ = launch_k(__VA_ARGS__);                                       \
        if (e_ != cudaSuccess)                                                              \
            return tern_fail(TERN_ERR_UNSUPPORTED, "cuda: launching %s: %s", what,          \
                             cudaGetErrorString(e_));                                       \
    } while (0)

/* Status of the last launch (a bad configuration shows here, a fault at the next sync). */
int32_t cuda_launch_status(const char *what);

/* One token. T2 (w packed; gemv_fused.cu) or I8 rows (gemv.cu); out float (rows) or int32 (EPI_RAW). */
int32_t launch_gemv_t2(const dmat &m, const int8_t *xq, const act_meta *meta, void *out, int epi,
                       cudaStream_t st);
int32_t launch_gemv_i8(const dmat &m, const int8_t *xq, const act_meta *meta, void *out, int epi,
                       cudaStream_t st);
/* f16 (half rows) or f32 rows times n float tokens xf (n x cols): out n x rows floats. */
int32_t launch_gemv_float(const void *w, bool half_rows, int64_t rows, int64_t cols, const float *xf,
                          int32_t n, float *out, cudaStream_t st);

/* gemv_fused.cu: the decode BitLinear of a quantized input with its epilogue fusions. */
struct fused_gemv {
    const uint8_t *w;        /* T2 rows */
    int64_t rows;
    int32_t nchunks;         /* width / 64 */
    const float *scale;      /* per row */
    float *out;              /* rows floats (glu: rows / 2) */
    int epi;                 /* EPI_STORE or EPI_ADD */
    const int8_t *xq;        /* the quantized input (norm_quant_kernel), width values */
    const act_meta *meta;
    int width;
    int glu, relu2;          /* gate|up rows: out[i] = act(gate_i) * up_i */
    int rope;                /* q|k|v rows: RoPE at *pos, k and v stored in the caches */
    const float *rope_cos, *rope_sin;
    const int32_t *pos;
    int head_dim, n_head, n_head_kv, kv_f32;
    void *k_cache, *v_cache;
    /* Decode with the norm statistics carried by the producers (TERN_CUDA_FUSED_NORM, on by
     * default). in_xw (set): the input is not xq/meta but in_xw[i] = v_i * w_i (v the vector to
     * normalize, w its RMSNorm weights) and in_nparts partial statistics (sum v^2, max |v w|)
     * written by the producer's blocks; every block quantizes in_xw itself, without a
     * block-wide reduction (the scale follows from the partials). */
    const float *in_xw;
    const float2 *in_stats;
    int in_nparts;
    float eps;
    /* out_stats (set; EPI_ADD or glu): this kernel produces the next norm's input, so it also
     * writes out_xw = value * out_nw and one partial (sum value^2, max |value * out_nw|) per
     * block at out_stats[blockIdx.x]. */
    float *out_xw;
    float2 *out_stats;
    const float *out_nw;
    /* early: release the next kernel once this block's weight loads are issued (the fused-norm
     * decode GEMVs and the separate-norm decode's q|k|v; grid_launch_dependents) */
    int early;
};
int32_t launch_gemv_t2_fused(const fused_gemv &a, cudaStream_t st);
/* Blocks of the fused GEMV's grid (the number of partials it writes as a producer). */
int64_t gemv_t2_fused_blocks(const fused_gemv &a);
/* The widest input the in-block quantization takes (shared memory of the fused GEMV). */
constexpr int kFusedNormMaxWidth = 8192;

/* gemm.cu: n tokens (int8, row stride cols) with tensor cores; out[t * ldo + r]. */
int32_t launch_gemm(const dmat &m, bool t2, const int8_t *xq, const act_meta *meta, int32_t n,
                    void *out, int64_t ldo, int epi, cudaStream_t st);

/* ops.cu */
/* RMSNorm(x rows, w) then absmax int8 quantization of n rows of `width` (x row stride ldx);
 * glu: x holds gate|up rows (2*width) and the normalized input is act(gate) * up.
 * xf (optional): the normalized floats (f16/f32 LM head). */
int32_t launch_norm_quant(const float *x, int64_t ldx, const float *w, int64_t width, float eps,
                          int32_t n, bool glu, bool relu2, int8_t *xq, act_meta *meta, float *xf,
                          cudaStream_t st);
/* RoPE of q and k in qkv (n rows of qkv_dim) at positions *pos + t, k and v stored (f16) in
 * the layer's caches (row stride kv_dim; f16, or f32 for the parity tests). */
int32_t launch_rope_store(float *qkv, int32_t n, int32_t n_head, int32_t n_head_kv,
                          int32_t head_dim, const float *rope_cos, const float *rope_sin,
                          const int32_t *pos, void *k_cache, void *v_cache, bool kv_f32, cudaStream_t st);
constexpr int kAttnMaxGroup = 16; /* q heads per KV head the attention kernels take */
constexpr int kAttnStatParts = 8; /* fused-norm statistics partials per KV group (decode attention) */

/* Causal attention of n query rows (in qkv) over the cache positions [0, *pos + t] (prefill;
 * decode has its own kernel, below). */
int32_t launch_attention(const float *qkv, int32_t n, int32_t n_head, int32_t n_head_kv,
                         int32_t head_dim, const void *k_cache, const void *v_cache, bool kv_f32,
                         const int32_t *pos, int32_t n_split, float *partial, int *counters, float *out,
                         cudaStream_t st);
/* attention_decode.cu: one token's attention over positions [0, *pos] (tiles of the cache in
 * shared memory, the splits merged by the last block of each KV group). With stats (fused-norm
 * decode) the merging blocks also write xw = att * nw and one partial (sum att^2, max |att nw|)
 * per warp of each KV group (kAttnStatParts). Splits (grid) from the context, at most 32: partial
 * holds n_head_kv x 32 x (2 gs + 3 + gs x head_dim) floats at most. */
int32_t launch_attention_decode(const float *qkv, int32_t n_head, int32_t n_head_kv, int32_t head_dim,
                                const void *k_cache, const void *v_cache, bool kv_f32, const int32_t *pos,
                                int32_t n_ctx, float *partial, int *counters, float *out, cudaStream_t st,
                                const float *nw = NULL, float *xw = NULL, float2 *stats = NULL);
/* The same kernel over n tokens (prefill, causal; qkv and out rows as the prefill writes them;
 * the f16 cache: the tensor-core tile): a block takes kAttnMaxGroup / gs consecutive tokens of a
 * KV group, so the tiles of the cache it reads serve all of them; first_pos: the host's copy of
 * *pos, for the grid. Fails where the partials (partial_floats) or counters (n_counters) cannot
 * hold the grid. */
int32_t launch_attention_tiled(const float *qkv, int32_t n, int32_t n_head, int32_t n_head_kv, int32_t head_dim,
                               const void *k_cache, const void *v_cache, const int32_t *pos, int32_t first_pos,
                               float *partial, int64_t partial_floats, int *counters, int64_t n_counters, float *out,
                               cudaStream_t st);
/* The first producer of a fused-norm decode step (one token): xw = x * w and one partial
 * (sum x^2, max |x w|) at stats[0], for the first layer's attn_norm. */
int32_t launch_norm_stats(const float *x, const float *w, int64_t width, float *xw, float2 *stats,
                          cudaStream_t st);
/* top.cu: the best TERN_CUDA_TOP_K of n_vocab logits into out (host-mapped memory may be
 * written directly); kept: TOP_LOGITS_SCRATCH_KEYS keys of device scratch, ticket: a zeroed int.
 * Vocabularies up to 1024 x TOP_LOGITS_SCRATCH_KEYS tokens. */
#define TOP_LOGITS_SCRATCH_KEYS 1024
int32_t launch_top_logits(const float *logits, int64_t n_vocab, uint64_t *kept, int *ticket, tern_cuda_top *out,
                          cudaStream_t st);

#endif
