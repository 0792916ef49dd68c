"""Splitting replies into prose and fenced code blocks (the part of Markdown Tern renders itself)."""
from app.markdown import Segment, split_markdown


def test_prose_and_code_in_order():
    text = "Here:\n\n```python\nprint('hi')\n\nx = 1\n```\n\nDone."
    assert split_markdown(text) == [
        Segment("text", "Here:"),
        Segment("code", "print('hi')\n\nx = 1", "python"),
        Segment("text", "Done."),
    ]


def test_tilde_fence_longer_fence_and_indent():
    text = "  ~~~~ js extra\n  let a = 1;\n~~~\n  still code\n~~~~\nafter"
    assert split_markdown(text) == [
        Segment("code", "let a = 1;\n~~~\nstill code", "js"),
        Segment("text", "after"),
    ]


def test_unclosed_fence_runs_to_the_end():
    # a reply that is still streaming, or was stopped, inside a code block
    assert split_markdown("intro\n```\ncode") == [Segment("text", "intro"), Segment("code", "code", "", closed=False)]


def test_backticks_inside_text_are_not_fences():
    assert split_markdown("use `x` and ``y``") == [Segment("text", "use `x` and ``y``")]
    assert split_markdown("") == []


def test_footer_says_how_a_reply_ended():
    from app.chat_view import footer_text
    assert footer_text("complete", {"generated": 12, "decode_tps": 20.04, "stop_reason": "eos"}) == \
        ("12 tokens · 20.0 tok/s", False)
    assert footer_text("complete", {"generated": 5, "stop_reason": "max_tokens"}) == \
        ("5 tokens · reply limit reached", False)
    assert footer_text("stopped", {"generated": 3, "stop_reason": "cancelled"}) == ("Stopped · 3 tokens", True)
    assert footer_text("interrupted", {})[0].startswith("Interrupted")
    assert footer_text("stopped", {"error": "disk full"}) == ("Stopped by an error: disk full", True)
