#!/usr/bin/env python3
"""Atheris harness over the Python GGUF reader, load_model and native model creation.

    python tests/fuzz_atheris.py CORPUS_DIR [libFuzzer flags, e.g. -max_total_time=600]
    python tests/fuzz_atheris.py --make-seeds DIR    # write the seed inputs

An input is either a raw GGUF file or a list of patches to one of a few small valid models
(BASES, written by make_test_model at start-up; the same seed always gives the same bytes),
so that short inputs reach every check of a complete file: the directory, tensor offsets,
shapes, types and the tensor bytes the native loader reads. Every input must end in success
or a TernError; anything else (another exception, a crash, a hang) is a finding.

Input layout: byte 0 picks the base (0 = raw: the rest is the file). Then up to MAX_PATCHES
records `op:u8 pos:u32 ...`: op % 4 = 0 writes `len:u8` bytes, 1 a u64, 2 a u32, 3 truncates
at pos; op & 0x80 confines pos to the header + tensor directory. The test
tests/test_fuzz_corpus.py replays the kept corpus (tests/fuzz_corpus/gguf) through
`exercise` without atheris.
"""
from __future__ import annotations

import dataclasses
import os
import struct
import sys
import tempfile
from pathlib import Path

MAX_PATCHES = 16


@dataclasses.dataclass(frozen=True)
class Base:
    fmt: str
    n_embd: int          # smallest multiples the formats allow: 128 (I2_S, float), 256 (TQ)
    n_ff: int
    embedding: str


BASES = (
    Base("i2_s", 128, 128, "q4_0"),
    Base("tq2_0", 256, 256, "q8_0"),
    Base("tq1_0", 256, 256, "q6_k"),
    Base("f16", 128, 128, "f16"),
    Base("bf16", 128, 128, "bf16"),
    Base("f32", 128, 128, "f32"),
)


def make_base(base: Base, out: Path) -> Path:
    """One-layer byte-vocabulary model of the base's format (make_test_model with a small
    shape registered for the call only)."""
    from engine import testmodel

    name = f"fuzz-{base.n_embd}-{base.n_ff}"
    testmodel.SHAPES[name] = testmodel.Shape(n_embd=base.n_embd, n_ff=base.n_ff, n_layer=1, n_head=1,
                                             n_head_kv=1, n_ctx=64)
    try:
        return testmodel.make_test_model(out, base.fmt, name, seed=1, embedding_type=base.embedding)
    finally:
        del testmodel.SHAPES[name]


def load_bases(directory: Path) -> list[tuple[bytes, int]]:
    """(file bytes, header + directory length) of every base, written into `directory`."""
    from engine.gguf_file import GGUFFile

    out = []
    for i, base in enumerate(BASES):
        path = make_base(base, directory / f"base{i}.bin")
        with GGUFFile(path) as f:
            header_len = f.data_offset
        out.append((path.read_bytes(), header_len))
    return out


def decode_input(data: bytes, bases: list[tuple[bytes, int]]) -> bytes:
    """The file bytes an input stands for (see the module docstring)."""
    if not data:
        return b""
    pick = data[0] % (len(bases) + 1)
    if pick == 0:
        return data[1:]
    base, header_len = bases[pick - 1]
    buf = bytearray(base)
    pos = 1
    for _ in range(MAX_PATCHES):
        if pos + 5 > len(data) or not buf:
            break
        op, at = data[pos], struct.unpack_from("<I", data, pos + 1)[0]
        pos += 5
        at %= min(header_len, len(buf)) if op & 0x80 else len(buf)
        kind = op % 4
        if kind == 3:
            del buf[at:]
            continue
        if kind == 0:
            n = data[pos] if pos < len(data) else 0
            value = data[pos + 1:pos + 1 + n]
            pos += 1 + n
        else:
            width = 8 if kind == 1 else 4
            value = data[pos:pos + width]
            pos += width
        buf[at:at + len(value)] = value[:len(buf) - at]
    return bytes(buf)


def exercise(path: Path) -> str:
    """Everything a user's file goes through before chatting: header inspection, the reader,
    load_model, its tokenizer, the native model and one forward step. Returns how far it got; raises
    whatever is not a TernError."""
    from engine import native
    from engine.errors import TernError
    from engine.gguf_file import GGUFFile
    from engine.model import inspect_gguf, load_model
    from engine.tokenizer import Tokenizer

    try:
        inspect_gguf(path)
    except TernError:
        pass
    try:
        with GGUFFile(path) as f:
            for name in f.tensors:
                f.tensor_array(name)
    except TernError:
        return "reader error"
    try:
        model = load_model(path)
    except TernError:
        return "load error"
    try:
        Tokenizer.from_gguf_metadata(model.tokenizer_metadata, path).encode("Tern, 1.58 bits")
        model.token_embd.rows([0])
        model.layers[0].wq.codes()
        with native.NativeModel(model, "f16") as nm, native.NativeSession(nm, n_ctx=4) as session:
            session.forward([0, 1 % model.hparams.n_vocab])
        return "ran"
    except TernError:
        return "refused after load"
    finally:
        model.close()


# ---- seeds ----------------------------------------------------------------------------------

def _patch(op: int, at: int, payload: bytes) -> bytes:
    return struct.pack("<BI", op, at) + payload


def make_seeds(out_dir: Path, bases: list[tuple[bytes, int]]) -> list[Path]:
    """Each base untouched, each base's header alone (raw mode), and a few hostile patches in
    the spirit of the bad-file tests: truncation, a huge tensor count, an offset past the end."""
    out_dir.mkdir(parents=True, exist_ok=True)
    seeds: list[bytes] = []
    for i, (base, header_len) in enumerate(bases):
        pick = bytes([i + 1])
        seeds += [
            pick,
            bytes([0]) + base[:min(header_len, 2048)],
            pick + _patch(3, header_len + 100, b""),                 # truncated in the data
            pick + _patch(0x82, 8, struct.pack("<I", 0xFFFFFFFF)),  # tensor count (low half)
            pick + _patch(0x81, header_len - 40, struct.pack("<Q", 1 << 62)),
            pick + _patch(0x80, header_len - 24, bytes([4, 1, 2, 3, 4])),
        ]
    paths = []
    for n, seed in enumerate(seeds):
        path = out_dir / f"seed-{n:03d}"
        path.write_bytes(seed)
        paths.append(path)
    return paths


# ---- atheris entry --------------------------------------------------------------------------

def main(argv: list[str]) -> None:
    # The checkout through the plain path finder: the editable install's import hook would
    # hand atheris a loader it cannot instrument (no coverage at all). The native library
    # comes from TERN_NATIVE_LIB.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__module__.lower()]
    if argv[1:2] == ["--make-seeds"]:
        with tempfile.TemporaryDirectory(prefix="tern-atheris-") as work:
            make_seeds(Path(argv[2]), load_bases(Path(work)))
        return
    import atheris

    with atheris.instrument_imports(include=["engine"]):
        import engine.gguf_file  # noqa: F401
        import engine.model  # noqa: F401
        import engine.native  # noqa: F401
        import engine.quants  # noqa: F401
        import engine.tokenizer  # noqa: F401
    with tempfile.TemporaryDirectory(prefix="tern-atheris-") as work:
        bases = load_bases(Path(work))
    # The input file lives in memory and goes with the process: libFuzzer leaves by exit(),
    # which runs no Python clean-up (fork mode starts a process per job).
    fd = os.memfd_create("tern-atheris-input")
    target = Path(f"/proc/self/fd/{fd}")

    def one_input(data: bytes) -> None:
        file_bytes = decode_input(data, bases)
        os.ftruncate(fd, 0)
        os.pwrite(fd, file_bytes, 0)
        exercise(target)

    atheris.Setup(argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
