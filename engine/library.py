"""The model library: installed models (downloaded or dragged in), kept as a JSON index in
engine.paths.data_dir(), with delete, reveal in the file manager and the default model.

Downloaded models live under models_dir()/<owner>/<repo>/<file>; a model added from elsewhere
is referenced where it is and never deleted by Tern (removing it only forgets it).
Only files that pass verification are ever added: a download that fails its hash never
reaches `add()`.
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable

from engine import hub, paths
from engine.download import (
    DownloadControl,
    DownloadProgress,
    FreeSpaceFn,
    ProgressFn,
    RetryPolicy,
    disk_free_bytes,
    download_file,
    file_lock,
)
from engine.errors import DiskSpaceError, DownloadError, ModelFormatError, TernError
from engine.model import inspect_gguf

log = logging.getLogger(__name__)

DEFAULT_REPO = "microsoft/bitnet-b1.58-2B-4T-gguf"
DEFAULT_FILE = "ggml-model-i2_s.gguf"
INDEX_NAME = "library.json"
SCHEMA_VERSION = 1
CATALOGUE_NAME = "catalogue.json"
_INDEX_LOCK = threading.RLock()      # one writer at a time in this process (GUI + download threads)


class ModelNotFoundError(TernError):
    """No model with that id in the library."""


@dataclass
class ModelEntry:
    id: str                 # 16 hex digits, stable for a file (its SHA-256 prefix)
    name: str
    path: str
    size: int               # bytes
    format: str             # 'GGUF'
    arch: str | None        # general.architecture
    quant: str | None       # the dominant weight type, e.g. 'I2_S'
    ctx: int | None         # training context length
    est_ram: int            # bytes, engine.model.inspect_gguf's estimate
    kind: str               # 'bitnet' (Tern's engine) | 'llama.cpp' | 'unsupported'
    source: str             # 'hf:<owner>/<repo>/<file>@<commit>' | 'local' | 'converted:<…>'
    sha256: str
    added: float            # unix time

    @property
    def exists(self) -> bool:
        return Path(self.path).is_file()

    @classmethod
    def from_json(cls, d: dict) -> "ModelEntry":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def sha256_file(path: Path, cancel: Callable[[], bool] | None = None) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(4 * 1024 * 1024):
            digest.update(block)
            if cancel is not None and cancel():
                raise TernError(f"hashing {path} cancelled")
    return digest.hexdigest()


def _dominant_quant(tensor_types: dict[str, int]) -> str | None:
    weights = {t: n for t, n in tensor_types.items() if t != "F32"}
    return max(weights, key=weights.get) if weights else None


class Library:
    """The installed models. Every method re-reads the index, so two windows stay consistent."""

    def __init__(self, index_path: Path | None = None, models_dir: Path | None = None):
        self.index_path = Path(index_path) if index_path else paths.data_dir() / INDEX_NAME
        self.models_dir = Path(models_dir) if models_dir else paths.models_dir()

    # ---- index ------------------------------------------------------------------------------
    def _load(self) -> dict:
        try:
            data = json.loads(self.index_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {"schema_version": SCHEMA_VERSION, "default": None, "models": []}
        except (OSError, ValueError) as exc:
            raise TernError(f"the model library index {self.index_path} is unreadable ({exc}); "
                            f"move it away and re-add your models") from None
        if data.get("schema_version") != SCHEMA_VERSION:
            raise TernError(f"{self.index_path}: library schema {data.get('schema_version')!r}; this Tern "
                            f"reads schema {SCHEMA_VERSION} (was it written by another version?)")
        return data

    def _save(self, data: dict) -> None:
        self.index_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.index_path.with_name(self.index_path.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
        os.replace(tmp, self.index_path)

    @contextmanager
    def _editing(self):
        """Read-modify-write of the index, one writer at a time across threads and processes."""
        self.index_path.parent.mkdir(parents=True, exist_ok=True)
        with _INDEX_LOCK, file_lock(self.index_path.with_name(self.index_path.name + ".lock"), wait=True):
            data = self._load()
            yield data
            self._save(data)

    def entries(self) -> list[ModelEntry]:
        return [ModelEntry.from_json(m) for m in self._load()["models"]]

    def get(self, model_id: str) -> ModelEntry:
        return _find(self._load(), model_id)

    def find(self, *, path: Path | None = None, source: str | None = None) -> ModelEntry | None:
        for entry in self.entries():
            if path is not None and Path(entry.path) == Path(path).resolve():
                return entry
            if source is not None and entry.source == source:
                return entry
        return None

    # ---- changes ----------------------------------------------------------------------------
    def add(self, path: Path, *, source: str = "local", sha256: str | None = None) -> ModelEntry:
        """Inspect a GGUF (header only) and index it. `sha256` is hashed here unless the caller
        verified it already. Raises ModelFormatError for a file that is not a readable GGUF."""
        path = Path(path).resolve()
        if not path.is_file():
            raise ModelFormatError(path, "no such file")
        info = inspect_gguf(path)
        digest = sha256 or sha256_file(path)
        entry = ModelEntry(
            id=digest[:16], name=info.name or path.stem, path=str(path), size=path.stat().st_size,
            format="GGUF", arch=info.arch, quant=_dominant_quant(info.tensor_types),
            ctx=info.context_length, est_ram=int(info.est_ram_bytes), kind=info.kind,
            source=source, sha256=digest, added=time.time())
        with self._editing() as data:
            data["models"] = [m for m in data["models"] if m["id"] != entry.id and m["path"] != entry.path]
            data["models"].append(asdict(entry))
            if data.get("default") is None:
                data["default"] = entry.id
        log.info("library: added %s (%s, %s)", entry.name, entry.quant, entry.source)
        return entry

    def remove(self, model_id: str, *, delete_file: bool = True) -> ModelEntry:
        """Forget a model; its file is deleted only if it lives in Tern's models folder."""
        with self._editing() as data:
            entry = _find(data, model_id)
            data["models"] = [m for m in data["models"] if m["id"] != model_id]
            if data.get("default") == model_id:
                data["default"] = None
        if delete_file and self.owns(entry):
            Path(entry.path).unlink(missing_ok=True)
            self._prune_empty_dirs(Path(entry.path).parent)
        log.info("library: removed %s", entry.name)
        return entry

    def owns(self, entry: ModelEntry) -> bool:
        """True if the file is in Tern's models folder (so deleting it deletes Tern's copy only)."""
        return Path(entry.path).resolve().is_relative_to(self.models_dir.resolve())

    def _prune_empty_dirs(self, folder: Path) -> None:
        root = self.models_dir.resolve()
        folder = folder.resolve()
        while folder != root and folder.is_relative_to(root):
            try:
                folder.rmdir()
            except OSError:
                return
            folder = folder.parent

    def set_default(self, model_id: str) -> None:
        with self._editing() as data:
            _find(data, model_id)
            data["default"] = model_id

    def default(self) -> ModelEntry | None:
        """The default model if it is still on disk; otherwise the first model that is."""
        data = self._load()
        entries = [ModelEntry.from_json(m) for m in data["models"]]
        chosen = next((e for e in entries if e.id == data.get("default") and e.exists), None)
        return chosen or next((e for e in entries if e.exists), None)

    def reveal(self, model_id: str) -> None:
        """Show the model's file in the system file manager."""
        subprocess.Popen(reveal_command(Path(self.get(model_id).path)),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def path_for(self, repo: str, filename: str) -> Path:
        hub.check_repo_id(repo)
        hub.check_repo_path(filename)
        return self.models_dir.joinpath(*repo.split("/"), *filename.split("/"))


def _find(data: dict, model_id: str) -> ModelEntry:
    for m in data["models"]:
        if m["id"] == model_id:
            return ModelEntry.from_json(m)
    raise ModelNotFoundError(f"no model '{model_id}' in the library")


def reveal_command(path: Path) -> list[str]:
    if sys.platform == "darwin":
        return ["open", "-R", str(path)]
    if sys.platform == "win32":
        return ["explorer", f"/select,{path}"]
    return ["xdg-open", str(path.parent)]


# ---- from the hub into the library --------------------------------------------------------------

def install_from_hub(repo: str, filename: str, revision: str = "main", *, token: str | None = None,
                     progress: ProgressFn | None = None, control: DownloadControl | None = None,
                     library: Library | None = None, policy: RetryPolicy | None = None,
                     free_space: FreeSpaceFn = disk_free_bytes) -> ModelEntry:
    """Download one GGUF from the hub (resuming a partial file), verify it and add it."""
    library = library or Library()
    remote = hub.remote_file(repo, filename, revision, token=token)
    source = f"hf:{repo}/{filename}@{remote.commit}"
    known = library.find(source=source)
    if known is not None and known.exists and known.sha256 == remote.sha256:
        log.info("library: %s is already installed", source)
        return known
    dest = library.path_for(repo, filename)
    if dest.is_file() and remote.sha256 and dest.stat().st_size == remote.size \
            and sha256_file(dest) == remote.sha256:
        return library.add(dest, source=source, sha256=remote.sha256)
    download_file(remote, dest, token=token, progress=progress, control=control, policy=policy,
                  free_space=free_space)
    try:
        return library.add(dest, source=source, sha256=remote.sha256)
    except ModelFormatError:
        dest.unlink(missing_ok=True)      # the hub's file, intact, but not a model Tern can list
        library._prune_empty_dirs(dest.parent)
        raise


CHECKPOINT_PATTERNS = ("*.json", "*.safetensors")


def install_converted(repo: str, fmt: str = "i2_s", revision: str = "main", *, token: str | None = None,
                      progress: ProgressFn | None = None, control: DownloadControl | None = None,
                      library: Library | None = None, policy: RetryPolicy | None = None,
                      free_space: FreeSpaceFn = disk_free_bytes, keep_checkpoint: bool = False) -> ModelEntry:
    """Download a Hugging Face BitNet checkpoint (config, tokenizer, safetensors), convert it to a
    GGUF with engine.convert and add that. The checkpoint is deleted afterwards unless asked."""
    from engine.convert import convert   # torch-free, but only this route needs it

    library = library or Library()
    wanted = [f for f in hub.repo_files(repo, revision, token=token)
              if any(fnmatch.fnmatch(f.path, pat) for pat in CHECKPOINT_PATTERNS)]
    if not any(f.path.endswith(".safetensors") for f in wanted):
        raise DownloadError(f"{repo} has no safetensors checkpoint to convert")
    total = sum(f.size for f in wanted)
    if free_space(_existing(library.models_dir)) < 2 * total:   # checkpoint + GGUF side by side
        raise DiskSpaceError(f"converting {repo} needs about {2 * total / 2**30:.1f} GiB free in "
                             f"{library.models_dir}")
    ckpt_dir = library.models_dir.joinpath("checkpoints", *repo.split("/"))
    done_before = 0
    for remote in wanted:
        shifted = None if progress is None else _shifted(progress, done_before, total)
        dest = ckpt_dir.joinpath(*remote.path.split("/"))
        if not (dest.is_file() and dest.stat().st_size == remote.size):
            download_file(remote, dest, token=token, progress=shifted, control=control, policy=policy,
                          free_space=free_space)
        done_before += remote.size
    out = library.path_for(repo, f"{repo.split('/')[1]}-{fmt}.gguf")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.stem + ".converting.gguf")
    if progress is not None:
        progress(DownloadProgress("converting", total, total, 0.0, None))
    convert(ckpt_dir, tmp, fmt)
    os.replace(tmp, out)
    entry = library.add(out, source=f"converted:hf:{repo}@{wanted[0].commit}:{fmt}")
    if not keep_checkpoint:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        library._prune_empty_dirs(ckpt_dir.parent)
    return entry


def _shifted(progress: ProgressFn, offset: int, total: int) -> ProgressFn:
    """Report one file's progress as progress through the whole checkpoint."""
    def report(p: DownloadProgress) -> None:
        eta = (total - offset - p.done) / p.speed_bps if p.speed_bps > 0 else None
        progress(DownloadProgress(p.phase if p.phase != "done" else "downloading", offset + p.done, total,
                                  p.speed_bps, eta, p.attempt, p.note))
    return report


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def default_model_path(library: Library | None = None) -> Path | None:
    """The path of the default model if one is installed, else None."""
    entry = (library or Library()).default()
    return Path(entry.path) if entry else None


def ensure_default_model(progress: ProgressFn | None = None, *, control: DownloadControl | None = None,
                         token: str | None = None, library: Library | None = None,
                         free_space: FreeSpaceFn = disk_free_bytes) -> Path:
    """The default model's path, downloading BitNet b1.58 2B4T (I2_S GGUF) first if no model is
    installed. The token defaults to the one in the keychain (engine.secrets)."""
    library = library or Library()
    path = default_model_path(library)
    if path is not None:
        return path
    if token is None:
        from engine.secrets import get_token
        token = get_token()
    entry = install_from_hub(DEFAULT_REPO, DEFAULT_FILE, token=token, progress=progress,
                             control=control, library=library, free_space=free_space)
    library.set_default(entry.id)
    return Path(entry.path)


def load_catalogue() -> list[dict]:
    """The models Tern offers (resources/catalogue.json), the default first."""
    data = json.loads(paths.resource_path(CATALOGUE_NAME).read_text(encoding="utf-8"))
    return data["models"]

