"""`python -m engine models`: the model library — list, add a GGUF, set the default, remove."""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from engine.library import Library, ModelEntry, load_catalogue


def register(subparsers) -> None:
    p = subparsers.add_parser("models", help="list the installed models",
                              description="List the models in Tern's library (default marked *), "
                                          "or change it. `--catalogue` lists the models Tern offers.")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--add", metavar="GGUF", help="add a GGUF file where it is (it is not copied)")
    p.add_argument("--set-default", metavar="ID", help="make this model the default")
    p.add_argument("--remove", metavar="ID",
                   help="remove from the library (deletes the file only if Tern downloaded it)")
    p.add_argument("--catalogue", action="store_true", help="list the models Tern can download")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    library = Library()
    if args.catalogue:
        return _print_catalogue(args.json)
    if args.add:
        entry = library.add(args.add)
        _say(f"added {entry.id} {entry.name}")
    if args.set_default:
        library.set_default(args.set_default)
    if args.remove:
        entry = library.remove(args.remove)
        _say(f"removed {entry.id} {entry.name}" + ("" if library.owns(entry) else " (file left in place)"))
    entries = library.entries()
    default = library.default()
    if args.json:
        print(json.dumps([{**asdict(e), "default": default is not None and e.id == default.id,
                           "missing": not e.exists} for e in entries], indent=1))
        return 0
    if not entries:
        _say("no models yet: run `python -m engine download` to get BitNet b1.58 2B4T")
        return 0
    print(_table(entries, default.id if default else None))
    return 0


def _table(entries: list[ModelEntry], default_id: str | None) -> str:
    rows = [("", "ID", "NAME", "QUANT", "SIZE", "CTX", "EST. RAM", "ENGINE", "SOURCE")]
    for e in entries:
        rows.append(("*" if e.id == default_id else ("!" if not e.exists else ""), e.id, e.name,
                     e.quant or "?", f"{e.size / 1e9:.2f} GB", str(e.ctx or "?"), f"{e.est_ram / 1e9:.2f} GB",
                     e.kind, e.source))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    if any(not e.exists for e in entries):
        lines.append("! = file missing")
    return "\n".join(lines)


def _print_catalogue(as_json: bool) -> int:
    models = load_catalogue()
    if as_json:
        print(json.dumps(models, indent=1))
        return 0
    for m in models:
        size = f"~{m['approx_size_bytes'] / 1e9:.2f} GB" if m.get("approx_size_bytes") else "size n/a"
        target = f"{m['repo']}" + (f" {m['file']}" if m.get("file") else "")
        print(f"{'*' if m['default'] else ' '} {m['name']}\n    {target}  [{m['route']}, {m['format']}, "
              f"{size}, {m['license'] or 'licence: see repo'}, {m['training']}]")
    return 0


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
