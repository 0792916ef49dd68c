"""Own GGUF v3 writer (the `gguf` package cannot write bitnet.cpp's type 36).

Tensors are streamed: each `WriterTensor` carries its size up front and a callable that yields
its bytes in chunks, so a 1.2 GB model is written without holding it in memory. The file is
written beside its destination and renamed into place only when complete.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from collections.abc import Sequence

import numpy as np

from engine.gguf_file import DEFAULT_ALIGNMENT, GGUF_MAGIC, SCALAR_DTYPES, ValueType, tensor_nbytes

_DTYPE_TO_VTYPE = {dtype: vtype for vtype, dtype in SCALAR_DTYPES.items() if vtype != ValueType.BOOL}


@dataclass(frozen=True)
class Typed:
    """A metadata value with an explicit GGUF type (for arrays: ARRAY and the element type)."""
    vtype: int
    value: Any
    elem_type: int | None = None


@dataclass
class WriterTensor:
    name: str
    shape: tuple[int, ...]                  # ggml order: ne0 (row length) first
    ggml_type: int
    chunks: Callable[[], Iterable[bytes | np.ndarray]]   # yields exactly nbytes in total

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.ggml_type, self.shape)


def array_tensor(name: str, shape: tuple[int, ...], ggml_type: int, data: np.ndarray) -> WriterTensor:
    """A tensor whose bytes are already in memory."""
    return WriterTensor(name, shape, ggml_type, lambda: [np.ascontiguousarray(data).view(np.uint8).reshape(-1)])


def infer_type(value: Any) -> Typed:
    """Python/numpy value -> its GGUF type, following llama.cpp's conventions: non-negative ints
    are UINT32 (ids, counts), int lists INT32, floats FLOAT32."""
    if isinstance(value, Typed):
        return value
    if isinstance(value, (bool, np.bool_)):
        return Typed(ValueType.BOOL, bool(value))
    if isinstance(value, np.generic):
        return Typed(_DTYPE_TO_VTYPE[value.dtype.newbyteorder("<")], value.item())
    if isinstance(value, int):
        if 0 <= value < 1 << 32:
            return Typed(ValueType.UINT32, value)
        return Typed(ValueType.INT32 if -(1 << 31) <= value < 0 else ValueType.INT64, value)
    if isinstance(value, float):
        return Typed(ValueType.FLOAT32, value)
    if isinstance(value, str):
        return Typed(ValueType.STRING, value)
    if isinstance(value, np.ndarray):
        etype = ValueType.BOOL if value.dtype == np.bool_ else _DTYPE_TO_VTYPE[value.dtype.newbyteorder("<")]
        return Typed(ValueType.ARRAY, value, etype)
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):   # list, tuple, StringArray
        value = list(value)
        return Typed(ValueType.ARRAY, value, _list_elem_type(value))
    raise TypeError(f"cannot store {type(value).__name__} in GGUF metadata")


def _list_elem_type(values) -> int:
    if not values:
        return ValueType.INT32
    first = values[0]
    if isinstance(first, str):
        return ValueType.STRING
    if isinstance(first, bool):
        return ValueType.BOOL
    if isinstance(first, int):
        return ValueType.INT32
    if isinstance(first, float):
        return ValueType.FLOAT32
    raise TypeError(f"cannot store a list of {type(first).__name__} in GGUF metadata")


def _encode_string(s: str) -> bytes:
    data = s.encode("utf-8", errors="surrogateescape")
    return struct.pack("<Q", len(data)) + data


def _encode_scalar(vtype: int, value) -> bytes:
    if vtype == ValueType.STRING:
        return _encode_string(value)
    if vtype == ValueType.BOOL:
        return b"\x01" if value else b"\x00"
    return np.array([value], dtype=SCALAR_DTYPES[vtype]).tobytes()


def _encode_value(t: Typed) -> bytes:
    if t.vtype != ValueType.ARRAY:
        return _encode_scalar(t.vtype, t.value)
    values = t.value
    head = struct.pack("<IQ", t.elem_type, len(values))
    if t.elem_type == ValueType.STRING:
        return head + b"".join(_encode_string(v) for v in values)
    if t.elem_type in SCALAR_DTYPES:
        dtype = SCALAR_DTYPES[t.elem_type]
        return head + np.asarray(values).astype(dtype if t.elem_type != ValueType.BOOL else np.uint8).tobytes()
    if t.elem_type == ValueType.ARRAY:     # each element: its own element type, length, values
        return head + b"".join(_encode_value(infer_type(v)) for v in values)
    raise TypeError(f"cannot write arrays of value type {t.elem_type}")


def _padding(pos: int, alignment: int) -> bytes:
    return b"\x00" * (-pos % alignment)


def encode_header(metadata: dict[str, Any], tensors: list[WriterTensor], alignment: int) -> tuple[bytes, list[int]]:
    """The header bytes (through the padding before the data) and each tensor's data offset."""
    meta = dict(metadata)
    meta["general.alignment"] = Typed(ValueType.UINT32, alignment)
    parts = [GGUF_MAGIC, struct.pack("<IQQ", 3, len(tensors), len(meta))]
    for key, value in meta.items():
        t = infer_type(value)
        parts.append(_encode_string(key) + struct.pack("<I", t.vtype) + _encode_value(t))
    offsets, pos = [], 0
    for t in tensors:
        offsets.append(pos)
        parts.append(_encode_string(t.name) + struct.pack("<I", len(t.shape))
                     + struct.pack(f"<{len(t.shape)}Q", *t.shape) + struct.pack("<IQ", t.ggml_type, pos))
        pos += t.nbytes + len(_padding(t.nbytes, alignment))
    header = b"".join(parts)
    return header + _padding(len(header), alignment), offsets


def write_gguf(path, metadata: dict[str, Any], tensors: list[WriterTensor],
               alignment: int = DEFAULT_ALIGNMENT) -> Path:
    """Write a GGUF v3 file. Metadata values are plain Python/numpy values (see infer_type) or
    `Typed`; `general.alignment` is always written."""
    path = Path(path)
    header, _ = encode_header(metadata, tensors, alignment)
    tmp = path.with_name(path.name + ".part")
    try:
        with open(tmp, "wb") as f:
            f.write(header)
            for t in tensors:
                written = 0
                for chunk in t.chunks():
                    data = memoryview(np.ascontiguousarray(chunk).view(np.uint8).reshape(-1)
                                      if isinstance(chunk, np.ndarray) else chunk)
                    f.write(data)
                    written += data.nbytes
                if written != t.nbytes:
                    raise ValueError(f"tensor {t.name}: wrote {written} bytes, expected {t.nbytes}")
                f.write(_padding(written, alignment))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
