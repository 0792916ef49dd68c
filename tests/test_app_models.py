"""The model picker, the library window and the default model at start, on the real library."""
from __future__ import annotations

from engine.library import Library
from tests.test_app_harness import bitnet_path, tern_app, tern_home  # noqa: F401


def _listed(qtbot, app, path):
    """Ask the worker for the library again and wait until the picker shows `path` (an answer to
    the window's own request at start may arrive first)."""
    app.controller.host.list_models()
    qtbot.waitUntil(lambda: app.window.model_picker.findData(str(path)) >= 0, timeout=10000)


def test_picker_lists_library_models_and_loads_the_chosen_one(qtbot, tern_app, bitnet_path):
    app = tern_app
    Library().add(bitnet_path)
    _listed(qtbot, app, bitnet_path)
    picker = app.window.model_picker
    index = picker.findData(str(bitnet_path))
    assert index >= 0 and "I2_S" in picker.itemText(index)
    assert picker.findData("open") > index          # "Open model file…" after the models
    with qtbot.waitSignal(app.controller.model_load_ended, timeout=30000) as blocker:
        picker.activated.emit(index)
    assert blocker.args == [True] and app.controller.model["path"] == str(bitnet_path)
    assert app.window.status_model.text() == app.controller.model["name"]


def test_library_window_loads_a_model(qtbot, tern_app, bitnet_path):
    from app.library_view import LibraryView
    app = tern_app
    Library().add(bitnet_path)
    app.window.open_library()
    view = next(w for w in app.window.findChildren(LibraryView))
    with qtbot.waitSignal(app.controller.model_load_ended, timeout=30000) as blocker:
        view.model_chosen.emit(str(bitnet_path))
    assert blocker.args == [True]
    view.close()


def test_default_model_loads_at_start(qtbot, tern_app, bitnet_path):
    app = tern_app
    entry = Library().add(bitnet_path)
    Library().set_default(entry.id)
    app.window.load_default_model = True
    with qtbot.waitSignal(app.controller.model_load_ended, timeout=30000) as blocker:
        app.controller.host.list_models()
    assert blocker.args == [True] and app.controller.model["path"] == entry.path
