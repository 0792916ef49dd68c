"""The real app, assembled for tests: a Store in a temporary TERN_HOME, the engine worker thread,
the controller and the main window (offscreen), tiny generated models on the reference backend.

No test lives here; the test_app_* modules import these fixtures."""
from __future__ import annotations

import gc
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from app.settings import AppSettings

# Greedy and short, so replies are fast and the same every time.
TEST_SETTINGS = AppSettings(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=1.0, seed=1,
                            max_tokens=48, n_ctx=512, threads=1, backend="reference", theme="light")


@dataclass
class AppUnderTest:
    home: Path
    store: object
    host: object
    controller: object
    window: object

    @property
    def worker(self):
        return self.host.worker

    def load(self, qtbot, path, timeout: int = 30000) -> None:
        with qtbot.waitSignal(self.controller.model_load_ended, timeout=timeout) as blocker:
            self.controller.load_model(str(path))
        assert blocker.args == [True], "the model did not load"

    def send(self, qtbot, text: str, timeout: int = 30000):
        """Send through the window's composer (as a user would) and wait for the whole reply."""
        with qtbot.waitSignal(self.controller.reply_finished, timeout=timeout) as blocker:
            self.window.composer.input.setPlainText(text)
            self.window.composer.send_button.click()
        return blocker.args[0]

    def close(self) -> None:
        self.window.close()
        self.store.close()


def build_app(qtbot, home: Path, settings: AppSettings | None = None) -> AppUnderTest:
    from app.controller import ChatController
    from app.main_window import MainWindow
    from app.store import Store
    from app.worker import EngineHost

    store = Store(home / "data" / "tern.sqlite3")
    if not store.settings() or settings is not None:
        store.save_settings((settings or TEST_SETTINGS).to_dict())
    chosen = AppSettings.from_dict(store.settings())
    host = EngineHost()
    controller = ChatController(store, host, chosen)
    window = MainWindow(controller)
    qtbot.addWidget(window)
    window.resize(1100, 760)
    window.show()
    return AppUnderTest(home, store, host, controller, window)


@pytest.fixture
def tern_home(tmp_path, monkeypatch, kernels_verdict) -> Path:
    """A user's home after the first start: it holds the kernel self-test's verdict (conftest)."""
    home = tmp_path / "home"
    monkeypatch.setenv("TERN_HOME", str(home))
    (home / "data").mkdir(parents=True)
    shutil.copy(kernels_verdict, home / "data" / "selftest.json")
    return home


@pytest.fixture
def tern_app(qtbot, tern_home):
    app = build_app(qtbot, tern_home)
    yield app
    app.close()
    # The test's Qt wrappers are freed here, on the GUI thread: left to a later collection they
    # may be freed on the engine's worker thread, which PySide does not survive.
    del app
    gc.collect()


@pytest.fixture(scope="session")
def bitnet_path(tiny_model_path):
    """A tiny random BitNet b1.58 model (I2_S) with the small byte vocabulary."""
    return tiny_model_path("i2_s", seed=1, tokenizer=False)


class GapMeter:
    """Records the longest gap between ticks of a 5 ms QTimer: how long the GUI event loop was
    kept from running."""

    def __init__(self, interval_ms: int = 5):
        from PySide6.QtCore import QTimer
        self.max_gap = 0.0
        self.ticks = 0
        self._last = None
        self._timer = QTimer()
        self._timer.setInterval(interval_ms)
        self._timer.timeout.connect(self._tick)

    def _tick(self) -> None:
        now = time.perf_counter()
        if self._last is not None:
            self.max_gap = max(self.max_gap, now - self._last)
        self._last = now
        self.ticks += 1

    def start(self) -> None:
        self._last = None
        self._timer.start()

    def stop(self) -> None:
        self._timer.stop()


def with_settings(**changes) -> AppSettings:
    return replace(TEST_SETTINGS, **changes)
