"""Our GGUF writer and reader against each other and against gguf-py's independent ones."""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGUFReader, GGUFWriter
from gguf.constants import GGML_QUANT_SIZES
from gguf.constants import GGMLQuantizationType as T

from engine import quants
from engine.gguf_file import F16, F32, GGML_TYPES, I2_S, Q8_0, TQ2_0, GGUFFile, ValueType
from engine.gguf_write import Typed, WriterTensor, array_tensor, write_gguf

METADATA = {
    "general.architecture": "test",
    "u8": Typed(ValueType.UINT8, 255), "i8": Typed(ValueType.INT8, -128),
    "u16": Typed(ValueType.UINT16, 65535), "i16": Typed(ValueType.INT16, -32768),
    "u32": 4_000_000_000, "i32": -5, "u64": Typed(ValueType.UINT64, 2**64 - 1), "i64": -(2**40),
    "f32": 0.25, "f64": Typed(ValueType.FLOAT64, 1e-300), "yes": True, "no": False,
    "np_u32": np.uint32(128009),
    "text": "héllo ✓ \U0001F600",
    "empty": "",
    "ints": [1, -2, 3], "floats": [0.5, -1.5], "strings": ["a", "", "ĠĠ", "<|eot_id|>"],
    "np_i32": np.array([1, 3, 3], dtype=np.int32), "np_f32": np.array([0.0, -1000.0], dtype=np.float32),
    "bools": [True, False], "empty_list": [],
    "nested": Typed(ValueType.ARRAY, [Typed(ValueType.ARRAY, [1, 2], ValueType.INT32),
                                      Typed(ValueType.ARRAY, [3], ValueType.INT32)], ValueType.ARRAY),
}
EXPECTED_TYPES = {
    "u8": ValueType.UINT8, "i8": ValueType.INT8, "u16": ValueType.UINT16, "i16": ValueType.INT16,
    "u32": ValueType.UINT32, "i32": ValueType.INT32, "u64": ValueType.UINT64, "i64": ValueType.INT64,
    "f32": ValueType.FLOAT32, "f64": ValueType.FLOAT64, "yes": ValueType.BOOL, "np_u32": ValueType.UINT32,
    "text": ValueType.STRING, "ints": (ValueType.ARRAY, ValueType.INT32),
    "strings": (ValueType.ARRAY, ValueType.STRING), "np_f32": (ValueType.ARRAY, ValueType.FLOAT32),
    "nested": (ValueType.ARRAY, ValueType.ARRAY),
}


def _plain(v):
    if isinstance(v, Typed):
        return [_plain(x) for x in v.value] if isinstance(v.value, list) else v.value
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    return v


def _tensors():
    rng = np.random.default_rng(5)
    codes = rng.integers(-1, 2, 256 * 3).astype(np.int8)
    f32 = rng.normal(size=(3, 5)).astype(np.float32)
    return [
        array_tensor("f32", (5, 3), F32, f32),
        array_tensor("odd", (7,), F16, np.arange(7, dtype=np.float16)),
        array_tensor("i2s", (256, 3), I2_S, quants.pack_i2_s(codes, 0.5)),
        array_tensor("tq2", (256, 3), TQ2_0, quants.pack_tq2_0(codes, 0.5)),
        array_tensor("q8", (64,), Q8_0, quants.quantize(np.linspace(-1, 1, 64), Q8_0)),
    ], codes, f32


def test_type_table_equals_gguf_py():
    # Reading a file sizes tensors from the engine's own table; it must be gguf-py's, entry for entry.
    assert {t: (name, block, size) for t, (name, block, size) in GGML_TYPES.items()} == {
        int(t): (t.name, block, size) for t, (block, size) in GGML_QUANT_SIZES.items() if int(t) in GGML_TYPES}
    assert set(GGML_TYPES) >= {0, 1, 2, 8, 12, 14, 30, 34, 35}


def test_long_numeric_arrays_stay_packed(tmp_path):
    types = np.arange(5000, dtype=np.int32) % 7
    path = write_gguf(tmp_path / "m.gguf", {"general.architecture": "llama", "t.long": types,
                                           "t.short": [1, 2, 3]}, [])
    with GGUFFile(path) as f:
        long, short = f.metadata["t.long"], f.metadata["t.short"]
    assert isinstance(long, np.ndarray) and not long.flags.writeable and np.array_equal(long, types)
    assert short == [1, 2, 3]


def test_metadata_and_tensors_round_trip(tmp_path):
    tensors, codes, f32 = _tensors()
    path = write_gguf(tmp_path / "m.gguf", METADATA, tensors)
    with GGUFFile(path) as f:
        assert f.version == 3 and f.alignment == 32
        assert f.metadata["general.alignment"] == 32
        for key, value in METADATA.items():
            got = f.metadata[key]
            want = _plain(value)
            assert got == pytest.approx(want) if key == "f32" else got == want, key
        for key, vtype in EXPECTED_TYPES.items():
            assert f.kv_types[key] == vtype, key
        assert list(f.tensors) == [t.name for t in tensors]
        for t in f.tensors.values():
            assert t.offset % 32 == 0 and (t.offset - f.data_offset) % 32 == 0
        assert np.array_equal(np.frombuffer(f.tensor_bytes("f32"), np.float32).reshape(3, 5), f32)
        assert f.tensors["i2s"].nbytes == 256 * 3 // 4 + 32
        assert np.array_equal(quants.unpack_i2_s(f.tensor_bytes("i2s"), 768), codes)
        assert np.array_equal(quants.unpack_tq2_0(f.tensor_bytes("tq2"), 768), codes)
        arr = f.tensor_array("q8")
        assert not arr.flags.writeable and not arr.flags.owndata   # a view of the mapping
        del arr


def test_gguf_py_reads_our_files(tmp_path):
    tensors, _, f32 = _tensors()
    tensors = [t for t in tensors if t.ggml_type != I2_S]      # gguf-py does not know type 36
    path = write_gguf(tmp_path / "m.gguf", {"general.architecture": "test", "strings": ["x", "yz"], "u32": 7}, tensors)
    reader = GGUFReader(path)
    by_name = {t.name: t for t in reader.tensors}
    assert set(by_name) == {t.name for t in tensors}
    assert by_name["tq2"].tensor_type == T.TQ2_0 and list(by_name["tq2"].shape) == [256, 3]
    assert np.array_equal(np.asarray(by_name["f32"].data).reshape(3, 5), f32)
    assert reader.fields["u32"].parts[-1][0] == 7
    assert reader.fields["general.alignment"].parts[-1][0] == 32


def test_we_read_gguf_py_files(tmp_path):
    path = tmp_path / "w.gguf"
    w = GGUFWriter(path, "llama")
    w.add_uint32("llama.block_count", 3)
    w.add_float32("llama.rope.freq_base", 500000.0)
    w.add_token_list(["a", "b", "ĉ"])
    w.add_token_types([1, 3, 6])
    w.add_bool("tokenizer.ggml.add_bos_token", True)
    data = np.random.default_rng(1).normal(size=(4, 32)).astype(np.float32)
    w.add_tensor("t.weight", data)
    w.add_tensor("q.weight", np.asarray(quants.quantize(data, Q8_0)).reshape(4, 34), raw_dtype=T.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with GGUFFile(path) as f:
        assert f.metadata["general.architecture"] == "llama"
        assert f.metadata["llama.block_count"] == 3 and f.kv_types["llama.block_count"] == ValueType.UINT32
        assert f.metadata["llama.rope.freq_base"] == 500000.0
        assert f.metadata["tokenizer.ggml.tokens"] == ["a", "b", "ĉ"]
        assert f.metadata["tokenizer.ggml.token_type"] == [1, 3, 6]
        assert f.tensors["t.weight"].shape == (32, 4)
        assert np.array_equal(np.frombuffer(f.tensor_bytes("t.weight"), np.float32).reshape(4, 32), data)
        assert np.allclose(quants.dequantize(f.tensor_bytes("q.weight"), Q8_0, 128).reshape(4, 32), data, atol=0.03)


def test_writer_streams_chunks_and_checks_sizes(tmp_path):
    good = WriterTensor("a", (64,), F32, lambda: (np.zeros(32, np.float32), np.ones(32, np.float32)))
    path = write_gguf(tmp_path / "s.gguf", {}, [good])
    with GGUFFile(path) as f:
        assert np.frombuffer(f.tensor_bytes("a"), np.float32).tolist() == [0.0] * 32 + [1.0] * 32
    short = WriterTensor("b", (64,), F32, lambda: [np.zeros(10, np.float32)])
    with pytest.raises(ValueError, match="expected 256"):
        write_gguf(tmp_path / "bad.gguf", {}, [short])
    assert not (tmp_path / "bad.gguf").exists() and not (tmp_path / "bad.gguf.part").exists()


def test_test_model_metadata_readable_by_gguf_py(tiny_model_path):
    """The TQ2_0 layout (arch `bitnet`) is a plain upstream GGUF: gguf-py agrees on every tensor."""
    path = tiny_model_path("tq2_0", tokenizer=False)
    reader = GGUFReader(path)
    with GGUFFile(path) as f:
        assert {t.name for t in reader.tensors} == set(f.tensors)
        for t in reader.tensors:
            ours = f.tensors[t.name]
            assert tuple(int(x) for x in t.shape) == ours.shape
            assert int(t.tensor_type) == ours.ggml_type
            assert int(t.data_offset) == ours.offset
