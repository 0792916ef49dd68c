"""Own GGUF v2/v3 reader: memory-mapped, bounds-checked, and aware of bitnet.cpp's type 36 (I2_S).

Every number taken from the file is checked against the file's size before it is used to
allocate or index anything, so a truncated or hostile file ends in a ModelFormatError naming
the file, the tensor (if any) and the reason -- never a crash, a hang or a huge allocation.
Tensor data is never copied: `tensor_bytes()` returns a memoryview into the mmap.
"""
from __future__ import annotations

import array
import logging
import mmap
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine.errors import ModelFormatError, UnsupportedModelError

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4            # GGML_MAX_DIMS
MAX_NAME_BYTES = 63     # GGML_MAX_NAME is 64 including the terminating NUL
MAX_ARRAY_NESTING = 4
MAX_ALIGNMENT = 1 << 20

# ---------------------------------------------------------------------------------------------
# ggml tensor types
# ---------------------------------------------------------------------------------------------
F32, F16, Q4_0, Q8_0, Q6_K, BF16, TQ1_0, TQ2_0 = 0, 1, 2, 8, 14, 30, 34, 35
# Every upstream ggml type: id -> (name, weights per block, bytes per block), as gguf-py's
# GGML_QUANT_SIZES (tests/test_gguf_roundtrip.py checks them equal). Kept here so that reading a
# file does not import gguf-py (its import pulls in ~4.6 MB of modules: yaml, requests' parsers).
GGML_TYPES = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    9: ("Q8_1", 32, 40),
    10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66),
    17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18),
    21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1),
    25: ("I16", 1, 2),
    26: ("I32", 1, 4),
    27: ("I64", 1, 8),
    28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2),
    34: ("TQ1_0", 256, 54),
    35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17),
    40: ("NVFP4", 64, 36),
    41: ("Q1_0", 128, 18),
}
# bitnet.cpp's fork numbers its own types from 36 on (upstream ggml reuses 39+ for MXFP4 ...).
I2_S, I8_S, TL1, TL2 = 36, 37, 38, 39
BITNET_CPP_ARCHS = ("bitnet-b1.58", "bitnet-25")
_BITNET_CPP_ONLY_TYPES = {I8_S: "I8_S", TL1: "TL1", TL2: "TL2"}


def type_name(ggml_type: int, arch: str | None = None) -> str:
    if ggml_type == I2_S:
        return "I2_S"
    if arch in BITNET_CPP_ARCHS and ggml_type in _BITNET_CPP_ONLY_TYPES:
        return _BITNET_CPP_ONLY_TYPES[ggml_type]
    return GGML_TYPES[ggml_type][0] if ggml_type in GGML_TYPES else f"type{ggml_type}"


def tensor_nbytes(ggml_type: int, shape: tuple[int, ...], arch: str | None = None) -> int:
    """Bytes a tensor of this type and ggml shape (ne0 first) occupies; raises ValueError with
    the reason for a type this reader cannot size or a shape the type cannot hold."""
    n = 1
    for d in shape:
        n *= d
    if ggml_type == I2_S:
        # bitnet.cpp: 2 bits per weight, then one f32 scale and padding to 32 bytes (n/4 + 32).
        if n % 4:
            raise ValueError(f"I2_S tensor with {n} elements (not a multiple of 4)")
        return n // 4 + 32
    if arch in BITNET_CPP_ARCHS and ggml_type in _BITNET_CPP_ONLY_TYPES:
        raise TypeError(f"bitnet.cpp type {_BITNET_CPP_ONLY_TYPES[ggml_type]} ({ggml_type}) is not supported "
                        "(re-convert the model to I2_S)")
    if ggml_type not in GGML_TYPES:
        raise ValueError(f"unknown ggml type {ggml_type}")
    _, block, size = GGML_TYPES[ggml_type]
    if shape[0] % block:
        raise ValueError(f"row length {shape[0]} is not a multiple of {type_name(ggml_type)}'s block of {block}")
    return n // block * size


# ---------------------------------------------------------------------------------------------
# metadata value types
# ---------------------------------------------------------------------------------------------
class ValueType:
    UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL = 0, 1, 2, 3, 4, 5, 6, 7
    STRING, ARRAY, UINT64, INT64, FLOAT64 = 8, 9, 10, 11, 12


# value type -> numpy dtype of a scalar/array element
SCALAR_DTYPES = {
    ValueType.UINT8: np.dtype("<u1"), ValueType.INT8: np.dtype("<i1"),
    ValueType.UINT16: np.dtype("<u2"), ValueType.INT16: np.dtype("<i2"),
    ValueType.UINT32: np.dtype("<u4"), ValueType.INT32: np.dtype("<i4"),
    ValueType.FLOAT32: np.dtype("<f4"), ValueType.BOOL: np.dtype("u1"),
    ValueType.UINT64: np.dtype("<u8"), ValueType.INT64: np.dtype("<i8"),
    ValueType.FLOAT64: np.dtype("<f8"),
}
# the fewest bytes one value of a type can take in the file (used to reject absurd counts)
_MIN_VALUE_BYTES = {**{t: d.itemsize for t, d in SCALAR_DTYPES.items()},
                    ValueType.STRING: 8, ValueType.ARRAY: 12}
_MIN_KV_BYTES = 8 + 1 + 4 + 1          # key length, 1-byte key, value type, smallest value
_MIN_TENSOR_INFO_BYTES = 8 + 1 + 4 + 8 + 4 + 8   # name length, name, n_dims, one dim, type, offset


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]   # ggml order: ne0 (row length) first
    ggml_type: int
    offset: int              # absolute byte offset in the file
    nbytes: int

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


class _Cursor:
    """Reads little-endian values from a buffer, checking every read against its end."""

    def __init__(self, buf, path: Path, pos: int = 0):
        self.buf = buf
        self.end = len(buf)
        self.path = path
        self.pos = pos

    def fail(self, reason: str, tensor: str | None = None):
        raise ModelFormatError(self.path, reason, tensor=tensor)

    @property
    def remaining(self) -> int:
        return self.end - self.pos

    def need(self, n: int, what: str, tensor: str | None = None) -> None:
        if n < 0 or n > self.remaining:
            self.fail(f"truncated: {what} needs {n} bytes at offset {self.pos}, "
                      f"file has {self.remaining} left", tensor)

    def unpack(self, fmt: str, what: str, tensor: str | None = None):
        size = struct.calcsize(fmt)
        self.need(size, what, tensor)
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += size
        return value

    def u32(self, what: str, tensor: str | None = None) -> int:
        return self.unpack("<I", what, tensor)

    def u64(self, what: str, tensor: str | None = None) -> int:
        return self.unpack("<Q", what, tensor)

    def raw_string(self, what: str, tensor: str | None = None) -> bytes:
        length = self.u64(f"{what} length", tensor)
        if length > self.remaining:
            self.fail(f"{what} length {length} exceeds the {self.remaining} bytes left in the file", tensor)
        data = self.buf[self.pos:self.pos + length]
        self.pos += length
        return bytes(data)

    def string(self, what: str, tensor: str | None = None) -> str:
        # Values keep undecodable bytes (surrogateescape) rather than losing them.
        return self.raw_string(what, tensor).decode("utf-8", errors="surrogateescape")

    def strict_string(self, what: str, tensor: str | None = None) -> str:
        data = self.raw_string(what, tensor)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            self.fail(f"{what} is not valid UTF-8", tensor)


# ---------------------------------------------------------------------------------------------
# the reader
# ---------------------------------------------------------------------------------------------
LONG_ARRAY = 4096    # arrays at least this long stay packed: strings decoded on access, numbers in numpy


class StringArray(Sequence):
    """A long string array of the header (a vocabulary's tokens and merges), kept as its UTF-8
    text packed end to end and decoded on access: as ~400k Python strings it would hold ~40 MB
    for the life of a model whose tokenizer is built once; packed it is ~4 MB (and independent
    of the mapping)."""

    def __init__(self, text: bytes | bytearray, bounds: np.ndarray):
        self._text = text                # every string's UTF-8 bytes, end to end
        self._bounds = bounds            # (n + 1,) int32 or int64: string i is text[b[i]:b[i+1]]

    def __len__(self) -> int:
        return len(self._bounds) - 1

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        n = len(self)
        if not -n <= index < n:
            raise IndexError("StringArray index out of range")
        index %= n
        return str(self._text[self._bounds[index]:self._bounds[index + 1]], "utf-8", "surrogateescape")

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __eq__(self, other) -> bool:
        if isinstance(other, (list, tuple, StringArray)):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    def __repr__(self) -> str:
        return f"StringArray({len(self)} strings)"


class GGUFFile:
    """An open GGUF file: `metadata` (key -> value), `kv_types` (key -> value type, or
    (ARRAY, element type)), `tensors` (name -> TensorInfo, in file order), and the data
    through `tensor_bytes(name)` / `tensor_array(name)` without copying."""

    def __init__(self, path):
        self.path = Path(path)
        self.metadata: dict[str, Any] = {}
        self.kv_types: dict[str, Any] = {}
        self.tensors: dict[str, TensorInfo] = {}
        self._mm: mmap.mmap | None = None
        self._view: memoryview | None = None
        try:
            with open(self.path, "rb") as f:
                self.file_size = self._map(f)
        except OSError as e:
            raise ModelFormatError(self.path, f"cannot open: {e.strerror or e}") from e
        try:
            self._parse()
        except BaseException:
            self.close()
            raise

    def _map(self, f) -> int:
        size = f.seek(0, 2)
        if size < 24:
            raise ModelFormatError(self.path, f"truncated: {size} bytes is shorter than a GGUF header")
        self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self._view = memoryview(self._mm)
        return size

    # -- header ---------------------------------------------------------------------------------
    def _parse(self) -> None:
        cur = _Cursor(self._view, self.path)
        magic = bytes(self._view[0:4])
        if magic != GGUF_MAGIC:
            cur.fail(f"not a GGUF file (magic {magic!r})")
        cur.pos = 4
        self.version = cur.u32("version")
        if self.version not in SUPPORTED_VERSIONS:
            if int.from_bytes(self.version.to_bytes(4, "little"), "big") in SUPPORTED_VERSIONS:
                cur.fail(f"unsupported GGUF version {self.version}: a big-endian file (Tern reads little-endian GGUF)")
            cur.fail(f"unsupported GGUF version {self.version} (supported: 2, 3)")
        n_tensors = cur.u64("tensor count")
        n_kv = cur.u64("metadata count")
        if n_kv * _MIN_KV_BYTES > cur.remaining:
            cur.fail(f"metadata count {n_kv} cannot fit in the {cur.remaining} bytes left in the file")
        if n_tensors * _MIN_TENSOR_INFO_BYTES > cur.remaining:
            cur.fail(f"tensor count {n_tensors} cannot fit in the {cur.remaining} bytes left in the file")
        for _ in range(n_kv):
            self._read_kv(cur)
        self.arch = self.metadata.get("general.architecture")
        self.alignment = self._alignment(cur)
        for _ in range(n_tensors):
            self._read_tensor_info(cur)
        self.data_offset = -(-cur.pos // self.alignment) * self.alignment
        self._check_tensor_ranges(cur)

    def _read_kv(self, cur: _Cursor) -> None:
        key = cur.strict_string("metadata key")
        if key in self.metadata:
            cur.fail(f"duplicate metadata key {key!r}")
        vtype = cur.u32(f"type of {key!r}")
        value, typ = self._read_value(cur, vtype, key, depth=0)
        self.metadata[key] = value
        self.kv_types[key] = typ

    def _read_value(self, cur: _Cursor, vtype: int, key: str, depth: int):
        if vtype in SCALAR_DTYPES:
            dtype = SCALAR_DTYPES[vtype]
            cur.need(dtype.itemsize, f"value of {key!r}")
            value = np.frombuffer(cur.buf, dtype, 1, cur.pos)[0].item()
            cur.pos += dtype.itemsize
            return (bool(value) if vtype == ValueType.BOOL else value), vtype
        if vtype == ValueType.STRING:
            return cur.string(f"string value of {key!r}"), vtype
        if vtype == ValueType.ARRAY:
            return self._read_array(cur, key, depth)
        cur.fail(f"metadata key {key!r} has unknown value type {vtype}")

    def _read_array(self, cur: _Cursor, key: str, depth: int):
        if depth >= MAX_ARRAY_NESTING:
            cur.fail(f"metadata key {key!r}: arrays nested deeper than {MAX_ARRAY_NESTING}")
        etype = cur.u32(f"array element type of {key!r}")
        count = cur.u64(f"array length of {key!r}")
        if etype not in _MIN_VALUE_BYTES:
            cur.fail(f"metadata key {key!r}: array of unknown value type {etype}")
        if count * _MIN_VALUE_BYTES[etype] > cur.remaining:
            cur.fail(f"metadata key {key!r}: array length {count} exceeds the {cur.remaining} bytes left in the file")
        if etype in SCALAR_DTYPES:
            dtype = SCALAR_DTYPES[etype]
            packed = np.frombuffer(cur.buf, dtype, count, cur.pos)
            cur.pos += count * dtype.itemsize
            if count >= LONG_ARRAY and etype != ValueType.BOOL:
                # A vocabulary's token types as Python ints would hold ~4.6 MB; packed, 0.5 MB.
                values = packed.copy()
                values.flags.writeable = False
                return values, (ValueType.ARRAY, etype)
            values = packed.tolist()
            if etype == ValueType.BOOL:
                values = [bool(v) for v in values]
            return values, (ValueType.ARRAY, etype)
        if etype == ValueType.STRING:
            return self._read_string_array(cur, key, count), (ValueType.ARRAY, etype)
        items = [self._read_value(cur, ValueType.ARRAY, key, depth + 1) for _ in range(count)]
        return [v for v, _ in items], (ValueType.ARRAY, etype)

    @staticmethod
    def _read_string_array(cur: _Cursor, key: str, count: int) -> "list[str] | StringArray":
        # The hot loop of header parsing (128k tokens, 280k merges): kept tight on purpose. A long
        # array's text is gathered as it is read (no large temporaries: they would stay in the
        # heap for the life of the process).
        buf, pos, end = cur.buf, cur.pos, cur.end
        lazy = count >= LONG_ARRAY
        out: list[str] = []
        text, bounds = bytearray(), array.array("q")   # a long array's packed form
        unpack = struct.Struct("<Q").unpack_from
        for _ in range(count):
            if pos + 8 > end:
                cur.pos = pos
                cur.fail(f"truncated: string in array {key!r} at offset {pos}")
            (length,) = unpack(buf, pos)
            pos += 8
            if length > end - pos:
                cur.pos = pos
                cur.fail(f"metadata key {key!r}: string length {length} exceeds the {end - pos} bytes left in the file")
            if lazy:
                bounds.append(len(text))
                text += buf[pos:pos + length]
            else:
                out.append(str(buf[pos:pos + length], "utf-8", "surrogateescape"))
            pos += length
        cur.pos = pos
        if not lazy:
            return out
        bounds.append(len(text))
        return StringArray(text, np.frombuffer(bounds, dtype=np.int64).astype(
            np.int32 if len(text) < 2**31 else np.int64))   # int32: half the bytes

    def _alignment(self, cur: _Cursor) -> int:
        align = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if (not isinstance(align, int) or isinstance(align, bool) or align <= 0
                or align > MAX_ALIGNMENT or align & (align - 1)):
            cur.fail(f"general.alignment {align!r} is not a power of two up to {MAX_ALIGNMENT}")
        return align

    # -- tensor directory -------------------------------------------------------------------------
    def _read_tensor_info(self, cur: _Cursor) -> None:
        name = cur.strict_string("tensor name")
        if len(name.encode()) > MAX_NAME_BYTES:
            cur.fail(f"tensor name longer than {MAX_NAME_BYTES} bytes", tensor=name[:80])
        if name in self.tensors:
            cur.fail("duplicate tensor name", tensor=name)
        n_dims = cur.u32("tensor dimension count", name)
        if not 1 <= n_dims <= MAX_DIMS:
            cur.fail(f"{n_dims} dimensions (1..{MAX_DIMS} allowed)", tensor=name)
        shape = tuple(cur.u64("tensor dimension", name) for _ in range(n_dims))
        if any(d == 0 or d >= 1 << 62 for d in shape):
            cur.fail(f"invalid dimensions {list(shape)}", tensor=name)
        ggml_type = cur.u32("tensor type", name)
        offset = cur.u64("tensor offset", name)
        try:
            nbytes = tensor_nbytes(ggml_type, shape, self.arch)
        except TypeError as e:
            raise UnsupportedModelError(self.path, str(e), tensor=name) from None
        except ValueError as e:
            cur.fail(str(e), tensor=name)
        if nbytes > self.file_size:
            cur.fail(f"shape {list(shape)} of {type_name(ggml_type, self.arch)} needs {nbytes} bytes, "
                     f"more than the whole file ({self.file_size})", tensor=name)
        if offset % self.alignment:
            cur.fail(f"data offset {offset} is not aligned to {self.alignment}", tensor=name)
        self.tensors[name] = TensorInfo(name, shape, ggml_type, offset, nbytes)

    def _check_tensor_ranges(self, cur: _Cursor) -> None:
        fixed = {}
        for name, t in self.tensors.items():
            start = self.data_offset + t.offset
            if start + t.nbytes > self.file_size:
                cur.fail(f"data [{start}, {start + t.nbytes}) runs past the end of the file "
                         f"({self.file_size} bytes)", tensor=name)
            fixed[name] = TensorInfo(name, t.shape, t.ggml_type, start, t.nbytes)
        self.tensors = fixed

    # -- access ---------------------------------------------------------------------------------
    def type_name(self, ggml_type: int) -> str:
        return type_name(ggml_type, self.arch)

    def tensor(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise ModelFormatError(self.path, "missing tensor", tensor=name) from None

    def tensor_bytes(self, name: str) -> memoryview:
        """The tensor's bytes inside the mmap (no copy)."""
        if self._view is None:
            raise ModelFormatError(self.path, "file is closed", tensor=name)
        t = self.tensor(name)
        return self._view[t.offset:t.offset + t.nbytes]

    def tensor_array(self, name: str) -> np.ndarray:
        """The tensor's bytes as a read-only uint8 array over the mmap (no copy)."""
        return np.frombuffer(self.tensor_bytes(name), dtype=np.uint8)

    def close(self) -> None:
        view, mm = self._view, self._mm
        self._view = self._mm = None
        if view is not None:
            try:
                view.release()
            except BufferError:
                log.debug("%s: tensor views still alive; the mapping closes with them", self.path)
                return
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                log.debug("%s: arrays over the mapping still alive; it closes with them", self.path)

    def __enter__(self) -> "GGUFFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
