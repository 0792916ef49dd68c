"""`python -m engine info F [--json]`: what a GGUF holds, read from its header only."""
from __future__ import annotations

import argparse
import json
import sys

from engine.model import ModelInfo, inspect_gguf


def register(subparsers) -> None:
    p = subparsers.add_parser("info", help="describe a GGUF model file",
                              description="Architecture, shapes, tensor types, sizes, tokenizer, chat "
                                          "template and estimated RAM of a GGUF file (header only).")
    p.add_argument("model", help="path to a .gguf file")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def info_dict(info: ModelInfo) -> dict:
    hp = info.hparams
    return {
        "path": str(info.path),
        "architecture": info.arch,
        "kind": info.kind,
        "reason": info.reason,
        "name": info.name,
        "n_params": info.n_params,
        "file_size": info.file_size,
        "tensor_types": info.tensor_types,
        "context_length": info.context_length,
        "has_tokenizer": info.has_tokenizer,
        "chat_template": info.chat_template,
        "est_ram_bytes": info.est_ram_bytes,
        "hparams": None if hp is None else {**vars(hp), "head_dim": hp.head_dim},
    }


def _text(d: dict) -> str:
    lines = [f"file:          {d['path']} ({d['file_size'] / 1e6:.1f} MB)",
             f"architecture:  {d['architecture']} ({d['kind']}{': ' + d['reason'] if d['reason'] else ''})",
             f"name:          {d['name']}",
             f"parameters:    {d['n_params']:,}",
             "tensor types:  " + ", ".join(f"{k} x{v}" for k, v in sorted(d["tensor_types"].items()))]
    hp = d["hparams"]
    if hp:
        lines.append(f"shape:         {hp['n_layer']} layers, embd {hp['n_embd']}, ffn {hp['n_ff']}, "
                     f"heads {hp['n_head']}/{hp['n_head_kv']} (dim {hp['head_dim']}), vocab {hp['n_vocab']}, "
                     f"rope theta {hp['rope_theta']:g}, rms eps {hp['rms_eps']:g}, activation {hp['activation']}")
    lines += [f"context:       {d['context_length']}",
              f"tokenizer:     {'yes' if d['has_tokenizer'] else 'no'}",
              f"chat template: {'none' if d['chat_template'] is None else str(len(d['chat_template'])) + ' chars'}",
              f"est. RAM:      {d['est_ram_bytes'] / 2**20:.0f} MiB"]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    d = info_dict(inspect_gguf(args.model))
    sys.stdout.write((json.dumps(d) if args.json else _text(d)) + "\n")
    return 0
