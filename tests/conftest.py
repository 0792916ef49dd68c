"""Shared fixtures: tiny BitNet models written by engine.testmodel (cached per arguments for the
whole session) and the real Llama-3 tokenizer fixture."""
from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
LLAMA3_TOKENIZER_DIR = REPO_ROOT.parent / "shared" / "fixtures" / "llama3-tokenizer"


@pytest.fixture(scope="session")
def llama3_tokenizer_dir() -> Path:
    """../shared/fixtures/llama3-tokenizer (tokenizer.json of the real Llama-3 tokenizer)."""
    if not (LLAMA3_TOKENIZER_DIR / "tokenizer.json").is_file():
        pytest.fail(f"tokenizer fixture missing: {LLAMA3_TOKENIZER_DIR}")
    return LLAMA3_TOKENIZER_DIR


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory, llama3_tokenizer_dir):
    """Factory `tiny_model_path(fmt, seed=1, tokenizer=True, embedding_type='f16') -> Path`.

    `tokenizer=True` gives the Llama-3 vocabulary (128256 tokens, ~70 MB file), False the
    259-token byte vocabulary (~0.5 MB). Each distinct call writes its file once per session."""
    from engine.testmodel import make_test_model

    root = tmp_path_factory.mktemp("tiny-models")
    cache: dict[tuple, Path] = {}

    def make(fmt: str, seed: int = 1, tokenizer: bool = True, embedding_type: str = "f16") -> Path:
        key = (fmt, seed, tokenizer, embedding_type)
        if key not in cache:
            out = root / f"tiny-{fmt}-s{seed}-{'llama3' if tokenizer else 'bytes'}-{embedding_type}.gguf"
            cache[key] = make_test_model(out, fmt, "tiny", seed,
                                         tokenizer_dir=llama3_tokenizer_dir if tokenizer else None,
                                         embedding_type=embedding_type)
        return cache[key]

    return make


def _typed_metadata(f) -> dict:
    from engine.gguf_file import ValueType
    from engine.gguf_write import Typed

    out = {}
    for key, value in f.metadata.items():
        vtype = f.kv_types[key]
        out[key] = Typed(ValueType.ARRAY, value, vtype[1]) if isinstance(vtype, tuple) else Typed(vtype, value)
    return out


@pytest.fixture(scope="session")
def rewrite_gguf():
    """`rewrite_gguf(src, dst, set_keys={}, drop_keys=(), drop_tensors=(), tensors={}) -> dst`:
    copy a GGUF with metadata (values keep their types unless replaced) and tensors changed;
    `tensors` maps a name to a WriterTensor that replaces (or is appended as) that tensor."""
    from engine.gguf_file import GGUFFile
    from engine.gguf_write import WriterTensor, write_gguf

    def rewrite(src, dst, set_keys=None, drop_keys=(), drop_tensors=(), tensors=None) -> Path:
        tensors = dict(tensors or {})
        with GGUFFile(src) as f:
            md = {k: v for k, v in _typed_metadata(f).items() if k not in drop_keys and k != "general.alignment"}
            md.update(set_keys or {})
            out = []
            for name, t in f.tensors.items():
                if name in drop_tensors:
                    continue
                if name in tensors:
                    out.append(tensors.pop(name))
                    continue
                data = bytes(f.tensor_bytes(name))
                out.append(WriterTensor(name, t.shape, t.ggml_type, lambda data=data: [data]))
            out.extend(tensors.values())
            return write_gguf(dst, md, out)

    return rewrite


@pytest.fixture(scope="session")
def kernels_verdict(tmp_path_factory) -> Path:
    """The app's first-start kernel self-test (a child process), run for real once per session:
    app test homes start with its verdict, as a user's does after the first start, so that the
    GUI timing tests do not share two cores with a self-test (tests/test_selftest.py covers the
    first start itself)."""
    from engine.selftest import ensure_kernels_checked
    stamp = tmp_path_factory.mktemp("kernels") / "selftest.json"
    ensure_kernels_checked(stamp)
    return stamp
