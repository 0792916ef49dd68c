"""ChatController: the app's logic between the store, the engine worker and the window.

It lives on the GUI thread and never touches the engine: requests go to EngineHost, answers
come back as signals. The window only draws what the controller says and forwards user
actions to it, so the tests drive the controller and watch the window.
"""
from __future__ import annotations

import logging
import time
from dataclasses import replace

from PySide6.QtCore import QObject, Signal

import app.qt_compat  # noqa: F401  (PySide6 6.12 emit() reference fix; before any emit)
from app.settings import AppSettings
from app.store import Conversation, Store, StoredMessage, StoreError
from app.worker import EngineHost

log = logging.getLogger(__name__)

STREAM_SAVE_INTERVAL_S = 0.5      # a streaming reply reaches the disk at least this often
DEFAULT_TITLE = "New chat"
TITLE_CHARS = 48


class ChatController(QObject):
    conversations_changed = Signal()
    conversation_opened = Signal(object, object)     # Conversation, list[StoredMessage]
    message_added = Signal(object)                  # StoredMessage the user just sent
    reply_started = Signal(object)                  # StoredMessage (empty, 'streaming')
    reply_delta = Signal(str)
    reply_finished = Signal(object)                 # StoredMessage (final)
    busy_changed = Signal(bool)                     # a reply is being generated
    notice = Signal(str)                            # something the user should know, not an error
    error = Signal(str)
    speed_changed = Signal(float)                   # tokens/s of the reply being streamed
    context_changed = Signal(int, int)              # tokens used, context length
    model_loading = Signal(str)                     # path
    load_progress = Signal(float)                   # seconds
    model_loaded = Signal(object)                   # describe_session() dict
    model_load_ended = Signal(bool)                 # loaded?
    file_inspected = Signal(str, object, str)       # path, describe_info() dict or None, error

    def __init__(self, store: Store, host: EngineHost, settings: AppSettings, parent=None):
        super().__init__(parent)
        self.store, self.host, self.settings = store, host, settings
        self.conversation: Conversation | None = None
        self.messages: list[StoredMessage] = []
        self.model: dict | None = None
        self.loading_path: str | None = None
        self._request = 0                       # id of the running generation, 0 = idle
        self._reply: StoredMessage | None = None
        self._reply_text = ""
        self._reply_tokens = 0
        self._reply_started = 0.0
        self._last_save = 0.0
        self._save_failed = False
        w = host.worker
        w.tokens.connect(self._on_tokens)
        w.finished.connect(self._on_finished)
        w.failed.connect(self._on_failed)
        w.truncated.connect(self._on_truncated)
        w.loaded.connect(self._on_loaded)
        w.load_failed.connect(self._on_load_failed)
        w.load_cancelled.connect(self._on_load_cancelled)
        w.load_progress.connect(self.load_progress)
        w.inspected.connect(self.file_inspected)

    @property
    def busy(self) -> bool:
        return self._request != 0

    # -- conversations ----------------------------------------------------------------------

    def open_conversation(self, conversation_id: int) -> None:
        if self.busy:
            self.stop()
        self.conversation = self.store.conversation(conversation_id)
        self.messages = self.store.messages(conversation_id)
        self.conversation_opened.emit(self.conversation, list(self.messages))

    def new_conversation(self, system_prompt: str | None = None) -> Conversation:
        if system_prompt is None:
            system_prompt = self.store.settings().get("default_system_prompt", "")
        # An untouched "New chat" is reused rather than piling up empty conversations.
        empty = next((c for c in self.store.conversations() if c.title == DEFAULT_TITLE
                      and not self.store.messages(c.id)), None)
        if empty is not None:
            self.store.set_system_prompt(empty.id, system_prompt)
            conv = empty
        else:
            conv = self.store.create_conversation(DEFAULT_TITLE, system_prompt)
        self.conversations_changed.emit()
        self.open_conversation(conv.id)
        return conv

    def rename(self, conversation_id: int, title: str) -> None:
        self.store.rename_conversation(conversation_id, title)
        if self.conversation and self.conversation.id == conversation_id:
            self.conversation = self.store.conversation(conversation_id)
        self.conversations_changed.emit()

    def delete(self, conversation_id: int) -> None:
        if self.conversation and self.conversation.id == conversation_id:
            if self.busy:
                self.stop()
            self.conversation, self.messages = None, []
            self.conversation_opened.emit(None, [])
        self.store.delete_conversation(conversation_id)
        self.conversations_changed.emit()

    def set_system_prompt(self, text: str) -> None:
        """Applies from the next reply."""
        if self.conversation is None:
            self.new_conversation(text)
            return
        self.store.set_system_prompt(self.conversation.id, text)
        self.conversation = self.store.conversation(self.conversation.id)

    # -- chatting -----------------------------------------------------------------------------

    def send(self, text: str) -> bool:
        text = text.strip()
        if not text or self.busy:
            return False
        if self.model is None:
            self.error.emit("No model is loaded yet. Pick one at the top, or drop a .gguf file on the window.")
            return False
        if self.conversation is None:
            self.new_conversation()
        if self.conversation.title == DEFAULT_TITLE and not self.messages:
            first_line = text.splitlines()[0]
            title = first_line if len(first_line) <= TITLE_CHARS else first_line[:TITLE_CHARS - 1] + "…"
            self.rename(self.conversation.id, title)
        try:
            self.messages.append(self.store.add_message(self.conversation.id, "user", text))
        except StoreError as exc:
            self.error.emit(f"Your message could not be saved, so it was not sent. {exc}")
            return False
        self.message_added.emit(self.messages[-1])
        return self._start_reply()

    def stop(self) -> None:
        if self.busy:
            self.host.stop()

    def regenerate(self) -> bool:
        """Replace the last reply with a new one."""
        if self.busy or self.model is None or not self.messages:
            return False
        if self.messages[-1].role == "assistant":
            self._truncate(len(self.messages) - 1)
        if not self.messages or self.messages[-1].role != "user":
            return False
        self.conversation_opened.emit(self.conversation, list(self.messages))
        return self._start_reply()

    def resend_from(self, position: int, text: str) -> bool:
        """Replace the user message at `position` with `text`, drop everything after it, and
        answer again. (The window asks for confirmation before calling this.)"""
        if self.busy or self.model is None or not text.strip():
            return False
        if not 0 <= position < len(self.messages) or self.messages[position].role != "user":
            return False
        self._truncate(position)
        self.messages.append(self.store.add_message(self.conversation.id, "user", text.strip()))
        self.conversation_opened.emit(self.conversation, list(self.messages))
        return self._start_reply()

    def later_messages(self, position: int) -> int:
        return max(0, len(self.messages) - position - 1)

    def _truncate(self, keep: int) -> None:
        self.store.truncate_messages(self.conversation.id, keep)
        self.messages = self.messages[:keep]

    def _history(self) -> list[tuple[str, str]]:
        """The conversation as the engine gets it: empty replies (stopped before any token)
        are left out; partial ones (stopped, interrupted) are kept as they were shown."""
        return [(m.role, m.content) for m in self.messages if m.content.strip()]

    def _start_reply(self) -> bool:
        s = self.settings
        try:
            self._reply = self.store.add_message(self.conversation.id, "assistant", "", status="streaming")
        except StoreError as exc:
            self.error.emit(f"The reply could not be started: {exc}")
            return False
        self._save_failed = False
        self._reply_text, self._reply_tokens = "", 0
        self._reply_started = self._last_save = time.monotonic()
        self._request = self.host.generate(self._history(), self.conversation.system_prompt,
                                           s.sampler_params(), s.max_tokens)
        self.reply_started.emit(self._reply)
        self.busy_changed.emit(True)
        return True

    # -- answers from the worker --------------------------------------------------------------

    def _on_tokens(self, request_id: int, text: str, count: int) -> None:
        if request_id != self._request:
            return
        self._reply_text += text
        self._reply_tokens += count
        self.reply_delta.emit(text)
        now = time.monotonic()
        if now - self._reply_started > 0.2:
            self.speed_changed.emit(self._reply_tokens / (now - self._reply_started))
        if now - self._last_save >= STREAM_SAVE_INTERVAL_S:
            self._last_save = now
            try:
                self.store.update_message(self._reply.id, self._reply_text)
            except StoreError as exc:
                if not self._save_failed:     # say it once per reply; the text stays on screen
                    self._save_failed = True
                    self.error.emit(f"The reply is not being saved: {exc}")

    def _on_finished(self, request_id: int, stats: dict) -> None:
        if request_id != self._request:
            return
        text = stats.get("text", self._reply_text) or self._reply_text
        status = "stopped" if stats.get("cancelled") else "complete"
        keep = {k: stats[k] for k in ("prompt_tokens", "prefilled_tokens", "reused_tokens", "generated",
                                      "prefill_tps", "decode_tps", "stop_reason", "dropped_messages")
                if k in stats}
        self._complete_reply(text, status, keep)
        if stats.get("decode_tps"):
            self.speed_changed.emit(stats["decode_tps"])
        self.context_changed.emit(int(stats.get("n_past", 0)), int(stats.get("n_ctx", 0)))

    def _on_failed(self, request_id: int, message: str) -> None:
        if request_id != self._request:
            return
        self._complete_reply(self._reply_text, "stopped", {"error": message})
        self.error.emit(message)

    def _on_truncated(self, request_id: int, dropped: int) -> None:
        if request_id != self._request:
            return
        n_ctx = self.model["n_ctx"] if self.model else 0
        self.notice.emit(f"This conversation no longer fits in the context of {n_ctx} tokens: the oldest "
                         f"{dropped} message{'s' if dropped != 1 else ''} were left out of this reply "
                         f"(the system prompt is always kept).")

    def _complete_reply(self, text: str, status: str, stats: dict) -> None:
        reply, self._reply, self._request = self._reply, None, 0
        try:
            if not text.strip() and status != "complete":
                # Stopped before the first token: nothing worth keeping.
                self.store.truncate_messages(reply.conversation_id, reply.position)
            else:
                self.store.update_message(reply.id, text, status, stats)
        except StoreError as exc:
            self.error.emit(f"The reply could not be saved: {exc}")
        if not text.strip() and status != "complete":
            final = StoredMessage(reply.id, reply.conversation_id, reply.position, "assistant", "", status, stats)
        else:
            final = StoredMessage(reply.id, reply.conversation_id, reply.position, "assistant", text, status, stats)
            if self.conversation and reply.conversation_id == self.conversation.id:
                self.messages.append(final)
        self.reply_finished.emit(final)
        self.busy_changed.emit(False)
        self.conversations_changed.emit()

    def shutdown(self) -> None:
        """The window closes: keep a reply being streamed as 'stopped' (not 'interrupted'), then
        end the engine thread."""
        if self._reply is not None:
            try:
                self.store.update_message(self._reply.id, self._reply_text, "stopped")
            except StoreError:
                log.exception("could not save the reply being streamed at shutdown")
            self._reply, self._request = None, 0
        self.host.shutdown()

    # -- models -----------------------------------------------------------------------------

    def load_model(self, path: str) -> None:
        if self.busy:
            self.stop()
        self.loading_path = path
        self.model = None
        self.model_loading.emit(path)
        self.host.load(path, self.settings.load_options())

    def cancel_load(self) -> None:
        self.host.cancel_load()

    def inspect(self, path: str) -> None:
        self.host.inspect(path)

    def _on_loaded(self, info: dict) -> None:
        self.model, self.loading_path = info, None
        if self.settings.last_model != info["path"]:
            self.settings = replace(self.settings, last_model=info["path"])
            self.store.save_settings({"last_model": info["path"]})
        self.model_loaded.emit(info)
        self.model_load_ended.emit(True)
        self.context_changed.emit(0, info["n_ctx"])

    def _on_load_failed(self, message: str) -> None:
        self.loading_path = None
        self.error.emit(message)
        self.model_load_ended.emit(False)

    def _on_load_cancelled(self) -> None:
        self.loading_path = None
        self.notice.emit("Model loading was cancelled.")
        self.model_load_ended.emit(False)

    def apply_settings(self, settings: AppSettings) -> None:
        """Save; reload the model when a setting it was opened with changed."""
        reload = self.model is not None and settings.load_options() != self.settings.load_options()
        self.settings = settings
        self.store.save_settings(settings.to_dict())
        if reload:
            self.load_model(self.model["path"])
