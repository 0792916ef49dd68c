/* The decode GEMV with its input normalization fused in (and, for q|k|v, RoPE and the KV-cache
 * store): one kernel per BitLinear instead of norm+quant, GEMV and RoPE kernels.
 *
 * Every block first loads its weight rows (they do not depend on earlier kernels: with
 * programmatic dependent launch these loads overlap the previous kernel), then normalizes and
 * quantizes the whole input row into shared memory -- each block computes the same values in
 * the same order -- and then runs the dp4a dot products of gemv.cu. For q|k|v each warp takes the
 * row pair (i, i + head_dim/2) of one head, so the epilogue can rotate it and store k and v. */
#include "common.cuh"

namespace {

constexpr int kWarps = 8, kThreads = kWarps * 32;

__device__ __forceinline__ float act(float g, bool relu2)
{
    if (relu2) {
        const float r = g > 0.0f ? g : 0.0f;
        return __fmul_rn(r, r);
    }
    return __fdiv_rn(g, __fadd_rn(1.0f, expf(-g)));
}

template <typename T>
__device__ __forceinline__ T block_sum(T v, T *red)
{
    for (int o = 16; o > 0; o >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, o);
    __syncthreads();
    if ((threadIdx.x & 31) == 0)
        red[threadIdx.x / 32] = v;
    __syncthreads();
    T r = 0;
#pragma unroll
    for (int i = 0; i < kWarps; i++)
        r += red[i];
    return r;
}

__device__ __forceinline__ float block_max(float v, float *red)
{
    for (int o = 16; o > 0; o >>= 1)
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    __syncthreads();
    if ((threadIdx.x & 31) == 0)
        red[threadIdx.x / 32] = v;
    __syncthreads();
    float r = 0.0f;
#pragma unroll
    for (int i = 0; i < kWarps; i++)
        r = fmaxf(r, red[i]);
    return r;
}

__device__ __forceinline__ void put(void *cache, bool f32, int64_t at, float v)
{
    if (f32)
        static_cast<float *>(cache)[at] = v;
    else
        static_cast<__half *>(cache)[at] = __float2half_rn(v);
}

/* RMSNorm + absmax int8 of the input row into qs; returns the scale, *sum = sum of qs. */
__device__ float norm_quant_block(const fused_gemv &a, float *buf, int8_t *qs, int *sum_out)
{
    __shared__ float redf[kWarps];
    __shared__ int redi[kWarps];
    const int n = a.width;
    float ss = 0.0f;
#pragma unroll 4
    for (int i = threadIdx.x; i < n; i += kThreads) {
        const float v = a.glu ? __fmul_rn(act(a.x[i], a.relu2), a.x[n + i]) : a.x[i];
        buf[i] = v;
        ss = __fadd_rn(ss, __fmul_rn(v, v));
    }
    ss = block_sum(ss, redf);
    const float r = sqrtf(__fadd_rn(__fdiv_rn(ss, (float)n), a.eps));
    float amax = 0.0f;
#pragma unroll 4
    for (int i = threadIdx.x; i < n; i += kThreads) {
        const float y = __fmul_rn(__fdiv_rn(buf[i], r), a.norm_w[i]);
        buf[i] = y;
        amax = fmaxf(amax, fabsf(y));
    }
    amax = block_max(amax, redf);
    const float s = __fdiv_rn(127.0f, amax > 1e-5f ? amax : 1e-5f);
    int sum = 0;
#pragma unroll 4
    for (int i = threadIdx.x; i < n; i += kThreads) {
        const float q = fminf(fmaxf(rintf(__fmul_rn(buf[i], s)), -128.0f), 127.0f);
        qs[i] = (int8_t)q;
        sum += (int)q;
    }
    *sum_out = block_sum(sum, redi); /* its barriers also publish qs */
    return s;
}

template <int NCH>
__global__ void __launch_bounds__(kThreads) gemv_t2_fused_kernel(const fused_gemv a)
{
    extern __shared__ __align__(16) unsigned char smem[];
    float *buf = reinterpret_cast<float *>(smem);
    int8_t *qs = reinterpret_cast<int8_t *>(buf + a.width);
    const int lane = threadIdx.x & 31;
    const int64_t pair = (int64_t)blockIdx.x * kWarps + threadIdx.x / 32;
    const int half = a.head_dim / 2;
    int64_t ra = 2 * pair, rb = 2 * pair + 1;
    if (a.rope) {
        ra = (pair / half) * a.head_dim + pair % half;
        rb = ra + half;
    }
    const bool va = ra < a.rows, vb = rb < a.rows;
    const int64_t rbytes = (int64_t)a.nchunks * 16;
    uint4 wv[2][NCH];
#pragma unroll
    for (int c = 0; c < NCH; c++) {
        const int ch = lane + c * 32;
        wv[0][c] = wv[1][c] = make_uint4(0x55555555u, 0x55555555u, 0x55555555u, 0x55555555u);
        if (va && ch < a.nchunks)
            wv[0][c] = __ldcs(reinterpret_cast<const uint4 *>(a.w + ra * rbytes + ch * 16));
        if (vb && ch < a.nchunks)
            wv[1][c] = __ldcs(reinterpret_cast<const uint4 *>(a.w + rb * rbytes + ch * 16));
    }
    grid_wait();
    int sum;
    const float s = norm_quant_block(a, buf, qs, &sum);
    if (!va)
        return;
    int32_t acc[2] = {0, 0};
#pragma unroll
    for (int c = 0; c < NCH; c++) {
        const int ch = lane + c * 32;
        if (ch >= a.nchunks)
            continue;
        int xr[16];
#pragma unroll
        for (int g = 0; g < 4; g++) {
            const int4 v = *reinterpret_cast<const int4 *>(qs + (ch >> 1) * 128 + g * 32 + (ch & 1) * 16);
            xr[g * 4 + 0] = v.x; xr[g * 4 + 1] = v.y; xr[g * 4 + 2] = v.z; xr[g * 4 + 3] = v.w;
        }
#pragma unroll
        for (int r = 0; r < 2; r++) {
            const uint32_t words[4] = {wv[r][c].x, wv[r][c].y, wv[r][c].z, wv[r][c].w};
#pragma unroll
            for (int i = 0; i < 4; i++)
#pragma unroll
                for (int g = 0; g < 4; g++)
                    acc[r] = __dp4a((int)((words[i] >> (6 - 2 * g)) & 0x03030303u), xr[g * 4 + i], acc[r]);
        }
    }
#pragma unroll
    for (int r = 0; r < 2; r++)
        for (int o = 16; o > 0; o >>= 1)
            acc[r] += __shfl_xor_sync(0xffffffffu, acc[r], o);
    if (lane != 0)
        return;
    float ya = __fmul_rn(__fdiv_rn((float)(acc[0] - sum), s), a.scale[ra]);
    float yb = vb ? __fmul_rn(__fdiv_rn((float)(acc[1] - sum), s), a.scale[rb]) : 0.0f;
    if (!a.rope) {
        a.out[ra] = a.epi == EPI_ADD ? __fadd_rn(a.out[ra], ya) : ya;
        if (vb)
            a.out[rb] = a.epi == EPI_ADD ? __fadd_rn(a.out[rb], yb) : yb;
        return;
    }
    const int64_t head = ra / a.head_dim, j = pair % half, pos = *a.pos;
    const int64_t e = (int64_t)a.n_head * a.head_dim, kv_dim = (int64_t)a.n_head_kv * a.head_dim;
    if (head < a.n_head + a.n_head_kv) { /* q or k: NeoX rotate-half */
        const float c = a.rope_cos[pos * half + j], sn = a.rope_sin[pos * half + j];
        const float y1 = __fsub_rn(__fmul_rn(ya, c), __fmul_rn(yb, sn));
        const float y2 = __fadd_rn(__fmul_rn(yb, c), __fmul_rn(ya, sn));
        ya = y1;
        yb = y2;
    }
    a.out[ra] = ya;
    a.out[rb] = yb;
    if (head >= a.n_head) {
        const bool is_k = head < a.n_head + a.n_head_kv;
        const int64_t off = ra - e - (is_k ? 0 : kv_dim);
        void *cache = is_k ? a.k_cache : a.v_cache;
        put(cache, a.kv_f32, pos * kv_dim + off, ya);
        put(cache, a.kv_f32, pos * kv_dim + off + half, yb);
    }
}

} // namespace

int32_t launch_gemv_t2_fused(const fused_gemv &a, cudaStream_t st)
{
    if (a.width % 128 != 0 || a.width > 8192 || (a.rope && a.rows % a.head_dim != 0))
        return tern_fail(TERN_ERR_UNSUPPORTED, "cuda fused gemv: width %d / rows %lld not supported", a.width,
                         (long long)a.rows);
    const int per = (a.nchunks + 31) / 32;
    const unsigned blocks = (unsigned)((a.rows / 2 + (a.rows & 1) + kWarps - 1) / kWarps);
    const size_t smem = (size_t)a.width * 5;
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = blocks;
    cfg.blockDim = kThreads;
    cfg.dynamicSmemBytes = smem;
    cfg.stream = st;
    cudaLaunchAttribute attr;
    attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr.val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = &attr;
    cfg.numAttrs = st != 0 && pdl_enabled() ? 1 : 0;
    cudaError_t err;
    switch (per) {
    case 1: err = cudaLaunchKernelEx(&cfg, gemv_t2_fused_kernel<1>, a); break;
    case 2: err = cudaLaunchKernelEx(&cfg, gemv_t2_fused_kernel<2>, a); break;
    case 3: err = cudaLaunchKernelEx(&cfg, gemv_t2_fused_kernel<3>, a); break;
    case 4: err = cudaLaunchKernelEx(&cfg, gemv_t2_fused_kernel<4>, a); break;
    default: return tern_fail(TERN_ERR_UNSUPPORTED, "cuda fused gemv: %d chunks per lane", per);
    }
    if (err != cudaSuccess)
        return tern_fail(TERN_ERR_UNSUPPORTED, "cuda: launching fused gemv: %s", cudaGetErrorString(err));
    return TERN_OK;
}
