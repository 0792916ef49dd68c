/* The best logits of a one-token step, selected on the GPU, so that a sampler with top-k (or
 * greedy) reads TERN_CUDA_TOP_K candidates instead of the whole vocabulary: the 513 kB copy of
 * a 128k-vocabulary logit vector and the host's pass over it cost more per token than the step's
 * attention of a few layers.
 *
 * Order: higher logit first, lower id first among equal logits (the CPU sampler's order). Each
 * logit and its id form one 64-bit key whose unsigned order is that order, so selection is a
 * sort of keys. A block sorts 1024 keys and keeps its best L (8 for a 128k vocabulary); the
 * last block to finish sorts the kept keys of all blocks (1024 at most) and writes the best
 * TERN_CUDA_TOP_K. The result is exact up to the first position where a block could have hidden
 * a key: every key a block dropped ranks after that block's L-th key, so the prefix of
 * candidates up to the best-ranked L-th key among the blocks that dropped keys is the
 * vocabulary's exact best (`exact`). */
#include "common.cuh"

namespace {

constexpr int kBlock = 1024;       /* keys per block in the first pass, one per thread */
constexpr int kMerge = TOP_LOGITS_SCRATCH_KEYS; /* keys the last block sorts: blocks x kept per block */
static_assert(kMerge == kBlock, "the last block sorts one key per thread");

/* float -> unsigned whose order is the floats' order; NaN lowest, -0 as +0 */
__device__ __forceinline__ uint32_t ordered(float f)
{
    if (f != f)
        return 0u;
    const uint32_t u = f == 0.0f ? 0u : __float_as_uint(f);
    return u & 0x80000000u ? ~u : u | 0x80000000u;
}

__device__ __forceinline__ float from_ordered(uint32_t o)
{
    if (o == 0u)
        return __uint_as_float(0x7fc00000u);
    return __uint_as_float(o & 0x80000000u ? o & 0x7fffffffu : ~o);
}

/* a key above every padding key (0): the low word ~id is nonzero for ids below 2^31 */
__device__ __forceinline__ uint64_t make_key(float v, int32_t id)
{
    return (uint64_t)ordered(v) << 32 | (uint32_t)~(uint32_t)id;
}

/* Sorts kBlock keys, one per thread, best (largest) first: a bitonic network. Partners closer
 * than a warp exchange by shuffle, farther ones through shared memory (two buffers used in turn:
 * one barrier per such stage). buf: 2 x kBlock keys. */
__device__ uint64_t sort_desc(uint64_t k, uint64_t *buf)
{
    const int i = threadIdx.x;
    int phase = 0;
    for (int size = 2; size <= kBlock; size <<= 1)
        for (int stride = size >> 1; stride > 0; stride >>= 1) {
            uint64_t other;
            if (stride >= 32) {
                uint64_t *b = buf + phase * kBlock;
                phase ^= 1;
                b[i] = k;
                __syncthreads();
                other = b[i ^ stride];
            } else {
                other = __shfl_xor_sync(0xffffffffu, k, stride);
            }
            const bool lower = (i & stride) == 0, desc = (i & size) == 0;
            k = lower == desc ? (k > other ? k : other) : (k < other ? k : other);
        }
    return k;
}

/* grid: ceil(n / kBlock) blocks of kBlock threads; keep: keys each block passes on (a power of
 * two, blocks x keep <= kMerge). */
__global__ void __launch_bounds__(kBlock) top_logits_kernel(const float *__restrict__ logits, int32_t n, int keep,
                                                            uint64_t *__restrict__ kept, int *__restrict__ ticket,
                                                            tern_cuda_top *__restrict__ out)
{
    __shared__ uint64_t buf[2 * kBlock];
    __shared__ unsigned long long bound;
    __shared__ int last;
    grid_wait(); /* the LM head's logits */
    const int32_t i = blockIdx.x * kBlock + threadIdx.x;
    uint64_t key = sort_desc(i < n ? make_key(__ldcg(logits + i), i) : 0u, buf);
    if (threadIdx.x < keep)
        kept[(size_t)blockIdx.x * keep + threadIdx.x] = key;
    __syncthreads();
    if (threadIdx.x == 0) {
        last = arrive_acq_rel(ticket) == (int)gridDim.x - 1;
        bound = 0u;
    }
    __syncthreads();
    if (!last)
        return;
    /* every block's kept keys; the bound: the best-ranked last kept key of a block that dropped
     * keys (it held more than `keep`) */
    const int total = (int)gridDim.x * keep;
    const int j = threadIdx.x, b = j / keep;
    key = j < total ? __ldcg(kept + j) : 0u;
    if (j < total && j % keep == keep - 1 && n - b * kBlock > keep)
        atomicMax(&bound, (unsigned long long)key);
    key = sort_desc(key, buf);
    __syncthreads(); /* bound */
    const int cap = n < TERN_CUDA_TOP_K ? n : TERN_CUDA_TOP_K;
    const int have = cap < total ? cap : total;
    if (threadIdx.x < TERN_CUDA_TOP_K) {
        const uint64_t best = threadIdx.x < have ? key : 0u;
        out->ids[threadIdx.x] = best ? (int32_t)~(uint32_t)best : -1;
        out->logits[threadIdx.x] = best ? from_ordered((uint32_t)(best >> 32)) : 0.0f;
    }
    /* exact: the candidates at or before the bound in the sorted order, i.e. those >= it */
    const int exact = __syncthreads_count(threadIdx.x < have && key >= bound);
    if (threadIdx.x == 0) {
        out->exact = exact;
        *ticket = 0; /* ready for the next launch */
    }
}

} // namespace

int32_t launch_top_logits(const float *logits, int64_t n_vocab, uint64_t *kept, int *ticket, tern_cuda_top *out,
                          cudaStream_t st)
{
    const int64_t blocks = (n_vocab + kBlock - 1) / kBlock;
    if (n_vocab < 1 || blocks > kMerge)
        return tern_fail(TERN_ERR_UNSUPPORTED, "cuda: top logits of a %lld-token vocabulary (at most %d)",
                         (long long)n_vocab, kBlock * kMerge);
    int keep = 1;
    while (keep * 2 * blocks <= kMerge && keep * 2 <= kBlock)
        keep *= 2;
    LAUNCH("top logits", top_logits_kernel, dim3((unsigned)blocks), dim3(kBlock), st, logits, (int32_t)n_vocab, keep,
           kept, ticket, out);
    return cuda_launch_status("top logits");
}

extern "C" int32_t tern_cuda_top_test(const float *logits, int64_t n, tern_cuda_top *out)
{
    if (!logits || !out || n < 1)
        return tern_fail(TERN_ERR_INVALID, "tern_cuda_top_test: NULL argument or n = %lld", (long long)n);
    float *d_logits = NULL;
    uint64_t *kept = NULL;
    int *ticket = NULL;
    tern_cuda_top *d_out = NULL;
    int32_t st = TERN_OK;
    if (cudaMalloc((void **)&d_logits, (size_t)n * 4) != cudaSuccess ||
        cudaMalloc((void **)&kept, TOP_LOGITS_SCRATCH_KEYS * sizeof(uint64_t)) != cudaSuccess ||
        cudaMalloc((void **)&ticket, sizeof(int)) != cudaSuccess ||
        cudaMalloc((void **)&d_out, sizeof *d_out) != cudaSuccess)
        st = tern_fail(TERN_ERR_NOMEM, "cuda: no memory for the top-logits test");
    if (st == TERN_OK && (cudaMemcpy(d_logits, logits, (size_t)n * 4, cudaMemcpyHostToDevice) != cudaSuccess ||
                          cudaMemset(ticket, 0, sizeof(int)) != cudaSuccess))
        st = tern_fail(TERN_ERR_UNSUPPORTED, "cuda: copying the top-logits test input");
    if (st == TERN_OK)
        st = launch_top_logits(d_logits, n, kept, ticket, d_out, 0);
    if (st == TERN_OK && cudaMemcpy(out, d_out, sizeof *out, cudaMemcpyDeviceToHost) != cudaSuccess)
        st = tern_fail(TERN_ERR_UNSUPPORTED, "cuda: top-logits test: %s", cudaGetErrorString(cudaGetLastError()));
    cudaFree(d_logits);
    cudaFree(kept);
    cudaFree(ticket);
    cudaFree(d_out);
    return st;
}
