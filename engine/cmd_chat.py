"""`python -m engine chat`: a multi-turn chat in the terminal, replies streamed as they are made.

Each line read from stdin is a user message. /reset starts a new conversation, /exit (or end of
input) quits. Ctrl-C during a reply stops the reply (what was said so far stays in the
conversation); at the prompt it only clears the line.
"""
from __future__ import annotations

import argparse
import signal
import sys
import threading
from contextlib import contextmanager

from engine.cmd_generate import add_backend_arguments, add_sampler_arguments, sampler_params

COMMANDS_HELP = "commands: /reset (new conversation), /exit (quit)"


def register(subparsers) -> None:
    p = subparsers.add_parser("chat", help="chat with a model in the terminal",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None,
                   help="GGUF file (default: the library's default model, downloaded if absent)")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--max-tokens", type=int, default=1024, help="most tokens per reply")
    add_sampler_arguments(p)
    add_backend_arguments(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from engine.session import open_chat

    model = args.model if args.model is not None else _default_model()
    params = sampler_params(args)
    session = open_chat(model, backend=args.backend, n_ctx=args.ctx, threads=args.threads, lm_head=args.lm_head)
    interactive = sys.stdin.isatty()
    try:
        _info(f"[{model}: {session.decoder.backend_name} {session.decoder.kernel}, context {session.n_ctx}; "
              f"{COMMANDS_HELP}]")
        _loop(session, args.system, params, args.max_tokens, interactive)
    finally:
        session.close()
    return 0


def _loop(session, system: str | None, params, max_tokens: int, interactive: bool) -> None:
    from engine.errors import ContextOverflowError
    from engine.session import InvalidRequestError, Message

    messages: list[Message] = []
    while True:
        line = _read_line(interactive)
        if line is None or line.strip() == "/exit":
            return
        text = line.rstrip("\n")
        if text.strip() == "/reset":
            messages.clear()
            session.reset()
            _info("[new conversation]")
            continue
        if not text.strip():
            continue
        messages.append(Message("user", text))
        try:
            reply, stats = _reply(session, messages, system, params, max_tokens)
        except (ContextOverflowError, InvalidRequestError) as exc:
            messages.pop()                # the conversation goes on without that message
            _info(f"[{exc}]")
            continue
        messages.append(Message("assistant", reply))
        if stats.dropped_messages:
            # Keep the history as the model sees it, so the next turn reuses the cache.
            del messages[:stats.dropped_messages]
        _info(f"[{stats.generated} tokens, {stats.stop_reason}; prefilled {stats.prefilled_tokens} "
              f"at {stats.prefill_tps:.1f} tok/s, decode {stats.decode_tps:.1f} tok/s]")


def _read_line(interactive: bool) -> str | None:
    while True:
        try:
            if interactive:
                return input("> ") + "\n"
            line = sys.stdin.readline()
            return line if line else None
        except EOFError:
            return None
        except KeyboardInterrupt:
            sys.stdout.write("\n")      # Ctrl-C at the prompt clears the line, as in a shell


def _reply(session, messages, system, params, max_tokens: int):
    cancel = threading.Event()
    parts: list[str] = []
    with _ctrl_c_sets(cancel):
        for event in session.generate(messages, system, params, max_tokens, cancel):
            if event.kind == "truncated":
                _info(f"[context full: the {event.dropped_messages} oldest messages are left out]")
            if event.text:
                parts.append(event.text)
                sys.stdout.write(event.text)
                sys.stdout.flush()
            if event.kind == "done":
                stats = event.stats
    sys.stdout.write("\n")
    if stats.stop_reason == "cancelled":
        _info("[stopped]")
    return stats.text, stats


@contextmanager
def _ctrl_c_sets(cancel: threading.Event):
    """While a reply streams, SIGINT sets `cancel` (the generate loop checks it between tokens)
    instead of raising KeyboardInterrupt somewhere inside the decoder."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, lambda signum, frame: cancel.set())
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _default_model():
    try:
        from engine.library import ensure_default_model
    except ImportError as exc:
        from engine.session import InvalidRequestError
        raise InvalidRequestError(f"no --model given and no model library here ({exc})") from exc
    return ensure_default_model(progress=_download_progress)


def _download_progress(progress) -> None:
    """engine.download.DownloadProgress -> one updating line on stderr."""
    if progress.total:
        sys.stderr.write(f"\r{progress.phase} the default model: {progress.done / 2**20:.0f} / "
                         f"{progress.total / 2**20:.0f} MiB ")
        sys.stderr.flush()
    if progress.phase == "done":
        sys.stderr.write("\n")


def _info(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
