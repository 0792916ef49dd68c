"""The download dialog and the library window, offscreen, against the hub look-alike serving slowly:
the bar moves through several updates while the event loop keeps turning; pause, resume, cancel,
close-then-resume, a gated repository and its token; delete with confirmation."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import keyring.backend  # noqa: E402
import pytest  # noqa: E402
from PySide6.QtCore import Qt, QTimer  # noqa: E402
from PySide6.QtWidgets import QMessageBox  # noqa: E402

from app.download_dialog import BAR_STEPS, DownloadDialog, DownloadJob  # noqa: E402
from app.library_view import LibraryView  # noqa: E402
from engine.download import RetryPolicy, part_path  # noqa: E402
from engine.library import Library  # noqa: E402
from engine.secrets import TokenStore  # noqa: E402
from engine.testmodel import make_test_model  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from hub_server import HubServer, HubState, token_digest  # noqa: E402

REPO, FILE = "tern-test/tiny-ternary-gguf", "tiny-i2_s.gguf"
GATED = "tern-test/gated"
TOKEN = "hf_GuiTestTokenAbCdEfGh123456789"
FAST = RetryPolicy(backoff_base_s=0.05, stall_timeout_s=5.0)
CATALOGUE = [
    {"id": "tiny", "name": "Tiny test model", "default": True, "route": "gguf", "repo": REPO, "file": FILE,
     "format": "I2_S", "approx_size_bytes": 450_000, "license": "MIT", "training": "native", "notes": ""},
    {"id": "gated", "name": "Gated test model", "default": False, "route": "gguf", "repo": GATED, "file": FILE,
     "format": "I2_S", "approx_size_bytes": 450_000, "license": "MIT", "training": "native", "notes": ""},
]


class MemoryKeyring(keyring.backend.KeyringBackend):
    priority = 1

    def __init__(self):
        super().__init__()
        self.items = {}

    def get_password(self, service, username):
        return self.items.get((service, username))

    def set_password(self, service, username, password):
        self.items[(service, username)] = password

    def delete_password(self, service, username):
        self.items.pop((service, username), None)


@pytest.fixture(scope="module")
def gguf(tmp_path_factory) -> bytes:
    return make_test_model(tmp_path_factory.mktemp("m") / "t.gguf", "i2_s", "tiny", seed=9).read_bytes()


@pytest.fixture
def hub(gguf, tmp_path, monkeypatch):
    state = HubState(token_sha256={token_digest(TOKEN)})
    state.add_repo(REPO, {FILE: gguf})
    state.add_repo(GATED, {FILE: gguf}, gated=True)
    state.throttle_bps = 150_000                      # ~3 s for the file: many progress updates
    monkeypatch.setenv("TERN_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with HubServer(state) as srv:
        monkeypatch.setenv("HF_ENDPOINT", srv.url)
        yield state


@pytest.fixture
def dialog(qtbot, hub):
    d = DownloadDialog(library=Library(), tokens=TokenStore(backend=MemoryKeyring()), catalogue=CATALOGUE,
                       policy=FAST)
    qtbot.addWidget(d)
    d.show()
    yield d
    if d.running:
        d.job.control.cancel()
        d.job.thread.join(10)


def dest_of(file: str = FILE, repo: str = REPO) -> Path:
    return Library().path_for(repo, file)


def test_progress_bar_moves_and_the_window_stays_responsive(qtbot, dialog, hub, gguf):
    shown, ticks = [], []                                      # (phase, bar value) as the user saw it
    heartbeat = QTimer(interval=10)
    heartbeat.timeout.connect(lambda: ticks.append(time.monotonic()))
    heartbeat.start()
    with qtbot.waitSignal(dialog.installed, timeout=30_000) as done:
        qtbot.mouseClick(dialog.download_button, Qt.LeftButton)
        dialog.job.progress.connect(lambda *a: shown.append((a[4], dialog.bar.value())))
    heartbeat.stop()
    assert done.args[0]["quant"] == "I2_S" and dest_of().read_bytes() == gguf
    downloading = [v for phase, v in shown if phase == "downloading"]
    assert len(set(v for v in downloading if 0 < v < BAR_STEPS)) >= 5, shown   # several updates
    assert downloading == sorted(downloading) and downloading[-1] == BAR_STEPS
    assert [p for p, _ in shown].index("verifying") > [p for p, _ in shown].index("downloading")
    assert dialog.bar.value() == BAR_STEPS
    gaps = [b - a for a, b in zip(ticks, ticks[1:])]
    assert len(ticks) > 50 and max(gaps) < 0.5                 # the event loop never stalled
    assert "SHA-256 verified" in dialog.status.text()
    assert [e.id for e in Library().entries()] == [done.args[0]["id"]]


def test_byte_counts_above_2_gib_do_not_wrap(qtbot):
    job = DownloadJob(CATALOGUE[0], token=None, library=Library(Path("/nonexistent/index.json")))
    got = []
    job.progress.connect(lambda *args: got.append(args))
    job.progress.emit(5 * 2**30 + 7, 6 * 2**30, 1.5e6, 12.0, "downloading")
    assert got == [(5 * 2**30 + 7, 6 * 2**30, 1.5e6, 12.0, "downloading")]


def test_pause_resume_and_cancel(qtbot, dialog, hub):
    qtbot.mouseClick(dialog.download_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: dialog.bar.value() > 100, timeout=15_000)
    qtbot.mouseClick(dialog.pause_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: dialog.status.text().startswith("Paused"), timeout=5_000)
    held, on_disk = dialog.bar.value(), part_path(dest_of()).stat().st_size
    qtbot.wait(400)
    assert dialog.bar.value() == held and part_path(dest_of()).stat().st_size == on_disk
    assert dialog.pause_button.text() == "Resume"
    qtbot.mouseClick(dialog.pause_button, Qt.LeftButton)      # resume
    qtbot.waitUntil(lambda: dialog.bar.value() > held + 50, timeout=15_000)
    with qtbot.waitSignal(dialog.job.failed, timeout=10_000) as failed:
        qtbot.mouseClick(dialog.cancel_button, Qt.LeftButton)
    assert failed.args[0] == "cancelled"
    qtbot.waitUntil(lambda: not dialog.running, timeout=5_000)
    assert not part_path(dest_of()).exists() and not dest_of().exists()
    assert "cancelled" in dialog.status.text() and dialog.download_button.isEnabled()


def test_closing_stops_and_the_next_dialog_resumes(qtbot, dialog, hub, gguf):
    qtbot.mouseClick(dialog.download_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: dialog.bar.value() > 150, timeout=15_000)
    job = dialog.job
    dialog.reject()                                            # the window is closed mid-download
    job.thread.join(10)
    kept = part_path(dest_of()).stat().st_size
    assert 0 < kept < len(gguf)
    hub.throttle_bps = None
    again = DownloadDialog(library=Library(), catalogue=CATALOGUE, policy=FAST)
    qtbot.addWidget(again)
    assert again.download_button.text() == "Resume" and "resumes" in again.status.text()
    with qtbot.waitSignal(again.installed, timeout=30_000):
        qtbot.mouseClick(again.download_button, Qt.LeftButton)
    assert dest_of().read_bytes() == gguf
    assert hub.ranges(FILE)[-1] == f"bytes={kept}-"


def test_gated_model_asks_for_a_token_then_downloads(qtbot, dialog, hub):
    hub.throttle_bps = None
    dialog.choice.setCurrentIndex(1)
    qtbot.mouseClick(dialog.download_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: dialog.token_button.isVisible(), timeout=15_000)
    assert "accept the licence" in dialog.status.text() and TOKEN not in dialog.status.text()
    dialog.store_token(TOKEN, session_only=False)
    assert dialog.tokens.get() == TOKEN and not dialog.token_button.isVisible()
    with qtbot.waitSignal(dialog.installed, timeout=30_000):
        qtbot.mouseClick(dialog.download_button, Qt.LeftButton)
    assert dest_of(repo=GATED).is_file() and TOKEN not in dialog.status.text()


# ---- the library window -----------------------------------------------------------------------

def _click_in_confirmation(qtbot, view: LibraryView, button) -> None:
    qtbot.waitUntil(lambda: view.confirm_box is not None and view.confirm_box.isVisible(), timeout=5_000)
    qtbot.mouseClick(view.confirm_box.button(button), Qt.LeftButton)


def test_library_view_default_load_and_confirmed_delete(qtbot, tmp_path, monkeypatch, gguf):
    monkeypatch.setenv("TERN_HOME", str(tmp_path / "home"))
    library = Library()
    own = library.path_for("tern-test/own", "own.gguf")
    own.parent.mkdir(parents=True)
    own.write_bytes(gguf)
    theirs = tmp_path / "theirs.gguf"
    theirs.write_bytes(make_test_model(tmp_path / "b.gguf", "tq2_0", "tiny", seed=2).read_bytes())
    a = library.add(own, source="hf:tern-test/own/own.gguf@x")
    view = LibraryView(library=library)
    qtbot.addWidget(view)
    view.show()
    with qtbot.waitSignal(view.changed, timeout=15_000):
        view.add_file(str(theirs))                             # hashed off the GUI thread
    assert view.table.rowCount() == 2
    b = next(e for e in view.entries if e.id != a.id)
    assert view.table.item(0, 0).text() == "★" and b.quant == "TQ2_0"

    view.select_id(b.id)
    qtbot.mouseClick(view.default_button, Qt.LeftButton)
    assert library.default().id == b.id
    with qtbot.waitSignal(view.model_chosen) as chosen:
        qtbot.mouseClick(view.load_button, Qt.LeftButton)
    assert chosen.args == [b.path]

    view.select_id(a.id)
    qtbot.mouseClick(view.delete_button, Qt.LeftButton)
    _click_in_confirmation(qtbot, view, QMessageBox.Cancel)   # changed my mind
    assert own.exists() and len(library.entries()) == 2
    view.select_id(a.id)
    qtbot.mouseClick(view.delete_button, Qt.LeftButton)
    _click_in_confirmation(qtbot, view, QMessageBox.Yes)
    assert not own.exists() and [e.id for e in library.entries()] == [b.id]

    view.select_id(b.id)
    qtbot.mouseClick(view.delete_button, Qt.LeftButton)
    assert "stays where it is" in view.confirm_box.text()
    _click_in_confirmation(qtbot, view, QMessageBox.Yes)
    assert theirs.exists() and library.entries() == [] and view.table.rowCount() == 0
