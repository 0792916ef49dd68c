"""What Tern asks the Hugging Face hub: repository metadata, file listings, sizes, LFS SHA-256,
resolve URLs and authentication — through `huggingface_hub`. The transfer itself is download.py's.

The endpoint is read from HF_ENDPOINT at each call and passed explicitly (huggingface_hub reads
the variable only at import). Telemetry is switched off before huggingface_hub is imported.
Tokens travel only in Authorization headers: never in a message, a log line or a repr.
"""
from __future__ import annotations

import logging
import os
import posixpath
from contextlib import contextmanager
from dataclasses import dataclass

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import httpx2  # noqa: E402 - the HTTP client huggingface_hub 2.x is built on
from huggingface_hub import HfApi, constants, get_hf_file_metadata, hf_hub_url  # noqa: E402
from huggingface_hub.errors import (  # noqa: E402
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from engine.errors import AuthError, DownloadError  # noqa: E402

log = logging.getLogger(__name__)

# In case something imported huggingface_hub before us (it reads the variable at import only).
constants.HF_HUB_DISABLE_TELEMETRY = True

DEFAULT_ENDPOINT = "https://huggingface.co"
METADATA_TIMEOUT_S = 20.0


def hub_endpoint() -> str:
    """The hub (or mirror) to talk to: HF_ENDPOINT if set, else huggingface.co."""
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


@dataclass(frozen=True)
class RemoteFile:
    """One file of a repository at a fixed commit, as the hub describes it."""
    repo: str
    path: str                 # path inside the repository, '/'-separated
    commit: str               # 40-hex commit the metadata (and `url`) are pinned to
    size: int                 # bytes of the real file (for LFS files: the LFS object, not the pointer)
    sha256: str | None        # LFS object id; None for small files kept in git
    git_oid: str | None       # git blob sha1 (what a non-LFS file is verified against)
    url: str                  # resolve URL at `commit`
    gated: bool = False


def auth_headers(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def check_repo_id(repo: str) -> str:
    parts = repo.split("/")
    if len(parts) != 2 or not all(parts) or any(p in (".", "..") for p in parts):
        raise DownloadError(f"'{repo}' is not a repository id (expected owner/name)")
    return repo


def check_repo_path(path: str) -> str:
    """Refuse paths that would escape the model folder once joined to it."""
    norm = posixpath.normpath(path)
    if not path or path.startswith("/") or "\\" in path or norm.startswith("..") or norm != path:
        raise DownloadError(f"'{path}' is not a plain file path inside a repository")
    return path


def auth_help(repo: str, endpoint: str, had_token: bool) -> str:
    """The exact steps that fix a 401/403 (shown by the CLI and the GUI)."""
    page = f"{endpoint}/{repo}"
    if had_token:
        first = (f"The Hugging Face token Tern used has no access to {repo}. Open {page}, sign in "
                 f"with the account that owns the token and accept the licence (gated models need approval); "
                 f"if you already did, make a new read token at {endpoint}/settings/tokens")
    else:
        first = (f"{repo} is gated or private: open {page}, sign in, accept the licence, then create a "
                 f"read token at {endpoint}/settings/tokens")
    return (first + " and set it in Tern under Settings → Hugging Face token, "
            "or run `python -m engine download --token` and paste it when asked.")


@contextmanager
def _hub_errors(repo: str, endpoint: str, token: str | None, what: str):
    """Turn huggingface_hub / network exceptions into Tern's typed errors, without the token."""
    try:
        yield
    except GatedRepoError as exc:
        raise AuthError(auth_help(repo, endpoint, bool(token))) from _detached(exc)
    except RevisionNotFoundError as exc:
        raise DownloadError(f"{repo}: {what}: revision not found") from _detached(exc)
    except EntryNotFoundError as exc:
        raise DownloadError(f"{repo}: {what}: no such file in the repository") from _detached(exc)
    except RepositoryNotFoundError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status in (401, 403):
            raise AuthError(f"{repo} was not found or needs a token. " + auth_help(repo, endpoint, bool(token))) \
                from _detached(exc)
        raise DownloadError(f"{repo} was not found on {endpoint}") from _detached(exc)
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status in (401, 403):
            raise AuthError(auth_help(repo, endpoint, bool(token))) from _detached(exc)
        raise DownloadError(f"{repo}: {what}: the hub answered HTTP {status}") from _detached(exc)
    except (httpx2.TransportError, OSError) as exc:
        raise DownloadError(f"cannot reach {endpoint} ({type(exc).__name__}); check the network "
                            f"or HF_ENDPOINT, then try again") from _detached(exc)
    except httpx2.HTTPError as exc:
        raise DownloadError(f"{repo}: {what}: request failed ({type(exc).__name__})") from _detached(exc)
    except (ValueError, KeyError, TypeError) as exc:
        # JSON that is not the hub's: a captive portal, a proxy's login page, a wrong HF_ENDPOINT.
        raise DownloadError(f"{endpoint} did not answer like a Hugging Face hub ({type(exc).__name__}); "
                            f"check the network or HF_ENDPOINT") from _detached(exc)


def _detached(exc: BaseException) -> BaseException:
    """Drop the traceback (its frames hold the request headers, token included) from the cause."""
    exc.__traceback__ = None
    return exc


def _api(endpoint: str, token: str | None) -> HfApi:
    # token=False: never fall back to a token huggingface_hub finds on disk or in HF_TOKEN by itself.
    return HfApi(endpoint=endpoint, token=token or False, library_name="tern")


def repo_files(repo: str, revision: str = "main", *, token: str | None = None,
               endpoint: str | None = None) -> list[RemoteFile]:
    """Every file of `repo` at `revision` (pinned to its commit), with sizes and hashes."""
    endpoint = endpoint or hub_endpoint()
    check_repo_id(repo)
    api = _api(endpoint, token)
    with _hub_errors(repo, endpoint, token, "listing files"):
        info = api.model_info(repo, revision=revision, timeout=METADATA_TIMEOUT_S)
        commit = info.sha or revision
        entries = list(api.list_repo_tree(repo, revision=commit, recursive=True))
    files = []
    for entry in entries:
        if not hasattr(entry, "blob_id"):
            continue  # a folder
        files.append(RemoteFile(
            repo=repo, path=entry.path, commit=commit, size=int(entry.size),
            sha256=entry.lfs.sha256 if entry.lfs else None,
            git_oid=None if entry.lfs else entry.blob_id,
            url=hf_hub_url(repo, entry.path, revision=commit, endpoint=endpoint),
            gated=bool(info.gated)))
    log.info("hub: %s@%s has %d files", repo, commit[:12], len(files))
    return files


def remote_file(repo: str, path: str, revision: str = "main", *, token: str | None = None,
                endpoint: str | None = None) -> RemoteFile:
    """Metadata of one file, and a HEAD on its resolve URL so access problems show before any byte."""
    endpoint = endpoint or hub_endpoint()
    check_repo_id(repo)
    check_repo_path(path)
    api = _api(endpoint, token)
    folder = posixpath.dirname(path) or None
    with _hub_errors(repo, endpoint, token, path):
        info = api.model_info(repo, revision=revision, timeout=METADATA_TIMEOUT_S)
        commit = info.sha or revision
        entry = next((e for e in api.list_repo_tree(repo, path_in_repo=folder, revision=commit)
                      if e.path == path and hasattr(e, "blob_id")), None)
        if entry is None:
            raise DownloadError(f"{repo} has no file '{path}' at {revision}")
        url = hf_hub_url(repo, path, revision=commit, endpoint=endpoint)
        head = get_hf_file_metadata(url, token=token or False, timeout=METADATA_TIMEOUT_S, endpoint=endpoint)
    if head.size is not None and head.size != entry.size:
        raise DownloadError(f"{repo}/{path}: the hub reports two sizes ({entry.size} and {head.size})")
    return RemoteFile(repo=repo, path=path, commit=commit, size=int(entry.size),
                      sha256=entry.lfs.sha256 if entry.lfs else None,
                      git_oid=None if entry.lfs else entry.blob_id, url=url, gated=bool(info.gated))
