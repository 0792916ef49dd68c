"""Settings: sampling, reply length, context, threads, backend, theme."""
from __future__ import annotations

from dataclasses import replace

from PySide6.QtWidgets import (QComboBox, QDialog, QDialogButtonBox, QDoubleSpinBox, QFormLayout, QGroupBox,
                               QLabel, QPushButton, QSpinBox, QVBoxLayout, QWidget)

import app.qt_compat  # noqa: F401  (PySide6 6.12 emit() reference fix; before any emit)
from app.settings import AppSettings, max_threads

BACKEND_LABELS = [("auto", "Automatic (fastest available)"), ("native", "CPU — Tern's native kernels"),
                  ("cuda", "CUDA — NVIDIA GPU"), ("reference", "Reference (numpy, slow; for checking)")]
THEME_LABELS = [("system", "Follow the system"), ("light", "Light"), ("dark", "Dark")]


def _double(low: float, high: float, step: float, decimals: int = 2) -> QDoubleSpinBox:
    box = QDoubleSpinBox()
    box.setRange(low, high)
    box.setSingleStep(step)
    box.setDecimals(decimals)
    return box


def _int(low: int, high: int, step: int = 1, special: str = "") -> QSpinBox:
    box = QSpinBox()
    box.setRange(low, high)
    box.setSingleStep(step)
    if special:
        box.setSpecialValueText(special)
    return box


class SettingsDialog(QDialog):
    def __init__(self, settings: AppSettings, available: dict[str, str | None] | None = None,
                 parent: QWidget | None = None):
        super().__init__(parent)
        self.setWindowTitle("Settings")
        self.setMinimumWidth(460)
        self._base = settings
        layout = QVBoxLayout(self)

        sampling = QGroupBox("Sampling")
        form = QFormLayout(sampling)
        self.temperature = _double(0.0, 2.0, 0.05)
        self.temperature.setToolTip("0 = always the most likely token (greedy)")
        self.top_p = _double(0.0, 1.0, 0.05)
        self.top_k = _int(0, 1000, 5, special="off")
        self.min_p = _double(0.0, 1.0, 0.01)
        self.repeat_penalty = _double(1.0, 2.0, 0.05)
        self.seed = _int(-1, 2**31 - 1, special="random")
        for label, widget in (("Temperature", self.temperature), ("Top-p", self.top_p), ("Top-k", self.top_k),
                              ("Min-p", self.min_p), ("Repetition penalty", self.repeat_penalty),
                              ("Seed", self.seed)):
            form.addRow(label, widget)
        layout.addWidget(sampling)

        model = QGroupBox("Model")
        form = QFormLayout(model)
        self.max_tokens = _int(16, 32768, 64)
        self.n_ctx = _int(256, 131072, 256)
        self.threads = _int(0, max_threads(), special="automatic")
        self.backend = QComboBox()
        for key, label in BACKEND_LABELS:
            missing = (available or {}).get(key)
            self.backend.addItem(label + ("" if missing is None else " — not available"), key)
            if missing is not None:
                self.backend.model().item(self.backend.count() - 1).setEnabled(False)
        form.addRow("Max reply tokens", self.max_tokens)
        form.addRow("Context length", self.n_ctx)
        form.addRow("CPU threads", self.threads)
        form.addRow("Backend (BitNet models)", self.backend)
        note = QLabel("Changing the context, threads or backend reloads the model.")
        note.setObjectName("composerHint")
        form.addRow(note)
        layout.addWidget(model)

        look = QGroupBox("Appearance")
        form = QFormLayout(look)
        self.theme = QComboBox()
        for key, label in THEME_LABELS:
            self.theme.addItem(label, key)
        form.addRow("Theme", self.theme)
        layout.addWidget(look)

        buttons = QDialogButtonBox(QDialogButtonBox.Ok | QDialogButtonBox.Cancel)
        defaults = QPushButton("BitNet defaults")
        defaults.clicked.connect(lambda: self.show_settings(replace(AppSettings(), theme=self.theme.currentData(),
                                                                    last_model=self._base.last_model)))
        buttons.addButton(defaults, QDialogButtonBox.ResetRole)
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        layout.addWidget(buttons)
        self.show_settings(settings)

    def show_settings(self, s: AppSettings) -> None:
        self.temperature.setValue(s.temperature)
        self.top_p.setValue(s.top_p)
        self.top_k.setValue(s.top_k)
        self.min_p.setValue(s.min_p)
        self.repeat_penalty.setValue(s.repeat_penalty)
        self.seed.setValue(s.seed)
        self.max_tokens.setValue(s.max_tokens)
        self.n_ctx.setValue(s.n_ctx)
        self.threads.setValue(s.threads)
        self.backend.setCurrentIndex(max(0, self.backend.findData(s.backend)))
        self.theme.setCurrentIndex(max(0, self.theme.findData(s.theme)))

    def result_settings(self) -> AppSettings:
        return replace(self._base, temperature=self.temperature.value(), top_p=self.top_p.value(),
                       top_k=self.top_k.value(), min_p=self.min_p.value(),
                       repeat_penalty=self.repeat_penalty.value(), seed=self.seed.value(),
                       max_tokens=self.max_tokens.value(), n_ctx=self.n_ctx.value(),
                       threads=self.threads.value(), backend=self.backend.currentData(),
                       theme=self.theme.currentData())
