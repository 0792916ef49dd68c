"""A BitNet model from a GGUF file: hyperparameters, ternary matrices, norms and embeddings.

Reads the three layouts a BitNet user meets: bitnet.cpp's official files (`bitnet-b1.58`,
`bitnet-25`, I2_S), upstream llama.cpp's (`bitnet`, TQ1_0/TQ2_0) and float files of either
(ternarized at load: kept as they are if already ternary, else absmean). Weights stay in the mmap; codes are unpacked on demand.
`inspect_gguf` reads only the header, for the model library and `python -m engine info`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from engine import quants
from engine.errors import ModelFormatError, UnsupportedModelError
from engine.gguf_file import (BF16, F16, F32, I2_S, Q4_0, Q6_K, Q8_0, TQ1_0, TQ2_0, GGUFFile,
                              TensorInfo, tensor_nbytes)

log = logging.getLogger(__name__)

BITNET_ARCHS = ("bitnet-b1.58", "bitnet-25", "bitnet")
TERNARY_TYPES = (I2_S, TQ1_0, TQ2_0, F32, F16, BF16)
EMBEDDING_TYPES = (F16, BF16, F32, Q8_0, Q6_K, Q4_0)
NORM_TYPES = (F32, F16, BF16)
# elements of a float matrix converted to float32 per step (keeps the temporary copy ~16 MB)
_TERNARIZE_CHUNK_ELEMENTS = 1 << 22


# ---------------------------------------------------------------------------------------------
# data classes
# ---------------------------------------------------------------------------------------------
@dataclass
class HParams:
    arch: str                # 'bitnet-b1.58' | 'bitnet-25' | 'bitnet'
    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_ctx_train: int
    rope_theta: float
    rms_eps: float
    activation: str          # 'relu2' | 'silu'

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


@dataclass
class TernaryMatrix:
    """One BitLinear weight: W = codes * scale."""
    name: str
    rows: int                # out_features (ggml ne1)
    cols: int                # in_features (ggml ne0)
    scale: float
    ggml_type: int           # 36 I2_S, 34 TQ1_0, 35 TQ2_0, 1 F16, 30 BF16, 0 F32
    raw: memoryview          # the tensor's bytes inside the mmap (no copy)
    path: Path = field(default=Path(), repr=False)

    def codes(self) -> np.ndarray:
        """(rows, cols) int8 in {-1, 0, 1}; unpacked on demand, not cached."""
        n = self.rows * self.cols
        if self.ggml_type == I2_S:
            codes = quants.unpack_i2_s(self.raw, n)
        elif self.ggml_type == TQ2_0:
            codes = quants.unpack_tq2_0(self.raw, n)
        elif self.ggml_type == TQ1_0:
            codes = quants.unpack_tq1_0(self.raw, n)
        else:
            return _float_codes(self.raw, self.ggml_type, self.rows, self.cols, np.float32(self.scale))
        if codes.max(initial=0) > 1:
            raise ModelFormatError(self.path, "packed code 3 is not a ternary value", tensor=self.name)
        return codes.reshape(self.rows, self.cols)


class EmbeddingMatrix:
    """Token embedding / LM head, (n_rows, n_cols) = (n_vocab, n_embd), in any embedding type."""

    def __init__(self, name: str, n_rows: int, n_cols: int, ggml_type: int, raw: memoryview):
        self.name = name
        self.n_rows = n_rows
        self.n_cols = n_cols
        self.ggml_type = ggml_type
        self.raw = raw            # the tensor's bytes inside the mmap (no copy)
        self.row_bytes = tensor_nbytes(ggml_type, (n_cols,))

    def rows(self, ids: Sequence[int]) -> np.ndarray:
        """(len(ids), n_cols) float32."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.n_rows):
            raise IndexError(f"token id out of range 0..{self.n_rows - 1}")
        packed = np.frombuffer(self.raw, dtype=np.uint8).reshape(self.n_rows, self.row_bytes)[ids]
        return quants.dequantize(packed, self.ggml_type, ids.size * self.n_cols).reshape(ids.size, self.n_cols)

    def dequantize(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows start..stop as one (stop - start, n_cols) float32 array."""
        stop = self.n_rows if stop is None else stop
        if not 0 <= start <= stop <= self.n_rows:
            raise IndexError(f"row range {start}..{stop} outside 0..{self.n_rows}")
        data = self.raw[start * self.row_bytes:stop * self.row_bytes]
        return quants.dequantize(data, self.ggml_type, (stop - start) * self.n_cols).reshape(-1, self.n_cols)


@dataclass
class LayerWeights:
    attn_norm: np.ndarray        # (n_embd,) float32
    attn_sub_norm: np.ndarray    # (n_embd,) float32
    ffn_norm: np.ndarray         # (n_embd,) float32
    ffn_sub_norm: np.ndarray     # (n_ff,) float32
    wq: TernaryMatrix            # (n_head*head_dim, n_embd)
    wk: TernaryMatrix            # (n_head_kv*head_dim, n_embd)
    wv: TernaryMatrix            # (n_head_kv*head_dim, n_embd)
    wo: TernaryMatrix            # (n_embd, n_head*head_dim)
    w_gate: TernaryMatrix        # (n_ff, n_embd)
    w_up: TernaryMatrix          # (n_ff, n_embd)
    w_down: TernaryMatrix        # (n_embd, n_ff)


class BitNetModel:
    def __init__(self, path: Path, file: GGUFFile, hparams: HParams, layers: list[LayerWeights],
                 output_norm: np.ndarray, token_embd: EmbeddingMatrix, output: EmbeddingMatrix | None):
        self.path = path
        self.file = file
        self.hparams = hparams
        self.metadata: dict[str, Any] = file.metadata
        self.layers = layers
        self.output_norm = output_norm          # (n_embd,) float32
        self.token_embd = token_embd
        self.output = output                    # separate LM head (old bitnet-25 file) or None
        self.tokenizer_metadata = {k: v for k, v in file.metadata.items() if k.startswith("tokenizer.")}

    def ternary_matrices(self) -> list[TernaryMatrix]:
        return [getattr(layer, n) for layer in self.layers
                for n in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")]

    def close(self) -> None:
        for m in self.ternary_matrices():
            _release(m.raw)
        for e in (self.token_embd, self.output):
            if e is not None:
                _release(e.raw)
        self.file.close()

    def __enter__(self) -> "BitNetModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _release(view: memoryview) -> None:
    try:
        view.release()
    except BufferError:
        pass    # an array built on it is still alive; the mapping closes when it goes


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------
def load_model(path) -> BitNetModel:
    """Open a BitNet GGUF. Raises ModelFormatError for a broken file, UnsupportedModelError for
    a valid GGUF that Tern's BitNet engine does not run."""
    f = GGUFFile(path)
    try:
        hp = read_hparams(f)
        check_tensors(f, hp)
        layers = [_load_layer(f, hp, i) for i in range(hp.n_layer)]
        token_embd = _embedding(f, "token_embd.weight", hp)
        output = _embedding(f, "output.weight", hp) if "output.weight" in f.tensors else None
        output_norm = _norm(f, "output_norm.weight", hp.n_embd)
    except BaseException:
        f.close()
        raise
    log.info("loaded %s: %s, %d layers, embd %d, ff %d", f.path, hp.arch, hp.n_layer, hp.n_embd, hp.n_ff)
    return BitNetModel(f.path, f, hp, layers, output_norm, token_embd, output)


def _key(f: GGUFFile, key: str, kind: type, default=None, required: bool = True):
    if key not in f.metadata:
        if required and default is None:
            raise ModelFormatError(f.path, f"missing metadata key {key!r}")
        return default
    value = f.metadata[key]
    ok = (isinstance(value, (int, float)) if kind is float else isinstance(value, kind)) and not isinstance(value, bool)
    if not ok:
        raise ModelFormatError(f.path, f"metadata key {key!r} is {value!r}, expected {kind.__name__}")
    return value


def read_hparams(f: GGUFFile) -> HParams:
    """Hyperparameters of a BitNet file, with the consistency checks that need no tensor."""
    arch = f.metadata.get("general.architecture")
    if not isinstance(arch, str):
        raise ModelFormatError(f.path, "missing metadata key 'general.architecture'")
    if arch not in BITNET_ARCHS:
        raise UnsupportedModelError(f.path, f"architecture {arch!r} is not BitNet "
                                    f"(Tern's engine runs {', '.join(BITNET_ARCHS)})")
    if "token_embd.weight" not in f.tensors:
        raise ModelFormatError(f.path, "missing tensor", tensor="token_embd.weight")
    embd = f.tensors["token_embd.weight"]
    n_head = _key(f, f"{arch}.attention.head_count", int)
    hp = HParams(
        arch=arch,
        n_vocab=embd.shape[-1],
        n_embd=_key(f, f"{arch}.embedding_length", int),
        n_layer=_key(f, f"{arch}.block_count", int),
        n_head=n_head,
        n_head_kv=_key(f, f"{arch}.attention.head_count_kv", int, default=n_head),
        n_ff=_key(f, f"{arch}.feed_forward_length", int),
        n_ctx_train=_key(f, f"{arch}.context_length", int),
        rope_theta=float(_key(f, f"{arch}.rope.freq_base", float, default=10000.0)),
        rms_eps=float(_key(f, f"{arch}.attention.layer_norm_rms_epsilon", float)),
        activation=_activation(f, arch),
    )
    _check_hparams(f, hp)
    return hp


def _activation(f: GGUFFile, arch: str) -> str:
    if arch != "bitnet":
        return "relu2"          # bitnet.cpp's graph for BitNet b1.58 2B4T: squared ReLU
    # upstream's arch was made for the 1bitLLM models (SiLU); Tern's own files say relu2
    value = f.metadata.get("bitnet.hidden_activation")
    return "relu2" if value == "relu2" else "silu"


def _check_hparams(f: GGUFFile, hp: HParams) -> None:
    for name in ("n_embd", "n_layer", "n_head", "n_head_kv", "n_ff", "n_ctx_train"):
        if getattr(hp, name) <= 0:
            raise ModelFormatError(f.path, f"hyperparameter {name} = {getattr(hp, name)} must be positive")
    if hp.n_embd % hp.n_head or hp.n_head % hp.n_head_kv:
        raise ModelFormatError(f.path, f"{hp.n_head} heads / {hp.n_head_kv} KV heads do not divide "
                               f"embedding length {hp.n_embd}")
    if hp.n_layer > 4096 or hp.n_layer * 11 > len(f.tensors):
        raise ModelFormatError(f.path, f"block_count {hp.n_layer} does not match the "
                               f"{len(f.tensors)} tensors in the file")
    for suffix in ("rope.dimension_count", "attention.key_length", "attention.value_length"):
        value = _key(f, f"{hp.arch}.{suffix}", int, required=False)
        if value is not None and value != hp.head_dim:
            raise UnsupportedModelError(f.path, f"{hp.arch}.{suffix} = {value}, Tern needs the head size {hp.head_dim}")
    vocab = _key(f, f"{hp.arch}.vocab_size", int, required=False)
    if vocab is not None and vocab != hp.n_vocab:
        raise ModelFormatError(f.path, f"vocab_size {vocab} differs from the embedding's {hp.n_vocab} rows",
                               tensor="token_embd.weight")
    tokens = f.metadata.get("tokenizer.ggml.tokens")
    if tokens is not None and len(tokens) != hp.n_vocab:
        raise ModelFormatError(f.path, f"the tokenizer has {len(tokens)} tokens, the embedding "
                               f"{hp.n_vocab} rows", tensor="token_embd.weight")
    if not (hp.rope_theta > 0 and 0 < hp.rms_eps < 1):
        raise ModelFormatError(f.path, f"rope base {hp.rope_theta} / rms epsilon {hp.rms_eps} out of range")


def _layer_shapes(hp: HParams) -> dict[str, tuple[int, ...]]:
    """ggml shapes (ne0 first) of one layer's tensors, by name suffix."""
    q, kv = hp.n_head * hp.head_dim, hp.n_head_kv * hp.head_dim
    return {
        "attn_norm": (hp.n_embd,), "attn_sub_norm": (q,), "ffn_norm": (hp.n_embd,), "ffn_sub_norm": (hp.n_ff,),
        "attn_q": (hp.n_embd, q), "attn_k": (hp.n_embd, kv), "attn_v": (hp.n_embd, kv),
        "attn_output": (q, hp.n_embd), "ffn_gate": (hp.n_embd, hp.n_ff), "ffn_up": (hp.n_embd, hp.n_ff),
        "ffn_down": (hp.n_ff, hp.n_embd),
    }


def _expect(f: GGUFFile, name: str, shape: tuple[int, ...], types: tuple[int, ...], what: str) -> TensorInfo:
    t = f.tensor(name)
    if t.shape != shape:
        raise ModelFormatError(f.path, f"shape {list(t.shape)}, expected {list(shape)}", tensor=name)
    if t.ggml_type not in types:
        raise UnsupportedModelError(f.path, f"type {f.type_name(t.ggml_type)} is not supported for "
                                    f"{what} (supported: {', '.join(f.type_name(x) for x in types)})",
                                    tensor=name)
    return t


def check_tensors(f: GGUFFile, hp: HParams) -> None:
    """Every tensor Tern needs exists with the right shape and a supported type (header only)."""
    for name in ("token_embd.weight", "output.weight"):
        if name in f.tensors or name == "token_embd.weight":
            _expect(f, name, (hp.n_embd, hp.n_vocab), EMBEDDING_TYPES, "an embedding")
    _expect(f, "output_norm.weight", (hp.n_embd,), NORM_TYPES, "a norm")
    for i in range(hp.n_layer):
        for suffix, shape in _layer_shapes(hp).items():
            name = f"blk.{i}.{suffix}.weight"
            if len(shape) == 1:
                _expect(f, name, shape, NORM_TYPES, "a norm")
                continue
            t = _expect(f, name, shape, TERNARY_TYPES, "a ternary weight")
            if t.ggml_type == I2_S and shape[0] % quants.I2S_BLOCK:
                raise UnsupportedModelError(f.path, f"I2_S rows of {shape[0]} are not a multiple of "
                                            f"{quants.I2S_BLOCK}", tensor=name)
            scale_name = f"blk.{i}.{suffix}.scale"
            if scale_name in f.tensors:
                _expect(f, scale_name, (1,), (F32,), "a weight scale")


_LAYER_FIELDS = {"wq": "attn_q", "wk": "attn_k", "wv": "attn_v", "wo": "attn_output",
                 "w_gate": "ffn_gate", "w_up": "ffn_up", "w_down": "ffn_down"}


def _load_layer(f: GGUFFile, hp: HParams, i: int) -> LayerWeights:
    shapes = _layer_shapes(hp)
    norms = {s: _norm(f, f"blk.{i}.{s}.weight", shapes[s][0])
             for s in ("attn_norm", "attn_sub_norm", "ffn_norm", "ffn_sub_norm")}
    mats = {field_name: _ternary(f, f"blk.{i}.{suffix}") for field_name, suffix in _LAYER_FIELDS.items()}
    return LayerWeights(**norms, **mats)


def _norm(f: GGUFFile, name: str, n: int) -> np.ndarray:
    t = f.tensor(name)
    values = quants.dequantize(f.tensor_bytes(name), t.ggml_type, n)
    if not np.all(np.isfinite(values)):
        raise ModelFormatError(f.path, "non-finite norm weight", tensor=name)
    return values


def _embedding(f: GGUFFile, name: str, hp: HParams) -> EmbeddingMatrix:
    t = f.tensor(name)
    return EmbeddingMatrix(name, hp.n_vocab, hp.n_embd, t.ggml_type, f.tensor_bytes(name))


def _ternary(f: GGUFFile, base: str) -> TernaryMatrix:
    name = base + ".weight"
    t = f.tensor(name)
    cols, rows = t.shape
    raw = f.tensor_bytes(name)
    if t.ggml_type == I2_S:
        scale = quants.i2_s_scale(raw, rows * cols)
    elif t.ggml_type in (TQ1_0, TQ2_0):
        scale = _tq_scale(f, name, t, raw)
    else:
        scale = _float_ternary_scale(raw, t.ggml_type, rows, cols)
    if base + ".scale" in f.tensors:        # upstream's optional per-tensor multiplier
        scale *= float(np.frombuffer(f.tensor_bytes(base + ".scale"), dtype="<f4")[0])
    if not np.isfinite(scale):
        raise ModelFormatError(f.path, f"weight scale {scale} is not finite", tensor=name)
    return TernaryMatrix(name, rows, cols, float(np.float32(scale)), t.ggml_type, raw, f.path)


def _tq_scale(f: GGUFFile, name: str, t: TensorInfo, raw: memoryview) -> float:
    """Tern keeps one scale per tensor: every block that holds a non-zero weight must carry the
    same f16 scale (an all-zero block may have any, upstream writes 0)."""
    n = t.n_elements
    d = quants.tq_block_scales(raw, n, t.ggml_type)
    distinct = np.unique(d[d != 0])
    if distinct.size > 1 or (distinct.size == 1 and (d == 0).any()):
        # decide by the blocks that hold weights (a d = 0 block with non-zero codes counts too)
        unpack = quants.unpack_tq1_0 if t.ggml_type == TQ1_0 else quants.unpack_tq2_0
        used = np.any(unpack(raw, n).reshape(-1, quants.QK_K) != 0, axis=1)
        distinct = np.unique(d[used])
        if distinct.size > 1:
            raise UnsupportedModelError(f.path, f"blocks carry {distinct.size} different scales "
                                        f"({distinct.min():g}..{distinct.max():g}); Tern needs one scale "
                                        "per tensor", tensor=name)
    return float(distinct[0]) if distinct.size else 0.0


def _float_rows(raw: memoryview, ggml_type: int, rows: int, cols: int):
    """Yields float32 row blocks of a float matrix, a few MB at a time."""
    row_bytes = tensor_nbytes(ggml_type, (cols,))
    step = max(1, _TERNARIZE_CHUNK_ELEMENTS // cols)
    for r in range(0, rows, step):
        r1 = min(rows, r + step)
        yield quants.dequantize(raw[r * row_bytes:r1 * row_bytes], ggml_type, (r1 - r) * cols).reshape(-1, cols)


def _float_ternary_scale(raw: memoryview, ggml_type: int, rows: int, cols: int) -> np.float32:
    """The scale of a float BitLinear weight. Weights that are already ternary ({-m, 0, +m}, as
    converters write them after quantizing) keep m: absmean over them would shrink the scale by
    the matrix's fraction of non-zeros (~0.69), the bug of re-ternarizing. Master weights get
    absmean, the training rule."""
    abs_sum, lo, hi = 0.0, np.inf, 0.0
    for block in _float_rows(raw, ggml_type, rows, cols):
        a = np.abs(block)
        abs_sum += float(a.sum(dtype=np.float64))
        nonzero = a[a != 0]
        if nonzero.size:
            lo, hi = min(lo, float(nonzero.min())), max(hi, float(nonzero.max()))
    if lo == hi:
        return np.float32(hi)
    return quants.absmean_scale(abs_sum, rows * cols)


def _float_codes(raw: memoryview, ggml_type: int, rows: int, cols: int, scale: np.float32) -> np.ndarray:
    return np.concatenate([quants.ternary_codes(block, scale) for block in _float_rows(raw, ggml_type, rows, cols)])


# ---------------------------------------------------------------------------------------------
# header-only inspection
# ---------------------------------------------------------------------------------------------
@dataclass
class ModelInfo:
    path: Path
    arch: str | None
    kind: str                    # 'bitnet' (Tern's engine) | 'llama.cpp' (other arch) | 'unsupported'
    reason: str | None           # why 'unsupported'
    name: str | None             # general.name
    n_params: int
    file_size: int
    tensor_types: dict[str, int]     # type name -> number of tensors
    context_length: int | None
    has_tokenizer: bool
    chat_template: str | None
    est_ram_bytes: int
    hparams: HParams | None = None   # for 'bitnet'
    metadata: dict[str, Any] = field(default_factory=dict, repr=False)


# what a session needs beside the mapped file: scratch, logits, the runtime itself
_RUNTIME_OVERHEAD = 200 * 2**20
_ESTIMATE_CTX = 4096


def inspect_gguf(path) -> ModelInfo:
    """Header-only summary. Raises ModelFormatError only when the file is not a readable GGUF."""
    try:
        f = GGUFFile(path)
    except UnsupportedModelError as e:
        return _unsupported_info(Path(path), e)
    with f:
        arch = f.metadata.get("general.architecture")
        arch = arch if isinstance(arch, str) else None
        kind, reason, hp = "llama.cpp", None, None
        if arch is None:
            kind, reason = "unsupported", "no general.architecture key"
        elif arch in BITNET_ARCHS:
            try:
                hp = read_hparams(f)
                check_tensors(f, hp)
                kind = "bitnet"
            except ModelFormatError as e:
                kind, reason = "unsupported", str(e)
        types: dict[str, int] = {}
        for t in f.tensors.values():
            types[f.type_name(t.ggml_type)] = types.get(f.type_name(t.ggml_type), 0) + 1
        ctx = f.metadata.get(f"{arch}.context_length")
        template = f.metadata.get("tokenizer.chat_template")
        return ModelInfo(
            path=f.path, arch=arch, kind=kind, reason=reason,
            name=f.metadata.get("general.name") if isinstance(f.metadata.get("general.name"), str) else None,
            n_params=sum(t.n_elements for t in f.tensors.values()),
            file_size=f.file_size, tensor_types=types,
            context_length=ctx if isinstance(ctx, int) and not isinstance(ctx, bool) else None,
            has_tokenizer="tokenizer.ggml.tokens" in f.metadata,
            chat_template=template if isinstance(template, str) else None,
            est_ram_bytes=_estimate_ram(f, arch, hp),
            hparams=hp,
            metadata={k: v for k, v in f.metadata.items() if not k.startswith("tokenizer.ggml.")},
        )


def _unsupported_info(path: Path, error: UnsupportedModelError) -> ModelInfo:
    size = path.stat().st_size
    return ModelInfo(path, None, "unsupported", str(error), None, 0, size, {}, None, False, None, size)


def _estimate_ram(f: GGUFFile, arch: str | None, hp: HParams | None) -> int:
    """Mapped file + f16 KV cache at min(training context, 4096) + the int8 LM head Tern builds
    + runtime overhead. An estimate for the 'will it fit' hint, not a promise."""
    total = f.file_size + _RUNTIME_OVERHEAD
    if hp is not None:
        ctx = min(hp.n_ctx_train, _ESTIMATE_CTX)
        total += 2 * hp.n_layer * ctx * hp.n_head_kv * hp.head_dim * 2
        total += hp.n_vocab * hp.n_embd
        return total
    md = f.metadata
    n_layer, n_embd = md.get(f"{arch}.block_count"), md.get(f"{arch}.embedding_length")
    n_head = md.get(f"{arch}.attention.head_count")
    n_kv = md.get(f"{arch}.attention.head_count_kv", n_head)
    ctx = md.get(f"{arch}.context_length", _ESTIMATE_CTX)
    values = (n_layer, n_embd, n_head, n_kv, ctx)
    if all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
        total += 2 * n_layer * min(ctx, _ESTIMATE_CTX) * n_kv * (n_embd // n_head) * 2
    return total
