"""The model library window: installed models with size, format, context and estimated RAM; load,
set as default, reveal in the file manager, delete (after a confirmation), add a GGUF file.

Reading the small JSON index happens on the GUI thread; adding a file (which hashes it, seconds
for a large model) runs in a background thread.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import asdict
from pathlib import Path

from PySide6.QtCore import QObject, Qt, QUrl, Signal
from PySide6.QtGui import QDesktopServices
from PySide6.QtWidgets import (QAbstractItemView, QDialog, QFileDialog, QHBoxLayout, QHeaderView, QLabel,
                               QMessageBox, QPushButton, QTableWidget, QTableWidgetItem, QVBoxLayout, QWidget)

from app.model_intake import human_size
from engine.errors import TernError
from engine.library import Library, ModelEntry

log = logging.getLogger(__name__)

COLUMNS = ("", "Name", "Quant", "Size", "Context", "Est. RAM", "Engine", "Source")


class _AddJob(QObject):
    done = Signal(object)          # entry dict
    failed = Signal(str)

    def __init__(self, library: Library, path: str):
        super().__init__()
        self.library, self.path = library, path

    def start(self) -> None:
        threading.Thread(target=self._run, name="tern-library-add", daemon=True).start()

    def _run(self) -> None:
        try:
            entry = asdict(self.library.add(Path(self.path)))
        except (TernError, OSError) as exc:
            self._emit(self.failed, f"Cannot add {Path(self.path).name}: {exc}")
        else:
            self._emit(self.done, entry)

    def _emit(self, signal, *args) -> None:
        try:
            signal.emit(*args)
        except RuntimeError:
            pass


class LibraryView(QDialog):
    """`model_chosen(path)` when the user asks to load a model; `changed()` after any edit."""

    model_chosen = Signal(str)
    changed = Signal()

    def __init__(self, parent: QWidget | None = None, *, library: Library | None = None):
        super().__init__(parent)
        self.setWindowTitle("Model library")
        self.resize(900, 420)
        self.library = library or Library()
        self.entries: list[ModelEntry] = []
        self.confirm_box: QMessageBox | None = None
        self._add_job: _AddJob | None = None
        self._build()
        self.refresh()

    def _build(self) -> None:
        layout = QVBoxLayout(self)
        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels(COLUMNS)
        self.table.setSelectionBehavior(QAbstractItemView.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SingleSelection)
        self.table.setEditTriggers(QAbstractItemView.NoEditTriggers)
        self.table.verticalHeader().setVisible(False)
        self.table.horizontalHeader().setSectionResizeMode(1, QHeaderView.Stretch)
        self.table.itemSelectionChanged.connect(self._refresh_buttons)
        self.table.cellDoubleClicked.connect(lambda *_: self.load_selected())
        layout.addWidget(self.table)
        self.status = QLabel(wordWrap=True, textFormat=Qt.PlainText)
        layout.addWidget(self.status)
        row = QHBoxLayout()
        self.load_button = QPushButton("Load")
        self.default_button = QPushButton("Set as default")
        self.reveal_button = QPushButton("Show in folder")
        self.delete_button = QPushButton("Delete…")
        self.add_button = QPushButton("Add model file…")
        self.close_button = QPushButton("Close")
        self.load_button.clicked.connect(self.load_selected)
        self.default_button.clicked.connect(self.set_default_selected)
        self.reveal_button.clicked.connect(self.reveal_selected)
        self.delete_button.clicked.connect(self.delete_selected)
        self.add_button.clicked.connect(self._pick_file)
        self.close_button.clicked.connect(self.close)
        for b in (self.load_button, self.default_button, self.reveal_button, self.delete_button, self.add_button):
            row.addWidget(b)
        row.addStretch(1)
        row.addWidget(self.close_button)
        layout.addLayout(row)

    # ---- the table ------------------------------------------------------------------------------
    def refresh(self) -> None:
        try:
            self.entries = self.library.entries()
            default = self.library.default()
        except TernError as exc:
            self.entries, default = [], None
            self.status.setText(str(exc))
        default_id = default.id if default else None
        self.table.setRowCount(len(self.entries))
        for r, e in enumerate(self.entries):
            mark = "★" if e.id == default_id else ("missing" if not e.exists else "")
            cells = (mark, e.name, e.quant or "?", human_size(e.size), str(e.ctx or "—"), human_size(e.est_ram),
                     {"bitnet": "Tern", "llama.cpp": "llama.cpp"}.get(e.kind, "unsupported"), e.source)
            for c, text in enumerate(cells):
                item = QTableWidgetItem(text)
                item.setToolTip(f"{e.path}\nSHA-256 {e.sha256}")
                self.table.setItem(r, c, item)
        self.table.resizeColumnsToContents()
        if not self.entries:
            self.status.setText("No models yet. Download one, or add a .gguf file.")
        self._refresh_buttons()

    def selected(self) -> ModelEntry | None:
        rows = self.table.selectionModel().selectedRows()
        return self.entries[rows[0].row()] if rows else None

    def select_id(self, model_id: str) -> None:
        for r, e in enumerate(self.entries):
            if e.id == model_id:
                self.table.selectRow(r)

    def _refresh_buttons(self) -> None:
        entry = self.selected()
        for b in (self.default_button, self.reveal_button, self.delete_button):
            b.setEnabled(entry is not None)
        self.load_button.setEnabled(entry is not None and entry.exists and entry.kind != "unsupported")

    # ---- actions --------------------------------------------------------------------------------
    def load_selected(self) -> None:
        entry = self.selected()
        if entry is not None and entry.exists:
            self.model_chosen.emit(entry.path)

    def set_default_selected(self) -> None:
        entry = self.selected()
        if entry is None:
            return
        self.library.set_default(entry.id)
        self.status.setText(f"{entry.name} is the default model.")
        self._changed(entry.id)

    def reveal_selected(self) -> None:
        entry = self.selected()
        if entry is not None:
            QDesktopServices.openUrl(QUrl.fromLocalFile(str(Path(entry.path).parent)))

    def delete_selected(self) -> None:
        """Ask first (window-modal, not blocking); the deletion happens on Yes."""
        entry = self.selected()
        if entry is None:
            return
        if self.library.owns(entry):
            text = f"Delete {entry.name}?\n\n{human_size(entry.size)} will be removed from disk:\n{entry.path}"
        else:
            text = (f"Remove {entry.name} from the library?\n\nThe file stays where it is "
                    f"(Tern did not download it):\n{entry.path}")
        box = QMessageBox(QMessageBox.Warning, "Delete model", text, QMessageBox.Yes | QMessageBox.Cancel, self)
        box.setDefaultButton(QMessageBox.Cancel)
        box.finished.connect(lambda result, e=entry: self._confirmed_delete(e, result))
        self.confirm_box = box
        box.open()

    def _confirmed_delete(self, entry: ModelEntry, result: int) -> None:
        self.confirm_box = None
        if result != QMessageBox.Yes:
            return
        try:
            self.library.remove(entry.id)
        except (TernError, OSError) as exc:
            self.status.setText(f"Cannot delete {entry.name}: {exc}")
            return
        self.status.setText(f"{entry.name} deleted.")
        self._changed(None)

    def _pick_file(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Add model", "", "GGUF models (*.gguf);;All files (*)")
        if path:
            self.add_file(path)

    def add_file(self, path: str) -> None:
        """Add a GGUF where it is; hashing runs off the GUI thread."""
        self.add_button.setEnabled(False)
        self.status.setText(f"Adding {Path(path).name} (checking its SHA-256)…")
        self._add_job = _AddJob(self.library, path)
        self._add_job.done.connect(self._added)
        self._add_job.failed.connect(self._add_failed)
        self._add_job.start()

    def _added(self, entry: dict) -> None:
        self.add_button.setEnabled(True)
        self.status.setText(f"Added {entry['name']}.")
        self._changed(entry["id"])

    def _add_failed(self, message: str) -> None:
        self.add_button.setEnabled(True)
        self.status.setText(message)

    def _changed(self, select: str | None) -> None:
        self.refresh()
        if select:
            self.select_id(select)
        self.changed.emit()
