"""The download dialog: pick a model from the catalogue (or name a repository), download it with a
progress bar, pause / resume / cancel, and set a Hugging Face token when a model is gated.

The transfer runs in a daemon Python thread, never on the GUI thread; it reports through queued
Qt signals (byte counts as 'qint64': a plain int signal wraps above 2 GiB). A daemon thread,
not a QThread, because quitting the app must not wait for the network: the process may end
mid-transfer, and the partial file resumes next time. Pause/resume/cancel are
threading.Events the transfer checks between chunks.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import asdict

from PySide6.QtCore import QCoreApplication, QObject, Qt, Signal
from PySide6.QtWidgets import (QComboBox, QDialog, QFormLayout, QHBoxLayout, QInputDialog, QLabel, QLineEdit,
                               QMessageBox, QProgressBar, QPushButton, QVBoxLayout, QWidget)

from app.model_intake import human_size
from engine.download import DownloadControl, DownloadProgress, DownloadStopped, disk_free_bytes, partial_bytes
from engine.errors import AuthError, CancelledError, ChecksumError, DiskSpaceError, TernError
from engine.library import Library, install_converted, install_from_hub, load_catalogue
from engine.secrets import InvalidTokenError, KeychainUnavailableError, TokenStore, default_store

log = logging.getLogger(__name__)

BAR_STEPS = 1000
OTHER = "other"


class DownloadJob(QObject):
    """One install (download + verify + add to the library) in a background thread."""

    progress = Signal("qint64", "qint64", float, float, str)   # done, total, bytes/s, eta s (-1: unknown), phase
    succeeded = Signal(object)                                  # the library entry as a dict
    failed = Signal(str, str)                                   # kind, message for a person

    def __init__(self, model: dict, *, token: str | None, library: Library, policy=None,
                 free_space=disk_free_bytes):
        super().__init__()          # no parent: the thread keeps it alive even if the dialog goes
        self.model, self.token, self.library = model, token, library
        self.policy, self.free_space = policy, free_space
        self.control = DownloadControl()
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="tern-download", daemon=True)
        self.thread.start()

    @property
    def running(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def _run(self) -> None:
        m = self.model
        common = dict(token=self.token, progress=self._report, control=self.control,
                      library=self.library, policy=self.policy, free_space=self.free_space)
        try:
            if m["route"] == "convert":
                entry = install_converted(m["repo"], m.get("convert_to", "i2_s"), **common)
            else:
                entry = install_from_hub(m["repo"], m["file"], **common)
        except AuthError as exc:
            self._emit(self.failed, "auth", str(exc))
        except DiskSpaceError as exc:
            self._emit(self.failed, "disk", str(exc))
        except ChecksumError as exc:
            self._emit(self.failed, "checksum", str(exc))
        except DownloadStopped as exc:
            self._emit(self.failed, "stopped", str(exc))
        except CancelledError as exc:
            self._emit(self.failed, "cancelled", str(exc))
        except TernError as exc:
            self._emit(self.failed, "error", str(exc))
        except Exception as exc:  # noqa: BLE001 - a worker thread must report, not die silently
            log.exception("download failed")
            self._emit(self.failed, "error", f"Unexpected error ({type(exc).__name__}): {exc}")
        else:
            self._emit(self.succeeded, asdict(entry))

    def _report(self, p: DownloadProgress) -> None:
        self._emit(self.progress, p.done, p.total, p.speed_bps, -1.0 if p.eta_s is None else p.eta_s, p.phase)

    def _emit(self, signal, *args) -> None:
        try:
            signal.emit(*args)
        except RuntimeError:        # the receiver was destroyed (app closing): nothing to tell
            pass


def status_text(done: int, total: int, speed: float, eta: float, phase: str) -> str:
    amount = f"{human_size(done) if done else '0 B'} of {human_size(total)}"
    if phase == "verifying":
        return f"Verifying SHA-256… {amount}"
    if phase == "converting":
        return "Converting to GGUF…"
    if phase == "paused":
        return f"Paused at {amount}"
    if phase == "retrying":
        return f"Connection problem, retrying… {amount}"
    if phase == "connecting":
        return f"Connecting… {amount}"
    left = "" if eta < 0 else f" · {_duration(eta)} left"
    rate = f" · {human_size(int(speed))}/s" if speed > 0 else ""
    return f"{amount}{rate}{left}"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class DownloadDialog(QDialog):
    """`installed(entry dict)` when a model is in the library."""

    installed = Signal(object)

    def __init__(self, parent: QWidget | None = None, *, library: Library | None = None,
                 tokens: TokenStore | None = None, catalogue: list[dict] | None = None,
                 policy=None, free_space=disk_free_bytes):
        super().__init__(parent)
        self.setWindowTitle("Download models")
        self.setMinimumWidth(560)
        self.library = library or Library()
        self.tokens = tokens or default_store()
        self.policy, self.free_space = policy, free_space
        self.models = [m for m in (catalogue if catalogue is not None else load_catalogue())
                       if m["route"] in ("gguf", "convert")]
        self.job: DownloadJob | None = None
        self.entry: dict | None = None
        self._build()
        self._selection_changed()
        app = QCoreApplication.instance()
        if app is not None:
            app.aboutToQuit.connect(self._stop_for_quit)

    # ---- layout ---------------------------------------------------------------------------------
    def _build(self) -> None:
        layout = QVBoxLayout(self)
        self.form = form = QFormLayout()
        self.choice = QComboBox()
        for m in self.models:
            self.choice.addItem(m["name"] + ("  (recommended)" if m.get("default") else ""), m["id"])
        self.choice.addItem("Other Hugging Face repository…", OTHER)
        self.choice.currentIndexChanged.connect(self._selection_changed)
        form.addRow("Model", self.choice)
        self.repo_edit = QLineEdit(placeholderText="owner/name")
        self.file_edit = QLineEdit(placeholderText="file.gguf")
        self.repo_edit.textChanged.connect(self._refresh_buttons)
        self.file_edit.textChanged.connect(self._refresh_buttons)
        form.addRow("Repository", self.repo_edit)
        form.addRow("File", self.file_edit)
        layout.addLayout(form)
        self.details = QLabel(wordWrap=True, textFormat=Qt.PlainText)
        layout.addWidget(self.details)
        self.bar = QProgressBar(minimum=0, maximum=BAR_STEPS, value=0, textVisible=True)
        layout.addWidget(self.bar)
        self.status = QLabel(wordWrap=True, textFormat=Qt.PlainText)
        self.status.setTextInteractionFlags(Qt.TextSelectableByMouse)
        layout.addWidget(self.status)
        buttons = QHBoxLayout()
        self.token_button = QPushButton("Set Hugging Face token…", visible=False)
        self.token_button.clicked.connect(self.ask_token)
        self.download_button = QPushButton("Download", default=True)
        self.download_button.clicked.connect(self.start)
        self.pause_button = QPushButton("Pause", enabled=False)
        self.pause_button.clicked.connect(self.toggle_pause)
        self.cancel_button = QPushButton("Cancel download", enabled=False)
        self.cancel_button.clicked.connect(self.cancel)
        self.close_button = QPushButton("Close")
        self.close_button.clicked.connect(self.reject)
        for b in (self.token_button, self.download_button, self.pause_button, self.cancel_button):
            buttons.addWidget(b)
        buttons.addStretch(1)
        buttons.addWidget(self.close_button)
        layout.addLayout(buttons)

    def selected_model(self) -> dict | None:
        key = self.choice.currentData()
        if key != OTHER:
            return next(m for m in self.models if m["id"] == key)
        repo, file = self.repo_edit.text().strip(), self.file_edit.text().strip()
        if not repo:
            return None
        route = "gguf" if file else "convert"
        return {"id": OTHER, "name": repo, "repo": repo, "file": file or None, "route": route}

    def _selection_changed(self) -> None:
        other = self.choice.currentData() == OTHER
        for w in (self.repo_edit, self.file_edit):
            w.setVisible(other)
            self.form.labelForField(w).setVisible(other)
        m = self.selected_model()
        if m is None or other:
            self.details.setText("Name a repository and a .gguf file in it (leave the file empty to "
                                 "download a BitNet safetensors checkpoint and convert it).")
        else:
            size = f"~{human_size(m['approx_size_bytes'])}" if m.get("approx_size_bytes") else "size shown on download"
            kind = "trained ternary" if m["training"] == "native" else "made ternary after training"
            self.details.setText(f"{m['repo']}" + (f" / {m['file']}" if m.get("file") else " (converted to GGUF)")
                                 + f"\n{m['format']} · {size} · licence: {m['license'] or 'see the repository'}"
                                 + f" · {kind}\n{m.get('notes', '')}")
        self._show_partial()
        self._refresh_buttons()

    def _show_partial(self) -> None:
        m = self.selected_model()
        have = 0
        if m and m["route"] == "gguf" and m.get("file") and not self.running:
            try:
                have = partial_bytes(self.library.path_for(m["repo"], m["file"]))
            except TernError:
                have = 0
        self.download_button.setText("Resume" if have else "Download")
        if have and not self.running:
            self.status.setText(f"{human_size(have)} downloaded earlier; it resumes from there.")

    # ---- actions --------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self.job is not None and self.job.running

    def start(self) -> None:
        model = self.selected_model()
        if model is None or self.running:
            return
        self.entry = None
        self.token_button.setVisible(False)
        self.job = DownloadJob(model, token=self.tokens.get(), library=self.library, policy=self.policy,
                               free_space=self.free_space)
        self.job.progress.connect(self._on_progress)
        self.job.succeeded.connect(self._on_succeeded)
        self.job.failed.connect(self._on_failed)
        self.status.setText("Connecting…")
        self.job.start()
        self._refresh_buttons()

    def toggle_pause(self) -> None:
        if not self.running:
            return
        control = self.job.control
        if control.paused:
            control.resume()
            self.pause_button.setText("Pause")
        else:
            control.pause()
            self.pause_button.setText("Resume")

    def cancel(self) -> None:
        if self.running:
            self.job.control.cancel()
            self.status.setText("Cancelling…")

    def reject(self) -> None:
        """Closing stops a running download; its partial file resumes next time."""
        if self.running:
            self.job.control.stop()
        super().reject()

    def _stop_for_quit(self) -> None:
        """The app is quitting: stop cleanly (the partial file resumes next start), briefly."""
        if self.running:
            self.job.control.stop()
            self.job.thread.join(timeout=2.0)

    def ask_token(self) -> None:
        token, ok = QInputDialog.getText(self, "Hugging Face token",
                                         "Paste a read token from huggingface.co → Settings → Access Tokens.\n"
                                         "Tern keeps it in the system keychain.", QLineEdit.Password)
        if ok and token.strip():
            self.store_token(token, session_only=False)

    def store_token(self, token: str, *, session_only: bool) -> None:
        try:
            self.tokens.set(token, session_only=session_only)
        except KeychainUnavailableError as exc:
            answer = QMessageBox.question(self, "No keychain", f"{exc}\n\nUse the token for this session only?")
            if answer == QMessageBox.Yes:
                self.tokens.set(token, session_only=True)
            else:
                return
        except InvalidTokenError as exc:
            self.status.setText(str(exc))
            return
        self.token_button.setVisible(False)
        self.status.setText("Token saved. Press Download again.")

    # ---- job signals ----------------------------------------------------------------------------
    def _on_progress(self, done: int, total: int, speed: float, eta: float, phase: str) -> None:
        self.bar.setValue(int(BAR_STEPS * done / total) if total > 0 else 0)
        self.status.setText(status_text(done, total, speed, eta, phase))

    def _on_succeeded(self, entry: dict) -> None:
        self.entry = entry
        self.bar.setValue(BAR_STEPS)
        self.status.setText(f"Installed {entry['name']} ({entry['quant']}, {human_size(entry['size'])}); "
                            f"SHA-256 verified.")
        self._job_ended()
        self.installed.emit(entry)

    def _on_failed(self, kind: str, message: str) -> None:
        if kind == "cancelled":
            self.bar.setValue(0)
            message = "Download cancelled; the partial file was deleted."
        elif kind == "stopped":
            message = "Download stopped; it resumes where it left off next time."
        self.status.setText(message)
        self.token_button.setVisible(kind == "auth")
        self._job_ended()

    def _job_ended(self) -> None:
        self.pause_button.setText("Pause")
        if self.job is not None and self.job.thread is not None:
            self.job.thread.join(timeout=1.0)     # it has already reported: only the return is left
        self._show_partial()
        self._refresh_buttons()

    def _refresh_buttons(self) -> None:
        running = self.running
        self.choice.setEnabled(not running)
        self.download_button.setEnabled(not running and self.selected_model() is not None)
        self.pause_button.setEnabled(running)
        self.cancel_button.setEnabled(running)
