"""`python -m engine generate`: one completion, streamed to stdout or printed as one JSON object.

Without --chat the prompt is raw text (BOS + its tokens) or raw ids; with --chat it is one user
message (and an optional system prompt) in the model's chat format.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time

from engine.backends import BACKENDS, LM_HEADS
from engine.sampling import SamplerParams

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Arguments shared with `score` and `chat`
# ---------------------------------------------------------------------------------------------

def add_backend_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", choices=BACKENDS, default="auto",
                        help="decoder: auto (native if built, else reference, for BitNet files; "
                             "llama.cpp for other GGUFs), reference (numpy), native, cuda, llama.cpp")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    parser.add_argument("--ctx", type=int, default=None,
                        help="context length (KV cache) in tokens (default: the model's, at most 4096)")
    parser.add_argument("--lm-head", choices=LM_HEADS, default="int8",
                        help="LM head precision of the native backend (f16 is the exact path)")


def add_sampler_arguments(parser: argparse.ArgumentParser) -> None:
    d = SamplerParams()
    group = parser.add_argument_group("sampling (llama.cpp order: penalty, top-k, top-p, min-p, temperature)")
    group.add_argument("--temperature", type=float, default=d.temperature, help="0 = greedy")
    group.add_argument("--top-k", type=int, default=d.top_k, help="0 = off")
    group.add_argument("--top-p", type=float, default=d.top_p, help="1 = off")
    group.add_argument("--min-p", type=float, default=d.min_p, help="0 = off")
    group.add_argument("--repeat-penalty", type=float, default=d.repeat_penalty, help="1 = off")
    group.add_argument("--repeat-last-n", type=int, default=d.repeat_last_n,
                       help="tokens the penalty looks back over (0 = off, -1 = the whole context)")
    group.add_argument("--seed", type=int, default=None, help="random seed (default: a fresh one)")


def sampler_params(args) -> SamplerParams:
    return SamplerParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                         repeat_penalty=args.repeat_penalty, repeat_last_n=args.repeat_last_n, seed=args.seed)


def parse_ids(text: str) -> list[int]:
    """'1,2,3' (spaces allowed) -> [1, 2, 3]; argparse turns the ValueError into a usage error."""
    try:
        ids = [int(part) for part in text.replace(" ", ",").split(",") if part]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token ids, got {text!r}") from None
    if not ids:
        raise argparse.ArgumentTypeError("expected at least one token id")
    return ids


def timings(load_s: float, stats) -> dict:
    return {
        "load_s": round(load_s, 6),
        "prefill_s": round(stats.prefill_s, 6),
        "decode_s": round(stats.decode_s, 6),
        "prefill_tokens_per_s": round(stats.prefill_tps, 3),
        "decode_tokens_per_s": round(stats.decode_tps, 3),
    }


def add_bos(tokenizer) -> bool:
    """Whether raw text gets a BOS token: the vocabulary's own rule where it states one."""
    return tokenizer.bos_id is not None and bool(getattr(tokenizer, "add_bos", True))


# ---------------------------------------------------------------------------------------------

def register(subparsers) -> None:
    p = subparsers.add_parser("generate", help="generate a completion",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="GGUF file")
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text (raw: BOS + its tokens; with --chat: the user message)")
    prompt.add_argument("--prompt-ids", type=parse_ids, help="raw prompt token ids, comma-separated")
    p.add_argument("--system", help="system prompt (with --chat)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat format")
    p.add_argument("--max-tokens", type=int, default=128, help="most tokens to generate")
    add_sampler_arguments(p)
    add_backend_arguments(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    p.set_defaults(func=run)


def run(args) -> int:
    from engine.session import InvalidRequestError, Message, open_chat

    if args.chat and args.prompt is None:
        raise InvalidRequestError("--chat needs --prompt text, not --prompt-ids")
    if args.system is not None and not args.chat:
        raise InvalidRequestError("--system needs --chat (a raw prompt has no system part)")
    params = sampler_params(args)

    start = time.perf_counter()
    session = open_chat(args.model, backend=args.backend, n_ctx=args.ctx, threads=args.threads,
                        lm_head=args.lm_head)
    load_s = time.perf_counter() - start
    try:
        if args.chat:
            events = session.generate([Message("user", args.prompt)], args.system, params, args.max_tokens)
        else:
            ids = args.prompt_ids
            if ids is None:
                ids = session.tokenizer.encode(args.prompt, add_bos=add_bos(session.tokenizer))
            events = session.complete(ids, params, args.max_tokens)
        stats = _consume(events, stream=not args.json)
        result = {
            "model": str(args.model),
            "backend": session.decoder.backend_name,
            "kernel": session.decoder.kernel,
            "n_ctx": session.n_ctx,
            "prompt_ids": session.last_prompt_ids,
            "ids": stats.ids,
            "text": stats.text,
            "stop_reason": stats.stop_reason,
            "dropped_messages": stats.dropped_messages,
            "params": dataclasses.asdict(params),
            "timings": timings(load_s, stats),
        }
    finally:
        session.close()
    if args.json:
        json.dump(result, sys.stdout, ensure_ascii=False)
        sys.stdout.write("\n")
    else:
        t = result["timings"]
        print(f"\n[{len(stats.ids)} tokens, {stats.stop_reason}; prefill {t['prefill_tokens_per_s']:.1f} tok/s, "
              f"decode {t['decode_tokens_per_s']:.1f} tok/s; {result['backend']} {result['kernel']}]",
              file=sys.stderr)
    return 0


def _consume(events, stream: bool):
    for event in events:
        if event.kind == "truncated":
            print(f"[context full: the {event.dropped_messages} oldest messages are left out]", file=sys.stderr)
        elif stream and event.text:
            sys.stdout.write(event.text)
            sys.stdout.flush()
        if event.kind == "done":
            return event.stats
    raise AssertionError("generation ended without a 'done' event")
