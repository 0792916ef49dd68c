"""Random-weight BitNet models in exactly the layouts real files use, for tests and benchmarks.

One seed gives the same ternary codes and scales in every format. Per ternary tensor: exactly
half of the weights in every 256-block are non-zero (random positions and signs) and a value
v = m * 2**e with a 2-bit mantissa is drawn, exact in f16 and bf16; the tensor scale is
s = v / 2 (also exact).
Float files store codes * s, already ternary as converters write them, so the loader keeps the
codes and s: the same as I2_S (f32 s) and TQ1_0/TQ2_0 (f16 d = s in every block).

Layouts: i2_s and f16/bf16/f32 -> arch `bitnet-b1.58` with bitnet.cpp's keys and tensor names
(`general.file_type` 40 for I2_S); tq1_0/tq2_0 -> arch `bitnet` as upstream llama.cpp's
converter writes it (F16 token embedding, rope scaling keys), plus `bitnet.hidden_activation`.
"""
from __future__ import annotations

import functools
import json
import logging
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from engine import quants
from engine.gguf_file import BF16, F16, F32, I2_S, Q4_0, Q6_K, Q8_0, TQ1_0, TQ2_0, ValueType, tensor_nbytes
from engine.gguf_write import Typed, WriterTensor, write_gguf
from engine.quants import QK_K
from engine.tokenizer import gguf_metadata_byte_vocab, gguf_metadata_from_hf_tokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shape:
    n_embd: int
    n_ff: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_ctx: int
    rope_theta: float = 500000.0
    rms_eps: float = 1e-5


SHAPES = {
    "tiny": Shape(n_embd=256, n_ff=512, n_layer=2, n_head=4, n_head_kv=2, n_ctx=512),
    "2b4t": Shape(n_embd=2560, n_ff=6912, n_layer=30, n_head=20, n_head_kv=5, n_ctx=4096),
}
FORMATS = {"i2_s": I2_S, "tq1_0": TQ1_0, "tq2_0": TQ2_0, "f16": F16, "bf16": BF16, "f32": F32}
EMBEDDING_FORMATS = {"f16": F16, "bf16": BF16, "f32": F32, "q8_0": Q8_0, "q6_k": Q6_K, "q4_0": Q4_0}
# llama.cpp's LLAMA_FTYPE values (bitnet.cpp adds 40 = MOSTLY_I2_S)
FILE_TYPES = {"i2_s": 40, "tq1_0": 36, "tq2_0": 37, "f16": 1, "bf16": 32, "f32": 0}
EMBEDDING_STD = 0.05
_EMBEDDING_CHUNK_ROWS = 4096
# upstream llama.cpp's converter writes this layer order; bitnet.cpp's is alphabetical-ish, and
# neither reader cares about order.
_LAYER_TENSORS = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_sub_norm", "attn_output",
                  "ffn_norm", "ffn_gate", "ffn_up", "ffn_sub_norm", "ffn_down")


def _rng(seed: int, name: str) -> np.random.Generator:
    """A generator per (seed, tensor name), so a tensor's values do not depend on the format."""
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def ternary_weights(seed: int, name: str, rows: int, cols: int) -> tuple[np.ndarray, np.float32]:
    """(codes (rows, cols) int8, scale s) of one ternary tensor (rows * cols a multiple of 256)."""
    rng = _rng(seed, name)
    n = rows * cols
    # Exactly half non-zero in every 256-weight block (so in the tensor, and no TQ block is
    # all zero); a per-block shuffle is also twice as fast as shuffling 17 M weights at once.
    half = np.repeat(np.array([1, 0], dtype=np.int8), QK_K // 2)
    nonzero = rng.permuted(np.broadcast_to(half, (n // QK_K, QK_K)), axis=1).reshape(-1)
    signs = rng.integers(0, 2, n, dtype=np.int8) * 2 - 1
    v = np.float32(rng.choice([1.0, 1.25, 1.5, 1.75]) * 2.0 ** int(rng.integers(-3, 1)))
    return (nonzero * signs).reshape(rows, cols), np.float32(v / 2)


def _encode_ternary(codes: np.ndarray, scale: np.float32, ggml_type: int) -> np.ndarray:
    flat = codes.reshape(-1)
    if ggml_type == I2_S:
        return quants.pack_i2_s(flat, scale)
    if ggml_type == TQ2_0:
        return quants.pack_tq2_0(flat, scale)
    if ggml_type == TQ1_0:
        return quants.pack_tq1_0(flat, scale)
    return quants.quantize(flat.astype(np.float32) * scale, ggml_type)


def _ternary_tensor(seed: int, name: str, rows: int, cols: int, ggml_type: int) -> WriterTensor:
    def chunks():
        codes, scale = ternary_weights(seed, name, rows, cols)
        yield _encode_ternary(codes, scale, ggml_type)
    return WriterTensor(name, (cols, rows), ggml_type, chunks)


def _norm_tensor(seed: int, name: str, n: int) -> WriterTensor:
    def chunks():
        yield (1.0 + 0.1 * _rng(seed, name).uniform(-1.0, 1.0, n)).astype("<f4")
    return WriterTensor(name, (n,), F32, chunks)


def _embedding_tensor(seed: int, name: str, n_vocab: int, n_embd: int, ggml_type: int) -> WriterTensor:
    def chunks() -> Iterator[np.ndarray]:
        rng = _rng(seed, name)
        for start in range(0, n_vocab, _EMBEDDING_CHUNK_ROWS):
            rows = min(_EMBEDDING_CHUNK_ROWS, n_vocab - start)
            yield quants.quantize(rng.normal(0.0, EMBEDDING_STD, rows * n_embd).astype(np.float32), ggml_type)
    return WriterTensor(name, (n_embd, n_vocab), ggml_type, chunks)


def _tensors(shape: Shape, fmt: str, seed: int, n_vocab: int, embedding_type: int) -> list[WriterTensor]:
    ggml_type = FORMATS[fmt]
    head_dim = shape.n_embd // shape.n_head
    q, kv = shape.n_head * head_dim, shape.n_head_kv * head_dim
    matrix_shapes = {"attn_q": (q, shape.n_embd), "attn_k": (kv, shape.n_embd), "attn_v": (kv, shape.n_embd),
                     "attn_output": (shape.n_embd, q), "ffn_gate": (shape.n_ff, shape.n_embd),
                     "ffn_up": (shape.n_ff, shape.n_embd), "ffn_down": (shape.n_embd, shape.n_ff)}
    norm_sizes = {"attn_norm": shape.n_embd, "attn_sub_norm": q, "ffn_norm": shape.n_embd, "ffn_sub_norm": shape.n_ff}
    out = [_embedding_tensor(seed, "token_embd.weight", n_vocab, shape.n_embd, embedding_type)]
    for i in range(shape.n_layer):
        for suffix in _LAYER_TENSORS:
            name = f"blk.{i}.{suffix}.weight"
            if suffix in norm_sizes:
                out.append(_norm_tensor(seed, name, norm_sizes[suffix]))
            else:
                out.append(_ternary_tensor(seed, name, *matrix_shapes[suffix], ggml_type))
    out.append(_norm_tensor(seed, "output_norm.weight", shape.n_embd))
    return out


def _arch_metadata(arch: str, shape: Shape, fmt: str, n_vocab: int, shape_name: str, seed: int) -> dict:
    head_dim = shape.n_embd // shape.n_head
    md = {
        "general.architecture": arch,
        "general.name": f"tern-test-{shape_name}-{fmt}-seed{seed}",
        f"{arch}.vocab_size": n_vocab,
        f"{arch}.context_length": shape.n_ctx,
        f"{arch}.embedding_length": shape.n_embd,
        f"{arch}.block_count": shape.n_layer,
        f"{arch}.feed_forward_length": shape.n_ff,
        f"{arch}.rope.dimension_count": head_dim,
        f"{arch}.attention.head_count": shape.n_head,
        f"{arch}.attention.head_count_kv": shape.n_head_kv,
        f"{arch}.rope.freq_base": Typed(ValueType.FLOAT32, shape.rope_theta),
        f"{arch}.attention.layer_norm_rms_epsilon": Typed(ValueType.FLOAT32, shape.rms_eps),
        "general.file_type": FILE_TYPES[fmt],
    }
    if arch == "bitnet":
        # upstream convert_hf_to_gguf.py BitnetModel.set_gguf_parameters
        md["bitnet.rope.scaling.type"] = "none"
        md["bitnet.rope.scaling.factor"] = Typed(ValueType.FLOAT32, 1.0)
        # Tern's own key: 2B4T's FFN is squared ReLU (upstream's graph assumes SiLU)
        md["bitnet.hidden_activation"] = "relu2"
    return md


def _upstream_tokenizer_metadata(md: dict, tokenizer_dir: Path | None) -> dict:
    """Upstream's converter names the Llama-3 pre-tokenizer and copies the HF chat template."""
    md = dict(md)
    md.pop("tokenizer.chat_template", None)
    if tokenizer_dir is None:
        return md
    md["tokenizer.ggml.pre"] = "llama-bpe"
    config = tokenizer_dir / "tokenizer_config.json"
    if config.is_file():
        template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
        if isinstance(template, str):
            md["tokenizer.chat_template"] = template
    return md


@functools.lru_cache(maxsize=4)
def _hf_tokenizer_metadata(tokenizer_dir: Path) -> dict:
    """Cached: test sessions write many models with one tokenizer (callers never mutate it)."""
    return gguf_metadata_from_hf_tokenizer(tokenizer_dir)


def make_test_model(out, fmt: str, shape: str | Shape = "tiny", seed: int = 1, tokenizer_dir=None,
                    embedding_type: str = "f16") -> Path:
    """Write a random-weight BitNet GGUF (`shape`: a name in SHAPES or a Shape); returns its path."""
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r} not in {sorted(FORMATS)}")
    if embedding_type not in EMBEDDING_FORMATS:
        raise ValueError(f"embedding type {embedding_type!r} not in {sorted(EMBEDDING_FORMATS)}")
    dims = shape if isinstance(shape, Shape) else SHAPES[shape]
    tok_dir = Path(tokenizer_dir).resolve() if tokenizer_dir is not None else None
    tok_md = _hf_tokenizer_metadata(tok_dir) if tok_dir is not None else gguf_metadata_byte_vocab()
    n_vocab = len(tok_md["tokenizer.ggml.tokens"])
    arch = "bitnet" if fmt in ("tq1_0", "tq2_0") else "bitnet-b1.58"
    if arch == "bitnet":
        tok_md = _upstream_tokenizer_metadata(tok_md, tok_dir)
    metadata = _arch_metadata(arch, dims, fmt, n_vocab, shape, seed)
    metadata.update(tok_md)
    metadata["general.quantization_version"] = 2
    tensors = _tensors(dims, fmt, seed, n_vocab, EMBEDDING_FORMATS[embedding_type])
    size = sum(tensor_nbytes(t.ggml_type, t.shape) for t in tensors)
    log.info("writing %s (%s, %s, seed %d): %d tensors, %.1f MB", out, fmt, shape, seed, len(tensors), size / 1e6)
    return write_gguf(out, metadata, tensors)
