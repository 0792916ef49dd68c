"""The CUDA backend: CudaDecoder over the TERN_CUDA build of the C library (tern_cuda.h).

`NativeDecoder(model, device='cuda')` (what engine.backends asks for with backend 'cuda')
returns a CudaDecoder. The host library first builds its own model (every check and the
repacking happen there), the weights are copied to the GPU, and the host copy is freed at once;
the file mapping stays open for the token embedding (one row per token is read on the host).

A library built without CUDA, or a machine without a usable GPU, gives BackendUnavailableError
(so backend 'auto' can fall back), never NativeError.
"""
from __future__ import annotations

import ctypes
import logging
from collections.abc import Sequence

import numpy as np

from engine import _cuda, _native
from engine.errors import NativeError
from engine.native import KV_TYPES, NativeModel, _check
from engine.sampling import TopLogits

log = logging.getLogger(__name__)

KERNEL_OPS = {"gemv_t2": 0, "gemm_t2": 1, "gemv_i8": 2, "gemm_i8": 3}
GEMV_SHAPES = {"qkv": 0, "wo": 1, "gate_up": 2, "down": 3, "lm_head": 4}


def _unavailable(reason: str):
    from engine.backends import BackendUnavailableError
    return BackendUnavailableError("cuda", reason)


def lib() -> ctypes.CDLL:
    """The native library with the CUDA prototypes declared; BackendUnavailableError if it was
    built without TERN_CUDA."""
    try:
        h = _native.lib()
    except NativeError as exc:
        raise _unavailable(str(exc)) from exc
    if not _cuda.declare(h):
        raise _unavailable("the native library was built without CUDA (build with TERN_CUDA=ON)")
    return h


def unavailable_reason() -> str | None:
    """None if a CUDA device can be used, else why not."""
    try:
        h = lib()
    except Exception as exc:  # noqa: BLE001 - any failure to load means "not available"
        return str(exc)
    if h.tern_cuda_available():
        return None
    return h.tern_last_error().decode("utf-8", "replace")


def device_name() -> str:
    name = lib().tern_cuda_device_name()
    if name is None:
        raise _unavailable(unavailable_reason() or "no CUDA device")
    return name.decode()


def run_kernel(op: str, w: np.ndarray, rows: int, k: int, x: np.ndarray) -> np.ndarray:
    """The GPU twin of engine.native.run_kernel: (n, rows) int32 exact dot products."""
    w = np.ascontiguousarray(w)
    x = np.ascontiguousarray(x, dtype=np.int8).reshape(-1, k)
    y = np.full((x.shape[0], rows), np.iinfo(np.int32).min, dtype=np.int32)
    _check(lib().tern_cuda_kernel_test(KERNEL_OPS[op], w.ctypes.data, w.nbytes, rows, k,
                                       x.ctypes.data_as(_native.c_int8_p), x.shape[0],
                                       y.ctypes.data_as(_native.c_int32_p)))
    return y


def top_logits(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """The GPU's selection of the best logits (as forward_top makes it) over a host vector:
    (ids, logits, exact), best first (test entry)."""
    x = np.ascontiguousarray(logits, dtype=np.float32).reshape(-1)
    out = _cuda.CudaTop()
    _check(lib().tern_cuda_top_test(x.ctypes.data_as(_native.c_float_p), x.size, ctypes.byref(out)))
    n = min(x.size, _cuda.TOP_K)
    return np.ctypeslib.as_array(out.ids)[:n].astype(np.int64), np.ctypeslib.as_array(out.logits)[:n].copy(), \
        int(out.exact)


def bandwidth_probe(nbytes: int = 2 << 30, reps: int = 20) -> float:
    """Device memory read bandwidth, GB/s (median of reps)."""
    out = ctypes.c_double()
    _check(lib().tern_cuda_bandwidth_probe(nbytes, reps, ctypes.byref(out)))
    return out.value


def read_chain_time(nbytes: int, launches: int, reps: int = 50) -> float:
    """Seconds per kernel of a CUDA graph of `launches` kernels that each only read their own
    `nbytes`, launched as gemv_time launches the GEMVs: that timing's floor for those bytes."""
    out = ctypes.c_double()
    _check(lib().tern_cuda_read_chain_time(int(nbytes), launches, reps, ctypes.byref(out)))
    return out.value


class CudaDecoder:
    """Decoder protocol (docs/ENGINE-API.md) on the GPU. Owns `model` (a BitNetModel) and closes
    it in close(). lm_head='f16' and kv_type='f32' give the reference's precision."""

    backend_name = "cuda"

    def __init__(self, model, n_ctx: int = 4096, threads: int | None = None, lm_head: str = "int8",
                 kv_type: str = "f16"):
        if kv_type not in KV_TYPES:
            raise ValueError(f"kv_type must be one of {sorted(KV_TYPES)}, got {kv_type!r}")
        h = lib()
        reason = unavailable_reason()
        if reason is not None:
            raise _unavailable(reason)
        self._model = model
        self.n_ctx = n_ctx
        self.n_vocab = model.hparams.n_vocab
        self.lm_head = lm_head
        self.threads = threads or 1   # host threads only build the model
        self.device = device_name()
        major_minor = self.device.split("(sm_", 1)[1].split(",", 1)[0] if "(sm_" in self.device else "?"
        self.kernel = f"cuda-sm{major_minor}"
        self._handle = self._session = None
        self._top = _cuda.CudaTop()
        n = min(self.n_vocab, _cuda.TOP_K)
        self._top_ids = np.ctypeslib.as_array(self._top.ids)[:n]
        self._top_logits = np.ctypeslib.as_array(self._top.logits)[:n]
        with NativeModel(model, lm_head) as host:
            handle = ctypes.c_void_p()
            _check(h.tern_cuda_model_create(host.handle, ctypes.byref(handle)))
            self._handle = handle
        try:
            session = ctypes.c_void_p()
            _check(h.tern_cuda_session_create(self._handle, n_ctx, KV_TYPES[kv_type], ctypes.byref(session)))
            self._session = session
        except BaseException:
            h.tern_cuda_model_free(self._handle)
            self._handle = None
            raise
        log.info("cuda decoder on %s: LM head %s, KV %s, %d MB of weights on the GPU", self.device, lm_head,
                 kv_type, h.tern_cuda_model_device_bytes(self._handle) >> 20)

    def _live(self) -> ctypes.c_void_p:
        if self._session is None:
            raise NativeError(_native.TERN_ERR_INVALID, "the CUDA decoder is closed")
        return self._session

    @property
    def n_past(self) -> int:
        return int(lib().tern_cuda_session_n_past(self._live()))

    @property
    def graph_active(self) -> bool:
        """Whether decode replays a captured CUDA graph (after the first one-token forward)."""
        return bool(lib().tern_cuda_session_graph_active(self._live()))

    @property
    def persistent_active(self) -> bool:
        """Whether that graph holds the persistent decode kernel (TERN_CUDA_PERSISTENT=1)."""
        return lib().tern_cuda_session_graph_active(self._live()) == 2

    @property
    def model_handle(self) -> ctypes.c_void_p:
        return self._handle

    def forward(self, ids: Sequence[int], all_logits: bool = False) -> np.ndarray:
        tokens = np.ascontiguousarray(ids, dtype=np.int32).reshape(-1)
        out = np.empty((tokens.size if all_logits else 1, self.n_vocab), dtype=np.float32)
        _check(lib().tern_cuda_forward(self._live(), tokens.ctypes.data_as(_native.c_int32_p), tokens.size,
                                       out.ctypes.data_as(_native.c_float_p), int(all_logits)))
        return out if all_logits else out[0]

    def forward_top(self, token: int) -> TopLogits:
        """forward([token]) with the best logits selected on the GPU: only those (2 kB) reach the
        host; .full() copies the whole vector while this step is the session's latest."""
        _check(lib().tern_cuda_decode_top(self._live(), int(token), ctypes.byref(self._top)))
        return TopLogits(self._top_ids.astype(np.int64), self._top_logits.copy(), int(self._top.exact), self.n_vocab,
                         self._last_logits)

    def _last_logits(self) -> np.ndarray:
        out = np.empty(self.n_vocab, dtype=np.float32)
        _check(lib().tern_cuda_last_logits(self._live(), out.ctypes.data_as(_native.c_float_p)))
        return out

    def truncate(self, n: int) -> None:
        _check(lib().tern_cuda_session_truncate(self._live(), n))

    def copy_from(self, other: "CudaDecoder") -> None:
        """Take over other's cached positions (same model handle)."""
        _check(lib().tern_cuda_session_copy(self._live(), other._live()))

    def set_threads(self, threads: int) -> None:
        self.threads = threads

    def cancel(self) -> None:
        if self._session is not None:
            lib().tern_cuda_cancel(self._session)

    def gemv_time(self, shape: str, reps: int = 50) -> tuple[float, float]:
        """(seconds, weight bytes) of one decode GEMV of that shape ('qkv', 'wo', 'gate_up',
        'down', 'lm_head'), timed as a CUDA graph over every layer's matrix."""
        s, b = ctypes.c_double(), ctypes.c_double()
        _check(lib().tern_cuda_gemv_time(self._handle, GEMV_SHAPES[shape], reps, ctypes.byref(s), ctypes.byref(b)))
        return s.value, b.value

    def gemv_read_floor(self, shape: str, reps: int = 50) -> float:
        """Seconds per kernel of read_chain_time over the bytes and launches gemv_time times for
        that shape: the floor of its figure."""
        s = ctypes.c_double()
        _check(lib().tern_cuda_gemv_read_floor(self._handle, GEMV_SHAPES[shape], reps, ctypes.byref(s)))
        return s.value

    def decode_step_time(self, reps: int = 50, top: bool = False) -> float:
        """Seconds of one decode step on the GPU alone (the captured graph replayed, without
        the host's work; top: forward_top's graph, its uploads and selection included); needs a
        decoded token of that kind first."""
        s = ctypes.c_double()
        _check(lib().tern_cuda_decode_time(self._live(), int(top), reps, ctypes.byref(s)))
        return s.value

    def close(self) -> None:
        h = lib()
        if self._session is not None:
            h.tern_cuda_session_free(self._session)
            self._session = None
        if self._handle is not None:
            h.tern_cuda_model_free(self._handle)
            self._handle = None
        self._model.close()

    def __enter__(self) -> "CudaDecoder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
