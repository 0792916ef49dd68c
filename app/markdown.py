"""Splitting a reply into Markdown prose and fenced code blocks.

Qt renders the prose (QTextBrowser.setMarkdown); code blocks become their own widgets so each
gets a monospace face and a Copy button. No Qt in this module: the splitter is tested alone.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

# An opening fence: up to 3 spaces, then ``` or ~~~ (3 or more), then an info string.
_FENCE = re.compile(r"^( {0,3})(`{3,}|~{3,})[ \t]*([^`\n]*?)[ \t]*$")


@dataclass(frozen=True)
class Segment:
    kind: str        # 'text' | 'code'
    text: str
    language: str = ""
    closed: bool = True   # False for a code block the reply has not closed (yet)


def split_markdown(source: str) -> list[Segment]:
    """Prose and fenced code blocks in order. A fence closes with the same character, at least
    as long, and nothing after it (CommonMark); an unclosed fence runs to the end."""
    segments: list[Segment] = []
    prose: list[str] = []
    lines = source.split("\n")
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if not match:
            prose.append(lines[i])
            i += 1
            continue
        indent, fence, info = len(match.group(1)), match.group(2), match.group(3)
        closing = re.compile(r"^ {0,3}" + re.escape(fence[0]) + "{" + str(len(fence)) + r",}[ \t]*$")
        body, i, closed = [], i + 1, False
        while i < len(lines):
            if closing.match(lines[i]):
                closed, i = True, i + 1
                break
            line = lines[i]
            body.append(line[min(indent, len(line) - len(line.lstrip(" "))):])
            i += 1
        _flush_prose(prose, segments)
        language = info.split()[0] if info.split() else ""
        segments.append(Segment("code", "\n".join(body), language, closed))
    _flush_prose(prose, segments)
    return segments


def _flush_prose(prose: list[str], segments: list[Segment]) -> None:
    text = "\n".join(prose).strip("\n")
    if text.strip():
        segments.append(Segment("text", text))
    prose.clear()


def stable_prefix(source: str) -> int:
    """Length of the part of a growing reply whose rendering can no longer change: up to the
    last blank line outside a code block, or the end of the last closed code block. Only
    whole lines count: the line being written is never part of it."""
    cut, offset, closing = 0, 0, None
    lines = source.split("\n")
    for line in lines[:-1]:                    # the last line is still being written
        offset += len(line) + 1
        if closing is not None:
            if closing.match(line):
                closing, cut = None, offset
            continue
        match = _FENCE.match(line)
        if match:
            fence = match.group(2)
            closing = re.compile(r"^ {0,3}" + re.escape(fence[0]) + "{" + str(len(fence)) + r",}[ \t]*$")
        elif not line.strip():
            cut = offset
    return cut
