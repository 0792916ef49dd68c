"""What the window says about a dropped (or opened) .gguf file, and the keep-or-copy choice.

The header has been read by the worker (engine.model.inspect_gguf); this dialog only shows the
outcome: a BitNet model for Tern's engine, another architecture for llama.cpp, or a file that
cannot run, with the reason.
"""
from __future__ import annotations

from PySide6.QtCore import Qt
from PySide6.QtWidgets import (QButtonGroup, QDialog, QDialogButtonBox, QHBoxLayout, QLabel, QRadioButton,
                               QVBoxLayout, QWidget)

import app.qt_compat  # noqa: F401  (PySide6 6.12 emit() reference fix; before any emit)
from app.theme import Colors, icon


def human_size(n: int | None) -> str:
    if not n:
        return "—"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f}\u00a0{unit}" if unit == "B" else f"{n:.1f}\u00a0{unit}"
        n /= 1024
    return ""


def outcome(info: dict | None, error: str) -> tuple[str, str, bool]:
    """(headline, explanation, runnable) for an inspected file."""
    if info is None:
        return "This file cannot be used", error or "It is not a readable GGUF model file.", False
    arch = info.get("arch") or "unknown"
    if info["kind"] == "bitnet":
        return ("BitNet model — runs on Tern's own engine",
                f"A ternary (1.58-bit) model, architecture “{arch}”. Tern runs it with its native kernels.", True)
    if info["kind"] == "llama.cpp":
        if info.get("backend_missing"):
            return (f"“{arch}” model — needs llama.cpp, which is not installed",
                    "Install the llama extra (pip install 'tern[llama]') to run non-BitNet models.", False)
        return (f"“{arch}” model — runs through llama.cpp",
                "Not a BitNet model: Tern runs it with llama.cpp and the model's own chat template.", True)
    return "Tern cannot run this model", info.get("reason") or f"Architecture “{arch}” is not supported.", False


class IntakeDialog(QDialog):
    """Accepted → the caller adds the model to the library (copied if `copy_chosen`) and loads it."""

    def __init__(self, path: str, info: dict | None, error: str, colors: Colors, parent: QWidget | None = None):
        super().__init__(parent)
        self.setWindowTitle("Add model")
        self.setMinimumWidth(480)
        self.path, self.info = path, info
        headline, explanation, self.runnable = outcome(info, error)
        layout = QVBoxLayout(self)
        layout.setSpacing(10)
        top = QHBoxLayout()
        badge = QLabel()
        badge.setPixmap(icon("chip" if self.runnable else "warning", colors.accent if self.runnable else "#D97706",
                             32).pixmap(32, 32))
        top.addWidget(badge, 0, Qt.AlignTop)
        texts = QVBoxLayout()
        self.headline = QLabel(headline, objectName="chatTitle")
        self.headline.setWordWrap(True)
        self.explanation = QLabel(explanation)
        self.explanation.setWordWrap(True)
        self.explanation.setTextInteractionFlags(Qt.TextSelectableByMouse)
        texts.addWidget(self.headline)
        texts.addWidget(self.explanation)
        top.addLayout(texts, 1)
        layout.addLayout(top)
        if info is not None:
            facts = (f"<b>{info.get('name') or ''}</b><br>{path}<br>"
                     f"Size {human_size(info.get('file_size'))} · parameters "
                     f"{(info.get('n_params') or 0) / 1e9:.2f} B · context {info.get('context_length') or '—'}"
                     f" · RAM ≈ {human_size(info.get('est_ram_bytes'))}")
            details = QLabel(facts, objectName="emptyText")
            details.setWordWrap(True)
            layout.addWidget(details)
        self.keep = QRadioButton("Keep the file where it is")
        self.copy = QRadioButton("Copy it into Tern's model folder")
        self.keep.setChecked(True)
        group = QButtonGroup(self)
        group.addButton(self.keep)
        group.addButton(self.copy)
        buttons = QDialogButtonBox()
        if self.runnable:
            layout.addWidget(self.keep)
            layout.addWidget(self.copy)
            self.accept_button = buttons.addButton("Add and load", QDialogButtonBox.AcceptRole)
            self.accept_button.setDefault(True)
            buttons.addButton(QDialogButtonBox.Cancel)
        else:
            self.accept_button = None
            buttons.addButton(QDialogButtonBox.Close)
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        layout.addWidget(buttons)

    @property
    def copy_chosen(self) -> bool:
        return self.copy.isChecked()
