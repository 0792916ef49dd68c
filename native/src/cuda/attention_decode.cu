/* Decode attention (one new token) over the KV cache: a block per (KV group, split) takes tiles
 * of 64 positions, copies each tile's K and V rows into shared memory with cp.async (every load
 * of the tile in flight at once; the rows cached by earlier steps before griddepcontrol.wait,
 * while the q|k|v GEMV still runs), computes the scores of every q head of the group, one warp
 * per head for the softmax, then P.V; the last block of a group to finish merges the splits in
 * split order (deterministic), and in the fused-norm decode also writes the attn_sub_norm
 * statistics. The same kernel, TILED, runs the prefill's attention with an f16 cache: a block
 * takes several consecutive tokens of a KV group (its columns are (token, q head) pairs, causal
 * per column), so each tile of the cache it copies serves them all (H100, 512-token prompt: time
 * to first token 16.5-17.8 ms against 19.2-20.0 with a warp per q head and token).
 *
 * With an f16 cache the scores and P.V run on the tensor cores (mma m16n8k16, f32 accumulate):
 * K and V are f16 already, and q and P enter as two f16 terms each (hi + lo, 22 bits of
 * mantissa; each warp scales its q by a power of two so that the largest value cannot overflow
 * f16), so the products carry the f32 operands' precision. The scalar version of the same tile (kept for the
 * f32 cache) ran ~800 dependent instructions per warp and took ~3.3 us of the ~8 us a layer's
 * attention cost in the decode step.
 *
 * Decode attention is latency-bound (a few hundred kB of cache per layer): what counts is how
 * many dependent instructions one warp runs and how many memory round trips are serial. The
 * prefill kernel (a warp per q head walking its positions 8 at a time, then a merge of 32 splits
 * in dependent L2 round trips) cost ~12 us of a ~41 us decode layer on an H100; a first version
 * of this kernel (128 positions per block, a lane per position for all heads) ran ~3,300
 * instructions per warp at one warp per scheduler and was no faster (docs/CUDA.md). */
#include "common.cuh"

namespace {

constexpr int kThreads = 256, kWarps = kAttnStatParts;
static_assert(kThreads == 32 * kWarps, "a statistics partial per warp");
constexpr int kMaxGroup = kAttnMaxGroup;
constexpr int kAttnMaxSplit = 32; /* splits per KV group at most (the partials buffer holds them) */
constexpr int kTile = 64;      /* positions per tile: two per lane in the softmax */
constexpr int kMergeBatch = 16; /* splits whose partials are loaded together in the merge */

template <int HD, typename KV>
struct tile_shape {
    static constexpr int RB = HD * (int)sizeof(KV); /* bytes of one cached row */
    static constexpr int KS = RB + 16;              /* padded K and V rows: threads reading rows
                                                       side by side hit different banks */
    static constexpr int EPC = 16 / (int)sizeof(KV); /* values per 16-byte chunk */
    static constexpr int PAIRS = kMaxGroup * HD / 2 / kThreads; /* output pairs per thread, at most */
    static constexpr size_t smem(int gs)
    {
        const int parts = 2 * gs < kWarps ? kWarps : 2 * gs; /* rows of partial scores */
        return (size_t)2 * kTile * KS + (size_t)gs * HD * 4 + (size_t)parts * kTile * 4 + (size_t)gs * kTile * 4;
    }
};

__device__ __forceinline__ void cp_async16(void *smem, const void *gmem)
{
    const unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(s), "l"(gmem) : "memory");
}

__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;" ::: "memory"); }

/* The tensor-core tile (f16 cache; mma.sync m16n8k16 needs sm_80). Fragment layouts as in the
 * PTX ISA: lane = 4 g + t; A holds rows g and g + 8, columns 2t, 2t + 1 (+ 8); B holds rows 2t,
 * 2t + 1 (+ 8) of column g; C holds rows g and g + 8, columns 2t and 2t + 1. */
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
constexpr bool kMmaArch = true;
#else
constexpr bool kMmaArch = false;
#endif

/* four 8x8 f16 matrices; lane l gives the address of row l % 8 of matrix l / 8 */
__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], const void *row, bool trans)
{
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
    const unsigned a = (unsigned)__cvta_generic_to_shared(row);
    if (trans)
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a) : "memory");
    else
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a) : "memory");
#endif
}

/* c += a . b (16x16 by 16x8, f16 in, f32 accumulate) */
__device__ __forceinline__ void mma_16816(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1)
{
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

/* two floats as f16 pairs hi + lo: hi + lo equals v to ~22 bits */
__device__ __forceinline__ void split_half2(float2 v, unsigned &hi, unsigned &lo)
{
    const __half2 h = __float22half2_rn(v);
    const float2 back = __half22float2(h);
    const __half2 l = __float22half2_rn(make_float2(v.x - back.x, v.y - back.y));
    hi = *reinterpret_cast<const unsigned *>(&h);
    lo = *reinterpret_cast<const unsigned *>(&l);
}

/* 8 (f16) or 4 (f32) cached values of a 16-byte chunk as floats */
__device__ __forceinline__ void chunk_floats(const uint4 &c, const __half *, float (&f)[8])
{
    const __half2 *h = reinterpret_cast<const __half2 *>(&c);
#pragma unroll
    for (int i = 0; i < 4; i++) {
        const float2 v = __half22float2(h[i]);
        f[2 * i] = v.x;
        f[2 * i + 1] = v.y;
    }
}

__device__ __forceinline__ void chunk_floats(const uint4 &c, const float *, float (&f)[8])
{
    f[0] = __uint_as_float(c.x); f[1] = __uint_as_float(c.y);
    f[2] = __uint_as_float(c.z); f[3] = __uint_as_float(c.w);
}

/* two consecutive cached values as floats */
__device__ __forceinline__ float2 pair_floats(const unsigned char *p, const __half *)
{
    return __half22float2(*reinterpret_cast<const __half2 *>(p));
}

__device__ __forceinline__ float2 pair_floats(const unsigned char *p, const float *)
{
    return *reinterpret_cast<const float2 *>(p);
}

/* grid (n_head_kv, max splits, token blocks), kThreads threads. A block takes tbt consecutive
 * tokens (decode: 1) of a KV group: its columns are (token, q head) pairs, at most kMaxGroup.
 * partial per (token block, group, split): (m, l) per column (padded to 4 floats), then the
 * columns' unnormalized outputs. fresh (prefill): every cached row may come from the kernel
 * before, so all are fetched after the wait. */
template <int HD, typename KV, bool TILED>
__global__ void __launch_bounds__(kThreads, 1)
attention_decode_kernel(const float *__restrict__ qkv, int n_head, int n_head_kv, const KV *__restrict__ k_cache,
                        const KV *__restrict__ v_cache, const int32_t *__restrict__ pos0, float scale,
                        float *__restrict__ partial, int *__restrict__ counters, float *__restrict__ out,
                        const float *__restrict__ nw, float *__restrict__ xw, float2 *__restrict__ stats,
                        int n_tok, int tbt, int64_t q_stride, int64_t o_stride, bool fresh)
{
    using S = tile_shape<HD, KV>;
    constexpr int RB = S::RB, KS = S::KS, EPC = S::EPC, CH = RB / 16, SUB = kTile / 32;
    constexpr bool MMA = kMmaArch && sizeof(KV) == 2; /* the tensor-core tile (f16 cache) */
    constexpr int MT = (HD / 16 + kWarps - 1) / kWarps; /* P.V: 16-dim row blocks per warp */
    extern __shared__ __align__(16) unsigned char sm[];
    if (!TILED) { /* decode: constants, so its code has no token arithmetic */
        n_tok = tbt = 1;
        q_stride = o_stride = 0;
        fresh = false;
    }
    const int hpg = n_head / n_head_kv, grp = blockIdx.x, sp = blockIdx.y, tb = TILED ? blockIdx.z : 0;
    const int warp = threadIdx.x / 32, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int t0 = tb * tbt, ntok = n_tok - t0 < tbt ? n_tok - t0 : tbt;
    const int gs = ntok * hpg, cmax = tbt * hpg; /* this block's columns; the partials' layout */
    const int ngs = (gs + 7) / 8; /* 8-column blocks of the tensor-core tile */
    /* column c: token t0 + c / hpg, q head grp * hpg + c % hpg */
    auto ctok = [&](int c) { return TILED ? c / hpg : 0; };
    auto qcol = [&](int c) { return qkv + (t0 + ctok(c)) * q_stride + (int64_t)(grp * hpg + c - ctok(c) * hpg) * HD; };
    auto ocol = [&](int c) { return (t0 + ctok(c)) * o_stride + (int64_t)(grp * hpg + c - ctok(c) * hpg) * HD; };
    /* the dot products of a tile: gs x kTile, each split in `parts` ranges of dims over the warps
       (the tensor-core tile: two halves of the dims) */
    const int parts = MMA ? 2 : gs >= kWarps ? 1 : (kWarps / gs < CH ? kWarps / gs : CH), dims = HD / parts;
    unsigned char *ks = sm, *vs = sm + kTile * KS;
    float *qs = reinterpret_cast<float *>(vs + kTile * KS); /* gs x HD */
    float *scs = qs + gs * HD;                                /* gs * parts x kTile partial scores */
    float *ps = scs + (2 * gs > kWarps ? 2 * gs : kWarps) * kTile; /* gs x kTile probabilities */
    __shared__ float mrun[kMaxGroup], corr[kMaxGroup];
    __shared__ int last;
    const int64_t kv_dim = (int64_t)n_head_kv * HD;
    auto fetch = [&](int p0, int from, int to) { /* rows [from, to) of the tile at p0 */
        for (int c = threadIdx.x + from * CH; c < to * CH; c += kThreads) {
            const int r = c / CH, j = c % CH;
            const int64_t at = (int64_t)(p0 + r) * kv_dim + (int64_t)grp * HD + j * EPC;
            cp_async16(ks + r * KS + j * 16, k_cache + at);
            cp_async16(vs + r * KS + j * 16, v_cache + at);
        }
    };
    /* the tensor-core P.V reads whole 16-row steps: V rows past the tile's end must be finite */
    auto zero_tail = [&](int n) {
        const int end = (n + 15) & ~15;
        for (int c = threadIdx.x + n * CH; c < end * CH; c += kThreads)
            *reinterpret_cast<uint4 *>(vs + (c / CH) * KS + (c % CH) * 16) = make_uint4(0, 0, 0, 0);
    };

    /* Before the wait (decode): the position comes from the host copy ahead of the step, and the
     * cached rows before it from earlier steps; only the newest row (this step's q|k|v kernel) and
     * q depend on the previous kernel. Prefill (fresh) fetches every row after the wait. */
    const int base = __ldcg(pos0) + t0; /* position of the block's first token */
    const int npos = base + ntok, ntiles = (npos + kTile - 1) / kTile;
    auto cpos = [&](int c) { return base + ctok(c) + 1; }; /* positions column c sees */
    const int nsplit = ntiles < (int)gridDim.y ? ntiles : (int)gridDim.y;
    if (sp >= nsplit) {
        grid_launch_dependents();
        return;
    }
    const int first_n = npos - sp * kTile < kTile ? npos - sp * kTile : kTile;
    const bool has_newest = sp * kTile + first_n == npos;
    if (!fresh)
        fetch(sp * kTile, 0, has_newest ? first_n - 1 : first_n);
    if (MMA)
        zero_tail(first_n);
    float2 nwp[S::PAIRS]; /* the merge's norm weights */
#pragma unroll
    for (int j = 0; j < S::PAIRS; j++) {
        const int o = threadIdx.x + kThreads * j;
        nwp[j] = stats && o < gs * HD / 2 ? reinterpret_cast<const float2 *>(nw + (int64_t)grp * hpg * HD)[o]
                                          : make_float2(0.0f, 0.0f);
    }
    grid_launch_dependents(); /* a small grid: the wo GEMV's blocks load their weights meanwhile */
    grid_wait();
    if (fresh)
        fetch(sp * kTile, 0, first_n);
    else if (has_newest)
        fetch(sp * kTile, first_n - 1, first_n);
    for (int i = threadIdx.x; !MMA && i < gs * HD; i += kThreads)
        qs[i] = __ldcg(qcol(i / HD) + i % HD);
    if (threadIdx.x < gs)
        mrun[threadIdx.x] = -INFINITY;
    /* this thread's output pairs: pair o = threadIdx.x + kThreads * j, head o / (HD / 2) */
    const int npairs = gs * HD / 2;
    float2 acc[S::PAIRS];
#pragma unroll
    for (int j = 0; j < S::PAIRS; j++)
        acc[j] = make_float2(0.0f, 0.0f);
    /* the softmax's sums per lane (heads warp, warp + kWarps): reduced over the warp once, after
       the tiles, not in every tile between two barriers */
    constexpr int HW = (kMaxGroup + kWarps - 1) / kWarps;
    float lsum[HW];
#pragma unroll
    for (int i = 0; i < HW; i++)
        lsum[i] = 0.0f;
    /* the tensor-core tile: q's B fragments (hi, lo; this warp's half of the dims, per 8-head
       block), the power of two that scaled q, and the P.V accumulators (rows: dims
       16 (warp + kWarps m) + g (+ 8); columns: heads 8 nb + 2t (+ 1)) */
    constexpr int KH = HD / 32; /* 16-dim steps in half of the dims */
    unsigned qf[2][KH][2][2];   /* [head block][step][b0, b1][hi, lo] */
    float unscale = 1.0f;
    if (MMA) { /* scaled by 2^e so that the warp's largest |q| is below 2^15, f16's limit */
        float2 qv[2][KH][2];
        float m = 0.0f;
        const int half = warp >> 2;
#pragma unroll
        for (int nb = 0; nb < 2; nb++)
#pragma unroll
            for (int k = 0; k < KH; k++)
#pragma unroll
                for (int b = 0; b < 2; b++) {
                    const int h = 8 * nb + g, d = (half * KH + k) * 16 + 8 * b + 2 * t;
                    qv[nb][k][b] = h < gs ? __ldcg(reinterpret_cast<const float2 *>(qcol(h) + d))
                                          : make_float2(0.0f, 0.0f);
                    m = fmaxf(m, fmaxf(fabsf(qv[nb][k][b].x), fabsf(qv[nb][k][b].y)));
                }
        for (int o = 16; o > 0; o >>= 1)
            m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
        const int e = m > 0.0f && m < INFINITY ? 14 - ilogbf(m) : 0;
        const int ec = e < -100 ? -100 : e > 100 ? 100 : e;
        const float up = ldexpf(1.0f, ec);
        unscale = ldexpf(1.0f, -ec);
#pragma unroll
        for (int nb = 0; nb < 2; nb++)
#pragma unroll
            for (int k = 0; k < KH; k++)
#pragma unroll
                for (int b = 0; b < 2; b++)
                    split_half2(make_float2(qv[nb][k][b].x * up, qv[nb][k][b].y * up), qf[nb][k][b][0], qf[nb][k][b][1]);
    }
    float pv[MT][2][4];
#pragma unroll
    for (int m = 0; m < MT; m++)
#pragma unroll
        for (int nb = 0; nb < 2; nb++)
#pragma unroll
            for (int i = 0; i < 4; i++)
                pv[m][nb][i] = 0.0f;
    /* body(m, d0, nb) for each of this warp's P.V blocks: 16-dim row block d0 = 16 (warp + kWarps m)
       of V^T, 8-head column block nb (the P.V itself and the partial's write) */
    auto pv_blocks = [&](auto body) {
#pragma unroll
        for (int m = 0; m < MT; m++) {
            const int d0 = (warp + kWarps * m) * 16;
            if (d0 >= HD)
                break;
#pragma unroll
            for (int nb = 0; nb < 2 && nb < ngs; nb++)
                body(m, d0, nb);
        }
    };

    for (int tile = sp; tile < ntiles; tile += nsplit) {
        const int p0 = tile * kTile, n = npos - p0 < kTile ? npos - p0 : kTile;
        if (tile != sp)
            fetch(p0, 0, n);
        if (MMA && tile != sp)
            zero_tail(n);
        cp_async_wait_all();
        __syncthreads(); /* the tile and (first tile) q and mrun are in shared memory */
        if (MMA) {
            /* partial scores on the tensor cores: warp -> 16 positions (warp % 4) x half of the
               dims (warp / 4), per 8-head block; A = K rows, B = q */
            const int r0 = (warp & 3) * 16, half = warp >> 2;
            if (r0 < n) {
#pragma unroll
                for (int nb = 0; nb < 2 && nb < ngs; nb++) {
                    float c[2][4] = {}; /* q's hi and lo terms: two independent chains */
#pragma unroll
                    for (int k = 0; k < KH; k++) {
                        unsigned a[4];
                        const int d = (half * KH + k) * 16 + ((lane >> 4) << 3);
                        ldmatrix_x4(a, ks + (r0 + (lane & 7) + (((lane >> 3) & 1) << 3)) * KS + d * 2, false);
                        mma_16816(c[0], a, qf[nb][k][0][0], qf[nb][k][1][0]);
                        mma_16816(c[1], a, qf[nb][k][0][1], qf[nb][k][1][1]);
                    }
#pragma unroll
                    for (int i = 0; i < 4; i++) {
                        const int h = 8 * nb + 2 * t + (i & 1), r = r0 + g + ((i >> 1) << 3);
                        if (h < gs)
                            scs[(h * 2 + half) * kTile + r] = (c[0][i] + c[1][i]) * unscale;
                    }
                }
            }
        }
        /* partial scores: warp -> (head, range of dims), lane -> positions lane + 32 i */
        for (int c = warp; !MMA && c < gs * parts; c += kWarps) {
            const int h = c / parts, d0 = (c % parts) * dims;
            float dot[SUB];
            const unsigned char *krow[SUB];
#pragma unroll
            for (int i = 0; i < SUB; i++) {
                dot[i] = 0.0f;
                krow[i] = ks + (lane + 32 * i) * KS + d0 * (int)sizeof(KV);
            }
            const float *qh = qs + h * HD + d0;
            for (int d = 0; d < dims; d += EPC) {
                float qv[8];
#pragma unroll
                for (int e = 0; e < EPC; e++)
                    qv[e] = qh[d + e];
#pragma unroll
                for (int i = 0; i < SUB; i++) {
                    float kf[8];
                    chunk_floats(*reinterpret_cast<const uint4 *>(krow[i] + d * (int)sizeof(KV)), (const KV *)nullptr, kf);
#pragma unroll
                    for (int e = 0; e < EPC; e++)
                        dot[i] = fmaf(qv[e], kf[e], dot[i]);
                }
            }
#pragma unroll
            for (int i = 0; i < SUB; i++)
                scs[c * kTile + lane + 32 * i] = dot[i]; /* rows past n hold stale values: masked below */
        }
        __syncthreads();
        /* softmax step: a warp per head, a lane per position */
#pragma unroll
        for (int hi = 0; hi < HW; hi++) {
            const int h = warp + kWarps * hi;
            if (h >= gs)
                break;
            const int live = TILED ? cpos(h) - p0 : n; /* this column's live positions in the tile */
            float sc[SUB], mt = -INFINITY;
#pragma unroll
            for (int i = 0; i < SUB; i++) {
                const int r = lane + 32 * i;
                float v = 0.0f;
                for (int p = 0; p < parts; p++)
                    v += scs[(h * parts + p) * kTile + r];
                sc[i] = r < live ? v * scale : -INFINITY;
                mt = fmaxf(mt, sc[i]);
            }
            for (int o = 16; o > 0; o >>= 1)
                mt = fmaxf(mt, __shfl_xor_sync(0xffffffffu, mt, o));
            /* -inf only while a prefill column has seen no live position (a later token's block
               split: its earlier tokens end before this tile) */
            const float mn = fmaxf(mrun[h], mt), mref = TILED && mn == -INFINITY ? 0.0f : mn;
            const float c = expf(mrun[h] - mref); /* 0 on the first tile */
            float sum = 0.0f;
#pragma unroll
            for (int i = 0; i < SUB; i++) {
                const int r = lane + 32 * i;
                const float pr = r < live ? expf(sc[i] - mref) : 0.0f;
                ps[h * kTile + r] = pr;
                sum += pr;
            }
            lsum[hi] = lsum[hi] * c + sum;
            __syncwarp(); /* every lane has read mrun[h] */
            if (lane == 0) {
                corr[h] = c;
                mrun[h] = mn;
            }
        }
        __syncthreads();
        if (MMA) {
            /* P.V on the tensor cores: warp -> 16-dim row blocks warp + kWarps m of V^T (A, from
               the V rows transposed by ldmatrix), B = P (hi, lo) per 8-head block */
            const int steps = (n + 15) >> 4;
            pv_blocks([&](int m, int d0, int nb) {
                float c[2][4] = {}; /* P's hi and lo terms: two independent chains */
                const int h = 8 * nb + g;
                for (int k = 0; k < steps; k++) {
                    unsigned a[4], b[2][2];
                    const int r = k * 16 + (lane & 7) + ((lane >> 4) << 3);
                    ldmatrix_x4(a, vs + r * KS + (d0 + (((lane >> 3) & 1) << 3)) * 2, true);
#pragma unroll
                    for (int j = 0; j < 2; j++) {
                        const float2 p = h < gs ? *reinterpret_cast<const float2 *>(ps + h * kTile + k * 16 + 8 * j + 2 * t)
                                                : make_float2(0.0f, 0.0f);
                        split_half2(p, b[j][0], b[j][1]);
                    }
                    mma_16816(c[0], a, b[0][0], b[1][0]);
                    mma_16816(c[1], a, b[0][1], b[1][1]);
                }
#pragma unroll
                for (int i = 0; i < 4; i++) {
                    const int hc = 8 * nb + 2 * t + (i & 1);
                    pv[m][nb][i] = pv[m][nb][i] * (hc < gs ? corr[hc] : 0.0f) + (c[0][i] + c[1][i]);
                }
            });
        }
        /* P.V: thread pairs over the tile's positions */
#pragma unroll
        for (int j = 0; j < S::PAIRS; j++) {
            if (MMA)
                break;
            const int o = threadIdx.x + kThreads * j;
            if (o >= npairs)
                break;
            const int h = o / (HD / 2), d = 2 * (o % (HD / 2));
            const float c = corr[h];
            float2 a = make_float2(acc[j].x * c, acc[j].y * c);
            const float *ph = ps + h * kTile;
            const unsigned char *vcol = vs + d * (int)sizeof(KV);
#pragma unroll 8
            for (int r = 0; r < n; r++) {
                const float p = ph[r];
                const float2 v = pair_floats(vcol + r * KS, (const KV *)nullptr);
                a.x = fmaf(p, v.x, a.x);
                a.y = fmaf(p, v.y, a.y);
            }
            acc[j] = a;
        }
        __syncthreads(); /* the next tile overwrites ks, vs, scs and ps */
    }

    const int ml = (2 * cmax + 3) & ~3;               /* (m, l) pairs, padded: the outputs stay 16-byte aligned */
    const int64_t stride = ml + (int64_t)cmax * HD; /* floats per (token block, group, split) */
    const int unit = tb * (int)gridDim.x + grp;     /* counter and partials of (token block, group) */
    float *mine = partial + ((int64_t)unit * gridDim.y + sp) * stride;
#pragma unroll
    for (int hi = 0; hi < HW; hi++) {
        const int h = warp + kWarps * hi;
        if (h >= gs)
            break;
        float l = lsum[hi];
        for (int o = 16; o > 0; o >>= 1)
            l += __shfl_xor_sync(0xffffffffu, l, o);
        if (lane == 0) {
            mine[2 * h] = mrun[h];
            mine[2 * h + 1] = l;
        }
    }
#pragma unroll
    for (int j = 0; j < S::PAIRS; j++) {
        const int o = threadIdx.x + kThreads * j;
        if (!MMA && o < npairs)
            reinterpret_cast<float2 *>(mine + ml)[o] = acc[j];
    }
    if (MMA)
        pv_blocks([&](int m, int d0, int nb) {
#pragma unroll
            for (int i = 0; i < 4; i++) {
                const int h = 8 * nb + 2 * t + (i & 1);
                if (h < gs)
                    mine[ml + h * HD + d0 + g + ((i >> 1) << 3)] = pv[m][nb][i];
            }
        });
    /* the last block of this group merges every split */
    __syncthreads();
    if (threadIdx.x == 0)
        last = arrive_acq_rel(counters + unit) == nsplit - 1;
    __syncthreads();
    if (!last)
        return;
    const float *parts_of = partial + (int64_t)unit * gridDim.y * stride;
    float ss = 0.0f, mx = 0.0f;
#pragma unroll
    for (int j = 0; j < S::PAIRS; j++) {
        const int o = threadIdx.x + kThreads * j;
        if (o >= npairs)
            break;
        const int h = o / (HD / 2);
        float M = -INFINITY, L = 0.0f;
        float2 a = make_float2(0.0f, 0.0f);
        for (int s0 = 0; s0 < nsplit; s0 += kMergeBatch) { /* a batch's loads in flight together */
            float2 pm[kMergeBatch], ov[kMergeBatch];
#pragma unroll
            for (int b = 0; b < kMergeBatch; b++)
                if (s0 + b < nsplit) {
                    const float *src = parts_of + (s0 + b) * stride;
                    pm[b] = __ldcg(reinterpret_cast<const float2 *>(src) + h);
                    ov[b] = __ldcg(reinterpret_cast<const float2 *>(src + ml) + o);
                }
            /* the batch's maximum first: its scale factors are then independent */
            float mn = M;
#pragma unroll
            for (int b = 0; b < kMergeBatch; b++)
                if (s0 + b < nsplit)
                    mn = fmaxf(mn, pm[b].x);
            const float cold = expf(M - mn);
            L *= cold;
            a = make_float2(a.x * cold, a.y * cold);
#pragma unroll
            for (int b = 0; b < kMergeBatch; b++)
                if (s0 + b < nsplit) {
                    const float cnew = expf(pm[b].x - mn);
                    L += pm[b].y * cnew;
                    a = make_float2(a.x + ov[b].x * cnew, a.y + ov[b].y * cnew);
                }
            M = mn;
        }
        const int64_t at = TILED ? ocol(h) + 2 * (o % (HD / 2)) : (int64_t)grp * hpg * HD + 2 * o;
        const float v[2] = {a.x / L, a.y / L};
#pragma unroll
        for (int i = 0; i < 2; i++) {
            out[at + i] = v[i];
            if (stats) { /* fused-norm decode: this block produces its group's heads */
                const float vw = __fmul_rn(v[i], i == 0 ? nwp[j].x : nwp[j].y);
                xw[at + i] = vw;
                ss = __fadd_rn(ss, __fmul_rn(v[i], v[i]));
                mx = fmaxf(mx, fabsf(vw));
            }
        }
    }
    if (threadIdx.x == 0)
        counters[unit] = 0; /* ready for the next launch */
    if (!stats)
        return;
    /* one partial per warp of the merging block (kAttnStatParts per KV group): no barrier here,
       the consumer sums partials anyway */
    for (int o = 16; o > 0; o >>= 1) {
        ss = __fadd_rn(ss, __shfl_xor_sync(0xffffffffu, ss, o));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    }
    if (lane == 0)
        stats[grp * kWarps + warp] = make_float2(ss, mx);
}

/* launch geometry: tokens, tokens per block, token blocks, splits; q and output row strides */
struct att_grid {
    int n_tok, tbt, ntb, splits;
    int64_t q_stride, o_stride;
    bool fresh;
};

template <int HD, typename KV, bool TILED>
cudaError_t launch_hd(const att_grid &ag, int n_head, int n_head_kv, cudaStream_t st, const float *qkv,
                      const void *k_cache, const void *v_cache, const int32_t *pos, float scale, float *partial,
                      int *counters, float *out, const float *nw, float *xw, float2 *stats)
{
    auto kernel = attention_decode_kernel<HD, KV, TILED>;
    const size_t smem = tile_shape<HD, KV>::smem(ag.tbt * (n_head / n_head_kv));
    const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    if (e != cudaSuccess)
        return e;
    return launch_k_smem(kernel, dim3((unsigned)n_head_kv, (unsigned)ag.splits, (unsigned)ag.ntb), dim3(kThreads),
                         smem, st, qkv, n_head, n_head_kv, static_cast<const KV *>(k_cache),
                         static_cast<const KV *>(v_cache), pos, scale, partial, counters, out, nw, xw, stats, ag.n_tok,
                         ag.tbt, ag.q_stride, ag.o_stride, ag.fresh);
}

int32_t attention_decode_splits(int32_t n_ctx)
{
    const int32_t tiles = (n_ctx + kTile - 1) / kTile;
    return tiles < kAttnMaxSplit ? tiles : kAttnMaxSplit;
}

#define ATT_ARGS ag, n_head, n_head_kv, st, qkv, k_cache, v_cache, pos, scale, partial, counters, out, nw, xw, stats
/* tiled (several tokens per block): the f16 cache only (the f32 prefill keeps its own kernel);
 * an f32 tiled call matches no case */
cudaError_t launch_any(int head_dim, bool kv_f32, const att_grid &ag, int n_head, int n_head_kv, cudaStream_t st,
                       const float *qkv, const void *k_cache, const void *v_cache, const int32_t *pos, float *partial,
                       int *counters, float *out, const float *nw, float *xw, float2 *stats)
{
    const float scale = (float)(1.0 / sqrt((double)head_dim));
    const bool tiled = ag.tbt > 1 || ag.n_tok > 1;
    switch (head_dim * (kv_f32 ? -1 : 1) * (tiled ? 1000 : 1)) {
    case 32: return launch_hd<32, __half, false>(ATT_ARGS);
    case 64: return launch_hd<64, __half, false>(ATT_ARGS);
    case 128: return launch_hd<128, __half, false>(ATT_ARGS);
    case 256: return launch_hd<256, __half, false>(ATT_ARGS);
    case -32: return launch_hd<32, float, false>(ATT_ARGS);
    case -64: return launch_hd<64, float, false>(ATT_ARGS);
    case -128: return launch_hd<128, float, false>(ATT_ARGS);
    case -256: return launch_hd<256, float, false>(ATT_ARGS);
    case 32000: return launch_hd<32, __half, true>(ATT_ARGS);
    case 64000: return launch_hd<64, __half, true>(ATT_ARGS);
    case 128000: return launch_hd<128, __half, true>(ATT_ARGS);
    case 256000: return launch_hd<256, __half, true>(ATT_ARGS);
    default: return cudaErrorInvalidValue;
    }
}
#undef ATT_ARGS

bool head_dim_ok(int32_t head_dim) { return head_dim == 32 || head_dim == 64 || head_dim == 128 || head_dim == 256; }

} // namespace

int32_t launch_attention_decode(const float *qkv, int32_t n_head, int32_t n_head_kv, int32_t head_dim,
                                const void *k_cache, const void *v_cache, bool kv_f32, const int32_t *pos,
                                int32_t n_ctx, float *partial, int *counters, float *out, cudaStream_t st,
                                const float *nw, float *xw, float2 *stats)
{
    if (n_head_kv < 1 || n_head % n_head_kv != 0 || n_head / n_head_kv > kMaxGroup)
        return tern_fail(TERN_ERR_UNSUPPORTED, "cuda decode attention: %d heads over %d KV heads", n_head, n_head_kv);
    if (stats && (!nw || !xw))
        return tern_fail(TERN_ERR_INVALID, "cuda decode attention: statistics without their buffers");
    if (!head_dim_ok(head_dim))
        return tern_fail(TERN_ERR_UNSUPPORTED, "cuda decode attention: head_dim %d is not 32, 64, 128 or 256", head_dim);
    const att_grid ag = {1, 1, 1, attention_decode_splits(n_ctx), 0, 0, false};
    const cudaError_t err = launch_any(head_dim, kv_f32, ag, n_head, n_head_kv, st, qkv, k_cache, v_cache, pos,
                                       partial, counters, out, nw, xw, stats);
    if (err != cudaSuccess)
        return tern_fail(TERN_ERR_UNSUPPORTED, "cuda: launching decode attention: %s", cudaGetErrorString(err));
    return TERN_OK;
}

int32_t launch_attention_tiled(const float *qkv, int32_t n, int32_t n_head, int32_t n_head_kv, int32_t head_dim,
                               const void *k_cache, const void *v_cache, const int32_t *pos, int32_t first_pos,
                               float *partial, int64_t partial_floats, int *counters, int64_t n_counters, float *out,
                               cudaStream_t st)
{
    if (n < 1 || n_head_kv < 1 || n_head % n_head_kv != 0 || n_head / n_head_kv > kMaxGroup || !head_dim_ok(head_dim))
        return tern_fail(TERN_ERR_UNSUPPORTED, "cuda tiled attention: %d tokens, %d heads over %d KV heads of %d",
                         n, n_head, n_head_kv, head_dim);
    const int hpg = n_head / n_head_kv, tbt = kMaxGroup / hpg, ntb = (n + tbt - 1) / tbt;
    const int64_t cmax = (int64_t)tbt * hpg, stride = ((2 * cmax + 3) & ~3) + cmax * head_dim;
    /* splits: every block at most kPrefillTiles tiles, blocks enough for two per SM (132-SM
       H100), within the partials buffer */
    constexpr int kPrefillTiles = 8, kWantBlocks = 264;
    const int tiles = (first_pos + n + kTile - 1) / kTile, units = ntb * n_head_kv;
    int splits = (tiles + kPrefillTiles - 1) / kPrefillTiles;
    if (splits * units < kWantBlocks)
        splits = (kWantBlocks + units - 1) / units;
    const int64_t room = partial_floats / ((int64_t)units * stride);
    splits = splits < tiles ? splits : tiles;
    splits = splits < kAttnMaxSplit ? splits : kAttnMaxSplit;
    splits = splits < room ? splits : (int)room;
    if (splits < 1 || units > n_counters)
        return tern_fail(TERN_ERR_UNSUPPORTED, "cuda tiled attention: %d tokens do not fit its buffers", n);
    const int64_t e = (int64_t)n_head * head_dim;
    const att_grid ag = {n, tbt, ntb, splits, e + 2 * (int64_t)n_head_kv * head_dim, e, true};
    const cudaError_t err = launch_any(head_dim, false, ag, n_head, n_head_kv, st, qkv, k_cache, v_cache, pos,
                                       partial, counters, out, NULL, NULL, NULL);
    if (err != cudaSuccess)
        return tern_fail(TERN_ERR_UNSUPPORTED, "cuda: launching tiled attention: %s", cudaGetErrorString(err));
    return TERN_OK;
}
