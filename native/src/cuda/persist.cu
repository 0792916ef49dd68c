/* The persistent decode step (TERN_CUDA_PERSISTENT=1; not the default): every layer of one
 * token in one cooperative launch (one block per SM), phases separated by grid barriers, the
 * ternary weights streamed into shared memory a layer ahead of their use.
 *
 * Why it was tried: with one kernel per operation decode is bound by the chain of ~10
 * dependent launches per layer, with HBM busy 18% of the time. Here each block owns a fixed
 * slice of the rows of every matrix; the slice of layer l+1 is requested as soon as layer l's
 * dot products have read the slot, so the weight bytes stream while the barriers, norms and
 * attention of the layer run, and a GEMV phase reads its weights from shared memory. The
 * RMSNorm + int8 quantization of a phase's input is computed by every block from L2 (2560 or
 * 6912 floats) instead of by a separate kernel. Measured on H100s it is no faster than the
 * graph of per-operation kernels (4% slower to a tie; docs/CUDA.md: each phase is a chain of
 * block-wide and grid-wide synchronizations with 16 warps per SM, ~6-10 us per GEMV phase and
 * ~13 us for attention), so it stays opt-in.
 *
 * Per layer: q|k|v (RoPE, KV store) | attention (split over the blocks; the last block of a KV
 * group merges) | wo (+= x) | gate|up (act(gate) * up) | down (+= x); "|" is a grid barrier.
 * Arithmetic as the one-kernel-per-operation path (gemv_fused.cu, ops.cu); sums are tree
 * reductions in another order, so floats differ in the last bits. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "attend.cuh"
#include "persist.h"

namespace {

constexpr int kThreads = 512, kWarps = kThreads / 32;
constexpr int kBatch = 8; /* attention positions per warp step */
constexpr int kWarpPositions = 2 * kBatch; /* attention positions per warp at most, while splits last */

/* Weight slots are filled by the TMA unit (cp.async.bulk, one copy per row) and completed on
 * an mbarrier per slot, so the copies do not occupy the SM's load queue ahead of each phase's
 * latency-bound loads (16-byte cp.async per lane measured the same or slower). sm_90 only:
 * the persistent path is not used below compute capability 9.0. */
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
__device__ __forceinline__ unsigned smem_addr(const void *p) { return (unsigned)__cvta_generic_to_shared(p); }
#endif

__device__ __forceinline__ void mbar_init(uint64_t *bar)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(smem_addr(bar)) : "memory");
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
#else
    __trap();
#endif
}

__device__ __forceinline__ void mbar_expect(uint64_t *bar, unsigned bytes)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(bar)), "r"(bytes) : "memory");
#endif
}

__device__ __forceinline__ void mbar_wait(uint64_t *bar, unsigned parity)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    unsigned done = 0;
    do {
        asm volatile("{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }"
                     : "=r"(done) : "r"(smem_addr(bar)), "r"(parity) : "memory");
    } while (!done);
#endif
}

/* Weights are read once per token: marked evict-first in L2, so they do not push out what
 * is read again soon (the KV cache, the activations, the norm weights). */
__device__ __forceinline__ void bulk_copy(void *smem, const void *gmem, unsigned bytes, uint64_t *bar)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    uint64_t policy;
    asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1], %2, [%3], %4;"
                 ::"r"(smem_addr(smem)), "l"(gmem), "r"(bytes), "r"(smem_addr(bar)), "l"(policy) : "memory");
#endif
}

/* A slot refill: `kind` of `layer` into `slot` (w, pscale, norm: the layer table's entries,
 * loaded early); layer < 0: none. */
struct fill_req {
    int kind, layer, slot;
    const uint8_t *w;
    const float *pscale, *norm;
};

__device__ void fill_slot(const persist_args &a, char *smem, uint64_t *bars, const struct fill_req &f);
__device__ __forceinline__ unsigned fill_bytes(const persist_args &a, int kind);

/* Grid barrier on a monotonic arrival counter: the n-th barrier of a launch waits for
 * n * gridDim.x arrivals. Data written by other blocks is read after it with ld.global.cg (L1
 * is not coherent). A pending slot refill is issued meanwhile by the other threads. */
__device__ __forceinline__ void grid_sync(const persist_args &a, unsigned &target, char *smem, uint64_t *bars,
                                          struct fill_req &f)
{
    target += gridDim.x;
    __syncthreads();
    if (threadIdx.x == 0) { /* release: the block's writes (ordered by the block barrier) before the arrival */
        if (f.layer >= 0)
            mbar_expect(bars + f.slot, fill_bytes(a, f.kind));
        asm volatile("red.release.gpu.global.add.u32 [%0], 1;" ::"l"(a.bar) : "memory");
        unsigned v;
        do {
            asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(a.bar) : "memory");
        } while (v < target);
    } else if (f.layer >= 0) {
        fill_slot(a, smem, bars, f);
    }
    __syncthreads();
    f.layer = -1;
}

/* Every thread gets op over the block: one barrier (each warp then reads the 16 partials;
 * red must not be reused before the next block-wide barrier). */
template <typename T, typename Op>
__device__ __forceinline__ T block_allreduce(T v, Op op, T *red)
{
    for (int o = 16; o > 0; o >>= 1)
        v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
    if ((threadIdx.x & 31) == 0)
        red[threadIdx.x / 32] = v;
    __syncthreads();
    v = red[0];
#pragma unroll
    for (int w = 1; w < kWarps; w++)
        v = op(v, red[w]);
    return v;
}

struct add_f { __device__ float operator()(float a, float b) const { return a + b; } };
struct max_f { __device__ float operator()(float a, float b) const { return fmaxf(a, b); } };

/* Row `r` of unit u: q|k|v units are RoPE pairs (i, i + head_dim/2) of a head, gate|up units a
 * gate row and its up row, wo and down units single rows. */
__device__ __forceinline__ int64_t row_of(const persist_args &a, int kind, int u, int r)
{
    if (kind == P_QKV) {
        const int half = a.head_dim / 2;
        return (int64_t)(u / half) * a.head_dim + u % half + r * half;
    }
    if (kind == P_GU)
        return u + r * (int64_t)a.ff;
    return u;
}

/* Units of `kind` this block owns: [blockIdx.x * U, + units_here). */
__device__ __forceinline__ int units_here(const persist_args &a, int kind)
{
    const int64_t left = a.units[kind] - (int64_t)blockIdx.x * a.U[kind];
    return left <= 0 ? 0 : (int)(left < a.U[kind] ? left : a.U[kind]);
}

__device__ __forceinline__ int input_width(const persist_args &a, int kind) { return kind == P_DOWN ? a.ff : a.e; }

/* Bytes a fill of `kind`'s slot brings: this block's rows, their packed scales, the input's
 * norm weights (every block normalizes the whole input). */
__device__ __forceinline__ unsigned fill_bytes(const persist_args &a, int kind)
{
    const int nrows = units_here(a, kind) * a.R[kind];
    return (unsigned)(nrows * a.rb[kind] + (nrows ? a.sstride[kind] * 4 : 0) + input_width(a, kind) * 4);
}

/* Issues a fill: a copy per row (threads 32.., so that warp 0, whose thread 0 waits at the grid
 * barrier, stays free), the packed scales, the norm weights. Each bulk copy holds its thread
 * for about a microsecond on an H100, so fills are issued while thread 0 spins at the next grid
 * barrier (grid_sync). Thread 0 announces fill_bytes on the slot's mbarrier (the order against
 * the copies' completion does not matter: the phase needs thread 0's arrival too). A block's
 * local rows are r-major: local row r * un + i is row r of its unit i (un = units_here). */
__device__ void fill_slot(const persist_args &a, char *smem, uint64_t *bars, const fill_req &f)
{
    const int R = a.R[f.kind], rb = a.rb[f.kind], u0 = blockIdx.x * a.U[f.kind], un = units_here(a, f.kind);
    uint64_t *bar = bars + f.slot;
    char *dst = smem + a.slot_w[f.slot];
    for (int k = (int)threadIdx.x - 32; k >= 0 && k < un * R; k += kThreads - 32)
        bulk_copy(dst + k * rb, f.w + row_of(a, f.kind, u0 + k % un, k / un) * rb, (unsigned)rb, bar);
    if (threadIdx.x == kThreads - 1 && un > 0)
        bulk_copy(smem + a.slot_s[f.slot], f.pscale + (int64_t)blockIdx.x * a.sstride[f.kind],
                  (unsigned)(a.sstride[f.kind] * 4), bar);
    if (threadIdx.x == kThreads - 2)
        bulk_copy(smem + a.slot_n[f.slot], f.norm, (unsigned)(input_width(a, f.kind) * 4), bar);
}

/* RMSNorm + absmax int8 quantization of in[0, W) (written by other blocks: read from L2) into
 * xs; returns the scale s. xs is laid out [group g][16-byte chunk ch] so that the lanes reading
 * consecutive chunks of a row in dot_rows hit consecutive banks: chunk ch of a T2 row holds,
 * for g = 0..3, columns (ch/2)*128 + g*32 + (ch%2)*16 + 0..15 (native/src/layout.h). PER values
 * per thread (W <= PER * kThreads): the loops are unrolled, so PER follows W. */
template <int PER>
__device__ float norm_quant(const float *in, int W, float eps, const float *nw, int8_t *xs, float *redA,
                            float *redB)
{
    float v[PER];
#pragma unroll
    for (int j = 0; j < PER; j++) {
        const int i = threadIdx.x + j * kThreads;
        v[j] = i < W ? __ldcg(in + i) : 0.0f;
    }
    float ss = 0.0f;
#pragma unroll
    for (int j = 0; j < PER; j++)
        ss = __fadd_rn(ss, __fmul_rn(v[j], v[j]));
    ss = block_allreduce(ss, add_f(), redA);
    const float r = sqrtf(__fadd_rn(__fdiv_rn(ss, (float)W), eps));
    float amax = 0.0f;
#pragma unroll
    for (int j = 0; j < PER; j++) {
        const int i = threadIdx.x + j * kThreads;
        /* 0 / r exactly, without the division's slow path that zeros take (relu2 makes many) */
        v[j] = v[j] == 0.0f ? 0.0f : __fmul_rn(__fdiv_rn(v[j], r), i < W ? nw[i] : 0.0f);
        amax = fmaxf(amax, fabsf(v[j]));
    }
    amax = block_allreduce(amax, max_f(), redB);
    const float s = __fdiv_rn(127.0f, amax > 1e-5f ? amax : 1e-5f);
    const int gstride = W / 4; /* 16 bytes x W/64 chunks */
#pragma unroll
    for (int j = 0; j < PER; j++) {
        const int i = threadIdx.x + j * kThreads;
        if (i < W) {
            const int q = round_sat_s8(__fmul_rn(v[j], s));
            const int rem = i & 127;
            xs[(rem >> 5) * gstride + ((i >> 7) * 2 + ((rem >> 4) & 1)) * 16 + (rem & 15)] = (int8_t)q;
        }
    }
    return s;
}

/* y[k] = BitLinear of local row k: float(dot(w + 1, q) - sum(q)) / s * scale. A group of lpr
 * lanes shares a row (8 for 2560-wide rows: 40 chunks, 5 per lane, all lanes busy). Each warp
 * sums q itself (no block-wide reduction). */
__device__ void dot_rows(const char *slot, const float *scales, int nrows, int rb, const int8_t *xs, float s,
                         float *y)
{
    const int nch = rb / 16;
    const int lpr = nch <= 16 ? 4 : nch <= 64 ? 8 : 16;
    const int rpw = 32 / lpr, lane = threadIdx.x & 31, warp = threadIdx.x / 32;
    const int sub = lane / lpr, sl = lane % lpr, gstride = nch * 16;
    int sum = 0;
    const int *xw = reinterpret_cast<const int *>(xs);
    for (int i = lane; i < nch * 16; i += 32)
        sum = __dp4a(xw[i], 0x01010101, sum);
    for (int o = 16; o > 0; o >>= 1)
        sum += __shfl_xor_sync(0xffffffffu, sum, o);
    for (int base = warp * rpw; base < nrows; base += kWarps * rpw) {
        const int k = base + sub;
        int acc = 0;
        if (k < nrows) {
            const char *row = slot + k * rb;
#pragma unroll 2
            for (int ch = sl; ch < nch; ch += lpr) {
                const uint4 wv = *reinterpret_cast<const uint4 *>(row + ch * 16);
                const uint32_t words[4] = {wv.x, wv.y, wv.z, wv.w};
#pragma unroll
                for (int g = 0; g < 4; g++) {
                    const int4 xv = *reinterpret_cast<const int4 *>(xs + g * gstride + ch * 16);
                    const int xr[4] = {xv.x, xv.y, xv.z, xv.w};
#pragma unroll
                    for (int i = 0; i < 4; i++)
                        acc = __dp4a((int)((words[i] >> (6 - 2 * g)) & 0x03030303u), xr[i], acc);
                }
            }
        }
        for (int o = lpr / 2; o > 0; o >>= 1)
            acc += __shfl_xor_sync(0xffffffffu, acc, o);
        if (sl == 0 && k < nrows)
            y[k] = __fmul_rn(__fdiv_rn((float)(acc - sum), s), scales[k]);
    }
}

__device__ __forceinline__ void put(__half *p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void put(float *p, float v) { *p = v; }

/* Thread i writes this block's unit i of step `kind` from y (local rows); pre0/pre1 were
 * loaded before the barrier: x[u] (wo, down: only this thread writes it) or RoPE cos/sin. */
template <typename KV>
__device__ __forceinline__ void epilogue(const persist_args &a, int kind, int layer, int pos, const float *y,
                                         float pre0, float pre1)
{
    const int i = threadIdx.x;
    if (i >= units_here(a, kind))
        return;
    const int u = blockIdx.x * a.U[kind] + i;
    if (kind == P_GU) { /* as the CPU decoder: ffn = act(g); ffn *= u */
        a.h[u] = __fmul_rn(act(y[i], a.relu2), y[units_here(a, kind) + i]);
        return;
    }
    if (kind != P_QKV) {
        a.x[u] = __fadd_rn(pre0, y[i]);
        return;
    }
    const int half = a.head_dim / 2;
    const int64_t row0 = row_of(a, P_QKV, u, 0), head = row0 / a.head_dim;
    const int64_t e = (int64_t)a.n_head * a.head_dim, kv_dim = (int64_t)a.n_head_kv * a.head_dim;
    float ya = y[i], yb = y[units_here(a, kind) + i];
    if (head < a.n_head + a.n_head_kv) { /* q or k: NeoX rotate-half */
        const float y1 = __fsub_rn(__fmul_rn(ya, pre0), __fmul_rn(yb, pre1));
        const float y2 = __fadd_rn(__fmul_rn(yb, pre0), __fmul_rn(ya, pre1));
        ya = y1;
        yb = y2;
    }
    a.qkv[row0] = ya;
    a.qkv[row0 + half] = yb;
    if (head >= a.n_head) {
        const bool is_k = head < a.n_head + a.n_head_kv;
        KV *cache = static_cast<KV *>(is_k ? a.k_cache : a.v_cache) + (int64_t)layer * a.cache_stride;
        const int64_t at = (int64_t)pos * kv_dim + row0 - e - (is_k ? 0 : kv_dim);
        put(cache + at, ya);
        put(cache + at + half, yb);
    }
}

/* Block b takes KV group b % n_head_kv and split b / n_head_kv of the positions; its warps are
 * (q head of the group) x (a quarter of the split, for a group of 4). Each warp runs an online
 * softmax over its positions; the block merges its warps per head into partial, and the last
 * block of the group merges the splits into att. */
template <int D, typename KV>
__device__ void attention(const persist_args &a, int layer, int pos, float *sm)
{
    constexpr int HD = D * 32;
    const int nkv = a.n_head_kv, gs = a.n_head / nkv, wph = kWarps / gs;
    const int grp = blockIdx.x % nkv, sp = blockIdx.x / nkv, npos = pos + 1;
    /* as few splits as give every warp at most kWarpPositions positions (two rounds of loads,
     * from L2 after prefetch_kv): the merge below reads every split, 16 per round of loads */
    const int ns = min(a.nsplit, (npos + wph * kWarpPositions - 1) / (wph * kWarpPositions));
    if (sp >= ns)
        return;
    const int warp = threadIdx.x / 32, lane = threadIdx.x & 31, hh = warp / wph, sub = warp % wph;
    const int h = grp * gs + hh;
    const int64_t kv_dim = (int64_t)nkv * HD;
    const int pieces = ns * wph, chunk = (npos + pieces - 1) / pieces;
    const int p0 = (sp * wph + sub) * chunk, p1 = min(npos, p0 + chunk);
    const float scale = a.att_scale;
    float q[D], o[D];
#pragma unroll
    for (int i = 0; i < D; i++) {
        q[i] = __ldcg(a.qkv + (int64_t)h * HD + lane * D + i);
        o[i] = 0.0f;
    }
    float m = -INFINITY, l = 0.0f;
    const KV *kb = static_cast<const KV *>(a.k_cache) + (int64_t)layer * a.cache_stride + (int64_t)grp * HD + lane * D;
    const KV *vb = static_cast<const KV *>(a.v_cache) + (int64_t)layer * a.cache_stride + (int64_t)grp * HD + lane * D;
    warp_attend<D, kBatch, true>(q, kb, vb, kv_dim, p0, p1, scale, o, m, l);
    float *mine = sm + warp * (HD + 2); /* [m, l, o[HD]] per warp; -inf and 0 when empty */
#pragma unroll
    for (int i = 0; i < D; i++)
        mine[2 + lane * D + i] = o[i];
    if (lane == 0) {
        mine[0] = m;
        mine[1] = l;
    }
    __syncthreads();
    for (int t = threadIdx.x; t < gs * HD; t += kThreads) { /* this block's split of each head */
        const int th = t / HD, d = t % HD;
        const float *w0 = sm + th * wph * (HD + 2);
        float M = -INFINITY;
        for (int s2 = 0; s2 < wph; s2++)
            M = fmaxf(M, w0[s2 * (HD + 2)]);
        float L = 0.0f, O = 0.0f;
        for (int s2 = 0; s2 < wph; s2++) {
            const float ms = w0[s2 * (HD + 2)];
            const float f = ms == -INFINITY ? 0.0f : expf(ms - M);
            L += w0[s2 * (HD + 2) + 1] * f;
            O += w0[s2 * (HD + 2) + 2 + d] * f;
        }
        float *dst = a.partial + ((int64_t)(grp * gs + th) * ns + sp) * (HD + 2);
        dst[2 + d] = O;
        if (d == 0) {
            dst[0] = M;
            dst[1] = L;
        }
    }
    __shared__ int last;
    __syncthreads();
    if (threadIdx.x == 0) /* publishes this block's partials, and the last block sees all */
        last = arrive_acq_rel(a.counters + grp) == ns - 1;
    __syncthreads();
    if (!last)
        return;
    for (int t = threadIdx.x; t < gs * HD; t += kThreads) {
        const int th = t / HD, d = t % HD;
        const float *src = a.partial + (int64_t)(grp * gs + th) * ns * (HD + 2);
        float M = -INFINITY, L = 0.0f, O = 0.0f;
        for (int s0 = 0; s0 < ns; s0 += 16) { /* 16 splits' loads in flight, then folded */
            float ms[16], ls[16], os[16];
#pragma unroll
            for (int j = 0; j < 16; j++) {
                const bool in = s0 + j < ns;
                const float *p = src + (int64_t)(s0 + j) * (HD + 2);
                ms[j] = in ? __ldcg(p) : -INFINITY;
                ls[j] = in ? __ldcg(p + 1) : 0.0f;
                os[j] = in ? __ldcg(p + 2 + d) : 0.0f;
            }
#pragma unroll
            for (int j = 0; j < 16; j++) {
                const float mn = fmaxf(M, ms[j]);
                const float fa = M == -INFINITY ? 0.0f : expf(M - mn);
                const float fb = ms[j] == -INFINITY ? 0.0f : expf(ms[j] - mn);
                L = L * fa + ls[j] * fb;
                O = O * fa + os[j] * fb;
                M = mn;
            }
        }
        a.att[(int64_t)(grp * gs + th) * HD + d] = O / L;
    }
    if (threadIdx.x == 0)
        a.counters[grp] = 0; /* ready for the next layer */
}

/* Asks L2 for the K and V rows this warp reads in attention() of `layer` (positions before pos:
 * the row at pos is written in this layer's q|k|v step), one 128-byte line per lane, so the
 * attention's loads after the barrier hit L2 instead of HBM. */
template <int D, typename KV>
__device__ __forceinline__ void prefetch_kv(const persist_args &a, int layer, int pos)
{
    constexpr int HD = D * 32, LINES = HD * (int)sizeof(KV) / 128; /* lines per row */
    const int nkv = a.n_head_kv, gs = a.n_head / nkv, wph = kWarps / gs;
    const int grp = blockIdx.x % nkv, sp = blockIdx.x / nkv, npos = pos + 1;
    const int ns = min(a.nsplit, (npos + wph * kWarpPositions - 1) / (wph * kWarpPositions));
    if (sp >= ns || LINES < 1)
        return;
    const int warp = threadIdx.x / 32, lane = threadIdx.x & 31, sub = warp % wph;
    const int pieces = ns * wph, chunk = (npos + pieces - 1) / pieces, p0 = (sp * wph + sub) * chunk;
    const int per = 2 * LINES; /* lines per position: K and V */
    for (int i = lane; i < chunk * per; i += 32) {
        const int p = p0 + i / per, which = (i % per) / LINES, line = i % LINES;
        if (p >= pos)
            break;
        const KV *base = static_cast<const KV *>(which ? a.v_cache : a.k_cache) + (int64_t)layer * a.cache_stride +
                         (int64_t)p * nkv * HD + (int64_t)grp * HD;
        asm volatile("prefetch.global.L2::evict_last [%0];" ::"l"(reinterpret_cast<const char *>(base) + line * 128));
    }
}

/* One GEMV step: (barrier) norm + quantization of the input, the dot products from the slot,
 * the epilogue; the slot's refill with the same kind `ahead` layers on is left to the next
 * barrier. What does not depend on the other blocks (the layer table, own x values, RoPE
 * factors, L2 requests for the attention's KV rows) is loaded before the barrier; the norm
 * weights come with the slot. */
template <int PER, int D, typename KV>
__device__ __forceinline__ void run_step(const persist_args &a, char *smem, uint64_t *bars, int k, int l, int step,
                                         int ahead, int pos, unsigned &target, float *red, fill_req &pend)
{
    const int slot = step % a.slots, W = k == P_DOWN ? a.ff : a.e;
    const bool refill = l + ahead < a.n_layer;
    const uint8_t *next_w = refill ? a.layers[l + ahead].w[k] : NULL; /* table loads before the barrier */
    const float *next_s = refill ? a.layers[l + ahead].pscale[k] : NULL;
    const float *next_n = refill ? a.layers[l + ahead].norm[k] : NULL;
    float pre0 = 0.0f, pre1 = 0.0f;
    if ((int)threadIdx.x < units_here(a, k)) {
        const int u = blockIdx.x * a.U[k] + threadIdx.x, half = a.head_dim / 2;
        if (k == P_WO || k == P_DOWN) {
            pre0 = __ldcg(a.x + u);
        } else if (k == P_QKV) {
            pre0 = __ldg(a.rope_cos + (int64_t)pos * half + u % half);
            pre1 = __ldg(a.rope_sin + (int64_t)pos * half + u % half);
        }
    }
    if (k == P_QKV && a.only < 0)
        prefetch_kv<D, KV>(a, l, pos);
    if (k == P_WO && a.only < 0) {
        grid_sync(a, target, smem, bars, pend);
        attention<D, KV>(a, l, pos, reinterpret_cast<float *>(smem + a.att_off));
    }
    if (step > 0)
        grid_sync(a, target, smem, bars, pend);
    int8_t *xs = reinterpret_cast<int8_t *>(smem + a.xs_off);
    float *y = reinterpret_cast<float *>(smem + a.y_off);
    const float *in = k == P_WO ? a.att : k == P_DOWN ? a.h : a.x;
    mbar_wait(bars + slot, (unsigned)(step / a.slots) & 1u); /* the slot's fill number step / slots */
    const float *nw = reinterpret_cast<const float *>(smem + a.slot_n[slot]);
    const float s = norm_quant<PER>(in, W, a.eps, nw, xs, red, red + kWarps);
    __syncthreads(); /* xs complete */
    dot_rows(smem + a.slot_w[slot], reinterpret_cast<const float *>(smem + a.slot_s[slot]), units_here(a, k) * a.R[k],
             a.rb[k], xs, s, y);
    __syncthreads(); /* y is complete, and the slot is read: refill it at the next barrier */
    epilogue<KV>(a, k, l, pos, y, pre0, pre1);
    if (refill)
        pend = fill_req{k, l + ahead, slot, next_w, next_s, next_n};
}

/* a.only < 0: the decode step. a.only = kind: only that kind's steps of every layer (the
 * per-shape measurement), two slots. */
template <int D, typename KV>
__global__ void __launch_bounds__(kThreads, 1) decode_kernel(const persist_args a)
{
    extern __shared__ __align__(16) char smem[];
    __shared__ float red[2 * kWarps];
    __shared__ __align__(8) uint64_t bars[4];
    const int pos = *a.pos;
    const int kinds = a.only < 0 ? P_KINDS : 1, ahead = a.slots / kinds; /* layers a slot runs ahead */
    if (threadIdx.x == 0)
        for (int j = 0; j < a.slots; j++) {
            mbar_init(bars + j);
            if ((a.only < 0 ? 0 : j) < a.n_layer)
                mbar_expect(bars + j, fill_bytes(a, a.only < 0 ? j : a.only));
        }
    __syncthreads();
    for (int j = 0; j < a.slots; j++)
        if ((a.only < 0 ? 0 : j) < a.n_layer) {
            const int kind = a.only < 0 ? j : a.only, layer = a.only < 0 ? 0 : j;
            const persist_layer *L = a.layers + layer;
            fill_slot(a, smem, bars, fill_req{kind, layer, j, L->w[kind], L->pscale[kind], L->norm[kind]});
        }
    fill_req pend = {0, -1, 0, NULL, NULL, NULL};
    unsigned target = 0;
    int step = 0;
    for (int l = 0; l < a.n_layer; l++)
        for (int k = 0; k < P_KINDS; k++) {
            if (a.only >= 0 && k != a.only)
                continue;
            const int W = k == P_DOWN ? a.ff : a.e;
            if (W <= 2 * kThreads)
                run_step<2, D, KV>(a, smem, bars, k, l, step, ahead, pos, target, red, pend);
            else if (W <= 6 * kThreads)
                run_step<6, D, KV>(a, smem, bars, k, l, step, ahead, pos, target, red, pend);
            else
                run_step<16, D, KV>(a, smem, bars, k, l, step, ahead, pos, target, red, pend);
            step++;
        }
    /* the last block out resets the barrier for the next launch (every block has passed its
     * last barrier once it gets here) */
    if (threadIdx.x == 0 && atomicAdd(a.bar + 1, 1u) == gridDim.x - 1) {
        a.bar[0] = 0;
        a.bar[1] = 0;
    }
}

using kernel_fn = void (*)(persist_args);

kernel_fn pick(int head_dim, bool kv_f32)
{
    if (head_dim == 64)
        return kv_f32 ? decode_kernel<2, float> : decode_kernel<2, __half>;
    if (head_dim == 128)
        return kv_f32 ? decode_kernel<4, float> : decode_kernel<4, __half>;
    return NULL;
}

} // namespace

bool persist_enabled(void)
{
    const char *env = getenv("TERN_CUDA_PERSISTENT");
    return env && strcmp(env, "1") == 0;
}

/* Shared memory layout for `only` (< 0: decode, 4 slots, one per kind; else two slots of that
 * kind); 0 if the model's shape is not covered (the caller keeps the per-operation path). */
static size_t plan(const tern_cuda_model *m, int blocks, int only, persist_args *a)
{
    const hv_model *h = &m->hv;
    const int64_t rows[P_KINDS] = {m->qkv_dim / 2, h->n_embd, h->n_ff, h->n_embd};
    const int R[P_KINDS] = {2, 1, 2, 1};
    const int64_t cols[P_KINDS] = {h->n_embd, h->n_embd, h->n_embd, h->n_ff};
    size_t off = 0, ymax = 0;
    for (int k = 0; k < P_KINDS; k++) {
        a->units[k] = rows[k];
        a->R[k] = R[k];
        a->rb[k] = (int)(cols[k] / 4);
        a->U[k] = (int)((rows[k] + blocks - 1) / blocks);
        a->sstride[k] = (a->U[k] * R[k] + 3) / 4 * 4;
        ymax = std::max(ymax, (size_t)a->U[k] * R[k]);
    }
    a->slots = only < 0 ? P_KINDS : 2;
    for (int s = 0; s < a->slots; s++) {
        const int k = only < 0 ? s : only;
        a->slot_w[s] = (int)off;
        off += (size_t)a->U[k] * a->R[k] * (size_t)a->rb[k];
        a->slot_s[s] = (int)off;
        off += (size_t)a->sstride[k] * 4;
        a->slot_n[s] = (int)off;
        off += (size_t)cols[k] * 4; /* the input's norm weights */
    }
    const size_t width = (size_t)std::max(h->n_embd, h->n_ff);
    a->xs_off = (int)off;
    off += (width + 15) / 16 * 16;
    a->y_off = (int)off;
    off += (ymax * 4 + 15) / 16 * 16;
    a->att_off = (int)off;
    off += (size_t)kWarps * (size_t)(h->head_dim + 2) * 4;
    a->only = only;
    return off;
}

static bool shape_covered(const tern_cuda_model *m)
{
    const hv_model *h = &m->hv;
    const int gs = h->n_head_kv > 0 ? h->n_head / h->n_head_kv : 0;
    return (h->head_dim == 64 || h->head_dim == 128) && h->n_head_kv > 0 && h->n_head % h->n_head_kv == 0 &&
           gs >= 1 && kWarps % gs == 0 && h->n_embd % 128 == 0 && h->n_ff % 128 == 0 &&
           h->n_embd <= kThreads * 16 && h->n_ff <= kThreads * 16 && m->qkv_dim % 2 == 0;
}

void persist_free(persist_state *p)
{
    if (!p)
        return;
    cudaFree(p->layers);
    cudaFree(p->bar);
    cudaFree(p->pscale);
    free(p);
}

/* The kernel's arguments for session s (only < 0: decode) into *a, and its shared memory; 0
 * when the path is not available (shape, shared memory, co-residency) or fails to set up. */
static size_t fill_args(tern_cuda_session *s, const persist_state *p, int only, persist_args *a)
{
    const tern_cuda_model *m = s->m;
    const hv_model *h = &m->hv;
    memset(a, 0, sizeof *a);
    const size_t smem = plan(m, p->blocks, only, a);
    a->layers = p->layers;
    a->n_layer = h->n_layer;
    a->e = (int)h->n_embd;
    a->ff = (int)h->n_ff;
    a->n_head = h->n_head;
    a->n_head_kv = h->n_head_kv;
    a->head_dim = h->head_dim;
    a->relu2 = h->activation == TERN_ACT_RELU2;
    a->eps = h->rms_eps;
    a->att_scale = (float)(1.0 / sqrt((double)h->head_dim));
    a->x = s->x;
    a->qkv = s->qkv;
    a->h = s->h;
    a->att = s->att;
    a->partial = s->partial;
    a->counters = s->counters;
    a->bar = p->bar;
    a->rope_cos = s->rope_cos;
    a->rope_sin = s->rope_sin;
    a->pos = s->pos;
    a->k_cache = s->k_cache;
    a->v_cache = s->v_cache;
    a->cache_stride = (int64_t)s->n_ctx * m->kv_dim;
    a->nsplit = p->blocks / h->n_head_kv;
    return smem;
}

/* The layer table (weights, norms) and each matrix's row scales in block order: block b's
 * rows (its units' rows as the kernel's row_of lays them out) at pscale + b * sstride, so one
 * bulk copy brings a slot's scales. */
static int32_t pack_scales(const tern_cuda_model *m, const persist_args *a, int blocks, float *pscale,
                           persist_layer *hl)
{
    const hv_model *h = &m->hv;
    size_t most = 0, widest = 0;
    for (int kk = 0; kk < P_KINDS; kk++) {
        most = std::max(most, (size_t)(a->units[kk] * a->R[kk]));
        widest = std::max(widest, (size_t)a->sstride[kk]);
    }
    float *rowsc = (float *)malloc(most * 4), *packed = (float *)malloc((size_t)blocks * widest * 4);
    int32_t st = rowsc && packed ? TERN_OK : tern_fail(TERN_ERR_NOMEM, "out of memory");
    float *at = pscale;
    for (int32_t l = 0; st == TERN_OK && l < h->n_layer; l++) {
        const cuda_layer *L = &m->layers[l];
        const dmat *w[P_KINDS] = {&L->qkv, &L->wo, &L->gate_up, &L->down};
        float *norm[P_KINDS] = {L->attn_norm, L->attn_sub_norm, L->ffn_norm, L->ffn_sub_norm};
        for (int kk = 0; st == TERN_OK && kk < P_KINDS; kk++) {
            hl[l].w[kk] = w[kk]->w;
            hl[l].norm[kk] = norm[kk];
            hl[l].pscale[kk] = at;
            const int R = a->R[kk], U = a->U[kk], stride = a->sstride[kk];
            if (cudaMemcpy(rowsc, w[kk]->scale, (size_t)w[kk]->rows * 4, cudaMemcpyDeviceToHost) != cudaSuccess) {
                st = tern_fail(TERN_ERR_UNSUPPORTED, "cuda: persistent decode: reading scales failed");
                break;
            }
            for (int b = 0; b < blocks; b++)
                for (int k = 0; k < stride; k++) { /* local row k = r * un + i (fill_slot) */
                    const int64_t left = a->units[kk] - (int64_t)b * U;
                    const int un = left <= 0 ? 0 : (int)(left < U ? left : U);
                    const bool in = k < un * R;
                    const int64_t u = in ? (int64_t)b * U + k % un : 0;
                    const int r = in ? k / un : 0;
                    int64_t row = u;
                    if (kk == P_QKV)
                        row = (u / (h->head_dim / 2)) * h->head_dim + u % (h->head_dim / 2) + r * (h->head_dim / 2);
                    else if (kk == P_GU)
                        row = u + r * h->n_ff;
                    packed[(size_t)b * stride + k] = in ? rowsc[row] : 0.0f;
                }
            if (cudaMemcpy(at, packed, (size_t)blocks * stride * 4, cudaMemcpyHostToDevice) != cudaSuccess)
                st = tern_fail(TERN_ERR_UNSUPPORTED, "cuda: persistent decode: writing scales failed");
            at += (size_t)blocks * stride;
        }
    }
    free(rowsc);
    free(packed);
    return st;
}

int32_t persist_init(tern_cuda_session *s, persist_state **out)
{
    *out = NULL;
    const tern_cuda_model *m = s->m;
    const hv_model *h = &m->hv;
    if (!persist_enabled() || !shape_covered(m))
        return TERN_OK;
    if (!sm90_code()) /* the slots are filled by cp.async.bulk (TMA) */
        return TERN_OK;
    int dev = 0, sms = 0, coop = 0, optin = 0;
    CUDA_TRY(cudaGetDevice(&dev));
    CUDA_TRY(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
    CUDA_TRY(cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, dev));
    CUDA_TRY(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    const kernel_fn k = pick(h->head_dim, s->kv_type == TERN_KV_F32);
    persist_args a;
    persist_state probe = {};
    probe.blocks = sms;
    size_t smem = 0; /* the largest of the decode and the per-kind layouts */
    for (int only = -1; only < P_KINDS; only++)
        smem = std::max(smem, fill_args(s, &probe, only, &a));
    bool fits = true; /* the epilogue gives each unit of a block its own thread */
    for (int kk = 0; kk < P_KINDS; kk++)
        fits = fits && a.U[kk] <= kThreads;
    if (!coop || !k || !fits || sms / h->n_head_kv < 1 || smem > (size_t)optin)
        return TERN_OK;
    CUDA_TRY(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    int per_sm = 0;
    CUDA_TRY(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, k, kThreads, smem));
    if (per_sm < 1)
        return TERN_OK;
    persist_state *p = (persist_state *)calloc(1, sizeof *p);
    if (!p)
        return tern_fail(TERN_ERR_NOMEM, "out of memory");
    p->blocks = sms;
    persist_layer *hl = (persist_layer *)calloc((size_t)h->n_layer, sizeof *hl);
    int32_t st = hl ? TERN_OK : tern_fail(TERN_ERR_NOMEM, "out of memory");
    size_t per_layer = 0; /* packed scales: per kind, blocks x sstride floats */
    for (int kk = 0; kk < P_KINDS; kk++)
        per_layer += (size_t)sms * a.sstride[kk];
    const size_t total = per_layer * (size_t)h->n_layer;
    if (st == TERN_OK && (cudaMalloc((void **)&p->layers, (size_t)h->n_layer * sizeof *hl) != cudaSuccess ||
                          cudaMalloc((void **)&p->bar, 2 * sizeof(unsigned)) != cudaSuccess ||
                          cudaMalloc((void **)&p->pscale, total * 4) != cudaSuccess ||
                          cudaMemset(p->bar, 0, 2 * sizeof(unsigned)) != cudaSuccess))
        st = tern_fail(TERN_ERR_NOMEM, "cuda: persistent decode: device allocation failed");
    if (st == TERN_OK)
        st = pack_scales(m, &a, sms, p->pscale, hl);
    if (st == TERN_OK && cudaMemcpy(p->layers, hl, (size_t)h->n_layer * sizeof *hl, cudaMemcpyHostToDevice) != cudaSuccess)
        st = tern_fail(TERN_ERR_UNSUPPORTED, "cuda: persistent decode: copying the layer table failed");
    free(hl);
    if (st != TERN_OK) {
        persist_free(p);
        return st;
    }
    *out = p;
    return TERN_OK;
}

int32_t launch_persist(tern_cuda_session *s, const persist_state *p, int only)
{
    persist_args a;
    const size_t smem = fill_args(s, p, only, &a);
    const kernel_fn k = pick(s->m->hv.head_dim, s->kv_type == TERN_KV_F32);
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = (unsigned)p->blocks;
    cfg.blockDim = kThreads;
    cfg.dynamicSmemBytes = smem;
    cfg.stream = s->stream;
    cudaLaunchAttribute attr;
    attr.id = cudaLaunchAttributeCooperative; /* the barriers need every block resident */
    attr.val.cooperative = 1;
    cfg.attrs = &attr;
    cfg.numAttrs = 1;
    const cudaError_t err = cudaLaunchKernelEx(&cfg, k, a);
    if (err != cudaSuccess)
        return tern_fail(TERN_ERR_UNSUPPORTED, "cuda: launching the persistent decode: %s", cudaGetErrorString(err));
    return TERN_OK;
}
