"""The model side of the main window: the model picker, loading with progress and Cancel,
drag-in of .gguf files (inspect → intake dialog → library → load), downloads and the library.

A mixin of MainWindow (it uses the widgets MainWindow builds), kept apart to keep each file short.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from PySide6.QtWidgets import QFileDialog, QMessageBox

from app.model_intake import IntakeDialog, human_size

PICK_OPEN, PICK_DOWNLOAD, PICK_LIBRARY = "open", "download", "library"


def has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


class WindowModelsMixin:
    # -- models -------------------------------------------------------------------------------

    def _model_title(self) -> str:
        return self.controller.model["name"] if self.controller.model else "Assistant"

    def _models_listed(self, listing: dict) -> None:
        self._models = [m for m in listing.get("models", []) if m.get("exists", True) and m["kind"] != "unsupported"]
        self._fill_model_picker()
        default = next((m for m in self._models if m["id"] == listing.get("default")), None)
        if self.load_default_model and default and self.controller.model is None \
                and self.controller.loading_path is None:
            self.load_default_model = False
            self.controller.load_model(default["path"])

    def _fill_model_picker(self) -> None:
        picker = self.model_picker
        picker.blockSignals(True)
        picker.clear()
        current = self.controller.model["path"] if self.controller.model else self.controller.loading_path
        if current is None:
            picker.addItem("Choose a model…", None)
        known = {m["path"] for m in self._models}
        if current and current not in known:
            loaded = self.controller.model
            picker.addItem(loaded["name"] if loaded else Path(current).stem, current)
        for m in self._models:
            picker.addItem(f"{m['name']}  ·  {m.get('quant') or m['kind']}  ·  {human_size(m['size'])}", m["path"])
        picker.insertSeparator(picker.count())
        picker.addItem("Open model file…", PICK_OPEN)
        if has_module("app.download_dialog"):
            picker.addItem("Download models…", PICK_DOWNLOAD)
        if has_module("app.library_view"):
            picker.addItem("Model library…", PICK_LIBRARY)
        index = picker.findData(current) if current else 0
        picker.setCurrentIndex(max(0, index))
        picker.blockSignals(False)

    def _model_picked(self, index: int) -> None:
        data = self.model_picker.itemData(index)
        actions = {PICK_OPEN: self.open_model_file, PICK_DOWNLOAD: self.open_downloads, PICK_LIBRARY: self.open_library}
        if data in actions:
            self._fill_model_picker()
            actions[data]()
        elif data and (self.controller.model is None or data != self.controller.model["path"]):
            self.controller.load_model(data)

    def open_model_file(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Open model", "", "GGUF models (*.gguf);;All files (*)")
        if path:
            self.controller.inspect(path)

    def open_downloads(self) -> None:
        from app.download_dialog import DownloadDialog
        dialog = DownloadDialog(self)
        dialog.installed.connect(self._model_installed)
        dialog.finished.connect(lambda *_: self.controller.host.list_models())
        dialog.open()

    def open_library(self) -> None:
        from app.library_view import LibraryView
        view = LibraryView(self)
        view.model_chosen.connect(self.controller.load_model)
        view.changed.connect(self.controller.host.list_models)
        view.open()

    def _model_installed(self, entry: dict) -> None:
        """A finished download: list it, and load it if nothing is loaded yet."""
        self.controller.host.list_models()
        if self.controller.model is None and self.controller.loading_path is None:
            self.controller.load_model(entry["path"])

    def _model_loading(self, path: str) -> None:
        self.load_label.setText(f"Loading {Path(path).name}…")
        self.load_progress.setRange(0, 0)
        self.load_bar.setVisible(True)
        self.status_model.setText(f"Loading {Path(path).stem}…")
        self._fill_model_picker()

    def _load_progress(self, seconds: float) -> None:
        name = Path(self.controller.loading_path or "").name
        self.load_label.setText(f"Loading {name}… {seconds:.1f} s")

    def _model_loaded(self, info: dict) -> None:
        self.status_model.setText(info["name"])
        kernel = f" · {info['kernel']}" if info.get("kernel") else ""
        self.status_backend.setText(f"{info['backend']}{kernel}")
        if info.get("notice"):
            QMessageBox.warning(self, "Tern is using its safe kernels", info["notice"])
        self.controller.host.list_models()
        self._fill_model_picker()

    def _model_load_ended(self, ok: bool) -> None:
        self.load_bar.setVisible(False)
        if not ok:
            self.status_model.setText("No model loaded")
            self.status_backend.setText("")
            self._fill_model_picker()

    def _show_context(self, used: int, n_ctx: int) -> None:
        self.context_meter.setVisible(n_ctx > 0)
        self.context_meter.setRange(0, max(1, n_ctx))
        self.context_meter.setValue(min(used, n_ctx))
        self.status_context.setText(f"Context {used:,} / {n_ctx:,}")

    def _backends_probed(self, backends: dict) -> None:
        self._backends = backends

    # -- drag-in ------------------------------------------------------------------------------

    def dragEnterEvent(self, event) -> None:
        if any(url.toLocalFile().lower().endswith(".gguf") for url in event.mimeData().urls()):
            event.acceptProposedAction()

    def dropEvent(self, event) -> None:
        paths = [url.toLocalFile() for url in event.mimeData().urls() if url.isLocalFile()]
        ggufs = [p for p in paths if p.lower().endswith(".gguf")]
        if ggufs:
            event.acceptProposedAction()
            self.controller.inspect(ggufs[0])

    def _file_inspected(self, path: str, info, error: str) -> None:
        self.intake_dialog = IntakeDialog(path, info, error, self.colors, self)
        self.intake_dialog.accepted.connect(lambda d=self.intake_dialog: self._intake_accepted(d))
        self.intake_dialog.open()

    def _intake_accepted(self, dialog: IntakeDialog) -> None:
        if dialog.copy_chosen:
            self.load_label.setText(f"Copying {Path(dialog.path).name} into Tern's model folder…")
            self.load_progress.setRange(0, 1000)
            self.load_progress.setValue(0)
        else:
            self.load_label.setText(f"Adding {Path(dialog.path).name} to the model library…")
            self.load_progress.setRange(0, 0)
        self.load_bar.setVisible(True)
        self.controller.host.add_to_library(dialog.path, dialog.copy_chosen)

    def _copy_progress(self, done: int, total: int) -> None:
        self.load_progress.setValue(int(1000 * done / max(1, total)))

    def _library_added(self, entry: dict) -> None:
        self.controller.host.list_models()
        self.controller.load_model(entry["path"])

    def _library_failed(self, message: str) -> None:
        self.load_bar.setVisible(False)
        self.chat.add_notice(message, error=True)

    def _cancel_background_work(self) -> None:
        self.controller.cancel_load()
        self.controller.host.cancel_copy()
