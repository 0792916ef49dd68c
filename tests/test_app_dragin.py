"""Dropping .gguf files on the window: a BitNet model (Tern's engine), a Llama-architecture model
(run for real through llama.cpp), and files that cannot run — each gets the right outcome."""
from __future__ import annotations

from pathlib import Path

import pytest
from PySide6.QtCore import QMimeData, QPointF, Qt, QUrl
from PySide6.QtGui import QDragEnterEvent, QDropEvent
from PySide6.QtWidgets import QApplication

from engine.gguf_write import write_gguf
from engine.library import Library
from tests.test_app_harness import bitnet_path, tern_app, tern_home  # noqa: F401


def drop(qtbot, app, path: Path):
    """A real drag-enter + drop event pair on the window; returns the intake dialog."""
    mime = QMimeData()
    mime.setUrls([QUrl.fromLocalFile(str(path))])
    enter = QDragEnterEvent(QPointF(300, 300), Qt.CopyAction, mime, Qt.LeftButton, Qt.NoModifier)
    QApplication.sendEvent(app.window, enter)
    assert enter.isAccepted()
    with qtbot.waitSignal(app.controller.file_inspected, timeout=15000):
        QApplication.sendEvent(app.window, QDropEvent(QPointF(300, 300), Qt.CopyAction, mime,
                                                      Qt.LeftButton, Qt.NoModifier))
    dialog = app.window.intake_dialog
    assert dialog is not None and dialog.isVisible() and dialog.path == str(path)
    return dialog


def accept(qtbot, app, dialog, copy: bool) -> bool:
    (dialog.copy if copy else dialog.keep).setChecked(True)
    with qtbot.waitSignal(app.controller.model_load_ended, timeout=60000) as blocker:
        dialog.accept_button.click()
    return blocker.args[0]


def test_non_gguf_drags_are_not_accepted(qtbot, tern_app, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    mime = QMimeData()
    mime.setUrls([QUrl.fromLocalFile(str(text))])
    enter = QDragEnterEvent(QPointF(10, 10), Qt.CopyAction, mime, Qt.LeftButton, Qt.NoModifier)
    enter.ignore()
    QApplication.sendEvent(tern_app.window, enter)
    assert not enter.isAccepted()


def test_bitnet_gguf_is_added_in_place_and_chats(qtbot, tern_app, bitnet_path):
    app = tern_app
    dialog = drop(qtbot, app, bitnet_path)
    assert dialog.runnable and "BitNet" in dialog.headline.text()
    assert accept(qtbot, app, dialog, copy=False)
    assert app.controller.model["path"] == str(bitnet_path)
    entries = Library().entries()
    assert [(e.path, e.kind) for e in entries] == [(str(Path(bitnet_path).resolve()), "bitnet")]
    assert app.send(qtbot, "hello").status == "complete"
    # the model picker lists the library model and has it selected
    qtbot.waitUntil(lambda: app.window.model_picker.findData(str(bitnet_path)) >= 0, timeout=5000)
    assert app.window.model_picker.currentData() == str(bitnet_path)


def test_bitnet_gguf_can_be_copied_into_the_model_folder(qtbot, tern_app, bitnet_path):
    app = tern_app
    dialog = drop(qtbot, app, bitnet_path)
    assert accept(qtbot, app, dialog, copy=True)
    entry = Library().entries()[0]
    copied = Path(entry.path)
    assert copied != Path(bitnet_path) and copied.is_relative_to(Library().models_dir)
    assert copied.read_bytes() == Path(bitnet_path).read_bytes()
    assert not list(copied.parent.glob("*.part"))
    assert app.controller.model["path"] == str(copied)


def test_llama_architecture_gguf_runs_through_llama_cpp(qtbot, tern_app, tmp_path):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    from tests.make_llama_gguf import write_llama_gguf
    path = write_llama_gguf(tmp_path / "tiny-llama.gguf", seed=5)
    app = tern_app
    dialog = drop(qtbot, app, path)
    assert dialog.runnable and "llama.cpp" in dialog.headline.text() and "llama" in dialog.headline.text()
    assert accept(qtbot, app, dialog, copy=False)
    assert app.controller.model["backend"] == "llama.cpp"
    assert app.window.status_backend.text().startswith("llama.cpp")
    reply = app.send(qtbot, "hello there")
    assert reply.status == "complete" and reply.stats["generated"] == 48
    # the model's own chat template (ChatML), not the BitNet format
    prompt = app.worker.session.last_prompt_text()
    assert "<|im_start|>user\nhello there<|im_end|>\n<|im_start|>assistant\n" in prompt
    assert "User: " not in prompt


def _no_arch_gguf(path: Path) -> Path:
    return write_gguf(path, {"general.name": "mystery"}, [])


@pytest.mark.parametrize("name, make, expect", [
    ("random.gguf", lambda p: p.write_bytes(bytes(range(256)) * 8), "cannot be used"),
    ("empty.gguf", lambda p: p.write_bytes(b""), "cannot be used"),
    ("truncated.gguf", "truncate", "cannot be used"),
    ("no-arch.gguf", _no_arch_gguf, "cannot run"),
])
def test_broken_files_say_why_and_cannot_be_added(qtbot, tern_app, bitnet_path, tmp_path, name, make, expect):
    path = tmp_path / name
    if make == "truncate":
        path.write_bytes(Path(bitnet_path).read_bytes()[:200])
    else:
        make(path)
    dialog = drop(qtbot, tern_app, path)
    assert not dialog.runnable and dialog.accept_button is None
    assert expect in dialog.headline.text()
    assert dialog.explanation.text().strip()           # the reason, in words
    if name == "no-arch.gguf":
        assert "architecture" in dialog.explanation.text()
    dialog.reject()
    assert Library().entries() == []
    assert tern_app.controller.model is None


def test_unknown_architecture_fails_to_load_with_a_readable_error(qtbot, tern_app, tmp_path):
    """inspect_gguf sends any non-BitNet architecture to llama.cpp; one llama.cpp does not know
    must fail as a message in the window, not a crash."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    path = write_gguf(tmp_path / "alien.gguf", {"general.architecture": "alien-arch", "general.name": "alien"}, [])
    app = tern_app
    dialog = drop(qtbot, app, path)
    assert dialog.runnable
    assert not accept(qtbot, app, dialog, copy=False)
    errors = [w.text() for w in app.window.chat.findChildren(type(app.window.status_model))
              if w.objectName() == "errorNotice"]
    assert errors and "alien.gguf" in errors[-1]
