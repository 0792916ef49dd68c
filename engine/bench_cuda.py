"""`python -m engine bench --backend cuda`: Tern's CUDA decoder on one GPU, and in the same
run the GPU route a user would otherwise take: Hugging Face transformers' BitNetForCausalLM in
bf16 with a static cache (its decode step compiled, CUDA graphs), random weights of the same
shape.

Reported: decode tokens/s (tg; after one untimed pass, as the transformers route is timed after
two generations) two ways: the chat session's loop, greedy as the peer generates (each step's
best logits selected on the GPU, the sampler, the next step: what a chat runs), and every
step's whole logit vector copied to the host; the decode step on the GPU alone (the captured graph
replayed, no host work), prompt tokens/s and time to first token for a 512-token prompt, the
device's measured read bandwidth, decode bandwidth (bytes per token x tokens/s) against it,
and each decode GEMV shape's bandwidth (q|k|v, wo, gate|up, down, LM head) timed in a graph over
every layer's matrix so the bytes exceed the L2 cache (with TERN_CUDA_PERSISTENT=1: as the
persistent decode kernel runs that step, docs/CUDA.md), next to the same chain of kernels that
only read those bytes (the floor of that timing: what any kernel moving them could reach).
Median and best of --repeat runs."""
from __future__ import annotations

import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

PROMPT = 512
SHAPES = ("qkv", "wo", "gate_up", "down", "lm_head")


def _summary(values: list[float], higher_is_better: bool = True) -> dict:
    return {"median": statistics.median(values), "best": max(values) if higher_is_better else min(values),
            "runs": values}


def _bytes_per_token(model, lm_head: str, n_ctx_mean: float) -> dict:
    hp = model.hparams
    ternary = sum(m.rows * m.cols / 4 for m in model.ternary_matrices())
    head = hp.n_vocab * hp.n_embd * (1 if lm_head == "int8" else 2) + (hp.n_vocab * 4 if lm_head == "int8" else 0)
    kv = 2 * hp.n_layer * hp.n_head_kv * hp.head_dim * 2 * n_ctx_mean
    return {"ternary": ternary, "lm_head": head, "kv": kv, "total": ternary + head + kv}


def bench_tern_cuda(model_path: Path, lm_head: str, repeat: int, tg: int, n_ctx: int) -> dict:
    from engine.cuda import CudaDecoder
    from engine.model import load_model
    from engine.sampling import Sampler, SamplerParams

    t0 = time.perf_counter()
    dec = CudaDecoder(load_model(model_path), n_ctx=n_ctx, lm_head=lm_head)
    load_s = time.perf_counter() - t0
    try:
        rng = np.random.default_rng(7)
        prompt = rng.integers(0, dec.n_vocab, PROMPT).tolist()
        decode_ids = rng.integers(0, dec.n_vocab, tg).tolist()

        def chat_decode() -> float:
            """The chat session's decode loop, greedy as the peer: the GPU's best logits, the
            sampler, the next step (positions PROMPT.. PROMPT + tg, as below)."""
            dec.truncate(PROMPT - 1)
            sampler, history = Sampler(SamplerParams.greedy_params()), list(prompt)
            top = dec.forward_top(prompt[-1])
            t = time.perf_counter()
            for _ in range(tg):
                token = sampler.sample(top, history)
                history.append(token)
                top = dec.forward_top(token)
            return tg / (time.perf_counter() - t)

        def logits_decode() -> float:
            """Every step's whole logit vector to the host (no sampling)."""
            dec.truncate(PROMPT)
            t = time.perf_counter()
            for tok in decode_ids:
                dec.forward([tok])
            return tg / (time.perf_counter() - t)

        dec.forward(prompt[:64])       # warm-up: module load, first launches, graph captures
        dec.forward([1])
        dec.forward_top(1)
        dec.truncate(0)                # and one untimed pass of each loop, as the peer below
        dec.forward(prompt)            # generates twice before it is timed
        chat_decode()
        logits_decode()
        ttft, tg_tps, tg_logits_tps = [], [], []
        for _ in range(repeat):
            dec.truncate(0)
            t = time.perf_counter()
            dec.forward(prompt)
            ttft.append(time.perf_counter() - t)
            tg_tps.append(chat_decode())
            tg_logits_tps.append(logits_decode())
        step, top_step = dec.decode_step_time(), dec.decode_step_time(top=True)
        shapes = {}
        for name in SHAPES:
            if name == "lm_head" and lm_head != "int8":
                continue
            seconds, nbytes = dec.gemv_time(name)
            alone = dec.gemv_read_floor(name)
            shapes[name] = {"us": seconds * 1e6, "bytes": nbytes, "gbps": nbytes / seconds / 1e9,
                            "read_alone_us": alone * 1e6, "read_alone_gbps": nbytes / alone / 1e9}
        bpt = _bytes_per_token(dec._model, lm_head, PROMPT + tg / 2)
        decode = "persistent kernel" if dec.persistent_active else "graph" if dec.graph_active else "launches"
        return {"engine": "tern cuda", "lm_head": lm_head, "kernel": dec.kernel, "decode": decode, "device": dec.device,
                "load_s": load_s, f"ttft{PROMPT}_s": _summary(ttft, higher_is_better=False),
                f"pp{PROMPT}_tps": _summary([PROMPT / s for s in ttft]), f"tg{tg}_tps": _summary(tg_tps),
                f"tg{tg}_logits_tps": _summary(tg_logits_tps), "gpu_step_s": step, "gpu_top_step_s": top_step,
                "bytes_per_token": bpt, "gemv": shapes}
    finally:
        dec.close()


def _bitnet_config(hp):
    from transformers import BitNetConfig
    cfg = BitNetConfig(vocab_size=hp.n_vocab, hidden_size=hp.n_embd, intermediate_size=hp.n_ff,
                       num_hidden_layers=hp.n_layer, num_attention_heads=hp.n_head,
                       num_key_value_heads=hp.n_head_kv, max_position_embeddings=4096,
                       rope_theta=hp.rope_theta, rms_norm_eps=hp.rms_eps, hidden_act="relu2",
                       tie_word_embeddings=True)
    return cfg


ONLINE_QUANT = {"quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "online"}


def bench_transformers(hp, repeat: int, tg: int, online_quant: bool) -> dict:
    """BitNetForCausalLM, bf16 random weights, static cache; generate() compiles the decode
    step (torch.compile, CUDA graphs) for a static cache. Decode tokens/s from the difference of
    a tg-token and a 1-token generation after the same prompt."""
    import torch
    import transformers
    from transformers import BitNetForCausalLM

    name = "transformers BitNetForCausalLM bf16 static cache" + (" (autobitlinear online)" if online_quant else " (dense)")
    cfg = _bitnet_config(hp)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = BitNetForCausalLM(cfg).to(torch.bfloat16).eval()
    if online_quant:
        # as the official bf16 repository's config.json: the quantizer swaps in AutoBitLinear
        # (ternary weights, int8 activations) only in from_pretrained
        import tempfile
        with tempfile.TemporaryDirectory() as tmp:
            model.config.quantization_config = dict(ONLINE_QUANT)
            model.save_pretrained(tmp)
            model = None              # free the dense copy first
            torch.cuda.empty_cache()
            model = BitNetForCausalLM.from_pretrained(tmp, dtype=torch.bfloat16, device_map="cuda").eval()
    ids = torch.randint(0, hp.n_vocab, (1, 64), device="cuda")

    def gen(n: int) -> float:
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                 cache_implementation="static")
        torch.cuda.synchronize()
        assert out.shape[1] == ids.shape[1] + n
        return time.perf_counter() - t

    t = time.perf_counter()
    gen(tg)                     # compiles
    compile_s = time.perf_counter() - t
    gen(tg)
    tps = []
    for _ in range(repeat):
        one, many = gen(1), gen(tg)
        tps.append((tg - 1) / (many - one))
    model = None
    torch.cuda.empty_cache()
    return {"engine": name, "transformers": transformers.__version__, "torch": torch.__version__,
            "warmup_s": compile_s, f"tg{tg}_tps": _summary(tps)}


def run_cuda_bench(model: Path, lm_heads, repeat: int, tg: int, n_ctx: int, peer: bool = True) -> dict:
    from engine import cuda
    from engine.model import load_model

    report = {"device": cuda.device_name(), "repeat": repeat, "n_ctx": n_ctx, "engines": [], "ratios": {}}
    report["hbm_read_gbps"] = cuda.bandwidth_probe()
    for head in lm_heads:
        r = bench_tern_cuda(model, head, repeat, tg, n_ctx)
        bw = report["hbm_read_gbps"]
        med = r[f"tg{tg}_tps"]["median"] * r["bytes_per_token"]["total"] / 1e9
        r["decode_gbps"] = med
        r["decode_bandwidth_fraction"] = med / bw
        for s in r["gemv"].values():
            s["fraction"] = s["gbps"] / bw
            s["read_alone_fraction"] = s["read_alone_gbps"] / bw
        report["engines"].append(r)
        log.info("tern cuda %s head: %s", head, json.dumps({k: v for k, v in r.items() if k != "gemv"}))
    if peer:
        with load_model(model) as m:
            hp = m.hparams
        for online in (False, True):
            try:
                report["engines"].append(bench_transformers(hp, repeat, tg, online))
                log.info("%s", json.dumps(report["engines"][-1]))
            except Exception as exc:  # noqa: BLE001 - the peer is reported as blocked, with why
                log.warning("transformers route failed: %s", exc)
                report["engines"].append({"engine": "transformers BitNetForCausalLM"
                                          + (" (autobitlinear online)" if online else " (dense)"),
                                          "blocked": f"{type(exc).__name__}: {exc}"})
        tern = report["engines"][0][f"tg{tg}_tps"]["median"]
        for e in report["engines"][len(lm_heads):]:
            if "blocked" not in e:
                report["ratios"][e["engine"]] = tern / e[f"tg{tg}_tps"]["median"]
    return report


def format_report(report: dict, tg: int) -> str:
    lines = [f"device: {report['device']}; measured read bandwidth {report['hbm_read_gbps']:.0f} GB/s; "
             f"repeat {report['repeat']} (median / best)"]
    for e in report["engines"]:
        if "blocked" in e:
            lines.append(f"{e['engine']}: blocked ({e['blocked']})")
            continue
        key = f"tg{tg}_tps"
        lines.append(f"{e['engine']}" + (f" [{e['kernel']}, decode: {e['decode']}] {e['lm_head']} head" if "kernel" in e else
                                         f" (transformers {e['transformers']}, torch {e['torch']})"))
        lines.append(f"  tg{tg}  : {e[key]['median']:9.1f} / {e[key]['best']:9.1f} tok/s"
                     + (" (greedy: the chat's loop over the GPU's best logits)" if "kernel" in e else ""))
        if "kernel" not in e:
            continue
        logits = e[f"tg{tg}_logits_tps"]
        lines.append(f"  tg{tg}  : {logits['median']:9.1f} / {logits['best']:9.1f} tok/s "
                     "(every step's logits to the host)")
        step, top_step = e["gpu_step_s"], e["gpu_top_step_s"]
        lines.append(f"  decode step on the GPU alone: {1e6 * step:.1f} us = {1 / step:.0f} tok/s; "
                     f"with the uploads and the selection of the best logits {1e6 * top_step:.1f} us")
        lines.append(f"  pp{PROMPT} : {e[f'pp{PROMPT}_tps']['median']:9.0f} / {e[f'pp{PROMPT}_tps']['best']:9.0f} tok/s")
        lines.append(f"  ttft  : {1e3 * e[f'ttft{PROMPT}_s']['median']:9.2f} / {1e3 * e[f'ttft{PROMPT}_s']['best']:9.2f} ms")
        lines.append(f"  decode: {e['decode_gbps']:.0f} GB/s = {100 * e['decode_bandwidth_fraction']:.0f}% of measured "
                     f"({e['bytes_per_token']['total'] / 1e6:.0f} MB/token)")
        for name, s in e["gemv"].items():
            lines.append(f"  gemv {name:8s}: {s['us']:7.1f} us  {s['bytes'] / 1e6:7.1f} MB  {s['gbps']:6.0f} GB/s "
                         f"= {100 * s['fraction']:.0f}%; reading alone {s['read_alone_us']:.1f} us "
                         f"= {100 * s['read_alone_fraction']:.0f}%")
    for name, ratio in report["ratios"].items():
        lines.append(f"tern cuda / {name}: {ratio:.1f}x decode")
    return "\n".join(lines) + "\n"


def main_cuda(args) -> int:
    """The `bench --backend cuda` command (hooked from engine/cmd_bench.py)."""
    peer = os.environ.get("TERN_BENCH_TRANSFORMERS", "1") != "0"   # 0: skip the transformers route
    report = run_cuda_bench(args.model, args.lm_head, args.repeat, args.tg, args.ctx, peer)
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(format_report(report, args.tg))
    return 0
