"""The benchmark behind `python -m engine bench`: prompt processing (pp128, pp512), decode
(tg128), time to first token for a 512-token prompt, load time, peak RSS and the kernel
variant, for Tern's decoder and optionally llama.cpp on TQ2_0/TQ1_0 files of the same shape.

Decode is bound by the bytes read per token, so it is also reported against the machine's
read bandwidth, measured in the same process (native/src/bwprobe.c): achieved bandwidth =
bytes read per token x tokens/s, and its fraction of the measured limit. That fraction stays
meaningful on a noisy shared host, where absolute tokens/s move from run to run.

Every figure is measured `repeat` times and reported as median and best.
"""
from __future__ import annotations

import ctypes
import logging
import os
import platform
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engine.errors import NativeError, TernError

log = logging.getLogger(__name__)

PEERS = ("llama-cpp",)
PEER_FORMATS = ("tq2_0", "tq1_0")
KV_BYTES = 2  # f16 K and V cache entries (Tern's default and llama.cpp's)


class BenchError(TernError):
    """A benchmark that cannot run as asked (missing peer files, peer not installed, ...)."""


@dataclass
class BenchOptions:
    model: Path
    threads: int = 1
    backend: str = "native"
    lm_heads: tuple[str, ...] = ("int8",)
    repeat: int = 3
    n_ctx: int = 4096
    pp: tuple[int, ...] = (128, 512)
    tg: int = 128
    probe_mb: int = 1024
    peer: str | None = None
    peer_models: list[Path] = field(default_factory=list)
    peer_dir: Path | None = None      # where missing peer files are written (default: model's dir)
    tokenizer: Path | None = None     # HF tokenizer dir for writing peer files (the model's vocab)
    seed: int = 1
    fill_ctx: bool = False            # also fill the whole KV cache and report that peak RSS
    depth: int = 1                    # positions cached before decode (a chat's context so far)


# ---------------------------------------------------------------------------------------------
# Process and machine facts (the Linux-specific parts, each with a portable fallback)
# ---------------------------------------------------------------------------------------------

def reset_peak_rss() -> bool:
    """Restart the peak-RSS high-water mark (Linux >= 4.0: clear_refs 5). False elsewhere, where
    the peak is the whole process's."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (since the last successful reset on Linux)."""
    status = Path("/proc/self/status")
    if sys.platform.startswith("linux") and status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


def machine_info() -> dict:
    info = {"system": platform.system(), "machine": platform.machine(),
            "logical_cpus": os.cpu_count(), "cpu": platform.processor() or None, "cpu_flags": []}
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        text = cpuinfo.read_text(errors="replace")
        for line in text.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and info["cpu"] is None:
                info["cpu"] = value.strip()
            elif key.strip() == "flags":
                wanted = ("avx2", "avx512f", "avx512_vnni", "avx512vbmi", "avx_vnni", "amx_int8")
                info["cpu_flags"] = [f for f in value.split() if f in wanted]
                break
    return info


# ---------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------

def probe_bandwidth(nbytes: int, threads: int, reps: int = 3) -> float:
    """Median memory read bandwidth in GB/s (1e9 B/s) over 64 MiB bursts of an nbytes buffer,
    with `threads` threads (native/src/bwprobe.c)."""
    from engine import _native
    out = ctypes.c_double()
    status = _native.lib().tern_bandwidth_probe(nbytes, threads, reps, ctypes.byref(out))
    if status != _native.TERN_OK:
        raise NativeError(status, _native.lib().tern_last_error().decode("utf-8", "replace"))
    return out.value


def summarize(values: list[float], higher_is_better: bool = True) -> dict:
    best = max(values) if higher_is_better else min(values)
    return {"median": statistics.median(values), "best": best, "runs": values}


# ---------------------------------------------------------------------------------------------
# Measurements on one decoder (the Decoder protocol of docs/ENGINE-API.md)
# ---------------------------------------------------------------------------------------------

def prompt_ids(n_vocab: int, n: int, seed: int) -> list[int]:
    """A fixed pseudo-random prompt (speed does not depend on which ids)."""
    return np.random.default_rng(seed).integers(0, n_vocab, size=n).tolist()


def measure_prompt(decoder, ids: list[int]) -> tuple[float, float]:
    """(seconds for forward over ids from an empty cache, seconds to the first generated id)."""
    decoder.truncate(0)
    t0 = time.perf_counter()
    logits = decoder.forward(ids)
    t1 = time.perf_counter()
    int(np.argmax(logits))
    return t1 - t0, time.perf_counter() - t0


def measure_decode(decoder, prompt: list[int], n: int) -> float:
    """Seconds for n greedy single-token steps after `prompt` (written in chunks of 512)."""
    decoder.truncate(0)
    for i in range(0, len(prompt), 512):
        logits = decoder.forward(prompt[i:i + 512])
    t0 = time.perf_counter()
    for _ in range(n):
        logits = decoder.forward([int(np.argmax(logits))])
    return time.perf_counter() - t0


def fill_context(decoder, opts: BenchOptions) -> None:
    """Writes every KV-cache position (the cache's pages count only once written), so the peak
    RSS that follows is that of a full context."""
    ids = prompt_ids(decoder.n_vocab, 512, opts.seed)
    decoder.truncate(0)
    while decoder.n_past < decoder.n_ctx:
        decoder.forward(ids[: min(len(ids), decoder.n_ctx - decoder.n_past)])


def measure_decoder(decoder, opts: BenchOptions) -> dict:
    ids = prompt_ids(decoder.n_vocab, max(opts.pp + (opts.depth,)), opts.seed)
    pp: dict[int, list[float]] = {n: [] for n in opts.pp}
    ttft: list[float] = []
    tg: list[float] = []
    for r in range(opts.repeat):
        for n in opts.pp:
            fwd, first = measure_prompt(decoder, ids[:n])
            pp[n].append(n / fwd)
            if n == max(opts.pp):
                ttft.append(first)
        tg.append(opts.tg / measure_decode(decoder, ids[:opts.depth], opts.tg))
        log.info("run %d/%d: %s, tg%d %.2f tok/s", r + 1, opts.repeat,
                 ", ".join(f"pp{n} {v[-1]:.1f}" for n, v in pp.items()), opts.tg, tg[-1])
    out = {f"pp{n}_tps": summarize(v) for n, v in pp.items()}
    out[f"tg{opts.tg}_tps"] = summarize(tg)
    out[f"ttft{max(opts.pp)}_s"] = summarize(ttft, higher_is_better=False)
    return out


# ---------------------------------------------------------------------------------------------
# Bytes read per decoded token
# ---------------------------------------------------------------------------------------------

def kv_bytes_per_token(n_layer: int, n_head_kv: int, head_dim: int, tg: int, depth: int = 1) -> float:
    """Mean KV-cache bytes read per step of measure_decode: step i (0-based) attends over the
    `depth`-token prompt, the i tokens before it and itself."""
    per_position = n_layer * 2 * n_head_kv * head_dim * KV_BYTES
    return per_position * statistics.mean(depth + 1 + i for i in range(tg))


def tern_bytes_per_token(model, lm_head: str, tg: int, depth: int = 1) -> dict:
    """Tern's decode reads every ternary weight at 2 bits (the T2 layout), the LM head (int8
    copy + a f32 scale per row, or f16) and the KV cache."""
    hp = model.hparams
    ternary = sum(m.rows * m.cols // 4 for layer in model.layers
                  for m in (layer.wq, layer.wk, layer.wv, layer.wo, layer.w_gate, layer.w_up,
                            layer.w_down))
    head = hp.n_vocab * hp.n_embd * (1 if lm_head == "int8" else 2)
    head += hp.n_vocab * 4 if lm_head == "int8" else 0
    kv = kv_bytes_per_token(hp.n_layer, hp.n_head_kv, hp.head_dim, tg, depth)
    return {"ternary": ternary, "lm_head": head, "kv": kv, "total": ternary + head + kv}


def file_bytes_per_token(path: Path, tg: int, depth: int = 1) -> dict:
    """A peer reads every tensor of its file once per token, except the token embedding when a
    separate output matrix exists (then only looked up by row); plus the KV cache."""
    from engine.gguf_file import GGUFFile
    with GGUFFile(path) as f:
        arch = f.metadata["general.architecture"]
        md = f.metadata
        tied = "output.weight" not in f.tensors
        weights = sum(t.nbytes for name, t in f.tensors.items()
                      if tied or name != "token_embd.weight")
        head = f.tensors["output.weight" if not tied else "token_embd.weight"].nbytes
        n_head = md[f"{arch}.attention.head_count"]
        head_dim = md[f"{arch}.embedding_length"] // n_head
        kv = kv_bytes_per_token(md[f"{arch}.block_count"],
                                md.get(f"{arch}.attention.head_count_kv", n_head), head_dim, tg, depth)
    return {"weights_without_head": weights - head, "lm_head": head, "kv": kv,
            "total": weights + kv}


def add_bandwidth(result: dict, bytes_per_token: dict, probe_gbps: float, tg: int) -> None:
    tps = result[f"tg{tg}_tps"]
    result["bytes_per_token"] = bytes_per_token
    achieved = [v * bytes_per_token["total"] / 1e9 for v in tps["runs"]]
    result["decode_gbps"] = summarize(achieved)
    result["decode_bandwidth_fraction"] = summarize([a / probe_gbps for a in achieved])


# ---------------------------------------------------------------------------------------------
# Engines
# ---------------------------------------------------------------------------------------------

def bench_tern(opts: BenchOptions, lm_head: str) -> dict:
    from engine.backends import open_decoder
    from engine.model import load_model
    scoped = reset_peak_rss()
    t0 = time.perf_counter()
    decoder = open_decoder(opts.model, backend=opts.backend, n_ctx=opts.n_ctx,
                           threads=opts.threads, lm_head=lm_head)
    load_s = time.perf_counter() - t0
    try:
        result = {"engine": f"tern {decoder.backend_name}", "model": str(opts.model),
                  "lm_head": lm_head, "kernel": decoder.kernel, "load_s": load_s}
        result.update(measure_decoder(decoder, opts))
        result["peak_rss_bytes"] = peak_rss_bytes()
        result["peak_rss_scope"] = "engine" if scoped else "process"
        if opts.fill_ctx:
            fill_context(decoder, opts)
            # max: Linux syncs per-thread RSS counters lazily, so VmHWM can read a few KiB lower
            result["peak_rss_full_ctx_bytes"] = max(peak_rss_bytes(), result["peak_rss_bytes"])
    finally:
        decoder.close()
    model = load_model(opts.model)
    try:
        result["bytes_per_token"] = tern_bytes_per_token(model, lm_head, opts.tg, opts.depth)
    finally:
        model.close()
    return result


def bench_llama_cpp(path: Path, opts: BenchOptions) -> dict:
    try:
        from engine.llama_backend import LlamaCppDecoder
    except ImportError as exc:
        raise BenchError(f"--peer llama-cpp needs llama-cpp-python ({exc})") from exc
    scoped = reset_peak_rss()
    t0 = time.perf_counter()
    decoder = LlamaCppDecoder(path, n_ctx=opts.n_ctx, threads=opts.threads)
    load_s = time.perf_counter() - t0
    try:
        result = {"engine": "llama.cpp", "model": str(path), "kernel": decoder.kernel,
                  "load_s": load_s}
        result.update(measure_decoder(decoder, opts))
        result["peak_rss_bytes"] = peak_rss_bytes()
        result["peak_rss_scope"] = "engine" if scoped else "process"
    finally:
        decoder.close()
    result["bytes_per_token"] = file_bytes_per_token(path, opts.tg, opts.depth)
    return result


def peer_files(opts: BenchOptions) -> list[Path]:
    """The peer's model files: given ones, or TQ2_0/TQ1_0 (arch `bitnet`) of the model's shape
    written by make_test_model next to the model (or in peer_dir) when missing."""
    if opts.peer_models:
        missing = [p for p in opts.peer_models if not Path(p).is_file()]
        if missing:
            raise BenchError(f"peer model not found: {missing[0]}")
        return [Path(p) for p in opts.peer_models]
    from engine.model import inspect_gguf
    from engine.testmodel import SHAPES, make_test_model
    info = inspect_gguf(opts.model)
    hp = info.hparams
    dims = (hp.n_embd, hp.n_ff, hp.n_layer, hp.n_head, hp.n_head_kv)
    shape = next((name for name, s in SHAPES.items()
                  if (s.n_embd, s.n_ff, s.n_layer, s.n_head, s.n_head_kv) == dims), None)
    if shape is None:
        raise BenchError(f"{opts.model} has no make-test-model shape; give --peer-model files")
    out_dir = Path(opts.peer_dir or Path(opts.model).parent)
    paths = []
    for fmt in PEER_FORMATS:
        path = out_dir / f"tern-bench-{shape}-{fmt}-seed{opts.seed}-vocab{hp.n_vocab}.gguf"
        if not path.is_file():
            log.info("writing peer model %s", path)
            make_test_model(path, fmt, shape, opts.seed, tokenizer_dir=opts.tokenizer)
        if inspect_gguf(path).hparams.n_vocab != hp.n_vocab:
            raise BenchError(f"peer file {path} has another vocabulary than {opts.model}: "
                             "pass --tokenizer with the model's tokenizer directory")
        paths.append(path)
    return paths


def ratios(tern: dict, peer: dict, opts: BenchOptions) -> dict:
    keys = [f"pp{n}_tps" for n in opts.pp] + [f"tg{opts.tg}_tps"]
    return {k: {"median": tern[k]["median"] / peer[k]["median"],
                "best": tern[k]["best"] / peer[k]["best"]} for k in keys}


def run_bench(opts: BenchOptions) -> dict:
    """Runs every measurement; returns the JSON-ready report.

    The bandwidth probe runs before the first engine and after each one: other processes on a
    shared host only ever lower a sample, so the best sample per thread count is the limit that
    decode bandwidth is compared with (all samples are in the report)."""
    if opts.repeat < 1 or opts.threads < 1 or opts.tg < 1 or not opts.pp or min(opts.pp) < 1:
        raise BenchError("repeat, threads, tg and the prompt lengths must be at least 1")
    if not 1 <= opts.depth <= opts.n_ctx - opts.tg:
        raise BenchError(f"--depth must be 1..{opts.n_ctx - opts.tg} (the context less --tg)")
    peers = peer_files(opts) if opts.peer else []
    report = {"machine": machine_info(), "threads": opts.threads, "repeat": opts.repeat,
              "n_ctx": opts.n_ctx, "decode_depth": opts.depth, "engines": [], "ratios": {}}
    counts = sorted({1, opts.threads})
    samples: dict[str, list[float]] = {str(t): [] for t in counts}

    def probe() -> None:
        for t in counts:
            samples[str(t)].append(probe_bandwidth(opts.probe_mb << 20, t))

    probe()
    for head in opts.lm_heads:
        report["engines"].append(bench_tern(opts, head))
        probe()
    for path in peers:
        report["engines"].append(bench_llama_cpp(path, opts))
        probe()
    report["bandwidth_samples_gbps"] = samples
    report["bandwidth_gbps"] = {t: max(v) for t, v in samples.items()}
    limit = report["bandwidth_gbps"][str(opts.threads)]
    for result in report["engines"]:
        add_bandwidth(result, result["bytes_per_token"], limit, opts.tg)
    tern = report["engines"][0]
    for path, result in zip(peers, report["engines"][len(opts.lm_heads):]):
        report["ratios"][f"tern/{path.name}"] = ratios(tern, result, opts)
    return report
