"""The prefill GEMMs (AVX-512 VNNI and AMX, native/src/gemm_*.c) equal the scalar kernel
exactly (int32) at every token tail, row tail and row range, at the real BitNet shapes, past
the scratch's k-chunk (K > 8192) and at the saturation extremes. Variants the host cannot run
are not listed (the library refuses them); the assertion below keeps the list honest."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engine import native
from tests.native_util import REAL_SHAPES, assert_equal_int, host_variants, pack_t2, random_int8, random_ternary

GEMM_VARIANTS = [v for v in host_variants() if v in ("avx512-vnni", "amx")]




def check(variant: str, op: str, w: np.ndarray, rows: int, k: int, x: np.ndarray,
          r0: int = 0, r1: int | None = None) -> None:
    want = native.run_kernel("scalar", op, w, rows, k, x, r0, r1)
    got = native.run_kernel(variant, op, w, rows, k, x, r0, r1)
    assert_equal_int(got, want, f"{variant} {op} rows={rows} k={k} n={x.shape[0]} [{r0},{r1})")


def test_host_with_avx512_vnni_lists_its_gemms():
    """On a CPU that has them, the GEMM variants must be runnable (not silently dropped)."""
    cpuinfo = Path("/proc/cpuinfo")  # Linux only; elsewhere there is nothing to compare with
    flags = cpuinfo.read_text() if cpuinfo.exists() else ""
    if " avx512_vnni" in flags:
        assert "avx512-vnni" in GEMM_VARIANTS
    if " amx_int8" in flags:
        assert "amx" in GEMM_VARIANTS


@pytest.mark.parametrize("variant", GEMM_VARIANTS)
def test_t2_token_and_row_tails(variant):
    """Every row count 1..257 (ranges starting and ending anywhere) with token counts 1..33."""
    rng = np.random.default_rng(10)
    for rows in range(1, 258):
        n = 1 + rows % 33
        k = 128 * (1 + rows % 3)
        w = pack_t2(random_ternary(rng, rows, k))
        x = random_int8(rng, n, k)
        r0 = int(rng.integers(0, rows))
        r1 = int(rng.integers(r0, rows + 1))
        check(variant, "gemm_t2", w, rows, k, x, r0, r1)
        check(variant, "gemm_t2", w, rows, k, x)


@pytest.mark.parametrize("variant", GEMM_VARIANTS)
def test_t2_every_token_count(variant):
    """Token counts 1..33 against 48 rows split like two threads: [0, 24) and [24, 48)."""
    rng = np.random.default_rng(11)
    rows, k = 48, 256
    w = pack_t2(random_ternary(rng, rows, k))
    for n in range(1, 34):
        x = random_int8(rng, n, k)
        check(variant, "gemm_t2", w, rows, k, x, 0, 24)
        check(variant, "gemm_t2", w, rows, k, x, 24, 48)


@pytest.mark.parametrize("variant", GEMM_VARIANTS)
def test_i8_tails(variant):
    """Int8 rows of lengths 1..257 (k % 64 tails), row counts 1..33, token counts 1..33."""
    rng = np.random.default_rng(12)
    for k in range(1, 258):
        rows = 1 + k % 33
        n = 1 + (k * 7) % 33
        q = random_int8(rng, rows, k)
        x = random_int8(rng, n, k)
        r0 = int(rng.integers(0, rows))
        check(variant, "gemm_i8", q, rows, k, x, r0, rows)


@pytest.mark.parametrize("variant", GEMM_VARIANTS)
@pytest.mark.parametrize("rows,k", REAL_SHAPES)
def test_t2_real_shapes(variant, rows, k):
    """37 tokens (two 16-token tile pairs' worth plus a tail) and a two-thread row split."""
    rng = np.random.default_rng(rows * 7 + k)
    w = pack_t2(random_ternary(rng, rows, k))
    x = random_int8(rng, 37, k)
    half = rows // 2
    check(variant, "gemm_t2", w, rows, k, x, 0, half)
    check(variant, "gemm_t2", w, rows, k, x, half, rows)


@pytest.mark.parametrize("variant", GEMM_VARIANTS)
def test_long_k_runs_in_chunks(variant):
    """K beyond one scratch panel (8192) accumulates k-chunks into y."""
    rng = np.random.default_rng(13)
    rows, k = 40, 8192 + 3 * 128
    check(variant, "gemm_t2", pack_t2(random_ternary(rng, rows, k)), rows, k,
          random_int8(rng, 19, k), 3, 37)
    ki = 8192 + 64 + 7
    check(variant, "gemm_i8", random_int8(rng, rows, ki), rows, ki, random_int8(rng, 19, ki), 5, 40)


@pytest.mark.parametrize("variant", GEMM_VARIANTS)
def test_i8_lm_head_rows(variant):
    """The LM head's K (2560) on 4099 of its 128256 rows, 20 tokens."""
    rng = np.random.default_rng(14)
    rows, k = 4099, 2560
    check(variant, "gemm_i8", random_int8(rng, rows, k), rows, k, random_int8(rng, 20, k))


@pytest.mark.parametrize("variant", GEMM_VARIANTS)
def test_extremes_are_exact(variant):
    """All +1 / -1 weights (and +-127/-128 int8 rows) against -128 / 127 activations."""
    k, rows, n = 6912, 33, 17
    for wv, xv in [(1, -128), (-1, -128), (1, 127), (-1, 127)]:
        w = np.full((rows, k), wv, np.int8)
        x = np.full((n, k), xv, np.int8)
        check(variant, "gemm_t2", pack_t2(w), rows, k, x)
        q = np.full((rows, 2560), -128 if wv < 0 else 127, np.int8)
        check(variant, "gemm_i8", q, rows, 2560, x[:, :2560])
