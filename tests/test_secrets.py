"""The Hugging Face token: keyring storage (an in-memory test backend), headless fallback, and a
gated repository on the hub look-alike — 401 with the exact steps, success with the stored token,
and the token in no log line and no file."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import keyring
import keyring.backend
import keyring.backends.fail
import pytest

from engine import hub
from engine.download import RetryPolicy, download_file
from engine.errors import AuthError
from engine.secrets import ACCOUNT, SERVICE, InvalidTokenError, KeychainUnavailableError, TokenStore
from engine.testmodel import make_test_model

sys.path.insert(0, str(Path(__file__).parent))
from hub_server import HubServer, HubState, token_digest  # noqa: E402

TOKEN = "hf_TernTestTokenQ7vX9pLm2KdR4sWz8YbN"
GATED = "tern-test/gated-ternary"
FAST = RetryPolicy(backoff_base_s=0.05, stall_timeout_s=5.0)


class MemoryKeyring(keyring.backend.KeyringBackend):
    """A keychain that lives in this process only."""
    priority = 1

    def __init__(self):
        super().__init__()
        self.items: dict[tuple[str, str], str] = {}

    def get_password(self, service, username):
        return self.items.get((service, username))

    def set_password(self, service, username, password):
        self.items[(service, username)] = password

    def delete_password(self, service, username):
        if self.items.pop((service, username), None) is None:
            raise keyring.errors.PasswordDeleteError("not found")


class PlaintextLookalike(MemoryKeyring):
    """Stands for keyrings.alt's PlaintextKeyring, which writes secrets to a file."""


PlaintextLookalike.__module__ = "keyrings.alt.file"


@pytest.fixture
def memory_keyring():
    before = keyring.get_keyring()
    backend = MemoryKeyring()
    keyring.set_keyring(backend)
    yield backend
    keyring.set_keyring(before)


@pytest.fixture
def no_keychain():
    before = keyring.get_keyring()
    keyring.set_keyring(keyring.backends.fail.Keyring())
    yield
    keyring.set_keyring(before)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> bytes:
    return make_test_model(tmp_path_factory.mktemp("m") / "tiny.gguf", "i2_s", "tiny", seed=4).read_bytes()


@pytest.fixture
def gated_hub(monkeypatch, tmp_path, tiny_gguf):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    state = HubState(token_sha256={token_digest(TOKEN)})
    state.add_repo(GATED, {"model.gguf": tiny_gguf}, gated=True)
    with HubServer(state) as srv:
        monkeypatch.setenv("HF_ENDPOINT", srv.url)
        monkeypatch.setenv("TERN_HOME", str(tmp_path / "home"))
        yield state


def files_containing(root: Path, needle: bytes) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


def test_token_round_trip_through_the_keychain(memory_keyring, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    store = TokenStore()
    assert store.keychain_available() and store.get() is None
    assert store.set(f"  {TOKEN}\n") == "keychain"
    assert memory_keyring.items == {(SERVICE, ACCOUNT): TOKEN}
    assert TokenStore().get() == TOKEN              # a new process would find it too
    assert store.source() == "keychain" and TOKEN not in repr(store)
    store.clear()
    assert store.get() is None and memory_keyring.items == {}
    store.clear()                                   # clearing twice is fine


def test_headless_linux_says_so_and_offers_the_session(no_keychain, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    store = TokenStore()
    assert not store.keychain_available()
    with pytest.raises(KeychainUnavailableError, match="no system keychain.*session only") as info:
        store.set(TOKEN)
    assert TOKEN not in str(info.value)
    assert store.get() is None
    assert store.set(TOKEN, session_only=True) == "session"
    assert store.get() == TOKEN and store.source() == "session"
    assert TokenStore().get() is None               # the session token is this store's alone
    store.clear()
    assert store.get() is None


def test_a_plaintext_keyring_is_refused():
    store = TokenStore(backend=PlaintextLookalike())
    with pytest.raises(KeychainUnavailableError, match="plain file"):
        store.set(TOKEN)
    assert store._keychain().items == {}


def test_a_malformed_token_is_refused_without_echoing_it(memory_keyring):
    bad = "hf_secret part\nX-Injected: yes"
    with pytest.raises(InvalidTokenError) as info:
        TokenStore().set(bad)
    assert "secret" not in str(info.value) and memory_keyring.items == {}
    with pytest.raises(InvalidTokenError, match="empty"):
        TokenStore().set("   ")


def test_gated_repo_without_token_says_what_to_do(gated_hub, memory_keyring, tmp_path):
    with pytest.raises(AuthError) as info:
        hub.remote_file(GATED, "model.gguf", token=TokenStore().get())
    message = str(info.value)
    assert f"/{GATED}" in message and "accept the licence" in message
    assert "Settings" in message and "python -m engine download --token" in message
    assert not (tmp_path / "m").exists()
    resolve = [r for r in gated_hub.requests if "/resolve/" in r["path"]]
    assert resolve and all(r["auth"] == "none" for r in resolve)


def test_download_without_token_is_refused_with_the_same_help(gated_hub, memory_keyring, tmp_path):
    remote = hub.remote_file(GATED, "model.gguf", token=TOKEN)   # metadata fetched with access …
    with pytest.raises(AuthError, match="accept the licence"):   # … but the transfer has none
        download_file(remote, tmp_path / "m" / "model.gguf", policy=FAST)
    assert not (tmp_path / "m" / "model.gguf").exists()


def test_a_wrong_token_is_refused_and_not_echoed(gated_hub, memory_keyring):
    wrong = "hf_WrongTokenZZZZZZZZZZZZZZZZZZZZZZ"
    with pytest.raises(AuthError) as info:
        hub.remote_file(GATED, "model.gguf", token=wrong)
    assert wrong not in str(info.value) and "has no access" in str(info.value)
    assert all(wrong not in str(e) for e in _chain(info.value))


def test_gated_repo_with_keychain_token_succeeds_and_leaks_nowhere(gated_hub, memory_keyring, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    store = TokenStore()
    store.set(TOKEN)
    dest = tmp_path / "m" / "model.gguf"
    remote = hub.remote_file(GATED, "model.gguf", token=store.get())
    download_file(remote, dest, token=store.get(), policy=FAST)
    assert dest.read_bytes() == gated_hub.repos[GATED].files["model.gguf"]
    resolve_gets = [r for r in gated_hub.requests if r["method"] == "GET" and "/resolve/" in r["path"]]
    assert resolve_gets and all(r["auth"] == "valid" for r in resolve_gets)
    assert caplog.records, "expected log lines to inspect"
    assert all(TOKEN not in r.getMessage() for r in caplog.records)
    assert TOKEN not in caplog.text
    assert files_containing(tmp_path, TOKEN.encode()) == []


def _chain(exc: BaseException):
    while exc is not None:
        yield exc
        exc = exc.__cause__ or exc.__context__


def test_cli_token_flag_stores_the_token_and_downloads(gated_hub, memory_keyring, monkeypatch, capsys, caplog,
                                                        tmp_path):
    import io

    from engine.cli import main
    caplog.set_level(logging.DEBUG)
    monkeypatch.setattr(sys, "stdin", io.StringIO(TOKEN + "\n"))     # not a TTY: one line is read
    assert main(["download", GATED, "model.gguf", "--token"]) == 0
    out, err = capsys.readouterr()
    assert memory_keyring.items == {(SERVICE, ACCOUNT): TOKEN}
    assert "token stored in the system keychain" in err and "I2_S" in err
    assert TOKEN not in out + err + caplog.text
    assert files_containing(tmp_path, TOKEN.encode()) == []
    assert all(r["auth"] == "valid" for r in gated_hub.requests if r["method"] == "GET" and "/resolve/" in r["path"])
    assert main(["download", "--forget-token"]) == 0
    assert memory_keyring.items == {}
