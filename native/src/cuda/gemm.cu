/* Prefill GEMMs (n tokens) on the int8 tensor cores: mma.sync m16n8k32 s8 x s8 -> s32.
 *
 * Block tile: 64 tokens x 128 weight rows, k in steps of 128 (one T2 block). T2 codes are
 * unpacked to signed int8 (-1, 0, +1) in shared memory; int8 rows (the LM head) are copied.
 * The next k step's global loads are issued into registers before the current step's MMAs.
 * Rows of shared tiles are padded to 144 bytes so fragment loads hit 32 distinct banks.
 * 8 warps: 2 (tokens) x 4 (rows), each warp 32 tokens x 32 rows = 2 x 4 MMA tiles. */
#include "common.cuh"

namespace {

constexpr int BM = 64, BN = 128, BK = 128, LDS = BK + 16, kThreads = 256;

__device__ __forceinline__ void mma_s8(int (&c)[4], const int (&a)[4], int b0, int b1)
{
    asm volatile("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 "
                 "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t unpack_group(uint32_t word, int g)
{
    return __vsub4((word >> (6 - 2 * g)) & 0x03030303u, 0x01010101u); /* code - 1 per byte */
}

template <bool T2>
struct tiles {
    uint4 a[2];
    uint4 b[T2 ? 1 : 4];

    __device__ void load(const uint8_t *w, int64_t rows, int64_t k, const int8_t *xq, int n,
                         int64_t t_base, int64_t r_base, int kb, int tid)
    {
#pragma unroll
        for (int i = 0; i < 2; i++) {
            const int idx = tid + i * kThreads, row = idx / 8, c16 = idx % 8;
            const int64_t tok = t_base + row;
            /* the read-only path, unlike the decode kernels (common.cuh): the norm of several
             * tokens before this GEMM releases it only when its blocks exit */
            a[i] = tok < n ? *reinterpret_cast<const uint4 *>(xq + tok * k + (int64_t)kb * BK + c16 * 16)
                           : make_uint4(0, 0, 0, 0);
        }
        if (T2) {
            const int row = tid / 2, half = tid & 1;
            const int64_t r = r_base + row;
            b[0] = r < rows ? __ldcs(reinterpret_cast<const uint4 *>(w + r * (k / 4) + (int64_t)kb * 32 + half * 16))
                            : make_uint4(0x55555555u, 0x55555555u, 0x55555555u, 0x55555555u);
        } else {
#pragma unroll
            for (int i = 0; i < (T2 ? 1 : 4); i++) {
                const int idx = tid + i * kThreads, row = idx / 8, c16 = idx % 8;
                const int64_t r = r_base + row;
                b[i] = r < rows ? __ldcs(reinterpret_cast<const uint4 *>(w + r * k + (int64_t)kb * BK + c16 * 16))
                                : make_uint4(0, 0, 0, 0);
            }
        }
    }

    __device__ void store(int8_t *As, int8_t *Bs, int tid) const
    {
#pragma unroll
        for (int i = 0; i < 2; i++) {
            const int idx = tid + i * kThreads;
            *reinterpret_cast<uint4 *>(As + (idx / 8) * LDS + (idx % 8) * 16) = a[i];
        }
        if (T2) {
            const int row = tid / 2, half = tid & 1;
#pragma unroll
            for (int g = 0; g < 4; g++) {
                const uint4 v = make_uint4(unpack_group(b[0].x, g), unpack_group(b[0].y, g),
                                           unpack_group(b[0].z, g), unpack_group(b[0].w, g));
                *reinterpret_cast<uint4 *>(Bs + row * LDS + g * 32 + half * 16) = v;
            }
        } else {
#pragma unroll
            for (int i = 0; i < (T2 ? 1 : 4); i++) {
                const int idx = tid + i * kThreads;
                *reinterpret_cast<uint4 *>(Bs + (idx / 8) * LDS + (idx % 8) * 16) = b[i];
            }
        }
    }
};

__device__ __forceinline__ int lds32(const int8_t *p) { return *reinterpret_cast<const int *>(p); }

template <bool T2>
__global__ void __launch_bounds__(kThreads)
gemm_kernel(const uint8_t *__restrict__ w, int64_t rows, int64_t k, const int8_t *__restrict__ xq,
            const act_meta *__restrict__ meta, int n, const float *__restrict__ scale, void *out,
            int64_t ldo, int epi)
{
    __shared__ __align__(16) int8_t As[BM * LDS];
    __shared__ __align__(16) int8_t Bs[BN * LDS];
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane >> 2, t4 = lane & 3;
    const int wm = warp / 4, wn = warp % 4;
    const int64_t t_base = (int64_t)blockIdx.y * BM, r_base = (int64_t)blockIdx.x * BN;
    int acc[2][4][4];
#pragma unroll
    for (int i = 0; i < 2; i++)
#pragma unroll
        for (int j = 0; j < 4; j++)
#pragma unroll
            for (int e = 0; e < 4; e++)
                acc[i][j][e] = 0;
    const int nk = (int)(k / BK);
    grid_wait();
    tiles<T2> tl;
    tl.load(w, rows, k, xq, n, t_base, r_base, 0, tid);
    for (int kb = 0; kb < nk; kb++) {
        tl.store(As, Bs, tid);
        __syncthreads();
        if (kb + 1 < nk)
            tl.load(w, rows, k, xq, n, t_base, r_base, kb + 1, tid);
#pragma unroll
        for (int ks = 0; ks < BK / 32; ks++) {
            const int kc = ks * 32 + t4 * 4;
            int a[2][4];
#pragma unroll
            for (int mt = 0; mt < 2; mt++) {
                const int8_t *p = As + (wm * 32 + mt * 16 + g) * LDS + kc;
                a[mt][0] = lds32(p);
                a[mt][1] = lds32(p + 8 * LDS);
                a[mt][2] = lds32(p + 16);
                a[mt][3] = lds32(p + 8 * LDS + 16);
            }
#pragma unroll
            for (int nt = 0; nt < 4; nt++) {
                const int8_t *p = Bs + (wn * 32 + nt * 8 + g) * LDS + kc;
                const int b0 = lds32(p), b1 = lds32(p + 16);
                mma_s8(acc[0][nt], a[0], b0, b1);
                mma_s8(acc[1][nt], a[1], b0, b1);
            }
        }
        __syncthreads();
    }
#pragma unroll
    for (int mt = 0; mt < 2; mt++)
#pragma unroll
        for (int nt = 0; nt < 4; nt++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int64_t tok = t_base + wm * 32 + mt * 16 + g + (e >= 2 ? 8 : 0);
                const int64_t row = r_base + wn * 32 + nt * 8 + t4 * 2 + (e & 1);
                if (tok >= n || row >= rows)
                    continue;
                const int32_t v = acc[mt][nt][e]; /* signed weights: no sum(x) correction */
                if (epi == EPI_RAW) {
                    static_cast<int32_t *>(out)[tok * ldo + row] = v;
                    continue;
                }
                const float f = __fmul_rn(__fdiv_rn((float)v, meta[tok].s), scale[row]);
                float *o = static_cast<float *>(out) + tok * ldo + row;
                *o = epi == EPI_ADD ? __fadd_rn(*o, f) : f;
            }
}

} // namespace

int32_t launch_gemm(const dmat &m, bool t2, const int8_t *xq, const act_meta *meta, int32_t n,
                    void *out, int64_t ldo, int epi, cudaStream_t st)
{
    if (m.cols % BK != 0)
        return tern_fail(TERN_ERR_UNSUPPORTED, "cuda gemm: k=%lld is not a multiple of %d", (long long)m.cols, BK);
    const dim3 grid((unsigned)((m.rows + BN - 1) / BN), (unsigned)((n + BM - 1) / BM));
    if (t2)
        LAUNCH("gemm", gemm_kernel<true>, grid, kThreads, st, m.w, m.rows, m.cols, xq, meta, n, m.scale, out, ldo, epi);
    else
        LAUNCH("gemm", gemm_kernel<false>, grid, kThreads, st, m.w, m.rows, m.cols, xq, meta, n, m.scale, out, ldo, epi);
    return cuda_launch_status("gemm");
}
