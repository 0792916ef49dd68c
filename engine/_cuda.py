"""ctypes declarations of the CUDA backend (native/include/tern_cuda.h), and nothing else.

The symbols exist only in a library built with TERN_CUDA=ON; `declare` reports whether they
are there. The classes that own the handles live in engine/cuda.py."""
from __future__ import annotations

import ctypes

from engine import _native

c_int8_p = _native.c_int8_p
c_int32_p = _native.c_int32_p
c_float_p = _native.c_float_p

_declared = False

TOP_K = 256  # TERN_CUDA_TOP_K


class CudaTop(ctypes.Structure):
    """tern_cuda_top: the best logits of a one-token step, best first."""
    _fields_ = [("exact", ctypes.c_int32), ("ids", ctypes.c_int32 * TOP_K), ("logits", ctypes.c_float * TOP_K)]


def has_cuda(h: ctypes.CDLL) -> bool:
    return hasattr(h, "tern_cuda_available")


def declare(h: ctypes.CDLL) -> bool:
    """Declare every prototype on the loaded library; False if it was built without CUDA."""
    global _declared
    if not has_cuda(h):
        return False
    if _declared:
        return True

    def fn(name, restype, *argtypes):
        f = getattr(h, name)
        f.restype = restype
        f.argtypes = list(argtypes)

    vp = ctypes.c_void_p
    # int32_t tern_cuda_available(void);
    fn("tern_cuda_available", ctypes.c_int32)
    # const char *tern_cuda_device_name(void);
    fn("tern_cuda_device_name", ctypes.c_char_p)
    # int32_t tern_cuda_model_create(const tern_model *host, tern_cuda_model **out);
    fn("tern_cuda_model_create", ctypes.c_int32, vp, ctypes.POINTER(vp))
    # void tern_cuda_model_free(tern_cuda_model *model);
    fn("tern_cuda_model_free", None, vp)
    # uint64_t tern_cuda_model_device_bytes(const tern_cuda_model *model);
    fn("tern_cuda_model_device_bytes", ctypes.c_uint64, vp)
    # int32_t tern_cuda_session_create(tern_cuda_model *model, int32_t n_ctx, int32_t kv_type,
    #                                  tern_cuda_session **out);
    fn("tern_cuda_session_create", ctypes.c_int32, vp, ctypes.c_int32, ctypes.c_int32, ctypes.POINTER(vp))
    # void tern_cuda_session_free(tern_cuda_session *session);
    fn("tern_cuda_session_free", None, vp)
    # int32_t tern_cuda_session_n_past(const tern_cuda_session *session);
    fn("tern_cuda_session_n_past", ctypes.c_int32, vp)
    # int32_t tern_cuda_session_truncate(tern_cuda_session *session, int32_t n);
    fn("tern_cuda_session_truncate", ctypes.c_int32, vp, ctypes.c_int32)
    # int32_t tern_cuda_session_copy(tern_cuda_session *dst, const tern_cuda_session *src);
    fn("tern_cuda_session_copy", ctypes.c_int32, vp, vp)
    # int32_t tern_cuda_forward(tern_cuda_session *session, const int32_t *tokens, int32_t n,
    #                           float *out_logits, int32_t all_logits);
    fn("tern_cuda_forward", ctypes.c_int32, vp, c_int32_p, ctypes.c_int32, c_float_p, ctypes.c_int32)
    # void tern_cuda_cancel(tern_cuda_session *session);
    fn("tern_cuda_cancel", None, vp)
    # int32_t tern_cuda_decode_top(tern_cuda_session *session, int32_t token, tern_cuda_top *out);
    fn("tern_cuda_decode_top", ctypes.c_int32, vp, ctypes.c_int32, ctypes.POINTER(CudaTop))
    # int32_t tern_cuda_last_logits(tern_cuda_session *session, float *out_logits);
    fn("tern_cuda_last_logits", ctypes.c_int32, vp, c_float_p)
    # int32_t tern_cuda_top_test(const float *logits, int64_t n, tern_cuda_top *out);
    fn("tern_cuda_top_test", ctypes.c_int32, c_float_p, ctypes.c_int64, ctypes.POINTER(CudaTop))
    # int32_t tern_cuda_session_graph_active(const tern_cuda_session *session);
    fn("tern_cuda_session_graph_active", ctypes.c_int32, vp)
    # int32_t tern_cuda_kernel_test(int32_t op, const void *w, uint64_t w_size, int64_t rows,
    #                               int64_t k, const int8_t *x, int64_t n, int32_t *y);
    fn("tern_cuda_kernel_test", ctypes.c_int32, ctypes.c_int32, vp, ctypes.c_uint64, ctypes.c_int64,
       ctypes.c_int64, c_int8_p, ctypes.c_int64, c_int32_p)
    # int32_t tern_cuda_bandwidth_probe(uint64_t bytes, int32_t reps, double *gb_per_s);
    fn("tern_cuda_bandwidth_probe", ctypes.c_int32, ctypes.c_uint64, ctypes.c_int32,
       ctypes.POINTER(ctypes.c_double))
    # int32_t tern_cuda_gemv_time(tern_cuda_model *model, int32_t which, int32_t reps,
    #                             double *seconds, double *bytes);
    fn("tern_cuda_gemv_time", ctypes.c_int32, vp, ctypes.c_int32, ctypes.c_int32,
       ctypes.POINTER(ctypes.c_double), ctypes.POINTER(ctypes.c_double))
    # int32_t tern_cuda_read_chain_time(uint64_t bytes, int32_t launches, int32_t reps, double *seconds);
    fn("tern_cuda_read_chain_time", ctypes.c_int32, ctypes.c_uint64, ctypes.c_int32, ctypes.c_int32,
       ctypes.POINTER(ctypes.c_double))
    # int32_t tern_cuda_gemv_read_floor(tern_cuda_model *model, int32_t which, int32_t reps, double *seconds);
    fn("tern_cuda_gemv_read_floor", ctypes.c_int32, vp, ctypes.c_int32, ctypes.c_int32, ctypes.POINTER(ctypes.c_double))
    # int32_t tern_cuda_decode_time(tern_cuda_session *session, int32_t top, int32_t reps, double *seconds);
    fn("tern_cuda_decode_time", ctypes.c_int32, vp, ctypes.c_int32, ctypes.c_int32, ctypes.POINTER(ctypes.c_double))
    _declared = True
    return True
