"""Tokenizer: built from GGUF-style metadata, checked against the `tokenizers` library loading
Meta's Llama-3 tokenizer.json on thousands of generated strings; goldens; special tokens;
streaming detokenization; the GGUF metadata bitnet.cpp's converter writes; bad metadata."""
from __future__ import annotations

import functools
import logging
import os
import random
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer as HFTokenizer

from engine.errors import ModelFormatError
from engine.tokenizer import (
    BITNET_CONVERTER_CHAT_TEMPLATE,
    TOKEN_CONTROL,
    TOKEN_NORMAL,
    Tokenizer,
    byte_to_unicode,
    gguf_metadata_byte_vocab,
    gguf_metadata_from_hf_tokenizer,
)

LLAMA3_DIR = Path(os.environ.get(
    "TERN_LLAMA3_TOKENIZER", Path(__file__).resolve().parents[2] / "shared/fixtures/llama3-tokenizer"))

BOS, EOS, EOT = 128000, 128001, 128009


@functools.lru_cache(maxsize=1)
def llama3_gguf_tokenizer() -> tuple[dict, Tokenizer]:
    """GGUF metadata of the fixture and the Tokenizer built from it: once per test process
    (test_chat.py uses them too)."""
    assert (LLAMA3_DIR / "tokenizer.json").is_file(), (
        f"Llama-3 tokenizer fixture missing at {LLAMA3_DIR} (set TERN_LLAMA3_TOKENIZER)")
    md = gguf_metadata_from_hf_tokenizer(LLAMA3_DIR)
    return md, Tokenizer.from_gguf_metadata(md)


@pytest.fixture(scope="session")
def llama3_metadata() -> dict:
    return dict(llama3_gguf_tokenizer()[0])


@pytest.fixture(scope="session")
def tok() -> Tokenizer:
    return llama3_gguf_tokenizer()[1]


@pytest.fixture(scope="session")
def hf() -> HFTokenizer:
    hf = HFTokenizer.from_file(str(LLAMA3_DIR / "tokenizer.json"))
    hf.encode_special_tokens = True      # special spellings in text stay text, as in Tern
    return hf


# ---------------------------------------------------------------------------------------------
# Generated test strings
# ---------------------------------------------------------------------------------------------

SCRIPTS = [
    "The quick brown fox jumps over the lazy dog.", "Ünïcödé façade naïve coöperate Æsir øre",
    "Ελληνικά: Γειά σου Κόσμε", "Привет, мир! Съешь же ещё этих мягких французских булок",
    "مرحبا بالعالم", "שלום עולם", "नमस्ते दुनिया", "สวัสดีชาวโลก", "你好，世界！今天天气很好。",
    "こんにちは世界、カタカナとひらがな", "안녕하세요 세계", "Tiếng Việt có dấu", "ᚠᛇᚻ᛫ᛒᛦᚦ",
    "e\u0301 a\u0308 combining marks", "Ｆｕｌｌｗｉｄｔｈ　ｔｅｘｔ", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝕞𝕒𝕥𝕙 ∑∫∂√∞≠≤",
    "ʻOkina and ʼapostrophes", "Ελ-Ru-日本-mixed", "İstanbul ıi ß ẞ ǅ",
]
CODE = [
    "def f(x):\n    return x ** 2  # square\n", "for (int i = 0; i < n; ++i) { a[i] += b[i]; }",
    '{"key": [1, 2.5e-3, null, true], "nested": {"a": "b"}}', "<div class=\"x\">&amp; &lt;p&gt;</div>",
    "SELECT * FROM t WHERE id IN (1,2,3) ORDER BY name DESC;", "x = lambda *a, **k: (a, k)",
    "#include <stdio.h>\nint main(void){printf(\"%d\\n\", 42);}", "fn main() -> Result<(), Box<dyn Error>> {}",
    "  if x:\n\t\tpass\r\n", "a&&b||!c ? d : e;", "$ ls -la | grep '^d' > out.txt 2>&1",
]
WHITESPACE = [" ", "  ", "    ", "\t", "\t\t", "\n", "\n\n", "\r\n", " \n ", "\n \n", "   \t  \n\n\t ",
              "\u00a0", "\u3000", "\u2003", "\u200b", "\ufeff", "\x0b", "\x0c", "\x85"]
EMOJI = ["😀", "👍🏽", "👨‍👩‍👧‍👦", "🏳️‍🌈", "🇫🇷🇯🇵", "1️⃣", "❤️", "🧑🏿‍💻", "🤷‍♀️", "👁️‍🗨️", "🫠"]
CONTRACTIONS = ["it's", "don't", "they're", "we've", "I'm", "you'll", "he'd", "IT'S", "DON'T",
                "She'S", "o'clock", "rock'n'roll", "it’s", "'s", "''", "'t've"]
LOOKALIKES = ["<|eot_id|>", "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>user<|end_header_id|>",
              "<|reserved_special_token_5|>", "<|eot_id", "eot_id|>", "< |eot_id| >", "<<|eot_id|>>",
              "<|EOT_ID|>", "<s>", "</s>", "[INST]", "<|im_start|>"]


def _numbers(rng: random.Random) -> str:
    kind = rng.randrange(5)
    if kind == 0:
        return "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 40)))
    if kind == 1:
        return f"{rng.randint(0, 10**9):,}"
    if kind == 2:
        return f"{rng.uniform(-1e6, 1e6):.{rng.randint(0, 8)}f}"
    if kind == 3:
        return f"{rng.randint(1, 31)}/{rng.randint(1, 12)}/{rng.randint(1900, 2100)}"
    return f"v{rng.randint(0, 99)}.{rng.randint(0, 99)}.{rng.randint(0, 999)}-rc{rng.randint(0, 9)}"


def _random_codepoints(rng: random.Random) -> str:
    out = []
    for _ in range(rng.randint(1, 12)):
        cp = rng.choice([rng.randint(0x20, 0x7E), rng.randint(0xA0, 0x2FFF), rng.randint(0x3000, 0xD7FF),
                         rng.randint(0xE000, 0xFFFD), rng.randint(0x10000, 0x10FFFF), rng.randint(0, 0x1F)])
        out.append(chr(cp))
    return "".join(out)


def generated_strings(n: int = 2400, seed: int = 1234) -> list[str]:
    """Deterministic, varied inputs: every fixed sample alone, then random mixtures."""
    rng = random.Random(seed)
    pools = [SCRIPTS, CODE, WHITESPACE, EMOJI, CONTRACTIONS, LOOKALIKES]
    out = [s for pool in pools for s in pool]
    out += ["eight-bit", "8-bit", "1.58-bit", "well-known", "e-mail", "x--y", "a - b", "-bit", ""]
    while len(out) < n:
        parts = []
        for _ in range(rng.randint(1, 8)):
            choice = rng.randrange(9)
            if choice < 6:
                parts.append(rng.choice(pools[choice]))
            elif choice == 6:
                parts.append(_numbers(rng))
            elif choice == 7:
                parts.append(_random_codepoints(rng))
            else:
                parts.append(" " * rng.randint(1, 6) if rng.random() < 0.5 else rng.choice(WHITESPACE) * rng.randint(1, 4))
        sep = rng.choice(["", " ", "\n", "\t", ", "])
        out.append(sep.join(parts))
    return out


STRINGS = generated_strings()


# ---------------------------------------------------------------------------------------------
# Agreement with the reference tokenizer
# ---------------------------------------------------------------------------------------------

def test_generated_strings_are_varied():
    assert len(STRINGS) >= 2000 and len(set(STRINGS)) >= 1900
    joined = "".join(STRINGS)
    for needle in ("\t", "\n", "\u200d", "<|eot_id|>", "'s", "你", "\U0001F600"):
        assert needle in joined


def test_agrees_with_tokenizers_on_generated_strings(tok, hf):
    expected = [e.ids for e in hf.encode_batch(STRINGS, add_special_tokens=False)]
    got = tok.encode_batch(STRINGS)
    mismatches = [(s, g, e) for s, g, e in zip(STRINGS, got, expected) if g != e]
    assert not mismatches, f"{len(mismatches)} of {len(STRINGS)} differ, first: {mismatches[0]!r}"
    # encode() and encode_batch() are the same tokenizer
    assert [tok.encode(s) for s in STRINGS[:200]] == got[:200]


def test_round_trip(tok):
    for s in STRINGS:
        assert tok.decode(tok.encode(s)) == s


def test_text_never_produces_special_tokens(tok):
    for ids in tok.encode_batch(STRINGS):
        assert all(not tok.is_special(i) for i in ids)
    for name, tid in tok.special_tokens.items():
        ids = tok.encode(name)
        assert tid not in ids and len(ids) > 1


# ---------------------------------------------------------------------------------------------
# Goldens
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, ids", [
    ("eight-bit", [68632, 15615]),                 # `-bit` is one token, as the model was trained
    ("Hello world", [9906, 1917]),
    ("<|eot_id|>", [27, 91, 68, 354, 851, 91, 29]),
    (" 12345678", [220, 4513, 10961, 2495]),      # digits in groups of at most three
    ("it's", [275, 596]),
])
def test_goldens(tok, text, ids):
    assert tok.encode(text) == ids


def test_lone_surrogates_become_replacement_characters(tok):
    assert tok.encode("a\ud800b") == tok.encode("a\ufffdb")
    assert tok.decode(tok.encode("x\udfff")) == "x\ufffd"


def test_bos_and_specials(tok):
    assert tok.encode("Hello world", add_bos=True) == [BOS, 9906, 1917]
    assert tok.bos_id == BOS and tok.eos_id == EOS
    assert tok.eos_ids == {EOS, EOT}            # the file names 128001; turns end with 128009
    assert tok.encode_special("<|eot_id|>") == EOT
    assert tok.is_special(EOT) and tok.is_special(128255) and not tok.is_special(15615)
    assert tok.token_to_piece(EOT) == b"<|eot_id|>"
    assert tok.token_to_piece(15615) == b"-bit"
    assert tok.decode([9906, EOT]) == "Hello<|eot_id|>"
    assert tok.decode([9906, EOT], skip_special=True) == "Hello"
    with pytest.raises(KeyError):
        tok.encode_special("<|no_such_token|>")
    with pytest.raises(IndexError):
        tok.token_to_piece(tok.n_vocab)


def test_llama3_split_even_without_pre_key(llama3_metadata, tok):
    assert "tokenizer.ggml.pre" not in llama3_metadata
    assert tok.pre == "llama3"


def test_explicit_llama3_pre_and_plain_list_metadata(llama3_metadata, tok):
    # A reader may hand back plain lists, bytes and ints instead of numpy values.
    md = dict(llama3_metadata)
    md["tokenizer.ggml.pre"] = "llama-bpe"
    md["tokenizer.ggml.token_type"] = md["tokenizer.ggml.token_type"].tolist()
    md["tokenizer.ggml.tokens"] = [t.encode("utf-8") for t in md["tokenizer.ggml.tokens"]]
    md["tokenizer.ggml.bos_token_id"] = int(md["tokenizer.ggml.bos_token_id"])
    t = Tokenizer.from_gguf_metadata(md)
    assert t.pre == "llama3" and t.eos_ids == tok.eos_ids and t.add_bos
    assert t.encode("eight-bit", add_bos=True) == [BOS, 68632, 15615]


def test_other_pre_uses_gpt2_split_like_llama_cpp_default(llama3_metadata, caplog):
    # The GPT-2 split, like llama.cpp's default one, cuts `-` from `bit` (what bitnet.cpp does
    # with the official file).
    with caplog.at_level(logging.WARNING, logger="engine.tokenizer"):
        t = Tokenizer.from_gguf_metadata({**llama3_metadata, "tokenizer.ggml.pre": "qwen2"})
    assert t.pre == "gpt2" and "qwen2" in caplog.text
    assert t.encode("eight-bit") == [68632, 12, 4590]


# ---------------------------------------------------------------------------------------------
# Streaming detokenizer
# ---------------------------------------------------------------------------------------------

def test_detokenizer_holds_back_split_characters(tok):
    text = "héllo 😀👨‍👩‍👧 日本語 ok"
    ids = tok.encode(text)
    detok = tok.detokenizer()
    deltas = [detok.feed(i) for i in ids]
    assert "".join(deltas) + detok.flush() == text
    assert "" in deltas                             # some emoji span several tokens
    assert all("\ufffd" not in d for d in deltas)


def test_detokenizer_flushes_incomplete_tail_and_skips_specials(tok):
    ids = tok.encode("ok👨")
    assert len(ids) == 4                            # 'ok', then the emoji's 4 bytes as 2+1+1
    detok = tok.detokenizer()
    assert [detok.feed(i) for i in ids[:-1]] == ["ok", "", ""]   # stop inside the emoji
    assert detok.flush() == "\ufffd"
    assert detok.feed(ids[-1]) == "\ufffd"          # a lone continuation byte after the flush
    assert detok.feed(EOT) == ""
    assert tok.detokenizer(skip_special=False).feed(EOT) == "<|eot_id|>"


# ---------------------------------------------------------------------------------------------
# GGUF metadata as bitnet.cpp's converter writes it
# ---------------------------------------------------------------------------------------------

def test_gguf_metadata_layout(llama3_metadata):
    md = llama3_metadata
    assert md["tokenizer.ggml.model"] == "gpt2"
    tokens = md["tokenizer.ggml.tokens"]
    assert len(tokens) == 128256 and all(isinstance(t, str) for t in tokens[:10])
    assert tokens[15615] == "-bit" and tokens[128009] == "<|eot_id|>" and tokens[220] == "Ġ"
    types = md["tokenizer.ggml.token_type"]
    assert types.dtype == np.int32
    assert (types[:128000] == TOKEN_NORMAL).all() and (types[128000:] == TOKEN_CONTROL).all()
    scores = md["tokenizer.ggml.scores"]
    assert scores.dtype == np.float32 and (scores[:128000] == 0).all() and (scores[128000:] == -1000).all()
    merges = md["tokenizer.ggml.merges"]
    assert len(merges) == 280147 and merges[0] == "Ġ Ġ"
    assert md["tokenizer.ggml.bos_token_id"] == BOS and md["tokenizer.ggml.eos_token_id"] == EOS
    assert isinstance(md["tokenizer.ggml.bos_token_id"], np.uint32)
    assert md["tokenizer.ggml.add_bos_token"] is True
    assert md["tokenizer.chat_template"] == BITNET_CONVERTER_CHAT_TEMPLATE
    assert "BITNETAssistant" in BITNET_CONVERTER_CHAT_TEMPLATE
    assert "tokenizer.ggml.pre" not in md


def test_hf_dir_that_is_not_byte_level_bpe(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "Unigram", "vocab": []}, "decoder": null}')
    with pytest.raises(ModelFormatError, match="byte-level BPE"):
        gguf_metadata_from_hf_tokenizer(tmp_path)
    with pytest.raises(ModelFormatError, match="cannot read"):
        gguf_metadata_from_hf_tokenizer(tmp_path / "nowhere")


# ---------------------------------------------------------------------------------------------
# Tiny byte-level vocabularies (test models)
# ---------------------------------------------------------------------------------------------

def test_byte_vocab_without_merges():
    t = Tokenizer.from_gguf_metadata(gguf_metadata_byte_vocab())
    assert t.n_vocab == 259 and t.pre == "gpt2"
    text = "héllo, wörld 😀 <|eot_id|>"
    ids = t.encode(text)
    assert ids == list(text.encode("utf-8"))       # id = byte value
    assert t.decode(ids) == text
    assert t.bos_id == 256 and t.eos_ids == {257, 258} and t.encode_special("<|eot_id|>") == 258
    assert t.encode("a", add_bos=True) == [256, 97]


@pytest.mark.parametrize("pre, split", [("llama-bpe", "llama3"), ("llama3", "llama3"), ("falcon3", "llama3"),
                                        ("falcon_e", "llama3"), ("default", "gpt2"), ("gpt-2", "gpt2"),
                                        ("deepseek-v3", "gpt2")])
def test_pre_names(pre, split):
    md = {k: v for k, v in gguf_metadata_byte_vocab().items() if k != "tokenizer.ggml.add_bos_token"}
    t = Tokenizer.from_gguf_metadata({**md, "tokenizer.ggml.pre": pre})
    assert t.pre == split and t.add_bos == (split == "llama3")   # llama.cpp's add_bos default
    assert t.encode("x'S  1234") == list(b"x'S  1234")            # no merges: bytes either way


def test_byte_to_unicode_is_a_bijection():
    m = byte_to_unicode()
    assert len(m) == 256 and len(set(m.values())) == 256
    assert m[ord("A")] == "A" and m[ord(" ")] == "Ġ" and m[ord("\n")] == "Ċ"


# ---------------------------------------------------------------------------------------------
# Bad metadata
# ---------------------------------------------------------------------------------------------

def _tiny(**changes) -> dict:
    md = gguf_metadata_byte_vocab()
    md.update(changes)
    return {k: v for k, v in md.items() if v is not None}


@pytest.mark.parametrize("changes, message", [
    ({"tokenizer.ggml.model": "llama"}, "not supported"),
    ({"tokenizer.ggml.model": None}, "not supported"),
    ({"tokenizer.ggml.tokens": []}, "missing or empty"),
    ({"tokenizer.ggml.token_type": np.ones(5, np.int32)}, "5 token types"),
    ({"tokenizer.ggml.merges": ["Ġ"]}, "malformed tokenizer merge"),
    ({"tokenizer.ggml.merges": ["a b"]}, "not in the vocabulary"),
    ({"tokenizer.ggml.bos_token_id": np.uint32(9999)}, "outside the vocabulary"),
    ({"tokenizer.ggml.tokens": ["x"] * 259}, "lacks"),
])
def test_bad_metadata_raises_typed_error(changes, message):
    with pytest.raises(ModelFormatError, match=message) as err:
        Tokenizer.from_gguf_metadata(_tiny(**changes), path="model.gguf")
    assert "model.gguf" in str(err.value)


# ---------------------------------------------------------------------------------------------
# Through a real GGUF file (engine.testmodel writes it, engine.model reads it)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt, pre", [("i2_s", "llama3"), ("tq2_0", "llama3")])
def test_tokenizer_from_a_written_gguf(tiny_model_path, tok, fmt, pre):
    from engine.chat import BitNetChatFormat, chat_format_for
    from engine.model import load_model

    with load_model(tiny_model_path(fmt)) as model:
        md = model.tokenizer_metadata
        arch = model.hparams.arch
    if fmt == "i2_s":                             # bitnet.cpp's layout: no pre key, placeholder template
        assert "tokenizer.ggml.pre" not in md and "BITNETAssistant" in md["tokenizer.chat_template"]
    from_file = Tokenizer.from_gguf_metadata(md, path=f"tiny-{fmt}.gguf")
    assert from_file.pre == pre and from_file.n_vocab == tok.n_vocab and from_file.eos_ids == tok.eos_ids
    assert from_file.encode_batch(STRINGS[:300]) == tok.encode_batch(STRINGS[:300])
    assert isinstance(chat_format_for({"general.architecture": arch, **md}, from_file), BitNetChatFormat)
