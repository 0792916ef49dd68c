"""Chat formats: messages -> prompt token ids.

BitNet files always get the format BitNet b1.58 2B4T was trained with (the chat template in the
model repository's tokenizer_config.json):

    <|begin_of_text|>System: {system}<|eot_id|>User: {msg}<|eot_id|>Assistant: {reply}<|eot_id|>...

and the generation prompt `Assistant: ` with its trailing space. Content is trimmed (the
template's `| trim`).
bitnet.cpp's converter writes a placeholder template into these files (`Human: ...
BITNETAssistant:`) and its built-in rendering drops the `<|eot_id|>` after the system prompt and
the replies; both are ignored here.

Other GGUFs that carry `tokenizer.chat_template` are rendered with Jinja in an immutable sandbox
under a time and output-size budget. The sandbox stops attribute escapes; the budget stops a
template that loops for ever or grows without bound.

Special tokens are inserted as ids; message text is encoded with `Tokenizer.encode`, so user
text can never become a special token.
"""
from __future__ import annotations

import json
import logging
import re
import sys
import time
from dataclasses import dataclass
from typing import Any, Sequence

from jinja2 import nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.nodes import EvalContext
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import TernError
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)

BITNET_ARCHS = frozenset({"bitnet-b1.58", "bitnet-25", "bitnet"})
BOS = "<|begin_of_text|>"
EOT = "<|eot_id|>"

DEFAULT_TIME_BUDGET_S = 1.0
DEFAULT_MAX_OUTPUT_CHARS = 1_000_000
MAX_TEMPLATE_CHARS = 1_000_000


class TemplateError(TernError):
    """A chat template that does not compile, fails, or exceeds its time or size budget."""


@dataclass(frozen=True)
class MessageSpan:
    """Where one message lies in the rendered ids: ids[start:end]."""
    index: int | None      # position in the `messages` list; None for the separate system prompt
    role: str
    start: int
    end: int


@dataclass(frozen=True)
class RenderedPrompt:
    ids: list[int]                 # the whole prompt, generation prompt included if asked for
    spans: list[MessageSpan]       # one per rendered message, in order; ids before the first span
                                   # are the prefix (BOS), ids after the last the generation prompt


def _role_content(message) -> tuple[str, str]:
    """Accepts session.Message-like objects and {role, content} dicts."""
    if isinstance(message, dict):
        return str(message["role"]), str(message["content"])
    return str(message.role), str(message.content)


def _conversation(messages: Sequence, system: str | None) -> list[tuple[int | None, str, str]]:
    turns: list[tuple[int | None, str, str]] = []
    if system is not None and system.strip():
        turns.append((None, "system", system))
    turns.extend((i, *_role_content(m)) for i, m in enumerate(messages))
    return turns


class ChatFormat:
    """Turns a conversation into prompt ids. `render` is the one operation."""
    name = "abstract"

    def render(self, messages: Sequence, system: str | None = None,
               add_generation_prompt: bool = True) -> RenderedPrompt:
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------
# BitNet b1.58 2B4T
# ---------------------------------------------------------------------------------------------

class BitNetChatFormat(ChatFormat):
    """`{Role}: {content}<|eot_id|>` per message after BOS, then `Assistant: `."""
    name = "bitnet-2b4t"

    def __init__(self, tokenizer: Tokenizer):
        self._tok = tokenizer
        self._bos = tokenizer.encode_special(BOS) if tokenizer.has_special(BOS) else tokenizer.bos_id
        # A vocabulary without <|eot_id|> (never the case for 2B4T) ends turns with its eos.
        self._eot = tokenizer.encode_special(EOT) if tokenizer.has_special(EOT) else tokenizer.eos_id
        if self._eot is None:
            raise TemplateError("the vocabulary has neither <|eot_id|> nor an eos token to end turns with")

    def render(self, messages: Sequence, system: str | None = None,
               add_generation_prompt: bool = True) -> RenderedPrompt:
        ids: list[int] = [] if self._bos is None else [self._bos]
        spans: list[MessageSpan] = []
        for index, role, content in _conversation(messages, system):
            start = len(ids)
            ids += self._tok.encode(f"{role.capitalize()}: {content.strip()}")
            ids.append(self._eot)
            spans.append(MessageSpan(index, role, start, len(ids)))
        if add_generation_prompt:
            ids += self._tok.encode("Assistant: ")
        return RenderedPrompt(ids, spans)


def render_bitnet(messages: Sequence, system: str | None = None, add_generation_prompt: bool = True) -> str:
    """The 2B4T prompt as text, special tokens spelt out (for display and logs; ids come from
    BitNetChatFormat)."""
    parts = [BOS]
    for _, role, content in _conversation(messages, system):
        parts.append(f"{role.capitalize()}: {content.strip()}{EOT}")
    if add_generation_prompt:
        parts.append("Assistant: ")
    return "".join(parts)


# ---------------------------------------------------------------------------------------------
# Jinja templates under a budget
# ---------------------------------------------------------------------------------------------

# str methods a chat template may call: none of them can make a string much larger than its
# inputs. Methods that can (join, replace, format, padding) are size-checked in _check_str_call.
_SAFE_STR_METHODS = frozenset({
    "strip", "lstrip", "rstrip", "split", "rsplit", "splitlines", "startswith", "endswith",
    "lower", "upper", "title", "capitalize", "casefold", "swapcase", "find", "rfind", "index",
    "rindex", "count", "partition", "rpartition", "removeprefix", "removesuffix", "isalnum",
    "isalpha", "isascii", "isdecimal", "isdigit", "isidentifier", "islower", "isnumeric",
    "isprintable", "isspace", "istitle", "isupper", "encode",
})
_TEMPLATE_FILENAME = "<chat_template>"
_BIG_NUMBER = re.compile(r"\d{7,}")
_EMIT_FACTOR = 4      # {{ }} output allowed per render, as a multiple of the output budget


def _approx_size(obj, limit: int) -> int:
    """Characters `obj` will take once turned into text, stopping as soon as `limit` is passed."""
    if isinstance(obj, str):
        return len(obj)
    if isinstance(obj, (list, tuple, set, frozenset, dict)):
        total = 2 + len(obj)
        for item in (obj.items() if isinstance(obj, dict) else obj):
            total += _approx_size(item, limit)
            if total > limit:
                break
        return total
    if isinstance(obj, int):
        return obj.bit_length() // 3 + 1
    return 8


class _BudgetedEnvironment(ImmutableSandboxedEnvironment):
    """The immutable sandbox plus size checks on every operation that can grow text."""
    intercepted_binops = frozenset({"+", "*", "**", "%"})

    def __init__(self, max_chars: int):
        # The same options transformers' apply_chat_template renders with.
        super().__init__(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"],
                         finalize=self._finalize)
        self.code_generator_class = _CheckedConcatGenerator
        self.max_chars = max_chars
        self.emitted = 0                              # characters output by {{ }} in this render
        self.concat = self._checked_concat           # block, macro and set-block buffers
        self.globals.pop("lipsum", None)
        self.globals["raise_exception"] = _raise_exception
        self.globals["strftime_now"] = lambda fmt: time.strftime(str(fmt))
        self.filters["tojson"] = _tojson
        # Every filter: most turn their input into text (upper, wordwrap, tojson, ...).
        self.filters = {name: self._checked_filter(f) for name, f in self.filters.items()}

    def _check(self, size: int, what: str) -> None:
        if size > self.max_chars:
            raise TemplateError(f"chat template output exceeds {self.max_chars} characters ({what})")

    def _finalize(self, value):
        # Every {{ }} in a render counts, including those captured by set blocks and macros,
        # whose buffers never reach the streamed output check.
        size = _approx_size(value, self.max_chars)
        self.emitted += size
        self._check(size, "expression")
        if self.emitted > _EMIT_FACTOR * self.max_chars:
            self._check(self.emitted // _EMIT_FACTOR, "expressions in total")
        return value

    def _checked_concat(self, parts) -> str:
        parts = list(parts)
        self._check(sum(len(p) for p in parts), "buffer")
        return "".join(parts)

    def checked_str_join(self, args) -> str:
        self._check(sum(_approx_size(a, self.max_chars) for a in args), "~ operator")
        return "".join(str(a) for a in args)

    def call_binop(self, context, operator: str, left, right):
        if operator == "**" and isinstance(left, int) and isinstance(right, int):
            if right > 0 and abs(left) > 1 and left.bit_length() * right > 64 * self.max_chars:
                raise TemplateError("chat template computes an absurdly large number")
        elif operator == "*":
            count, seq = (left, right) if isinstance(left, int) else (right, left)
            if isinstance(count, int) and isinstance(seq, (str, list, tuple)):
                self._check(_approx_size(seq, self.max_chars) * max(count, 0), "* operator")
            elif isinstance(left, int) and isinstance(right, int):
                self._check((left.bit_length() + right.bit_length()) // 3, "* operator")
        elif operator == "+" and isinstance(left, (str, list, tuple)):
            self._check(_approx_size(left, self.max_chars) + _approx_size(right, self.max_chars), "+ operator")
        elif operator == "%" and isinstance(left, str):
            self._check_format(left, right if isinstance(right, (tuple, list)) else (right,), {})
        return super().call_binop(context, operator, left, right)

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's signature)
        target = getattr(__obj, "__self__", None)
        if isinstance(target, str) and callable(__obj):
            __self._check_str_call(target, __obj.__name__, args, kwargs)
        return super().call(__context, __obj, *args, **kwargs)

    def wrap_str_format(self, value):
        # str.format is reached through this wrapper, not through call(): check it here.
        sandboxed = super().wrap_str_format(value)
        if sandboxed is None:
            return None
        fmt = value.__self__

        def checked(*args, **kwargs):
            self._check_format(fmt, args, kwargs)
            return sandboxed(*args, **kwargs)

        return checked

    def _check_str_call(self, s: str, method: str, args, kwargs) -> None:
        if method in _SAFE_STR_METHODS:
            return
        if method == "join":
            items = list(args[0]) if args else []
            self._check(sum(_approx_size(i, self.max_chars) for i in items) + len(s) * len(items), "join")
        elif method == "replace" and len(args) >= 2:
            old, new = str(args[0]), str(args[1])
            hits = len(s) + 1 if not old else s.count(old)
            self._check(len(s) + hits * len(new), "replace")
        elif method in ("format", "format_map"):
            self._check_format(s, args, kwargs)
        elif method in ("center", "ljust", "rjust", "zfill", "expandtabs"):
            width = args[0] if args else kwargs.get("width", kwargs.get("tabsize", 8))
            self._check(int(width) * max(1, s.count("\t")) if method == "expandtabs" else int(width), method)
        else:
            raise TemplateError(f"chat templates may not call str.{method}")

    def _check_format(self, fmt: str, args, kwargs) -> None:
        if _BIG_NUMBER.search(fmt) or any(isinstance(a, int) and a > self.max_chars for a in args):
            raise TemplateError("chat template formats with an absurd width")
        self._check(len(fmt) + sum(_approx_size(a, self.max_chars) for a in (*args, *kwargs.values())),
                    "format")

    def _checked_filter(self, original):
        """Wraps a filter with size checks before (so nothing huge is built: its input, and what
        the growing filters would make of it) and after. Keeps the filter's pass_context /
        pass_eval_context marker."""
        env, name = self, original.__name__

        def guard(*args, **kwargs):
            values = [a for a in args if not _is_jinja_internal(a)]
            if values:
                env._check(_approx_size(values[0], env.max_chars), f"input of {name}")
            if name == "do_center" and len(values) >= 2:
                env._check(int(values[1]), "center")
            elif name == "do_indent" and values:
                width = values[1] if len(values) >= 2 else kwargs.get("width", 4)
                pad = len(width) if isinstance(width, str) else int(width)
                env._check(len(str(values[0])) + pad * (str(values[0]).count("\n") + 1), "indent")
            elif name == "do_format" and values:
                env._check_format(str(values[0]), values[1:], kwargs)
            elif name == "do_replace" and len(values) >= 3:
                env._check_str_call(str(values[0]), "replace", values[1:3], {})
            elif name == "_tojson" and isinstance(kwargs.get("indent"), (int, str)):
                env._check(_approx_size(values[0], env.max_chars) * (1 + len(str(kwargs["indent"]))
                           if isinstance(kwargs["indent"], str) else 1 + int(kwargs["indent"])), "tojson")
            elif name == "do_join" and values:
                items = list(values[0])
                sep = values[1] if len(values) >= 2 else kwargs.get("d", "")
                env._check(sum(_approx_size(i, env.max_chars) for i in items) + len(str(sep)) * len(items), "join")
                args = tuple(items if a is values[0] else a for a in args)
            result = original(*args, **kwargs)
            env._check(_approx_size(result, env.max_chars), name)
            return result

        guard.__dict__.update(getattr(original, "__dict__", {}))
        guard.__name__ = name
        return guard


def _is_jinja_internal(value) -> bool:
    return isinstance(value, (Context, EvalContext, ImmutableSandboxedEnvironment))


class _CheckedConcatGenerator(CodeGenerator):
    """Compiles `a ~ b` to a size-checked join (plain jinja calls str_join unchecked)."""

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        self.write("environment.checked_str_join((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    """transformers' tojson: plain JSON, not jinja's HTML-escaped variant."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str):
    raise TemplateError(f"chat template refused the conversation: {message}")


class _Deadline:
    """Raises TemplateError inside template code once the time budget is spent. A trace function
    checks the clock on every Python call in this thread and on every line of template code, so
    loops that print nothing are stopped too."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self._end = 0.0
        self._saved = None

    def _tick(self):
        if time.monotonic() > self._end:
            raise TemplateError(f"chat template did not finish within {self.seconds:g} s")

    def _local(self, frame, event, arg):
        self._tick()
        return self._local

    def _global(self, frame, event, arg):
        self._tick()
        return self._local if frame.f_code.co_filename == _TEMPLATE_FILENAME else None

    def __enter__(self):
        self._end = time.monotonic() + self.seconds
        self._saved = sys.gettrace()
        sys.settrace(self._global)
        return self

    def __exit__(self, *exc):
        sys.settrace(self._saved)
        return False


class JinjaTemplate:
    """A chat template compiled once in the budgeted sandbox; `render` returns text."""

    def __init__(self, source: str, time_budget_s: float = DEFAULT_TIME_BUDGET_S,
                 max_output_chars: int = DEFAULT_MAX_OUTPUT_CHARS):
        if not isinstance(source, str) or len(source) > MAX_TEMPLATE_CHARS:
            raise TemplateError(f"chat template is not a string of at most {MAX_TEMPLATE_CHARS} characters")
        self.time_budget_s = time_budget_s
        self._env = _BudgetedEnvironment(max_output_chars)
        with _Deadline(time_budget_s):
            code = _guarded(lambda: self._env.compile(source, filename=_TEMPLATE_FILENAME), "does not compile")
        self._template = self._env.template_class.from_code(self._env, code, self._env.globals, None)

    def render(self, **context: Any) -> str:
        def run() -> str:
            out: list[str] = []
            size = 0
            for chunk in self._template.generate(**context):
                size += len(chunk)
                self._env._check(size, "output")
                out.append(chunk)
            return "".join(out)

        self._env.emitted = 0
        with _Deadline(self.time_budget_s):
            return _guarded(run, "failed")


def _guarded(fn, what: str):
    try:
        return fn()
    except TemplateError:
        raise
    except (Exception, RecursionError, MemoryError) as e:
        raise TemplateError(f"chat template {what}: {type(e).__name__}: {e}") from e


def render_template(template: str, messages: Sequence, add_generation_prompt: bool = True,
                    bos_token: str = "", eos_token: str = "",
                    time_budget_s: float = DEFAULT_TIME_BUDGET_S,
                    max_output_chars: int = DEFAULT_MAX_OUTPUT_CHARS, **extra: Any) -> str:
    """Renders an HF-style chat template (messages as {role, content} dicts) to text.
    Raises TemplateError when it fails, loops past `time_budget_s` or outputs too much."""
    compiled = JinjaTemplate(template, time_budget_s, max_output_chars)
    msgs = [dict(zip(("role", "content"), _role_content(m))) for m in messages]
    return compiled.render(messages=msgs, add_generation_prompt=add_generation_prompt,
                           bos_token=bos_token, eos_token=eos_token, **extra)


# ---------------------------------------------------------------------------------------------
# Template -> ids with special tokens that only the template itself can produce
# ---------------------------------------------------------------------------------------------

# A private-use character that breaks special-token spellings inside message content before
# rendering; it is removed again (a doubled one stands for one literal) before encoding.
_MARK = "\ue000"
_UNESCAPE = re.compile(_MARK + "(" + _MARK + ")?")


class TemplateChatFormat(ChatFormat):
    """A GGUF's own `tokenizer.chat_template`, rendered in the sandbox and encoded so that special
    tokens come only from the template's text, never from message content."""
    name = "jinja"

    def __init__(self, tokenizer: Tokenizer, template: str, add_bos: bool = False,
                 time_budget_s: float = DEFAULT_TIME_BUDGET_S,
                 max_output_chars: int = DEFAULT_MAX_OUTPUT_CHARS):
        self._tok = tokenizer
        self._template = JinjaTemplate(template, time_budget_s, max_output_chars)
        self._add_bos = add_bos and tokenizer.bos_id is not None
        specials = sorted(tokenizer.special_tokens, key=len, reverse=True)
        self._special_ids = tokenizer.special_tokens
        self._special_re = re.compile("|".join(map(re.escape, specials))) if specials else None
        self._prefixes = {s[:k] for s in specials for k in range(1, len(s))}
        self._suffixes = {s[k:] for s in specials for k in range(1, len(s))}
        self._longest_special = max(map(len, specials), default=0)
        self._bos_text = tokenizer.token_to_piece(tokenizer.bos_id).decode("utf-8", "replace") \
            if tokenizer.bos_id is not None else ""
        self._eos_text = tokenizer.token_to_piece(tokenizer.eos_id).decode("utf-8", "replace") \
            if tokenizer.eos_id is not None else ""

    def render_text(self, messages: Sequence, system: str | None = None,
                    add_generation_prompt: bool = True, escape: bool = False) -> str:
        msgs = [{"role": role, "content": self._escape(content) if escape else content}
                for _, role, content in _conversation(messages, system)]
        return self._template.render(messages=msgs, add_generation_prompt=add_generation_prompt,
                                     bos_token=self._bos_text, eos_token=self._eos_text)

    def render(self, messages: Sequence, system: str | None = None,
               add_generation_prompt: bool = True) -> RenderedPrompt:
        turns = _conversation(messages, system)
        ids = self._encode(self.render_text(messages, system, add_generation_prompt, escape=True))
        # Message k ends where the rendering of messages[:k+1] stops agreeing with the whole.
        spans: list[MessageSpan] = []
        start = 1 if ids[:1] == [self._tok.bos_id] else 0    # BOS is the prefix, as in BitNetChatFormat
        for k, (index, role, _) in enumerate(turns):
            partial = self._encode(self._render_prefix(messages, system, turns, k + 1))
            end = max(start, _common_prefix(partial, ids))
            spans.append(MessageSpan(index, role, start, end))
            start = end
        return RenderedPrompt(ids, spans)

    def _render_prefix(self, messages, system, turns, n: int) -> str:
        n_system = 1 if turns and turns[0][0] is None else 0
        return self.render_text(messages[:max(0, n - n_system)], system if n >= 1 else None,
                                add_generation_prompt=False, escape=True)

    def _escape(self, content: str) -> str:
        text = content.replace(_MARK, _MARK + _MARK)
        if self._special_re is not None:
            text = self._special_re.sub(lambda m: m.group(0)[0] + _MARK + m.group(0)[1:], text)
        # Content ending in the start of a special spelling (or starting with the rest of one)
        # could complete a special together with the template's own text.
        longest = self._longest_special
        if any(text[-k:] in self._prefixes for k in range(1, min(len(text), longest) + 1)):
            text += _MARK
        if any(text[:k] in self._suffixes for k in range(1, min(len(text), longest) + 1)):
            text = _MARK + text
        return text

    def _encode(self, text: str) -> list[int]:
        ids: list[int] = []
        pos = 0
        for m in (self._special_re.finditer(text) if self._special_re is not None else ()):
            ids += self._tok.encode(_UNESCAPE.sub(lambda u: u.group(1) or "", text[pos:m.start()]))
            ids.append(self._special_ids[m.group(0)])
            pos = m.end()
        ids += self._tok.encode(_UNESCAPE.sub(lambda u: u.group(1) or "", text[pos:]))
        if self._add_bos and ids[:1] != [self._tok.bos_id]:
            ids.insert(0, self._tok.bos_id)
        return ids


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


# Formats for GGUFs that carry no template, recognised by the turn tokens their vocabulary
# defines (the Gemma 3 270M GGUF on PyPI has none; without this it would get BitNet's roles and
# echo "User:"/"Assistant:"). Gemma has no system role: the system prompt opens the first user turn.
FALLBACK_TEMPLATES = (
    ("<start_of_turn>",
     "{{ bos_token }}{% set sys = namespace(text='') %}"
     "{% for m in messages %}{% if m.role == 'system' %}{% set sys.text = m.content + '\\n\\n' %}"
     "{% else %}<start_of_turn>{{ 'model' if m.role == 'assistant' else 'user' }}\n"
     "{% if m.role == 'user' %}{{ sys.text }}{% set sys.text = '' %}{% endif %}"
     "{{ m.content }}<end_of_turn>\n{% endif %}{% endfor %}"
     "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"),
    ("<|start_header_id|>",
     "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n"
     "{{ m.content }}<|eot_id|>{% endfor %}"
     "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"),
    ("<|im_start|>",
     "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
     "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"),
)


def fallback_template(special_tokens) -> str | None:
    """The template of the first known turn format whose opening token the vocabulary has."""
    for token, template in FALLBACK_TEMPLATES:
        if token in special_tokens:
            return template
    return None


def chat_format_for(metadata: dict, tokenizer: Tokenizer) -> ChatFormat:
    """BitNet architectures always get the 2B4T format (their stored template is bitnet.cpp's
    placeholder); other files use their own template, or the 2B4T-style role format without one."""
    arch = metadata.get("general.architecture")
    template = metadata.get("tokenizer.chat_template")
    if arch in BITNET_ARCHS:
        log.info("architecture %s: 2B4T chat format (the file's own template is not used)", arch)
        return BitNetChatFormat(tokenizer)
    if not isinstance(template, str) or not template.strip():
        template = fallback_template(tokenizer.special_tokens)
        if template is None:
            log.warning("%s file without a chat template: using the 2B4T-style role format", arch)
            return BitNetChatFormat(tokenizer)
        log.warning("%s file without a chat template: using the format its special tokens name", arch)
    add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", getattr(tokenizer, "add_bos", False)))
    return TemplateChatFormat(tokenizer, template, add_bos=add_bos)
