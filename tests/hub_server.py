"""A Hugging Face hub look-alike on 127.0.0.1 for download tests: real sockets, real bytes.

It implements the endpoints Tern's client uses:
  GET  /api/models/{repo}[/revision/{rev}][?blobs=true]   repository info (commit sha, gated, siblings)
  GET  /api/models/{repo}/tree/{rev}[/{path}]             file listing with sizes, git oids, LFS sha256
  HEAD /{repo}/resolve/{rev}/{file}                       X-Repo-Commit, ETag / X-Linked-Etag, X-Linked-Size
  GET  /{repo}/resolve/{rev}/{file}                       the bytes, honouring `Range: bytes=N-[M]`
Gated repositories answer 401 (X-Error-Code: GatedRepo) on resolve without a valid Bearer token.
Tokens are configured as SHA-256 digests so no token is ever written to a file by the server.

With `cdn_url` set, resolves of LFS files answer 302 to `<cdn_url>/cdn/<sha256>` (another
HubServer holding the same repos), as the real hub redirects to its CDN.

Faults the tests can ask for (attributes of `HubState`, changeable while serving): throttle the
body rate, cut the connection after N body bytes, stall (send nothing, keep the connection) after
N body bytes, serve corrupted bytes, answer a status code for the next N resolve GETs.
Every request is recorded (method, path, Range header, auth outcome),
in memory and, when `log_path` is set, as JSON lines (for a server running in a subprocess).

Run in a thread with `HubServer(state)`, or as a process:
  python tests/hub_server.py --spec spec.json --port 0 --port-file port.txt [--throttle BPS]
where spec.json = {"repos": [{"id": "o/n", "dir": "/path", "gated": false}], "token_sha256": [...]}.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".gguf", ".safetensors", ".bin")
SEND_CHUNK = 16 * 1024


def git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass
class HubRepo:
    repo_id: str
    files: dict[str, bytes]
    gated: bool = False

    @property
    def commit(self) -> str:
        return hashlib.sha1(self.repo_id.encode()).hexdigest()

    def is_lfs(self, path: str) -> bool:
        return path.endswith(LFS_SUFFIXES)


@dataclass
class HubState:
    repos: dict[str, HubRepo] = field(default_factory=dict)
    token_sha256: set[str] = field(default_factory=set)
    throttle_bps: int | None = None          # body bytes per second, None = as fast as possible
    cut_after: int | None = None             # close the socket after this many body bytes …
    cuts_left: int = 0                       # … for this many GET responses
    corrupt: set[str] = field(default_factory=set)   # "repo/path" served with one byte flipped
    stall_after: int | None = None           # stop sending (connection left open) after N body bytes …
    stall_s: float = 0.0                     # … for this long …
    stalls_left: int = 0                     # … in this many GET responses
    cdn_url: str | None = None               # redirect LFS resolves there (another HubServer), as the hub does
    fail_status: int | None = None           # answer this status on resolve GET …
    fails_left: int = 0                      # … this many times
    log_path: Path | None = None
    requests: list[dict] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add_repo(self, repo_id: str, files: dict[str, bytes], gated: bool = False) -> HubRepo:
        repo = HubRepo(repo_id, dict(files), gated)
        self.repos[repo_id] = repo
        return repo

    def record(self, entry: dict) -> None:
        with self.lock:
            self.requests.append(entry)
            if self.log_path is not None:
                with open(self.log_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(entry) + "\n")

    def ranges(self, path_suffix: str = "") -> list[str | None]:
        """Range headers of the resolve GETs received so far (None = no Range header)."""
        with self.lock:
            return [r["range"] for r in self.requests
                    if r["method"] == "GET" and "/resolve/" in r["path"] and r["path"].endswith(path_suffix)]

    def take_cut(self) -> int | None:
        with self.lock:
            if self.cut_after is None or self.cuts_left <= 0:
                return None
            self.cuts_left -= 1
            return self.cut_after

    def take_stall(self) -> int | None:
        with self.lock:
            if self.stall_after is None or self.stalls_left <= 0:
                return None
            self.stalls_left -= 1
            return self.stall_after

    def take_failure(self) -> int | None:
        with self.lock:
            if self.fail_status is None or self.fails_left <= 0:
                return None
            self.fails_left -= 1
            return self.fail_status


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "_Server"

    def log_message(self, format, *args):  # noqa: A002 - silence stderr access logs
        pass

    # ---- dispatch -------------------------------------------------------------------------
    def do_HEAD(self):
        self._dispatch(head=True)

    def do_GET(self):
        self._dispatch(head=False)

    def _dispatch(self, head: bool) -> None:
        state = self.server.state
        parts = urlsplit(self.path)
        path = unquote(parts.path)
        state.record({"method": self.command, "path": path, "range": self.headers.get("Range"),
                      "auth": self._auth_outcome(), "time": time.time()})
        if path.startswith("/cdn/"):
            self._cdn(path[len("/cdn/"):], head)
        elif path.startswith("/api/models/"):
            self._api(path[len("/api/models/"):], parse_qs(parts.query), head)
        elif "/resolve/" in path:
            self._resolve(path.lstrip("/"), head)
        else:
            self._error(404, "EntryNotFound", "no such endpoint")

    def _auth_outcome(self) -> str:
        value = self.headers.get("Authorization")
        if not value:
            return "none"
        token = value[len("Bearer "):] if value.startswith("Bearer ") else ""
        return "valid" if token_digest(token) in self.server.state.token_sha256 else "invalid"

    # ---- api ----------------------------------------------------------------------------
    def _find_repo(self, rest: str) -> tuple[HubRepo | None, str]:
        for repo_id, repo in self.server.state.repos.items():
            if rest == repo_id or rest.startswith(repo_id + "/"):
                return repo, rest[len(repo_id):].lstrip("/")
        return None, rest

    def _api(self, rest: str, query: dict, head: bool) -> None:
        repo, tail = self._find_repo(rest)
        if repo is None:
            return self._error(404, "RepoNotFound", "Repository not found")
        if tail == "" or tail.startswith("revision/"):
            rev = tail[len("revision/"):] if tail else "main"
            if rev not in ("main", repo.commit):
                return self._error(404, "RevisionNotFound", "Invalid rev id")
            return self._json(self._repo_info(repo, blobs=query.get("blobs") == ["true"]), head)
        if tail.startswith("tree/"):
            rev, _, sub = tail[len("tree/"):].partition("/")
            if rev not in ("main", repo.commit):
                return self._error(404, "RevisionNotFound", "Invalid rev id")
            recursive = query.get("recursive", ["false"])[0].lower() == "true"
            return self._json(self._tree(repo, sub, recursive), head)
        self._error(404, "EntryNotFound", "no such endpoint")

    def _file_entry(self, repo: HubRepo, path: str) -> dict:
        data = repo.files[path]
        entry = {"type": "file", "oid": git_blob_oid(data), "size": len(data), "path": path}
        if repo.is_lfs(path):
            entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        return entry

    def _repo_info(self, repo: HubRepo, blobs: bool) -> dict:
        siblings = []
        for path, data in sorted(repo.files.items()):
            sib = {"rfilename": path}
            if blobs:
                sib.update(size=len(data), blobId=git_blob_oid(data))
                if repo.is_lfs(path):
                    sib["lfs"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data),
                                  "pointerSize": 134}
            siblings.append(sib)
        return {"id": repo.repo_id, "modelId": repo.repo_id, "sha": repo.commit, "private": False,
                "gated": "manual" if repo.gated else False, "disabled": False, "tags": [],
                "siblings": siblings}

    def _tree(self, repo: HubRepo, sub: str, recursive: bool) -> list[dict]:
        prefix = sub.strip("/") + "/" if sub.strip("/") else ""
        out, dirs = [], set()
        for path in sorted(repo.files):
            if not path.startswith(prefix):
                continue
            rest = path[len(prefix):]
            if "/" in rest and not recursive:
                dirs.add(prefix + rest.split("/", 1)[0])
                continue
            out.append(self._file_entry(repo, path))
        out.extend({"type": "directory", "oid": "0" * 40, "size": 0, "path": d} for d in sorted(dirs))
        return out

    # ---- resolve ------------------------------------------------------------------------
    def _resolve(self, rest: str, head: bool) -> None:
        repo_part, _, after = rest.partition("/resolve/")
        repo = self.server.state.repos.get(repo_part)
        if repo is None:
            return self._error(404, "RepoNotFound", "Repository not found")
        rev, _, path = after.partition("/")
        if rev not in ("main", repo.commit):
            return self._error(404, "RevisionNotFound", "Invalid rev id")
        if path not in repo.files:
            return self._error(404, "EntryNotFound", "Entry not found")
        auth = self._auth_outcome()
        if repo.gated and auth != "valid":
            return self._error(401, "GatedRepo", f"Access to model {repo.repo_id} is restricted. "
                               "You must have access to it and be authenticated to access it. Please log in.")
        if self.server.state.cdn_url and repo.is_lfs(path):
            return self._redirect_to_cdn(repo, path)
        data = repo.files[path]
        if f"{repo.repo_id}/{path}" in self.server.state.corrupt:
            flipped = bytearray(data)
            flipped[len(flipped) // 2] ^= 0xFF
            data = bytes(flipped)
        if not head:
            status = self.server.state.take_failure()
            if status is not None:
                return self._error(status, None, "try again later")
        self._send_file(repo, path, data, head)

    def _redirect_to_cdn(self, repo: HubRepo, path: str) -> None:
        data = repo.files[path]
        sha = hashlib.sha256(data).hexdigest()
        self.send_response(302)
        self.send_header("Location", f"{self.server.state.cdn_url}/cdn/{sha}?X-Amz-Signature=test")
        self.send_header("X-Repo-Commit", repo.commit)
        self.send_header("X-Linked-Etag", f'"{sha}"')
        self.send_header("X-Linked-Size", str(len(data)))
        self.send_header("ETag", f'"{git_blob_oid(data)}"')
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _cdn(self, sha: str, head: bool) -> None:
        """Content-addressed blobs, like the hub's CDN: no auth, Range support."""
        status = None if head else self.server.state.take_failure()
        if status is not None:
            return self._error(status, None, "Request has expired")
        for repo in self.server.state.repos.values():
            for path, data in repo.files.items():
                if repo.is_lfs(path) and hashlib.sha256(data).hexdigest() == sha:
                    if f"{repo.repo_id}/{path}" in self.server.state.corrupt:
                        flipped = bytearray(data)
                        flipped[len(flipped) // 2] ^= 0xFF
                        data = bytes(flipped)
                    return self._send_file(repo, path, data, head)
        self._error(404, None, "no such blob")

    def _send_file(self, repo: HubRepo, path: str, data: bytes, head: bool) -> None:
        size = len(data)
        true_data = repo.files[path]
        etag = hashlib.sha256(true_data).hexdigest() if repo.is_lfs(path) else git_blob_oid(true_data)
        start, end = 0, size - 1
        rng = self.headers.get("Range")
        status = 200
        if rng and not head:
            parsed = _parse_range(rng, size)
            if parsed is None:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            start, end = parsed
            status = 206
        self.send_response(status)
        self.send_header("X-Repo-Commit", repo.commit)
        self.send_header("ETag", f'"{etag}"')
        if repo.is_lfs(path):
            self.send_header("X-Linked-Etag", f'"{etag}"')
            self.send_header("X-Linked-Size", str(size))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start + 1))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        if not head:
            self._send_body(data[start:end + 1])

    def _send_body(self, body: bytes) -> None:
        state = self.server.state
        cut, stall = state.take_cut(), state.take_stall()
        sent, t0 = 0, time.monotonic()
        while sent < len(body):
            chunk = body[sent:sent + SEND_CHUNK]
            if stall is not None and sent >= stall:
                stall = None
                time.sleep(state.stall_s)
                t0 += state.stall_s
            if cut is not None and sent + len(chunk) > cut:
                self.wfile.write(chunk[:max(0, cut - sent)])
                self.wfile.flush()
                self._abort_connection()
                return
            try:
                self.wfile.write(chunk)
                self.wfile.flush()
            except OSError:
                return
            sent += len(chunk)
            if state.throttle_bps:
                ahead = sent / state.throttle_bps - (time.monotonic() - t0)
                if ahead > 0:
                    time.sleep(ahead)

    def _abort_connection(self) -> None:
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    # ---- helpers ------------------------------------------------------------------------
    def _json(self, payload, head: bool) -> None:
        body = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _error(self, status: int, code: str | None, message: str) -> None:
        body = json.dumps({"error": message}).encode()
        self.send_response(status)
        if code:
            self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


def _parse_range(value: str, size: int) -> tuple[int, int] | None:
    if not value.startswith("bytes=") or "," in value:
        return None
    first, _, last = value[len("bytes="):].partition("-")
    if not first.isdigit():
        return None
    start = int(first)
    end = int(last) if last.isdigit() else size - 1
    if start >= size or end < start:
        return None
    return start, min(end, size - 1)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address, state: HubState):
        self.state = state
        self.live: set[socket.socket] = set()
        self.live_lock = threading.Lock()
        super().__init__(address, _Handler)

    def process_request(self, request, client_address):
        with self.live_lock:
            self.live.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        with self.live_lock:
            self.live.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request, client_address):
        # A client that hangs up mid-response is normal here (cuts, pauses, cancels); say nothing.
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return
        super().handle_error(request, client_address)

    def drop_connections(self) -> None:
        with self.live_lock:
            for sock in list(self.live):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


class HubServer:
    """The hub look-alike serving in a background thread; `stop()` also drops live connections."""

    def __init__(self, state: HubState, port: int = 0):
        self.state = state
        self._server = _Server(("127.0.0.1", port), state)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="hub-server", daemon=True)

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "HubServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.drop_connections()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def state_from_spec(spec: dict) -> HubState:
    state = HubState(token_sha256=set(spec.get("token_sha256", [])))
    for repo in spec["repos"]:
        root = Path(repo["dir"])
        files = {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
        state.add_repo(repo["id"], files, gated=bool(repo.get("gated", False)))
    return state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", required=True, type=Path)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--port-file", type=Path)
    parser.add_argument("--log", type=Path)
    parser.add_argument("--throttle", type=int)
    args = parser.parse_args()
    state = state_from_spec(json.loads(args.spec.read_text()))
    state.log_path = args.log
    state.throttle_bps = args.throttle
    server = _Server(("127.0.0.1", args.port), state)
    if args.port_file:
        tmp = args.port_file.with_suffix(".tmp")
        tmp.write_text(str(server.server_address[1]))
        tmp.replace(args.port_file)
    server.serve_forever(poll_interval=0.05)


if __name__ == "__main__":
    main()
