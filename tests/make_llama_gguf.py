"""Writes a tiny random Llama-architecture GGUF that real llama.cpp loads: byte-level BPE vocab
(256 byte tokens, a few merges, ChatML special tokens), a ChatML chat template, f32 weights.

    python tests/make_llama_gguf.py OUT.gguf [--seed N]

The LM-head rows of the special tokens are zero, so with random weights the other logits almost
always beat them: replies run until max_tokens instead of ending at a random first token.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import gguf
import numpy as np

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIALS = ["<|bos|>", "<|im_end|>", "<|im_start|>"]
MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("e", "r"), ("a", "n"), ("o", "n"),
          ("Ġ", "a"), ("r", "e"), ("Ġ", "s")]

N_EMBD, N_HEAD, N_HEAD_KV, N_LAYER, N_FF, N_CTX = 64, 4, 2, 2, 128, 512
RMS_EPS, ROPE_THETA = 1e-5, 10000.0


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's printable spelling of each byte (the alphabet byte-level BPE vocabularies use)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    mapping, extra = {}, 0
    for b in range(256):
        if b in keep:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def vocabulary() -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges): byte tokens, merge results, then the special tokens."""
    byte_tokens = [_byte_to_unicode()[b] for b in range(256)]
    merged = ["".join(m) for m in MERGES]
    tokens = byte_tokens + merged + SPECIALS
    types = [gguf.TokenType.NORMAL] * (256 + len(merged)) + [gguf.TokenType.CONTROL] * len(SPECIALS)
    return tokens, [int(t) for t in types], [" ".join(m) for m in MERGES]


def llama_weights(seed: int = 0) -> dict[str, np.ndarray]:
    """The model's tensors by GGUF name, numpy layout (rows = ggml ne1): (out, in) matrices."""
    rng = np.random.default_rng(seed)
    tokens, _, _ = vocabulary()
    n_vocab, head_dim = len(tokens), N_EMBD // N_HEAD

    def weight(rows: int, cols: int, scale: float = 1.0) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * scale / np.sqrt(cols)).astype(np.float32)

    def norm() -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(N_EMBD)).astype(np.float32)

    w = {"token_embd.weight": weight(n_vocab, N_EMBD, np.sqrt(N_EMBD))}
    for i in range(N_LAYER):
        p = f"blk.{i}."
        w[p + "attn_norm.weight"] = norm()
        w[p + "attn_q.weight"] = weight(N_HEAD * head_dim, N_EMBD)
        w[p + "attn_k.weight"] = weight(N_HEAD_KV * head_dim, N_EMBD)
        w[p + "attn_v.weight"] = weight(N_HEAD_KV * head_dim, N_EMBD)
        w[p + "attn_output.weight"] = weight(N_EMBD, N_HEAD * head_dim)
        w[p + "ffn_norm.weight"] = norm()
        w[p + "ffn_gate.weight"] = weight(N_FF, N_EMBD)
        w[p + "ffn_up.weight"] = weight(N_FF, N_EMBD)
        w[p + "ffn_down.weight"] = weight(N_EMBD, N_FF)
    w["output_norm.weight"] = norm()
    head = weight(n_vocab, N_EMBD, 4.0)
    head[[tokens.index(s) for s in SPECIALS]] = 0.0
    w["output.weight"] = head
    return w


def write_llama_gguf(out: Path | str, seed: int = 0) -> Path:
    out = Path(out)
    tokens, types, merges = vocabulary()
    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_name("tern-tiny-llama")
    writer.add_context_length(N_CTX)
    writer.add_embedding_length(N_EMBD)
    writer.add_block_count(N_LAYER)
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD_KV)
    writer.add_layer_norm_rms_eps(RMS_EPS)
    writer.add_rope_dimension_count(N_EMBD // N_HEAD)
    writer.add_rope_freq_base(ROPE_THETA)
    writer.add_vocab_size(len(tokens))
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokens.index("<|bos|>"))
    writer.add_eos_token_id(tokens.index("<|im_end|>"))
    writer.add_add_bos_token(True)
    writer.add_chat_template(CHATML_TEMPLATE)
    for name, tensor in llama_weights(seed).items():
        writer.add_tensor(name, tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    write_llama_gguf(args.out, args.seed)


if __name__ == "__main__":
    main()
