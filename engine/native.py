"""The native backend: NativeDecoder over the C library, and one class per native handle.

No ctypes declarations here (engine/_native.py has them); every non-OK status becomes a
typed exception carrying tern_last_error().
"""
from __future__ import annotations

import ctypes
import logging

import numpy as np

from engine import _native
from engine.errors import NativeError

log = logging.getLogger(__name__)

KERNEL_OPS = {"gemv_t2": 0, "gemm_t2": 1, "gemv_i8": 2, "gemm_i8": 3}


def _check(status: int) -> None:
    if status != _native.TERN_OK:
        raise NativeError(status, _native.lib().tern_last_error().decode("utf-8", "replace"))


def version() -> str:
    return _native.lib().tern_version().decode()


def kernel_name() -> str:
    """The kernel variant chosen for this CPU (TERN_ISA forces a family)."""
    name = _native.lib().tern_kernel_name()
    if name is None:
        _check(_native.TERN_ERR_UNSUPPORTED)
    return name.decode()


def bandwidth_probe(nbytes: int, threads: int, reps: int) -> float:
    """Median memory read bandwidth in GB/s (1e9 B/s) streaming `nbytes` with `threads`
    threads (native/src/bwprobe.c, helper H4b); the buffer is freed before returning."""
    out = ctypes.c_double()
    _check(_native.lib().tern_bandwidth_probe(nbytes, threads, reps, ctypes.byref(out)))
    return out.value


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
