"""The Hugging Face token, kept in the system keychain through `keyring` — never in a plain file.

Where no keychain can be used (a headless Linux box: keyring's `fail` backend; or only a
plaintext backend such as keyrings.alt's, which would write the token to a file) `set()` raises
KeychainUnavailableError, and the caller may keep the token for this session only
(`set(token, session_only=True)`: it lives in this process's memory and nowhere else).
The token never appears in log lines, files Tern writes, reprs or exception messages.
"""
from __future__ import annotations

import logging
import os
import threading

import keyring
import keyring.backends.chainer
from keyring.errors import KeyringError, PasswordDeleteError

from engine.errors import TernError

log = logging.getLogger(__name__)

SERVICE = "Tern"
ACCOUNT = "huggingface-token"
MAX_TOKEN_LEN = 512


class KeychainUnavailableError(TernError):
    """No usable system keychain; the token can still be used for this session only."""


class InvalidTokenError(TernError):
    """The text given is not a usable token (its value is never repeated in the message)."""


def _keychain_problem(backend) -> str | None:
    """Why `backend` must not hold the token, or None if it may."""
    if isinstance(backend, keyring.backends.chainer.ChainerBackend):
        usable = [b for b in backend.backends if _keychain_problem(b) is None]
        return None if usable else "no secure keychain among keyring's backends"
    module = type(backend).__module__
    if module.startswith("keyring.backends.fail") or module.startswith("keyring.backends.null"):
        return "no system keychain is available"
    if module.startswith("keyrings.alt"):
        return f"keyring would store the token in a plain file ({type(backend).__name__})"
    return None


def _no_keychain_message(reason: str) -> str:
    return (f"Cannot store the Hugging Face token: {reason}. On Linux, install and unlock a Secret "
            "Service keychain (GNOME Keyring or KWallet, inside a desktop or `dbus-run-session`); "
            "or use the token for this session only — it is then forgotten when Tern exits.")


def check_token(token: str) -> str:
    token = (token or "").strip()
    if not token:
        raise InvalidTokenError("the token is empty")
    if len(token) > MAX_TOKEN_LEN or not token.isascii() or not token.isprintable() or any(c.isspace() for c in token):
        raise InvalidTokenError("that is not a Hugging Face token (one line of letters, digits, '_' or '-'); "
                                "copy it again from your Hugging Face settings → Access Tokens")
    return token


class TokenStore:
    """Set, get and clear the token. `backend` defaults to keyring's active one (read per call)."""

    def __init__(self, backend=None):
        self._backend = backend
        self._session: str | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"TokenStore(source={self.source()!r})"

    def _keychain(self):
        return self._backend if self._backend is not None else keyring.get_keyring()

    def keychain_available(self) -> bool:
        return _keychain_problem(self._keychain()) is None

    def set(self, token: str, *, session_only: bool = False) -> str:
        """Store the token; returns where it went: 'keychain' or 'session'."""
        token = check_token(token)
        if session_only:
            with self._lock:
                self._session = token
            log.info("secrets: Hugging Face token set for this session only")
            return "session"
        backend = self._keychain()
        problem = _keychain_problem(backend)
        if problem:
            raise KeychainUnavailableError(_no_keychain_message(problem))
        try:
            backend.set_password(SERVICE, ACCOUNT, token)
        except KeyringError as exc:
            raise KeychainUnavailableError(_no_keychain_message(
                f"the keychain refused it ({type(exc).__name__})")) from None
        with self._lock:
            self._session = None
        log.info("secrets: Hugging Face token stored in the system keychain (%s)", type(backend).__name__)
        return "keychain"

    def get(self) -> str | None:
        """The token to use: this session's, else the keychain's, else HF_TOKEN; None if none."""
        with self._lock:
            if self._session:
                return self._session
        backend = self._keychain()
        if _keychain_problem(backend) is None:
            try:
                token = backend.get_password(SERVICE, ACCOUNT)
            except KeyringError as exc:
                log.warning("secrets: cannot read the keychain (%s)", type(exc).__name__)
                token = None
            if token:
                return token
        return os.environ.get("HF_TOKEN") or None

    def source(self) -> str | None:
        """'session' | 'keychain' | 'environment' | None — for the settings page."""
        with self._lock:
            if self._session:
                return "session"
        backend = self._keychain()
        if _keychain_problem(backend) is None:
            try:
                if backend.get_password(SERVICE, ACCOUNT):
                    return "keychain"
            except KeyringError:
                pass
        return "environment" if os.environ.get("HF_TOKEN") else None

    def clear(self) -> None:
        """Forget the session token and delete the keychain entry (HF_TOKEN is the user's own)."""
        with self._lock:
            self._session = None
        backend = self._keychain()
        if _keychain_problem(backend) is not None:
            return
        try:
            backend.delete_password(SERVICE, ACCOUNT)
        except PasswordDeleteError:
            pass
        except KeyringError as exc:
            raise KeychainUnavailableError(_no_keychain_message(
                f"the keychain refused to delete it ({type(exc).__name__})")) from None
        log.info("secrets: Hugging Face token removed")


_default_store = TokenStore()


def default_store() -> TokenStore:
    """The process-wide store the CLI and the app share (it holds the session-only token)."""
    return _default_store


def get_token() -> str | None:
    return _default_store.get()


def set_token(token: str, *, session_only: bool = False) -> str:
    return _default_store.set(token, session_only=session_only)


def clear_token() -> None:
    _default_store.clear()


def keychain_available() -> bool:
    return _default_store.keychain_available()
