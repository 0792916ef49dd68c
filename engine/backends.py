"""Backend selection: which decoder runs a model file.

BitNet files (architectures `bitnet-b1.58`, `bitnet-25`, `bitnet`) run on Tern's own engine:
`native` (the C library) when it is built and loads, else `reference` (numpy, exact but slow);
`cuda` is the same C library on an NVIDIA GPU. Every other GGUF runs through llama-cpp-python.
The optional backends are imported only when asked for, so a machine without the native
library or without llama-cpp-python still runs everything else, and asking for a missing one
gives a BackendUnavailableError that says what is missing.
"""
from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from pathlib import Path

from engine.errors import TernError, UnsupportedModelError

log = logging.getLogger(__name__)

BACKENDS = ("auto", "reference", "native", "cuda", "llama.cpp")
LM_HEADS = ("int8", "f16")
DEFAULT_CONTEXT = 4096


class BackendUnavailableError(TernError):
    """The backend asked for is not installed, not built, or cannot run on this machine."""

    def __init__(self, backend: str, reason: str):
        self.backend = backend
        self.reason = reason
        super().__init__(f"backend '{backend}' is not available: {reason}")


class BackendArgumentError(TernError, ValueError):
    """An unknown backend name or an invalid decoder setting."""


@dataclass
class OpenedModel:
    decoder: object                 # the Decoder protocol
    info: object                    # engine.model.ModelInfo from the header
    tokenizer_metadata: dict | None  # `tokenizer.*` keys, for BitNet files (Tern builds the tokenizer)


def open_decoder(model_path, backend: str = "auto", n_ctx: int | None = DEFAULT_CONTEXT, threads: int | None = None,
                 lm_head: str = "int8"):
    """Open a decoder (docs/ENGINE-API.md, "Decoders") for the GGUF at `model_path`.

    Raises ModelFormatError for a file that cannot be read, UnsupportedModelError for a file
    that no backend here runs (or not the one asked for), BackendUnavailableError when the
    backend is not installed, BackendArgumentError for bad settings.
    """
    return open_model(model_path, backend, n_ctx, threads, lm_head).decoder


def open_model(model_path, backend: str = "auto", n_ctx: int | None = DEFAULT_CONTEXT, threads: int | None = None,
               lm_head: str = "int8") -> OpenedModel:
    """open_decoder, also returning what the header said and the tokenizer metadata, so that a
    chat session does not parse the file again. n_ctx None: default_context(info)."""
    _check_settings(backend, n_ctx, threads, lm_head)
    path = Path(model_path)
    from engine.model import inspect_gguf
    info = inspect_gguf(path)
    chosen = resolve_backend(path, info, backend)
    if n_ctx is None:
        n_ctx = default_context(info)
    if chosen == "llama.cpp":
        return OpenedModel(_open_llama_cpp(path, n_ctx, threads), info, None)
    from engine.model import load_model
    model = load_model(path)
    try:
        decoder = _open_bitnet(model, chosen, backend == "auto", n_ctx, threads, lm_head)
    except BaseException:
        model.close()
        raise
    tokenizer_metadata = dict(model.tokenizer_metadata)
    if decoder.backend_name == "reference":
        model.close()       # the reference decoder copied what it needs; the native one owns the model
    return OpenedModel(decoder, info, tokenizer_metadata)


def default_context(info) -> int:
    """The context a session gets when none is asked for: the model's training context,
    at most DEFAULT_CONTEXT (longer ones cost KV-cache memory few chats need)."""
    return min(DEFAULT_CONTEXT, info.context_length or DEFAULT_CONTEXT)


def resolve_backend(path: Path, info, backend: str) -> str:
    """The backend that will run the file: `backend` itself, or for 'auto' the best candidate
    ('native' for BitNet files — open_decoder falls back to 'reference' if it cannot load)."""
    if info.kind == "unsupported":
        raise UnsupportedModelError(path, info.reason or f"architecture '{info.arch}' is not supported")
    if info.kind == "llama.cpp":
        if backend not in ("auto", "llama.cpp"):
            raise UnsupportedModelError(
                path, f"architecture '{info.arch}' runs only with the llama.cpp backend, not '{backend}'")
        return "llama.cpp"
    return "native" if backend == "auto" else backend


def available_backends() -> dict[str, str | None]:
    """Each backend name → None if it can be imported here, else the reason it cannot.
    (Importable is not the same as usable: the native library may still refuse to load.)"""
    out: dict[str, str | None] = {"reference": None}
    for name, module in (("native", "engine.native"), ("llama.cpp", "engine.llama_backend")):
        try:
            importlib.import_module(module)
            out[name] = None
        except (ImportError, OSError, AttributeError) as exc:
            out[name] = f"{type(exc).__name__}: {exc}"
    out["cuda"] = out["native"]
    return out


# ---------------------------------------------------------------------------------------------

def _check_settings(backend: str, n_ctx: int, threads: int | None, lm_head: str) -> None:
    if backend not in BACKENDS:
        raise BackendArgumentError(f"unknown backend '{backend}' (choose from {', '.join(BACKENDS)})")
    if lm_head not in LM_HEADS:
        raise BackendArgumentError(f"unknown LM head '{lm_head}' (choose from {', '.join(LM_HEADS)})")
    if n_ctx is not None and (not isinstance(n_ctx, int) or n_ctx < 1):
        raise BackendArgumentError(f"context length must be a positive integer, got {n_ctx!r}")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise BackendArgumentError(f"threads must be a positive integer, got {threads!r}")


def _open_bitnet(model, chosen: str, auto: bool, n_ctx: int, threads: int | None, lm_head: str):
    if chosen == "reference":
        from engine.reference import ReferenceDecoder
        return ReferenceDecoder(model, n_ctx)
    device = "cuda" if chosen == "cuda" else "cpu"
    try:
        NativeDecoder = _optional_class("engine.native", "NativeDecoder", chosen)
        return NativeDecoder(model, n_ctx=n_ctx, threads=threads, lm_head=lm_head, device=device)
    except (BackendUnavailableError, OSError) as exc:
        if not auto:
            raise
        log.warning("native backend unavailable (%s); using the numpy reference decoder (slow)", exc)
        from engine.reference import ReferenceDecoder
        return ReferenceDecoder(model, n_ctx)


def _open_llama_cpp(path: Path, n_ctx: int, threads: int | None):
    LlamaCppDecoder = _optional_class("engine.llama_backend", "LlamaCppDecoder", "llama.cpp")
    return LlamaCppDecoder(path, n_ctx=n_ctx, threads=threads)


def _optional_class(module_name: str, class_name: str, backend: str):
    try:
        module = importlib.import_module(module_name)
    except (ImportError, OSError, AttributeError) as exc:
        # ImportError: the package is missing; OSError / AttributeError: ctypes cannot load the
        # shared library or finds a symbol missing (a stale build).
        raise BackendUnavailableError(backend, f"cannot import {module_name} ({type(exc).__name__}: {exc})") from exc
    cls = getattr(module, class_name, None)
    if cls is None:
        raise BackendUnavailableError(backend, f"{module_name} has no {class_name}")
    return cls
