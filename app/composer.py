"""The message box (Enter sends, Shift+Enter is a new line) with its Send / Stop button, and the
per-conversation system prompt panel with saved presets."""
from __future__ import annotations

from PySide6.QtCore import QSize, Qt, Signal
from PySide6.QtGui import QKeyEvent
from PySide6.QtWidgets import (QComboBox, QFrame, QHBoxLayout, QInputDialog, QLabel, QPlainTextEdit,
                               QPushButton, QToolButton, QVBoxLayout, QWidget)

import app.qt_compat  # noqa: F401  (PySide6 6.12 emit() reference fix; before any emit)
from app.theme import Colors, icon

MAX_INPUT_LINES = 8


class MessageInput(QPlainTextEdit):
    submitted = Signal()
    focus_changed = Signal(bool)

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.setObjectName("messageInput")
        self.setPlaceholderText("Message Tern…  (Enter to send, Shift+Enter for a new line)")
        self.setTabChangesFocus(True)
        self.document().contentsChanged.connect(self._fit)
        self._fit()

    def keyPressEvent(self, event: QKeyEvent) -> None:
        if event.key() in (Qt.Key_Return, Qt.Key_Enter) and not event.modifiers() & Qt.ShiftModifier:
            self.submitted.emit()
            return
        super().keyPressEvent(event)

    def _fit(self) -> None:
        needed = self.document().size().height()      # in lines for a QPlainTextEdit
        lines = max(1, min(MAX_INPUT_LINES, needed))
        self.setVerticalScrollBarPolicy(Qt.ScrollBarAsNeeded if needed > MAX_INPUT_LINES else Qt.ScrollBarAlwaysOff)
        height = int(lines * self.fontMetrics().lineSpacing() + 2 * self.document().documentMargin() + 10)
        self.setFixedHeight(height)

    def focusInEvent(self, event) -> None:
        super().focusInEvent(event)
        self.focus_changed.emit(True)

    def focusOutEvent(self, event) -> None:
        super().focusOutEvent(event)
        self.focus_changed.emit(False)


class Composer(QFrame):
    send_requested = Signal(str)
    stop_requested = Signal()

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.setObjectName("composer")
        row = QHBoxLayout(self)
        row.setContentsMargins(12, 8, 8, 8)
        row.setSpacing(8)
        self.input = MessageInput()
        self.input.submitted.connect(self._submit)
        self.input.focus_changed.connect(self._show_focus)
        row.addWidget(self.input, 1)
        self.send_button = QToolButton(objectName="sendButton")
        self.send_button.setFixedSize(34, 34)
        self.send_button.setIconSize(QSize(18, 18))
        self.send_button.setToolTip("Send (Enter)")
        self.send_button.setCursor(Qt.PointingHandCursor)
        self.send_button.clicked.connect(self._submit)
        self.stop_button = QToolButton(objectName="stopButton")
        self.stop_button.setFixedSize(34, 34)
        self.stop_button.setIconSize(QSize(16, 16))
        self.stop_button.setToolTip("Stop generating (Esc)")
        self.stop_button.setCursor(Qt.PointingHandCursor)
        self.stop_button.clicked.connect(self.stop_requested)
        self.stop_button.setVisible(False)
        row.addWidget(self.send_button, 0, Qt.AlignBottom)
        row.addWidget(self.stop_button, 0, Qt.AlignBottom)
        self._busy = False

    def set_colors(self, colors: Colors) -> None:
        self.send_button.setIcon(icon("send", colors.on_accent, 18))
        self.stop_button.setIcon(icon("stop", colors.bg, 16))

    def set_busy(self, busy: bool) -> None:
        self._busy = busy
        self.send_button.setVisible(not busy)
        self.stop_button.setVisible(busy)

    def _submit(self) -> None:
        text = self.input.toPlainText()
        if self._busy or not text.strip():
            return
        self.send_requested.emit(text)

    def _show_focus(self, focused: bool) -> None:
        self.setProperty("focused", "true" if focused else "false")
        self.style().unpolish(self)
        self.style().polish(self)


class SystemPromptPanel(QFrame):
    """Edits the open conversation's system prompt; presets fill it in, and the current text
    can be saved as a new preset. Changes apply from the next reply."""
    prompt_changed = Signal(str)
    preset_saved = Signal(str, str)         # name, text

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.setObjectName("systemPanel")
        layout = QVBoxLayout(self)
        layout.setContentsMargins(24, 10, 24, 12)
        layout.setSpacing(6)
        top = QHBoxLayout()
        top.addWidget(QLabel("SYSTEM PROMPT · this conversation, from the next reply", objectName="panelCaption"))
        top.addStretch(1)
        self.presets = QComboBox()
        self.presets.setMinimumWidth(180)
        self.presets.activated.connect(self._preset_chosen)
        top.addWidget(self.presets)
        self.save_button = QPushButton("Save as preset…")
        self.save_button.clicked.connect(self._save_preset)
        top.addWidget(self.save_button)
        layout.addLayout(top)
        self.editor = QPlainTextEdit()
        self.editor.setPlaceholderText("e.g. You are a helpful assistant. Answer briefly.")
        self.editor.setFixedHeight(76)
        self.editor.textChanged.connect(lambda: self.prompt_changed.emit(self.editor.toPlainText())
                                        if not self._loading else None)
        layout.addWidget(self.editor)
        self._loading = False
        self._preset_texts: list[str] = []

    def set_presets(self, presets: list[tuple[str, str]]) -> None:
        self.presets.clear()
        self.presets.addItem("Presets…")
        self._preset_texts = [""]
        for name, text in presets:
            self.presets.addItem(name)
            self._preset_texts.append(text)

    def set_prompt(self, text: str) -> None:
        self._loading = True
        self.editor.setPlainText(text)
        self._loading = False

    def _preset_chosen(self, index: int) -> None:
        if index > 0:
            self.editor.setPlainText(self._preset_texts[index])
        self.presets.setCurrentIndex(0)

    def _save_preset(self) -> None:
        text = self.editor.toPlainText().strip()
        if not text:
            return
        name, ok = QInputDialog.getText(self, "Save system prompt", "Preset name:")
        if ok and name.strip():
            self.preset_saved.emit(name.strip(), text)
