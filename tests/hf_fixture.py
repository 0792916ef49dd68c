"""Tiny random Hugging Face BitNet checkpoints (`BitNetForCausalLM` layout) for the converter
and oracle tests, written with numpy alone so that converter tests run without torch.

Two kinds, as Microsoft publishes them:
- master: bf16 weights, `quantization_config` online autobitlinear (microsoft/...-bf16);
- packed: BitLinear weights as uint8 (out/4, in), four ternary rows per byte (transformers'
  `pack_weights`: value + 1 in bits 2i..2i+1 of packed row r holds row i*(out/4) + r), plus a
  bf16 `weight_scale` of shape (1,) that the layer divides by (linear_class "bitlinear").
The packed checkpoint is made from the master one, so both hold the same ternary model.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

TINY = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)
# A small embedding lets the layers, not the input token's own embedding, decide the logits (with
# a tied head, a large embedding makes every argmax the input token); the large final norm
# gives logits of a real model's size (std ~10) so that top-2 margins are rarely below 0.05.
EMBEDDING_STD = 0.05
OUTPUT_NORM_MEAN = 20.0
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bit patterns (uint16), round to nearest even."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def write_safetensors(path: Path, tensors: dict[str, tuple[str, np.ndarray]]) -> None:
    """tensors: name -> (safetensors dtype 'BF16'|'F32'|'U8'|..., raw array of that width)."""
    header, blobs, offset = {}, [], 0
    for name, (dtype, arr) in tensors.items():
        data = np.ascontiguousarray(arr).tobytes()
        header[name] = {"dtype": dtype, "shape": list(arr.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for b in blobs:
            f.write(b)


def master_config(vocab_size: int, tie: bool, dims: dict) -> dict:
    """config.json in the style of microsoft/bitnet-b1.58-2B-4T-bf16 (legacy top-level rope_theta)."""
    return {
        "architectures": ["BitNetForCausalLM"], "model_type": "bitnet",
        "vocab_size": vocab_size, **dims,
        "hidden_act": "relu2", "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0, "tie_word_embeddings": tie, "attention_bias": False,
        "attention_dropout": 0.0,
        # Llama-3's ids where the vocabulary has them (transformers warns about ids outside it)
        "bos_token_id": 128000 if vocab_size > 128001 else None,
        "eos_token_id": 128001 if vocab_size > 128001 else None,
        "initializer_range": 0.02, "use_cache": True, "torch_dtype": "bfloat16",
        "quantization_config": {"quant_method": "bitnet", "linear_class": "autobitlinear",
                                "quantization_mode": "online"},
    }


def random_master_weights(seed: int, vocab_size: int, tie: bool, dims: dict) -> dict[str, np.ndarray]:
    """float32 arrays already rounded to bf16 values, named as in BitNetForCausalLM."""
    rng = np.random.default_rng(seed)
    h, ff = dims["hidden_size"], dims["intermediate_size"]
    head_dim = h // dims["num_attention_heads"]
    kv = dims["num_key_value_heads"] * head_dim
    shapes = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
              "self_attn.o_proj": (h, h), "mlp.gate_proj": (ff, h), "mlp.up_proj": (ff, h),
              "mlp.down_proj": (h, ff)}

    def rand(shape, std, mean=0.0):
        return bf16_to_f32(bf16_bits(rng.normal(mean, std, size=shape).astype(np.float32)))

    w = {"model.embed_tokens.weight": rand((vocab_size, h), EMBEDDING_STD)}
    for i in range(dims["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for name in LINEARS:
            w[p + name + ".weight"] = rand(shapes[name], 0.02)
        # Norm weights away from 1 so that a swapped or skipped norm changes the logits.
        w[p + "input_layernorm.weight"] = rand((h,), 0.2, 1.0)
        w[p + "post_attention_layernorm.weight"] = rand((h,), 0.2, 1.0)
        w[p + "self_attn.attn_sub_norm.weight"] = rand((h,), 0.2, 1.0)
        w[p + "mlp.ffn_sub_norm.weight"] = rand((ff,), 0.2, 1.0)
    w["model.norm.weight"] = rand((h,), 0.1 * OUTPUT_NORM_MEAN, OUTPUT_NORM_MEAN)
    if not tie:
        w["lm_head.weight"] = rand((vocab_size, h), 0.05)
    return w


def absmean_ternary(w: np.ndarray) -> tuple[np.ndarray, np.float32]:
    """transformers' WeightQuant: s = 1/max(mean|W|, 1e-5); codes = clamp(round(W*s), -1, 1)."""
    inv = np.float32(1.0) / np.maximum(np.mean(np.abs(w), dtype=np.float32), np.float32(1e-5))
    return np.clip(np.rint(w * inv), -1, 1).astype(np.int8), np.float32(inv)


def pack_rows(codes: np.ndarray) -> np.ndarray:
    """transformers' pack_weights: (out, in) ternary -> (out/4, in) uint8."""
    out = codes.shape[0]
    assert out % 4 == 0
    quarter = out // 4
    vals = (codes.astype(np.int16) + 1).astype(np.uint8)
    packed = np.zeros((quarter, codes.shape[1]), dtype=np.uint8)
    for i in range(4):
        packed |= vals[i * quarter:(i + 1) * quarter] << (2 * i)
    return packed


def write_hf_checkpoint(out_dir, seed: int = 0, vocab_size: int = 512, packed: bool = False,
                        tie: bool = True, dims: dict | None = None, tokenizer_dir=None) -> Path:
    """Write config.json + model.safetensors (+ tokenizer files if tokenizer_dir). Returns out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dims = dict(TINY if dims is None else dims)
    config = master_config(vocab_size, tie, dims)
    weights = random_master_weights(seed, vocab_size, tie, dims)
    tensors: dict[str, tuple[str, np.ndarray]] = {}
    for name, arr in weights.items():
        is_linear = any(name.endswith(lin + ".weight") for lin in LINEARS)
        if packed and is_linear:
            codes, inv_scale = absmean_ternary(arr)
            tensors[name] = ("U8", pack_rows(codes))
            tensors[name[: -len("weight")] + "weight_scale"] = ("BF16", bf16_bits(np.array([inv_scale])))
        else:
            tensors[name] = ("BF16", bf16_bits(arr))
    if packed:
        config["quantization_config"] = {"quant_method": "bitnet", "linear_class": "bitlinear",
                                         "quantization_mode": "offline"}
    write_safetensors(out / "model.safetensors", tensors)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    if tokenizer_dir is not None:
        for f in Path(tokenizer_dir).iterdir():
            if f.name.startswith("tokenizer"):
                (out / f.name).write_bytes(f.read_bytes())
    return out
