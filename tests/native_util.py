"""Helpers for the native tests: the T2 packed layout written independently in numpy."""
from __future__ import annotations

import numpy as np
import pytest

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


def fuzz_seed(ternary_type_index: int = 0, embd_type_index: int = 3, wide: bool = False,
              file_bytes: int = 16384) -> bytes:
    """An input for tern_fuzz_model (native/src/fuzz_entry.c) that loads: one layer, 2 heads,
    16 tokens, embedding and FFN 128 (256 if wide), every matrix at offset 0 of a "file" of 0x14
    bytes (ternary codes 0, 1, 1, 0 and small finite floats); two threads, f16 KV. Type indices
    refer to fuzz_entry.c's `types` table."""
    def matrix(type_index: int) -> bytes:
        return bytes([0, type_index, 0, 0, 0, 0, 0, 0, 0])   # flags, type, offset (3), scale (4)
    sel = 1 if wide else 0
    head = bytes([sel, sel, 0, 1, 0, 15, 0, 0]) + matrix(embd_type_index) + bytes([0])
    head += b"".join(matrix(ternary_type_index) for _ in range(7)) + bytes([0, 1])
    header_size = 64 + 150 * 1
    return head.ljust(header_size, b"\0") + b"\x14" * file_bytes


# (ternary type index, embedding type index, wide, file bytes) of the kept seeds
FUZZ_SEEDS = [(0, 3, False, 16384), (1, 3, True, 20480), (2, 4, True, 20480), (3, 5, False, 40960),
              (4, 6, False, 40960), (5, 7, False, 70000), (0, 8, True, 20480)]


REAL_SHAPES = [(2560, 2560), (640, 2560), (6912, 2560), (2560, 6912)]   # BitNet 2B4T's BitLinears


def assert_equal_int(got: np.ndarray, want: np.ndarray, what: str) -> None:
    """Exact integer equality, reporting the first mismatching token and row."""
    if not np.array_equal(got, want):
        bad = np.argwhere(got != want)
        t, r = bad[0]
        pytest.fail(f"{what}: {len(bad)} mismatches, first at token {t} row {r}: "
                    f"got {got[t, r]} want {want[t, r]}")


GREEDY_MARGIN = 0.05   # the near-tie: a top-1/top-2 logit margin below this


def assert_greedy_agrees(want_tokens, got_tokens, margins, who: str) -> None:
    """The same greedy tokens as the reference up to the first step where the reference's
    top-1/top-2 margin is below GREEDY_MARGIN."""
    for step, (w, g, m) in enumerate(zip(want_tokens, got_tokens, margins)):
        if m < GREEDY_MARGIN:
            break
        assert w == g, f"greedy token {step} differs: reference {w}, {who} {g} (margin {m:.3f})"


def teacher_ids(n_vocab: int, n: int = 256, seed: int = 5) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n_vocab, n)


def top5_agreement(a: np.ndarray, b: np.ndarray) -> float:
    ta, tb = np.argsort(-a, axis=1)[:, :5], np.argsort(-b, axis=1)[:, :5]
    return float(np.mean([set(x) == set(y) for x, y in zip(ta, tb)]))


def greedy(decoder, prompt, steps: int) -> tuple[list[int], list[float]]:
    """Greedy tokens and the top-1/top-2 margin at each step."""
    logits = decoder.forward(prompt)
    tokens, margins = [], []
    for _ in range(steps):
        top2 = np.sort(logits)[-2:]
        tokens.append(int(np.argmax(logits)))
        margins.append(float(top2[1] - top2[0]))
        logits = decoder.forward([tokens[-1]])
    return tokens, margins
