"""The conversation pane: user bubbles, assistant cards, code blocks with a Copy button, notices.

While a reply streams, its text is appended as plain text to one QTextBrowser (cheap: only
the last block is laid out again). Markdown is rendered once, when the reply is complete.
"""
from __future__ import annotations

import math

from PySide6.QtCore import QSize, Qt, QTimer, Signal
from PySide6.QtGui import QFontDatabase, QGuiApplication, QTextCursor, QTextOption
from PySide6.QtWidgets import (QFrame, QHBoxLayout, QLabel, QPlainTextEdit, QPushButton, QScrollArea,
                               QSizePolicy, QTextBrowser, QToolButton, QVBoxLayout, QWidget)

import app.qt_compat  # noqa: F401  (PySide6 6.12 emit() reference fix; before any emit)
from app.markdown import split_markdown, stable_prefix
from app.theme import LIGHT, Colors, app_icon, icon

MAX_BUBBLE_WIDTH = 760


class AutoHeightBrowser(QTextBrowser):
    """A QTextBrowser as tall as its document, so the outer scroll area does the scrolling."""

    def __init__(self, wrap: bool = True, parent: QWidget | None = None):
        super().__init__(parent)
        self.setObjectName("messageText")
        self.setFrameShape(QFrame.NoFrame)
        self.setVerticalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff if wrap else Qt.ScrollBarAsNeeded)
        self.setLineWrapMode(QTextBrowser.WidgetWidth if wrap else QTextBrowser.NoWrap)
        self.setOpenExternalLinks(True)
        self.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Fixed)
        self.setTextInteractionFlags(Qt.TextBrowserInteraction)
        self.document().setDocumentMargin(2)
        self.document().documentLayout().documentSizeChanged.connect(self._fit)
        self._wrap = wrap

    def _fit(self, *_) -> None:
        height = math.ceil(self.document().size().height()) + 2
        if not self._wrap and self.horizontalScrollBar().isVisible():
            height += self.horizontalScrollBar().sizeHint().height()
        if height != self.height():
            self.setFixedHeight(height)

    def resizeEvent(self, event) -> None:
        super().resizeEvent(event)
        self._fit()

    def wheelEvent(self, event) -> None:
        event.ignore()  # the conversation scrolls, not the message


class StreamView(QPlainTextEdit):
    """Where a reply streams in: plain text, appended. QPlainTextEdit lays out only what changed
    and costs about half of a QTextBrowser per append (measured: 7 vs 12 ms worst case for
    English, 18 vs 29 ms for mixed scripts)."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.setObjectName("messageText")
        self.setReadOnly(True)
        self.setFrameShape(QFrame.NoFrame)
        self.setVerticalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
        self.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Fixed)
        self.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.document().setDocumentMargin(2)
        self.document().documentLayout().documentSizeChanged.connect(self._fit)
        self._fit()

    def _fit(self, *_) -> None:
        lines = max(1, int(self.document().documentLayout().documentSize().height()))
        height = lines * self.fontMetrics().lineSpacing() + 2 * int(self.document().documentMargin()) + 4
        if height != self.height():
            self.setFixedHeight(height)

    def append_plain(self, text: str) -> None:
        cursor = self.textCursor()
        cursor.movePosition(QTextCursor.End)
        cursor.insertText(text)

    def wheelEvent(self, event) -> None:
        event.ignore()


class CodeBlock(QFrame):
    def __init__(self, code: str, language: str, colors: Colors, parent: QWidget | None = None):
        super().__init__(parent)
        self.setObjectName("codeBlock")
        self.code = code
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.setSpacing(0)
        header = QFrame(objectName="codeHeader")
        row = QHBoxLayout(header)
        row.setContentsMargins(12, 3, 6, 3)
        row.addWidget(QLabel(language or "code", objectName="codeLanguage"))
        row.addStretch(1)
        self.copy_button = QPushButton(icon("copy", colors.muted, 14), "Copy", objectName="codeCopy")
        self.copy_button.setCursor(Qt.PointingHandCursor)
        self.copy_button.clicked.connect(self.copy)
        row.addWidget(self.copy_button)
        layout.addWidget(header)
        self.view = AutoHeightBrowser(wrap=False)
        self.view.setObjectName("codeText")
        self.view.setFont(QFontDatabase.systemFont(QFontDatabase.FixedFont))
        self.view.document().setDocumentMargin(10)
        self.view.setPlainText(code)
        self.view.setWordWrapMode(QTextOption.NoWrap)
        layout.addWidget(self.view)

    def copy(self) -> None:
        QGuiApplication.clipboard().setText(self.code)
        self.copy_button.setText("Copied")
        QTimer.singleShot(1500, lambda: self.copy_button.setText("Copy"))


class MessageWidget(QFrame):
    """One message. Assistant messages can stream (append) and are rendered when finished.
    A user message is a right-aligned bubble with its actions beside it."""
    edit_requested = Signal(int)          # position of the user message
    regenerate_requested = Signal()

    def __init__(self, role: str, position: int, colors: Colors, title: str = "", parent=None):
        super().__init__(parent)
        self.role, self.position, self.colors = role, position, colors
        self.text = ""
        self._stream_view: StreamView | None = None
        self._rendered_upto = 0
        self._regenerate_button: QToolButton | None = None
        self.actions = QHBoxLayout()
        self.actions.setSpacing(2)
        self.body = QVBoxLayout()
        self.body.setSpacing(8)
        self.footer = QLabel("", objectName="messageFooter")
        self.footer.setVisible(False)
        if role == "user":
            self._build_user()
        else:
            self._build_assistant(title)
        self._add_action("copy", "Copy message", colors.muted, self._copy)
        if role == "user":
            self._add_action("edit", "Edit and resend", colors.muted, lambda: self.edit_requested.emit(self.position))

    def _build_user(self) -> None:
        self.setObjectName("userRow")
        row = QHBoxLayout(self)
        row.setContentsMargins(0, 0, 0, 0)
        row.setSpacing(6)
        row.addStretch(1)
        row.addLayout(self.actions)
        bubble = QFrame(objectName="userBubble")
        inner = QVBoxLayout(bubble)
        inner.setContentsMargins(14, 9, 14, 9)
        inner.addLayout(self.body)
        row.addWidget(bubble)

    def _build_assistant(self, title: str) -> None:
        self.setObjectName("assistantCard")
        outer = QVBoxLayout(self)
        outer.setContentsMargins(16, 10, 16, 10)
        outer.setSpacing(6)
        header = QHBoxLayout()
        header.setSpacing(4)
        header.addWidget(QLabel(title or "Assistant", objectName="roleLabel"))
        header.addStretch(1)
        header.addLayout(self.actions)
        outer.addLayout(header)
        outer.addLayout(self.body)
        outer.addWidget(self.footer)

    def _add_action(self, name: str, tip: str, color: str, slot) -> QToolButton:
        button = QToolButton(objectName="messageAction")
        button.setIcon(icon(name, color, 16))
        button.setIconSize(QSize(16, 16))
        button.setToolTip(tip)
        button.setCursor(Qt.PointingHandCursor)
        button.clicked.connect(slot)
        self.actions.addWidget(button)
        return button

    def allow_regenerate(self, allowed: bool) -> None:
        if allowed and self._regenerate_button is None:
            self._regenerate_button = self._add_action("regenerate", "Regenerate this reply", self.colors.muted,
                                                       self.regenerate_requested.emit)
        if self._regenerate_button is not None:
            self._regenerate_button.setVisible(allowed)

    def _copy(self) -> None:
        QGuiApplication.clipboard().setText(self.text)

    def _clear_body(self) -> None:
        while self.body.count():
            item = self.body.takeAt(0)
            if item.widget():
                item.widget().deleteLater()
        self._stream_view = None

    def set_text(self, text: str) -> None:
        """Final content: plain for the user, rendered Markdown for the assistant."""
        self.text = text
        self._clear_body()
        if self.role == "user":
            label = QLabel(text, objectName="userText")
            label.setWordWrap(True)
            label.setTextFormat(Qt.PlainText)
            label.setTextInteractionFlags(Qt.TextSelectableByMouse)
            # A word-wrapped QLabel asks for less width than its text needs: give it the width of
            # its longest line (in the style sheet's font), up to the bubble's limit.
            label.ensurePolished()
            widest = max(label.fontMetrics().horizontalAdvance(line) for line in text.splitlines() or [""])
            label.setMinimumWidth(min(widest + 6, int(MAX_BUBBLE_WIDTH * 0.7)))
            self.body.addWidget(label)
            return
        for segment in split_markdown(text):
            self.body.addWidget(self._segment_widget(segment))

    def begin_stream(self) -> None:
        self.text = ""
        self._rendered_upto = 0              # self.text[:this] is shown rendered above the stream view
        self._clear_body()
        self._stream_view = StreamView()
        self.body.addWidget(self._stream_view)
        self.set_footer("Generating…")

    def append(self, delta: str) -> None:
        if self._stream_view is None:
            self.begin_stream()
        self.text += delta
        self._stream_view.append_plain(delta)

    def render_progress(self) -> None:
        """While streaming (throttled by the caller): render the paragraphs and code blocks that
        are complete, keep only the unfinished tail as plain text."""
        if self._stream_view is None:
            return
        tail = self.text[self._rendered_upto:]
        cut = stable_prefix(tail)
        if cut == 0:
            return
        at = self.body.indexOf(self._stream_view)
        for segment in split_markdown(tail[:cut]):
            self.body.insertWidget(at, self._segment_widget(segment))
            at += 1
        self._rendered_upto += cut
        self._stream_view.setPlainText(tail[cut:])

    def _segment_widget(self, segment) -> QWidget:
        if segment.kind == "code":
            return CodeBlock(segment.text, segment.language, self.colors)
        view = AutoHeightBrowser()
        view.setMarkdown(segment.text)
        return view

    def set_footer(self, text: str, warning: bool = False) -> None:
        self.footer.setText(text)
        self.footer.setProperty("state", "warning" if warning else "")
        self.footer.style().unpolish(self.footer)
        self.footer.style().polish(self.footer)
        self.footer.setVisible(bool(text))


def footer_text(status: str, stats: dict) -> tuple[str, bool]:
    """The line under an assistant message and whether it is a warning."""
    parts = []
    if stats.get("generated"):
        parts.append(f"{stats['generated']} tokens")
    if stats.get("decode_tps"):
        parts.append(f"{stats['decode_tps']:.1f} tok/s")
    limit = {"max_tokens": "reply limit reached", "context": "context full"}.get(stats.get("stop_reason", ""))
    if limit and status == "complete":
        parts.append(limit)
    if stats.get("error"):
        return f"Stopped by an error: {stats['error']}", True
    if status == "interrupted":
        return "Interrupted — Tern closed before this reply was finished", True
    if status == "stopped":
        return " · ".join(["Stopped"] + parts), True
    return " · ".join(parts), False


class ChatView(QScrollArea):
    """Scrollable column of messages, centred and at most MAX_BUBBLE_WIDTH wide."""
    edit_requested = Signal(int)
    regenerate_requested = Signal()
    download_requested = Signal()

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.setObjectName("chatScroll")
        self.setWidgetResizable(True)
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
        self.colors = LIGHT
        self.assistant_title = "Assistant"
        canvas = QWidget(objectName="chatCanvas")
        row = QHBoxLayout(canvas)
        row.setContentsMargins(24, 18, 24, 18)
        column_host = QWidget()
        column_host.setMaximumWidth(MAX_BUBBLE_WIDTH)
        column_host.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Preferred)
        row.addStretch(0)
        row.addWidget(column_host, 1)
        row.addStretch(0)
        self.column = QVBoxLayout(column_host)
        self.column.setContentsMargins(0, 0, 0, 0)
        self.column.setSpacing(14)
        self.column.addStretch(1)
        self.setWidget(canvas)
        self.messages: list[MessageWidget] = []
        self._stick_to_bottom = True
        self.verticalScrollBar().rangeChanged.connect(self._follow)
        self.verticalScrollBar().valueChanged.connect(self._remember_position)
        self._empty = self._make_empty_state()
        self.column.insertWidget(0, self._empty)

    # -- content ------------------------------------------------------------------------------

    def clear(self) -> None:
        for widget in self.messages:
            widget.deleteLater()
        self.messages.clear()
        for i in reversed(range(self.column.count())):
            widget = self.column.itemAt(i).widget()
            if widget is not None and widget is not self._empty:
                widget.deleteLater()
        self._empty.setVisible(True)
        self._stick_to_bottom = True

    def add_message(self, role: str, position: int, text: str, status: str = "complete",
                    stats: dict | None = None) -> MessageWidget:
        self._empty.setVisible(False)
        widget = MessageWidget(role, position, self.colors, self.assistant_title)
        widget.edit_requested.connect(self.edit_requested)
        widget.regenerate_requested.connect(self.regenerate_requested)
        if text or role == "user":
            widget.set_text(text)
        if role == "assistant":
            widget.set_footer(*footer_text(status, stats or {}))
        self._insert(widget)
        self.messages.append(widget)
        return widget

    def add_notice(self, text: str, error: bool = False, before: QWidget | None = None) -> QLabel:
        """A note in the conversation; `before` a message (a reply that is streaming) or at the end."""
        self._empty.setVisible(False)
        label = QLabel(text, objectName="errorNotice" if error else "notice")
        label.setWordWrap(True)
        label.setContentsMargins(12, 8, 12, 8)
        label.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self._insert(label, before)
        return label

    def _insert(self, widget: QWidget, before: QWidget | None = None) -> None:
        index = self.column.indexOf(before) if before is not None else -1
        if index < 0:
            index = self.column.count() - 1    # before the final stretch
        self.column.insertWidget(index, widget)
        self._stick_to_bottom = True

    def mark_last_regenerable(self) -> None:
        """Only the last reply offers Regenerate."""
        for widget in self.messages:
            if widget.role == "assistant":
                widget.allow_regenerate(widget is self.messages[-1])

    def scroll_to_bottom(self) -> None:
        self._stick_to_bottom = True
        self.verticalScrollBar().setValue(self.verticalScrollBar().maximum())

    # -- keep the newest text in sight while the reader stays at the bottom --------------------

    def _remember_position(self, value: int) -> None:
        bar = self.verticalScrollBar()
        self._stick_to_bottom = value >= bar.maximum() - 24

    def _follow(self, _low: int, high: int) -> None:
        if self._stick_to_bottom:
            self.verticalScrollBar().setValue(high)

    # -- empty state ----------------------------------------------------------------------------

    def _make_empty_state(self) -> QWidget:
        box = QWidget()
        layout = QVBoxLayout(box)
        layout.setContentsMargins(0, 60, 0, 0)
        layout.setSpacing(10)
        logo = QLabel()
        logo.setPixmap(app_icon().pixmap(QSize(72, 72)))
        logo.setAlignment(Qt.AlignCenter)
        title = QLabel("Chat with ternary models, fully offline", objectName="emptyTitle")
        title.setAlignment(Qt.AlignCenter)
        text = QLabel("Pick a model at the top, or drop a .gguf file anywhere on this window.\n"
                      "BitNet runs on Tern's own engine; other GGUF models run through llama.cpp.",
                      objectName="emptyText")
        text.setAlignment(Qt.AlignCenter)
        text.setWordWrap(True)
        for widget in (logo, title, text):
            layout.addWidget(widget)
        self.download_button = QPushButton("Download BitNet b1.58 2B4T…", objectName="primaryButton")
        self.download_button.setCursor(Qt.PointingHandCursor)
        self.download_button.clicked.connect(self.download_requested)
        layout.addSpacing(8)
        layout.addWidget(self.download_button, 0, Qt.AlignCenter)
        return box
