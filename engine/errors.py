"""Typed errors the CLI and the GUI can act on. Everything the engine raises on purpose is a TernError."""
from __future__ import annotations


class TernError(Exception):
    """Base class of every error the engine raises on purpose."""


class ModelFormatError(TernError):
    """A model file that cannot be read: names the file, the tensor (if any) and the reason."""

    def __init__(self, path, reason: str, tensor: str | None = None):
        self.path = str(path)
        self.tensor = tensor
        self.reason = reason
        where = f"{self.path}" + (f", tensor '{tensor}'" if tensor else "")
        super().__init__(f"{where}: {reason}")


class UnsupportedModelError(ModelFormatError):
    """A well-formed GGUF that Tern's own BitNet engine does not run."""


class OutOfMemoryError(TernError):
    pass


class CancelledError(TernError):
    pass


class ContextOverflowError(TernError):
    pass


class NativeError(TernError):
    """A non-OK status from the native library, with its tern_last_error() text."""

    def __init__(self, status: int, message: str):
        self.status = status
        super().__init__(f"native error {status}: {message}")


class DownloadError(TernError):
    pass


class AuthError(DownloadError):
    pass


class DiskSpaceError(DownloadError):
    pass


class ChecksumError(DownloadError):
    pass
