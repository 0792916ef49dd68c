"""`python -m engine bench`: speed of Tern's decoder (and llama.cpp's, with --peer) on one
model file, with the machine's measured read bandwidth; engine/bench.py does the work."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from engine.bench import PEERS, BenchError, BenchOptions, run_bench

_LM_HEADS = ("int8", "f16")


def _lm_heads(text: str) -> tuple[str, ...]:
    heads = tuple(h.strip() for h in text.split(",") if h.strip())
    if not heads or any(h not in _LM_HEADS for h in heads):
        raise argparse.ArgumentTypeError(f"--lm-head takes {', '.join(_LM_HEADS)} or both, "
                                         f"comma-separated; got {text!r}")
    return heads


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="measure prompt and decode speed",
                              description="pp128/pp512/tg128 tokens/s, time to first token, load "
                                          "time, peak RSS and decode bandwidth against a probe "
                                          "of this machine's memory read bandwidth.")
    p.add_argument("--model", required=True, type=Path, help="BitNet GGUF file")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--backend", default="native", choices=("native", "cuda", "reference"))
    p.add_argument("--lm-head", default=("int8",), type=_lm_heads, metavar="int8|f16|int8,f16",
                   help="LM head(s) to measure (default int8)")
    p.add_argument("--repeat", type=int, default=3, help="runs per figure (median and best)")
    p.add_argument("--ctx", type=int, default=4096, help="KV cache length (f16)")
    p.add_argument("--tg", type=int, default=128, help="decoded tokens per decode run")
    p.add_argument("--depth", type=int, default=1,
                   help="prompt tokens cached before decode (default 1; e.g. 3584: a long chat)")
    p.add_argument("--probe-mb", type=int, default=1024,
                   help="bandwidth probe buffer (MiB; larger than the last-level cache)")
    p.add_argument("--peer", choices=PEERS, help="also run this engine on TQ2_0/TQ1_0 files")
    p.add_argument("--peer-model", type=Path, action="append", default=[],
                   help="peer model file (repeatable); default: TQ2_0 and TQ1_0 files of the "
                        "model's shape, written next to it by make-test-model when missing")
    p.add_argument("--peer-dir", type=Path, help="where missing peer files are written")
    p.add_argument("--tokenizer", type=Path, metavar="DIR",
                   help="tokenizer directory used to write peer files (the model's vocabulary)")
    p.add_argument("--fill-ctx", action="store_true",
                   help="also fill the whole KV cache (--ctx tokens) and report that peak RSS")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print the full report as JSON")
    out.add_argument("--markdown", action="store_true", help="print a results table (README)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.backend == "cuda":  # the GPU bench and its transformers peer: engine/bench_cuda.py (helper H7)
        if args.depth != 1:
            raise BenchError("--depth is measured by the CPU bench only (--backend native or reference)")
        from engine.bench_cuda import main_cuda
        return main_cuda(args)
    opts = BenchOptions(model=args.model, threads=args.threads, backend=args.backend,
                        lm_heads=args.lm_head, repeat=args.repeat, n_ctx=args.ctx, tg=args.tg,
                        probe_mb=args.probe_mb, peer=args.peer, peer_models=args.peer_model,
                        peer_dir=args.peer_dir, tokenizer=args.tokenizer, fill_ctx=args.fill_ctx,
                        depth=args.depth)
    report = run_bench(opts)
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        sys.stdout.write("\n")
    elif args.markdown:
        sys.stdout.write(format_markdown(report, opts))
    else:
        sys.stdout.write(format_report(report, opts))
    return 0


def format_report(report: dict, opts: BenchOptions) -> str:
    tg = f"tg{opts.tg}_tps"
    pps = [f"pp{n}_tps" for n in opts.pp]
    ttft = f"ttft{max(opts.pp)}_s"
    lines = [f"machine: {report['machine']['cpu']} ({report['machine']['logical_cpus']} CPUs), "
             f"threads {report['threads']}, repeat {report['repeat']} (median / best)",
             "read bandwidth: " + ", ".join(f"{t} thread(s) {v:.1f} GB/s"
                                            for t, v in report["bandwidth_gbps"].items())]
    for e in report["engines"]:
        head = f" {e['lm_head']} head" if "lm_head" in e else ""
        lines.append(f"{e['engine']}{head} [{e['kernel']}] {Path(e['model']).name}")
        for key in pps + [tg]:
            at = f" after {opts.depth} cached" if key == tg and opts.depth > 1 else ""
            lines.append(f"  {key[:-4]:>6}: {e[key]['median']:8.2f} / {e[key]['best']:8.2f} tok/s{at}")
        lines.append(f"  ttft  : {e[ttft]['median']:8.3f} / {e[ttft]['best']:8.3f} s")
        frac = e["decode_bandwidth_fraction"]
        lines.append(f"  decode: {e['decode_gbps']['median']:.1f} GB/s = "
                     f"{100 * frac['median']:.0f}% / {100 * frac['best']:.0f}% of measured "
                     f"({e['bytes_per_token']['total'] / 1e6:.0f} MB/token)")
        full = e.get("peak_rss_full_ctx_bytes")
        lines.append(f"  load {e['load_s']:.2f} s, peak RSS {e['peak_rss_bytes'] / 2**20:.0f} MiB"
                     + (f" ({full / 2**20:.0f} MiB with all {report['n_ctx']} positions cached)"
                        if full else ""))
    for name, r in report["ratios"].items():
        lines.append(f"{name}: " + ", ".join(f"{k[:-4]} x{v['median']:.2f} (best x{v['best']:.2f})"
                                             for k, v in r.items()))
    return "\n".join(lines) + "\n"


def format_markdown(report: dict, opts: BenchOptions) -> str:
    """One table row per engine: median (best) of each figure."""
    tg, ttft = f"tg{opts.tg}_tps", f"ttft{max(opts.pp)}_s"
    pps = [f"pp{n}_tps" for n in opts.pp]
    head = (["engine", "file", "LM head", "threads"] + [k[:-4] + " tok/s" for k in pps]
            + [tg[:-4] + (f" after {opts.depth}" if opts.depth > 1 else "") + " tok/s",
               "TTFT " + ttft[4:-2] + " s", "decode GB/s (of probe)",
               "peak RSS MiB", "load s"])
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in report["engines"]:
        frac = e["decode_bandwidth_fraction"]
        cells = [f"{e['engine']} [{e['kernel']}]", Path(e["model"]).name, e.get("lm_head", "file's"),
                 str(report["threads"])]
        cells += [f"{e[k]['median']:.1f} ({e[k]['best']:.1f})" for k in pps + [tg]]
        cells.append(f"{e[ttft]['median']:.2f} ({e[ttft]['best']:.2f})")
        cells.append(f"{e['decode_gbps']['median']:.1f} ({100 * frac['median']:.0f}%)")
        cells += [f"{e['peak_rss_bytes'] / 2**20:.0f}", f"{e['load_s']:.1f}"]
        rows.append("| " + " | ".join(cells) + " |")
    bw = ", ".join(f"{t} thread(s) {v:.1f} GB/s" for t, v in report["bandwidth_gbps"].items())
    return "\n".join(rows) + f"\n\nMeasured read bandwidth (best probe): {bw}.\n"
