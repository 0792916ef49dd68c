"""The main window: sidebar, header with the model picker, the chat, the composer, the status bar.

It draws what the ChatController reports and forwards what the user does; it never calls the
engine (the controller talks to the worker thread).
"""
from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

from PySide6.QtCore import QSize, Qt, QTimer
from PySide6.QtGui import QAction, QGuiApplication, QKeySequence
from PySide6.QtWidgets import (QApplication, QComboBox, QFileDialog, QFrame, QHBoxLayout, QInputDialog, QLabel,
                               QMainWindow, QMessageBox, QProgressBar, QPushButton, QToolButton, QVBoxLayout,
                               QWidget)

import app.qt_compat  # noqa: F401  (PySide6 6.12 emit() reference fix; before any emit)
from app.chat_view import ChatView, footer_text
from app.composer import Composer, SystemPromptPanel
from app.controller import ChatController
from app.model_intake import IntakeDialog
from app.settings_dialog import SettingsDialog
from app.sidebar import Sidebar
from app.store import StoreError
from app.theme import Colors, app_icon, apply_theme, icon
from app.window_models import WindowModelsMixin, has_module

log = logging.getLogger(__name__)

STREAM_RENDER_MS = 1000


class MainWindow(WindowModelsMixin, QMainWindow):
    def __init__(self, controller: ChatController, parent: QWidget | None = None):
        super().__init__(parent)
        self.controller = controller
        self.store = controller.store
        self.colors: Colors | None = None
        self.intake_dialog: IntakeDialog | None = None
        self._models: list[dict] = []
        self._backends: dict | None = None
        self._streaming = None           # the MessageWidget of the reply being streamed
        self.load_default_model = False  # set at start when no model was named: load the library's default
        # Markdown of a streaming reply is rendered at most this often (whole paragraphs and
        # code blocks only); the rest streams in as plain text.
        self._render_timer = QTimer(self, interval=STREAM_RENDER_MS)
        self._render_timer.timeout.connect(self._render_streaming)
        self.setWindowTitle("Tern")
        self.setWindowIcon(app_icon())
        self.setAcceptDrops(True)
        self.resize(1180, 780)
        self._build()
        self._build_menus()
        self._connect()
        self.apply_theme(controller.settings.theme)
        QGuiApplication.styleHints().colorSchemeChanged.connect(self._system_scheme_changed)
        self.refresh_conversations()
        self._fill_model_picker()
        self.system_panel.set_presets(self.store.presets())
        controller.host.probe()
        controller.host.list_models()

    # -- layout -----------------------------------------------------------------------------

    def _build(self) -> None:
        root = QWidget()
        row = QHBoxLayout(root)
        row.setContentsMargins(0, 0, 0, 0)
        row.setSpacing(0)
        self.sidebar = Sidebar()
        row.addWidget(self.sidebar)
        main = QVBoxLayout()
        main.setSpacing(0)
        main.addWidget(self._build_header())
        main.addWidget(self._build_load_bar())
        self.system_panel = SystemPromptPanel()
        self.system_panel.setVisible(False)
        main.addWidget(self.system_panel)
        self.chat = ChatView()
        main.addWidget(self.chat, 1)
        bottom = QVBoxLayout()
        bottom.setContentsMargins(24, 6, 24, 10)
        bottom.setSpacing(4)
        composer_row = QHBoxLayout()
        composer_row.addStretch(0)
        self.composer = Composer()
        self.composer.setMaximumWidth(820)
        composer_row.addWidget(self.composer, 1)
        composer_row.addStretch(0)
        bottom.addLayout(composer_row)
        hint = QLabel("Tern runs entirely on this computer. Replies can be wrong — check what matters.",
                      objectName="composerHint")
        hint.setAlignment(Qt.AlignCenter)
        bottom.addWidget(hint)
        main.addLayout(bottom)
        row.addLayout(main, 1)
        self.setCentralWidget(root)
        self._build_status_bar()

    def _build_header(self) -> QWidget:
        header = QFrame(objectName="chatHeader")
        row = QHBoxLayout(header)
        row.setContentsMargins(24, 10, 16, 10)
        self.title_label = QLabel("New chat", objectName="chatTitle")
        row.addWidget(self.title_label, 1)
        self.model_picker = QComboBox(objectName="modelPicker")
        self.model_picker.setSizeAdjustPolicy(QComboBox.AdjustToContents)
        self.model_picker.activated.connect(self._model_picked)
        row.addWidget(self.model_picker)
        self.prompt_button = QToolButton(objectName="headerButton", text="System prompt")
        self.prompt_button.setCheckable(True)
        self.prompt_button.setToolButtonStyle(Qt.ToolButtonTextBesideIcon)
        self.prompt_button.toggled.connect(self.system_panel_visible)
        row.addWidget(self.prompt_button)
        self.settings_button = QToolButton(objectName="headerButton")
        self.settings_button.setToolTip("Settings")
        self.settings_button.clicked.connect(self.open_settings)
        row.addWidget(self.settings_button)
        return header

    def _build_load_bar(self) -> QWidget:
        self.load_bar = QFrame(objectName="loadBar")
        row = QHBoxLayout(self.load_bar)
        row.setContentsMargins(24, 6, 16, 6)
        self.load_label = QLabel("")
        row.addWidget(self.load_label)
        self.load_progress = QProgressBar()
        self.load_progress.setRange(0, 0)
        self.load_progress.setFixedWidth(220)
        row.addWidget(self.load_progress)
        row.addStretch(1)
        self.load_cancel = QPushButton("Cancel")
        self.load_cancel.clicked.connect(self._cancel_background_work)
        row.addWidget(self.load_cancel)
        self.load_bar.setVisible(False)
        return self.load_bar

    def _build_status_bar(self) -> None:
        bar = self.statusBar()
        self.status_model = QLabel("No model loaded")
        self.status_backend = QLabel("")
        self.status_speed = QLabel("")
        self.context_meter = QProgressBar(objectName="contextMeter")
        self.context_meter.setRange(0, 1)
        self.context_meter.setValue(0)
        self.status_context = QLabel("")
        self.context_meter.setVisible(False)        # until a model says how long its context is
        for widget in (self.status_model, self.status_backend, self.status_speed):
            bar.addWidget(widget)
        bar.addPermanentWidget(self.status_context)
        bar.addPermanentWidget(self.context_meter)

    def _build_menus(self) -> None:
        menu = self.menuBar().addMenu("&File")
        self._action(menu, "New chat", self.controller.new_conversation, QKeySequence.New)
        self._action(menu, "Open model…", self.open_model_file, QKeySequence.Open)
        menu.addSeparator()
        self._action(menu, "Import conversation…", self.import_conversation)
        self._action(menu, "Export conversation as Markdown…", lambda: self.export_current("md"))
        self._action(menu, "Export conversation as JSON…", lambda: self.export_current("json"))
        menu.addSeparator()
        self._action(menu, "Quit", self.close, QKeySequence.Quit)
        menu = self.menuBar().addMenu("&Chat")
        self._action(menu, "Stop", self.controller.stop, QKeySequence(Qt.Key_Escape))
        self._action(menu, "Regenerate last reply", self.controller.regenerate, QKeySequence("Ctrl+Shift+R"))
        self._action(menu, "System prompt", lambda: self.prompt_button.toggle(), QKeySequence("Ctrl+Shift+S"))
        menu = self.menuBar().addMenu("&Models")
        self._action(menu, "Open model file…", self.open_model_file)
        if has_module("app.download_dialog"):
            self._action(menu, "Download models…", self.open_downloads)
        if has_module("app.library_view"):
            self._action(menu, "Model library…", self.open_library)
        menu = self.menuBar().addMenu("&View")
        for key, label in (("system", "Follow system theme"), ("light", "Light theme"), ("dark", "Dark theme")):
            self._action(menu, label, lambda k=key: self._set_theme(k))
        self._action(self.menuBar().addMenu("&Settings"), "Settings…", self.open_settings, QKeySequence("Ctrl+,"))
        self._action(self.menuBar().addMenu("&Help"), "About Tern", self._about)

    def _action(self, menu, text: str, slot, shortcut=None) -> QAction:
        action = QAction(text, self)
        if shortcut is not None:
            action.setShortcut(shortcut)
        action.triggered.connect(lambda *_: slot())
        menu.addAction(action)
        return action

    # -- wiring -------------------------------------------------------------------------------

    def _connect(self) -> None:
        c = self.controller
        sb = self.sidebar
        sb.new_requested.connect(c.new_conversation)
        sb.conversation_selected.connect(c.open_conversation)
        sb.rename_requested.connect(self.rename_conversation)
        sb.delete_requested.connect(self.delete_conversation)
        sb.export_requested.connect(self.export_conversation)
        sb.import_requested.connect(self.import_conversation)
        sb.settings_requested.connect(self.open_settings)
        sb.search_changed.connect(lambda _: self.refresh_conversations())
        self.composer.send_requested.connect(self._send)
        self.composer.stop_requested.connect(c.stop)
        self.chat.edit_requested.connect(self.edit_message)
        self.chat.regenerate_requested.connect(c.regenerate)
        self.chat.download_requested.connect(self.open_downloads)
        self.chat.download_button.setVisible(has_module("app.download_dialog"))
        self.system_panel.prompt_changed.connect(c.set_system_prompt)
        self.system_panel.preset_saved.connect(self._save_preset)
        c.conversations_changed.connect(self.refresh_conversations)
        c.conversation_opened.connect(self.show_conversation)
        c.message_added.connect(self._message_added)
        c.reply_started.connect(self._reply_started)
        c.reply_delta.connect(self._reply_delta)
        c.reply_finished.connect(self._reply_finished)
        c.busy_changed.connect(self.composer.set_busy)
        c.notice.connect(lambda text: self.chat.add_notice(text, before=self._streaming))
        c.error.connect(lambda text: self.chat.add_notice(text, error=True))
        c.speed_changed.connect(lambda tps: self.status_speed.setText(f"{tps:.1f} tok/s"))
        c.context_changed.connect(self._show_context)
        c.model_loading.connect(self._model_loading)
        c.load_progress.connect(self._load_progress)
        c.model_loaded.connect(self._model_loaded)
        c.model_load_ended.connect(self._model_load_ended)
        c.file_inspected.connect(self._file_inspected)
        w = c.host.worker
        w.models_listed.connect(self._models_listed)
        w.backends.connect(self._backends_probed)
        w.copy_progress.connect(self._copy_progress)
        w.library_added.connect(self._library_added)
        w.library_failed.connect(self._library_failed)

    # -- conversations ------------------------------------------------------------------------

    def refresh_conversations(self) -> None:
        current = self.controller.conversation.id if self.controller.conversation else None
        self.sidebar.show_conversations(self.store.conversations(self.sidebar.search.text().strip()), current)

    def show_conversation(self, conversation, messages) -> None:
        self.chat.clear()
        self._streaming = None
        self.title_label.setText(conversation.title if conversation else "New chat")
        self.setWindowTitle(f"{conversation.title} — Tern" if conversation else "Tern")
        self.system_panel.set_prompt(conversation.system_prompt if conversation else "")
        for m in messages:
            self.chat.add_message(m.role, m.position, m.content, m.status, m.stats)
        self.chat.mark_last_regenerable()
        self.chat.scroll_to_bottom()
        self.refresh_conversations()

    def _send(self, text: str) -> None:
        if self.controller.send(text):
            self.composer.input.clear()

    def _message_added(self, message) -> None:
        conv = self.controller.conversation
        self.title_label.setText(conv.title)
        self.setWindowTitle(f"{conv.title} — Tern")
        self.chat.add_message(message.role, message.position, message.content)
        self.chat.mark_last_regenerable()
        self.chat.scroll_to_bottom()

    def _reply_started(self, reply) -> None:
        self.chat.assistant_title = self._model_title()
        self._streaming = self.chat.add_message("assistant", reply.position, "", "streaming")
        self._streaming.begin_stream()
        self._render_timer.start()

    def _render_streaming(self) -> None:
        if self._streaming is None:
            self._render_timer.stop()
        else:
            self._streaming.render_progress()

    def _reply_delta(self, text: str) -> None:
        if self._streaming is not None:
            self._streaming.append(text)

    def _reply_finished(self, message) -> None:
        self._render_timer.stop()
        widget, self._streaming = self._streaming, None
        current = self.controller.conversation
        if widget is None or current is None or message.conversation_id != current.id:
            return
        if not message.content.strip() and message.status != "complete":
            widget.deleteLater()
            self.chat.messages.remove(widget)
        else:
            widget.set_text(message.content)
            widget.set_footer(*footer_text(message.status, message.stats))
        self.chat.mark_last_regenerable()

    def edit_message(self, position: int) -> None:
        if self.controller.busy:
            return
        old = self.controller.messages[position].content
        text, ok = QInputDialog.getMultiLineText(self, "Edit message", "Edit and resend:", old)
        if not ok or not text.strip():
            return
        later = self.controller.later_messages(position)
        if later:
            answer = QMessageBox.question(
                self, "Resend from here?",
                f"Resending removes the {later} later message{'s' if later != 1 else ''} of this conversation.")
            if answer != QMessageBox.Yes:
                return
        self.controller.resend_from(position, text)

    def rename_conversation(self, conversation_id: int) -> None:
        title, ok = QInputDialog.getText(self, "Rename conversation", "Title:",
                                         text=self.store.conversation(conversation_id).title)
        if ok:
            self.controller.rename(conversation_id, title)
            if self.controller.conversation and self.controller.conversation.id == conversation_id:
                self.title_label.setText(self.controller.conversation.title)

    def delete_conversation(self, conversation_id: int) -> None:
        title = self.store.conversation(conversation_id).title
        if QMessageBox.question(self, "Delete conversation", f"Delete “{title}”? This cannot be undone.") \
                == QMessageBox.Yes:
            self.controller.delete(conversation_id)

    def export_current(self, fmt: str) -> None:
        if self.controller.conversation is not None:
            self.export_conversation(self.controller.conversation.id, fmt)

    def export_conversation(self, conversation_id: int, fmt: str) -> None:
        title = self.store.conversation(conversation_id).title
        safe = "".join(ch if ch.isalnum() or ch in " -_" else "_" for ch in title).strip() or "conversation"
        filters = "Markdown (*.md)" if fmt == "md" else "JSON (*.json)"
        path, _ = QFileDialog.getSaveFileName(self, "Export conversation", f"{safe}.{fmt}", filters)
        if not path:
            return
        try:
            data = self.store.export_markdown(conversation_id) if fmt == "md" else \
                json.dumps(self.store.export_json(conversation_id), ensure_ascii=False, indent=2)
            Path(path).write_text(data, encoding="utf-8")
        except OSError as exc:
            self.chat.add_notice(f"Could not write {path}: {exc.strerror}", error=True)

    def import_conversation(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Import conversation", "", "Tern conversation (*.json)")
        if not path:
            return
        try:
            conv = self.store.import_json(json.loads(Path(path).read_text(encoding="utf-8")))
        except (OSError, ValueError, StoreError) as exc:
            self.chat.add_notice(f"Could not import {Path(path).name}: {exc}", error=True)
            return
        self.controller.conversations_changed.emit()
        self.controller.open_conversation(conv.id)

    def _save_preset(self, name: str, text: str) -> None:
        self.store.save_preset(name, text)
        self.system_panel.set_presets(self.store.presets())

    def system_panel_visible(self, visible: bool) -> None:
        self.system_panel.setVisible(visible)
        if visible:
            self.system_panel.editor.setFocus()

    # -- settings and theme -----------------------------------------------------------------

    def open_settings(self) -> None:
        dialog = SettingsDialog(self.controller.settings, self._backends, self)
        dialog.accepted.connect(lambda: self.apply_settings(dialog.result_settings()))
        dialog.open()

    def apply_settings(self, settings) -> None:
        theme_changed = settings.theme != self.controller.settings.theme
        self.controller.apply_settings(settings)
        if theme_changed:
            self.apply_theme(settings.theme)

    def _set_theme(self, key: str) -> None:
        self.apply_settings(replace(self.controller.settings, theme=key))

    def _system_scheme_changed(self, *_) -> None:
        if self.controller.settings.theme == "system":
            self.apply_theme("system")

    def apply_theme(self, choice: str) -> None:
        self.colors = apply_theme(QApplication.instance(), choice)
        self.chat.colors = self.colors
        self.sidebar.set_colors(self.colors)
        self.composer.set_colors(self.colors)
        self.prompt_button.setIcon(icon("prompt", self.colors.muted, 18))
        self.settings_button.setIcon(icon("settings", self.colors.muted, 18))
        self.prompt_button.setIconSize(QSize(18, 18))
        self.settings_button.setIconSize(QSize(18, 18))
        if self.controller.conversation is not None and not self.controller.busy:
            self.show_conversation(self.controller.conversation, self.controller.messages)

    def _about(self) -> None:
        from engine import __version__
        QMessageBox.about(self, "About Tern",
                          f"<b>Tern {__version__}</b><br>Offline chat for ternary (1.58-bit) language models."
                          "<br>BitNet b1.58 runs on Tern's own engine; other GGUF models through llama.cpp.")

    def closeEvent(self, event) -> None:
        self.controller.shutdown()
        super().closeEvent(event)
