"""A scripted run of the real window: load a model, send messages one after another, then save
a screenshot and quit. Used by `python -m app --screenshot …` and by the crash-safety tests
(which kill the process in the middle of a reply)."""
from __future__ import annotations

import logging

from PySide6.QtCore import QObject, QTimer
from PySide6.QtWidgets import QApplication

log = logging.getLogger(__name__)

SETTLE_MS = 400      # let the last layout and the Markdown rendering reach the screen


class ScriptedRun(QObject):
    def __init__(self, window, args):
        super().__init__(window)
        self.window, self.args = window, args
        self.controller = window.controller
        self.pending = list(args.message)
        self.exit_code = 0
        self._done = False

    def start(self) -> None:
        c = self.controller
        if self.args.conversation:
            c.open_conversation(self.args.conversation)
        elif self.pending:
            c.new_conversation(self.args.system or "")
        if self.args.system is not None and c.conversation is not None:
            c.set_system_prompt(self.args.system)
            self.window.system_panel.set_prompt(self.args.system)
            self.window.prompt_button.setChecked(True)        # show it in the screenshot
        c.model_load_ended.connect(self._loaded)
        c.reply_finished.connect(lambda *_: QTimer.singleShot(0, self._next))
        QTimer.singleShot(int(self.args.timeout * 1000), lambda: self._finish(3, "timed out"))
        if self.args.model:
            c.load_model(self.args.model)
        elif self.pending:
            self._finish(2, "--message needs --model")
        else:
            self._finish(0)

    def _loaded(self, ok: bool) -> None:
        if not ok:
            self._finish(2, "the model did not load")
            return
        self._next()

    def _next(self) -> None:
        if self._done:
            return
        if not self.pending:
            self._finish(0)
            return
        text = self.pending.pop(0)
        if not self.controller.send(text):
            self._finish(2, f"could not send {text!r}")

    def _finish(self, code: int, why: str = "") -> None:
        if self._done:
            return
        self._done = True
        self.exit_code = code
        if why:
            log.error("scripted run: %s", why)
        QTimer.singleShot(SETTLE_MS, self._save_and_quit)

    def _save_and_quit(self) -> None:
        if self.args.screenshot:
            self.window.chat.scroll_to_bottom()
            QApplication.processEvents()
            if not self.window.grab().save(str(self.args.screenshot)):
                log.error("could not save the screenshot to %s", self.args.screenshot)
                self.exit_code = self.exit_code or 4
        self.window.close()
        QApplication.instance().quit()
