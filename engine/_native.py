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

from engine.errors import NativeError

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
    """The loaded library with every prototype declared (loaded once)."""
    global _lib
    if _lib is None:
        path = library_path()
        try:
            handle = ctypes.CDLL(str(path))
        except OSError as exc:
            raise NativeError(-1, f"cannot load the native library {path}: {exc}") from exc
        _declare(handle)
        _lib = handle
    return _lib


c_int8_p = ctypes.POINTER(ctypes.c_int8)
c_int32_p = ctypes.POINTER(ctypes.c_int32)
c_float_p = ctypes.POINTER(ctypes.c_float)


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
