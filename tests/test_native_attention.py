"""The batched prefill attention (native/src/attn_avx512.c) against a float64 numpy causal
attention over the same f16 K/V: every token count and start position that crosses its
64-position and 16-token blocks, GQA group sizes 1..5, head sizes 16..256, and scratch sizes
down to the minimum (one token per block)."""
from __future__ import annotations

import numpy as np
import pytest

from engine import _native
from engine.errors import NativeError

REL_TOL = 2e-5  # float32 accumulation against float64; outputs are O(1)


def reference(q: np.ndarray, k: np.ndarray, v: np.ndarray, first: int) -> np.ndarray:
    """q (n, heads, hd) float32; k, v (first + n, hd) float16 -> (n, heads, hd) float64."""
    n, heads, hd = q.shape
    kf, vf = k.astype(np.float64), v.astype(np.float64)
    out = np.empty((n, heads, hd))
    for t in range(n):
        s = q[t].astype(np.float64) @ kf[: first + t + 1].T / np.sqrt(hd)
        p = np.exp(s - s.max(axis=1, keepdims=True))
        out[t] = (p / p.sum(axis=1, keepdims=True)) @ vf[: first + t + 1]
    return out


def run(q: np.ndarray, k: np.ndarray, v: np.ndarray, first: int, scratch: int = 1 << 18) -> np.ndarray:
    n, heads, hd = q.shape
    q = np.ascontiguousarray(q, np.float32)
    k = np.ascontiguousarray(k, np.float16)
    v = np.ascontiguousarray(v, np.float16)
    out = np.full((n, heads, hd), np.nan, np.float32)
    lib = _native.lib()
    status = lib.tern_attention_test(q.ctypes.data, k.ctypes.data, v.ctypes.data, first, n, heads,
                                     hd, scratch, out.ctypes.data)
    if status != _native.TERN_OK:
        raise NativeError(status, lib.tern_last_error().decode())
    return out


def case(rng, n: int, first: int, heads: int, hd: int):
    q = rng.standard_normal((n, heads, hd)).astype(np.float32)
    k = (rng.standard_normal((first + n, hd)) * 0.5).astype(np.float16)
    v = rng.standard_normal((first + n, hd)).astype(np.float16)
    return q, k, v


def supported() -> bool:
    rng = np.random.default_rng(0)
    try:
        run(*case(rng, 1, 0, 1, 16), first=0)
    except NativeError:
        return False
    return True


pytestmark = pytest.mark.skipif(not supported(), reason="no AVX-512 on this CPU: the per-head path runs")


def assert_close(got: np.ndarray, want: np.ndarray, what: str) -> None:
    err = np.abs(got - want).max()
    assert np.isfinite(got).all() and err <= REL_TOL * max(1.0, np.abs(want).max()), f"{what}: max err {err}"


@pytest.mark.parametrize("first", [0, 1, 63, 64, 65, 200])
def test_token_counts_and_positions(first):
    rng = np.random.default_rng(first)
    for n in (1, 2, 3, 15, 16, 17, 33, 64, 65):
        q, k, v = case(rng, n, first, 4, 128)
        assert_close(run(q, k, v, first), reference(q, k, v, first), f"n={n} first={first}")


@pytest.mark.parametrize("heads,hd", [(1, 128), (2, 64), (3, 16), (5, 256), (4, 80)])
def test_group_and_head_sizes(heads, hd):
    rng = np.random.default_rng(heads * 1000 + hd)
    q, k, v = case(rng, 21, 70, heads, hd)
    assert_close(run(q, k, v, 70), reference(q, k, v, 70), f"heads={heads} hd={hd}")


def test_minimum_scratch_runs_one_token_per_block():
    rng = np.random.default_rng(7)
    q, k, v = case(rng, 9, 100, 4, 128)
    minimum = (2 * 64 * 128 + 4 * 128 + 2 * 16) * 4
    assert_close(run(q, k, v, 100, scratch=minimum), reference(q, k, v, 100), "minimum scratch")
    with pytest.raises(NativeError):
        run(q, k, v, 100, scratch=minimum - 4)


def test_peaked_scores_stay_finite():
    """Large scores (a near one-hot softmax) exercise the running-max rescaling."""
    rng = np.random.default_rng(8)
    q, k, v = case(rng, 40, 90, 4, 128)
    q *= 30.0
    assert_close(run(q, k, v, 90), reference(q, k, v, 90), "peaked")


def test_unsupported_head_size_is_refused():
    rng = np.random.default_rng(9)
    with pytest.raises(NativeError):
        run(*case(rng, 3, 0, 2, 24), first=0)
