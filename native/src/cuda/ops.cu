/* The float parts of the decoder step on the GPU, in the CPU decoder's operation order where
 * it is element-wise (native/src/ops.c): RMSNorm + absmax int8 quantization (rounding half to
 * even, like nearbyintf), the relu2/SiLU GLU, NeoX RoPE with the KV-cache store (f16, round to
 * nearest even), and attention. Sums are tree reductions here, so norms and softmax differ
 * from the CPU's pairwise sums in the last bits. */
#include "attend.cuh"
#include "common.cuh"

namespace {

constexpr int kNormThreads = 1024;
constexpr int kNormPerThread = 8; /* widths up to 8192 */

template <typename T, typename Op>
__device__ T block_reduce(T v, Op op, T *smem, T identity)
{
    const int lane = threadIdx.x & 31, warp = threadIdx.x / 32, nw = blockDim.x / 32;
    for (int o = 16; o > 0; o >>= 1)
        v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
    __syncthreads(); /* smem may still be read by the previous reduction */
    if (lane == 0)
        smem[warp] = v;
    __syncthreads();
    v = lane < nw ? smem[lane] : identity;
    for (int o = 16; o > 0; o >>= 1)
        v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

struct add_f { __device__ float operator()(float a, float b) const { return a + b; } };
struct max_f { __device__ float operator()(float a, float b) const { return fmaxf(a, b); } };
struct add_i { __device__ int operator()(int a, int b) const { return a + b; } };

/* One block per token row; every value the thread needs is loaded in one burst into registers
 * (the row is read once; the three passes run from registers). */
template <bool GLU>
__global__ void __launch_bounds__(kNormThreads)
norm_quant_kernel(const float *__restrict__ x, int64_t ldx, const float *__restrict__ w, int width,
                  float eps, bool relu2, int8_t *__restrict__ xq, act_meta *__restrict__ meta,
                  float *__restrict__ xf)
{
    __shared__ float sf[32];
    __shared__ int si[32];
    const int t = blockIdx.x;
    const float *row = x + (int64_t)t * ldx;
    float v[kNormPerThread], wv[kNormPerThread], up[kNormPerThread];
#pragma unroll
    for (int j = 0; j < kNormPerThread; j++) /* the norm weights are constant: before the wait */
        wv[j] = threadIdx.x + j * kNormThreads < width ? w[threadIdx.x + j * kNormThreads] : 0.0f;
    if (gridDim.x == 1) /* one token: the next GEMV's weight loads overlap this kernel */
        grid_launch_dependents();
    grid_wait();
#pragma unroll
    for (int j = 0; j < kNormPerThread; j++) {
        const int i = threadIdx.x + j * kNormThreads;
        const bool in = i < width;
        v[j] = in ? __ldcg(row + i) : 0.0f;
        up[j] = GLU && in ? __ldcg(row + width + i) : 0.0f;
    }
    float ss = 0.0f;
#pragma unroll
    for (int j = 0; j < kNormPerThread; j++) {
        if (GLU)
            v[j] = __fmul_rn(act(v[j], relu2), up[j]);
        ss = __fadd_rn(ss, __fmul_rn(v[j], v[j]));
    }
    ss = block_reduce(ss, add_f(), sf, 0.0f);
    const float r = sqrtf(__fadd_rn(__fdiv_rn(ss, (float)width), eps));
    float amax = 0.0f;
#pragma unroll
    for (int j = 0; j < kNormPerThread; j++) {
        v[j] = __fmul_rn(__fdiv_rn(v[j], r), wv[j]);
        amax = fmaxf(amax, fabsf(v[j]));
    }
    amax = block_reduce(amax, max_f(), sf, 0.0f);
    const float s = __fdiv_rn(127.0f, amax > 1e-5f ? amax : 1e-5f);
    int sum = 0;
#pragma unroll
    for (int j = 0; j < kNormPerThread; j++) {
        const int i = threadIdx.x + j * kNormThreads;
        if (i < width) {
            const int q = round_sat_s8(__fmul_rn(v[j], s));
            xq[(int64_t)t * width + i] = (int8_t)q;
            sum += q;
            if (xf)
                xf[(int64_t)t * width + i] = v[j];
        }
    }
    sum = block_reduce(sum, add_i(), si, 0);
    if (threadIdx.x == 0) {
        meta[t].s = s;
        meta[t].sum = sum;
    }
}

/* grid (n, n_head + 2 n_head_kv), block head_dim/2: q and k heads rotated, k and v stored. */
__device__ __forceinline__ void put(__half *p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void put(float *p, float v) { *p = v; }

template <typename KV>
__global__ void rope_store_kernel(float *qkv, int n_head, int n_head_kv, int hd,
                                  const float *__restrict__ rope_cos, const float *__restrict__ rope_sin,
                                  const int32_t *__restrict__ pos0, KV *k_cache, KV *v_cache)
{
    const int t = blockIdx.x, h = blockIdx.y, i = threadIdx.x, half = hd / 2;
    const int64_t kv_dim = (int64_t)n_head_kv * hd, e = (int64_t)n_head * hd;
    grid_wait();
    const int64_t pos = __ldcg(pos0) + t;
    float *row = qkv + (int64_t)t * (e + 2 * kv_dim);
    if (h >= n_head + n_head_kv) {
        const int vh = h - n_head - n_head_kv;
        const float *src = row + e + kv_dim + (int64_t)vh * hd;
        KV *dst = v_cache + pos * kv_dim + (int64_t)vh * hd;
        put(dst + i, __ldcg(src + i));
        put(dst + i + half, __ldcg(src + i + half));
        return;
    }
    const bool is_k = h >= n_head;
    float *xh = is_k ? row + e + (int64_t)(h - n_head) * hd : row + (int64_t)h * hd;
    const float c = rope_cos[pos * half + i], s = rope_sin[pos * half + i];
    const float x1 = __ldcg(xh + i), x2 = __ldcg(xh + i + half);
    const float y1 = __fsub_rn(__fmul_rn(x1, c), __fmul_rn(x2, s));
    const float y2 = __fadd_rn(__fmul_rn(x2, c), __fmul_rn(x1, s));
    xh[i] = y1;
    xh[i + half] = y2;
    if (is_k) {
        KV *dst = k_cache + pos * kv_dim + (int64_t)(h - n_head) * hd;
        put(dst + i, y1);
        put(dst + i + half, y2);
    }
}

constexpr int kMaxGroup = kAttnMaxGroup;
constexpr int kBatch = 8;     /* positions per warp step: their loads are in flight together */

/* grid (n_head_kv, n, n_split), one warp per q head of the KV group (they read the same K/V
 * rows, so the group shares them through L1): split sp of the positions of query t, an online
 * softmax kBatch positions at a time (lane owns D = head_dim/32 dims). Each warp writes (max, sum,
 * out[head_dim]) unnormalized to partial; the last block of (t, group) to finish (an atomic
 * counter, reset by it) merges the splits into out. */
template <int D, typename KV>
__global__ void __launch_bounds__(kMaxGroup * 32)
attention_kernel(const float *__restrict__ qkv, int n_head, int n_head_kv,
                 const KV *__restrict__ k_cache, const KV *__restrict__ v_cache,
                 const int32_t *__restrict__ pos0, float scale, float *__restrict__ partial,
                 int *__restrict__ counters, float *__restrict__ out)
{
    constexpr int HD = D * 32;
    const int grp = blockIdx.x, t = blockIdx.y, sp = blockIdx.z, nsplit = gridDim.z;
    const int warp = threadIdx.x / 32, lane = threadIdx.x & 31, gs = n_head / n_head_kv;
    const int h = grp * gs + warp;
    const int64_t kv_dim = (int64_t)n_head_kv * HD, e = (int64_t)n_head * HD;
    grid_wait();
    const int npos = __ldcg(pos0) + t + 1;
    const int chunk = (npos + nsplit - 1) / nsplit, p0 = sp * chunk;
    const int p1 = min(npos, p0 + chunk);
    float q[D], o[D];
    const float *qrow = qkv + (int64_t)t * (e + 2 * kv_dim) + (int64_t)h * HD + lane * D;
#pragma unroll
    for (int i = 0; i < D; i++) {
        q[i] = __ldcg(qrow + i);
        o[i] = 0.0f;
    }
    float m = -INFINITY, l = 0.0f;
    const KV *kb = k_cache + (int64_t)grp * HD + lane * D;
    const KV *vb = v_cache + (int64_t)grp * HD + lane * D;
    warp_attend<D, kBatch, false>(q, kb, vb, kv_dim, p0, p1, scale, o, m, l);
    float *dst = partial + (((int64_t)t * n_head + h) * nsplit + sp) * (HD + 2);
#pragma unroll
    for (int i = 0; i < D; i++)
        dst[2 + lane * D + i] = o[i];
    if (lane == 0) {
        dst[0] = m; /* -inf (and sum 0) for an empty split */
        dst[1] = l;
    }
    /* the last block of this (token, group) merges every split of its heads */
    __shared__ int last;
    __syncthreads();
    if (threadIdx.x == 0)
        last = arrive_acq_rel(counters + t * n_head_kv + grp) == nsplit - 1;
    __syncthreads();
    if (!last)
        return;
    __shared__ float wts[kMaxGroup][64];
    const float *src = partial + ((int64_t)t * n_head + h) * nsplit * (HD + 2);
    float M = -INFINITY;
    for (int s2 = lane; s2 < nsplit; s2 += 32)
        M = fmaxf(M, __ldcg(src + s2 * (HD + 2)));
    for (int off = 16; off > 0; off >>= 1)
        M = fmaxf(M, __shfl_xor_sync(0xffffffffu, M, off));
    float L = 0.0f;
    for (int s2 = lane; s2 < nsplit; s2 += 32) {
        const float ms = __ldcg(src + s2 * (HD + 2));
        const float f = ms == -INFINITY ? 0.0f : expf(ms - M);
        wts[warp][s2] = f;
        L += __ldcg(src + s2 * (HD + 2) + 1) * f;
    }
    for (int off = 16; off > 0; off >>= 1)
        L += __shfl_xor_sync(0xffffffffu, L, off);
    __syncwarp();
    float acc[D];
#pragma unroll
    for (int i = 0; i < D; i++)
        acc[i] = 0.0f;
#pragma unroll 8
    for (int s2 = 0; s2 < nsplit; s2++) { /* independent loads: many in flight */
        const float f = wts[warp][s2];
#pragma unroll
        for (int i = 0; i < D; i++)
            acc[i] += __ldcg(src + s2 * (HD + 2) + 2 + lane * D + i) * f;
    }
#pragma unroll
    for (int i = 0; i < D; i++)
        out[(int64_t)t * e + (int64_t)h * HD + lane * D + i] = acc[i] / L;
    if (threadIdx.x == 0)
        counters[t * n_head_kv + grp] = 0; /* ready for the next launch */
}

/* One block: the first producer of a fused-norm decode step (the embedding row has no kernel
 * that writes it). */
__global__ void __launch_bounds__(kNormThreads)
norm_stats_kernel(const float *__restrict__ x, const float *__restrict__ w, int width, float *__restrict__ xw,
                  float2 *__restrict__ stats)
{
    __shared__ float sf[32];
    grid_launch_dependents(); /* one block: the q|k|v GEMV loads its weights meanwhile */
    grid_wait();
    float ss = 0.0f, mx = 0.0f;
    for (int i = threadIdx.x; i < width; i += kNormThreads) {
        const float v = __ldcg(x + i), vw = __fmul_rn(v, w[i]);
        xw[i] = vw;
        ss = __fadd_rn(ss, __fmul_rn(v, v));
        mx = fmaxf(mx, fabsf(vw));
    }
    ss = block_reduce(ss, add_f(), sf, 0.0f);
    mx = block_reduce(mx, max_f(), sf, 0.0f);
    if (threadIdx.x == 0)
        stats[0] = make_float2(ss, mx);
}

} // namespace

int32_t launch_norm_quant(const float *x, int64_t ldx, const float *w, int64_t width, float eps,
                          int32_t n, bool glu, bool relu2, int8_t *xq, act_meta *meta, float *xf,
                          cudaStream_t st)
{
    if (width < 1 || width > (int64_t)kNormThreads * kNormPerThread)
        return tern_fail(TERN_ERR_UNSUPPORTED, "cuda norm: width %lld is outside 1..%d", (long long)width,
                         kNormThreads * kNormPerThread);
    if (glu)
        LAUNCH("norm_quant", norm_quant_kernel<true>, n, kNormThreads, st, x, ldx, w, (int)width, eps, relu2, xq, meta, xf);
    else
        LAUNCH("norm_quant", norm_quant_kernel<false>, n, kNormThreads, st, x, ldx, w, (int)width, eps, relu2, xq, meta, xf);
    return cuda_launch_status("norm_quant");
}

int32_t launch_norm_stats(const float *x, const float *w, int64_t width, float *xw, float2 *stats,
                          cudaStream_t st)
{
    if (width < 1 || width > kFusedNormMaxWidth)
        return tern_fail(TERN_ERR_UNSUPPORTED, "cuda norm stats: width %lld", (long long)width);
    LAUNCH("norm_stats", norm_stats_kernel, 1, kNormThreads, st, x, w, (int)width, xw, stats);
    return cuda_launch_status("norm_stats");
}

int32_t launch_rope_store(float *qkv, int32_t n, int32_t n_head, int32_t n_head_kv,
                          int32_t head_dim, const float *rope_cos, const float *rope_sin,
                          const int32_t *pos, void *k_cache, void *v_cache, bool kv_f32, cudaStream_t st)
{
    const dim3 grid((unsigned)n, (unsigned)(n_head + 2 * n_head_kv));
    if (kv_f32)
        LAUNCH("rope_store", rope_store_kernel<float>, grid, head_dim / 2, st, qkv, n_head, n_head_kv, head_dim, rope_cos,
               rope_sin, pos, (float *)k_cache, (float *)v_cache);
    else
        LAUNCH("rope_store", rope_store_kernel<__half>, grid, head_dim / 2, st, qkv, n_head, n_head_kv, head_dim, rope_cos,
               rope_sin, pos, (__half *)k_cache, (__half *)v_cache);
    return cuda_launch_status("rope_store");
}

template <int D>
static cudaError_t attention_any(bool kv_f32, dim3 grid, cudaStream_t st, const float *qkv, int n_head, int n_head_kv,
                                 const void *k_cache, const void *v_cache, const int32_t *pos, float scale, float *partial,
                                 int *counters, float *out)
{
    if (kv_f32)
        return launch_k(attention_kernel<D, float>, grid, 32 * (n_head / n_head_kv), st, qkv, n_head, n_head_kv,
                        (const float *)k_cache, (const float *)v_cache, pos, scale, partial, counters, out);
    return launch_k(attention_kernel<D, __half>, grid, 32 * (n_head / n_head_kv), st, qkv, n_head, n_head_kv,
                    (const __half *)k_cache, (const __half *)v_cache, pos, scale, partial, counters, out);
}

int32_t launch_attention(const float *qkv, int32_t n, int32_t n_head, int32_t n_head_kv,
                         int32_t head_dim, const void *k_cache, const void *v_cache, bool kv_f32,
                         const int32_t *pos, int32_t n_split, float *partial, int *counters, float *out,
                         cudaStream_t st)
{
    if (n_split < 1 || n_split > 64 || n_head_kv < 1 || n_head % n_head_kv != 0 || n_head / n_head_kv > kMaxGroup)
        return tern_fail(TERN_ERR_UNSUPPORTED, "cuda attention: %d heads over %d KV heads (%d splits)", n_head,
                         n_head_kv, n_split);
    const dim3 grid((unsigned)n_head_kv, (unsigned)n, (unsigned)n_split);
    const float scale = (float)(1.0 / sqrt((double)head_dim));
    cudaError_t err;
    switch (head_dim) {
    case 32: err = attention_any<1>(kv_f32, grid, st, qkv, n_head, n_head_kv, k_cache, v_cache, pos, scale, partial, counters, out); break;
    case 64: err = attention_any<2>(kv_f32, grid, st, qkv, n_head, n_head_kv, k_cache, v_cache, pos, scale, partial, counters, out); break;
    case 128: err = attention_any<4>(kv_f32, grid, st, qkv, n_head, n_head_kv, k_cache, v_cache, pos, scale, partial, counters, out); break;
    case 256: err = attention_any<8>(kv_f32, grid, st, qkv, n_head, n_head_kv, k_cache, v_cache, pos, scale, partial, counters, out); break;
    default:
        return tern_fail(TERN_ERR_UNSUPPORTED, "cuda attention: head_dim %d is not 32, 64, 128 or 256", head_dim);
    }
    if (err != cudaSuccess)
        return tern_fail(TERN_ERR_UNSUPPORTED, "cuda: launching attention: %s", cudaGetErrorString(err));
    return TERN_OK;
}
