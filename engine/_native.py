"""ctypes declarations of the native library (native/include/tern.h), and nothing else.

Each declaration carries its C prototype as a comment. The classes that own native handles
and turn status codes into exceptions live in engine/native.py.
"""
from __future__ import annotations

import ctypes
import importlib.resources
import os
import sys
from pathlib import Path


# ---- status codes (tern.h) ----
TERN_OK = 0
TERN_ERR_INVALID = 1
TERN_ERR_FORMAT = 2
TERN_ERR_NOMEM = 3
TERN_ERR_UNSUPPORTED = 4
TERN_ERR_CANCELLED = 5
TERN_ERR_CONTEXT = 6

_LIB_NAMES = {"linux": "libtern.so", "darwin": "libtern.dylib", "win32": "tern.dll"}


def library_path() -> Path:
    """TERN_NATIVE_LIB if set, else the library inside the engine package (also in editable
    installs, where it is not next to __file__, and in PyInstaller bundles)."""
    env = os.environ.get("TERN_NATIVE_LIB")
    if env:
        return Path(env)
    name = _LIB_NAMES.get(sys.platform, "libtern.so")
    with importlib.resources.as_file(importlib.resources.files("engine") / "lib" / name) as p:
        return Path(p)


_lib: ctypes.CDLL | None = None


def lib() -> ctypes.CDLL:
    """The loaded library with every prototype declared (loaded once). Raises OSError when it is
    missing, cannot load, or lacks a declared symbol (a stale build), so that backend 'auto'
    falls back to the reference decoder (docs/ENGINE-API.md)."""
    global _lib
    if _lib is None:
        path = library_path()
        handle = ctypes.CDLL(str(path))
        try:
            _declare(handle)
        except AttributeError as exc:
            raise OSError(f"{path} is out of date (rebuild with pip install -e .): {exc}") from exc
        _lib = handle
    return _lib


c_int8_p = ctypes.POINTER(ctypes.c_int8)
c_int32_p = ctypes.POINTER(ctypes.c_int32)
c_float_p = ctypes.POINTER(ctypes.c_float)


# ---- ggml type ids, activations, LM head / KV kinds (tern.h) ----
TERN_ACT_RELU2 = 0
TERN_ACT_SILU = 1
TERN_LM_HEAD_INT8 = 0
TERN_LM_HEAD_F16 = 1
TERN_KV_F16 = 0
TERN_KV_INT8 = 1
TERN_KV_F32 = 2


class TernMatrix(ctypes.Structure):
    # typedef struct tern_matrix { const void *data; uint64_t size; int32_t type;
    #                              int64_t cols; int64_t rows; float scale; } tern_matrix;
    _fields_ = [("data", ctypes.c_void_p), ("size", ctypes.c_uint64), ("type", ctypes.c_int32),
                ("cols", ctypes.c_int64), ("rows", ctypes.c_int64), ("scale", ctypes.c_float)]


class TernLayerParams(ctypes.Structure):
    # typedef struct tern_layer_params { const float *attn_norm, *attn_sub_norm, *ffn_norm,
    #     *ffn_sub_norm; tern_matrix wq, wk, wv, wo, w_gate, w_up, w_down; } tern_layer_params;
    _fields_ = [("attn_norm", c_float_p), ("attn_sub_norm", c_float_p), ("ffn_norm", c_float_p),
                ("ffn_sub_norm", c_float_p)] + [
        (name, TernMatrix) for name in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")]


class TernModelParams(ctypes.Structure):
    # typedef struct tern_model_params {
    #     int32_t n_vocab, n_embd, n_layer, n_head, n_head_kv, n_ff; float rope_theta, rms_eps;
    #     int32_t activation; int32_t lm_head; const void *file_base; uint64_t file_size;
    #     int32_t release_sources; tern_matrix token_embd; tern_matrix output;
    #     const float *output_norm; const tern_layer_params *layers; } tern_model_params;
    _fields_ = [(n, ctypes.c_int32) for n in ("n_vocab", "n_embd", "n_layer", "n_head", "n_head_kv", "n_ff")] + [
        ("rope_theta", ctypes.c_float), ("rms_eps", ctypes.c_float),
        ("activation", ctypes.c_int32), ("lm_head", ctypes.c_int32),
        ("file_base", ctypes.c_void_p), ("file_size", ctypes.c_uint64), ("release_sources", ctypes.c_int32),
        ("token_embd", TernMatrix), ("output", TernMatrix), ("output_norm", c_float_p),
        ("layers", ctypes.POINTER(TernLayerParams))]


# typedef void (*tern_trace_fn)(void *user, const char *name, int32_t layer, const float *data,
#                               int32_t n_tok, int32_t width);
TRACE_FN = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int32, c_float_p,
                            ctypes.c_int32, ctypes.c_int32)


def _declare(h: ctypes.CDLL) -> None:
    def fn(name, restype, *argtypes):
        f = getattr(h, name)
        f.restype = restype
        f.argtypes = list(argtypes)

    # const char *tern_version(void);
    fn("tern_version", ctypes.c_char_p)
    # const char *tern_last_error(void);
    fn("tern_last_error", ctypes.c_char_p)
    # const char *tern_kernel_name(void);
    fn("tern_kernel_name", ctypes.c_char_p)
    # int32_t tern_kernel_test(const char *variant, int32_t op, const void *w, uint64_t w_size,
    #                          int64_t rows, int64_t k, const int8_t *x, int64_t n,
    #                          int32_t *y, int64_t r0, int64_t r1);
    fn("tern_kernel_test", ctypes.c_int32, ctypes.c_char_p, ctypes.c_int32, ctypes.c_void_p,
       ctypes.c_uint64, ctypes.c_int64, ctypes.c_int64, c_int8_p, ctypes.c_int64, c_int32_p,
       ctypes.c_int64, ctypes.c_int64)
    # int32_t tern_bandwidth_probe(uint64_t bytes, int32_t threads, int32_t reps,
    #                              double *gb_per_s);   (bwprobe.c, helper H4b)
    fn("tern_bandwidth_probe", ctypes.c_int32, ctypes.c_uint64, ctypes.c_int32, ctypes.c_int32,
       ctypes.POINTER(ctypes.c_double))
    # int32_t tern_attention_test(const float *q, const uint16_t *k, const uint16_t *v,
    #                             int32_t first, int32_t n, int32_t heads, int32_t hd,
    #                             uint64_t scratch_bytes, float *out);   (attn_prefill.c, H4b)
    fn("tern_attention_test", ctypes.c_int32, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
       ctypes.c_int32, ctypes.c_int32, ctypes.c_int32, ctypes.c_int32, ctypes.c_uint64,
       ctypes.c_void_p)
    # int32_t tern_model_create(const tern_model_params *params, tern_model **out);
    fn("tern_model_create", ctypes.c_int32, ctypes.POINTER(TernModelParams), ctypes.POINTER(ctypes.c_void_p))
    # void tern_model_free(tern_model *model);
    fn("tern_model_free", None, ctypes.c_void_p)
    # uint64_t tern_model_alloc_bytes(const tern_model *model);
    fn("tern_model_alloc_bytes", ctypes.c_uint64, ctypes.c_void_p)
    # int32_t tern_session_create(tern_model *model, int32_t n_ctx, int32_t kv_type,
    #                             int32_t threads, tern_session **out);
    fn("tern_session_create", ctypes.c_int32, ctypes.c_void_p, ctypes.c_int32, ctypes.c_int32,
       ctypes.c_int32, ctypes.POINTER(ctypes.c_void_p))
    # void tern_session_free(tern_session *session);
    fn("tern_session_free", None, ctypes.c_void_p)
    # int32_t tern_set_threads(tern_session *session, int32_t threads);
    fn("tern_set_threads", ctypes.c_int32, ctypes.c_void_p, ctypes.c_int32)
    # int32_t tern_session_n_past(const tern_session *session);
    fn("tern_session_n_past", ctypes.c_int32, ctypes.c_void_p)
    # int32_t tern_session_truncate(tern_session *session, int32_t n);
    fn("tern_session_truncate", ctypes.c_int32, ctypes.c_void_p, ctypes.c_int32)
    # int32_t tern_session_copy(tern_session *dst, const tern_session *src);
    fn("tern_session_copy", ctypes.c_int32, ctypes.c_void_p, ctypes.c_void_p)
    # int32_t tern_forward(tern_session *session, const int32_t *tokens, int32_t n,
    #                      float *out_logits, int32_t all_logits);
    fn("tern_forward", ctypes.c_int32, ctypes.c_void_p, c_int32_p, ctypes.c_int32, c_float_p, ctypes.c_int32)
    # void tern_cancel(tern_session *session);
    fn("tern_cancel", None, ctypes.c_void_p)
    # void tern_session_set_trace(tern_session *session, tern_trace_fn fn, void *user);
    fn("tern_session_set_trace", None, ctypes.c_void_p, TRACE_FN, ctypes.c_void_p)
    # int32_t tern_fuzz_model(const uint8_t *data, size_t size);
    fn("tern_fuzz_model", ctypes.c_int32, ctypes.c_char_p, ctypes.c_size_t)
