"""LlamaCppDecoder over real llama.cpp, on a tiny Llama-architecture GGUF written by the tests.

The logits are checked against an independent numpy forward pass of the same weights, so the
test covers the file the tests write, the decoder's batching and its KV-cache handling.
"""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")

from engine.errors import ContextOverflowError  # noqa: E402
from engine.llama_backend import LlamaCppDecoder, LlamaCppError  # noqa: E402
from tests import make_llama_gguf as tiny  # noqa: E402

SEED = 3


@pytest.fixture(scope="module")
def llama_path(tmp_path_factory):
    return tiny.write_llama_gguf(tmp_path_factory.mktemp("llama") / "tiny-llama.gguf", seed=SEED)


@pytest.fixture
def decoder(llama_path):
    d = LlamaCppDecoder(llama_path, n_ctx=256, threads=1, n_batch=8)
    yield d
    d.close()


# ---------------------------------------------------------------------------------------------
# numpy Llama forward pass (llama.cpp's LLM_ARCH_LLAMA: RMSNorm, NORM rope on adjacent pairs,
# grouped-query attention, SwiGLU)
# ---------------------------------------------------------------------------------------------

def _rms(x, w):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + tiny.RMS_EPS) * w


def _rope(x, positions):
    """x: (seq, heads, head_dim); rotates pairs (2i, 2i+1) by pos * theta^(-2i/d)."""
    d = x.shape[-1]
    freqs = tiny.ROPE_THETA ** (-np.arange(0, d, 2) / d)
    angle = positions[:, None] * freqs[None, :]                      # (seq, d/2)
    cos, sin = np.cos(angle)[:, None, :], np.sin(angle)[:, None, :]
    even, odd = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = even * cos - odd * sin
    out[..., 1::2] = even * sin + odd * cos
    return out


def numpy_logits(weights: dict, ids: list[int]) -> np.ndarray:
    """(len(ids), n_vocab) float64 logits of the whole sequence."""
    w = {k: v.astype(np.float64) for k, v in weights.items()}
    hd = tiny.N_EMBD // tiny.N_HEAD
    group = tiny.N_HEAD // tiny.N_HEAD_KV
    seq = len(ids)
    pos = np.arange(seq, dtype=np.float64)
    x = w["token_embd.weight"][ids]
    mask = np.triu(np.full((seq, seq), -np.inf), k=1)
    for i in range(tiny.N_LAYER):
        p = f"blk.{i}."
        h = _rms(x, w[p + "attn_norm.weight"])
        q = _rope((h @ w[p + "attn_q.weight"].T).reshape(seq, tiny.N_HEAD, hd), pos)
        k = _rope((h @ w[p + "attn_k.weight"].T).reshape(seq, tiny.N_HEAD_KV, hd), pos)
        v = (h @ w[p + "attn_v.weight"].T).reshape(seq, tiny.N_HEAD_KV, hd)
        heads = []
        for head in range(tiny.N_HEAD):
            kv = head // group
            scores = q[:, head] @ k[:, kv].T / np.sqrt(hd) + mask
            probs = np.exp(scores - scores.max(axis=1, keepdims=True))
            heads.append((probs / probs.sum(axis=1, keepdims=True)) @ v[:, kv])
        x = x + np.concatenate(heads, axis=1) @ w[p + "attn_output.weight"].T
        h = _rms(x, w[p + "ffn_norm.weight"])
        gate = h @ w[p + "ffn_gate.weight"].T
        x = x + ((gate / (1 + np.exp(-gate))) * (h @ w[p + "ffn_up.weight"].T)) @ w[p + "ffn_down.weight"].T
    return _rms(x, w["output_norm.weight"]) @ w["output.weight"].T


def _close(a, b):
    # llama.cpp keeps K/V in f16: compare relative to the spread of the logits
    return np.max(np.abs(a - b)) <= 2e-2 * np.std(b)


# ---------------------------------------------------------------------------------------------

def test_logits_match_numpy_forward(decoder):
    ids = decoder.tokenizer.encode("the tern flies over the sea, then dives.", add_bos=True)
    assert len(ids) > decoder.n_batch     # several llama_decode chunks
    got = decoder.forward(ids, all_logits=True)
    want = numpy_logits(tiny.llama_weights(SEED), ids)
    assert got.shape == (len(ids), decoder.n_vocab) and got.dtype == np.float32
    assert _close(got, want), np.max(np.abs(got - want))
    assert decoder.n_past == len(ids)


def test_truncate_reuses_the_cache_exactly(decoder):
    ids = decoder.tokenizer.encode("one two three four five six", add_bos=True)
    full = decoder.forward(ids, all_logits=True)
    decoder.truncate(4)
    assert decoder.n_past == 4
    again = decoder.forward(ids[4:], all_logits=True)
    np.testing.assert_array_equal(again, full[4:])
    decoder.truncate(0)
    last = decoder.forward(ids)
    assert last.shape == (decoder.n_vocab,)
    np.testing.assert_allclose(last, full[-1], atol=1e-4)


def test_errors_are_typed(decoder):
    with pytest.raises(LlamaCppError):
        decoder.forward([decoder.n_vocab])
    with pytest.raises(LlamaCppError):
        decoder.forward([])
    with pytest.raises(LlamaCppError):
        decoder.truncate(5)
    with pytest.raises(ContextOverflowError):
        decoder.forward([1] * (decoder.n_ctx + 1))
    assert decoder.n_past == 0       # nothing half-done stays behind
    decoder.close()
    decoder.close()
    with pytest.raises(LlamaCppError, match="closed"):
        decoder.forward([1])


def test_tokenizer_specials_and_streaming_utf8(decoder):
    tok = decoder.tokenizer
    assert decoder.bos_token == "<|bos|>" and decoder.eos_token == "<|im_end|>"
    assert tok.eos_ids == {tok.encode_special("<|im_end|>")}
    assert tok.special_tokens == {"<|bos|>": 266, "<|im_end|>": 267, "<|im_start|>": 268}
    # special spellings stay text unless asked for
    assert tok.encode("<|im_start|>user", parse_special=True)[0] == 268
    assert 268 not in tok.encode("<|im_start|>user")
    text = "Tern — naïve café ☕"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    detok = tok.detokenizer()
    pieces = [detok.feed(i) for i in ids] + [detok.flush()]
    assert "".join(pieces) == text
    assert "" in pieces                  # a multi-byte character was held back, not broken
    assert tok.decode([266, *ids, 267], skip_special=True) == text
    assert decoder.chat_template == tiny.CHATML_TEMPLATE


def test_missing_and_broken_files(tmp_path):
    from engine.errors import ModelFormatError
    with pytest.raises(ModelFormatError, match="not found"):
        LlamaCppDecoder(tmp_path / "nope.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(ModelFormatError, match="cannot load"):
        LlamaCppDecoder(bad)


def test_chat_session_renders_the_models_own_template(llama_path):
    from engine.session import Message, open_chat
    from engine.sampling import SamplerParams
    session = open_chat(llama_path, n_ctx=512, threads=1)
    try:
        assert session.decoder.backend_name == "llama.cpp"
        messages = [Message("user", "hello there")]
        text = session.render_text(messages, "be brief")
        assert text == ("<|bos|><|im_start|>system\nbe brief<|im_end|>\n"
                        "<|im_start|>user\nhello there<|im_end|>\n<|im_start|>assistant\n")
        events = list(session.generate(messages, "be brief", SamplerParams.greedy_params(), 12))
        done = events[-1]
        assert done.kind == "done" and done.stats.generated == 12
        first_prefill = session.counters["last_prefilled_tokens"]
        messages += [Message("assistant", done.stats.text), Message("user", "and again")]
        list(session.generate(messages, "be brief", SamplerParams.greedy_params(), 4))
        second_prefill = session.counters["last_prefilled_tokens"]
        new_part = len(session.render(messages, "be brief")) - session.counters["kv_reused_tokens"]
        assert session.counters["kv_reused_tokens"] >= first_prefill     # the first prompt stays cached
        assert second_prefill == new_part < first_prefill + 12
    finally:
        session.close()
