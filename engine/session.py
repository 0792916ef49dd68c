"""The chat session: prompt building, KV-cache reuse across turns, and the generate loop.

Used by the CLI and by the app's worker thread. One session owns one decoder. It remembers the
token ids in the decoder's KV cache; a new request renders the whole conversation, keeps the
longest common prefix of the cache, and prefills only the rest — a second turn costs the new
message and the generation prompt, not the conversation.

For that to hold, the cached ids of a reply must be exactly what the next render gives for it.
The 2B4T format tokenizes `Assistant: {reply}` as one string, which splits differently from the
generation prompt `Assistant: ` followed by the generated tokens (`:` `␣` `Hello` vs `:` `␣Hello`),
and a reply's text does not always re-encode to the ids that produced it (non-canonical merges,
invalid UTF-8). So the session keeps the exact ids of each reply it generated and renders those
replies with them: generation prompt + reply ids + end of turn, as the cache holds them.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from engine.chat import BitNetChatFormat
from engine.errors import CancelledError, ContextOverflowError, TernError
from engine.sampling import Sampler, SamplerParams

log = logging.getLogger(__name__)

_REMEMBERED_REPLIES = 256   # exact ids kept for this many recent replies
# The prompt runs in chunks of this many tokens, with a look at the cancel flag in between, so
# Stop answers within one chunk's time even during a long prefill. The native library works in
# chunks of 128 itself (TERN_CHUNK), so this costs it nothing.
PREFILL_CHUNK = 128
CANCEL_POLL_S = 0.02        # how often the prefill watcher looks whether the prefill has ended


class InvalidRequestError(TernError, ValueError):
    """A generation request that cannot be run: an empty prompt, an id outside the vocabulary,
    a max_tokens below 1."""


@dataclass
class Message:
    role: str        # 'system' | 'user' | 'assistant'
    content: str


@dataclass
class GenerationStats:
    prompt_tokens: int = 0        # length of the prompt the model saw (after any truncation)
    prefilled_tokens: int = 0     # prompt tokens run through the model for this reply
    reused_tokens: int = 0        # prompt tokens already in the KV cache
    generated: int = 0            # reply tokens (the stop token not counted)
    prefill_s: float = 0.0
    decode_s: float = 0.0
    prefill_tps: float = 0.0      # prefilled tokens per second
    decode_tps: float = 0.0       # decode steps per second
    stop_reason: str = ""         # 'eos' | 'max_tokens' | 'context' | 'cancelled'
    dropped_messages: int = 0     # oldest messages left out to fit the context
    ids: list[int] = field(default_factory=list)   # the reply's token ids
    text: str = ""                # the whole reply text


@dataclass
class GenerationEvent:
    kind: str                     # 'truncated' (first, if any) | 'token' | 'done' (last)
    text: str = ""                # 'token': the text this token completes (an incomplete UTF-8
                                  # character is held back; a last event with token_id None
                                  # may carry the tail of a reply that ended mid-character)
    token_id: int | None = None
    stats: GenerationStats | None = None   # on 'done'
    dropped_messages: int = 0     # on 'truncated': how many of the oldest messages were left out


def _role_content(message) -> tuple[str, str]:
    if isinstance(message, dict):
        return str(message["role"]), str(message["content"])
    return str(message.role), str(message.content)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


@contextmanager
def _forward_interrupted_by(cancel: threading.Event | None, decoder) -> Iterator[None]:
    """While the prompt runs, a set `cancel` also stops the decoder's forward in flight: one
    128-token chunk of a 2B model takes longer than the app's 100 ms budget for Stop."""
    interrupt = getattr(decoder, "cancel", None)
    if cancel is None or interrupt is None:
        yield
        return
    finished = threading.Event()

    def watch() -> None:
        while not finished.is_set():
            if cancel.wait(CANCEL_POLL_S):
                interrupt()      # harmless if the forward just ended: the next one clears it
                return

    watcher = threading.Thread(target=watch, name="tern-prefill-cancel", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        finished.set()
        watcher.join()


class ChatSession:
    """Multi-turn generation over one decoder. Not thread-safe: one thread (the app's worker)
    drives it; other threads may only set the `cancel` event."""

    def __init__(self, decoder, tokenizer, chat_format):
        self.decoder = decoder
        self.tokenizer = tokenizer
        self.chat_format = chat_format
        self.counters = {"prefilled_tokens_total": 0, "last_prefilled_tokens": 0, "kv_reused_tokens": 0}
        self.last_prompt_ids: list[int] = []
        self._cached: list[int] = []    # the ids in the decoder's KV cache, == decoder.n_past long
        self._replies: OrderedDict[str, list[int]] = OrderedDict()   # stripped reply text -> ids
        self._exact_replies = isinstance(chat_format, BitNetChatFormat)
        self.info = None                # engine.model.ModelInfo when opened with open_chat
        decoder.truncate(0)

    # -- prompts --------------------------------------------------------------------------------

    @property
    def n_ctx(self) -> int:
        return self.decoder.n_ctx

    @property
    def n_cached(self) -> int:
        """Tokens in the KV cache (the app's context meter: n_cached of n_ctx)."""
        return len(self._cached)

    @property
    def cached_ids(self) -> list[int]:
        """A copy of the ids now in the KV cache."""
        return list(self._cached)

    def render(self, messages: Sequence, system: str | None = None) -> list[int]:
        """Prompt ids for `messages`, generation prompt included, with replies this session
        generated rendered as the ids it generated."""
        return self._render(_without_system(messages), _system_of(messages, system))[0]

    def render_text(self, messages: Sequence, system: str | None = None) -> str:
        """The prompt as text, special tokens spelt out."""
        return self.tokenizer.decode(self.render(messages, system), skip_special=False)

    def last_prompt_text(self) -> str:
        """The prompt the model saw for the latest reply, special tokens spelt out."""
        return self.tokenizer.decode(self.last_prompt_ids, skip_special=False)

    def _render(self, conversation: list, system: str | None) -> tuple[list[int], list[int]]:
        """(prompt ids, ids taken by each message of `conversation`) — the system prompt goes
        in separately; `conversation` holds no 'system' message."""
        rendered = self.chat_format.render(conversation, system, add_generation_prompt=True)
        ids, spans = rendered.ids, rendered.spans
        lengths = [0] * len(conversation)
        if not spans:
            return list(ids), lengths
        generation_prompt = ids[spans[-1].end:]
        out = list(ids[:spans[0].start])
        for span in spans:
            piece = ids[span.start:span.end]
            if span.index is not None:
                piece = self._exact_reply(conversation[span.index], piece, generation_prompt)
                lengths[span.index] += len(piece)
            out += piece
        return out + generation_prompt, lengths

    def _exact_reply(self, message, piece: list[int], generation_prompt: list[int]) -> list[int]:
        role, content = _role_content(message)
        if role != "assistant" or not self._exact_replies:
            return piece
        exact = self._replies.get(content.strip())
        if exact is None:
            return piece
        # BitNet format: `Assistant: {reply}<|eot_id|>` as the cache holds it
        return generation_prompt + exact + piece[-1:]

    def _remember_reply(self, text: str, ids: list[int]) -> None:
        key = text.strip()
        if not key:
            return
        self._replies[key] = list(ids)
        self._replies.move_to_end(key)
        while len(self._replies) > _REMEMBERED_REPLIES:
            self._replies.popitem(last=False)

    # -- fitting the context --------------------------------------------------------------------

    def fit(self, messages: Sequence, system: str | None, max_tokens: int) -> tuple[list[int], int]:
        """The prompt ids and how many of the oldest messages had to be dropped so that the
        prompt plus `max_tokens` fits the context. The system prompt is never dropped, and the
        kept conversation starts with a user message. Raises ContextOverflowError when even the
        last message alone does not leave room for one reply token."""
        system = _system_of(messages, system)
        conversation = _without_system(messages)
        ids, lengths = self._render(conversation, system)
        # Where to cut, estimated from one render (exact for the 2B4T format, whose messages
        # are encoded one by one), then checked by rendering what is kept.
        starts = _turn_starts(conversation)
        dropped, excess = starts[0], len(ids) + max_tokens - self.n_ctx
        for start in starts:
            dropped = start
            if sum(lengths[:start]) >= excess:
                break
        while True:
            if dropped:
                ids, _ = self._render(conversation[dropped:], system)
            later = [s for s in starts if s > dropped]
            if len(ids) + max_tokens <= self.n_ctx or not later:
                break
            dropped = later[0]
        if len(ids) >= self.n_ctx:
            raise ContextOverflowError(
                f"the prompt needs {len(ids)} tokens, leaving no room for a reply in a context of {self.n_ctx}")
        return ids, dropped

    # -- generation -----------------------------------------------------------------------------

    def generate(self, messages: Sequence, system: str | None = None, params: SamplerParams | None = None,
                 max_tokens: int = 512, cancel: threading.Event | None = None) -> Iterator[GenerationEvent]:
        """Yield 'truncated' (if the oldest messages had to go), one 'token' per reply token,
        then 'done' with the stats. Stops on an end-of-generation token, after `max_tokens`,
        when the context is full, or when `cancel` is set (checked between tokens; the partial
        reply stays in the cache)."""
        params = params or SamplerParams()
        prompt, dropped = self.fit(messages, system, _checked_max_tokens(max_tokens))
        if dropped:
            yield GenerationEvent("truncated", dropped_messages=dropped)
        yield from self._run(prompt, params, max_tokens, cancel, dropped)

    def complete(self, prompt_ids: Sequence[int], params: SamplerParams | None = None, max_tokens: int = 512,
                 cancel: threading.Event | None = None) -> Iterator[GenerationEvent]:
        """Continue raw prompt ids (no chat format): 'token' events, then 'done'. The KV cache is
        reused as by generate(). Raises ContextOverflowError when the prompt leaves no room."""
        prompt = [int(i) for i in prompt_ids]
        if not prompt:
            raise InvalidRequestError("the prompt is empty")
        if len(prompt) >= self.n_ctx:
            raise ContextOverflowError(f"the prompt has {len(prompt)} tokens; the context holds {self.n_ctx}")
        bad = [i for i in prompt if not 0 <= i < self.decoder.n_vocab]
        if bad:
            raise InvalidRequestError(f"token id {bad[0]} is outside the vocabulary of {self.decoder.n_vocab}")
        yield from self._run(prompt, params or SamplerParams(), _checked_max_tokens(max_tokens), cancel, 0)

    def _run(self, prompt: list[int], params: SamplerParams, max_tokens: int,
             cancel: threading.Event | None, dropped: int) -> Iterator[GenerationEvent]:
        self.last_prompt_ids = prompt
        stats = GenerationStats(prompt_tokens=len(prompt), dropped_messages=dropped)
        try:
            logits = self._prefill(prompt, stats, cancel)
            yield from self._decode_loop(logits, params, min(max_tokens, self.n_ctx - len(prompt)),
                                         max_tokens, cancel, stats)
        except BaseException:
            self._resync()
            raise
        # Outside the try: a consumer that stops reading after 'done' leaves nothing to undo.
        yield GenerationEvent("done", "", None, stats)

    def _prefill(self, prompt: list[int], stats: GenerationStats, cancel: threading.Event | None):
        """Run the part of the prompt that is not cached yet; returns the last position's
        logits, or None when cancelled (checked between chunks)."""
        # Reuse the longest common prefix; at least the last prompt token runs, for its logits.
        keep = min(_common_prefix(prompt, self._cached), len(prompt) - 1)
        self.decoder.truncate(keep)
        self._cached = self._cached[:keep]
        stats.reused_tokens = keep
        self.counters["kv_reused_tokens"] = keep
        self.counters["last_prefilled_tokens"] = 0
        start = time.perf_counter()
        logits = None
        with _forward_interrupted_by(cancel, self.decoder):
            logits = self._prefill_chunks(prompt, keep, stats, cancel)
        stats.prefill_s = time.perf_counter() - start
        stats.prefill_tps = stats.prefilled_tokens / stats.prefill_s if stats.prefill_s > 0 else 0.0
        return logits

    def _prefill_chunks(self, prompt: list[int], keep: int, stats: GenerationStats,
                        cancel: threading.Event | None):
        logits = None
        for chunk_start in range(keep, len(prompt), PREFILL_CHUNK):
            if cancel is not None and cancel.is_set():
                logits = None
                break
            chunk = prompt[chunk_start:chunk_start + PREFILL_CHUNK]
            try:
                logits = self._feed(chunk)
            except CancelledError:      # a decoder stopped from outside (NativeDecoder.cancel)
                logits = None
                break
            stats.prefilled_tokens += len(chunk)
            self.counters["last_prefilled_tokens"] += len(chunk)
            self.counters["prefilled_tokens_total"] += len(chunk)
        return logits

    def _decode_loop(self, logits, params: SamplerParams, budget: int, max_tokens: int,
                     cancel: threading.Event | None, stats: GenerationStats):
        """Yields the 'token' events and fills `stats`."""
        sampler = Sampler(params)
        # a decoder that selects the best logits on its device (CUDA) sends only those
        top = sampler.takes_top and hasattr(self.decoder, "forward_top")
        detok = self.tokenizer.detokenizer(skip_special=True)
        stop_ids = self.tokenizer.eos_ids
        reply: list[int] = []
        text: list[str] = []
        steps, busy = 0, 0.0        # decode steps and the time spent in them (not in the consumer)
        while logits is not None:
            if cancel is not None and cancel.is_set():
                stats.stop_reason = "cancelled"
                break
            start = time.perf_counter()
            token = sampler.sample(logits, self._cached)
            if token in stop_ids:
                stats.stop_reason = "eos"
                try:
                    self._feed([token], top)  # the end of turn belongs in the cache: the next render has it
                except CancelledError:
                    pass                 # then the next turn prefills it
                busy += time.perf_counter() - start
                steps += 1
                break
            busy += time.perf_counter() - start
            reply.append(token)
            piece = detok.feed(token)
            text.append(piece)
            yield GenerationEvent("token", piece, token)
            if cancel is not None and cancel.is_set():
                stats.stop_reason = "cancelled"
                break
            start = time.perf_counter()
            try:
                logits = self._feed([token], top)
            except CancelledError:
                stats.stop_reason = "cancelled"
                break
            busy += time.perf_counter() - start
            steps += 1
            if len(reply) >= budget:
                stats.stop_reason = "max_tokens" if len(reply) >= max_tokens else "context"
                break
        else:
            stats.stop_reason = "cancelled"      # during the prefill
        tail = detok.flush()
        if tail:
            text.append(tail)
            yield GenerationEvent("token", tail, None)
        stats.decode_s = busy
        stats.decode_tps = steps / busy if steps and busy > 0 else 0.0
        stats.generated, stats.ids, stats.text = len(reply), reply, "".join(text)
        self._remember_reply(stats.text, reply)

    def _feed(self, ids: list[int], top: bool = False):
        logits = self.decoder.forward_top(ids[0]) if top else self.decoder.forward(ids)
        self._cached.extend(ids)
        return logits

    def _resync(self) -> None:
        """After an error or an abandoned generator, trust only what both sides agree on."""
        try:
            n = min(len(self._cached), self.decoder.n_past)
            self.decoder.truncate(n)
        except Exception:  # noqa: BLE001 - the decoder may be closed or broken: start from scratch
            log.warning("could not resynchronise the KV cache; the next prompt is prefilled in full", exc_info=True)
            n = 0
        self._cached = self._cached[:n]

    # -- lifetime -------------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget the KV cache and the remembered replies (a new conversation starts cold)."""
        self.decoder.truncate(0)
        self._cached = []
        self._replies.clear()
        self.last_prompt_ids = []

    def close(self) -> None:
        self.decoder.close()

    def __enter__(self) -> "ChatSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _turn_starts(conversation: list) -> list[int]:
    """Where the kept part of a conversation may begin: 0, then every user message but the
    first (so that what is kept starts with a user message), and the last message at the latest."""
    starts = [0] + [i for i, m in enumerate(conversation) if i and _role_content(m)[0] == "user"]
    last = max(len(conversation) - 1, 0)
    return [s for s in starts if s <= last] or [0]


def _checked_max_tokens(max_tokens: int) -> int:
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise InvalidRequestError(f"max_tokens must be a positive integer, got {max_tokens!r}")
    return max_tokens


def _system_of(messages: Sequence, system: str | None) -> str | None:
    """The explicit system prompt, else a 'system' message in the list (the last one wins)."""
    if system is not None:
        return system
    found = [content for role, content in map(_role_content, messages) if role == "system"]
    return found[-1] if found else None


def _without_system(messages: Sequence) -> list:
    return [m for m in messages if _role_content(m)[0] != "system"]


def open_chat(model_path, backend: str = "auto", n_ctx: int | None = 4096, threads: int | None = None,
              lm_head: str = "int8") -> ChatSession:
    """Open a model for chat: the decoder (engine.backends), the model's tokenizer and its chat
    format. BitNet files get Tern's tokenizer and the 2B4T format; other GGUFs (llama.cpp
    backend) bring llama.cpp's tokenizer and are rendered with their own template."""
    from engine.backends import open_model
    from engine.chat import chat_format_for
    from engine.tokenizer import Tokenizer

    opened = open_model(model_path, backend, n_ctx, threads, lm_head)
    try:
        if opened.tokenizer_metadata is not None:
            tokenizer = Tokenizer.from_gguf_metadata(opened.tokenizer_metadata, model_path)
            metadata = {**opened.info.metadata, **opened.tokenizer_metadata}
        else:
            tokenizer = opened.decoder.tokenizer
            metadata = opened.info.metadata
        session = ChatSession(opened.decoder, tokenizer, chat_format_for(metadata, tokenizer))
    except BaseException:
        opened.decoder.close()
        raise
    session.info = opened.info
    return session
