"""The model library with real GGUF files (engine.testmodel), and installs from the hub look-alike:
ensure_default_model downloads the default model once; a corrupted download never enters the library."""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest

from engine.download import RetryPolicy, part_path
from engine.errors import ChecksumError, ModelFormatError
from engine.library import (
    DEFAULT_FILE,
    DEFAULT_REPO,
    Library,
    ModelNotFoundError,
    default_model_path,
    ensure_default_model,
    install_converted,
    install_from_hub,
    load_catalogue,
    reveal_command,
)
from engine.model import inspect_gguf
from engine.testmodel import make_test_model

sys.path.insert(0, str(Path(__file__).parent))
from hf_fixture import write_hf_checkpoint  # noqa: E402
from hub_server import HubServer, HubState  # noqa: E402

FAST = RetryPolicy(backoff_base_s=0.05, stall_timeout_s=5.0)


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("TERN_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("TERN_MODELS_DIR", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    return tmp_path / "home"


@pytest.fixture(scope="module")
def gguf_bytes(tmp_path_factory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("gguf")
    return {fmt: make_test_model(out / f"{fmt}.gguf", fmt, "tiny", seed=3).read_bytes()
            for fmt in ("i2_s", "tq2_0")}


@pytest.fixture
def hub_state(gguf_bytes):
    state = HubState()
    state.add_repo(DEFAULT_REPO, {DEFAULT_FILE: gguf_bytes["i2_s"], "README.md": b"# test\n"})
    state.add_repo("tern-test/other", {"tiny-tq2_0.gguf": gguf_bytes["tq2_0"]})
    return state


@pytest.fixture
def hub(hub_state, home, monkeypatch):
    with HubServer(hub_state) as srv:
        monkeypatch.setenv("HF_ENDPOINT", srv.url)
        yield srv


def test_add_inspects_a_real_gguf(home, tmp_path, gguf_bytes):
    model = tmp_path / "dragged" / "tiny.gguf"
    model.parent.mkdir()
    model.write_bytes(gguf_bytes["i2_s"])
    lib = Library()
    entry = lib.add(model)
    info = inspect_gguf(model)
    assert entry.format == "GGUF" and entry.arch == "bitnet-b1.58" and entry.quant == "I2_S"
    assert entry.kind == "bitnet" and entry.ctx == info.context_length == 512
    assert entry.size == model.stat().st_size and entry.est_ram == info.est_ram_bytes > entry.size
    assert entry.sha256 == hashlib.sha256(gguf_bytes["i2_s"]).hexdigest() and entry.source == "local"
    assert entry.name == info.name
    index = json.loads((home / "data" / "library.json").read_text())
    assert index["schema_version"] == 1 and index["default"] == entry.id
    assert [e.id for e in Library().entries()] == [entry.id]        # persisted


def test_a_file_that_is_not_gguf_is_refused(home, tmp_path):
    junk = tmp_path / "notes.gguf"
    junk.write_bytes(b"this is not a model" * 10)
    with pytest.raises(ModelFormatError):
        Library().add(junk)
    assert Library().entries() == []


def test_default_delete_and_ownership(home, tmp_path, gguf_bytes):
    lib = Library()
    outside = tmp_path / "mine.gguf"
    outside.write_bytes(gguf_bytes["i2_s"])
    inside = lib.path_for("tern-test/other", "tiny-tq2_0.gguf")
    inside.parent.mkdir(parents=True)
    inside.write_bytes(gguf_bytes["tq2_0"])
    a, b = lib.add(outside), lib.add(inside, source="hf:tern-test/other/tiny-tq2_0.gguf@x")
    assert b.quant == "TQ2_0"
    assert default_model_path(lib) == outside.resolve()
    lib.set_default(b.id)
    assert lib.default().id == b.id and default_model_path(lib) == inside.resolve()
    lib.remove(b.id)                                  # Tern's own copy: deleted
    assert not inside.exists() and not inside.parent.exists()
    assert lib.default().id == a.id                   # falls back to what is left
    lib.remove(a.id)                                  # the user's own file: only forgotten
    assert outside.exists() and lib.entries() == [] and default_model_path(lib) is None
    with pytest.raises(ModelNotFoundError):
        lib.set_default(a.id)


def test_reveal_command_points_at_the_file_or_its_folder(tmp_path):
    cmd = reveal_command(tmp_path / "m.gguf")
    assert cmd[0] in ("open", "explorer", "xdg-open")
    assert str(tmp_path) in " ".join(cmd)


def test_ensure_default_model_downloads_once(hub, hub_state, home):
    seen = []
    path = ensure_default_model(progress=seen.append, free_space=lambda p: 10**12)
    assert path == Library().path_for(DEFAULT_REPO, DEFAULT_FILE)
    assert path.read_bytes() == hub_state.repos[DEFAULT_REPO].files[DEFAULT_FILE]
    assert seen and seen[-1].phase == "done"
    entry = Library().default()
    assert entry.source.startswith(f"hf:{DEFAULT_REPO}/{DEFAULT_FILE}@")
    assert entry.kind == "bitnet" and entry.quant == "I2_S"
    gets = len(hub_state.ranges(DEFAULT_FILE))
    assert ensure_default_model() == path and default_model_path() == path
    assert len(hub_state.ranges(DEFAULT_FILE)) == gets      # no second download


def test_install_resumes_a_part_left_by_an_earlier_run(hub, hub_state, home):
    data = hub_state.repos["tern-test/other"].files["tiny-tq2_0.gguf"]
    lib = Library()
    hub_state.cut_after, hub_state.cuts_left = len(data) // 2, 1
    entry = install_from_hub("tern-test/other", "tiny-tq2_0.gguf", library=lib, policy=FAST)
    assert Path(entry.path).read_bytes() == data
    ranges = hub_state.ranges("tiny-tq2_0.gguf")
    assert ranges[0] == "bytes=0-" and ranges[1] != "bytes=0-"
    again = install_from_hub("tern-test/other", "tiny-tq2_0.gguf", library=lib, policy=FAST)
    assert again.id == entry.id and len(hub_state.ranges("tiny-tq2_0.gguf")) == 2


def test_a_corrupted_download_never_enters_the_library(hub, hub_state, home):
    hub_state.corrupt.add(f"{DEFAULT_REPO}/{DEFAULT_FILE}")
    with pytest.raises(ChecksumError):
        ensure_default_model()
    dest = Library().path_for(DEFAULT_REPO, DEFAULT_FILE)
    assert not dest.exists() and not part_path(dest).exists()
    assert Library().entries() == [] and default_model_path() is None


def test_safetensors_checkpoint_is_downloaded_and_converted(hub, hub_state, home, tmp_path):
    ckpt = write_hf_checkpoint(tmp_path / "ckpt", seed=5, packed=True)
    files = {p.name: p.read_bytes() for p in ckpt.iterdir()}
    hub_state.add_repo("microsoft/bitnet-b1.58-2B-4T", {**files, "README.md": b"card"})
    seen = []
    entry = install_converted("microsoft/bitnet-b1.58-2B-4T", "i2_s", progress=seen.append, policy=FAST)
    assert entry.kind == "bitnet" and entry.quant == "I2_S" and entry.format == "GGUF"
    assert entry.source.startswith("converted:hf:microsoft/bitnet-b1.58-2B-4T@")
    assert Path(entry.path).is_file() and Path(entry.path).is_relative_to(Library().models_dir)
    assert not (Library().models_dir / "checkpoints").exists()          # checkpoint removed after
    assert seen[-1].phase == "converting" and seen[-1].total == sum(map(len, files.values()))
    dl = [e.done for e in seen if e.phase == "downloading"]
    assert dl == sorted(dl) and dl[-1] == seen[-1].total                  # one bar over all files
    assert hub_state.ranges("README.md") == []                            # only what conversion needs


def test_catalogue_lists_the_default_model_first():
    models = load_catalogue()
    first = models[0]
    assert (first["repo"], first["file"], first["default"]) == (DEFAULT_REPO, DEFAULT_FILE, True)
    assert first["format"] == "I2_S" and first["license"] == "MIT" and first["training"] == "native"
    assert 1.1e9 < first["approx_size_bytes"] < 1.3e9
    assert sum(m["default"] for m in models) == 1
    for m in models:
        assert m["route"] in ("gguf", "convert", "external")
        assert m["training"] in ("native", "quantized-after-training")
        assert m["repo"].count("/") == 1
        assert m["route"] != "gguf" or m["file"].endswith(".gguf")
    assert any(m["route"] == "convert" for m in models)


def test_models_command_lists_the_library(home, tmp_path, gguf_bytes, capsys):
    from engine.cli import main
    model = tmp_path / "tiny.gguf"
    model.write_bytes(gguf_bytes["i2_s"])
    assert main(["models", "--add", str(model)]) == 0
    capsys.readouterr()
    assert main(["models", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(m["quant"], m["default"], m["missing"]) for m in listed] == [("I2_S", True, False)]
    assert main(["models"]) == 0
    table = capsys.readouterr().out
    assert listed[0]["id"] in table and "I2_S" in table and table.splitlines()[1].startswith("*")


def test_concurrent_edits_lose_nothing(home, tmp_path, gguf_bytes):
    import threading
    models = []
    for i in range(6):                      # six distinct files: the tiny model with its name varied
        data = bytearray(gguf_bytes["i2_s"])
        data[-1] ^= i + 1                   # last byte of the last tensor: a different file, same header
        path = tmp_path / f"m{i}.gguf"
        path.write_bytes(bytes(data))
        models.append(path)
    barrier = threading.Barrier(len(models))

    def add(path):
        barrier.wait()
        Library().add(path)

    threads = [threading.Thread(target=add, args=(p,)) for p in models]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(Path(e.path).name for e in Library().entries()) == sorted(p.name for p in models)
