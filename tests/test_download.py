"""Downloads against a hub look-alike on 127.0.0.1 (tests/hub_server.py): real sockets, real bytes.

Covers: a verified download, corrupted bytes rejected and never moved into place, a cut
connection resumed, the server killed and restarted (resume from the .part, asserted on the
Range header the server received), pause / quit / reopen / resume, stalls, 5xx back-off, cancel,
a stale partial file, and the free-space check before any byte.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from engine import hub
from engine.download import (
    DownloadControl,
    DownloadStopped,
    RetryPolicy,
    TerminalProgressBar,
    download_file,
    part_path,
)
from engine.errors import CancelledError, ChecksumError, DiskSpaceError, DownloadError
from engine.testmodel import make_test_model

sys.path.insert(0, str(Path(__file__).parent))
from hub_server import HubServer, HubState  # noqa: E402

REPO = "tern-test/tiny-ternary"
FAST = RetryPolicy(backoff_base_s=0.05, backoff_max_s=0.2, stall_timeout_s=5.0, connect_timeout_s=2.0)


def payload(n: int, seed: int = 7) -> bytes:
    out, block = bytearray(), hashlib.sha256(str(seed).encode()).digest()
    while len(out) < n:
        block = hashlib.sha256(block).digest()
        out += block * 64
    return bytes(out[:n])


@pytest.fixture
def state():
    st = HubState()
    st.add_repo(REPO, {"model.gguf": payload(3_000_000), "config.json": b'{"model_type": "bitnet"}\n'})
    return st


@pytest.fixture
def server(state, monkeypatch, tmp_path):
    with HubServer(state) as srv:
        monkeypatch.setenv("HF_ENDPOINT", srv.url)
        monkeypatch.setenv("TERN_HOME", str(tmp_path / "home"))
        yield srv


def wait_for(predicate, timeout=20.0, interval=0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


def file_size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def test_download_completes_and_is_verified(server, state, tmp_path):
    events = []
    remote = hub.remote_file(REPO, "model.gguf")
    assert remote.sha256 == hashlib.sha256(state.repos[REPO].files["model.gguf"]).hexdigest()
    dest = download_file(remote, tmp_path / "m" / "model.gguf", progress=events.append, policy=FAST)
    assert dest.read_bytes() == state.repos[REPO].files["model.gguf"]
    assert sorted(os.listdir(dest.parent)) == ["model.gguf"]      # no .part, no sidecar left
    assert state.ranges("model.gguf") == ["bytes=0-"]
    phases = [e.phase for e in events]
    assert phases[-1] == "done"
    assert phases.index("verifying") > max(i for i, p in enumerate(phases) if p == "downloading")
    assert all(e.total == remote.size for e in events)
    assert max(e.done for e in events if e.phase == "downloading") == remote.size


def test_small_git_file_is_verified_by_its_blob_id(server, state, tmp_path):
    remote = hub.remote_file(REPO, "config.json")
    assert remote.sha256 is None and remote.git_oid
    dest = download_file(remote, tmp_path / "config.json", policy=FAST)
    assert dest.read_bytes() == state.repos[REPO].files["config.json"]


def test_corrupted_bytes_are_rejected_and_never_moved_into_place(server, state, tmp_path):
    state.corrupt.add(f"{REPO}/model.gguf")
    dest = tmp_path / "m" / "model.gguf"
    with pytest.raises(ChecksumError, match="checksum mismatch"):
        download_file(hub.remote_file(REPO, "model.gguf"), dest, policy=FAST)
    assert not dest.exists()
    assert not part_path(dest).exists()        # a damaged part would only resume into the same failure
    assert os.listdir(dest.parent) == []


def test_cut_connection_resumes_from_the_partial_file(server, state, tmp_path):
    state.cut_after, state.cuts_left = 1_200_000, 1
    dest = download_file(hub.remote_file(REPO, "model.gguf"), tmp_path / "model.gguf", policy=FAST)
    assert dest.read_bytes() == state.repos[REPO].files["model.gguf"]
    ranges = state.ranges("model.gguf")
    assert len(ranges) == 2 and ranges[0] == "bytes=0-"
    resumed_at = int(ranges[1].removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed_at <= 1_200_000


def test_stalled_connection_is_dropped_and_resumed(server, state, tmp_path):
    state.stall_after, state.stall_s, state.stalls_left = 1_000_000, 3.0, 1
    policy = RetryPolicy(backoff_base_s=0.05, stall_timeout_s=0.5, connect_timeout_s=2.0)
    events = []
    t0 = time.monotonic()
    dest = download_file(hub.remote_file(REPO, "model.gguf"), tmp_path / "model.gguf",
                         policy=policy, progress=events.append)
    assert time.monotonic() - t0 < 3.0          # did not sit out the server's 3 s silence
    assert dest.read_bytes() == state.repos[REPO].files["model.gguf"]
    assert any(e.phase == "retrying" and "stalled" in e.note for e in events)
    assert state.ranges("model.gguf")[1] != "bytes=0-"


def test_server_errors_are_retried_with_backoff(server, state, tmp_path):
    state.fail_status, state.fails_left = 503, 2
    dest = download_file(hub.remote_file(REPO, "model.gguf"), tmp_path / "model.gguf", policy=FAST)
    assert dest.read_bytes() == state.repos[REPO].files["model.gguf"]
    assert len(state.ranges("model.gguf")) == 3


def test_retries_are_bounded_and_keep_the_partial_file(server, state, tmp_path):
    remote = hub.remote_file(REPO, "model.gguf")
    state.cut_after, state.cuts_left = 500_000, 1
    state.fail_status = 503

    def fail_from_now_on(event):               # once bytes arrive, every later GET answers 503
        if event.done > 0:
            state.fails_left = 100

    dest = tmp_path / "model.gguf"
    with pytest.raises(DownloadError, match="gave up after 4 failed attempts, 3 of them in a row"):
        download_file(remote, dest, progress=fail_from_now_on,
                      policy=RetryPolicy(max_failures=3, backoff_base_s=0.01))
    assert 0 < file_size(part_path(dest)) < remote.size
    assert len(state.ranges("model.gguf")) == 4


def test_not_enough_space_is_refused_before_any_byte(server, state, tmp_path):
    remote = hub.remote_file(REPO, "model.gguf")
    dest = tmp_path / "m" / "model.gguf"
    asked = []

    def tiny_disk(path):
        asked.append(Path(path))
        return 1_000_000

    with pytest.raises(DiskSpaceError, match="not enough free disk space"):
        download_file(remote, dest, policy=FAST, free_space=tiny_disk)
    assert asked
    assert state.ranges("model.gguf") == []
    assert not dest.parent.exists() or os.listdir(dest.parent) == []


def test_cancel_deletes_the_partial_file(server, state, tmp_path):
    state.throttle_bps = 1_000_000
    dest = tmp_path / "model.gguf"
    control = DownloadControl()
    errors = []

    def run():
        try:
            download_file(hub.remote_file(REPO, "model.gguf"), dest, control=control, policy=FAST)
        except CancelledError as exc:
            errors.append(exc)

    worker = threading.Thread(target=run)
    worker.start()
    assert wait_for(lambda: file_size(part_path(dest)) > 200_000)
    control.cancel()
    worker.join(10)
    assert not worker.is_alive() and errors and not isinstance(errors[0], DownloadStopped)
    assert not part_path(dest).exists() and not dest.exists()


def test_pause_quit_reopen_resume(server, state, tmp_path):
    state.throttle_bps = 1_500_000
    dest = tmp_path / "model.gguf"
    control, events, outcome = DownloadControl(), [], []

    def run():
        try:
            download_file(hub.remote_file(REPO, "model.gguf"), dest, control=control,
                          progress=events.append, policy=FAST)
        except DownloadStopped as exc:
            outcome.append(exc)

    worker = threading.Thread(target=run)
    worker.start()
    assert wait_for(lambda: file_size(part_path(dest)) > 300_000)
    control.pause()
    assert wait_for(lambda: any(e.phase == "paused" for e in events))
    paused_at = file_size(part_path(dest))
    time.sleep(0.4)
    assert file_size(part_path(dest)) == paused_at                       # nothing arrives while paused
    control.stop()                                                       # "quit" the app
    worker.join(10)
    assert not worker.is_alive() and outcome
    control = worker = None                                              # drop the downloader objects
    assert 0 < paused_at < len(state.repos[REPO].files["model.gguf"])

    state.throttle_bps = None
    reopened = download_file(hub.remote_file(REPO, "model.gguf"), dest, policy=FAST)  # "reopen"
    assert reopened.read_bytes() == state.repos[REPO].files["model.gguf"]
    assert state.ranges("model.gguf")[-1] == f"bytes={paused_at}-"


def test_a_partial_file_of_another_file_is_not_resumed(server, state, tmp_path):
    remote = hub.remote_file(REPO, "model.gguf")
    dest = tmp_path / "model.gguf"
    part_path(dest).write_bytes(b"x" * 1000)
    part_path(dest).with_name(dest.name + ".part.json").write_text(json.dumps({"sha256": "0" * 64}))
    download_file(remote, dest, policy=FAST)
    assert dest.read_bytes() == state.repos[REPO].files["model.gguf"]
    assert state.ranges("model.gguf") == ["bytes=0-"]


# ---- the server really killed, then restarted -------------------------------------------------

def start_hub_process(spec: Path, log: Path, port: int = 0, throttle: int | None = None):
    port_file = spec.with_name(f"port-{time.monotonic_ns()}.txt")
    cmd = [sys.executable, str(Path(__file__).parent / "hub_server.py"), "--spec", str(spec),
           "--port", str(port), "--port-file", str(port_file), "--log", str(log)]
    if throttle:
        cmd += ["--throttle", str(throttle)]
    proc = subprocess.Popen(cmd)
    assert wait_for(port_file.exists, timeout=15), "hub server process did not start"
    return proc, int(port_file.read_text())


def logged_ranges(log: Path) -> list[str | None]:
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    return [r["range"] for r in rows if r["method"] == "GET" and "/resolve/" in r["path"]]


def test_server_killed_then_restarted_resumes_from_the_part(tmp_path, monkeypatch):
    data = payload(4_000_000, seed=3)
    repo_dir = tmp_path / "repo"
    repo_dir.mkdir()
    (repo_dir / "model.gguf").write_bytes(data)
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"repos": [{"id": REPO, "dir": str(repo_dir)}]}))
    log = tmp_path / "requests.jsonl"
    proc, port = start_hub_process(spec, log, throttle=1_000_000)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    dest = tmp_path / "models" / "model.gguf"
    remote = hub.remote_file(REPO, "model.gguf")
    failure = []

    def run():
        try:
            download_file(remote, dest, policy=RetryPolicy(max_failures=2, backoff_base_s=0.05,
                                                           stall_timeout_s=2.0, connect_timeout_s=1.0))
        except DownloadError as exc:
            failure.append(exc)

    worker = threading.Thread(target=run)
    try:
        worker.start()
        assert wait_for(lambda: file_size(part_path(dest)) > 1_000_000)
        proc.send_signal(signal.SIGKILL)                  # the server dies mid-transfer
        proc.wait(10)
        worker.join(20)
        assert not worker.is_alive() and failure, "the download should give up while the server is down"
        kept = file_size(part_path(dest))
        assert 1_000_000 < kept < len(data)

        proc, port2 = start_hub_process(spec, log, port=port)
        assert port2 == port
        download_file(hub.remote_file(REPO, "model.gguf"), dest, policy=FAST)
        assert dest.read_bytes() == data
        assert logged_ranges(log)[0] == "bytes=0-"
        assert logged_ranges(log)[-1] == f"bytes={kept}-"
    finally:
        proc.kill()
        proc.wait(10)


def test_terminal_progress_bar_shows_bytes(server, state, tmp_path):
    out = io.StringIO()
    bar = TerminalProgressBar("model.gguf", file=out, mininterval=0)
    download_file(hub.remote_file(REPO, "model.gguf"), tmp_path / "model.gguf", progress=bar, policy=FAST)
    bar.close()
    assert bar.n == bar.total == 3_000_000
    assert "model.gguf" in out.getvalue() and "2.86M" in out.getvalue()


# ---- the command line: Ctrl-C, a killed process, and the resume ---------------------------------

# `python -m engine download ARGS`, with Ctrl-C raising KeyboardInterrupt as in a terminal: a
# shell starts background jobs with SIGINT ignored, and an ignored signal stays ignored across
# exec, so a CI run started in the background would otherwise send a Ctrl-C nobody hears.
CLI_WITH_CTRL_C = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
                   "sys.argv[0] = 'engine'; runpy.run_module('engine', run_name='__main__', alter_sys=True)")


def run_cli(args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CLI_WITH_CTRL_C, "download", *args], env=env,
                            cwd=Path(__file__).parent.parent, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_cli_ctrl_c_and_kill_leave_a_part_that_the_next_run_resumes(server, state, tmp_path):
    data = make_test_model(tmp_path / "tiny.gguf", "i2_s", "tiny", seed=2).read_bytes()   # ~450 kB
    state.add_repo(REPO, {"model.gguf": data})
    state.throttle_bps = 60_000
    env = {**os.environ, "HF_ENDPOINT": server.url, "TERN_HOME": str(tmp_path / "home"),
           "PYTHON_KEYRING_BACKEND": "keyring.backends.null.Keyring"}
    part = tmp_path / "home" / "data" / "models" / "tern-test" / "tiny-ternary" / "model.gguf.part"

    proc = run_cli([REPO, "model.gguf"], env)
    assert wait_for(lambda: file_size(part) > 100_000, timeout=30)
    proc.send_signal(signal.SIGINT)                          # Ctrl-C
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 130 and "run the same command again to resume" in err
    after_ctrl_c = file_size(part)
    assert 100_000 < after_ctrl_c < len(data)

    proc = run_cli([REPO, "model.gguf"], env)
    assert wait_for(lambda: file_size(part) > after_ctrl_c + 60_000, timeout=30)
    proc.kill()                                              # the process dies without a word
    proc.communicate(timeout=20)
    after_kill = file_size(part)
    assert state.ranges("model.gguf")[1] == f"bytes={after_ctrl_c}-"

    state.throttle_bps = None
    proc = run_cli([REPO, "model.gguf"], env)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert state.ranges("model.gguf")[-1] == f"bytes={after_kill}-"
    assert part.with_name("model.gguf").read_bytes() == data
    assert not part.exists()
    assert "I2_S" in err                                     # it is in the library now


def test_two_writers_never_share_a_partial_file(server, state, tmp_path):
    state.throttle_bps = 1_000_000
    dest = tmp_path / "model.gguf"
    remote = hub.remote_file(REPO, "model.gguf")
    control = DownloadControl()
    worker = threading.Thread(target=lambda: download_file(remote, dest, control=control, policy=FAST))
    worker.start()
    try:
        assert wait_for(lambda: file_size(part_path(dest)) > 100_000)
        with pytest.raises(DownloadError, match="being downloaded by another Tern"):
            download_file(remote, dest, policy=FAST)
        assert state.ranges("model.gguf") == ["bytes=0-"]          # the second one sent nothing
    finally:
        state.throttle_bps = None
        worker.join(20)
    assert dest.read_bytes() == state.repos[REPO].files["model.gguf"]
    assert sorted(os.listdir(tmp_path)) == ["model.gguf"]         # lock file gone too


def test_redirect_to_a_cdn_keeps_the_token_home(state, monkeypatch, tmp_path):
    """The hub answers LFS resolves with 302 to a CDN on another origin: the download follows
    it, resumes there with Range, and the Authorization header is not sent to the CDN."""
    token = "hf_CdnTestTokenXXXXXXXXXXXXXXXXXXXX"
    cdn_state = HubState()
    cdn_state.add_repo(REPO, state.repos[REPO].files)
    cdn_state.cut_after, cdn_state.cuts_left = 1_000_000, 1
    with HubServer(cdn_state) as cdn, HubServer(state) as srv:
        state.cdn_url = cdn.url
        monkeypatch.setenv("HF_ENDPOINT", srv.url)
        remote = hub.remote_file(REPO, "model.gguf", token=token)
        assert remote.size == 3_000_000 and remote.sha256
        dest = download_file(remote, tmp_path / "model.gguf", token=token, policy=FAST)
    assert dest.read_bytes() == state.repos[REPO].files["model.gguf"]
    hub_gets = [r for r in state.requests if r["method"] == "GET" and "/resolve/" in r["path"]]
    assert hub_gets and all(r["auth"] == "invalid" for r in hub_gets)   # sent to the hub (unknown there)
    cdn_gets = [r for r in cdn_state.requests if r["method"] == "GET"]
    assert len(cdn_gets) == 2 and all(r["auth"] == "none" for r in cdn_gets)
    assert cdn_gets[1]["range"] != "bytes=0-"


def test_an_expired_cdn_link_is_fetched_again_from_the_hub(state, monkeypatch, tmp_path):
    cdn_state = HubState()
    cdn_state.add_repo(REPO, state.repos[REPO].files)
    cdn_state.fail_status, cdn_state.fails_left = 403, 1          # S3: "Request has expired"
    with HubServer(cdn_state) as cdn, HubServer(state) as srv:
        state.cdn_url = cdn.url
        monkeypatch.setenv("HF_ENDPOINT", srv.url)
        dest = download_file(hub.remote_file(REPO, "model.gguf"), tmp_path / "model.gguf", policy=FAST)
    assert dest.read_bytes() == state.repos[REPO].files["model.gguf"]
    assert len(state.ranges("model.gguf")) == 2                   # the hub was asked twice


def test_an_unreachable_or_wrong_endpoint_gives_a_clear_error(monkeypatch, tmp_path):
    import socket
    from http.server import BaseHTTPRequestHandler, HTTPServer

    with socket.socket() as s:                      # a port with nobody listening
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port}")
    with pytest.raises(DownloadError, match="cannot reach .* check the network or HF_ENDPOINT"):
        hub.remote_file(REPO, "model.gguf")

    class LoginPage(BaseHTTPRequestHandler):        # what a captive portal answers to everything
        def do_GET(self):
            body = b"<html>please log in to the hotel wifi</html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    portal = HTTPServer(("127.0.0.1", 0), LoginPage)
    threading.Thread(target=portal.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{portal.server_address[1]}")
        with pytest.raises(DownloadError, match="did not answer like a Hugging Face hub"):
            hub.remote_file(REPO, "model.gguf")
    finally:
        portal.shutdown()
        portal.server_close()


CHILD_WITH_FILE_SIZE_LIMIT = """
import resource, signal, sys
from pathlib import Path
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)       # over-limit writes fail with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, 1_000_000))
from engine import hub
from engine.download import RetryPolicy, download_file
try:
    download_file(hub.remote_file(sys.argv[1], "model.gguf"), Path(sys.argv[2]), policy=RetryPolicy(max_failures=2))
except Exception as exc:
    print(type(exc).__name__, exc)
"""


def test_a_refused_write_is_a_typed_error_and_keeps_the_part(server, state, tmp_path):
    dest = tmp_path / "model.gguf"
    result = subprocess.run([sys.executable, "-c", CHILD_WITH_FILE_SIZE_LIMIT, REPO, str(dest)],
                            cwd=Path(__file__).parent.parent, capture_output=True, text=True, timeout=60,
                            env={**os.environ, "HF_ENDPOINT": server.url})
    assert result.stdout.startswith("DownloadError cannot write"), result.stdout + result.stderr
    assert "the partial file is kept" in result.stdout
    kept = file_size(part_path(dest))
    assert 0 < kept <= 1_000_000
    download_file(hub.remote_file(REPO, "model.gguf"), dest, policy=FAST)       # room again: resumes
    assert dest.read_bytes() == state.repos[REPO].files["model.gguf"]
    assert state.ranges("model.gguf")[-1] == f"bytes={kept}-"
