"""Tern's own file transfer: HTTP Range requests into `<name>.part`, resumable across restarts.

Why not huggingface_hub's downloader: 2.x deletes or orphans the partial file when a transfer
fails or the process dies, so nothing resumes across restarts. Here the partial file stays,
with a small `<name>.part.json` beside it naming what it is a part of (size and hashes — never
a URL or a token), and the next attempt asks for the rest with `Range: bytes=<have>-`.

Retries back off exponentially; a connection that delivers no byte for `stall_timeout`
seconds is dropped and resumed. Pause and cancel come through `DownloadControl` (threading
events, checked between chunks). Free space is checked before the first byte is written.
The SHA-256 from the hub's LFS metadata (or the git blob id of a small file) is verified
before the file is atomically `os.replace`d into place; a file that fails is deleted, never moved.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import random
import shutil
import threading
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import httpx2
import tqdm

from engine.errors import AuthError, CancelledError, ChecksumError, DiskSpaceError, DownloadError
from engine.hub import RemoteFile, auth_help, auth_headers

log = logging.getLogger(__name__)

FSYNC_EVERY = 64 * 1024 * 1024
HEADROOM = 16 * 1024 * 1024          # keep this much free beyond the file itself
PROGRESS_INTERVAL_S = 0.1


# ---- public types ----------------------------------------------------------------------------

@dataclass(frozen=True)
class RetryPolicy:
    max_failures: int = 8             # consecutive failed attempts that made no progress
    max_attempts: int = 60            # attempts in one call, progress or not
    backoff_base_s: float = 1.0
    backoff_max_s: float = 30.0
    stall_timeout_s: float = 30.0     # no byte for this long: drop the connection and resume
    connect_timeout_s: float = 15.0


@dataclass(frozen=True)
class DownloadProgress:
    phase: str            # 'connecting' | 'downloading' | 'paused' | 'retrying' | 'verifying' | 'done'
                          # (library.install_converted adds 'converting')
    done: int             # bytes on disk (downloading) or bytes hashed (verifying)
    total: int
    speed_bps: float      # smoothed bytes per second, 0 when unknown
    eta_s: float | None   # seconds left at the current speed
    attempt: int = 0
    note: str = ""        # why we are retrying, etc. (never contains a token)


ProgressFn = Callable[[DownloadProgress], None]
FreeSpaceFn = Callable[[Path], int]


class DownloadStopped(CancelledError):
    """The download was stopped with its partial file kept (app closing): it resumes next time."""


class DownloadControl:
    """Pause, resume, stop (keep the partial file) and cancel (delete it) from any thread."""

    def __init__(self) -> None:
        self.cancel_event = threading.Event()
        self.pause_event = threading.Event()
        self.stop_event = threading.Event()

    def pause(self) -> None:
        self.pause_event.set()

    def resume(self) -> None:
        self.pause_event.clear()

    def cancel(self) -> None:
        self.cancel_event.set()
        self.stop_event.set()

    def stop(self) -> None:
        self.stop_event.set()

    @property
    def paused(self) -> bool:
        return self.pause_event.is_set()

    @property
    def cancelled(self) -> bool:
        return self.cancel_event.is_set()

    @property
    def stopped(self) -> bool:
        return self.stop_event.is_set()


def disk_free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


def part_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


def partial_bytes(dest: Path) -> int:
    """Bytes already downloaded towards `dest` (0 when there is no partial file)."""
    part = part_path(Path(dest))
    return part.stat().st_size if part.exists() else 0


# ---- the transfer ----------------------------------------------------------------------------

class _Retryable(Exception):
    """A failure worth another attempt (network, stall, 5xx, 429)."""

    def __init__(self, reason: str, wait_s: float | None = None):
        super().__init__(reason)
        self.wait_s = wait_s


class _Meter:
    """Smoothed speed and rate-limited progress callbacks."""

    def __init__(self, total: int, progress: ProgressFn | None):
        self.total, self.progress = total, progress
        self.speed = 0.0
        self._window: tuple[float, int] | None = None   # (start time, bytes done then)
        self._last_emit = 0.0

    def update(self, phase: str, done: int, attempt: int = 0, note: str = "", force: bool = False) -> None:
        now = time.monotonic()
        if self._window is None or done < self._window[1]:
            self._window = (now, done)
        elif now - self._window[0] >= 0.5:
            rate = (done - self._window[1]) / (now - self._window[0])
            self.speed = rate if self.speed == 0 else 0.6 * self.speed + 0.4 * rate
            self._window = (now, done)
        if self.progress is None or (not force and now - self._last_emit < PROGRESS_INTERVAL_S):
            return
        self._last_emit = now
        eta = (self.total - done) / self.speed if self.speed > 0 and phase == "downloading" else None
        self.progress(DownloadProgress(phase, done, self.total, self.speed, eta, attempt, note))

    def restart_speed(self) -> None:
        self.speed, self._window = 0.0, None


def download_file(remote: RemoteFile, dest: Path, *, token: str | None = None,
                  progress: ProgressFn | None = None, control: DownloadControl | None = None,
                  policy: RetryPolicy | None = None, free_space: FreeSpaceFn = disk_free_bytes) -> Path:
    """Fetch `remote` into `dest`, resuming `<dest>.part` if it is a part of the same file.

    Raises DiskSpaceError before writing anything, AuthError on 401/403, ChecksumError when the
    bytes do not match the hub's hash (the partial file is then deleted), CancelledError on
    cancel (partial file deleted), DownloadStopped on stop and DownloadError when retries run
    out (partial file kept in both).
    """
    dest = Path(dest)
    policy = policy or RetryPolicy()
    control = control or DownloadControl()
    part = part_path(dest)
    have = _size(part) if _is_part_of(part, remote) else 0
    needed = remote.size - have + HEADROOM
    free = free_space(dest.parent if dest.parent.exists() else _existing_parent(dest))
    if free < needed:
        raise DiskSpaceError(f"not enough free disk space for {remote.path}: {_gib(needed)} needed, "
                             f"{_gib(free)} free in {dest.parent}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(part, remote):
        _forget_foreign_part(part, remote)
        _write_sidecar(part, remote)
        meter = _Meter(remote.size, progress)
        timeout = httpx2.Timeout(policy.stall_timeout_s, connect=policy.connect_timeout_s)
        with httpx2.Client(timeout=timeout, follow_redirects=True, max_redirects=5) as client:
            _transfer(client, remote, part, auth_headers(token), bool(token), meter, control, policy)
        _verify(part, remote, meter, control)
        os.replace(part, dest)
        _fsync_dir(dest.parent)
        _sidecar(part).unlink(missing_ok=True)
    meter.update("done", remote.size, force=True)
    log.info("download: %s/%s verified and in place (%d bytes)", remote.repo, remote.path, remote.size)
    return dest


def _transfer(client, remote: RemoteFile, part: Path, headers: dict, had_token: bool,
              meter: _Meter, control: DownloadControl, policy: RetryPolicy) -> None:
    failures = 0        # consecutive failed attempts without progress
    failed = 0          # all failed attempts of this call
    attempt = 0
    while True:
        _honour_pause_and_cancel(part, remote, meter, control)
        have = _size(part)
        if have == remote.size:
            return
        attempt += 1
        meter.update("connecting", have, attempt, force=True)
        try:
            _fetch(client, remote, part, headers, had_token, meter, control, attempt)
            failures = 0
            continue    # finished, paused or cancelled: the top of the loop sorts it out
        except _Retryable as exc:
            failed += 1
            failures = 0 if _size(part) > have else failures + 1
            reason, server_wait = str(exc), exc.wait_s
        if failures >= policy.max_failures or failed >= policy.max_attempts:
            raise DownloadError(f"{remote.path}: gave up after {failed} failed attempts, {failures} of them "
                                f"in a row without progress (last: {reason}); "
                                f"the partial file is kept — try again to resume")
        wait = server_wait if server_wait is not None else _backoff(failures, policy)
        log.warning("download: %s: %s; retrying in %.1f s", remote.path, reason, wait)
        meter.update("retrying", _size(part), attempt, note=reason, force=True)
        meter.restart_speed()
        control.stop_event.wait(wait)


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def _backoff(failures: int, policy: RetryPolicy) -> float:
    delay = min(policy.backoff_max_s, policy.backoff_base_s * 2 ** max(0, failures - 1))
    return delay * random.uniform(0.8, 1.2)


def _honour_pause_and_cancel(part: Path, remote: RemoteFile, meter: _Meter, control: DownloadControl) -> None:
    if control.paused and not control.stopped:
        have = _size(part)
        meter.update("paused", have, force=True)
        log.info("download: %s paused at %d bytes", remote.path, have)
        while control.paused and not control.stopped:
            control.stop_event.wait(0.1)
        meter.restart_speed()
    if control.cancelled:
        part.unlink(missing_ok=True)
        _sidecar(part).unlink(missing_ok=True)
        raise CancelledError(f"download of {remote.path} cancelled")
    if control.stopped:
        raise DownloadStopped(f"download of {remote.path} stopped at {_size(part)} bytes; it resumes next time")


def _fetch(client, remote: RemoteFile, part: Path, headers: dict, had_token: bool,
           meter: _Meter, control: DownloadControl, attempt: int) -> None:
    """One GET from the current end of the partial file; returns when done, paused or cancelled."""
    have = _size(part)
    request_headers = {**headers, "Accept-Encoding": "identity", "Range": f"bytes={have}-"}
    try:
        with client.stream("GET", remote.url, headers=request_headers) as resp:
            start = _check_response(resp, remote, part, have, had_token)
            _receive(resp, part, start, remote, meter, control, attempt)
    except httpx2.TimeoutException:
        raise _Retryable("stalled: no data received in time") from None
    except httpx2.TransportError as exc:
        raise _Retryable(f"connection lost ({type(exc).__name__})") from None
    except httpx2.HTTPError as exc:     # too many redirects, a malformed URL: retrying will not help
        raise DownloadError(f"{remote.repo}/{remote.path}: cannot download ({type(exc).__name__})") from None


def _check_response(resp, remote: RemoteFile, part: Path, have: int, had_token: bool) -> int:
    """Where in the file the body starts; raises for statuses that end or retry the attempt."""
    status = resp.status_code
    if status in (401, 403) and _origin(str(resp.url)) != _origin(remote.url):
        # Refused by the storage server the hub redirected to (an expired signed link, say),
        # not by the hub: the next attempt asks the hub for a fresh link.
        raise _Retryable(f"the storage server refused the download link (HTTP {status})")
    if status in (401, 403):
        raise AuthError(auth_help(remote.repo, _origin(remote.url), had_token))
    if status == 404:
        raise DownloadError(f"{remote.repo}/{remote.path}: the hub answered 404 (file not found)")
    if status == 429 or status >= 500:
        retry_after = resp.headers.get("Retry-After", "")
        wait = min(float(retry_after), 120.0) if retry_after.isdigit() else None
        raise _Retryable(f"the server answered HTTP {status}", wait)
    if status == 416:
        # Our partial file is longer than the server's file: it cannot be a part of it.
        part.unlink(missing_ok=True)
        raise _Retryable("the server refused the range; starting the file again")
    if status == 200:
        if have:
            log.warning("download: %s: server ignored the Range header; starting from 0", remote.path)
        return 0
    if status == 206:
        content_range = resp.headers.get("Content-Range", "")
        first = content_range.removeprefix("bytes ").split("-", 1)[0]
        if not first.isdigit() or int(first) != have:
            raise _Retryable(f"the server sent the wrong range ({content_range!r})")
        return have
    raise DownloadError(f"{remote.repo}/{remote.path}: unexpected HTTP {status}")


def _receive(resp, part: Path, start: int, remote: RemoteFile, meter: _Meter,
             control: DownloadControl, attempt: int) -> None:
    with open(part, "r+b" if part.exists() else "w+b", buffering=0) as f:
        f.seek(start)
        f.truncate()
        pos, synced = start, start
        try:
            for chunk in resp.iter_raw():
                if pos + len(chunk) > remote.size:
                    raise _Retryable("the server sent more bytes than the file has")
                _write(f, chunk, part)
                pos += len(chunk)
                if pos - synced >= FSYNC_EVERY:
                    _write(f, b"", part, sync=True)
                    synced = pos
                meter.update("downloading", pos, attempt)
                if control.paused or control.stopped:
                    return
        finally:
            _write(f, b"", part, sync=True)
    meter.update("downloading", pos, attempt, force=True)
    if pos < remote.size:
        raise _Retryable(f"the connection closed early at {pos} of {remote.size} bytes")


def _write(f, data: bytes, part: Path, sync: bool = False) -> None:
    """Write (and optionally flush to disk); a full disk or a refused write keeps the partial file."""
    try:
        view = memoryview(data)
        while view:                      # unbuffered: a short write is possible, nothing is hidden
            view = view[f.write(view):]
        if sync:
            os.fsync(f.fileno())
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            raise DiskSpaceError(f"the disk filled up while writing {part}; free some space and download "
                                 f"again — it resumes from {_gib(f.tell())}") from None
        raise DownloadError(f"cannot write {part} ({exc.strerror or type(exc).__name__}); "
                            f"the partial file is kept") from None


def _verify(part: Path, remote: RemoteFile, meter: _Meter, control: DownloadControl) -> None:
    size = part.stat().st_size
    if size != remote.size:
        raise DownloadError(f"{remote.path}: {size} bytes on disk, {remote.size} expected")
    if remote.sha256:
        digest, expected = hashlib.sha256(), remote.sha256.lower()
    elif remote.git_oid:
        digest, expected = hashlib.sha1(b"blob %d\0" % size), remote.git_oid.lower()
    else:
        raise ChecksumError(f"{remote.path}: the hub gave no hash to verify against; file not accepted")
    done = 0
    meter.restart_speed()
    meter.update("verifying", 0, force=True)
    with open(part, "rb") as f:
        while block := f.read(4 * 1024 * 1024):
            digest.update(block)
            done += len(block)
            meter.update("verifying", done)
            if control.stopped:
                break
    if control.stopped:
        _honour_pause_and_cancel(part, remote, meter, control)
    got = digest.hexdigest()
    if got != expected:
        part.unlink(missing_ok=True)
        _sidecar(part).unlink(missing_ok=True)
        raise ChecksumError(f"{remote.path}: checksum mismatch (expected {expected[:16]}…, got {got[:16]}…); "
                            f"the damaged file was deleted — download it again")


# ---- the partial file's identity -------------------------------------------------------------

def _sidecar(part: Path) -> Path:
    return part.with_name(part.name + ".json")


def _identity(remote: RemoteFile) -> dict:
    return {"repo": remote.repo, "path": remote.path, "size": remote.size,
            "sha256": remote.sha256, "git_oid": remote.git_oid}


def _write_sidecar(part: Path, remote: RemoteFile) -> None:
    side = _sidecar(part)
    tmp = side.with_name(side.name + ".tmp")
    tmp.write_text(json.dumps(_identity(remote)), encoding="utf-8")
    os.replace(tmp, side)


def _is_part_of(part: Path, remote: RemoteFile) -> bool:
    """True if the sidecar says `part` is a prefix of this very file (same size and hashes)."""
    try:
        known = json.loads(_sidecar(part).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return known == _identity(remote) and _size(part) <= remote.size


def _forget_foreign_part(part: Path, remote: RemoteFile) -> None:
    """A partial file is resumed only if it is a part of this very file; anything else goes."""
    if part.exists() and not _is_part_of(part, remote):
        log.warning("download: %s is not a part of %s at this revision; starting again", part, remote.path)
        part.unlink()
    if not part.exists():
        _sidecar(part).unlink(missing_ok=True)


# ---- one writer per file ------------------------------------------------------------------------

@contextmanager
def file_lock(lock_path: Path, *, wait: bool):
    """Hold an OS lock on `lock_path` (created if needed) for the block, across processes; the OS
    drops it if the process dies. `wait=False` raises BlockingIOError at once if it is held."""
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        _lock_fd(fd, wait)
        try:
            yield
        finally:
            _unlock_fd(fd)
    finally:
        os.close(fd)


@contextmanager
def _exclusive(part: Path, remote: RemoteFile):
    """Two Tern processes (the app and the CLI) never append to the same partial file."""
    lock_path = part.with_name(part.name + ".lock")
    with ExitStack() as stack:
        try:
            stack.enter_context(file_lock(lock_path, wait=False))
        except BlockingIOError:
            raise DownloadError(f"{remote.path} is being downloaded by another Tern window or command; "
                                f"wait for it to finish or close it") from None
        try:
            yield
        finally:
            if not part.exists():
                lock_path.unlink(missing_ok=True)


if os.name == "nt":
    import msvcrt

    def _lock_fd(fd: int, wait: bool) -> None:
        try:
            msvcrt.locking(fd, msvcrt.LK_LOCK if wait else msvcrt.LK_NBLCK, 1)
        except OSError as exc:
            raise BlockingIOError(str(exc)) from None

    def _unlock_fd(fd: int) -> None:
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
else:
    import fcntl

    def _lock_fd(fd: int, wait: bool) -> None:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))

    def _unlock_fd(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)


# ---- small helpers ---------------------------------------------------------------------------

def _existing_parent(path: Path) -> Path:
    for parent in path.parents:
        if parent.exists():
            return parent
    return Path.cwd()


def _fsync_dir(path: Path) -> None:
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _origin(url: str) -> str:
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.split('/', 1)[0]}"


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


# ---- terminal progress bar -------------------------------------------------------------------

class TerminalProgressBar(tqdm.tqdm):
    """A terminal bar fed by DownloadProgress events (plain tqdm: huggingface_hub's subclass
    switches itself off without a TTY)."""

    def __init__(self, desc: str, **kwargs):
        kwargs.setdefault("unit", "B")
        kwargs.setdefault("unit_scale", True)
        kwargs.setdefault("unit_divisor", 1024)
        kwargs.setdefault("dynamic_ncols", True)
        super().__init__(desc=desc, total=None, **kwargs)
        self._phase = ""

    def __call__(self, p: DownloadProgress) -> None:
        if p.phase != self._phase:
            self._phase = p.phase
            self.set_postfix_str({"verifying": "verifying SHA-256", "paused": "paused",
                                  "converting": "converting to GGUF",
                                  "retrying": f"retrying: {p.note}"}.get(p.phase, ""), refresh=False)
        if self.total != p.total:
            self.total = p.total
        self.n = p.done
        self.refresh()
