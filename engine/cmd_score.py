"""`python -m engine score`: teacher-forced logits of a token sequence, for checking against other
engines and for perplexity.

For every position i: the best next-token ids after ids[:i+1] with their raw logits, and the
log-probability of the actual next token ids[i+1]; then the perplexity over the sequence
(exp of the mean negative log-probability of ids[1:]).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time

import numpy as np

from engine.cmd_generate import add_backend_arguments, parse_ids

# Logits come back this many positions at a time: (positions, n_vocab) float32 for 128k
# vocabularies is 0.5 MB per position, so a long sequence at once would take gigabytes.
SCORE_CHUNK = 64


def register(subparsers) -> None:
    p = subparsers.add_parser("score", help="teacher-forced logits and perplexity of a token sequence",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="GGUF file")
    seq = p.add_mutually_exclusive_group(required=True)
    seq.add_argument("--ids", type=parse_ids, help="token ids, comma-separated")
    seq.add_argument("--text", help="text to score (BOS + its tokens)")
    p.add_argument("--top", type=int, default=5, help="how many best next tokens to list per position")
    add_backend_arguments(p)
    p.add_argument("--json", action="store_true", help="print one JSON object (default: a table)")
    p.set_defaults(func=run)


def run(args) -> int:
    from engine.cmd_generate import add_bos
    from engine.session import InvalidRequestError, open_chat

    if args.top < 1:
        raise InvalidRequestError("--top must be at least 1")
    n_ctx = args.ctx
    if n_ctx is None:   # just enough for the sequence (every token of a text covers at least one byte)
        n_ctx = len(args.ids) if args.ids is not None else len(args.text.encode("utf-8")) + 2
    start = time.perf_counter()
    session = open_chat(args.model, backend=args.backend, n_ctx=n_ctx, threads=args.threads, lm_head=args.lm_head)
    load_s = time.perf_counter() - start
    try:
        ids = args.ids if args.ids is not None else session.tokenizer.encode(args.text, add_bos=add_bos(session.tokenizer))
        _check_ids(ids, session.decoder)
        start = time.perf_counter()
        positions = score_ids(session.decoder, ids, args.top)
        elapsed = time.perf_counter() - start
        result = {
            "model": str(args.model),
            "backend": session.decoder.backend_name,
            "kernel": session.decoder.kernel,
            "ids": ids,
            "positions": positions,
            "perplexity": perplexity(positions),
            "timings": {"load_s": round(load_s, 6), "score_s": round(elapsed, 6),
                        "tokens_per_s": round(len(ids) / elapsed, 3) if elapsed > 0 else 0.0},
        }
    finally:
        session.close()
    if args.json:
        json.dump(result, sys.stdout)
        sys.stdout.write("\n")
    else:
        _print_table(result, session.tokenizer)
    return 0


def score_ids(decoder, ids: list[int], top: int) -> list[dict]:
    """Teacher-forced pass over `ids` from an empty cache. One dict per position:
    pos, id, top [[id, logit], ...] (best first, ties by id), and for all but the last
    position next_id and next_logprob (natural log)."""
    decoder.truncate(0)
    out: list[dict] = []
    for chunk_start in range(0, len(ids), SCORE_CHUNK):
        chunk = ids[chunk_start:chunk_start + SCORE_CHUNK]
        logits = np.asarray(decoder.forward(chunk, all_logits=True), dtype=np.float32)
        for row, pos in enumerate(range(chunk_start, chunk_start + len(chunk))):
            out.append(_position(pos, ids, logits[row], top))
    return out


def _position(pos: int, ids: list[int], logits: np.ndarray, top: int) -> dict:
    k = min(top, logits.size)
    best = np.argpartition(-logits, k - 1)[:k]
    best = best[np.lexsort((best, -logits[best]))]
    entry = {"pos": pos, "id": ids[pos], "top": [[int(i), float(logits[i])] for i in best]}
    if pos + 1 < len(ids):
        values = logits.astype(np.float64)
        log_z = values.max() + math.log(np.exp(values - values.max()).sum())
        entry["next_id"] = ids[pos + 1]
        entry["next_logprob"] = float(values[ids[pos + 1]] - log_z)
    return entry


def perplexity(positions: list[dict]) -> float | None:
    logprobs = [p["next_logprob"] for p in positions if "next_logprob" in p]
    return math.exp(-sum(logprobs) / len(logprobs)) if logprobs else None


def _check_ids(ids: list[int], decoder) -> None:
    from engine.errors import ContextOverflowError
    from engine.session import InvalidRequestError

    bad = [i for i in ids if not 0 <= i < decoder.n_vocab]
    if bad:
        raise InvalidRequestError(f"token id {bad[0]} is outside the vocabulary of {decoder.n_vocab}")
    if len(ids) > decoder.n_ctx:
        raise ContextOverflowError(f"{len(ids)} tokens do not fit a context of {decoder.n_ctx} (raise --ctx)")


def _print_table(result: dict, tokenizer) -> None:
    for p in result["positions"]:
        best = "  ".join(f"{i}:{logit:.3f}" for i, logit in p["top"])
        nxt = f"  next {p['next_id']} logp {p['next_logprob']:.4f}" if "next_id" in p else ""
        piece = tokenizer.decode([p["id"]], skip_special=False)
        print(f"{p['pos']:5d} {p['id']:7d} {piece!r:>16}  {best}{nxt}")
    ppl = result["perplexity"]
    print(f"perplexity {ppl:.4f}" if ppl is not None else "perplexity n/a (one token)")
