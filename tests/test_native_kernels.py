"""Every kernel variant this host runs equals the scalar kernel exactly (int32), and the
scalar kernel equals an independent numpy product on the layout of native/src/layout.h."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from engine import native
from tests.native_util import (REAL_SHAPES, assert_equal_int, exact_dot, host_variants, pack_t2, random_int8,
                               random_ternary)

VARIANTS = host_variants()
SIMD = [v for v in VARIANTS if v != "scalar"]
TAILS = list(range(1, 258))




def test_scalar_matches_numpy_on_the_layout():
    rng = np.random.default_rng(1)
    w = random_ternary(rng, 37, 384)
    x = random_int8(rng, 3, 384)
    want = exact_dot(w, x)
    got = native.run_kernel("scalar", "gemm_t2", pack_t2(w), 37, 384, x)
    assert_equal_int(got, want, "scalar gemm_t2")
    for t in range(3):
        got1 = native.run_kernel("scalar", "gemv_t2", pack_t2(w), 37, 384, x[t:t + 1])
        assert_equal_int(got1, want[t:t + 1], "scalar gemv_t2")
    q = random_int8(rng, 37, 200)
    xi = random_int8(rng, 2, 200)
    assert_equal_int(native.run_kernel("scalar", "gemm_i8", q, 37, 200, xi), exact_dot(q, xi), "scalar gemm_i8")


def test_extreme_values_are_exact():
    """All +1 weights against -128 activations (and all -1 against 127): the saturation traps."""
    k = 1024
    for wv, xv in [(1, -128), (-1, -128), (1, 127), (-1, 127)]:
        w = np.full((5, k), wv, np.int8)
        x = np.full((1, k), xv, np.int8)
        q = np.full((5, k), -128 if wv < 0 else 127, np.int8)
        for v in VARIANTS:
            assert_equal_int(native.run_kernel(v, "gemv_t2", pack_t2(w), 5, k, x), exact_dot(w, x), v)
            assert_equal_int(native.run_kernel(v, "gemv_i8", q, 5, k, x), exact_dot(q, x), v)


def test_scalar_is_always_available():
    assert "scalar" in VARIANTS
    assert native.kernel_name() in VARIANTS


@pytest.mark.parametrize("variant", SIMD)
def test_t2_row_tails(variant):
    """Row counts 1..257 and row ranges that start and end anywhere, K = 128..768."""
    rng = np.random.default_rng(2)
    for rows in TAILS:
        k = 128 * (1 + rows % 6)
        w = pack_t2(random_ternary(rng, rows, k))
        x = random_int8(rng, 3, k)
        r0 = int(rng.integers(0, rows))
        r1 = int(rng.integers(r0, rows + 1))
        want = native.run_kernel("scalar", "gemm_t2", w, rows, k, x, r0, r1)
        assert_equal_int(native.run_kernel(variant, "gemm_t2", w, rows, k, x, r0, r1), want,
                         f"{variant} gemm_t2 rows={rows} k={k} [{r0},{r1})")
        assert_equal_int(native.run_kernel(variant, "gemv_t2", w, rows, k, x[:1], r0, r1), want[:1],
                         f"{variant} gemv_t2 rows={rows} k={k} [{r0},{r1})")


@pytest.mark.parametrize("variant", SIMD)
def test_i8_length_tails(variant):
    """Int8 rows of every length 1..257, with varying rows and ranges."""
    rng = np.random.default_rng(3)
    for k in TAILS:
        rows = 1 + k % 11
        q = random_int8(rng, rows, k)
        x = random_int8(rng, 2, k)
        r0 = int(rng.integers(0, rows))
        want = native.run_kernel("scalar", "gemm_i8", q, rows, k, x, r0, rows)
        assert_equal_int(native.run_kernel(variant, "gemm_i8", q, rows, k, x, r0, rows), want,
                         f"{variant} gemm_i8 k={k}")
        assert_equal_int(native.run_kernel(variant, "gemv_i8", q, rows, k, x[:1], r0, rows), want[:1],
                         f"{variant} gemv_i8 k={k}")


@pytest.mark.parametrize("variant", SIMD)
@pytest.mark.parametrize("rows,k", REAL_SHAPES)
def test_t2_real_shapes(variant, rows, k):
    rng = np.random.default_rng(rows + k)
    w = pack_t2(random_ternary(rng, rows, k))
    x = random_int8(rng, 5, k)
    want = native.run_kernel("scalar", "gemm_t2", w, rows, k, x)
    assert_equal_int(native.run_kernel(variant, "gemm_t2", w, rows, k, x), want, f"{variant} gemm_t2")
    assert_equal_int(native.run_kernel(variant, "gemv_t2", w, rows, k, x[:1]), want[:1], f"{variant} gemv_t2")


@pytest.mark.parametrize("variant", SIMD)
def test_i8_lm_head_shape(variant):
    """The 128256 x 2560 LM head: the real K, on a sample of 4099 rows (keeps memory small)."""
    rng = np.random.default_rng(4)
    rows, k = 4099, 2560
    q = random_int8(rng, rows, k)
    x = random_int8(rng, 3, k)
    want = exact_dot(q, x)
    assert_equal_int(native.run_kernel(variant, "gemm_i8", q, rows, k, x), want, f"{variant} gemm_i8")
    assert_equal_int(native.run_kernel(variant, "gemv_i8", q, rows, k, x[:1]), want[:1], f"{variant} gemv_i8")


def test_unknown_variant_and_bad_sizes_are_errors():
    w = np.zeros((2, 32), np.uint8)
    x = np.zeros((1, 128), np.int8)
    with pytest.raises(native.NativeError):
        native.run_kernel("no-such-isa", "gemv_t2", w, 2, 128, x)
    with pytest.raises(native.NativeError):  # 3 rows need 96 bytes, only 64 given
        native.run_kernel("scalar", "gemv_t2", w, 3, 128, x)
    with pytest.raises(native.NativeError):  # k not a multiple of 128
        native.run_kernel("scalar", "gemv_t2", np.zeros((2, 33), np.uint8), 2, 132, np.zeros((1, 132), np.int8))


# ---------------------------------------------------------------------------------------------
# NEON: cross-compiled for AArch64 and run under qemu-user (Debian: gcc-aarch64-linux-gnu,
# qemu-user); native/tests/kernel_check.c compares every runnable variant with scalar.
# ---------------------------------------------------------------------------------------------

NATIVE = Path(__file__).resolve().parent.parent / "native"
_NEON_SOURCES = ["tern", "error", "platform", "cpu_features", "kernels", "kernels_scalar",
                 "kernels_test", "kernels_neon", "f16"]


def test_neon_variants_equal_scalar_under_qemu(tmp_path):
    cc, qemu = shutil.which("aarch64-linux-gnu-gcc"), shutil.which("qemu-aarch64")
    if not (cc and qemu):
        pytest.skip("needs the Debian packages gcc-aarch64-linux-gnu and qemu-user")
    exe = tmp_path / "kernel_check"
    flags = ["-std=c11", "-O2", "-static", "-ffp-contract=off", f"-I{NATIVE / 'include'}", f"-I{NATIVE / 'src'}"]
    dotprod = tmp_path / "dotprod.o"
    subprocess.run([cc, *flags, "-march=armv8.2-a+dotprod", "-c", str(NATIVE / "src" / "kernels_neon_dotprod.c"),
                    "-o", str(dotprod)], check=True, capture_output=True, text=True, timeout=300)
    sources = [str(NATIVE / "tests" / "kernel_check.c")] + [str(NATIVE / "src" / f"{s}.c") for s in _NEON_SOURCES]
    subprocess.run([cc, *flags, *sources, str(dotprod), "-lpthread", "-lm", "-o", str(exe)],
                   check=True, capture_output=True, text=True, timeout=300)

    def run(cpu: str, env: dict | None = None) -> str:
        proc = subprocess.run([qemu, "-cpu", cpu, str(exe)], capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout

    with_dotprod = run("max")
    assert "neon: equal to scalar" in with_dotprod and "neon-dotprod: equal to scalar" in with_dotprod
    assert "kernel: neon-dotprod" in with_dotprod
    without = run("cortex-a53")          # ARMv8.0: the dot-product variant is not offered
    assert "neon-dotprod" not in without and "kernel: neon," in without
    assert "kernel: scalar" in run("max", {"TERN_ISA": "scalar"})
