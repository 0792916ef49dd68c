"""Helpers for the native tests: the T2 packed layout written independently in numpy."""
from __future__ import annotations

import numpy as np

from engine import native


def pack_t2(w: np.ndarray) -> np.ndarray:
    """(rows, k) int8 in {-1,0,1} -> (rows, k/4) uint8 in the layout of native/src/layout.h:
    per 128-weight block, byte j holds weights j, j+32, j+64, j+96 in bits 7-6, 5-4, 3-2, 1-0."""
    rows, k = w.shape
    assert k % 128 == 0
    codes = (w.astype(np.int16) + 1).astype(np.uint8).reshape(rows, k // 128, 4, 32)
    packed = (codes[:, :, 0] << 6) | (codes[:, :, 1] << 4) | (codes[:, :, 2] << 2) | codes[:, :, 3]
    return packed.reshape(rows, k // 4)


def random_ternary(rng: np.random.Generator, rows: int, k: int) -> np.ndarray:
    return rng.integers(-1, 2, size=(rows, k), dtype=np.int8)


def random_int8(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.integers(-128, 128, size=shape, dtype=np.int8)


def exact_dot(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    """(n, rows) int32 exact products of x (n, k) with w (rows, k)."""
    return (x.astype(np.int64) @ w.astype(np.int64).T).astype(np.int32)


def host_variants() -> list[str]:
    """Every kernel variant this CPU can run (the library refuses the others)."""
    names = ["scalar", "avx2", "avx512-vnni", "amx", "neon"]
    runnable = []
    for name in names:
        try:
            native.run_kernel(name, "gemv_i8", np.zeros((1, 128), np.int8), 1, 128,
                              np.zeros((1, 128), np.int8))
        except native.NativeError:
            continue
        runnable.append(name)
    return runnable
