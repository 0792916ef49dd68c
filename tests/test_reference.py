"""The numpy reference decoder: exact integer BitLinear, identical results across file formats,
KV-cache decoding equal to one full forward, truncate, errors."""
from __future__ import annotations

import numpy as np
import pytest

from engine.errors import ContextOverflowError
from engine.gguf_file import ValueType
from engine.gguf_write import Typed
from engine.model import load_model
from engine.reference import (ReferenceDecoder, apply_rope, bitlinear, quantize_activations, rms_norm,
                              rope_tables, silu, ternary_dot)

FORMATS = ("i2_s", "tq1_0", "tq2_0", "f16", "bf16", "f32")
IDS = [1, 7, 42, 200, 3, 3, 99, 128, 250, 17, 64, 5]


def _decoder(path, n_ctx=64) -> ReferenceDecoder:
    model = load_model(path)
    try:
        return ReferenceDecoder(model, n_ctx)
    finally:
        model.close()


def _greedy(dec: ReferenceDecoder, prompt, n) -> list[int]:
    logits, out = dec.forward(prompt), []
    for _ in range(n):
        out.append(int(np.argmax(logits)))
        logits = dec.forward([out[-1]])
    return out


# ---------------------------------------------------------------------------------------------
# BitLinear arithmetic on crafted inputs
# ---------------------------------------------------------------------------------------------
def test_activation_rounding_is_half_to_even():
    # max |x| = 127 makes s = 1, so x * s is exactly x and every .5 is a tie
    x = np.array([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, 126.5, -126.5]], dtype=np.float32)
    q, s = quantize_activations(x)
    assert s.dtype == np.float32 and s[0, 0] == 1.0
    assert q.dtype == np.int8
    assert q[0].tolist() == [127, 0, 2, 2, 0, -2, -2, 4, 126, -126]


def test_activation_scale_is_per_token_with_floor():
    x = np.array([[0.0, 0.0, 0.0, 0.0], [2.0, -1.0, 0.5, 0.25]], dtype=np.float32)
    q, s = quantize_activations(x)
    assert s[0, 0] == np.float32(127 / 1e-5)                     # all-zero row: floor, no NaN
    assert q[0].tolist() == [0, 0, 0, 0]
    assert s[1, 0] == np.float32(63.5)
    assert q[1].tolist() == [127, -64, 32, 16]                  # -63.5 -> -64, 31.75 -> 32, 15.875 -> 16


def test_ternary_dot_is_exact_at_the_extremes():
    k = 6912                                                    # 2B4T's FFN width: the largest K
    q = np.full((2, k), 127, dtype=np.int8)
    q[1] = -128
    codes = np.ones((3, k), dtype=np.int8)
    codes[1] = -1
    codes[2, ::2] = 0
    acc = ternary_dot(q, codes)
    assert acc.dtype == np.int32
    assert acc.tolist() == [[127 * k, -127 * k, 127 * k // 2], [-128 * k, 128 * k, -128 * k // 2]]


def test_bitlinear_matches_integer_arithmetic():
    rng = np.random.default_rng(3)
    x = rng.normal(0, 1, (5, 256)).astype(np.float32)
    codes = rng.integers(-1, 2, (64, 256)).astype(np.int8)
    scale = np.float32(0.0123)
    y = bitlinear(x, codes, scale)
    for t in range(5):
        s = np.float32(127) / np.float32(np.abs(x[t]).max())
        q = [int(np.clip(np.rint(np.float32(v) * s), -128, 127)) for v in x[t]]
        for n in range(64):
            acc = sum(qi * int(c) for qi, c in zip(q, codes[n]))     # Python integers: exact
            assert y[t, n] == (np.float32(acc) / s) * scale
    # and it approximates the float product it stands for
    ref = x.astype(np.float64) @ (codes.astype(np.float64) * scale).T
    assert np.abs(y - ref).max() < 0.02 * np.abs(ref).max()


def test_rms_norm_and_rope_conventions():
    x = np.array([[3.0, 4.0]], dtype=np.float32)
    out = rms_norm(x, np.array([1.0, 2.0], dtype=np.float32), 0.0)
    np.testing.assert_allclose(out, [[3 / np.sqrt(12.5), 8 / np.sqrt(12.5)]], rtol=1e-6)
    # NeoX: element i rotates with element i + d/2; position 0 is the identity
    head = np.arange(8, dtype=np.float32).reshape(1, 1, 8)
    cos, sin = rope_tables(np.array([0, 1]), 8, 10000.0)
    assert np.array_equal(apply_rope(head, cos[:1], sin[:1]), head)
    rotated = apply_rope(head, cos[1:], sin[1:])[0, 0]
    assert rotated[0] == np.float32(0 * cos[1, 0] - 4 * sin[1, 0])
    assert rotated[4] == np.float32(4 * cos[1, 0] + 0 * sin[1, 0])
    assert sin[1, 0] == np.float32(np.sin(1.0))                 # theta**0 = 1 for the first pair


# ---------------------------------------------------------------------------------------------
# formats, KV cache, truncate
# ---------------------------------------------------------------------------------------------
def test_all_formats_give_identical_logits_and_greedy_tokens(tiny_model_path):
    results = {}
    for fmt in FORMATS:
        dec = _decoder(tiny_model_path(fmt, seed=4, tokenizer=False))
        logits = dec.forward(IDS, all_logits=True)
        dec.truncate(0)
        results[fmt] = (logits, _greedy(dec, IDS[:4], 12))
        dec.close()
    base_logits, base_greedy = results["i2_s"]
    assert np.all(np.isfinite(base_logits)) and base_logits.std() > 0.1
    for fmt, (logits, greedy) in results.items():
        assert np.array_equal(logits, base_logits), f"{fmt}: max diff {np.abs(logits - base_logits).max()}"
        assert greedy == base_greedy, fmt


def test_seeds_give_different_models(tiny_model_path):
    a = _decoder(tiny_model_path("i2_s", seed=4, tokenizer=False)).forward(IDS)
    b = _decoder(tiny_model_path("i2_s", seed=5, tokenizer=False)).forward(IDS)
    assert not np.allclose(a, b)


def test_kv_cache_decode_equals_full_forward(tiny_model_path):
    path = tiny_model_path("i2_s", seed=4, tokenizer=False)
    full = _decoder(path).forward(IDS, all_logits=True)
    dec = _decoder(path)
    steps = [dec.forward(IDS[:5], all_logits=True)]
    steps += [dec.forward([i], all_logits=True) for i in IDS[5:9]]
    steps.append(dec.forward(IDS[9:], all_logits=True))
    assert dec.n_past == len(IDS)
    assert np.array_equal(np.concatenate(steps), full)
    assert np.array_equal(_decoder(path).forward(IDS), full[-1])      # last-position form


def test_truncate_then_continue_equals_fresh_forward(tiny_model_path):
    path = tiny_model_path("tq1_0", seed=4, tokenizer=False)
    dec = _decoder(path)
    dec.forward(IDS)
    dec.truncate(4)
    assert dec.n_past == 4
    tail = dec.forward([9, 8, 7], all_logits=True)
    fresh = _decoder(path).forward(IDS[:4] + [9, 8, 7], all_logits=True)
    assert np.array_equal(tail, fresh[4:])
    with pytest.raises(ValueError):
        dec.truncate(dec.n_past + 1)
    with pytest.raises(ValueError):
        dec.truncate(-1)


def test_protocol_attributes_and_errors(tiny_model_path):
    dec = _decoder(tiny_model_path("i2_s", seed=4, tokenizer=False), n_ctx=8)
    assert (dec.backend_name, dec.kernel, dec.n_ctx, dec.n_past) == ("reference", "numpy", 8, 0)
    assert dec.forward([1, 2]).shape == (dec.n_vocab,)
    assert dec.forward([3], all_logits=True).shape == (1, dec.n_vocab)
    with pytest.raises(ContextOverflowError):
        dec.forward(list(range(6)))
    assert dec.n_past == 3                      # a refused forward changes nothing
    with pytest.raises(ValueError):
        dec.forward([dec.n_vocab])
    with pytest.raises(ValueError):
        dec.forward([])
    dec.close()


def test_trace_exposes_layer_activations(tiny_model_path):
    dec = _decoder(tiny_model_path("f32", seed=4, tokenizer=False))
    trace: dict = {}
    dec.forward(IDS[:3], trace=trace)
    hp = dec.hparams
    assert trace["blk.0.q"].shape == (3, hp.n_head * hp.head_dim)
    assert trace["blk.1.ffn_act"].shape == (3, hp.n_ff)
    assert trace["output_norm"].shape == (3, hp.n_embd)
    gate, up = trace["blk.0.ffn_gate"], trace["blk.0.ffn_up"]
    assert np.array_equal(trace["blk.0.ffn_act"], np.maximum(gate, 0) ** 2 * up)       # relu²


def test_bitnet_arch_without_activation_key_runs_silu(tiny_model_path, rewrite_gguf, tmp_path):
    src = tiny_model_path("tq2_0", seed=4, tokenizer=False)
    silu_file = rewrite_gguf(src, tmp_path / "silu.gguf", drop_keys=("bitnet.hidden_activation",))
    relu_file = rewrite_gguf(src, tmp_path / "relu2.gguf",
                             set_keys={"bitnet.hidden_activation": Typed(ValueType.STRING, "relu2")})
    trace: dict = {}
    silu_logits = _decoder(silu_file).forward(IDS[:3], trace=trace)
    gate, up = trace["blk.0.ffn_gate"], trace["blk.0.ffn_up"]
    assert np.array_equal(trace["blk.0.ffn_act"], silu(gate) * up)
    assert not np.allclose(silu_logits, _decoder(relu_file).forward(IDS[:3]))
