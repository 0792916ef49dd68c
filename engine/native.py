"""The native backend: NativeDecoder over the C library (native/include/tern.h).

Three layers (STYLE.md): engine/_native.py declares the C functions; here one class per native
handle (NativeModel, NativeSession: explicit close() and context managers, every non-OK status
turned into a typed exception); NativeDecoder implements the Decoder protocol of
docs/ENGINE-API.md with no ctypes in sight of its callers.

Memory: ternary matrices stored as I2_S are used in place from the file mapping, which must
therefore stay open as long as the native model lives (NativeDecoder owns the BitNetModel and
closes it). Every other ternary format is repacked at load, and the library drops the source
pages from the resident set afterwards (release_sources); likewise the embedding after the
int8 LM head is built: decode then touches only the embedding rows of its tokens, a few KB
each, so no copy of the embedding is needed either.
"""
from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Sequence

import numpy as np

from engine import _native
from engine.errors import (CancelledError, ContextOverflowError, ModelFormatError, NativeError,
                           OutOfMemoryError, UnsupportedModelError)

log = logging.getLogger(__name__)

KERNEL_OPS = {"gemv_t2": 0, "gemm_t2": 1, "gemv_i8": 2, "gemm_i8": 3}
LM_HEADS = {"int8": _native.TERN_LM_HEAD_INT8, "f16": _native.TERN_LM_HEAD_F16}
ACTIVATIONS = {"relu2": _native.TERN_ACT_RELU2, "silu": _native.TERN_ACT_SILU}
KV_TYPES = {"f16": _native.TERN_KV_F16, "f32": _native.TERN_KV_F32, "int8": _native.TERN_KV_INT8}


def _message() -> str:
    return _native.lib().tern_last_error().decode("utf-8", "replace")


def _check(status: int) -> None:
    """Raise the typed error for a non-OK status."""
    if status == _native.TERN_OK:
        return
    msg = _message()
    if status == _native.TERN_ERR_CONTEXT:
        raise ContextOverflowError(msg)
    if status == _native.TERN_ERR_CANCELLED:
        raise CancelledError(msg)
    if status == _native.TERN_ERR_NOMEM:
        raise OutOfMemoryError(msg)
    raise NativeError(status, msg)


def version() -> str:
    return _native.lib().tern_version().decode()


def kernel_name() -> str:
    """The kernel variant chosen for this CPU (TERN_ISA forces a family)."""
    name = _native.lib().tern_kernel_name()
    if name is None:
        _check(_native.TERN_ERR_UNSUPPORTED)
    return name.decode()


def run_kernel(variant: str, op: str, w: np.ndarray, rows: int, k: int, x: np.ndarray,
               r0: int = 0, r1: int | None = None) -> np.ndarray:
    """Run one kernel of one named variant: w packed T2 rows (uint8) or int8 rows, x (n, k) int8.
    Returns (n, rows) int32; rows outside [r0, r1) stay at a sentinel (-2**31)."""
    w = np.ascontiguousarray(w)
    x = np.ascontiguousarray(x, dtype=np.int8).reshape(-1, k)
    n = x.shape[0]
    r1 = rows if r1 is None else r1
    y = np.full((n, rows), np.iinfo(np.int32).min, dtype=np.int32)
    _check(_native.lib().tern_kernel_test(
        variant.encode(), KERNEL_OPS[op], w.ctypes.data, w.nbytes, rows, k,
        x.ctypes.data_as(_native.c_int8_p), n, y.ctypes.data_as(_native.c_int32_p), r0, r1))
    return y


# ---------------------------------------------------------------------------------------------
# handles
# ---------------------------------------------------------------------------------------------

def _address(buf) -> int:
    """Address of a buffer (memoryview into the mmap, or array) without copying."""
    return np.frombuffer(buf, dtype=np.uint8).ctypes.data if len(buf) else 0


def _matrix(raw, ggml_type: int, rows: int, cols: int, scale: float = 0.0) -> _native.TernMatrix:
    return _native.TernMatrix(data=_address(raw), size=len(raw), type=ggml_type, cols=cols, rows=rows,
                              scale=scale)


def _ternary(m) -> _native.TernMatrix:
    return _matrix(m.raw, m.ggml_type, m.rows, m.cols, m.scale)


class NativeModel:
    """A tern_model: the weights in the kernels' layout. `model` must stay open while it lives."""

    def __init__(self, model, lm_head: str = "int8"):
        hp = model.hparams
        if lm_head not in LM_HEADS:
            raise ValueError(f"lm_head must be one of {sorted(LM_HEADS)}, got {lm_head!r}")
        self.path = model.path
        self.n_vocab = hp.n_vocab
        self._keep: list = []   # float arrays whose pointers the C side reads during create
        params = self._params(model, lm_head)
        handle = ctypes.c_void_p()
        status = _native.lib().tern_model_create(ctypes.byref(params), ctypes.byref(handle))
        self._keep.clear()      # norms are copied by tern_model_create
        if status in (_native.TERN_ERR_FORMAT, _native.TERN_ERR_UNSUPPORTED):
            err = ModelFormatError if status == _native.TERN_ERR_FORMAT else UnsupportedModelError
            raise err(self.path, _message())
        _check(status)
        self._handle = handle

    def _floats(self, a: np.ndarray):
        arr = np.ascontiguousarray(a, dtype=np.float32)
        self._keep.append(arr)
        return arr.ctypes.data_as(_native.c_float_p)

    def _params(self, model, lm_head: str) -> _native.TernModelParams:
        hp = model.hparams
        f = model.file
        first = next(iter(f.tensors))
        base = _address(f.tensor_bytes(first)) - f.tensors[first].offset
        layers = (_native.TernLayerParams * hp.n_layer)()
        for dst, lw in zip(layers, model.layers):
            dst.attn_norm, dst.attn_sub_norm = self._floats(lw.attn_norm), self._floats(lw.attn_sub_norm)
            dst.ffn_norm, dst.ffn_sub_norm = self._floats(lw.ffn_norm), self._floats(lw.ffn_sub_norm)
            for name in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"):
                setattr(dst, name, _ternary(getattr(lw, name)))
        self._keep.append(layers)
        embd = model.token_embd
        out = model.output
        return _native.TernModelParams(
            n_vocab=hp.n_vocab, n_embd=hp.n_embd, n_layer=hp.n_layer, n_head=hp.n_head,
            n_head_kv=hp.n_head_kv, n_ff=hp.n_ff, rope_theta=hp.rope_theta, rms_eps=hp.rms_eps,
            activation=ACTIVATIONS[hp.activation], lm_head=LM_HEADS[lm_head],
            file_base=base, file_size=f.file_size, release_sources=1,
            token_embd=_matrix(embd.raw, embd.ggml_type, embd.n_rows, embd.n_cols),
            output=(_matrix(out.raw, out.ggml_type, out.n_rows, out.n_cols) if out is not None
                    else _native.TernMatrix()),
            output_norm=self._floats(model.output_norm), layers=layers)

    @property
    def handle(self) -> ctypes.c_void_p:
        if self._handle is None:
            raise NativeError(_native.TERN_ERR_INVALID, "the native model is closed")
        return self._handle

    @property
    def alloc_bytes(self) -> int:
        return int(_native.lib().tern_model_alloc_bytes(self.handle))

    def close(self) -> None:
        if getattr(self, "_handle", None) is not None:
            _native.lib().tern_model_free(self._handle)
            self._handle = None

    def __enter__(self) -> "NativeModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class NativeSession:
    """A tern_session: KV cache of n_ctx positions, scratch and a thread pool."""

    def __init__(self, model: NativeModel, n_ctx: int, threads: int = 1, kv_type: str = "f16"):
        if kv_type not in KV_TYPES:
            raise ValueError(f"kv_type must be one of {sorted(KV_TYPES)}, got {kv_type!r}")
        self.model = model
        self.n_ctx = n_ctx
        handle = ctypes.c_void_p()
        _check(_native.lib().tern_session_create(model.handle, n_ctx, KV_TYPES[kv_type], threads,
                                                 ctypes.byref(handle)))
        self._handle = handle

    @property
    def handle(self) -> ctypes.c_void_p:
        if self._handle is None:
            raise NativeError(_native.TERN_ERR_INVALID, "the native session is closed")
        return self._handle

    @property
    def n_past(self) -> int:
        return int(_native.lib().tern_session_n_past(self.handle))

    def set_threads(self, threads: int) -> None:
        _check(_native.lib().tern_set_threads(self.handle, threads))

    def forward(self, ids: Sequence[int], all_logits: bool = False, trace: dict | None = None) -> np.ndarray:
        """Logits (len, n_vocab) if all_logits else (n_vocab,); trace receives named activations
        ('blk.{i}.q', ..., 'output_norm') as (n_tok, width) float32 copies."""
        tokens = np.ascontiguousarray(ids, dtype=np.int32).reshape(-1)
        n_vocab = self.model.n_vocab
        out = np.empty((tokens.size if all_logits else 1, n_vocab), dtype=np.float32)
        lib = _native.lib()
        callback = self._trace_callback(trace) if trace is not None else None
        if callback is not None:
            lib.tern_session_set_trace(self.handle, callback, None)
        try:
            _check(lib.tern_forward(self.handle, tokens.ctypes.data_as(_native.c_int32_p), tokens.size,
                                    out.ctypes.data_as(_native.c_float_p), int(all_logits)))
        finally:
            if callback is not None:
                lib.tern_session_set_trace(self.handle, _native.TRACE_FN(), None)
        return out if all_logits else out[0]

    @staticmethod
    def _trace_callback(trace: dict):
        def record(_user, name, layer, data, n_tok, width):
            key = name.decode() if layer < 0 else f"blk.{layer}.{name.decode()}"
            values = np.ctypeslib.as_array(data, shape=(n_tok, width)).copy()
            trace[key] = np.concatenate([trace[key], values]) if key in trace else values
        return _native.TRACE_FN(record)

    def truncate(self, n: int) -> None:
        _check(_native.lib().tern_session_truncate(self.handle, n))

    def copy_from(self, other: "NativeSession") -> None:
        """Take over other's cached positions (multi-turn reuse)."""
        _check(_native.lib().tern_session_copy(self.handle, other.handle))

    def cancel(self) -> None:
        """Stop a running forward() (from another thread): it raises CancelledError."""
        if self._handle is not None:
            _native.lib().tern_cancel(self._handle)

    def close(self) -> None:
        if getattr(self, "_handle", None) is not None:
            _native.lib().tern_session_free(self._handle)
            self._handle = None

    def __enter__(self) -> "NativeSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------
# the decoder
# ---------------------------------------------------------------------------------------------

def default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


class NativeDecoder:
    """Decoder protocol (docs/ENGINE-API.md) over the C library. Owns `model` (a BitNetModel
    from engine.model.load_model) and closes it in close(). lm_head='f16' and kv_type='f32'
    give the reference's precision (the parity tests); the defaults halve the bytes read."""

    backend_name = "native"

    def __new__(cls, model, *args, device: str = "cpu", **kwargs):
        # device='cuda' (backend 'cuda') is the TERN_CUDA build's decoder, engine/cuda.py (helper H7)
        if device == "cuda":
            from engine.cuda import CudaDecoder
            return CudaDecoder(model, *args, **kwargs)
        return super().__new__(cls)

    def __init__(self, model, n_ctx: int = 4096, threads: int | None = None, lm_head: str = "int8",
                 device: str = "cpu", kv_type: str = "f16"):
        if device != "cpu":
            from engine.backends import BackendUnavailableError
            raise BackendUnavailableError(device, "the native library here is built for the CPU only")
        self._model = model
        self.n_ctx = n_ctx
        self.n_vocab = model.hparams.n_vocab
        self.lm_head = lm_head
        self.threads = threads or default_threads()
        self.kernel = kernel_name()
        self._native_model = NativeModel(model, lm_head)
        try:
            self._session = NativeSession(self._native_model, n_ctx, self.threads, kv_type)
        except BaseException:
            self._native_model.close()
            raise
        log.info("native decoder: kernel %s, %d threads, LM head %s, %d MB allocated", self.kernel,
                 self.threads, lm_head, self._native_model.alloc_bytes >> 20)

    @property
    def n_past(self) -> int:
        return self._session.n_past

    def forward(self, ids: Sequence[int], all_logits: bool = False, trace: dict | None = None) -> np.ndarray:
        return self._session.forward(ids, all_logits, trace)

    def truncate(self, n: int) -> None:
        self._session.truncate(n)

    def set_threads(self, threads: int) -> None:
        self._session.set_threads(threads)
        self.threads = threads

    def cancel(self) -> None:
        self._session.cancel()

    def close(self) -> None:
        self._session.close()
        self._native_model.close()
        self._model.close()

    def __enter__(self) -> "NativeDecoder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
