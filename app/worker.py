"""The engine worker: one QThread-owned object holds the loaded model and its ChatSession.

The GUI thread never calls the engine. It sends requests through queued signals of
`EngineHost` and gets answers back as signals. Two things cannot wait in a queue behind a
running request, so they are plain `threading.Event`s set from the GUI thread: Stop (checked by
the generate loop between tokens) and cancelling a model load (the load runs in a helper thread
that the worker polls, so Cancel answers at once even while the file is still being read).
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, is_dataclass
from pathlib import Path

from PySide6.QtCore import QObject, Qt, QThread, Signal, Slot

from engine.errors import CancelledError, ModelFormatError, OutOfMemoryError, TernError

log = logging.getLogger(__name__)

BATCH_INTERVAL_S = 0.03     # tokens reach the GUI about this often

import app.qt_compat  # noqa: F401  (PySide6 6.12 emit() reference fix; before any emit)
GIL_SWITCH_INTERVAL_S = 0.001
LOAD_POLL_S = 0.05


def _default_opener(path: str, backend: str = "auto", **options):
    """open_chat, except that a non-BitNet model always gets the llama.cpp backend: the backend
    setting (CPU / CUDA / reference) is about Tern's own engine."""
    from engine.model import inspect_gguf
    from engine.session import open_chat
    if backend != "auto" and inspect_gguf(path).kind == "llama.cpp":
        backend = "auto"
    return open_chat(path, backend=backend, **options)


def _check_kernels() -> str | None:
    """The quiet self-test at first start and after an update (engine.selftest): a notice if the
    fast kernels failed it and the scalar ones are used instead."""
    from engine.paths import data_dir
    from engine.selftest import ensure_kernels_checked
    try:
        return ensure_kernels_checked(data_dir() / "selftest.json")
    except Exception as exc:  # noqa: BLE001 - no native library: the reference backend still runs
        log.warning("kernel self-test not run: %s", exc)
        return None


def readable_error(exc: BaseException) -> str:
    """A message for a person: what went wrong, and what to do where we know it."""
    if isinstance(exc, OutOfMemoryError):
        return f"Not enough memory for this model. Close other programs or pick a smaller model. ({exc})"
    if isinstance(exc, ModelFormatError):
        return f"This model file cannot be used: {exc}"
    if isinstance(exc, TernError):
        return str(exc)
    if isinstance(exc, MemoryError):
        return "Not enough memory for this model."
    if isinstance(exc, OSError):
        return f"Cannot read the model file: {exc.strerror or exc}"
    return f"Unexpected engine error ({type(exc).__name__}): {exc}"


def describe_session(session, path: str) -> dict:
    decoder = session.decoder
    info = getattr(session, "info", None)
    return {"path": path, "name": (info and info.name) or Path(path).stem,
            "arch": info.arch if info else "", "backend": decoder.backend_name,
            "kernel": getattr(decoder, "kernel", ""), "n_ctx": decoder.n_ctx}


def describe_info(info) -> dict:
    """What the GUI shows about a dropped file (engine.model.ModelInfo as plain data)."""
    return {"path": str(info.path), "name": info.name or Path(info.path).stem, "arch": info.arch,
            "kind": info.kind, "reason": info.reason, "n_params": info.n_params,
            "file_size": info.file_size, "context_length": info.context_length,
            "est_ram_bytes": info.est_ram_bytes}


def _stats_dict(stats) -> dict:
    if stats is None:
        return {}
    return asdict(stats) if is_dataclass(stats) else dict(vars(stats))


class EngineWorker(QObject):
    load_progress = Signal(float)           # seconds since the load started
    loaded = Signal(object)                 # describe_session() dict
    load_failed = Signal(str)
    load_cancelled = Signal()
    tokens = Signal(int, str, int)          # request id, text of the batch, tokens in the batch
    truncated = Signal(int, int)            # request id, oldest messages left out
    finished = Signal(int, object)          # request id, stats dict (+ n_past, n_ctx, cancelled)
    failed = Signal(int, str)               # request id, readable message
    inspected = Signal(str, object, str)    # path, describe_info() dict or None, error message
    backends = Signal(object)               # {backend: None if usable else why not}
    models_listed = Signal(object)          # [library entry dicts], default id
    copy_progress = Signal('qint64', 'qint64')   # bytes copied, total bytes
    library_added = Signal(object)          # library entry dict of a dragged-in model
    library_failed = Signal(str)

    def __init__(self, opener: Callable = _default_opener):
        super().__init__()
        self._opener = opener
        self.session = None                 # read by tests only while the worker is idle

    # -- model loading --------------------------------------------------------------------------

    @Slot(str, object, object)
    def load(self, path: str, options: dict, cancel: threading.Event) -> None:
        self._close_session()
        result: dict = {}

        def run():
            try:
                result["notice"] = _check_kernels()
                result["session"] = self._opener(path, **options)
            except BaseException as exc:  # noqa: BLE001 - every failure must reach the GUI
                result["error"] = exc

        loader = threading.Thread(target=run, name="tern-model-load", daemon=True)
        started = time.monotonic()
        loader.start()
        while loader.is_alive():
            loader.join(LOAD_POLL_S)
            if cancel.is_set():
                threading.Thread(target=_close_when_done, args=(loader, result), daemon=True).start()
                self.load_cancelled.emit()
                return
            self.load_progress.emit(time.monotonic() - started)
        if "error" in result:
            log.warning("model load failed: %s", result["error"], exc_info=result["error"])
            self.load_failed.emit(readable_error(result["error"]))
            return
        self.session = result["session"]
        info = describe_session(self.session, path)
        if result.get("notice"):
            info["notice"] = result["notice"]
        self.loaded.emit(info)

    @Slot()
    def unload(self) -> None:
        self._close_session()

    def _close_session(self) -> None:
        if self.session is not None:
            session, self.session = self.session, None
            try:
                session.close()
            except Exception:  # noqa: BLE001 - closing must never take the app down
                log.exception("closing the model failed")

    # -- inspecting a file (drag-in) -------------------------------------------------------------

    @Slot(str)
    def inspect(self, path: str) -> None:
        from engine.model import inspect_gguf
        try:
            info = describe_info(inspect_gguf(path))
            if info["kind"] == "llama.cpp":
                from engine.backends import available_backends
                info["backend_missing"] = available_backends().get("llama.cpp")
            self.inspected.emit(path, info, "")
        except Exception as exc:  # noqa: BLE001 - a broken file is an answer, not a crash
            self.inspected.emit(path, None, readable_error(exc))

    # -- backends and the model library -----------------------------------------------------------

    @Slot()
    def probe(self) -> None:
        from engine.backends import available_backends
        self.backends.emit(available_backends())

    @Slot()
    def list_models(self) -> None:
        try:
            from engine.library import Library
            library = Library()
            default = library.default()
            entries = [asdict(e) | {"exists": e.exists} for e in library.entries()]
            self.models_listed.emit({"models": entries, "default": default.id if default else None})
        except Exception as exc:  # noqa: BLE001 - an unreadable index must not stop the app
            log.warning("cannot read the model library: %s", exc)
            self.models_listed.emit({"models": [], "default": None, "error": readable_error(exc)})

    @Slot(str, bool, object)
    def add_to_library(self, path: str, copy: bool, cancel: threading.Event) -> None:
        """Index a dropped model, copying it into Tern's models folder first if asked."""
        from engine.library import Library
        try:
            library = Library()
            target = Path(path)
            if copy:
                target = library.models_dir / "local" / Path(path).name
                copy_file(Path(path), target, cancel, lambda done, total: self.copy_progress.emit(done, total))
            entry = library.add(target, source="local")
            self.library_added.emit(asdict(entry))
        except Exception as exc:  # noqa: BLE001 - the failure is shown, the app stays up
            self.library_failed.emit(readable_error(exc))

    # -- generation -----------------------------------------------------------------------------

    @Slot(int, object, str, object, int, object)
    def generate(self, request_id: int, messages: list, system: str, params, max_tokens: int,
                 cancel: threading.Event) -> None:
        from engine.session import Message
        if self.session is None:
            self.failed.emit(request_id, "No model is loaded. Pick one in the model list or drop a .gguf file.")
            return
        batch = _Batcher(lambda text, n: self.tokens.emit(request_id, text, n))
        stats, cancelled = None, False
        try:
            events = self.session.generate([Message(role, content) for role, content in messages],
                                           system or None, params, max_tokens, cancel=cancel)
            for event in events:
                if event.kind == "token":
                    batch.add(event.text)
                elif event.kind == "truncated":
                    batch.flush()
                    self.truncated.emit(request_id, event.dropped_messages)
                elif event.kind == "done":
                    stats = event.stats
        except CancelledError:
            cancelled = True
        except Exception as exc:  # noqa: BLE001 - an engine error becomes a message, the app stays up
            batch.flush()
            log.warning("generation failed", exc_info=exc)
            self.failed.emit(request_id, readable_error(exc))
            return
        batch.flush()
        info = _stats_dict(stats)
        info["cancelled"] = cancelled or cancel.is_set()
        info["n_past"] = self.session.decoder.n_past
        info["n_ctx"] = self.session.decoder.n_ctx
        self.finished.emit(request_id, info)


class _Batcher:
    """Collects token texts and hands them on at most every BATCH_INTERVAL_S."""

    def __init__(self, emit: Callable[[str, int], None]):
        self._emit = emit
        self._parts: list[str] = []
        self._last = time.monotonic()

    def add(self, text: str) -> None:
        self._parts.append(text)
        if time.monotonic() - self._last >= BATCH_INTERVAL_S:
            self.flush()

    def flush(self) -> None:
        if self._parts:
            self._emit("".join(self._parts), len(self._parts))
            self._parts = []
        self._last = time.monotonic()


def _close_when_done(loader: threading.Thread, result: dict) -> None:
    """After a cancelled load: wait for the loader, then free what it opened."""
    loader.join()
    session = result.get("session")
    if session is not None:
        session.close()


def copy_file(source: Path, target: Path, cancel: threading.Event, progress: Callable[[int, int], None],
              block: int = 8 * 2**20) -> None:
    """Copy through `target`.part, then rename: a cancelled or failed copy leaves no half file."""
    from engine.errors import CancelledError
    total = source.stat().st_size
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    done = 0
    try:
        with open(source, "rb") as src, open(part, "wb") as dst:
            while chunk := src.read(block):
                if cancel.is_set():
                    raise CancelledError(f"copying {source.name} was cancelled")
                dst.write(chunk)
                done += len(chunk)
                progress(done, total)
        os.replace(part, target)
    except BaseException:
        part.unlink(missing_ok=True)
        raise


class EngineHost(QObject):
    """Owns the worker thread. Every method is called on the GUI thread and returns at once."""

    _request_load = Signal(str, object, object)
    _request_generate = Signal(int, object, str, object, int, object)
    _request_unload = Signal()
    _request_inspect = Signal(str)
    _request_probe = Signal()
    _request_models = Signal()
    _request_add = Signal(str, bool, object)

    def __init__(self, opener: Callable = _default_opener, parent: QObject | None = None):
        super().__init__(parent)
        self.thread = QThread()
        self.thread.setObjectName("tern-engine")
        self.worker = EngineWorker(opener)
        self.worker.moveToThread(self.thread)
        self._request_load.connect(self.worker.load)
        self._request_generate.connect(self.worker.generate)
        # Blocking: at shutdown the model must be closed on its own thread before the thread ends
        # (a queued request could still be waiting when the event loop quits).
        self._request_unload.connect(self.worker.unload, Qt.BlockingQueuedConnection)
        self._request_inspect.connect(self.worker.inspect)
        self._request_probe.connect(self.worker.probe)
        self._request_models.connect(self.worker.list_models)
        self._request_add.connect(self.worker.add_to_library)
        self._copy_cancel = threading.Event()
        self._next_id = 0
        # The engine thread and the GUI thread share the GIL. PySide releases it around every Qt
        # call, and getting it back waits up to one switch interval while the engine runs Python:
        # at the default 5 ms, the dozen Qt calls of one streamed batch added up to 60 ms stalls.
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        # One Event per request, so a Stop pressed before the worker picks a request up still counts.
        self._load_cancel = threading.Event()
        self._generation_cancel = threading.Event()
        self.thread.start()

    def load(self, path: str, options: dict) -> None:
        self._load_cancel = threading.Event()
        self._request_load.emit(path, options, self._load_cancel)

    def inspect(self, path: str) -> None:
        self._request_inspect.emit(path)

    def probe(self) -> None:
        self._request_probe.emit()

    def list_models(self) -> None:
        self._request_models.emit()

    def add_to_library(self, path: str, copy: bool) -> None:
        self._copy_cancel = threading.Event()
        self._request_add.emit(path, copy, self._copy_cancel)

    def cancel_copy(self) -> None:
        self._copy_cancel.set()

    def cancel_load(self) -> None:
        self._load_cancel.set()

    def generate(self, messages: list[tuple[str, str]], system: str, params, max_tokens: int) -> int:
        self._next_id += 1
        self._generation_cancel = threading.Event()
        self._request_generate.emit(self._next_id, messages, system, params, max_tokens,
                                    self._generation_cancel)
        return self._next_id

    def stop(self) -> None:
        self._generation_cancel.set()

    def shutdown(self, timeout_ms: int = 10000) -> None:
        """Stop what runs, free the model on its own thread, end the thread. Safe to call twice."""
        self.stop()
        self.cancel_load()
        if self.thread.isRunning():
            self._request_unload.emit()       # returns once the running request has ended
        self.thread.quit()
        if not self.thread.wait(timeout_ms):
            log.error("the engine thread did not stop within %d ms", timeout_ms)
