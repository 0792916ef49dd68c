/* The decode GEMV with its neighbours fused in: for q|k|v each warp takes the row pair
 * (i, i + head_dim/2) of one head, so the epilogue rotates it (RoPE) and stores k and v in the
 * cache; for gate|up it takes gate rows and their up rows and writes act(gate) * up.
 *
 * Every block first loads its weight rows (they do not depend on earlier kernels: with
 * programmatic dependent launch these loads overlap the previous kernel), then waits for its
 * input: int8 from norm_quant_kernel (prefill-shaped callers, kernel tests, and decode with
 * TERN_CUDA_FUSED_NORM=0), or in decode by default the vector times its norm weights plus the
 * producer's per-block partial statistics, quantized here by every block (quantize_block).
 * An earlier attempt normalized inside every block with the norm's own block-wide reductions
 * (470 vs 605 tokens/s: every block paid their latency); with the statistics precomputed by
 * the producers the block only sums a few hundred partials and quantizes element-wise
 * (H100: ~750 against ~645 tokens/s with the norm kernels, docs/CUDA.md). */
#include "common.cuh"

namespace {

constexpr int kWarps = 4, kThreads = kWarps * 32; /* small blocks: 2560-row matrices still cover every SM */

__device__ __forceinline__ void put(void *cache, bool f32, int64_t at, float v)
{
    if (f32)
        static_cast<float *>(cache)[at] = v;
    else
        static_cast<__half *>(cache)[at] = __float2half_rn(v);
}

enum { MODE_PLAIN = 0, MODE_ROPE = 1, MODE_GLU = 2 };

/* Rows of one warp (a unit) */
__host__ __device__ constexpr int warp_rows(int mode)
{
    return mode == MODE_GLU ? 4 : 2;
}

/* Rows of warp `unit`: PLAIN 2 consecutive rows; ROPE (i, i + head_dim/2) of one head; GLU gate
 * rows 2u, 2u+1 and their up rows n_ff + 2u, n_ff + 2u + 1. */
template <int MODE>
__device__ __forceinline__ int64_t row_of(const fused_gemv &a, int64_t unit, int r)
{
    if (MODE == MODE_ROPE) {
        const int half = a.head_dim / 2;
        return (unit / half) * a.head_dim + unit % half + r * half;
    }
    if (MODE == MODE_GLU)
        return (r >= 2 ? a.rows / 2 : 0) + 2 * unit + (r & 1);
    return 2 * unit + r;
}

/* Whether row r of the unit (row_of) exists: a GLU unit's gate and up rows exist together */
template <int MODE>
__device__ __forceinline__ bool row_valid(const fused_gemv &a, int64_t unit, int r, int64_t row)
{
    return MODE == MODE_GLU ? 2 * unit + (r & 1) < a.rows / 2 : row < a.rows;
}

/* Byte offset of input n (a multiple of 4) in the block's shared copy of its int8 input: group g
 * of every chunk together (g * nchunks * 16 + chunk * 16), so that the lanes of a warp, reading
 * group g of chunks lane + 32 c, read contiguous bytes. In natural order (input n at byte n),
 * group g of chunk ch sits at 128 (ch >> 1) + 32 g + 16 (ch & 1): every 16-byte read of a warp
 * was a 4-way shared-memory bank conflict (H100, three alternated rounds: GPU step 832.9-835.8 us
 * against 858.8-862.8). */
__device__ __forceinline__ int xs_offset(int n, int nchunks)
{
    const int ch = ((n >> 7) << 1) | ((n >> 4) & 1), g = (n >> 5) & 3;
    return g * nchunks * 16 + ch * 16 + (n & 15);
}

/* Fused-norm input (a.in_xw): the scale of the normalized vector from the producer's partials,
 * then every element of in_xw quantized into the block's shared memory. The block sums the
 * partials in a fixed order (thread t takes t, t + 128, ... in batches of loads in flight, then
 * the warp butterfly, then the warps in order), so every block gets the same bits. (A warp
 * summing all partials itself needed one dependent L2 round trip per 32 partials, 27 for the 864
 * of gate|up that down sums; with all of a lane's loads in flight and no barrier, for up to 320
 * partials, it was still slower: docs/CUDA.md, eighth session.)
 * rms = sqrt(sum v^2 / n + eps) as ops.c; the normalized value is (v w) * (1/rms), so
 * amax = max |v w| * (1/rms) is its exact maximum (multiplication is monotonic); the CPU
 * computes v / rms * w, so values differ from it in the last bit. Returns the scale; qpart[w]:
 * sum(q) over warp w's values, for the codes' offset (summed here once per block, not per chunk
 * in every warp's dot products; read in the epilogue, so no register holds it meanwhile). */
template <int V>
__device__ __forceinline__ float quantize_block(const fused_gemv &a, int8_t *xs, int *qpart)
{
    int mine = 0; /* sum(q) of this thread's values */
    constexpr int B = V > 8 ? 8 : 4; /* partials per thread and batch (2B4T: one batch each) */
    __shared__ float2 part[kWarps];
    const int lane = threadIdx.x & 31, n4 = a.width / 4;
    const float4 *src = reinterpret_cast<const float4 *>(a.in_xw);
    auto load_parts = [&](int base, float2 (&p)[B]) {
#pragma unroll
        for (int j = 0; j < B; j++) {
            const int i = base + threadIdx.x + j * kThreads;
            p[j] = i < a.in_nparts ? a.in_stats[i] : make_float2(0.0f, 0.0f);
        }
    };
    /* the partials' first batch, then the input's first values (they do not depend on the
     * statistics): all in flight together, the partials first since they are needed first
     * (H100, three alternated rounds: GPU step 871.9-876.1 us against 883.9-886.9 with the
     * input's loads issued first) */
    float2 p[B];
    load_parts(0, p);
    float4 v[V];
#pragma unroll
    for (int j = 0; j < V; j++) {
        const int i = threadIdx.x + j * kThreads;
        v[j] = i < n4 ? src[i] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    }
    float ss = 0.0f, mx = 0.0f;
    for (int base = 0;;) { /* thread t sums partials t, t + 128, ... in order, whatever B */
#pragma unroll
        for (int j = 0; j < B; j++) {
            ss = __fadd_rn(ss, p[j].x);
            mx = fmaxf(mx, p[j].y);
        }
        base += kThreads * B;
        if (base >= a.in_nparts)
            break;
        load_parts(base, p);
    }
    for (int o = 16; o > 0; o >>= 1) {
        ss = __fadd_rn(ss, __shfl_xor_sync(0xffffffffu, ss, o));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    }
    if (lane == 0)
        part[threadIdx.x / 32] = make_float2(ss, mx);
    __syncthreads();
    ss = part[0].x;
    mx = part[0].y;
#pragma unroll
    for (int w = 1; w < kWarps; w++) {
        ss = __fadd_rn(ss, part[w].x);
        mx = fmaxf(mx, part[w].y);
    }
    const float inv = __frcp_rn(sqrtf(__fadd_rn(__fdiv_rn(ss, (float)a.width), a.eps)));
    const float amax = __fmul_rn(mx, inv);
    const float s = __fdiv_rn(127.0f, amax > 1e-5f ? amax : 1e-5f);
    for (int base = threadIdx.x; base < n4; base += kThreads * V) {
        if (base != threadIdx.x) /* later batches: V loads in flight */
#pragma unroll
            for (int j = 0; j < V; j++) {
                const int i = base + j * kThreads;
                v[j] = i < n4 ? src[i] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            }
#pragma unroll
        for (int j = 0; j < V; j++) {
            const int i = base + j * kThreads;
            if (i >= n4)
                break;
            const float f[4] = {v[j].x, v[j].y, v[j].z, v[j].w};
            int q[4];
#pragma unroll
            for (int k = 0; k < 4; k++)
                q[k] = round_sat_s8(__fmul_rn(__fmul_rn(f[k], inv), s));
            const uint32_t packed =
                __byte_perm(__byte_perm(q[0], q[1], 0x0040), __byte_perm(q[2], q[3], 0x0040), 0x5410);
            *reinterpret_cast<uint32_t *>(xs + xs_offset(4 * i, a.nchunks)) = packed;
            mine = __dp4a((int)packed, 0x01010101, mine);
        }
    }
    mine = __reduce_add_sync(0xffffffffu, mine);
    if (lane == 0)
        qpart[threadIdx.x / 32] = mine;
    __syncthreads();
    return s;
}

/* dp4a of unsigned bytes (masked codes, up to 0xC0) and signed inputs. The codes of group g of a
 * chunk sit at bits 7-6 (g = 0), ..., 1-0 (g = 3) of every byte: masked without the shift they
 * are code * 4^(3 - g), so each group keeps its own sum, scaled back exactly at the end (every
 * term is a multiple): two instructions per four weights instead of three (mask, shift, dp4a).
 * H100, same machine, two rounds: decode GPU step 1,063 -> 1,038 us, gate|up 6.9 -> 6.1 us. */
__device__ __forceinline__ int dp4a_us(uint32_t a, int b, int c)
{
    int d;
    asm("dp4a.u32.s32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}

/* sum(code * x) over one 16-byte chunk of T2 codes (w + 1) and its 64 inputs, exact */
__device__ __forceinline__ int32_t dot_chunk(const uint4 &w, const int (&xr)[16])
{
    const uint32_t words[4] = {w.x, w.y, w.z, w.w};
    int g0 = 0, g1 = 0, g2 = 0, g3 = 0;
#pragma unroll
    for (int i = 0; i < 4; i++) {
        g0 = dp4a_us(words[i] & 0xC0C0C0C0u, xr[i], g0);
        g1 = dp4a_us(words[i] & 0x30303030u, xr[4 + i], g1);
        g2 = dp4a_us(words[i] & 0x0C0C0C0Cu, xr[8 + i], g2);
        g3 = dp4a_us(words[i] & 0x03030303u, xr[12 + i], g3);
    }
    return (g0 >> 6) + (g1 >> 4) + (g2 >> 2) + g3;
}

/* Blocks per SM the register budget is sized for: 8 where the grid needs them (2B4T: gate|up
 * 864 blocks), fewer where the input quantization (NQ) or long rows need registers to keep
 * the loads in flight without spilling (down: 320 blocks, 2.4 per SM of an H100). */
template <int NCH, int MODE, bool NQ>
constexpr int min_blocks()
{
    return NCH > 2 && (MODE == MODE_GLU || NQ) ? 4 : NQ ? (MODE == MODE_GLU ? 7 : 6) : 8;
}

/* NCH: chunks of a row per lane, rounded up. TAIL1: the last, partial round of chunks (rem of
 * them, rem * R <= 32) is spread over the lanes, one (row, chunk) pair each, instead of taking a
 * round of its own for all R rows with the lanes past rem idle: 2B4T's 40-chunk rows left 24 of
 * 32 lanes idle in a whole second round (H100, four alternated rounds: GPU step 809.3-811.9 us
 * against 821.9-831.9). Fused-norm input only (kernel_for). */
template <int NCH, int MODE, bool NQ, bool TAIL1>
__global__ void __launch_bounds__(kThreads, min_blocks<NCH, MODE, NQ>()) gemv_t2_fused_kernel(const fused_gemv a)
{
    constexpr int R = warp_rows(MODE);
    /* NQ: the int8 input, quantized by this block (kFusedNormMaxWidth bytes) */
    __shared__ __align__(16) int8_t xs[NQ ? kFusedNormMaxWidth : 16];
    __shared__ int qpart[kWarps];
    const int lane = threadIdx.x & 31;
    const int64_t unit = (int64_t)blockIdx.x * kWarps + threadIdx.x / 32;
    int64_t row[R];
    bool valid[R];
#pragma unroll
    for (int r = 0; r < R; r++) {
        row[r] = row_of<MODE>(a, unit, r);
        valid[r] = row_valid<MODE>(a, unit, r, row[r]);
    }
    const int64_t rbytes = (int64_t)a.nchunks * 16;
    constexpr int T = TAIL1 ? NCH - 1 : NCH; /* rounds with every row's chunk lane + 32 c */
    uint4 wv[R][T > 0 ? T : 1];
#pragma unroll
    for (int r = 0; r < R; r++)
#pragma unroll
        for (int c = 0; c < T; c++) {
            const int ch = lane + c * 32;
            wv[r][c] = make_uint4(0x55555555u, 0x55555555u, 0x55555555u, 0x55555555u);
            if (valid[r] && ch < a.nchunks)
                wv[r][c] = __ldcs(reinterpret_cast<const uint4 *>(a.w + row[r] * rbytes + ch * 16));
        }
    /* TAIL1: this lane's pair of the last round, row tr (R: none) and chunk tail_ch */
    const int rem = a.nchunks - 32 * T, tr = TAIL1 ? lane / rem : R, tail_ch = 32 * T + lane - tr * rem;
    uint4 wt = make_uint4(0x55555555u, 0x55555555u, 0x55555555u, 0x55555555u);
    if (TAIL1 && tr < R) {
        const int64_t rw = row_of<MODE>(a, unit, tr);
        if (row_valid<MODE>(a, unit, tr, rw))
            wt = __ldcs(reinterpret_cast<const uint4 *>(a.w + rw * rbytes + tail_ch * 16));
    }
    /* a producer's next-norm weights of its outputs are constant too: before the wait (only the
     * fused-norm step produces, and it always consumes that way too: the plain kernels stay as
     * they were) */
    const bool produce = NQ && a.out_stats != nullptr;
    float onw[2] = {0.0f, 0.0f};
    if (produce && lane == 0)
#pragma unroll
        for (int r = 0; r < 2; r++) {
            const int64_t o = MODE == MODE_GLU ? 2 * unit + r : row[r];
            if (valid[r])
                onw[r] = a.out_nw[o];
        }
    /* so are the rows' scales and, for q|k|v, the RoPE factors at this step's position (uploaded
     * before the step): the epilogue then waits on no load that could have been issued earlier
     * (H100: each was an L2 round trip on every GEMV's critical path) */
    __shared__ float scs[kWarps][R]; /* the warp's row scales (shared memory: no register held) */
#pragma unroll
    for (int r = 0; r < R; r++)
        if (lane == r)
            scs[threadIdx.x / 32][r] = valid[r] && a.epi != EPI_RAW ? a.scale[row[r]] : 0.0f;
    float rc = 0.0f, rs = 0.0f;
    int64_t pos = 0;
    if (MODE == MODE_ROPE && lane == 0 && valid[0]) {
        pos = __ldcg(a.pos);
        if (row[0] / a.head_dim < a.n_head + a.n_head_kv) { /* q or k rows */
            const int half = a.head_dim / 2;
            rc = a.rope_cos[pos * half + unit % half];
            rs = a.rope_sin[pos * half + unit % half];
        }
    }
    /* The release comes after the scales' store, which waits for their loads, issued behind the
     * weight rows: the successor launches about when this warp's rows have arrived. That timing
     * is measured, not incidental (H100, ninth session): the scales by cp.async, so the release
     * came at once, GPU step 839.8-847.1 us against 836.3-838.0; the release after the input
     * stage, 947.9-949.7 against 823.8-829.0. */
    if (a.early)
        grid_launch_dependents();
    grid_wait(); /* the input comes from the previous kernel */
    /* the residual a wo/down adds to: final once the predecessor has completed; loaded now, with
     * the input */
    float prv = 0.0f; /* lane r < R: row r's */
#pragma unroll
    for (int r = 0; r < R; r++)
        if (MODE == MODE_PLAIN && lane == r && valid[r] && a.epi == EPI_ADD)
            prv = a.out[row[r]];
    const int8_t *qs;
    float s;
    int sum = 0;
    if (NQ) {
        /* float4 loads in flight per thread: all of a 2560- or 6912-wide input at once, so the
         * second half of down's input no longer waits for the statistics (H100, docs/CUDA.md);
         * gate|up of wider models half (more would spill its registers). Every thread of the
         * block takes part. */
        s = quantize_block<(NCH > 2 ? (MODE == MODE_GLU ? 8 : 14) : 5)>(a, xs, qpart);
        qs = xs;
    } else {
        qs = a.xq;
        s = a.meta->s;
        sum = a.meta->sum;
    }
    /* a producer's block reduces its partial at the end (a barrier): no warp leaves early then */
    if (!valid[0] && !produce)
        return;
    int32_t acc[R];
#pragma unroll
    for (int r = 0; r < R; r++)
        acc[r] = 0;
    auto load_input = [&](int ch, int (&xr)[16]) {
#pragma unroll
        for (int g = 0; g < 4; g++) {
            /* the block's copy (xs_offset), or the norm kernel's output in natural order (through
             * L1: staging that in the permuted layout too was no faster, docs/CUDA.md) */
            const int4 v = *reinterpret_cast<const int4 *>(
                qs + (NQ ? g * a.nchunks * 16 + ch * 16 : (ch >> 1) * 128 + g * 32 + (ch & 1) * 16));
            xr[g * 4 + 0] = v.x; xr[g * 4 + 1] = v.y; xr[g * 4 + 2] = v.z; xr[g * 4 + 3] = v.w;
        }
    };
#pragma unroll
    for (int c = 0; c < T; c++) {
        const int ch = lane + c * 32;
        if (ch >= a.nchunks)
            continue;
        int xr[16];
        load_input(ch, xr);
#pragma unroll
        for (int r = 0; r < R; r++)
            acc[r] += dot_chunk(wv[r][c], xr);
    }
    if (TAIL1 && tr < R) {
        int xr[16];
        load_input(tail_ch, xr);
        const int32_t d = dot_chunk(wt, xr);
#pragma unroll
        for (int r = 0; r < R; r++)
            acc[r] += tr == r ? d : 0;
    }
#pragma unroll
    for (int r = 0; r < R; r++)
        for (int o = 16; o > 0; o >>= 1)
            acc[r] += __shfl_xor_sync(0xffffffffu, acc[r], o);
    __syncwarp();
    float sc[R], prev[R];
#pragma unroll
    for (int r = 0; r < R; r++) {
        sc[r] = scs[threadIdx.x / 32][r];
        prev[r] = __shfl_sync(0xffffffffu, prv, r);
    }
    float ss = 0.0f, mx = 0.0f; /* a producer's statistics of the values this warp writes */
    if (lane == 0 && valid[0]) {
        if (NQ)
#pragma unroll
            for (int w = 0; w < kWarps; w++)
                sum += qpart[w];
        float y[R];
#pragma unroll
        for (int r = 0; r < R; r++)
            y[r] = valid[r] && a.epi != EPI_RAW ? __fmul_rn(__fdiv_rn((float)(acc[r] - sum), s), sc[r])
                                                : 0.0f;
        if (MODE == MODE_PLAIN) {
#pragma unroll
            for (int r = 0; r < R; r++) {
                if (!valid[r])
                    continue;
                if (a.epi == EPI_RAW) { /* the exact dot product (kernel tests) */
                    reinterpret_cast<int32_t *>(a.out)[row[r]] = acc[r] - sum;
                    continue;
                }
                const float v = a.epi == EPI_ADD ? __fadd_rn(prev[r], y[r]) : y[r];
                a.out[row[r]] = v;
                if (produce) {
                    const float vw = __fmul_rn(v, onw[r]);
                    a.out_xw[row[r]] = vw;
                    ss = __fadd_rn(ss, __fmul_rn(v, v));
                    mx = fmaxf(mx, fabsf(vw));
                }
            }
        } else if (MODE == MODE_GLU) { /* act(gate) * up, as the CPU decoder: ffn = act(g); ffn *= u */
#pragma unroll
            for (int r = 0; r < 2; r++)
                if (valid[r]) {
                    const float v = __fmul_rn(act(y[r], a.relu2), y[r + 2]);
                    a.out[2 * unit + r] = v;
                    if (produce) {
                        const float vw = __fmul_rn(v, onw[r]);
                        a.out_xw[2 * unit + r] = vw;
                        ss = __fadd_rn(ss, __fmul_rn(v, v));
                        mx = fmaxf(mx, fabsf(vw));
                    }
                }
        } else {
            const int half = a.head_dim / 2;
            const int64_t head = row[0] / a.head_dim;
            const int64_t e = (int64_t)a.n_head * a.head_dim, kv_dim = (int64_t)a.n_head_kv * a.head_dim;
            float ya = y[0], yb = y[1];
            if (head < a.n_head + a.n_head_kv) { /* q or k: NeoX rotate-half */
                const float y1 = __fsub_rn(__fmul_rn(ya, rc), __fmul_rn(yb, rs));
                const float y2 = __fadd_rn(__fmul_rn(yb, rc), __fmul_rn(ya, rs));
                ya = y1;
                yb = y2;
            }
            a.out[row[0]] = ya;
            a.out[row[1]] = yb;
            if (head >= a.n_head) {
                const bool is_k = head < a.n_head + a.n_head_kv;
                const int64_t off = row[0] - e - (is_k ? 0 : kv_dim);
                void *cache = is_k ? a.k_cache : a.v_cache;
                put(cache, a.kv_f32, pos * kv_dim + off, ya);
                put(cache, a.kv_f32, pos * kv_dim + off + half, yb);
            }
        }
    }
    if (!produce)
        return;
    /* one partial per block, its warps in order: the consumer sums the blocks' partials in a
     * fixed order, so the result is deterministic (no atomics) */
    __shared__ float2 red[kWarps];
    if (lane == 0)
        red[threadIdx.x / 32] = make_float2(ss, mx);
    __syncthreads();
    if (threadIdx.x == 0) {
        float2 p = red[0];
#pragma unroll
        for (int w = 1; w < kWarps; w++) {
            p.x = __fadd_rn(p.x, red[w].x);
            p.y = fmaxf(p.y, red[w].y);
        }
        a.out_stats[blockIdx.x] = p;
    }
}

using fused_kernel = void (*)(fused_gemv);

template <int MODE, bool NQ, bool TAIL1>
fused_kernel kernel_for(int per)
{
    return per == 1 ? gemv_t2_fused_kernel<1, MODE, NQ, TAIL1> : per == 2 ? gemv_t2_fused_kernel<2, MODE, NQ, TAIL1>
         : per == 3 ? gemv_t2_fused_kernel<3, MODE, NQ, TAIL1> : gemv_t2_fused_kernel<4, MODE, NQ, TAIL1>;
}

/* The spread tail only with the fused-norm input (in shared memory): reading the plain input from
 * global memory, the tail's own input read cost more than the idle lanes (H100, per-shape chain:
 * gate|up 6.65 against 6.42 us). */
template <int MODE>
fused_kernel kernel_for(int per, bool tail1, const fused_gemv &a)
{
    if (!a.in_xw)
        return kernel_for<MODE, false, false>(per);
    return tail1 ? kernel_for<MODE, true, true>(per) : kernel_for<MODE, true, false>(per);
}

} // namespace

int32_t launch_gemv_t2(const dmat &m, const int8_t *xq, const act_meta *meta, void *out, int epi,
                       cudaStream_t st)
{
    if (m.cols % 128 != 0)
        return tern_fail(TERN_ERR_UNSUPPORTED, "cuda gemv_t2: k=%lld is not a multiple of 128", (long long)m.cols);
    fused_gemv a = {};
    a.w = m.w; a.rows = m.rows; a.nchunks = (int32_t)(m.cols / 64); a.scale = m.scale;
    a.out = static_cast<float *>(out); a.epi = epi; a.xq = xq; a.meta = meta; a.width = (int)m.cols;
    return launch_gemv_t2_fused(a, st);
}

int64_t gemv_t2_fused_blocks(const fused_gemv &a)
{
    const int64_t units = a.glu ? a.rows / 4 : (a.rows + 1) / 2;
    return (units + kWarps - 1) / kWarps;
}

int32_t launch_gemv_t2_fused(const fused_gemv &a, cudaStream_t st)
{
    const int mode = a.rope ? MODE_ROPE : a.glu ? MODE_GLU : MODE_PLAIN;
    const bool input_ok = a.in_xw ? a.in_stats && a.in_nparts > 0 && a.width <= kFusedNormMaxWidth : a.xq && a.meta;
    const bool output_ok = !a.out_stats || (a.in_xw && a.out_xw && a.out_nw && mode != MODE_ROPE &&
                                            (mode == MODE_GLU || a.epi != EPI_RAW));
    if (a.width % 128 != 0 || !input_ok || !output_ok || (mode == MODE_ROPE && a.rows % a.head_dim != 0) ||
        (mode == MODE_GLU && a.rows % 4 != 0))
        return tern_fail(TERN_ERR_UNSUPPORTED, "cuda fused gemv: width %d / rows %lld not supported", a.width,
                         (long long)a.rows);
    const int per = (a.nchunks + 31) / 32;
    if (per < 1 || per > 4)
        return tern_fail(TERN_ERR_UNSUPPORTED, "cuda fused gemv: %d chunks per lane", per);
    const int rem = a.nchunks - 32 * (per - 1);
    const bool tail1 = rem * warp_rows(mode) <= 32; /* the last round's pairs fit one per lane */
    const fused_kernel k = mode == MODE_ROPE ? kernel_for<MODE_ROPE>(per, tail1, a)
                         : mode == MODE_GLU  ? kernel_for<MODE_GLU>(per, tail1, a)
                                             : kernel_for<MODE_PLAIN>(per, tail1, a);
    LAUNCH("fused gemv", k, dim3((unsigned)gemv_t2_fused_blocks(a)), dim3(kThreads), st, a);
    return TERN_OK;
}
