"""Write the fuzzers' seed inputs from real tiny model files.

    python scripts/fuzz_seeds.py OUT_DIR

OUT_DIR/gguf: seeds of the atheris harness (tests/fuzz_atheris.py).
OUT_DIR/native: seeds of the libFuzzer harness native/fuzz/fuzz_params.c, one per base model of
tests/fuzz_atheris.py: its hyper-parameters and, for every matrix, the offset, size, type, shape
and scale the engine hands to tern_model_create (engine/native.py), with the tensor bytes
synthesised by the harness (the `fill` kind per type) so that a seed is a few hundred bytes.
OUT_DIR/native-real: the I2_S base with its real file bytes (for the regression corpus).
"""
from __future__ import annotations

import struct
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import fuzz_atheris  # noqa: E402

from engine.model import load_model  # noqa: E402

HEADER = struct.Struct("<6i2f2i4I2i3i")   # fuzz_header in native/fuzz/fuzz_params.c
MATRIX = struct.Struct("<qQiqqfI")        # fuzz_matrix
# ggml type -> harness fill kind (fill_range): I2_S codes, TQ2_0 blocks, TQ1_0 any bytes,
# f16 / f32 / bf16 small values, block types any bytes.
FILL = {36: 2, 35: 3, 34: 1, 1: 4, 0: 5, 30: 6, 8: 7, 2: 7, 14: 7}
FLAG_FORWARD, FLAG_TWO_THREADS, FLAG_ALL_LOGITS, FLAG_OUTPUT = 1, 2, 4, 8


def _matrix(offset: int, size: int, ggml_type: int, rows: int, cols: int, scale: float, fill: bool) -> bytes:
    kind = FILL.get(ggml_type, 1) if fill else 0
    return MATRIX.pack(offset, size, ggml_type, cols, rows, scale, kind | (0x1234 << 3))


def native_seed(path: Path, flags: int, lm_head: int, kv_type: int, fill: bool, overlay: bool) -> bytes:
    model = load_model(path)
    try:
        f, hp = model.file, model.hparams
        off = {name: t.offset for name, t in f.tensors.items()}
        norm_off = off["blk.0.attn_norm.weight"] if overlay else off["blk.0.attn_q.weight"]
        size = f.file_size
        header = HEADER.pack(hp.n_vocab, hp.n_embd, hp.n_layer, hp.n_head, hp.n_head_kv, hp.n_ff,
                             hp.rope_theta, hp.rms_eps, 0 if hp.activation == "relu2" else 1, lm_head,
                             flags, size, 0, norm_off, kv_type, 4, 1, 2, 3)
        e = model.token_embd
        embd = _matrix(off[e.name], len(e.raw), e.ggml_type, e.n_rows, e.n_cols, 0.0, fill)
        out = embd if flags & FLAG_OUTPUT else MATRIX.pack(0, 0, 0, 0, 0, 0.0, 0)
        mats = b"".join(_matrix(off[m.name], len(m.raw), m.ggml_type, m.rows, m.cols, m.scale, fill)
                        for m in model.ternary_matrices())
        tail = path.read_bytes() if overlay else b""
        return header + embd + out + mats + tail
    finally:
        model.close()


def main(out_dir: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="tern-seeds-") as tmp:
        write_seeds(out_dir, Path(tmp))


def write_seeds(out_dir: Path, work: Path) -> None:
    bases = fuzz_atheris.load_bases(work)
    fuzz_atheris.make_seeds(out_dir / "gguf", bases)
    native, real = out_dir / "native", out_dir / "native-real"
    native.mkdir(parents=True, exist_ok=True)
    real.mkdir(parents=True, exist_ok=True)
    for i, base in enumerate(fuzz_atheris.BASES):
        path = work / f"base{i}.bin"
        variants = [(FLAG_FORWARD, 1, 0), (FLAG_FORWARD | FLAG_ALL_LOGITS | (1 << 5), 0, 2),
                    (FLAG_FORWARD | FLAG_OUTPUT | FLAG_TWO_THREADS, 0, 0)]
        for j, (flags, lm_head, kv) in enumerate(variants):
            seed = native_seed(path, flags, lm_head, kv, fill=True, overlay=False)
            (native / f"seed-{base.fmt}-{j}").write_bytes(seed)
        if base.fmt == "i2_s":
            seed = native_seed(path, FLAG_FORWARD, 1, 0, fill=False, overlay=True)
            (real / f"real-{base.fmt}").write_bytes(seed)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
