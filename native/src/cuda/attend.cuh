/* One warp's online-softmax attention over a range of cached positions, shared by the decode
 * attention kernel (ops.cu) and the persistent decode kernel (persist.cu). Lane l owns dims
 * l*D .. l*D+D-1 of a head (head_dim = 32 D); B positions per step, their K/V loads in flight
 * together. */
#ifndef TERN_CUDA_ATTEND_CUH
#define TERN_CUDA_ATTEND_CUH

#include <cuda_fp16.h>
#include <math.h>
#include <stdint.h>

/* D values of a cached row as floats. kL2: loads that skip L1 (__ldcg), for data written by
 * other blocks of the same kernel (the persistent kernel), which L1 does not keep coherent. */
template <int D, bool kL2>
__device__ __forceinline__ void load_kv(const float *p, float (&f)[D])
{
#pragma unroll
    for (int i = 0; i < D; i++)
        f[i] = kL2 ? __ldcg(p + i) : p[i];
}

template <int D, bool kL2>
__device__ __forceinline__ void load_kv(const __half *p, float (&f)[D])
{
    if constexpr (D % 2 == 0) {
        const __half2 *p2 = reinterpret_cast<const __half2 *>(p);
#pragma unroll
        for (int i = 0; i < D / 2; i++) {
            const float2 v = __half22float2(kL2 ? __ldcg(p2 + i) : p2[i]);
            f[2 * i] = v.x;
            f[2 * i + 1] = v.y;
        }
    } else {
#pragma unroll
        for (int i = 0; i < D; i++)
            f[i] = __half2float(kL2 ? __ldcg(p + i) : p[i]);
    }
}

/* Folds positions [p0, p1) into the warp's running (m, l, o): kb/vb point at this lane's dims
 * of position 0, rows kv_dim apart; q is this lane's part of the query. */
template <int D, int B, bool kL2, typename KV>
__device__ __forceinline__ void warp_attend(const float (&q)[D], const KV *kb, const KV *vb, int64_t kv_dim,
                                            int p0, int p1, float scale, float (&o)[D], float &m, float &l)
{
    for (int p = p0; p < p1; p += B) {
        float kf[B][D], vf[B][D], sc[B];
#pragma unroll
        for (int j = 0; j < B; j++) {
            const int pj = p + j < p1 ? p + j : p;
            load_kv<D, kL2>(kb + (int64_t)pj * kv_dim, kf[j]);
            load_kv<D, kL2>(vb + (int64_t)pj * kv_dim, vf[j]);
        }
#pragma unroll
        for (int j = 0; j < B; j++) {
            float dot = 0.0f;
#pragma unroll
            for (int i = 0; i < D; i++)
                dot = fmaf(q[i], kf[j][i], dot);
            sc[j] = dot;
        }
#pragma unroll
        for (int off = 16; off > 0; off >>= 1)
#pragma unroll
            for (int j = 0; j < B; j++)
                sc[j] += __shfl_xor_sync(0xffffffffu, sc[j], off);
        float mn = m;
#pragma unroll
        for (int j = 0; j < B; j++) {
            sc[j] = p + j < p1 ? sc[j] * scale : -INFINITY;
            mn = fmaxf(mn, sc[j]);
        }
        const float corr = expf(m - mn);
        l *= corr;
#pragma unroll
        for (int i = 0; i < D; i++)
            o[i] *= corr;
#pragma unroll
        for (int j = 0; j < B; j++) {
            const float pe = expf(sc[j] - mn);
            l += pe;
#pragma unroll
            for (int i = 0; i < D; i++)
                o[i] = fmaf(pe, vf[j][i], o[i]);
        }
        m = mn;
    }
}

#endif
