"""`python -m engine <command>`: each command lives in its own engine/cmd_*.py module that
defines `register(subparsers)`; the parser sets `func(args) -> int`."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from engine.errors import TernError

COMMAND_MODULES = [
    "engine.cmd_info",
    "engine.cmd_make_test_model",
    "engine.cmd_generate",
    "engine.cmd_score",
    "engine.cmd_chat",
    "engine.cmd_convert",
    "engine.cmd_bench",
    "engine.cmd_download",
    "engine.cmd_models",
    "engine.cmd_selftest",
]


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command, or of `command` alone: a command imports only what it needs
    (`bench` measures the process's resident memory; `download` pulls in the HTTP stack)."""
    parser = argparse.ArgumentParser(prog="python -m engine", description="Tern engine command line")
    parser.add_argument("-v", "--verbose", action="store_true", help="log to stderr")
    subparsers = parser.add_subparsers(dest="command", required=True)
    wanted = f"engine.cmd_{command.replace('-', '_')}" if command else None
    modules = [wanted] if wanted in COMMAND_MODULES else COMMAND_MODULES
    for name in modules:
        importlib.import_module(name).register(subparsers)
    return parser


def _command_word(argv: list[str]) -> str | None:
    return next((a for a in argv if not a.startswith("-")), None)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(_command_word(argv)).parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr)
    try:
        return int(args.func(args) or 0)
    except TernError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
