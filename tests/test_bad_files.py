"""Every kind of broken file ends in its typed error, naming the file, the tensor (where there is
one) and the reason -- quickly and without a large allocation."""
from __future__ import annotations

import math
import re
import struct
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from engine import quants
from engine.errors import ModelFormatError, UnsupportedModelError
from engine.gguf_file import I2_S, ValueType
from engine.gguf_write import Typed, array_tensor
from engine.model import inspect_gguf, load_model

TIME_BOUND_S = 1.0
MEMORY_BOUND = 4 * 2**20
U64_MAX = 2**64 - 1
ANY_TENSOR = object()


def expect_error(path, reason: str, tensor: str | None = None, exc=ModelFormatError, header: bool = True):
    """load_model(path) raises `exc` whose reason matches `reason`, within the time and memory
    bounds; for a header-level fault inspect_gguf raises it too."""
    calls = [load_model] + ([inspect_gguf] if header else [])
    for call in calls:
        tracemalloc.start()
        start = time.perf_counter()
        try:
            with pytest.raises(exc) as info:
                call(path)
        finally:
            elapsed = time.perf_counter() - start
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        err = info.value
        assert err.path == str(path) and str(path) in str(err)
        assert re.search(reason, err.reason), err.reason
        if tensor is not ANY_TENSOR:
            assert err.tensor == tensor
        if isinstance(tensor, str):
            assert tensor in str(err)
        assert elapsed < TIME_BOUND_S, f"{call.__name__} took {elapsed:.2f} s"
        assert peak < MEMORY_BOUND, f"{call.__name__} allocated {peak} bytes"


@pytest.fixture(scope="module")
def good(tiny_model_path) -> bytes:
    """A valid tiny I2_S model (byte vocabulary), as bytes to corrupt."""
    return tiny_model_path("i2_s", tokenizer=False).read_bytes()


def _write(tmp_path, data: bytes, name: str = "bad.gguf"):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _tensor_info_pos(data: bytes, name: str) -> int:
    """Offset of the n_dims field of a tensor's directory entry."""
    pos = data.find(struct.pack("<Q", len(name)) + name.encode())
    assert pos > 0
    return pos + 8 + len(name)


def _patch(data: bytes, pos: int, fmt: str, value) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, pos, value)
    return bytes(out)


def _kv_value_pos(data: bytes, key: str) -> int:
    """Offset of a metadata entry's value type field."""
    pos = data.find(struct.pack("<Q", len(key)) + key.encode())
    assert pos > 0
    return pos + 8 + len(key)


# ---- the header ----------------------------------------------------------------------------------
def test_valid_file_loads(good, tmp_path):
    with load_model(_write(tmp_path, good)) as m:
        assert m.hparams.n_layer == 2


@pytest.mark.parametrize("cut", [0.0, 0.00003, 0.0001, 0.005, 0.02, 0.05, 0.3, 0.9, 0.99999])
def test_truncated(good, tmp_path, cut):
    n = max(0, math.floor(len(good) * cut))
    path = _write(tmp_path, good[:n])
    # where the cut falls decides which check notices first: all of them are typed errors
    expect_error(path, r"truncated|past the end|shorter than|cannot fit|exceeds|more than the whole file",
                 tensor=ANY_TENSOR if cut < 0.3 else _last_tensor_name_before(good, n))


def _last_tensor_name_before(data: bytes, n: int) -> str:
    """The tensor a cut at byte n names: the first whose data runs past the new end."""
    from engine.gguf_file import GGUFFile
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "whole.gguf"
        path.write_bytes(data)
        with GGUFFile(path) as g:
            return next(t.name for t in g.tensors.values() if t.offset + t.nbytes > n)


def test_empty_file(tmp_path):
    expect_error(_write(tmp_path, b""), "shorter than a GGUF header")


@pytest.mark.parametrize("magic", [b"GGUG", b"\0\0\0\0", b"FUGG", b"PK\x03\x04"])
def test_wrong_magic(good, tmp_path, magic):
    expect_error(_write(tmp_path, magic + good[4:]), "not a GGUF file")


@pytest.mark.parametrize("version", [0, 1, 4, 0xFFFFFFFF, 0x03000000])
def test_wrong_version(good, tmp_path, version):
    expect_error(_write(tmp_path, _patch(good, 4, "<I", version)), f"unsupported GGUF version {version}")


def test_big_endian_file(good, tmp_path):
    expect_error(_write(tmp_path, _patch(good, 4, ">I", 3)), "big-endian")


@pytest.mark.parametrize("count", [U64_MAX, 2**62, 10**6])
def test_absurd_tensor_count(good, tmp_path, count):
    expect_error(_write(tmp_path, _patch(good, 8, "<Q", count)), f"tensor count {count} cannot fit")


@pytest.mark.parametrize("count", [U64_MAX, 2**40, 10**6])
def test_absurd_metadata_count(good, tmp_path, count):
    expect_error(_write(tmp_path, _patch(good, 16, "<Q", count)), f"metadata count {count} cannot fit")


def test_absurd_key_length(good, tmp_path):
    expect_error(_write(tmp_path, _patch(good, 24, "<Q", 2**62)), "metadata key length .* exceeds")


def test_absurd_string_value_length(good, tmp_path):
    pos = _kv_value_pos(good, "general.name")
    assert struct.unpack_from("<I", good, pos)[0] == ValueType.STRING
    expect_error(_write(tmp_path, _patch(good, pos + 4, "<Q", U64_MAX)), "string value of 'general.name' length")


@pytest.mark.parametrize("count", [U64_MAX, 2**60, 10**7])
def test_absurd_array_length(good, tmp_path, count):
    pos = _kv_value_pos(good, "tokenizer.ggml.tokens")
    assert struct.unpack_from("<II", good, pos) == (ValueType.ARRAY, ValueType.STRING)
    expect_error(_write(tmp_path, _patch(good, pos + 8, "<Q", count)), "array length .* exceeds")


def test_absurd_string_inside_array(good, tmp_path):
    pos = _kv_value_pos(good, "tokenizer.ggml.tokens")
    expect_error(_write(tmp_path, _patch(good, pos + 16 + 8 * 3 + 3, "<Q", 2**61)), "string length .* exceeds")


def test_unknown_value_type(good, tmp_path):
    pos = _kv_value_pos(good, "general.name")
    expect_error(_write(tmp_path, _patch(good, pos, "<I", 13)), "unknown value type 13")


def _raw_header(kvs: bytes, n_kv: int, n_tensors: int = 0) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + kvs + b"\0" * 64


def _kv(key: str, vtype: int, payload: bytes) -> bytes:
    return struct.pack("<Q", len(key)) + key.encode() + struct.pack("<I", vtype) + payload


def test_duplicate_key(tmp_path):
    kv = _kv("a", ValueType.UINT32, struct.pack("<I", 1))
    expect_error(_write(tmp_path, _raw_header(kv + kv, 2)), "duplicate metadata key 'a'")


def test_arrays_nested_too_deep(tmp_path):
    payload = struct.pack("<IQ", ValueType.ARRAY, 1) * 6 + struct.pack("<IQ", ValueType.UINT8, 0)
    expect_error(_write(tmp_path, _raw_header(_kv("deep", ValueType.ARRAY, payload), 1)), "nested deeper")


def test_invalid_utf8_key(tmp_path):
    kv = struct.pack("<Q", 2) + b"\xff\xfe" + struct.pack("<II", ValueType.UINT32, 1)
    expect_error(_write(tmp_path, _raw_header(kv, 1)), "not valid UTF-8")


@pytest.mark.parametrize("alignment", [0, 3, 48, 2**30])
def test_bad_alignment(tmp_path, alignment):
    raw = _kv("general.alignment", ValueType.UINT32, struct.pack("<I", alignment))
    expect_error(_write(tmp_path, _raw_header(raw, 1)), "general.alignment")


# ---- the tensor directory ------------------------------------------------------------------------
def test_tensor_past_the_end(good, tmp_path):
    name = "output_norm.weight"
    pos = _tensor_info_pos(good, name) + 4 + 8 + 4          # n_dims, one dim, type -> offset
    expect_error(_write(tmp_path, _patch(good, pos, "<Q", 2**40)), "past the end", tensor=name)


def test_tensor_just_past_the_end(good, tmp_path):
    name = "output_norm.weight"
    pos = _tensor_info_pos(good, name) + 4 + 8 + 4
    offset = struct.unpack_from("<Q", good, pos)[0]
    expect_error(_write(tmp_path, _patch(good, pos, "<Q", offset + 32)), "past the end", tensor=name)


def test_misaligned_tensor_offset(good, tmp_path):
    name = "blk.0.attn_norm.weight"
    pos = _tensor_info_pos(good, name) + 4 + 8 + 4
    offset = struct.unpack_from("<Q", good, pos)[0]
    expect_error(_write(tmp_path, _patch(good, pos, "<Q", offset + 4)), "not aligned", tensor=name)


def test_unknown_tensor_type(good, tmp_path):
    name = "blk.1.attn_q.weight"
    pos = _tensor_info_pos(good, name) + 4 + 16
    assert struct.unpack_from("<I", good, pos)[0] == I2_S
    expect_error(_write(tmp_path, _patch(good, pos, "<I", 99)), "unknown ggml type 99", tensor=name)


@pytest.mark.parametrize("n_dims", [0, 5, 2**31])
def test_bad_dimension_count(good, tmp_path, n_dims):
    name = "blk.0.ffn_up.weight"
    expect_error(_write(tmp_path, _patch(good, _tensor_info_pos(good, name), "<I", n_dims)),
                 "dimensions", tensor=name)


@pytest.mark.parametrize("dim", [0, 2**62, 2**40])
def test_bad_dimension(good, tmp_path, dim):
    name = "blk.0.ffn_up.weight"
    expect_error(_write(tmp_path, _patch(good, _tensor_info_pos(good, name) + 4 + 8, "<Q", dim)),
                 "invalid dimensions|more than the whole file", tensor=name)


def test_dimension_product_overflow(good, tmp_path):
    name = "blk.0.ffn_up.weight"
    pos = _tensor_info_pos(good, name) + 4
    data = _patch(_patch(good, pos, "<Q", 2**61), pos + 8, "<Q", 2**61)
    expect_error(_write(tmp_path, data), "more than the whole file", tensor=name)


def test_row_not_a_multiple_of_the_block(good, tmp_path):
    name = "token_embd.weight"
    pos = _tensor_info_pos(good, name) + 4
    assert struct.unpack_from("<Q", good, pos)[0] == 256
    data = _patch(_patch(good, pos, "<Q", 255), pos + 16, "<I", 8)     # 255 columns of Q8_0
    expect_error(_write(tmp_path, data), "not a multiple of Q8_0's block of 32", tensor=name)


# ---- the model ---------------------------------------------------------------------------------
@pytest.fixture()
def rewrite(tiny_model_path, rewrite_gguf, tmp_path):
    src = tiny_model_path("i2_s", tokenizer=False)
    return lambda **kw: rewrite_gguf(src, tmp_path / "m.gguf", **kw)


def test_missing_tensor(rewrite):
    path = rewrite(drop_tensors=("blk.1.ffn_down.weight",))
    expect_error(path, "missing tensor", tensor="blk.1.ffn_down.weight", header=False)
    assert inspect_gguf(path).kind == "unsupported"


def test_wrong_shape(rewrite):
    name = "blk.0.attn_k.weight"
    bad = array_tensor(name, (256, 256), I2_S, quants.pack_i2_s(np.zeros(256 * 256, np.int8), 0.5))
    expect_error(rewrite(tensors={name: bad}), r"shape \[256, 256\], expected \[256, 128\]", tensor=name, header=False)


def test_wrong_norm_shape(rewrite):
    name = "blk.1.ffn_sub_norm.weight"
    bad = array_tensor(name, (256,), 0, np.ones(256, np.float32))
    expect_error(rewrite(tensors={name: bad}), r"expected \[512\]", tensor=name, header=False)


def test_unsupported_ternary_type(rewrite):
    name = "blk.0.ffn_gate.weight"
    bad = array_tensor(name, (256, 512), 8, quants.quantize(np.zeros(256 * 512), 8))    # Q8_0
    expect_error(rewrite(tensors={name: bad}), "Q8_0 is not supported for a ternary weight",
                 tensor=name, exc=UnsupportedModelError, header=False)


def test_unknown_architecture(rewrite):
    path = rewrite(set_keys={"general.architecture": "gpt-j"})
    expect_error(path, "architecture 'gpt-j' is not BitNet", exc=UnsupportedModelError, header=False)
    assert inspect_gguf(path).kind == "llama.cpp"


def test_missing_architecture(rewrite):
    expect_error(rewrite(drop_keys=("general.architecture",)), "general.architecture", header=False)


def test_missing_hparam(rewrite):
    expect_error(rewrite(drop_keys=("bitnet-b1.58.embedding_length",)), "missing metadata key", header=False)


def test_hparam_of_wrong_type(rewrite):
    expect_error(rewrite(set_keys={"bitnet-b1.58.block_count": "two"}), "expected int", header=False)


def test_absurd_block_count(rewrite):
    expect_error(rewrite(set_keys={"bitnet-b1.58.block_count": 10**9}), "block_count", header=False)


def test_heads_do_not_divide(rewrite):
    expect_error(rewrite(set_keys={"bitnet-b1.58.attention.head_count_kv": 3}), "do not divide", header=False)


def test_vocab_size_mismatch(rewrite):
    expect_error(rewrite(set_keys={"bitnet-b1.58.vocab_size": 300}), "vocab_size 300",
                 tensor="token_embd.weight", header=False)


def test_token_list_mismatch(rewrite):
    path = rewrite(set_keys={"tokenizer.ggml.tokens": Typed(ValueType.ARRAY, ["a", "b"], ValueType.STRING)})
    expect_error(path, "tokenizer has 2 tokens", tensor="token_embd.weight", header=False)


def test_non_finite_i2_s_scale(rewrite):
    name = "blk.0.attn_v.weight"
    bad = array_tensor(name, (256, 128), I2_S, quants.pack_i2_s(np.zeros(256 * 128, np.int8), float("nan")))
    expect_error(rewrite(tensors={name: bad}), "not finite", tensor=name, header=False)
