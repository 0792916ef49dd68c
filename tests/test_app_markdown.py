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


def test_stable_prefix_ends_at_finished_paragraphs_and_code_blocks():
    from app.markdown import stable_prefix
    assert stable_prefix("a sentence being wri") == 0
    assert stable_prefix("para one\n\npara tw") == len("para one\n\n")
    assert stable_prefix("intro\n\n```py\nx = 1\n\ny = 2") == len("intro\n\n")     # blank line inside code
    text = "intro\n\n```py\nx = 1\n```\nafter"
    assert stable_prefix(text) == len("intro\n\n```py\nx = 1\n```\n")
    assert stable_prefix("line\n\n") == len("line\n\n")


def test_a_streaming_reply_is_rendered_block_by_block(qtbot):
    from app.chat_view import AutoHeightBrowser, CodeBlock, MessageWidget, StreamView
    from app.theme import LIGHT
    widget = MessageWidget("assistant", 1, LIGHT, "Tern")
    qtbot.addWidget(widget)
    widget.begin_stream()
    reply = "Here is **code**:\n\n```python\nprint(1)\n```\nand then some more te"
    for i in range(0, len(reply), 7):
        widget.append(reply[i:i + 7])
    widget.render_progress()

    def body():
        return [widget.body.itemAt(i).widget() for i in range(widget.body.count())]

    kinds = [type(w) for w in body()]
    assert kinds == [AutoHeightBrowser, CodeBlock, StreamView]
    assert body()[1].code == "print(1)"
    assert body()[2].toPlainText() == "and then some more te"
    widget.append("xt.")
    widget.render_progress()                      # nothing new is complete
    assert body()[2].toPlainText() == "and then some more text."
    widget.set_text(widget.text)                  # the final rendering replaces it all
    qtbot.waitUntil(lambda: [type(w) for w in body()] == [AutoHeightBrowser, CodeBlock, AutoHeightBrowser])
    assert widget.text == reply + "xt."
