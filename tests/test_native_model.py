"""The native decoder against the numpy reference (engine/reference.py), on tiny models of every
format: whole-model agreement, every op of every layer on the native side's own inputs, session
operations, and hostile parameters to tern_model_create."""
from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest

from engine import _native, native
from engine.errors import CancelledError, ContextOverflowError, ModelFormatError, NativeError
from engine.model import load_model
from engine.reference import (ACTIVATIONS, apply_rope, bitlinear, causal_attention, rms_norm,
                              rope_tables, ReferenceDecoder)
from tests.native_util import assert_greedy_agrees, greedy, teacher_ids, top5_agreement

FORMATS = ["i2_s", "tq1_0", "tq2_0", "f16", "bf16", "f32"]
N_TEACHER = 256
TOP5_MIN_AGREEMENT = 0.95
FLOAT_RTOL = 1e-4       # float32 ops whose summation order differs (norms, dots)
# The parity tests run the native decoder at the reference's precision (f16 LM head, f32 KV
# cache). With the default f16 KV cache, random tiny models are chaotic enough that the
# reference itself, given f16-rounded K/V, agrees with its own f32 run on only ~70% of top-5
# sets; test_every_layer_op_matches_reference_on_native_inputs checks that cache type per op.


@pytest.fixture(scope="module")
def byte_model(tiny_model_path):
    """tiny model with the 259-token byte vocabulary (small and fast)."""
    return lambda fmt, **kw: tiny_model_path(fmt, tokenizer=False, **kw)








@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("fmt", FORMATS)
def test_teacher_forced_top5_and_greedy_match_reference(byte_model, fmt, threads):
    path = byte_model(fmt)
    ref = ReferenceDecoder(load_model(path), n_ctx=N_TEACHER + 64)
    with native.NativeDecoder(load_model(path), n_ctx=N_TEACHER + 64, threads=threads, lm_head="f16", kv_type="f32") as nat:
        ids = teacher_ids(ref.n_vocab)
        want, got = ref.forward(ids, all_logits=True), nat.forward(ids, all_logits=True)
        assert got.shape == want.shape
        agreement = top5_agreement(want, got)
        assert agreement >= TOP5_MIN_AGREEMENT, f"top-5 sets agree at {agreement:.1%} of positions"
        ref.truncate(0)
        nat.truncate(0)
        want_tokens, margins = greedy(ref, ids[:8], 48)
        got_tokens, _ = greedy(nat, ids[:8], 48)
        assert_greedy_agrees(want_tokens, got_tokens, margins, "native")


def _close(got, want, what, rtol=FLOAT_RTOL):
    scale = max(float(np.abs(want).max()), 1e-6)
    err = float(np.abs(got - want).max())
    assert err <= rtol * scale, f"{what}: max error {err:.3g} at scale {scale:.3g}"


def _int8_rows(a: np.ndarray, hd: int) -> np.ndarray:
    """What the int8 KV cache returns for (n, kv_dim) values: each head row absmax-quantized."""
    rows = a.reshape(a.shape[0], -1, hd)
    amax = np.abs(rows).max(axis=-1, keepdims=True)
    inv = np.where(amax > 0, np.float32(127) / np.maximum(amax, np.float32(1e-30)), np.float32(0))
    q = np.clip(np.rint(rows * inv), -127, 127)
    return (q * (amax / np.float32(127))).astype(np.float32).reshape(a.shape)


KV_CACHED = {"f32": lambda a, hd: a, "f16": lambda a, hd: a.astype(np.float16).astype(np.float32),
             "int8": _int8_rows}


@pytest.mark.parametrize("fmt,kv_type", [("i2_s", "f32"), ("tq1_0", "f32"), ("f16", "f32"), ("i2_s", "f16"),
                                         ("tq2_0", "int8")])
def test_every_layer_op_matches_reference_on_native_inputs(byte_model, fmt, kv_type):
    """Each op of each layer, computed by the reference's functions from the native decoder's
    own traced inputs: equal (integer parts exactly, float parts to rounding) wherever no
    earlier int8 rounding flipped, since both sides see the same input floats."""
    model = load_model(byte_model(fmt))
    hp = model.hparams
    ids = teacher_ids(hp.n_vocab, 40)
    trace: dict = {}
    with native.NativeDecoder(load_model(byte_model(fmt)), n_ctx=64, threads=2, lm_head="f16", kv_type=kv_type) as nat:
        nat.forward(ids, all_logits=True, trace=trace)
    act = ACTIVATIONS[hp.activation]
    cached = lambda a: KV_CACHED[kv_type](a, hp.head_dim)  # noqa: E731
    x = np.array(model.token_embd.rows(ids), dtype=np.float32)
    cos, sin = rope_tables(np.arange(len(ids)), hp.head_dim, hp.rope_theta)
    for i, lw in enumerate(model.layers):
        t = {k.split(".", 2)[2]: v for k, v in trace.items() if k.startswith(f"blk.{i}.")}
        _close(t["attn_norm"], rms_norm(x, lw.attn_norm, hp.rms_eps), f"layer {i} attn_norm")
        h = t["attn_norm"]
        q = apply_rope(bitlinear(h, lw.wq.codes(), lw.wq.scale).reshape(len(ids), hp.n_head, -1), cos, sin)
        k = apply_rope(bitlinear(h, lw.wk.codes(), lw.wk.scale).reshape(len(ids), hp.n_head_kv, -1), cos, sin)
        v = bitlinear(h, lw.wv.codes(), lw.wv.scale)
        _close(t["q"], q.reshape(len(ids), -1), f"layer {i} q", 1e-6)
        _close(t["k"], k.reshape(len(ids), -1), f"layer {i} k", 1e-6)
        _close(t["v"], v, f"layer {i} v", 1e-6)
        a = causal_attention(t["q"].reshape(q.shape), cached(t["k"]).reshape(k.shape),
                             cached(t["v"]).reshape(k.shape), 0)
        _close(t["attn"], a, f"layer {i} attention")
        _close(t["attn_sub_norm"], rms_norm(t["attn"], lw.attn_sub_norm, hp.rms_eps), f"layer {i} attn_sub_norm")
        x_mid = x + bitlinear(t["attn_sub_norm"], lw.wo.codes(), lw.wo.scale)
        _close(t["ffn_norm"], rms_norm(x_mid, lw.ffn_norm, hp.rms_eps), f"layer {i} ffn_norm")
        hn = t["ffn_norm"]
        f = act(bitlinear(hn, lw.w_gate.codes(), lw.w_gate.scale)) * bitlinear(hn, lw.w_up.codes(), lw.w_up.scale)
        _close(t["ffn_act"], f, f"layer {i} ffn_act")
        _close(t["ffn_sub_norm"], rms_norm(t["ffn_act"], lw.ffn_sub_norm, hp.rms_eps), f"layer {i} ffn_sub_norm")
        out = x_mid + bitlinear(t["ffn_sub_norm"], lw.w_down.codes(), lw.w_down.scale)
        _close(t["out"], out, f"layer {i} out")
        x = t["out"]
    _close(trace["output_norm"], rms_norm(x, model.output_norm, hp.rms_eps), "output_norm")
    model.close()


def test_threads_and_chunking_do_not_change_results(byte_model):
    """1 vs 2 threads, and a 300-token prompt (3 internal chunks) vs token by token."""
    path = byte_model("i2_s")
    ids = teacher_ids(259, 300)
    with native.NativeDecoder(load_model(path), n_ctx=320, threads=1, lm_head="f16", kv_type="f32") as one, \
            native.NativeDecoder(load_model(path), n_ctx=320, threads=2, lm_head="f16", kv_type="f32") as two:
        a = one.forward(ids, all_logits=True)
        b = two.forward(ids, all_logits=True)
        np.testing.assert_array_equal(a, b)
        two.truncate(0)
        steps = np.stack([two.forward([i]) for i in ids[:20]])
        _close(steps, a[:20], "token-by-token vs one call", 1e-5)
        assert one.n_past == 300 and two.n_past == 20


@pytest.mark.parametrize("kv_type", ["f16", "int8"])
def test_decode_steps_match_one_prompt_call(byte_model, kv_type):
    """Token by token (the decode attention path) against one call (the prompt path)."""
    ids = teacher_ids(259, 40)
    with native.NativeDecoder(load_model(byte_model("tq2_0")), n_ctx=48, threads=2, lm_head="f16",
                              kv_type=kv_type) as dec:
        whole = dec.forward(ids, all_logits=True)
        dec.truncate(0)
        steps = np.stack([dec.forward([i]) for i in ids])
        _close(steps, whole, f"{kv_type} cache, steps vs one call", 1e-4)


def test_truncate_and_copy_reuse_the_cache(byte_model):
    path = byte_model("tq2_0")
    ids = teacher_ids(259, 50)
    with native.NativeDecoder(load_model(path), n_ctx=64, threads=2, lm_head="f16", kv_type="f32") as dec:
        full = dec.forward(ids, all_logits=True)
        dec.truncate(30)
        assert dec.n_past == 30
        again = dec.forward(ids[30:], all_logits=True)
        np.testing.assert_allclose(again, full[30:], rtol=0, atol=1e-5)
        other = native.NativeSession(dec._native_model, 64, 1, "f32")
        with pytest.raises(NativeError):   # a cache of another type cannot be copied
            with native.NativeSession(dec._native_model, 64, 1, "int8") as wrong:
                wrong.copy_from(dec._session)
        try:
            other.copy_from(dec._session)
            assert other.n_past == 50
            other.truncate(49)
            dec.truncate(49)
            np.testing.assert_allclose(other.forward(ids[49:50]), dec.forward(ids[49:50]), atol=1e-5)
        finally:
            other.close()


@pytest.mark.parametrize("kv_type", ["int8", "f16"])
def test_copy_carries_the_cache_of_each_type(byte_model, kv_type):
    path = byte_model("i2_s")
    ids = teacher_ids(259, 31)
    with native.NativeDecoder(load_model(path), n_ctx=40, threads=2, lm_head="f16", kv_type=kv_type) as dec:
        dec.forward(ids[:30])
        with native.NativeSession(dec._native_model, 40, 1, kv_type) as other:
            other.copy_from(dec._session)
            np.testing.assert_array_equal(other.forward(ids[30:]), dec.forward(ids[30:]))


@pytest.mark.parametrize("kv_type", ["f16", "int8"])
def test_long_context_decode_is_split_deterministically(byte_model, kv_type):
    """Decode past 512 cached positions splits each KV head's attention into parts that threads
    share: the same results on 1 and 2 threads, and the same as the tokens run as one chunk
    (unsplit attention) up to float rounding."""
    path = byte_model("i2_s")
    ids = teacher_ids(259, 1240)
    with native.NativeDecoder(load_model(path), n_ctx=1280, threads=1, lm_head="f16", kv_type=kv_type) as one, \
            native.NativeDecoder(load_model(path), n_ctx=1280, threads=2, lm_head="f16", kv_type=kv_type) as two:
        steps = []
        for dec in (one, two):
            dec.forward(ids[:1200])
            steps.append(np.stack([dec.forward([i]) for i in ids[1200:]]))
        np.testing.assert_array_equal(steps[0], steps[1])
        one.truncate(1200)
        chunk = one.forward(ids[1200:], all_logits=True)
    assert top5_agreement(steps[0], chunk) >= 0.95
    assert np.median(np.abs(steps[0] - chunk)) < 1e-3 * np.std(chunk)


def test_context_overflow_bad_tokens_and_cancel(byte_model):
    path = byte_model("i2_s")
    with native.NativeDecoder(load_model(path), n_ctx=300, threads=2) as dec:
        with pytest.raises(ContextOverflowError):
            dec.forward(np.zeros(301, dtype=np.int64))
        with pytest.raises(NativeError):
            dec.forward([259])
        with pytest.raises(NativeError):
            dec.truncate(1)
        assert dec.n_past == 0

        trace = _CancelOnTrace(dec)
        with pytest.raises(CancelledError):
            dec.forward(np.arange(260) % 259, trace=trace)
        assert dec.n_past == 0
        dec.forward([1, 2, 3])
        assert dec.n_past == 3


class _CancelOnTrace(dict):
    """A trace sink that cancels the forward pass from inside it (during the first chunk)."""

    def __init__(self, decoder):
        super().__init__()
        self.decoder = decoder

    def __setitem__(self, key, value):
        self.decoder.cancel()
        super().__setitem__(key, value)


@pytest.mark.parametrize("emb", ["bf16", "f32", "q8_0", "q6_k", "q4_0"])
def test_embedding_types(byte_model, emb):
    path = byte_model("i2_s", embedding_type=emb)
    ref = ReferenceDecoder(load_model(path), n_ctx=80)
    with native.NativeDecoder(load_model(path), n_ctx=80, threads=2, lm_head="f16", kv_type="f32") as nat:
        ids = teacher_ids(ref.n_vocab, 64)
        agreement = top5_agreement(ref.forward(ids, all_logits=True), nat.forward(ids, all_logits=True))
        assert agreement >= TOP5_MIN_AGREEMENT


@pytest.mark.parametrize("lm_head", ["f16", "int8"])
def test_separate_output_head(byte_model, rewrite_gguf, tmp_path, lm_head):
    """A file with its own output.weight (the old bitnet-25 file): the head is that tensor, not
    the embedding; with the f16 head the logits are the reference's."""
    from engine.gguf_file import F16
    from engine.gguf_write import array_tensor
    head = np.random.default_rng(0).normal(0, 0.05, (259, 256)).astype(np.float16)
    path = rewrite_gguf(byte_model("i2_s"), tmp_path / "out.gguf",
                        tensors={"output.weight": array_tensor("output.weight", (256, 259), F16, head)})
    ref = ReferenceDecoder(load_model(path), n_ctx=40)
    with native.NativeDecoder(load_model(path), n_ctx=40, threads=2, lm_head=lm_head, kv_type="f32") as nat:
        assert nat._model.output is not None
        ids = teacher_ids(259, 32)
        want, got = ref.forward(ids, all_logits=True), nat.forward(ids, all_logits=True)
        if lm_head == "f16":
            assert top5_agreement(want, got) >= TOP5_MIN_AGREEMENT
        else:
            assert np.mean(want.argmax(1) == got.argmax(1)) >= 0.9


def test_int8_lm_head_is_close_to_f16(byte_model):
    path = byte_model("i2_s")
    ids = teacher_ids(259, 64)
    with native.NativeDecoder(load_model(path), n_ctx=80, threads=2, lm_head="f16", kv_type="f32") as exact, \
            native.NativeDecoder(load_model(path), n_ctx=80, threads=2, lm_head="int8", kv_type="f32") as q8:
        a, b = exact.forward(ids, all_logits=True), q8.forward(ids, all_logits=True)
        assert np.mean(a.argmax(1) == b.argmax(1)) >= 0.95
        _close(b, a, "int8 head vs f16 head", 0.05)


def test_llama3_vocabulary_model(tiny_model_path):
    """The real 128256-row vocabulary: the LM head's row chunks and the embedding lookups."""
    path = tiny_model_path("i2_s")
    ref = ReferenceDecoder(load_model(path), n_ctx=40)
    with native.NativeDecoder(load_model(path), n_ctx=40, threads=2, lm_head="f16", kv_type="f32") as nat:
        ids = teacher_ids(ref.n_vocab, 32)
        assert top5_agreement(ref.forward(ids, all_logits=True), nat.forward(ids, all_logits=True)) >= TOP5_MIN_AGREEMENT


# ---------------------------------------------------------------------------------------------
# hostile parameters: every one must come back as an error, never a crash
# ---------------------------------------------------------------------------------------------

def _create(params) -> int:
    handle = ctypes.c_void_p()
    status = _native.lib().tern_model_create(ctypes.byref(params), ctypes.byref(handle))
    if status == _native.TERN_OK:
        _native.lib().tern_model_free(handle)
    return status


HOSTILE = {
    "rows disagree with shape": lambda p: setattr(p.layers[0].wq, "rows", p.layers[0].wq.rows + 1),
    "cols not a block multiple": lambda p: setattr(p.layers[0].wk, "cols", 200),
    "tensor size too small": lambda p: setattr(p.layers[1].w_down, "size", p.layers[1].w_down.size - 40),
    "tensor outside the file": lambda p: setattr(p.layers[0].wv, "data", p.file_base + p.file_size - 16),
    "tensor before the file": lambda p: setattr(p.layers[0].wo, "data", p.file_base - 4096),
    "embedding size too small": lambda p: setattr(p.token_embd, "size", 100),
    "embedding type unknown": lambda p: setattr(p.token_embd, "type", 99),
    "ternary type unknown": lambda p: setattr(p.layers[0].w_up, "type", 12),
    "non-finite scale": lambda p: setattr(p.layers[0].w_gate, "scale", float("nan")),
    "heads do not divide": lambda p: setattr(p, "n_head", 3),
    "zero layers": lambda p: setattr(p, "n_layer", 0),
    "negative vocab": lambda p: setattr(p, "n_vocab", -5),
    "file size understated": lambda p: setattr(p, "file_size", 1000),
    "no file base": lambda p: setattr(p, "file_base", None),
    "null norm": lambda p: setattr(p.layers[1], "ffn_sub_norm", ctypes.POINTER(ctypes.c_float)()),
    "unknown activation": lambda p: setattr(p, "activation", 7),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_params_return_errors(byte_model, case):
    model = load_model(byte_model("i2_s"))
    try:
        holder = native.NativeModel.__new__(native.NativeModel)
        holder._keep = []
        params = holder._params(model, "f16")
        params.release_sources = 0
        assert _create(params) == _native.TERN_OK
        HOSTILE[case](params)
        status = _create(params)
        assert status != _native.TERN_OK
        assert _native.lib().tern_last_error()
    finally:
        model.close()


def test_non_finite_head_is_a_format_error_for_the_int8_copy(byte_model, rewrite_gguf, tmp_path):
    from engine.gguf_file import F16
    from engine.gguf_write import array_tensor
    embd = np.random.default_rng(0).normal(0, 0.05, (259, 256)).astype(np.float16)
    embd[200, 17] = np.inf
    path = rewrite_gguf(byte_model("i2_s"), tmp_path / "inf.gguf",
                        tensors={"token_embd.weight": array_tensor("token_embd.weight", (256, 259), F16, embd)})
    with pytest.raises(ModelFormatError, match="row 200"):
        native.NativeModel(load_model(path), "int8")


def test_code_three_in_i2_s_is_a_format_error(byte_model, tmp_path):
    src = byte_model("i2_s")
    data = bytearray(src.read_bytes())
    model = load_model(src)
    t = model.file.tensors["blk.0.attn_q.weight"]
    model.close()
    data[t.offset] = 0xFF      # four codes of 3
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(ModelFormatError):
        native.NativeModel(load_model(bad), "f16")


# ---------------------------------------------------------------------------------------------
# every kernel family the host runs gives the same model outputs (TERN_ISA, one process each:
# the variant is chosen once per process)
# ---------------------------------------------------------------------------------------------

_ISA_SCRIPT = """
import sys, numpy as np
from engine.model import load_model
from engine.native import NativeDecoder
path, out = sys.argv[1], sys.argv[2]
with NativeDecoder(load_model(path), n_ctx=200, threads=2, lm_head='f16', kv_type='f32') as dec:
    ids = np.random.default_rng(3).integers(0, dec.n_vocab, 150)
    np.save(out, dec.forward(ids, all_logits=True))
    print(dec.kernel)
"""


def _run_isa(isa: str, path, out) -> str:
    import os
    import subprocess
    import sys
    env = dict(os.environ, TERN_ISA=isa)
    proc = subprocess.run([sys.executable, "-c", _ISA_SCRIPT, str(path), str(out)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_every_kernel_family_gives_the_same_outputs(byte_model, tmp_path):
    from tests.native_util import host_variants
    families = {"scalar": "scalar", "avx2": "avx2", "avx512-vnni": "avx512", "amx": "amx"}
    path = byte_model("tq1_0")
    results = {}
    for variant in host_variants():
        assert _run_isa(families[variant], path, tmp_path / f"{variant}.npy") == variant
        results[variant] = np.load(tmp_path / f"{variant}.npy")
    base = results.pop("scalar")
    for variant, logits in results.items():
        _close(logits, base, f"{variant} vs scalar logits", 1e-4)
        assert top5_agreement(base, logits) >= 0.99, variant


# ---------------------------------------------------------------------------------------------
# the libFuzzer corpus (native/fuzz/corpus) replayed through the same entry point
# ---------------------------------------------------------------------------------------------

CORPUS = Path(__file__).resolve().parent.parent / "native" / "fuzz" / "corpus"


def test_fuzz_seeds_load_and_run():
    """The kept seeds are valid models of every ternary format: they reach the forward pass."""
    from tests.native_util import FUZZ_SEEDS, fuzz_seed
    for args in FUZZ_SEEDS:
        data = fuzz_seed(*args)
        assert _native.lib().tern_fuzz_model(data, len(data)) == _native.TERN_OK, \
            (args, _native.lib().tern_last_error())


def test_fuzz_corpus_replays_without_crashing():
    files = sorted(CORPUS.iterdir())
    assert len(files) >= 7
    statuses = set()
    for f in files:
        data = f.read_bytes()
        statuses.add(_native.lib().tern_fuzz_model(data, len(data)))
    assert _native.TERN_OK in statuses and statuses - {_native.TERN_OK}
