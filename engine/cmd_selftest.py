"""`python -m engine selftest`: check the native kernels and a tiny model on this CPU (see engine.selftest)."""
from __future__ import annotations

import json

from engine.selftest import run_self_test


def register(subparsers) -> None:
    p = subparsers.add_parser("selftest", help="check every kernel variant and a tiny model on this CPU")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    report = run_self_test(args.threads)
    if args.json:
        print(json.dumps({"ok": report.ok, "kernel": report.kernel, "variants": report.variants,
                          "failed_variants": report.failed_variants, "model_check": report.model_check,
                          "timings": report.timings}))
    else:
        print("\n".join(report.lines()))
    return 0 if report.ok else 1
