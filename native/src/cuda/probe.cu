/* Device discovery, the kernel test entry, and the measurements the bench reports (device
 * read bandwidth, per-shape decode GEMV time). */
#include <stdio.h>
#include <stdlib.h>

#include <algorithm>

#include "persist.h"

extern "C" int32_t tern_cuda_available(void)
{
    int count = 0;
    const cudaError_t err = cudaGetDeviceCount(&count);
    if (err != cudaSuccess) {
        cudaGetLastError();
        tern_fail(TERN_ERR_UNSUPPORTED, "no usable CUDA driver or device: %s", cudaGetErrorString(err));
        return 0;
    }
    if (count < 1) {
        tern_fail(TERN_ERR_UNSUPPORTED, "no CUDA device");
        return 0;
    }
    cudaDeviceProp p;
    if (cudaGetDeviceProperties(&p, 0) != cudaSuccess || p.major < 8) {
        tern_fail(TERN_ERR_UNSUPPORTED, "CUDA device 0 has compute capability %d.%d; Tern needs 8.0 or newer",
                  p.major, p.minor);
        return 0;
    }
    return 1;
}

extern "C" const char *tern_cuda_device_name(void)
{
    static char name[320];
    if (!tern_cuda_available())
        return NULL;
    cudaDeviceProp p;
    if (cudaGetDeviceProperties(&p, 0) != cudaSuccess)
        return NULL;
    snprintf(name, sizeof name, "%s (sm_%d%d, %d SMs, %.0f GiB)", p.name, p.major, p.minor, p.multiProcessorCount,
             (double)p.totalGlobalMem / (1 << 30));
    return name;
}

/* Device buffers freed on every return path. */
struct dev_buffers {
    void *p[8] = {};
    int n = 0;
    ~dev_buffers()
    {
        for (int i = 0; i < n; i++)
            cudaFree(p[i]);
    }
    template <typename T>
    int32_t alloc(T **out, size_t bytes)
    {
        if (cudaMalloc((void **)out, bytes ? bytes : 16) != cudaSuccess) {
            *out = NULL;
            return tern_fail(TERN_ERR_NOMEM, "cuda: cannot allocate %zu bytes", bytes);
        }
        p[n++] = *out;
        return TERN_OK;
    }
};

extern "C" int32_t tern_cuda_kernel_test(int32_t op, const void *w, uint64_t w_size, int64_t rows, int64_t k,
                                         const int8_t *x, int64_t n, int32_t *y)
{
    if (op < 0 || op > 3 || !w || !x || !y || rows < 1 || k < 1 || n < 1 || n > (1 << 20))
        return tern_fail(TERN_ERR_INVALID, "cuda kernel test: bad arguments (op %d rows %lld k %lld n %lld)", op,
                         (long long)rows, (long long)k, (long long)n);
    const bool t2 = op < 2;
    if ((op == 0 || op == 2) && n != 1)
        return tern_fail(TERN_ERR_INVALID, "cuda kernel test: a GEMV takes one token, got %lld", (long long)n);
    if (k % (t2 ? 128 : 16) != 0)
        return tern_fail(TERN_ERR_INVALID, "cuda kernel test: k=%lld is not a multiple of %d", (long long)k, t2 ? 128 : 16);
    const uint64_t need = (uint64_t)rows * (uint64_t)(t2 ? k / 4 : k);
    if (w_size < need)
        return tern_fail(TERN_ERR_INVALID, "cuda kernel test: %llu weight bytes, need %llu",
                         (unsigned long long)w_size, (unsigned long long)need);
    if (!tern_cuda_available())
        return TERN_ERR_UNSUPPORTED;
    act_meta *meta = (act_meta *)malloc((size_t)n * sizeof(act_meta));
    if (!meta)
        return tern_fail(TERN_ERR_NOMEM, "out of memory");
    for (int64_t t = 0; t < n; t++) {
        int32_t sum = 0;
        for (int64_t i = 0; i < k; i++)
            sum += x[t * k + i];
        meta[t].s = 1.0f;
        meta[t].sum = sum;
    }
    dev_buffers b;
    uint8_t *dw;
    int8_t *dx;
    act_meta *dm;
    int32_t *dy;
    int32_t st = b.alloc(&dw, need);
    if (st == TERN_OK) st = b.alloc(&dx, (size_t)(n * k));
    if (st == TERN_OK) st = b.alloc(&dm, (size_t)n * sizeof(act_meta));
    if (st == TERN_OK) st = b.alloc(&dy, (size_t)(n * rows) * 4);
    if (st == TERN_OK && (cudaMemcpy(dw, w, need, cudaMemcpyHostToDevice) != cudaSuccess ||
                          cudaMemcpy(dx, x, (size_t)(n * k), cudaMemcpyHostToDevice) != cudaSuccess ||
                          cudaMemcpy(dm, meta, (size_t)n * sizeof(act_meta), cudaMemcpyHostToDevice) != cudaSuccess))
        st = tern_fail(TERN_ERR_UNSUPPORTED, "cuda kernel test: copy to device failed");
    free(meta);
    if (st != TERN_OK)
        return st;
    const dmat m{dw, rows, k, NULL};
    if (op == 0)
        st = launch_gemv_t2(m, dx, dm, dy, EPI_RAW, 0);
    else if (op == 2)
        st = launch_gemv_i8(m, dx, dm, dy, EPI_RAW, 0);
    else
        st = launch_gemm(m, t2, dx, dm, (int32_t)n, dy, rows, EPI_RAW, 0);
    if (st != TERN_OK)
        return st;
    CUDA_TRY(cudaDeviceSynchronize());
    CUDA_TRY(cudaMemcpy(y, dy, (size_t)(n * rows) * 4, cudaMemcpyDeviceToHost));
    return TERN_OK;
}

namespace {

/* Reads n 16-byte values, in batches of 8 loads in flight per thread: the bandwidth probe, and one
 * link of the read chain (a decode GEMV's weight traffic alone), whose first batch is issued
 * before grid_wait(), as the GEMVs issue their rows (without a dependent launch the wait returns
 * at once). */
__global__ void read_kernel(const uint4 *__restrict__ p, size_t n, unsigned *out)
{
    const size_t step = (size_t)gridDim.x * blockDim.x;
    uint32_t acc = 0;
    for (size_t base = (size_t)blockIdx.x * blockDim.x + threadIdx.x; base < n; base += 8 * step) {
        uint4 v[8];
#pragma unroll
        for (int k = 0; k < 8; k++)
            v[k] = base + k * step < n ? __ldcs(p + base + k * step) : make_uint4(0, 0, 0, 0);
        if (base < step)
            grid_wait();
#pragma unroll
        for (int k = 0; k < 8; k++)
            acc ^= v[k].x ^ v[k].y ^ v[k].z ^ v[k].w;
    }
    grid_wait(); /* threads past the end too */
    if (acc == 0x9e3779b9u) /* practically never: keeps the loads alive */
        out[0] = acc;
}

__global__ void fill_kernel(uint32_t *p, size_t n)
{
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        p[i] = (uint32_t)(i * 2654435761u);
}

double median(double *v, int n)
{
    std::sort(v, v + n);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

/* Median seconds of one replay of graph over reps replays. */
int32_t time_graph(cudaGraphExec_t exec, cudaStream_t st, int reps, double *seconds)
{
    cudaEvent_t a, b;
    CUDA_TRY(cudaEventCreate(&a));
    CUDA_TRY(cudaEventCreate(&b));
    double *t = (double *)malloc(sizeof(double) * (size_t)reps);
    int32_t status = t ? TERN_OK : tern_fail(TERN_ERR_NOMEM, "out of memory");
    CUDA_TRY(cudaGraphLaunch(exec, st)); /* warm-up */
    for (int r = 0; r < reps && status == TERN_OK; r++) {
        float ms = 0.0f;
        if (cudaEventRecord(a, st) != cudaSuccess || cudaGraphLaunch(exec, st) != cudaSuccess ||
            cudaEventRecord(b, st) != cudaSuccess || cudaEventSynchronize(b) != cudaSuccess ||
            cudaEventElapsedTime(&ms, a, b) != cudaSuccess)
            status = tern_fail(TERN_ERR_UNSUPPORTED, "cuda: timing failed: %s", cudaGetErrorString(cudaGetLastError()));
        t[r] = ms * 1e-3;
    }
    if (status == TERN_OK)
        *seconds = median(t, reps);
    free(t);
    cudaEventDestroy(a);
    cudaEventDestroy(b);
    return status;
}

/* Ends the capture begun on st and, when the captured launches succeeded (status TERN_OK),
 * instantiates the graph and times it (time_graph): the per-replay median in *seconds. Returns the
 * first failure; the graph is freed either way, the stream is the caller's. */
int32_t end_capture_and_time(cudaStream_t st, int32_t status, int reps, double *seconds)
{
    cudaGraph_t g;
    const cudaError_t end = cudaStreamEndCapture(st, &g);
    cudaGraphExec_t exec = NULL;
    if (status == TERN_OK && end == cudaSuccess && cudaGraphInstantiate(&exec, g, 0) != cudaSuccess)
        status = tern_fail(TERN_ERR_UNSUPPORTED, "cuda: graph instantiation failed");
    if (end == cudaSuccess)
        cudaGraphDestroy(g);
    else if (status == TERN_OK)
        status = tern_fail(TERN_ERR_UNSUPPORTED, "cuda: capture failed: %s", cudaGetErrorString(end));
    if (status == TERN_OK)
        status = time_graph(exec, st, reps, seconds);
    if (exec)
        cudaGraphExecDestroy(exec);
    return status;
}

} // namespace

extern "C" int32_t tern_cuda_bandwidth_probe(uint64_t bytes, int32_t reps, double *gb_per_s)
{
    if (!gb_per_s || bytes < (64u << 20) || reps < 1)
        return tern_fail(TERN_ERR_INVALID, "cuda bandwidth probe: bytes >= 64 MiB and reps >= 1");
    if (!tern_cuda_available())
        return TERN_ERR_UNSUPPORTED;
    dev_buffers b;
    uint4 *buf;
    unsigned *sink;
    if (b.alloc(&buf, bytes) != TERN_OK || b.alloc(&sink, 4) != TERN_OK)
        return TERN_ERR_NOMEM;
    const size_t n = bytes / 16;
    fill_kernel<<<1024, 256>>>((uint32_t *)buf, n * 4);
    cudaStream_t st;
    CUDA_TRY(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
    cudaDeviceProp p;
    CUDA_TRY(cudaGetDeviceProperties(&p, 0));
    CUDA_TRY(cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal));
    read_kernel<<<p.multiProcessorCount * 8, 512, 0, st>>>(buf, n, sink);
    double s = 0.0;
    const int32_t status = end_capture_and_time(st, TERN_OK, reps, &s);
    cudaStreamDestroy(st);
    if (status != TERN_OK)
        return status;
    *gb_per_s = (double)(n * 16) / s / 1e9;
    return TERN_OK;
}

/* Seconds per link of a graph of `launches` kernels that each only read their own `bytes`, launched
 * as tern_cuda_gemv_time launches the GEMVs (programmatic dependent launch where enabled, no
 * early release): the floor of that timing for a kernel of that many bytes. */
extern "C" int32_t tern_cuda_read_chain_time(uint64_t bytes, int32_t launches, int32_t reps, double *seconds)
{
    if (!seconds || bytes < 16 || bytes > (1ull << 32) || launches < 1 || launches > 256 || reps < 1)
        return tern_fail(TERN_ERR_INVALID, "cuda read chain: 16 B to 4 GiB per link, 1 to 256 links, reps >= 1");
    if (!tern_cuda_available())
        return TERN_ERR_UNSUPPORTED;
    const size_t n = bytes / 16;
    dev_buffers b;
    uint4 *buf;
    unsigned *sink;
    if (b.alloc(&buf, n * 16 * (size_t)launches) != TERN_OK || b.alloc(&sink, 4) != TERN_OK)
        return TERN_ERR_NOMEM;
    fill_kernel<<<1024, 256>>>((uint32_t *)buf, n * 4 * (size_t)launches);
    CUDA_TRY(cudaDeviceSynchronize());
    cudaDeviceProp p;
    CUDA_TRY(cudaGetDeviceProperties(&p, 0));
    cudaStream_t st;
    CUDA_TRY(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
    int32_t status = TERN_OK;
    if (cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal) != cudaSuccess) {
        cudaStreamDestroy(st);
        return tern_fail(TERN_ERR_UNSUPPORTED, "cuda: capture failed");
    }
    /* 8 blocks of 128 threads per SM: the GEMVs' block size; the best of 2.4 to 8 per SM within
     * a few percent (fifth session) */
    for (int32_t l = 0; l < launches && status == TERN_OK; l++) {
        const cudaError_t e = launch_k(read_kernel, dim3((unsigned)p.multiProcessorCount * 8), dim3(128), st,
                                       (const uint4 *)(buf + (size_t)l * n), n, sink);
        if (e != cudaSuccess)
            status = tern_fail(TERN_ERR_UNSUPPORTED, "cuda: launching the read chain: %s", cudaGetErrorString(e));
    }
    double t = 0.0;
    status = end_capture_and_time(st, status, reps, &t);
    cudaStreamDestroy(st);
    if (status == TERN_OK)
        *seconds = t / launches;
    return status;
}

/* What tern_cuda_gemv_time times for `which` (0 q|k|v, 1 wo, 2 gate|up, 3 down, 4 LM head): layer
 * l's matrix of that kind, or the LM head; weight bytes per launch; launches chained (every
 * layer's, or the LM head 4 times: 328 MB each already exceed the L2). */
static const dmat &timed_matrix(const tern_cuda_model *m, int32_t which, int32_t l)
{
    if (which == 4)
        return m->head;
    const cuda_layer *L = &m->layers[l];
    return which == 0 ? L->qkv : which == 1 ? L->wo : which == 2 ? L->gate_up : L->down;
}

static double timed_bytes(const tern_cuda_model *m, int32_t which)
{
    const dmat &w = timed_matrix(m, which, 0);
    return (double)w.rows * (double)(which == 4 ? w.cols : w.cols / 4);
}

static int32_t timed_launches(const tern_cuda_model *m, int32_t which)
{
    return which == 4 ? 4 : m->hv.n_layer;
}

/* The persistent decode's steps of one matrix kind over every layer (persist.cu with `only`):
 * per step a grid barrier, the norm + quantization of the input, the dot products from shared
 * memory and the epilogue, with the next layer's rows streaming into the other of two slots
 * meanwhile. *seconds: per layer; 0 with *seconds untouched where the path does not apply. */
static int32_t persist_step_time(tern_cuda_model *m, int32_t which, int32_t reps, double *seconds, bool *done)
{
    *done = false;
    tern_cuda_session *s = NULL;
    TRY(tern_cuda_session_create(m, 16, TERN_KV_F16, &s));
    persist_state *p = NULL;
    int32_t st = persist_init(s, &p);
    const size_t e = (size_t)m->hv.n_embd;
    if (st == TERN_OK && p &&
        (cudaMemset(s->x, 0, e * 4) != cudaSuccess || cudaMemset(s->att, 0, e * 4) != cudaSuccess ||
         cudaMemset(s->h, 0, (size_t)m->hv.n_ff * 8) != cudaSuccess || cudaMemset(s->pos, 0, 4) != cudaSuccess ||
         cudaDeviceSynchronize() != cudaSuccess))
        st = tern_fail(TERN_ERR_UNSUPPORTED, "cuda: preparing the step measurement failed");
    if (st == TERN_OK && p) {
        if (cudaStreamBeginCapture(s->stream, cudaStreamCaptureModeThreadLocal) != cudaSuccess) {
            st = tern_fail(TERN_ERR_UNSUPPORTED, "cuda: capturing the step measurement failed");
        } else {
            double t = 0.0;
            st = launch_persist(s, p, which);
            if ((st = end_capture_and_time(s->stream, st, reps, &t)) == TERN_OK) {
                *seconds = t / m->hv.n_layer;
                *done = true;
            }
        }
    }
    persist_free(p);
    tern_cuda_session_free(s);
    return st;
}

extern "C" int32_t tern_cuda_gemv_time(tern_cuda_model *m, int32_t which, int32_t reps, double *seconds,
                                       double *bytes)
{
    if (!m || which < 0 || which > 4 || reps < 1 || !seconds || !bytes)
        return tern_fail(TERN_ERR_INVALID, "tern_cuda_gemv_time: bad arguments");
    const hv_model *h = &m->hv;
    if (which < 4 && persist_enabled()) { /* as decode runs it */
        bool done = false;
        TRY(persist_step_time(m, which, reps, seconds, &done));
        if (done) {
            *bytes = timed_bytes(m, which);
            return TERN_OK;
        }
    }
    const int64_t width = h->n_embd > h->n_ff ? h->n_embd : h->n_ff;
    dev_buffers b;
    int8_t *xq;
    act_meta *meta;
    float *out;
    if (b.alloc(&xq, (size_t)width) != TERN_OK || b.alloc(&meta, sizeof(act_meta)) != TERN_OK ||
        b.alloc(&out, (size_t)h->n_vocab * 4 + (size_t)(2 * h->n_ff) * 4) != TERN_OK)
        return TERN_ERR_NOMEM;
    int8_t *hx = (int8_t *)malloc((size_t)width);
    if (!hx)
        return tern_fail(TERN_ERR_NOMEM, "out of memory");
    for (int64_t i = 0; i < width; i++)
        hx[i] = (int8_t)((i * 37) % 255 - 127);
    const act_meta hm{1.0f, 0};
    const cudaError_t c1 = cudaMemcpy(xq, hx, (size_t)width, cudaMemcpyHostToDevice);
    free(hx);
    CUDA_TRY(c1);
    CUDA_TRY(cudaMemcpy(meta, &hm, sizeof hm, cudaMemcpyHostToDevice));
    if (which == 4 && m->head_kind != HEAD_I8)
        return tern_fail(TERN_ERR_UNSUPPORTED, "tern_cuda_gemv_time: the LM head is timed for int8 only");
    cudaStream_t st;
    CUDA_TRY(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
    CUDA_TRY(cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal));
    const int32_t launches = timed_launches(m, which);
    int32_t status = TERN_OK;
    for (int32_t l = 0; l < launches && status == TERN_OK; l++) {
        const dmat &w = timed_matrix(m, which, l);
        if (which == 4) {
            status = launch_gemv_i8(w, xq, meta, out, EPI_STORE, st);
        } else { /* the decode kernel (gate|up with its GLU epilogue) on a quantized input */
            fused_gemv a = {};
            a.w = w.w; a.rows = w.rows; a.nchunks = (int32_t)(w.cols / 64); a.scale = w.scale;
            a.out = out; a.epi = EPI_STORE; a.xq = xq; a.meta = meta; a.width = (int)w.cols;
            a.glu = which == 2; a.relu2 = 1;
            status = launch_gemv_t2_fused(a, st);
        }
    }
    double s = 0.0;
    status = end_capture_and_time(st, status, reps, &s);
    cudaStreamDestroy(st);
    if (status != TERN_OK)
        return status;
    *seconds = s / launches;
    *bytes = timed_bytes(m, which);
    return TERN_OK;
}

extern "C" int32_t tern_cuda_decode_time(tern_cuda_session *s, int32_t top, int32_t reps, double *seconds)
{
    if (!s || reps < 1 || !seconds)
        return tern_fail(TERN_ERR_INVALID, "tern_cuda_decode_time: bad arguments");
    cudaGraphExec_t g = top ? s->top_graph : s->decode_graph;
    if (!g)
        return tern_fail(TERN_ERR_INVALID, "tern_cuda_decode_time: no %s graph yet (decode one token with %s first)",
                         top ? "decode_top" : "decode", top ? "tern_cuda_decode_top" : "tern_cuda_forward");
    return time_graph(g, s->stream, reps, seconds);
}

extern "C" int32_t tern_cuda_gemv_read_floor(tern_cuda_model *m, int32_t which, int32_t reps, double *seconds)
{
    if (!m || which < 0 || which > 4 || reps < 1 || !seconds)
        return tern_fail(TERN_ERR_INVALID, "tern_cuda_gemv_read_floor: bad arguments");
    return tern_cuda_read_chain_time((uint64_t)timed_bytes(m, which), timed_launches(m, which), reps, seconds);
}
