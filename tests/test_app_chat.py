"""The window, the controller and the engine worker together: streaming, Stop, Regenerate, edit
and resend, system prompts, KV-cache reuse, context overflow, errors. Real tiny BitNet model on
the reference backend, real SQLite, real Qt (offscreen)."""
from __future__ import annotations

import time

from PySide6.QtWidgets import QInputDialog, QMessageBox

from tests.test_app_harness import (GapMeter, bitnet_path, build_app, tern_app, tern_home,  # noqa: F401
                                    with_settings)


def test_send_streams_batches_and_the_gui_never_stalls(qtbot, tern_app, bitnet_path):
    app = tern_app
    app.load(qtbot, bitnet_path)
    assert app.window.status_backend.text().startswith("reference")
    app.controller.apply_settings(with_settings(max_tokens=200))
    batches: list[tuple[float, str]] = []
    app.controller.reply_delta.connect(lambda text: batches.append((time.perf_counter(), text)))
    meter = GapMeter(5)
    meter.start()
    reply = app.send(qtbot, "Tell me about terns.")
    meter.stop()

    assert reply.status == "complete" and reply.stats["generated"] >= 30
    assert "".join(text for _, text in batches) == reply.content
    # token batches, not one signal per token, and more than one batch
    assert 3 <= len(batches) < reply.stats["generated"]
    assert meter.ticks > 10
    assert meter.max_gap < 0.050, f"GUI event loop stalled for {meter.max_gap * 1000:.0f} ms"
    # the view holds both messages; the reply is rendered once complete
    widgets = app.window.chat.messages
    assert [w.role for w in widgets] == ["user", "assistant"]
    assert widgets[1].text == reply.content
    assert app.window.status_context.text().startswith("Context ")
    stored = app.store.messages(app.controller.conversation.id)
    assert [(m.role, m.status) for m in stored] == [("user", "complete"), ("assistant", "complete")]
    assert app.window.title_label.text() == "Tell me about terns."


def test_stop_mid_reply_keeps_the_partial_reply(qtbot, tern_app, bitnet_path):
    app = tern_app
    app.load(qtbot, bitnet_path)
    app.controller.apply_settings(with_settings(max_tokens=400))
    stopped_at: list[int] = []
    after_stop: list[str] = []

    def stop_after_first_batch(text):
        if stopped_at:
            after_stop.append(text)
        else:
            stopped_at.append(len(app.controller._reply_text))
            app.window.composer.stop_button.click()

    app.controller.reply_delta.connect(stop_after_first_batch)
    reply = app.send(qtbot, "Count to a thousand.")
    assert reply.status == "stopped"
    assert 0 < reply.stats["generated"] < 400
    # at most the batch already on its way arrives after Stop
    assert len(after_stop) <= 1 and len(reply.content) >= stopped_at[0] > 0
    # Stop is seen between tokens: at most the token in flight follows the click
    assert reply.stats["stop_reason"] == "cancelled"
    assert not app.window.composer.stop_button.isVisible()
    assert app.window.chat.messages[-1].footer.text().startswith("Stopped")
    assert app.store.messages(app.controller.conversation.id)[-1].status == "stopped"


def test_regenerate_replaces_the_last_reply(qtbot, tern_app, bitnet_path):
    app = tern_app
    app.load(qtbot, bitnet_path)
    first = app.send(qtbot, "Hello")
    app.controller.apply_settings(with_settings(temperature=1.5, seed=7))
    with qtbot.waitSignal(app.controller.reply_finished, timeout=30000) as blocker:
        app.window.chat.messages[-1].regenerate_requested.emit()
    second = blocker.args[0]
    stored = app.store.messages(app.controller.conversation.id)
    assert [m.role for m in stored] == ["user", "assistant"]
    assert stored[-1].content == second.content != first.content   # another temperature and seed
    assert app.window.chat.messages[-1].text == second.content
    assert [w.role for w in app.window.chat.messages] == ["user", "assistant"]


def test_edit_and_resend_drops_later_turns_after_confirmation(qtbot, tern_app, bitnet_path, monkeypatch):
    app = tern_app
    app.load(qtbot, bitnet_path)
    app.send(qtbot, "first question")
    app.send(qtbot, "second question")
    cid = app.controller.conversation.id
    monkeypatch.setattr(QInputDialog, "getMultiLineText", lambda *a, **k: ("first question, edited", True))
    # declined: nothing changes
    monkeypatch.setattr(QMessageBox, "question", lambda *a, **k: QMessageBox.No)
    app.window.edit_message(0)
    assert len(app.store.messages(cid)) == 4
    # confirmed: the later turns go, the edited message gets a new reply
    asked = []
    monkeypatch.setattr(QMessageBox, "question", lambda *a, **k: asked.append(a[2]) or QMessageBox.Yes)
    with qtbot.waitSignal(app.controller.reply_finished, timeout=30000):
        app.window.chat.messages[0].edit_requested.emit(0)
    assert "3 later messages" in asked[0]
    stored = app.store.messages(cid)
    assert [(m.role, m.content) for m in stored][:1] == [("user", "first question, edited")]
    assert [m.role for m in stored] == ["user", "assistant"]
    assert [w.role for w in app.window.chat.messages] == ["user", "assistant"]


def test_system_prompt_change_reaches_the_prompt(qtbot, tern_app, bitnet_path):
    app = tern_app
    app.load(qtbot, bitnet_path)
    app.window.prompt_button.click()
    assert app.window.system_panel.isVisible()
    app.window.system_panel.editor.setPlainText("You are a pirate.")
    app.send(qtbot, "Hi")
    session = app.worker.session
    assert session.last_prompt_text().startswith("<|begin_of_text|>System: You are a pirate.<|eot_id|>User: Hi")
    app.window.system_panel.editor.setPlainText("You are a poet.")
    app.send(qtbot, "Again")
    assert "System: You are a poet.<|eot_id|>" in session.last_prompt_text()
    assert "pirate" not in session.last_prompt_text()
    assert app.store.conversation(app.controller.conversation.id).system_prompt == "You are a poet."


def test_presets_fill_the_system_prompt_and_new_ones_are_saved(qtbot, tern_app, monkeypatch):
    app = tern_app
    app.controller.new_conversation()
    panel = app.window.system_panel
    panel.presets.activated.emit(2)          # the second stored preset ("Concise")
    assert panel.editor.toPlainText() == app.store.presets()[1][1]
    assert app.store.conversation(app.controller.conversation.id).system_prompt == app.store.presets()[1][1]
    panel.editor.setPlainText("Answer in French.")
    monkeypatch.setattr(QInputDialog, "getText", lambda *a, **k: ("French", True))
    panel.save_button.click()
    assert ("French", "Answer in French.") in app.store.presets()
    assert panel.presets.findText("French") > 0


def test_second_turn_prefills_only_the_new_tokens(qtbot, tern_app, bitnet_path):
    app = tern_app
    app.load(qtbot, bitnet_path)
    app.send(qtbot, "The first message of this conversation.")
    session = app.worker.session
    cached_after_first = len(session.cached_ids)
    first_total = session.counters["prefilled_tokens_total"]
    app.send(qtbot, "Short second.")
    prompt = session.last_prompt_ids
    assert session.counters["kv_reused_tokens"] == cached_after_first
    assert session.counters["last_prefilled_tokens"] == len(prompt) - cached_after_first
    assert session.counters["prefilled_tokens_total"] == first_total + len(prompt) - cached_after_first
    # exactly the new turn (after the end-of-turn the first reply lacks if it hit max_tokens)
    new_part = session.tokenizer.decode(prompt[cached_after_first:])
    assert new_part.removeprefix("<|eot_id|>") == "User: Short second.<|eot_id|>Assistant: "


def test_switching_conversations_reprefills(qtbot, tern_app, bitnet_path):
    app = tern_app
    app.load(qtbot, bitnet_path)
    app.send(qtbot, "Conversation A")
    a = app.controller.conversation.id
    app.controller.new_conversation()
    app.send(qtbot, "Conversation B")
    app.controller.open_conversation(a)
    assert [w.role for w in app.window.chat.messages] == ["user", "assistant"]
    session = app.worker.session
    cache_of_b = session.cached_ids
    app.send(qtbot, "Back in A")
    prompt = session.last_prompt_ids
    assert session.last_prompt_text().startswith("<|begin_of_text|>User: Conversation A")
    # only what conversation B's cache shares with A's prompt ("<bos>User: Conversation ") is kept
    shared = next(i for i, (x, y) in enumerate(zip(cache_of_b, prompt)) if x != y)
    assert session.counters["kv_reused_tokens"] == shared == 1 + len("User: Conversation ")
    assert session.counters["last_prefilled_tokens"] == len(prompt) - shared


def test_context_overflow_drops_the_oldest_turns_and_says_so(qtbot, tern_home, bitnet_path):
    app = build_app(qtbot, tern_home, with_settings(n_ctx=256, max_tokens=40))
    try:
        app.load(qtbot, bitnet_path)
        app.window.system_panel.editor.setPlainText("Keep this system prompt.")
        for i in range(3):
            app.send(qtbot, f"message {i} " + "words " * 12)
        notices = [w.text() for w in app.window.chat.findChildren(type(app.window.status_model))
                   if w.objectName() == "notice"]
        assert any("left out" in text and "256" in text for text in notices), notices
        column = app.window.chat.column
        notice = next(w for w in app.window.chat.findChildren(type(app.window.status_model))
                      if w.objectName() == "notice")
        assert column.indexOf(notice) < column.indexOf(app.window.chat.messages[-1])   # above its reply
        prompt = app.worker.session.last_prompt_text()
        assert prompt.startswith("<|begin_of_text|>System: Keep this system prompt.<|eot_id|>")
        assert "message 0" not in prompt and "message 2" in prompt
    finally:
        app.close()


def test_engine_errors_become_messages_and_the_app_stays_up(qtbot, tern_app, bitnet_path, tmp_path):
    app = tern_app
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 40)
    with qtbot.waitSignal(app.controller.model_load_ended, timeout=30000) as blocker:
        app.controller.load_model(str(broken))
    assert blocker.args == [False]
    errors = [w.text() for w in app.window.chat.findChildren(type(app.window.status_model))
              if w.objectName() == "errorNotice"]
    assert errors and "broken.gguf" in errors[-1]
    assert not app.controller.send("hello")           # no model: refused with a message
    app.load(qtbot, bitnet_path)
    assert app.send(qtbot, "works now").status == "complete"


def test_model_load_can_be_cancelled(qtbot, tern_app, tiny_model_path):
    app = tern_app
    big = tiny_model_path("i2_s", seed=2, tokenizer=True)      # the 128k vocabulary: a slower load
    with qtbot.waitSignal(app.controller.model_load_ended, timeout=30000) as blocker:
        app.controller.load_model(str(big))
        assert app.window.load_bar.isVisibleTo(app.window)
        app.window.load_cancel.click()
    assert blocker.args == [False]
    assert app.controller.model is None
    assert not app.window.load_bar.isVisibleTo(app.window)


def test_enter_sends_and_shift_enter_adds_a_line(qtbot, tern_app, bitnet_path):
    from PySide6.QtCore import Qt
    app = tern_app
    app.load(qtbot, bitnet_path)
    box = app.window.composer.input
    box.setFocus()
    qtbot.keyClicks(box, "line one")
    qtbot.keyClick(box, Qt.Key_Return, Qt.ShiftModifier)
    qtbot.keyClicks(box, "line two")
    assert box.toPlainText() == "line one\nline two"
    assert app.controller.conversation is None or not app.controller.messages
    with qtbot.waitSignal(app.controller.reply_finished, timeout=30000):
        qtbot.keyClick(box, Qt.Key_Return)
    assert box.toPlainText() == ""
    assert app.controller.messages[0].content == "line one\nline two"


def test_search_rename_and_delete_in_the_sidebar(qtbot, tern_app, bitnet_path, monkeypatch):
    app = tern_app
    app.load(qtbot, bitnet_path)
    app.send(qtbot, "about puffins")
    puffins = app.controller.conversation.id
    app.controller.new_conversation()
    app.send(qtbot, "about gannets")
    sidebar = app.window.sidebar
    assert sidebar.list.count() == 2
    sidebar.search.setText("PUFF")
    qtbot.waitUntil(lambda: sidebar.list.count() == 1, timeout=3000)
    assert sidebar.list.item(0).data(0x0100) == puffins       # Qt.UserRole
    sidebar.search.clear()
    qtbot.waitUntil(lambda: sidebar.list.count() == 2, timeout=3000)
    monkeypatch.setattr(QInputDialog, "getText", lambda *a, **k: ("Seabirds", True))
    app.window.rename_conversation(puffins)
    assert app.store.conversation(puffins).title == "Seabirds"
    assert "Seabirds" in [sidebar.list.item(i).text() for i in range(sidebar.list.count())]
    monkeypatch.setattr(QMessageBox, "question", lambda *a, **k: QMessageBox.Yes)
    current = app.controller.conversation.id
    app.window.delete_conversation(current)
    assert [c.id for c in app.store.conversations()] == [puffins]
    assert app.controller.conversation is None and app.window.chat.messages == []
    assert sidebar.list.count() == 1


def test_closing_mid_reply_keeps_it_as_stopped(qtbot, tern_home, bitnet_path):
    app = build_app(qtbot, tern_home, with_settings(max_tokens=2000, n_ctx=4096, temperature=1.0))
    app.load(qtbot, bitnet_path)
    with qtbot.waitSignal(app.controller.reply_delta, timeout=30000):
        app.controller.send("a long answer please")
    cid = app.controller.conversation.id
    app.close()                                    # closes the window and the store
    assert not app.host.thread.isRunning() and app.worker.session is None
    from app.store import Store
    store = Store(tern_home / "data" / "tern.sqlite3")
    try:
        last = store.messages(cid)[-1]
        assert store.recovered == 0 and last.status == "stopped" and last.content
    finally:
        store.close()


def test_the_engine_runs_only_on_the_worker_thread(qtbot, tern_app, bitnet_path):
    import threading
    app = tern_app
    app.load(qtbot, bitnet_path)
    decoder = app.worker.session.decoder
    threads = set()
    real_forward = decoder.forward

    def spying_forward(ids, all_logits=False):      # records the thread, then runs the real forward
        threads.add(threading.get_ident())
        return real_forward(ids, all_logits)

    decoder.forward = spying_forward
    app.send(qtbot, "which thread?")
    assert threads and threading.main_thread().ident not in threads
    assert len(threads) == 1


def test_a_database_that_cannot_be_written_is_reported_and_nothing_is_lost(qtbot, tern_app, bitnet_path):
    app = tern_app
    app.load(qtbot, bitnet_path)
    app.send(qtbot, "saved fine")
    cid = app.controller.conversation.id
    app.store._db.execute("PRAGMA query_only = ON")          # SQLite now refuses every write
    assert not app.controller.send("this cannot be saved")
    errors = [w.text() for w in app.window.chat.findChildren(type(app.window.status_model))
              if w.objectName() == "errorNotice"]
    assert errors and "could not be saved" in errors[-1] and "readonly" in errors[-1]
    assert not app.controller.busy and app.window.composer.send_button.isVisible()
    app.store._db.execute("PRAGMA query_only = OFF")
    assert [m.content for m in app.store.messages(cid)][:1] == ["saved fine"]
    assert app.send(qtbot, "works again").status == "complete"
