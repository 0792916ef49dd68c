"""Hugging Face `BitNetForCausalLM` checkpoint -> GGUF (`python -m engine convert`).

Two kinds of checkpoint, both as Microsoft publishes them:
- master weights (bf16, microsoft/bitnet-b1.58-2B-4T-bf16): ternary formats ternarize each
  BitLinear weight with absmean (`engine.quants.ternarize_absmean`, the same function that
  ternarizes float GGUFs at load, so i2_s and f16/bf16/f32 files of one checkpoint hold the
  same codes and scales); float formats keep the weights and are ternarized at load.
- packed 1.58-bit weights (microsoft/bitnet-b1.58-2B-4T): uint8 (out/4, in), four ternary rows
  per byte, plus a per-tensor `weight_scale`. The codes are kept as they are (never ternarized
  again: absmean over already-ternary weights would shrink each scale by the matrix's fraction
  of non-zeros). The scale follows transformers (integrations/bitnet.py): linear_class
  "bitlinear" (the default, and Microsoft's) divides by weight_scale, so W = codes / weight_scale;
  "autobitlinear" offline multiplies, so W = codes * weight_scale. A packed checkpoint only
  converts to the ternary formats: a float GGUF is ternarized at load, which would change the scale.

Tensor names: HF `model.layers.N.self_attn.q_proj` -> `blk.N.attn_q`, etc. (table below);
q/k are NOT permuted: BitNet's RoPE is rotate-half (NeoX) both in transformers
(`rotate_half` in modeling_bitnet.py) and in bitnet.cpp. Layout written: arch `bitnet-b1.58`
(bitnet.cpp's keys) for i2_s and the float formats, arch `bitnet` (upstream llama.cpp's) plus
`bitnet.hidden_activation` for tq1_0/tq2_0, as `engine.testmodel` writes them.
"""
from __future__ import annotations

import json
import logging
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from engine import quants
from engine.errors import ModelFormatError, UnsupportedModelError
from engine.gguf_file import F16, F32, I2_S, TQ1_0, ValueType, tensor_nbytes
from engine.gguf_write import Typed, WriterTensor, write_gguf
from engine.testmodel import EMBEDDING_FORMATS, FILE_TYPES, FORMATS, _upstream_tokenizer_metadata
from engine.tokenizer import gguf_metadata_from_hf_tokenizer

log = logging.getLogger(__name__)

TERNARY_FORMATS = ("i2_s", "tq1_0", "tq2_0")
# HF suffix (after model.layers.N.) -> GGUF suffix (after blk.N.)
LINEAR_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
NORM_NAMES = {
    "input_layernorm": "attn_norm", "self_attn.attn_sub_norm": "attn_sub_norm",
    "post_attention_layernorm": "ffn_norm", "mlp.ffn_sub_norm": "ffn_sub_norm",
}
ROW_MULTIPLE = {"i2_s": quants.I2S_BLOCK, "tq1_0": quants.QK_K, "tq2_0": quants.QK_K}
_MAX_HEADER = 100 * 2**20
_F16_MAX = 65504.0
_CHUNK_ELEMENTS = 1 << 22


# ---------------------------------------------------------------------------------------------
# config.json
# ---------------------------------------------------------------------------------------------
@dataclass
class HFBitNetConfig:
    n_vocab: int
    n_embd: int
    n_ff: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_ctx: int
    rope_theta: float
    rms_eps: float
    activation: str          # 'relu2' | 'silu'
    tied: bool               # no lm_head.weight: the LM head is the embedding
    linear_class: str        # 'bitlinear' | 'autobitlinear' (how a packed weight_scale applies)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


def read_config(hf_dir) -> HFBitNetConfig:
    path = Path(hf_dir) / "config.json"
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFormatError(path, f"cannot read config.json: {exc}") from None
    if not isinstance(cfg, dict):
        raise ModelFormatError(path, "config.json is not a JSON object")
    archs = cfg.get("architectures") or []
    if cfg.get("model_type") != "bitnet" and "BitNetForCausalLM" not in archs:
        raise UnsupportedModelError(path, f"not a BitNetForCausalLM checkpoint (model_type "
                                    f"{cfg.get('model_type')!r}, architectures {archs})")

    def need_int(key: str, default=None) -> int:
        value = cfg.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ModelFormatError(path, f"{key} = {value!r}, expected a positive integer")
        return value

    n_head = need_int("num_attention_heads")
    c = HFBitNetConfig(
        n_vocab=need_int("vocab_size"), n_embd=need_int("hidden_size"), n_ff=need_int("intermediate_size"),
        n_layer=need_int("num_hidden_layers"), n_head=n_head,
        n_head_kv=need_int("num_key_value_heads", n_head),
        n_ctx=need_int("max_position_embeddings", 2048),
        rope_theta=_rope_theta(path, cfg), rms_eps=float(cfg.get("rms_norm_eps", 1e-5)),
        activation=cfg.get("hidden_act", "relu2"),
        tied=bool(cfg.get("tie_word_embeddings", False)),
        linear_class=(cfg.get("quantization_config") or {}).get("linear_class", "bitlinear"),
    )
    if c.activation not in ("relu2", "silu"):
        raise UnsupportedModelError(path, f"hidden_act {c.activation!r} (Tern runs relu2 and silu)")
    if c.n_embd % c.n_head or c.n_head % c.n_head_kv:
        raise ModelFormatError(path, f"{c.n_head} heads / {c.n_head_kv} KV heads do not divide hidden_size {c.n_embd}")
    head_dim = cfg.get("head_dim")
    if head_dim is not None and head_dim != c.head_dim:
        raise UnsupportedModelError(path, f"head_dim {head_dim} differs from hidden_size / heads = {c.head_dim}")
    if cfg.get("attention_bias"):
        raise UnsupportedModelError(path, "attention_bias is set; BitNet layers have no bias")
    return c


def _rope_theta(path: Path, cfg: dict) -> float:
    """`rope_theta` (the 2B4T config) or `rope_parameters` (transformers 5); plain RoPE only."""
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind != "default":
        raise UnsupportedModelError(path, f"RoPE type {kind!r}: Tern runs plain RoPE only")
    theta = cfg.get("rope_theta", params.get("rope_theta", 10000.0))
    if not isinstance(theta, (int, float)) or theta <= 0:
        raise ModelFormatError(path, f"rope_theta = {theta!r}")
    return float(theta)


# ---------------------------------------------------------------------------------------------
# safetensors, read in place (the `safetensors` package's numpy loader has no bfloat16)
# ---------------------------------------------------------------------------------------------
# File layout (safetensors' README): u64 little-endian header length N, N bytes of JSON
# {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}, then the data;
# offsets are relative to the first data byte.
_ST_DTYPES = {"BF16": "<u2", "F16": "<f2", "F32": "<f4", "F64": "<f8", "U8": "u1", "I8": "i1"}


@dataclass
class _StTensor:
    file: Path
    dtype: str
    shape: tuple[int, ...]
    begin: int               # absolute byte offsets in the file
    end: int


class SafetensorsDir:
    """Every tensor of a checkpoint directory (one model.safetensors or an index of shards)."""

    def __init__(self, hf_dir):
        root = Path(hf_dir)
        self.root = root
        self._maps: dict[Path, mmap.mmap] = {}
        self.tensors: dict[str, _StTensor] = {}
        files = sorted(root.glob("*.safetensors"))
        if not files:
            raise ModelFormatError(root, "no .safetensors files")
        try:
            for f in files:
                self._index(f)
        except BaseException:
            self.close()
            raise

    def _index(self, path: Path) -> None:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise ModelFormatError(path, "truncated safetensors header")
            (n,) = struct.unpack("<Q", head)
            if n > min(_MAX_HEADER, size - 8):
                raise ModelFormatError(path, f"safetensors header length {n} exceeds the file")
            try:
                header = json.loads(fh.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise ModelFormatError(path, f"bad safetensors header: {exc}") from None
            self._maps[path] = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        if not isinstance(header, dict):
            raise ModelFormatError(path, "bad safetensors header: not an object")
        base = 8 + n
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            self.tensors[name] = _check_entry(path, name, entry, base, size)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.info(name).shape

    def dtype(self, name: str) -> str:
        return self.info(name).dtype

    def raw(self, name: str) -> np.ndarray:
        """The stored values (bf16 as uint16 bit patterns), shaped, without a copy."""
        t = self.info(name)
        arr = np.frombuffer(self._maps[t.file], dtype=_ST_DTYPES[t.dtype], count=int(np.prod(t.shape)),
                            offset=t.begin) if t.end > t.begin else np.empty(0, _ST_DTYPES[t.dtype])
        return arr.reshape(t.shape)

    def float32(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows start..stop (along the first axis) as float32."""
        t = self.info(name)
        if t.dtype not in ("BF16", "F16", "F32", "F64"):
            raise ModelFormatError(t.file, f"dtype {t.dtype}, expected a float type", tensor=name)
        raw = self.raw(name)[start:stop]
        if t.dtype == "BF16":
            return (raw.astype(np.uint32) << 16).view(np.float32)
        return raw.astype(np.float32)

    def info(self, name: str) -> _StTensor:
        if name not in self.tensors:
            raise ModelFormatError(self.root, "missing tensor", tensor=name)
        return self.tensors[name]

    def close(self) -> None:
        for m in self._maps.values():
            try:
                m.close()
            except BufferError:
                pass    # an array still views it (e.g. in a traceback); it closes when that goes
        self._maps.clear()


def _check_entry(path: Path, name: str, entry, base: int, size: int) -> _StTensor:
    ok = isinstance(entry, dict) and entry.get("dtype") in _ST_DTYPES
    shape, offsets = (entry.get("shape"), entry.get("data_offsets")) if ok else (None, None)
    ok = ok and isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)
    ok = ok and isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
    if not ok:
        raise ModelFormatError(path, f"bad safetensors entry {entry!r}", tensor=name)
    begin, end = base + offsets[0], base + offsets[1]
    need = int(np.prod(shape, dtype=object)) * np.dtype(_ST_DTYPES[entry["dtype"]]).itemsize
    if not (base <= begin <= end <= size) or end - begin != need:
        raise ModelFormatError(path, f"data offsets {offsets} do not fit shape {shape} in the file", tensor=name)
    return _StTensor(path, entry["dtype"], tuple(shape), begin, end)


# ---------------------------------------------------------------------------------------------
# BitLinear weights
# ---------------------------------------------------------------------------------------------
def unpack_hf_rows(packed: np.ndarray, rows: int) -> np.ndarray:
    """transformers' unpack_weights: (rows/4, cols) uint8 -> (rows, cols) int8 codes. Bits
    2i..2i+1 of packed row r hold row i*(rows/4) + r, as value + 1."""
    quarter = rows // 4
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(4, 1, 1)
    vals = (packed[None, :, :] >> shifts) & 3
    return vals.reshape(4 * quarter, -1).astype(np.int8) - 1


def packed_ternary(st: SafetensorsDir, cfg: HFBitNetConfig, hf: str, rows: int, cols: int) -> tuple[np.ndarray, np.float32]:
    """(codes, scale) of a packed BitLinear weight, kept exactly."""
    name = hf + ".weight"
    t = st.info(name)
    if rows % 4 or st.shape(name) != (rows // 4, cols):
        raise ModelFormatError(t.file, f"packed shape {list(st.shape(name))}, expected {[rows // 4, cols]}", tensor=name)
    codes = unpack_hf_rows(st.raw(name), rows)
    if codes.max(initial=0) > 1:
        raise ModelFormatError(t.file, "packed code 3 is not a ternary value", tensor=name)
    ws = st.float32(hf + ".weight_scale").reshape(-1)
    if ws.size != 1 or not np.isfinite(ws[0]) or ws[0] <= 0:
        raise ModelFormatError(t.file, f"weight_scale {ws.tolist()} is not one positive number",
                               tensor=hf + ".weight_scale")
    scale = ws[0] if cfg.linear_class == "autobitlinear" else np.float32(1.0) / ws[0]
    return codes, np.float32(scale)


def is_packed(st: SafetensorsDir) -> bool:
    """Packed checkpoints store BitLinear weights as uint8 with a weight_scale beside them."""
    name = "model.layers.0.self_attn.q_proj.weight"
    return name in st.tensors and st.dtype(name) == "U8"


# ---------------------------------------------------------------------------------------------
# GGUF tensors and metadata
# ---------------------------------------------------------------------------------------------
def _linear_tensor(st, cfg, hf: str, gguf: str, rows: int, cols: int, fmt: str, packed: bool) -> WriterTensor:
    ggml_type = FORMATS[fmt]

    def chunks():
        if packed:
            codes, scale = packed_ternary(st, cfg, hf, rows, cols)
        else:
            w = _float_matrix(st, hf + ".weight", rows, cols)
            if fmt not in TERNARY_FORMATS:
                yield quants.quantize(w, ggml_type)
                return
            codes, scale = quants.ternarize_absmean(w)
        flat = codes.reshape(-1)
        if ggml_type == I2_S:
            yield quants.pack_i2_s(flat, scale)
        else:
            yield (quants.pack_tq1_0 if ggml_type == TQ1_0 else quants.pack_tq2_0)(flat, scale)
    return WriterTensor(gguf, (cols, rows), ggml_type, chunks)


def _float_matrix(st: SafetensorsDir, name: str, rows: int, cols: int) -> np.ndarray:
    if st.shape(name) != (rows, cols):
        raise ModelFormatError(st.info(name).file, f"shape {list(st.shape(name))}, expected {[rows, cols]}",
                               tensor=name)
    return st.float32(name)


def _float_tensor(st, hf: str, gguf: str, shape: tuple[int, ...], ggml_type: int) -> WriterTensor:
    """A norm (1-D) or embedding (2-D, HF (rows, cols) = ggml (cols, rows)); same memory order.
    Written a few MB at a time: a 2B4T embedding is 1.3 GB as float32."""
    def chunks():
        file = st.info(hf).file
        if st.shape(hf) != shape:
            raise ModelFormatError(file, f"shape {list(st.shape(hf))}, expected {list(shape)}", tensor=hf)
        step = max(1, _CHUNK_ELEMENTS // shape[-1]) if len(shape) == 2 else shape[0]
        for start in range(0, shape[0], step):
            values = st.float32(hf, start, start + step)
            if not np.all(np.isfinite(values)):
                raise ModelFormatError(file, "non-finite values", tensor=hf)
            if ggml_type == F16 and np.abs(values).max(initial=0) > _F16_MAX:
                raise UnsupportedModelError(file, "values beyond the f16 range; choose "
                                            "--embedding-type bf16 or f32", tensor=hf)
            yield quants.quantize(values, ggml_type)
    return WriterTensor(gguf, tuple(reversed(shape)), ggml_type, chunks)


def gguf_tensors(st: SafetensorsDir, cfg: HFBitNetConfig, fmt: str, embedding_type: int, packed: bool) -> list[WriterTensor]:
    q, kv = cfg.n_head * cfg.head_dim, cfg.n_head_kv * cfg.head_dim
    shapes = {"self_attn.q_proj": (q, cfg.n_embd), "self_attn.k_proj": (kv, cfg.n_embd),
              "self_attn.v_proj": (kv, cfg.n_embd), "self_attn.o_proj": (cfg.n_embd, q),
              "mlp.gate_proj": (cfg.n_ff, cfg.n_embd), "mlp.up_proj": (cfg.n_ff, cfg.n_embd),
              "mlp.down_proj": (cfg.n_embd, cfg.n_ff)}
    norm_sizes = {"input_layernorm": cfg.n_embd, "self_attn.attn_sub_norm": q,
                  "post_attention_layernorm": cfg.n_embd, "mlp.ffn_sub_norm": cfg.n_ff}
    out = [_float_tensor(st, "model.embed_tokens.weight", "token_embd.weight", (cfg.n_vocab, cfg.n_embd),
                         embedding_type)]
    for i in range(cfg.n_layer):
        hf, gg = f"model.layers.{i}.", f"blk.{i}."
        for name, suffix in NORM_NAMES.items():
            out.append(_float_tensor(st, hf + name + ".weight", gg + suffix + ".weight", (norm_sizes[name],), F32))
        for name, suffix in LINEAR_NAMES.items():
            out.append(_linear_tensor(st, cfg, hf + name, gg + suffix + ".weight", *shapes[name], fmt, packed))
    out.append(_float_tensor(st, "model.norm.weight", "output_norm.weight", (cfg.n_embd,), F32))
    if not cfg.tied:
        out.append(_float_tensor(st, "lm_head.weight", "output.weight", (cfg.n_vocab, cfg.n_embd), embedding_type))
    return out


def gguf_metadata(cfg: HFBitNetConfig, arch: str, fmt: str, name: str) -> dict:
    md = {
        "general.architecture": arch,
        "general.name": name,
        f"{arch}.vocab_size": cfg.n_vocab,
        f"{arch}.context_length": cfg.n_ctx,
        f"{arch}.embedding_length": cfg.n_embd,
        f"{arch}.block_count": cfg.n_layer,
        f"{arch}.feed_forward_length": cfg.n_ff,
        f"{arch}.rope.dimension_count": cfg.head_dim,
        f"{arch}.attention.head_count": cfg.n_head,
        f"{arch}.attention.head_count_kv": cfg.n_head_kv,
        f"{arch}.rope.freq_base": Typed(ValueType.FLOAT32, cfg.rope_theta),
        f"{arch}.attention.layer_norm_rms_epsilon": Typed(ValueType.FLOAT32, cfg.rms_eps),
        "general.file_type": FILE_TYPES[fmt],
        "general.quantization_version": 2,
    }
    if arch == "bitnet":
        md["bitnet.rope.scaling.type"] = "none"
        md["bitnet.rope.scaling.factor"] = Typed(ValueType.FLOAT32, 1.0)
        md["bitnet.hidden_activation"] = cfg.activation     # Tern's key: upstream assumes SiLU
    return md


def _tokenizer_metadata(hf_dir: Path, arch: str, n_vocab: int) -> dict:
    if not (hf_dir / "tokenizer.json").is_file():
        log.warning("%s has no tokenizer.json: the GGUF gets no tokenizer", hf_dir)
        return {}
    md = gguf_metadata_from_hf_tokenizer(hf_dir)
    n_tokens = len(md["tokenizer.ggml.tokens"])
    if n_tokens != n_vocab:
        raise ModelFormatError(hf_dir / "tokenizer.json",
                               f"the tokenizer has {n_tokens} tokens, config.json vocab_size is {n_vocab}")
    return _upstream_tokenizer_metadata(md, hf_dir) if arch == "bitnet" else md


# ---------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------
def convert(hf_dir, out, fmt: str, embedding_type: str | None = None,
            progress: Callable[[str], None] | None = None) -> Path:
    """Convert a BitNetForCausalLM checkpoint directory to a GGUF at `out`; returns its path.
    `embedding_type` defaults to f16 for ternary formats (as the official file) and to `fmt`
    itself for f16/bf16/f32."""
    hf_dir = Path(hf_dir)
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r} not in {sorted(FORMATS)}")
    embedding_type = embedding_type or ("f16" if fmt in TERNARY_FORMATS else fmt)
    if embedding_type not in EMBEDDING_FORMATS:
        raise ValueError(f"embedding type {embedding_type!r} not in {sorted(EMBEDDING_FORMATS)}")
    cfg = read_config(hf_dir)
    _check_row_lengths(hf_dir, cfg, fmt, embedding_type)
    arch = "bitnet" if fmt in ("tq1_0", "tq2_0") or cfg.activation != "relu2" else "bitnet-b1.58"
    st = SafetensorsDir(hf_dir)
    try:
        packed = is_packed(st)
        if packed and fmt not in TERNARY_FORMATS:
            raise UnsupportedModelError(hf_dir, f"a packed 1.58-bit checkpoint converts to "
                                        f"{', '.join(TERNARY_FORMATS)} only: a {fmt} file is ternarized "
                                        "again at load, which would change every scale")
        metadata = gguf_metadata(cfg, arch, fmt, hf_dir.resolve().name)
        metadata.update(_tokenizer_metadata(hf_dir, arch, cfg.n_vocab))
        tensors = gguf_tensors(st, cfg, fmt, EMBEDDING_FORMATS[embedding_type], packed)
        size = sum(tensor_nbytes(t.ggml_type, t.shape) for t in tensors)
        log.info("converting %s (%s weights) to %s: %d tensors, %.1f MB", hf_dir,
                 "packed" if packed else "master", fmt, len(tensors), size / 1e6)
        if progress:
            progress(f"{'packed' if packed else 'master'} weights -> {fmt}, {size / 1e6:.1f} MB")
        return write_gguf(out, metadata, tensors)
    finally:
        st.close()


def _check_row_lengths(hf_dir: Path, cfg: HFBitNetConfig, fmt: str, embedding_type: str) -> None:
    """Ternary formats need whole blocks per row (ne0 = in_features); so do block embeddings."""
    need = ROW_MULTIPLE.get(fmt)
    if need:
        for cols in (cfg.n_embd, cfg.n_head * cfg.head_dim, cfg.n_ff):
            if cols % need:
                raise UnsupportedModelError(hf_dir, f"{fmt} needs row lengths that are multiples of "
                                            f"{need}; this model has rows of {cols}")
    block = {"q8_0": 32, "q4_0": 32, "q6_k": quants.QK_K}.get(embedding_type)
    if block and cfg.n_embd % block:
        raise UnsupportedModelError(hf_dir, f"embedding type {embedding_type} needs hidden_size "
                                    f"to be a multiple of {block}, not {cfg.n_embd}")

