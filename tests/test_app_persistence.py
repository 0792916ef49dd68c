"""Nothing is lost: conversations, settings and system prompts survive a restart; a real app
process killed with SIGKILL in the middle of a reply keeps every completed message and the
partial reply, shown as interrupted when the app reopens."""
from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PySide6.QtGui import QImage
from PySide6.QtWidgets import QInputDialog

from app.store import Store
from tests.test_app_harness import TEST_SETTINGS, bitnet_path, build_app, tern_home  # noqa: F401

REPO = Path(__file__).resolve().parent.parent


def test_conversations_settings_and_prompts_survive_a_restart(qtbot, tern_home, bitnet_path, monkeypatch):
    first = build_app(qtbot, tern_home)
    first.load(qtbot, bitnet_path)
    first.window.system_panel.editor.setPlainText("You are terse.")
    first.send(qtbot, "Remember me")
    cid = first.controller.conversation.id
    monkeypatch.setattr(QInputDialog, "getText", lambda *a, **k: ("Kept chat", True))
    first.window.rename_conversation(cid)
    first.window.system_panel.save_button.click()           # saves "You are terse." as preset "Kept chat"
    dialog_settings = first.window
    dialog_settings.open_settings()
    from app.settings_dialog import SettingsDialog
    dialog = next(w for w in first.window.findChildren(SettingsDialog))
    dialog.temperature.setValue(0.35)
    dialog.max_tokens.setValue(777)
    dialog.theme.setCurrentIndex(dialog.theme.findData("dark"))
    dialog.accept()
    assert first.controller.settings.temperature == 0.35
    first.close()

    second = build_app(qtbot, tern_home)
    try:
        s = second.controller.settings
        assert (s.temperature, s.max_tokens, s.theme, s.backend) == (0.35, 777, "dark", "reference")
        assert s.last_model == str(bitnet_path)
        assert second.window.colors.name == "dark"
        titles = [second.window.sidebar.list.item(i).text() for i in range(second.window.sidebar.list.count())]
        assert titles == ["Kept chat"]
        second.window.sidebar.list.setCurrentRow(0)
        assert second.controller.conversation.id == cid
        assert [(w.role, w.text != "") for w in second.window.chat.messages] == [("user", True), ("assistant", True)]
        assert second.window.chat.messages[0].text == "Remember me"
        assert second.window.system_panel.editor.toPlainText() == "You are terse."
        assert ("Kept chat", "You are terse.") in second.store.presets()
    finally:
        second.close()


def _db_rows(db_path: Path) -> list[tuple]:
    """Read-only peek at the messages while the app runs (a Store would mark replies interrupted)."""
    try:
        with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=1) as db:
            return db.execute("SELECT position, role, status, length(content) FROM messages "
                              "ORDER BY conversation_id, position").fetchall()
    except sqlite3.OperationalError:
        return []


@pytest.mark.parametrize("attempt", range(3))
def test_killed_mid_reply_keeps_completed_messages_and_the_partial_reply(qtbot, tmp_path, tiny_model_path,
                                                                          attempt):
    # The 128k-token vocabulary almost never samples an end token: the reply runs until killed.
    model = tiny_model_path("i2_s", seed=1, tokenizer=True)
    home = tmp_path / "home"
    db_path = home / "data" / "tern.sqlite3"
    store = Store(db_path)
    store.save_settings(TEST_SETTINGS.to_dict() | {"max_tokens": 4000, "n_ctx": 4096, "temperature": 0.8,
                                                   "seed": attempt})
    conv = store.create_conversation("Before the crash", "Be kind.")
    earlier = [("user", "first question"), ("assistant", "first **answer**"),
               ("user", "second question"), ("assistant", "second answer\n\n```\ncode\n```")]
    for role, content in earlier:
        store.add_message(conv.id, role, content)
    store.close()

    env = os.environ | {"TERN_HOME": str(home), "QT_QPA_PLATFORM": "offscreen"}
    proc = subprocess.Popen([sys.executable, "-m", "app", "--model", str(model), "--conversation", str(conv.id),
                             "--message", "third question"], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            rows = _db_rows(db_path)
            if any(r[:3] == (5, "assistant", "streaming") and r[3] > 0 for r in rows):
                break
            assert proc.poll() is None, proc.stderr.read().decode(errors="replace")[-2000:]
            time.sleep(0.05)
        else:
            pytest.fail("the reply never reached the database while streaming")
        time.sleep(0.3 * attempt)                        # a different moment of the reply each time
        seen = next(r[3] for r in _db_rows(db_path) if r[0] == 5)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == -signal.SIGKILL

    reopened = build_app(qtbot, home)
    try:
        assert reopened.store.recovered == 1
        messages = reopened.store.messages(conv.id)
        assert [(m.role, m.content, m.status) for m in messages[:4]] == [(r, c, "complete") for r, c in earlier]
        assert (messages[4].role, messages[4].content, messages[4].status) == ("user", "third question", "complete")
        partial = messages[5]
        assert partial.role == "assistant" and partial.status == "interrupted"
        assert len(partial.content) >= seen > 0
        reopened.controller.open_conversation(conv.id)
        widget = reopened.window.chat.messages[-1]
        assert widget.text == partial.content
        assert widget.footer.text().startswith("Interrupted")
    finally:
        reopened.close()


def test_screenshot_entry_point(tmp_path, bitnet_path):
    out = tmp_path / "shot.png"
    env = os.environ | {"TERN_HOME": str(tmp_path / "home"), "QT_QPA_PLATFORM": "offscreen"}
    result = subprocess.run([sys.executable, "-m", "app", "--screenshot", str(out), "--model", str(bitnet_path),
                             "--message", "Hello", "--backend", "reference", "--max-tokens", "24",
                             "--theme", "dark", "--size", "1000x700"],
                            cwd=REPO, env=env, capture_output=True, timeout=120)
    assert result.returncode == 0, result.stderr.decode(errors="replace")[-2000:]
    image = QImage(str(out))
    assert (image.width(), image.height()) == (1000, 700)
    store = Store(tmp_path / "home" / "data" / "tern.sqlite3")
    try:
        conv = store.conversations()[0]
        assert [(m.role, m.status) for m in store.messages(conv.id)] == [("user", "complete"),
                                                                         ("assistant", "complete")]
    finally:
        store.close()


def test_export_and_import_through_the_window(qtbot, tern_home, bitnet_path, tmp_path, monkeypatch):
    from PySide6.QtWidgets import QFileDialog
    app = build_app(qtbot, tern_home)
    try:
        app.load(qtbot, bitnet_path)
        app.window.system_panel.editor.setPlainText("Be brief.")
        app.send(qtbot, "Export me")
        cid = app.controller.conversation.id
        md, js = tmp_path / "chat.md", tmp_path / "chat.json"
        monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *a, **k: (str(md), ""))
        app.window.export_current("md")
        monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *a, **k: (str(js), ""))
        app.window.export_current("json")
        assert md.read_text(encoding="utf-8") == app.store.export_markdown(cid)
        assert md.read_text(encoding="utf-8").startswith("# Export me\n\n**System prompt**\n\n> Be brief.\n")
        monkeypatch.setattr(QFileDialog, "getOpenFileName", lambda *a, **k: (str(js), ""))
        app.window.import_conversation()
        imported = app.controller.conversation
        assert imported.id != cid and imported.title == "Export me" and imported.system_prompt == "Be brief."
        assert [w.text for w in app.window.chat.messages] == [m.content for m in app.store.messages(cid)]
        assert app.window.sidebar.list.count() == 2
        bad = tmp_path / "bad.json"
        bad.write_text("{not json", encoding="utf-8")
        monkeypatch.setattr(QFileDialog, "getOpenFileName", lambda *a, **k: (str(bad), ""))
        app.window.import_conversation()
        assert app.window.sidebar.list.count() == 2
        errors = [w.text() for w in app.window.chat.findChildren(type(app.window.status_model))
                  if w.objectName() == "errorNotice"]
        assert errors and "bad.json" in errors[-1]
    finally:
        app.close()
