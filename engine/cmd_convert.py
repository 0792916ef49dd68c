"""`python -m engine convert HF_DIR --out F --format FMT`: Hugging Face BitNet checkpoint -> GGUF."""
from __future__ import annotations

import argparse
import sys

from engine.convert import convert
from engine.testmodel import EMBEDDING_FORMATS, FORMATS


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "convert", help="convert a Hugging Face BitNet checkpoint to GGUF",
        description="Convert a BitNetForCausalLM checkpoint (config.json + safetensors: bf16 master "
                    "weights or the packed 1.58-bit weights) to GGUF. Packed weights keep their "
                    "ternary values and scales; master weights are ternarized with absmean.")
    p.add_argument("hf_dir", metavar="HF_DIR", help="checkpoint directory")
    p.add_argument("--out", required=True, help="output .gguf path")
    p.add_argument("--format", required=True, choices=sorted(FORMATS))
    p.add_argument("--embedding-type", choices=sorted(EMBEDDING_FORMATS),
                   help="type of the token embedding / LM head (default: f16 for ternary formats, "
                        "else the format itself)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    path = convert(args.hf_dir, args.out, args.format, embedding_type=args.embedding_type)
    print(f"wrote {path}", file=sys.stderr)
    return 0
