"""The CUDA backend (TERN_CUDA build, engine/cuda.py) against its CPU twins and the reference.

On a machine without a usable GPU (CI) every GPU test skips with the reason; the build test
still compiles native/ with -DTERN_CUDA=ON wherever nvcc exists and checks that the library
loads and runs the CPU path there. Run the GPU tests with TERN_NATIVE_LIB pointing at a
TERN_CUDA build."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from engine import cuda, native
from engine.errors import ContextOverflowError, NativeError
from engine.model import load_model
from engine.reference import ReferenceDecoder
from native_util import (assert_greedy_agrees, exact_dot, greedy, pack_t2, random_int8, random_ternary,
                         teacher_ids, top5_agreement)

REPO = Path(__file__).resolve().parent.parent
FORMATS = ["i2_s", "tq1_0", "tq2_0", "f16", "bf16", "f32"]
N_TEACHER = 256
TOP5_MIN_AGREEMENT = 0.95

NO_GPU = cuda.unavailable_reason()
gpu = pytest.mark.skipif(NO_GPU is not None, reason=f"no usable CUDA GPU: {NO_GPU}")


@pytest.fixture(scope="module")
def byte_model(tiny_model_path):
    return lambda fmt, **kw: tiny_model_path(fmt, tokenizer=False, **kw)








# ---------------------------------------------------------------------------------------------
# kernels: exact int32 results, equal to the CPU scalar twin
# ---------------------------------------------------------------------------------------------

def _check_equal(got: np.ndarray, want: np.ndarray, what: str) -> None:
    if not np.array_equal(got, want):
        bad = np.argwhere(got != want)
        t, r = bad[0]
        raise AssertionError(f"{what}: {len(bad)} wrong results, first at token {t} row {r}: "
                             f"{got[t, r]} != {want[t, r]}")


@gpu
@pytest.mark.parametrize("k", [128, 256, 384, 640, 2560, 6912])
@pytest.mark.parametrize("rows", [1, 2, 3, 17, 33, 640])
def test_gemv_t2_equals_cpu_twin(k, rows):
    rng = np.random.default_rng(k * 1000 + rows)
    w, x = random_ternary(rng, rows, k), random_int8(rng, 1, k)
    packed = pack_t2(w)
    got = cuda.run_kernel("gemv_t2", packed, rows, k, x)
    _check_equal(got, native.run_kernel("scalar", "gemv_t2", packed, rows, k, x), f"gemv_t2 {rows}x{k}")
    _check_equal(got, exact_dot(w, x), f"gemv_t2 {rows}x{k} vs numpy")


@gpu
@pytest.mark.parametrize("n", [1, 2, 3, 17, 64, 65, 130])
@pytest.mark.parametrize("rows,k", [(1, 128), (17, 384), (129, 256), (300, 2560), (64, 6912)])
def test_gemm_t2_equals_cpu_twin(n, rows, k):
    rng = np.random.default_rng(n * 7 + rows * 131 + k)
    w, x = random_ternary(rng, rows, k), random_int8(rng, n, k)
    packed = pack_t2(w)
    got = cuda.run_kernel("gemm_t2", packed, rows, k, x)
    _check_equal(got, native.run_kernel("scalar", "gemm_t2", packed, rows, k, x), f"gemm_t2 {n}x{rows}x{k}")


@gpu
@pytest.mark.parametrize("k", [16, 48, 128, 2560, 4096])
@pytest.mark.parametrize("rows", [1, 5, 33, 1000])
def test_gemv_i8_equals_cpu_twin(k, rows):
    rng = np.random.default_rng(k + rows)
    w, x = random_int8(rng, rows, k), random_int8(rng, 1, k)
    got = cuda.run_kernel("gemv_i8", w, rows, k, x)
    _check_equal(got, native.run_kernel("scalar", "gemv_i8", w, rows, k, x), f"gemv_i8 {rows}x{k}")


@gpu
@pytest.mark.parametrize("n", [2, 5, 64, 100])
@pytest.mark.parametrize("rows,k", [(1, 128), (129, 256), (1000, 2560)])
def test_gemm_i8_equals_cpu_twin(n, rows, k):
    rng = np.random.default_rng(n + rows + k)
    w, x = random_int8(rng, rows, k), random_int8(rng, n, k)
    got = cuda.run_kernel("gemm_i8", w, rows, k, x)
    _check_equal(got, native.run_kernel("scalar", "gemm_i8", w, rows, k, x), f"gemm_i8 {n}x{rows}x{k}")


@gpu
@pytest.mark.parametrize("rows,k", [(2560, 2560), (3840, 2560), (13824, 2560), (2560, 6912)])
def test_real_bitnet_shapes_and_extremes(rows, k):
    """The 2B4T shapes (q|k|v and gate|up fused), random and at the int32 extremes."""
    rng = np.random.default_rng(rows + k)
    w = random_ternary(rng, rows, k)
    w[0], w[-1] = 1, -1
    x = random_int8(rng, 3, k)
    x[1] = -128
    x[2] = 127
    packed = pack_t2(w)
    want = exact_dot(w, x)
    _check_equal(cuda.run_kernel("gemm_t2", packed, rows, k, x), want, f"gemm_t2 {rows}x{k}")
    for t in range(3):
        _check_equal(cuda.run_kernel("gemv_t2", packed, rows, k, x[t:t + 1]), want[t:t + 1], f"gemv_t2 {rows}x{k}")


@gpu
def test_kernel_entry_rejects_bad_sizes():
    w = np.zeros((4, 32), np.uint8)
    with pytest.raises(NativeError):
        cuda.run_kernel("gemv_t2", w, 4, 100, np.zeros((1, 100), np.int8))   # k not a multiple of 128
    with pytest.raises(NativeError):
        cuda.run_kernel("gemv_t2", w, 8, 128, np.zeros((1, 128), np.int8))   # too few weight bytes


# ---------------------------------------------------------------------------------------------
# the whole model
# ---------------------------------------------------------------------------------------------

def _cuda_decoder(path, n_ctx, **kw) -> "cuda.CudaDecoder":
    return native.NativeDecoder(load_model(path), n_ctx=n_ctx, device="cuda", **kw)


@gpu
@pytest.mark.parametrize("fmt", FORMATS)
def test_teacher_forced_top5_and_greedy_match_reference(byte_model, fmt):
    path = byte_model(fmt)
    ref = ReferenceDecoder(load_model(path), n_ctx=N_TEACHER + 64)
    with _cuda_decoder(path, N_TEACHER + 64, lm_head="f16", kv_type="f32") as dec:
        assert dec.backend_name == "cuda" and dec.kernel.startswith("cuda-sm")
        ids = teacher_ids(ref.n_vocab)
        want, got = ref.forward(ids, all_logits=True), dec.forward(ids, all_logits=True)
        assert got.shape == want.shape
        agreement = top5_agreement(want, got)
        assert agreement >= TOP5_MIN_AGREEMENT, f"top-5 sets agree at {agreement:.1%} of positions"
        ref.truncate(0)
        dec.truncate(0)
        want_tokens, margins = greedy(ref, ids[:8], 48)
        got_tokens, _ = greedy(dec, ids[:8], 48)
        assert_greedy_agrees(want_tokens, got_tokens, margins, "cuda")


@gpu
def test_llama3_vocabulary_and_int8_head(tiny_model_path):
    """The 128256-token vocabulary; the default int8 head and f16 cache against the CPU decoder
    with the same settings (first positions, before f16 rounding compounds)."""
    path = tiny_model_path("i2_s")
    ids = teacher_ids(128256, 16)
    with native.NativeDecoder(load_model(path), n_ctx=64, threads=1) as cpu, _cuda_decoder(path, 64) as dec:
        want, got = cpu.forward(ids, all_logits=True), dec.forward(ids, all_logits=True)
    np.testing.assert_allclose(got[0], want[0], rtol=0, atol=1e-3 * float(np.abs(want[0]).max()))
    assert top5_agreement(want[:4], got[:4]) == 1.0


@gpu
def test_decode_graph_equals_prefill(byte_model):
    """Token-by-token decode (the CUDA graph) against one prefill of the same tokens."""
    path = byte_model("i2_s")
    ids = teacher_ids(259, 40)
    with _cuda_decoder(path, 64, lm_head="f16", kv_type="f32") as dec:
        full = dec.forward(ids, all_logits=True)
        dec.truncate(0)
        steps = np.stack([dec.forward([int(t)]) for t in ids])
        assert dec.n_past == len(ids)
        assert dec.graph_active == (os.environ.get("TERN_CUDA_GRAPH") != "0")
        if dec.graph_active:
            assert dec.decode_step_time(reps=3) > 0
            assert dec.n_past == len(ids)
    assert top5_agreement(full, steps) >= TOP5_MIN_AGREEMENT
    np.testing.assert_allclose(steps[0], full[0], rtol=0, atol=1e-4 * float(np.abs(full[0]).max()))


@gpu
@pytest.mark.parametrize("head", ["int8", "f16"])
def test_default_decode_graph_equals_prefill(tiny_model_path, head):
    """The settings a user gets (int8 LM head, f16 cache, dependent launches in the graph): each
    decode step's logits against the prefill of the same tokens, to float rounding. Reading the
    int8 head's input through the non-coherent cache once gave other logits here (relative
    error ~1) while f16-head decode stayed exact."""
    path = tiny_model_path("i2_s")
    ids = teacher_ids(128256, 24)
    with _cuda_decoder(path, 64, lm_head=head) as dec, _cuda_decoder(path, 64, lm_head=head) as pre:
        want = pre.forward(ids, all_logits=True)[16:]
        dec.forward(ids[:16])
        got = np.stack([dec.forward([int(t)]) for t in ids[16:]])
        assert dec.graph_active == (os.environ.get("TERN_CUDA_GRAPH") != "0")
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * float(np.abs(want).max()))


@gpu
@pytest.mark.parametrize("kv", ["f32", "f16"])
def test_long_context_decode_attention_equals_prefill(byte_model, kv):
    """Decode after 2,232 cached positions: the decode attention's blocks take more than one tile
    of positions each (35 tiles over 32 splits) and the merge reads its splits in two batches;
    against the prefill attention over the same tokens."""
    path = byte_model("tq2_0")
    ids = teacher_ids(259, 2240)
    with _cuda_decoder(path, 2304, lm_head="f16", kv_type=kv) as dec:
        full = dec.forward(ids, all_logits=True)[-8:]
        dec.truncate(len(ids) - 8)
        steps = np.stack([dec.forward([int(t)]) for t in ids[-8:]])
    assert top5_agreement(full, steps) == 1.0
    np.testing.assert_allclose(steps, full, rtol=0, atol=1e-3 * float(np.abs(full).max()))


def _shape_model(tmp_path, n_embd: int, n_head: int, n_head_kv: int, seed: int) -> Path:
    from engine.testmodel import Shape, make_test_model

    shape = Shape(n_embd=n_embd, n_ff=256, n_layer=1, n_head=n_head, n_head_kv=n_head_kv, n_ctx=256)
    return make_test_model(tmp_path / "m.gguf", "i2_s", shape, seed=seed)


# Seeds: two attention kernels sum in different orders, and where a value of the next layer's
# int8 input sits on a rounding boundary that last bit flips it: logits then differ by ~1e-2
# whatever the kernels (group 5, seed 3: 7e-3 with the f16 cache, with the code before the
# tiled kernel too; seeds 4-6 flip with one cache or the other). These seeds flip with neither.
ATTENTION_SHAPES = pytest.mark.parametrize("n_embd,n_head,n_head_kv,seed",
                                           [(512, 16, 1, 3), (512, 2, 2, 3), (1024, 8, 1, 3), (1280, 10, 2, 7)],
                                           ids=["hd32-group16", "hd256-group1", "hd128-group8", "hd128-group5"])


@gpu
@pytest.mark.parametrize("kv", ["f16", "f32"])
@ATTENTION_SHAPES
def test_decode_attention_shapes_equal_prefill(tmp_path, kv, n_embd, n_head, n_head_kv, seed):
    """The decode attention's head dims (32, 64, 128, 256) and group sizes (1-16 q heads per KV
    head; with an f16 cache the tensor-core tile takes 8 heads per block of columns) against the
    prefill attention over the same tokens (f16: the tiled kernel with several tokens per block;
    f32: the warp-per-head kernel)."""
    path = _shape_model(tmp_path, n_embd, n_head, n_head_kv, seed)
    ids = teacher_ids(259, 150)
    with _cuda_decoder(path, 256, lm_head="f16", kv_type=kv) as dec:
        full = dec.forward(ids, all_logits=True)[-6:]
        dec.truncate(len(ids) - 6)
        steps = np.stack([dec.forward([int(t)]) for t in ids[-6:]])
    np.testing.assert_allclose(steps, full, rtol=0, atol=1e-5 * float(np.abs(full).max()))


@gpu
@ATTENTION_SHAPES
def test_tiled_prefill_attention_against_cpu(tmp_path, n_embd, n_head, n_head_kv, seed):
    """The tiled prefill attention (f16 cache) against the CPU decoder with the same cache: a
    first chunk of 100 tokens, then 50 more at position 100 (their blocks split the tiles, so a
    block can hold a token that sees none of its tiles' positions)."""
    path = _shape_model(tmp_path, n_embd, n_head, n_head_kv, seed)
    ids = teacher_ids(259, 150)
    with native.NativeDecoder(load_model(path), n_ctx=256, threads=1, lm_head="f16", kv_type="f16") as cpu, \
            _cuda_decoder(path, 256, lm_head="f16", kv_type="f16") as dec:
        want = cpu.forward(ids, all_logits=True)
        got = np.concatenate([dec.forward(ids[:100], all_logits=True), dec.forward(ids[100:], all_logits=True)])
    assert np.isfinite(got).all()
    assert top5_agreement(want, got) >= TOP5_MIN_AGREEMENT
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-2 * float(np.abs(want).max()))


@gpu
@pytest.mark.parametrize("fmt,kv", [("i2_s", "f32"), ("tq2_0", "f16")])
def test_fused_norm_decode_matches_separate_norms(byte_model, monkeypatch, fmt, kv):
    """Decode with the norm statistics carried by the producing kernels (the default) against
    decode with the separate norm kernels (TERN_CUDA_FUSED_NORM=0) and against one prefill, and
    its greedy tokens against the reference."""
    path = byte_model(fmt)
    ids = teacher_ids(259, 40)
    runs = {}
    for fused in ("1", "0"):
        monkeypatch.setenv("TERN_CUDA_FUSED_NORM", fused)
        with _cuda_decoder(path, 64, lm_head="f16", kv_type=kv) as dec:
            full = dec.forward(ids, all_logits=True)
            dec.truncate(0)
            runs[fused] = np.stack([dec.forward([int(t)]) for t in ids])
            if fused == "1":
                dec.truncate(0)
                got_tokens, _ = greedy(dec, ids[:8], 24)
    for steps in runs.values():
        assert top5_agreement(full, steps) >= TOP5_MIN_AGREEMENT
        np.testing.assert_allclose(steps[0], full[0], rtol=0, atol=1e-4 * float(np.abs(full[0]).max()))
    assert top5_agreement(runs["0"], runs["1"]) >= TOP5_MIN_AGREEMENT
    want_tokens, margins = greedy(ReferenceDecoder(load_model(path), n_ctx=64), ids[:8], 24)
    assert_greedy_agrees(want_tokens, got_tokens, margins, "cuda")


@gpu
@pytest.mark.parametrize("fmt,kv", [("i2_s", "f32"), ("tq2_0", "f16")])
def test_persistent_decode_matches_prefill_and_reference(byte_model, monkeypatch, fmt, kv):
    """TERN_CUDA_PERSISTENT=1 (one cooperative kernel per decode step, sm_90): decode against
    one prefill of the same tokens, greedy tokens against the reference, and its per-shape
    step timing."""
    monkeypatch.setenv("TERN_CUDA_PERSISTENT", "1")
    path = byte_model(fmt)
    ids = teacher_ids(259, 40)
    with _cuda_decoder(path, 64, lm_head="f16", kv_type=kv) as dec:
        full = dec.forward(ids, all_logits=True)
        dec.truncate(0)
        steps = np.stack([dec.forward([int(t)]) for t in ids])
        if os.environ.get("TERN_CUDA_GRAPH") != "0" and int(dec.kernel.removeprefix("cuda-sm")) >= 90:
            assert dec.persistent_active
        seconds, nbytes = dec.gemv_time("gate_up", reps=3)
        assert seconds > 0 and nbytes > 0
        dec.truncate(0)
        got_tokens, _ = greedy(dec, ids[:8], 24)
    assert top5_agreement(full, steps) >= TOP5_MIN_AGREEMENT
    np.testing.assert_allclose(steps[0], full[0], rtol=0, atol=1e-4 * float(np.abs(full[0]).max()))
    want_tokens, margins = greedy(ReferenceDecoder(load_model(path), n_ctx=64), ids[:8], 24)
    assert_greedy_agrees(want_tokens, got_tokens, margins, "cuda")


@gpu
def test_truncate_reuses_the_cache_and_errors_keep_state(byte_model):
    path = byte_model("tq2_0")
    ids = teacher_ids(259, 24)
    with _cuda_decoder(path, 32) as dec:
        first = dec.forward(ids, all_logits=True)
        dec.truncate(10)
        again = dec.forward(ids[10:], all_logits=True)
        # 14 tokens split the attention differently from 24 (split-K): equal to float rounding
        np.testing.assert_allclose(again, first[10:], rtol=0, atol=1e-5 * float(np.abs(first).max()))
        with pytest.raises(ContextOverflowError):
            dec.forward(teacher_ids(259, 9))
        with pytest.raises(NativeError):
            dec.forward([259])
        with pytest.raises(NativeError):
            dec.truncate(25)
        assert dec.n_past == 24


@gpu
def test_open_decoder_backend_cuda(byte_model):
    from engine.backends import open_decoder
    dec = open_decoder(byte_model("f16"), backend="cuda", n_ctx=64)
    try:
        assert dec.backend_name == "cuda"
        assert dec.forward([1, 2, 3]).shape == (259,)
    finally:
        dec.close()


# ---------------------------------------------------------------------------------------------
# the best logits selected on the GPU (forward_top): what the chat's sampler reads
# ---------------------------------------------------------------------------------------------

def _best_first_ids(x: np.ndarray) -> np.ndarray:
    """Higher logit first, lower id among equal ones, NaN after everything (-0 equals +0)."""
    nan = np.isnan(x)
    return np.lexsort((np.arange(x.size), -np.where(nan, 0, x), nan))


def _check_top(x: np.ndarray, ids: np.ndarray, logits: np.ndarray, exact: int, what: str) -> None:
    want = _best_first_ids(x)[:exact]
    assert 1 <= exact <= min(x.size, 256), what
    np.testing.assert_array_equal(ids[:exact], want, err_msg=what)
    np.testing.assert_array_equal(logits[:exact], x[want], err_msg=what)  # NaN == NaN here


@gpu
def test_top_selection_equals_a_sort():
    rng = np.random.default_rng(5)
    for n in [1, 7, 259, 1024, 1025, 5000, 128256, 300000]:
        x = rng.standard_normal(n).astype(np.float32)
        ids, logits, exact = cuda.top_logits(x)
        if n <= 128256:  # 126 blocks of 1024 keep 8 keys each (here none held more of the best)
            assert exact == min(n, 256), n
        _check_top(x, ids, logits, exact, f"random {n}")
    # equal logits everywhere: the lowest ids, exact as far as the first block's kept keys reach
    x = np.full(128256, 0.5, np.float32)
    ids, logits, exact = cuda.top_logits(x)
    assert exact == 8
    _check_top(x, ids, logits, exact, "all equal")
    # the 300 best in one block of 1024: that block hides some, exactness stops at its last kept
    x = rng.standard_normal(128256).astype(np.float32)
    x[:300] = 100 + rng.standard_normal(300).astype(np.float32)
    ids, logits, exact = cuda.top_logits(x)
    assert exact == 8
    _check_top(x, ids, logits, exact, "clustered")
    # NaN, infinities, signed zeros, ties
    x = np.array([0.0, -0.0, np.nan, np.inf, -np.inf, 1.0, 1.0, -0.0, np.nan, 3.0] * 40, np.float32)
    ids, logits, exact = cuda.top_logits(x)
    assert exact == 256
    _check_top(x, ids, logits, exact, "special values")


@gpu
def test_forward_top_equals_the_full_logits(tiny_model_path, byte_model):
    """Decode steps through forward_top: the candidates are the step's exact best logits, the
    step's whole vector (full()) equals forward() on a second session fed the same tokens, and
    full() refuses once the session moved on."""
    for path, n_vocab in [(tiny_model_path("i2_s"), 128256), (byte_model("tq2_0"), 259)]:
        ids = teacher_ids(n_vocab, 24)
        with _cuda_decoder(path, 64) as dec, _cuda_decoder(path, 64) as twin:
            dec.forward(ids[:16])
            twin.forward(ids[:16])
            for t in ids[16:]:
                top = dec.forward_top(int(t))
                full = top.full()
                np.testing.assert_array_equal(full, twin.forward([int(t)]))
                # a 128k vocabulary: exact unless a block of 1024 ids held more than 8 of the best
                assert top.exact >= (64 if n_vocab > 1024 else n_vocab if n_vocab < 256 else 256)
                assert top.n_vocab == n_vocab
                _check_top(full, top.ids, top.logits, top.exact, f"vocabulary {n_vocab}")
            assert dec.n_past == twin.n_past == 24
            if dec.graph_active:
                assert dec.decode_step_time(reps=2, top=True) > 0 and dec.n_past == 24
            assert dec.forward_top(1).full().shape == (n_vocab,)
            dec.truncate(20)
            with pytest.raises(NativeError):
                top.full()
            with pytest.raises(NativeError):
                dec.forward_top(n_vocab)
            assert dec.n_past == 20


@gpu
def test_chat_session_on_cuda_samples_the_tokens_of_the_full_vector(tiny_model_path):
    """The session's decode loop on the GPU takes the candidates; the same settings over the
    whole logit vector of a second decoder pick the same tokens."""
    from engine.sampling import Sampler, SamplerParams
    from engine.session import ChatSession
    from engine.chat import BitNetChatFormat
    from engine.tokenizer import Tokenizer

    path = tiny_model_path("i2_s")
    prompt = teacher_ids(128256, 20).tolist()
    for params in [SamplerParams.greedy_params(), SamplerParams(seed=9, repeat_penalty=1.2)]:
        with load_model(path) as m:
            tokenizer = Tokenizer.from_gguf_metadata(m.tokenizer_metadata)
        with ChatSession(_cuda_decoder(path, 128), tokenizer, BitNetChatFormat(tokenizer)) as session:
            done = [e for e in session.complete(prompt, params, max_tokens=24) if e.kind == "done"][0]
        with _cuda_decoder(path, 128) as dec:
            sampler, history, want = Sampler(params), list(prompt), []
            logits = dec.forward(prompt)
            while len(want) < 24:
                token = sampler.sample(logits, history)
                if token in tokenizer.eos_ids:
                    break
                want.append(token)
                history.append(token)
                logits = dec.forward([token])
        assert done.stats.ids == want, params


@gpu
def test_cuda_bench_reports_both_decode_loops(byte_model):
    from engine.bench_cuda import format_report, run_cuda_bench
    report = run_cuda_bench(byte_model("i2_s"), ["int8"], repeat=1, tg=8, n_ctx=600, peer=False)
    tern = report["engines"][0]
    assert tern["tg8_tps"]["median"] > 0 and tern["tg8_logits_tps"]["median"] > 0
    assert tern["gpu_step_s"] > 0 and tern["gpu_top_step_s"] > 0
    text = format_report(report, 8)
    assert "the chat's loop over the GPU's best logits" in text and "every step's logits to the host" in text
    for name, shape in tern["gemv"].items():
        assert shape["read_alone_us"] > 0 and shape["read_alone_fraction"] > 0, name
    assert text.count("reading alone") == len(tern["gemv"])


@gpu
def test_read_chain_reads_its_bytes():
    """The floor bench prints beside each GEMV shape: a chain of kernels that only read. Over more
    bytes than the L2 holds it cannot beat the device's read bandwidth (a chain whose loads were
    optimized away would), and it refuses sizes it cannot honour."""
    bandwidth = cuda.bandwidth_probe(256 << 20, reps=5)
    seconds = cuda.read_chain_time(32 << 20, 8, reps=5)
    assert 0 < (32 << 20) / seconds / 1e9 <= 1.2 * bandwidth
    with pytest.raises(NativeError):
        cuda.read_chain_time(8, 4)
    with pytest.raises(NativeError):
        cuda.read_chain_time(1 << 20, 0)


@gpu
@pytest.mark.slow
@pytest.mark.skipif(shutil.which("compute-sanitizer") is None, reason="compute-sanitizer not on PATH")
def test_memcheck_is_clean(byte_model, tmp_path):
    """Kernels, the top-logits selection, prefill (GEMM path, two chunks of 512), decode (graph;
    per-operation kernels with fused or separate norms, the persistent kernel, forward_top, and
    decode after 2,240 positions) under compute-sanitizer memcheck."""
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(f"""
        import os
        import numpy as np
        from engine import cuda, native
        from engine.model import load_model
        from native_util import pack_t2, random_int8, random_ternary
        rng = np.random.default_rng(0)
        for rows, k, n in [(17, 384, 1), (129, 256, 65), (3, 6912, 2)]:
            w = pack_t2(random_ternary(rng, rows, k))
            cuda.run_kernel("gemv_t2" if n == 1 else "gemm_t2", w, rows, k, random_int8(rng, n, k))
            cuda.run_kernel("gemm_i8", random_int8(rng, rows, k), rows, k, random_int8(rng, 2, k))
        for n in [5, 1025, 128256]:
            cuda.top_logits(rng.standard_normal(n).astype(np.float32))
        # decode: fused norms (default), separate norm kernels, the persistent kernel
        for fmt, head, kv, persistent, fused in [("i2_s", "int8", "f16", "0", "1"), ("f16", "f16", "f32", "0", "0"),
                                                 ("i2_s", "int8", "f16", "1", "1")]:
            os.environ["TERN_CUDA_PERSISTENT"] = persistent
            os.environ["TERN_CUDA_FUSED_NORM"] = fused
            path = {str(byte_model("i2_s"))!r} if fmt == "i2_s" else {str(byte_model("f16"))!r}
            with native.NativeDecoder(load_model(path), n_ctx=600, device="cuda", lm_head=head, kv_type=kv) as d:
                d.forward(rng.integers(0, 259, 530), all_logits=True)
                for t in range(5):
                    d.forward([t])
                for t in range(3):
                    d.forward_top(t).full()
                if persistent == "1":
                    d.gemv_time("qkv", reps=1)
        # decode attention past 32 splits of 64 positions: blocks take two tiles
        os.environ["TERN_CUDA_PERSISTENT"] = "0"
        os.environ["TERN_CUDA_FUSED_NORM"] = "1"
        with native.NativeDecoder(load_model({str(byte_model("i2_s"))!r}), n_ctx=2304, device="cuda") as d:
            d.forward(rng.integers(0, 259, 2240))
            for t in range(3):
                d.forward([t])
            d.decode_step_time(reps=1)
        print("memcheck run done")
        """))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO), str(REPO / "tests")] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    res = subprocess.run(["compute-sanitizer", "--tool", "memcheck", "--error-exitcode", "3",
                          sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=900)
    out = res.stdout + res.stderr
    assert res.returncode == 0 and "memcheck run done" in out and "ERROR SUMMARY: 0 errors" in out, out[-4000:]


# ---------------------------------------------------------------------------------------------
# the build, with or without a GPU
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None or shutil.which("cmake") is None,
                    reason="nvcc or cmake not on PATH: the CUDA build cannot be compiled here")
def test_cuda_build_compiles_and_runs_the_cpu_path(byte_model, tmp_path):
    """-DTERN_CUDA=ON compiles (one architecture, to stay quick), and the library loads and
    decodes on the CPU whether or not this machine has a GPU."""
    build = tmp_path / "build"
    arch = os.environ.get("TERN_CUDA_TEST_ARCH", "90-real")
    subprocess.run(["cmake", "-S", str(REPO / "native"), "-B", str(build), "-DTERN_CUDA=ON",
                    f"-DCMAKE_CUDA_ARCHITECTURES={arch}"], check=True, capture_output=True, timeout=300)
    res = subprocess.run(["cmake", "--build", str(build), "-j", str(os.cpu_count() or 2)],
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    lib = build / "libtern.so"
    assert lib.is_file()
    check = textwrap.dedent(f"""
        import numpy as np
        from engine import _cuda, _native, cuda, native
        from engine.backends import BackendUnavailableError
        from engine.model import load_model
        from engine.reference import ReferenceDecoder
        assert _cuda.has_cuda(_native.lib()), "no tern_cuda_* symbols"
        path = {str(byte_model("i2_s"))!r}
        ids = np.random.default_rng(1).integers(0, 259, 32)
        with native.NativeDecoder(load_model(path), n_ctx=64, threads=1, lm_head="f16", kv_type="f32") as d:
            got = d.forward(ids, all_logits=True)
        want = ReferenceDecoder(load_model(path), n_ctx=64).forward(ids, all_logits=True)
        assert (np.argmax(got, 1) == np.argmax(want, 1)).mean() >= 0.9
        if cuda.unavailable_reason() is not None:
            try:
                native.NativeDecoder(load_model(path), n_ctx=64, device="cuda")
            except BackendUnavailableError as exc:
                print("cuda unavailable:", exc)
            else:
                raise AssertionError("a CUDA decoder opened without a GPU")
        print("cpu path ok")
        """)
    env = dict(os.environ, TERN_NATIVE_LIB=str(lib), PYTHONPATH=os.pathsep.join(
        [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    res = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0 and "cpu path ok" in res.stdout, res.stdout + res.stderr
