/* Decode GEMVs (one token) of the LM head: int8 rows times int8 activations with dp4a, and
 * f16/f32 rows times float activations (the exact path). The ternary GEMV is in gemv_fused.cu.
 *
 * Each warp owns R consecutive rows; lane l reads the 16-byte chunks l, l+32, ... of every row,
 * so the activation values a lane needs are the same for all its rows: they are loaded into
 * registers once, and the weights stream from HBM with all of a lane's loads issued before
 * the first use. NCH (chunks per lane) is a template parameter so the arrays stay in registers. */
#include <stdlib.h>

#include "common.cuh"

namespace {

constexpr int kWarps = 4; /* warps per block */

/* Rows per warp of the int8 GEMV: 4 up to 5 chunks per lane (2B4T's LM head, 2,560 wide: 20
 * chunks of 16 bytes in flight per lane; H100: 106.5 us, 99% of the measured bandwidth,
 * against 115.7 us with 2 rows), 2 for wider rows (registers). */
__host__ __device__ constexpr int rows_per_warp(int nch) { return nch <= 5 ? 4 : 2; }

__device__ __forceinline__ int32_t warp_sum(int32_t v)
{
    for (int o = 16; o > 0; o >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_sumf(float v)
{
    for (int o = 16; o > 0; o >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ uint4 load_stream(const uint8_t *p)
{
    return __ldcs(reinterpret_cast<const uint4 *>(p));
}

__device__ __forceinline__ void finish(int32_t acc, int64_t row, float act_scale, const float *scale, void *out,
                                       int epi)
{
    if (epi == EPI_RAW) {
        static_cast<int32_t *>(out)[row] = acc;
        return;
    }
    const float v = __fmul_rn(__fdiv_rn((float)acc, act_scale), scale[row]);
    float *o = static_cast<float *>(out) + row;
    *o = epi == EPI_ADD ? __fadd_rn(*o, v) : v;
}

/* I8: chunk c of a row is columns 16c .. 16c+15. */
template <int NCH>
__global__ void __launch_bounds__(kWarps * 32)
gemv_i8_kernel(const uint8_t *__restrict__ w, int64_t rows, int32_t nchunks,
               const int8_t *__restrict__ xq, const act_meta *__restrict__ meta,
               const float *__restrict__ scale, void *out, int epi)
{
    constexpr int kRows = rows_per_warp(NCH);
    const int lane = threadIdx.x & 31;
    const int64_t r0 = ((int64_t)blockIdx.x * kWarps + threadIdx.x / 32) * kRows;
    if (r0 >= rows)
        return;
    const int64_t rb = (int64_t)nchunks * 16;
    uint4 wv[kRows][NCH];
#pragma unroll
    for (int r = 0; r < kRows; r++)
#pragma unroll
        for (int c = 0; c < NCH; c++) {
            const int ch = lane + c * 32;
            wv[r][c] = make_uint4(0, 0, 0, 0);
            if (r0 + r < rows && ch < nchunks)
                wv[r][c] = load_stream(w + (r0 + r) * rb + ch * 16);
        }
    grid_wait();
    int4 xr[NCH];
    const float act_scale = __ldcg(&meta->s); /* with the input: one round trip to L2 */
#pragma unroll
    for (int c = 0; c < NCH; c++) {
        const int ch = lane + c * 32;
        xr[c] = ch < nchunks ? __ldcg(reinterpret_cast<const int4 *>(xq + ch * 16)) : make_int4(0, 0, 0, 0);
    }
#pragma unroll
    for (int r = 0; r < kRows; r++) {
        int32_t acc = 0;
#pragma unroll
        for (int c = 0; c < NCH; c++) {
            acc = __dp4a((int)wv[r][c].x, xr[c].x, acc);
            acc = __dp4a((int)wv[r][c].y, xr[c].y, acc);
            acc = __dp4a((int)wv[r][c].z, xr[c].z, acc);
            acc = __dp4a((int)wv[r][c].w, xr[c].w, acc);
        }
        acc = warp_sum(acc);
        if (lane == 0 && r0 + r < rows)
            finish(acc, r0 + r, act_scale, scale, out, epi);
    }
}

/* Float rows (half or float) times n float tokens; one warp per row, f32 accumulation. */
template <typename T>
__global__ void __launch_bounds__(kWarps * 32)
gemv_float_kernel(const T *__restrict__ w, int64_t rows, int64_t cols, const float *__restrict__ xf,
                  int32_t n, float *__restrict__ out)
{
    const int lane = threadIdx.x & 31;
    const int64_t r = (int64_t)blockIdx.x * kWarps + threadIdx.x / 32;
    if (r >= rows)
        return;
    const T *row = w + r * cols;
    grid_wait();
    for (int32_t t = 0; t < n; t++) {
        const float *x = xf + (int64_t)t * cols;
        float acc = 0.0f;
        for (int64_t c = lane; c < cols; c += 32)
            acc = fmaf((float)row[c], __ldcg(x + c), acc);
        acc = warp_sumf(acc);
        if (lane == 0)
            out[(int64_t)t * rows + r] = acc;
    }
}


int32_t chunks_per_lane(int64_t nchunks, const char *what)
{
    const int64_t per = (nchunks + 31) / 32;
    if (nchunks < 1 || per > 8)
        return -tern_fail(TERN_ERR_UNSUPPORTED, "cuda %s: %lld 16-byte chunks per row is outside 1..256",
                          what, (long long)nchunks);
    return (int32_t)per;
}

} // namespace

bool sm90_code(void)
{
    static const bool on = [] {
        cudaFuncAttributes fa;
        const bool ok = cudaFuncGetAttributes(&fa, gemv_float_kernel<float>) == cudaSuccess && fa.ptxVersion >= 90;
        cudaGetLastError();
        return ok;
    }();
    return on;
}

bool pdl_enabled(void)
{
    static const bool on = [] {
        const char *env = getenv("TERN_CUDA_PDL");
        return !(env && env[0] == '0') && sm90_code();
    }();
    return on;
}

int32_t cuda_launch_status(const char *what)
{
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess)
        return tern_fail(TERN_ERR_UNSUPPORTED, "cuda: launching %s: %s", what, cudaGetErrorString(err));
    return TERN_OK;
}

#define GEMV_CASE(KERNEL, N)                                                                    \
    case N:                                                                                     \
        LAUNCH(#KERNEL, KERNEL<N>, blocks, kWarps * 32, st, m.w, m.rows, nchunks, xq, meta, m.scale, out, epi); \
        break;

int32_t launch_gemv_i8(const dmat &m, const int8_t *xq, const act_meta *meta, void *out, int epi,
                       cudaStream_t st)
{
    if (m.cols % 16 != 0)
        return tern_fail(TERN_ERR_UNSUPPORTED, "cuda gemv_i8: k=%lld is not a multiple of 16", (long long)m.cols);
    const int32_t nchunks = (int32_t)(m.cols / 16);
    const int32_t per = chunks_per_lane(nchunks, "gemv_i8");
    if (per < 0)
        return -per;
    const int64_t per_block = kWarps * rows_per_warp(per);
    const unsigned blocks = (unsigned)((m.rows + per_block - 1) / per_block);
    switch (per) {
        GEMV_CASE(gemv_i8_kernel, 1) GEMV_CASE(gemv_i8_kernel, 2) GEMV_CASE(gemv_i8_kernel, 3)
        GEMV_CASE(gemv_i8_kernel, 4) GEMV_CASE(gemv_i8_kernel, 5) GEMV_CASE(gemv_i8_kernel, 6)
        GEMV_CASE(gemv_i8_kernel, 7) GEMV_CASE(gemv_i8_kernel, 8)
    }
    return cuda_launch_status("gemv_i8");
}

int32_t launch_gemv_float(const void *w, bool half_rows, int64_t rows, int64_t cols, const float *xf,
                          int32_t n, float *out, cudaStream_t st)
{
    const unsigned blocks = (unsigned)((rows + kWarps - 1) / kWarps);
    if (half_rows)
        LAUNCH("gemv_float", gemv_float_kernel<__half>, blocks, kWarps * 32, st, static_cast<const __half *>(w), rows, cols, xf, n, out);
    else
        LAUNCH("gemv_float", gemv_float_kernel<float>, blocks, kWarps * 32, st, static_cast<const float *>(w), rows, cols, xf, n, out);
    return cuda_launch_status("gemv_float");
}
