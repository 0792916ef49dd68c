"""`python -m engine make-test-model`: write a random-weight BitNet GGUF (tests, benchmarks)."""
from __future__ import annotations

import argparse
import sys

from engine.testmodel import EMBEDDING_FORMATS, FORMATS, SHAPES, make_test_model


def register(subparsers) -> None:
    p = subparsers.add_parser("make-test-model", help="write a random-weight BitNet GGUF",
                              description="Write a random-weight BitNet model in the exact layout of real "
                                          "files; one seed gives the same ternary weights in every format.")
    p.add_argument("--out", required=True, help="output .gguf path")
    p.add_argument("--format", required=True, choices=sorted(FORMATS))
    p.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--tokenizer", metavar="DIR", help="Hugging Face tokenizer directory (tokenizer.json); "
                                                      "default: a 259-token byte vocabulary")
    p.add_argument("--embedding-type", default="f16", choices=sorted(EMBEDDING_FORMATS))
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        path = make_test_model(args.out, args.format, args.shape, args.seed, tokenizer_dir=args.tokenizer,
                               embedding_type=args.embedding_type)
    except OSError as e:
        sys.stderr.write(f"error: cannot write {args.out}: {e.strerror or e}\n")
        return 2
    sys.stdout.write(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)\n")
    return 0
