"""Byte-level BPE tokenizer built from a GGUF's own `tokenizer.ggml.*` metadata.

Two directions live here:

* `gguf_metadata_from_hf_tokenizer(dir)` turns a Hugging Face tokenizer directory into the
  tokenizer metadata that bitnet.cpp's converter (`utils/convert-ms-to-gguf-bitnet.py
  --vocab-type bpe`, its `BpeVocab` + gguf-py `SpecialVocab`) writes: model `gpt2`, every
  token with score 0.0 / type NORMAL, added tokens with score -1000.0 / type CONTROL, the
  merges, bos/eos ids, `add_bos_token` and the converter's placeholder chat template — and,
  like the converter, no `tokenizer.ggml.pre`.
* `Tokenizer.from_gguf_metadata(md)` rebuilds the tokenizer from such metadata with the
  `tokenizers` library. The official 2B4T GGUF carries no `tokenizer.ggml.pre`; llama.cpp then
  falls back to its default split, which tokenizes e.g. "eight-bit" as `-` `bit` where the
  model was trained on `-bit`. We recognise the Llama-3 vocabulary and use its pre-tokenizer.

Text passed to `encode` never yields a special token: special tokens are kept out of the BPE
model entirely and are only reachable through `encode_special`.
"""
from __future__ import annotations

import codecs
import json
import logging
import re
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from tokenizers import Regex
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from .errors import ModelFormatError

log = logging.getLogger(__name__)

# gguf-py TokenType values (gguf/constants.py).
TOKEN_NORMAL = 1
TOKEN_UNKNOWN = 2
TOKEN_CONTROL = 3
TOKEN_USER_DEFINED = 4
TOKEN_UNUSED = 5
TOKEN_BYTE = 6

# Scores bitnet.cpp's BpeVocab gives base and added tokens.
_SCORE_NORMAL = 0.0
_SCORE_ADDED = -1000.0

# The template bitnet.cpp's converter (write_all) stores in every 'bitnet*' GGUF. It is a
# placeholder: the model was not trained on it (see engine/chat.py).
BITNET_CONVERTER_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first %}{{ bos_token }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ 'Human: ' + message['content'] + "
    "'\\n\\nBITNETAssistant: ' + eos_token }}{% elif message['role'] == 'assistant' %}"
    "{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)

# Split regexes. Llama-3: the `Split` pattern of Meta's tokenizer.json (llama.cpp's
# LLAMA_VOCAB_PRE_TYPE_LLAMA3). GPT-2: applied by ByteLevel(use_regex=True) itself.
LLAMA3_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Names llama.cpp (llama-vocab.cpp) maps to its LLAMA3 pre-tokenizer; `falcon_e` is
# ik_llama.cpp's name for the ternary Falcon-Edge models.
_LLAMA3_PRE_NAMES = {"llama-bpe", "llama3", "llama-v3", "falcon3", "falcon-h1", "falcon_e", "pixtral",
                     "midm-2.0", "lfm2"}
_GPT2_PRE_NAMES = {"default", "gpt2", "gpt-2"}

LLAMA3_N_VOCAB = 128256
LLAMA3_BOS = "<|begin_of_text|>"
LLAMA3_EOT = "<|eot_id|>"
LLAMA3_END_OF_TEXT = "<|end_of_text|>"
# Token strings that end a turn or the text; generation stops on any that the vocab holds.
_STOP_SPELLINGS = (LLAMA3_EOT, LLAMA3_END_OF_TEXT, "<|eom_id|>")


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE vocabularies."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


_BYTE_TO_UNICODE = byte_to_unicode()
_UNICODE_TO_BYTE = {c: b for b, c in _BYTE_TO_UNICODE.items()}


# ---------------------------------------------------------------------------------------------
# HF tokenizer directory -> GGUF metadata (as bitnet.cpp's converter writes it)
# ---------------------------------------------------------------------------------------------

def gguf_metadata_from_hf_tokenizer(tokenizer_dir) -> dict:
    """Tokenizer metadata for a GGUF, exactly as bitnet.cpp's converter derives it.

    Values carry their GGUF types: `np.uint32` ids, an int32 array of token types, a float32
    array of scores, `bool`, `str` and lists of `str`. Raises ModelFormatError on a directory
    that is not a byte-level BPE tokenizer.
    """
    root = Path(tokenizer_dir)
    tok_json = _read_json(root / "tokenizer.json")
    config_path = root / "tokenizer_config.json"
    config = _read_json(config_path) if config_path.is_file() else {}
    model = tok_json.get("model") or {}
    if (model.get("type") != "BPE" or model.get("byte_fallback", False)
            or (tok_json.get("decoder") or {}).get("type") != "ByteLevel"):
        raise ModelFormatError(root / "tokenizer.json", "not a GPT-2 style byte-level BPE tokenizer")
    vocab: dict[str, int] = model["vocab"]
    added = {t["content"]: t["id"] for t in tok_json.get("added_tokens", [])
             if t["content"] not in vocab}
    if sorted(added.values()) != list(range(len(vocab), len(vocab) + len(added))):
        raise ModelFormatError(root / "tokenizer.json", "added token ids are not sequential after the base vocabulary")
    by_id = sorted(vocab.items(), key=lambda kv: kv[1])
    if [i for _, i in by_id] != list(range(len(vocab))):
        raise ModelFormatError(root / "tokenizer.json", "base vocabulary ids are not 0..n-1")
    added_list = sorted(added, key=added.get)
    tokens = [t for t, _ in by_id] + added_list
    n_base = len(vocab)
    md: dict = {
        # The converter writes this one with the architecture keys (add_meta_arch).
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": np.array([_SCORE_NORMAL] * n_base + [_SCORE_ADDED] * len(added_list),
                                          dtype=np.float32),
        "tokenizer.ggml.token_type": np.array([TOKEN_NORMAL] * n_base + [TOKEN_CONTROL] * len(added_list),
                                              dtype=np.int32),
    }
    merges = _merges_as_strings(model.get("merges"))
    if merges:
        md["tokenizer.ggml.merges"] = merges
    md.update(_special_token_ids(tok_json, config, len(tokens)))
    md["tokenizer.chat_template"] = BITNET_CONVERTER_CHAT_TEMPLATE
    return md


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ModelFormatError(path, f"cannot read tokenizer file: {e}") from e


def _merges_as_strings(merges) -> list[str]:
    """Merges as 'a b' strings; the list-of-pairs form (transformers >= 4.45) is joined the way
    current gguf-py does it, with literal spaces written as U+0120 so the pair stays splittable."""
    if not isinstance(merges, list) or not merges:
        return []
    if isinstance(merges[0], str):
        return list(merges)
    return [" ".join(part.replace(" ", "\u0120") for part in pair) for pair in merges]


def _special_token_ids(tok_json: dict, config: dict, n_vocab: int) -> dict:
    """bos/eos (and other special) ids as gguf-py's SpecialVocab finds them: the token's spelling
    from tokenizer_config.json, its id from tokenizer.json's added_tokens."""
    out = {}
    added = tok_json.get("added_tokens", [])
    for typ in ("bos", "eos", "unk", "sep", "pad", "cls", "mask"):
        entry = config.get(f"{typ}_token")
        content = entry.get("content") if isinstance(entry, dict) else entry
        if not isinstance(content, str):
            continue
        tid = next((a["id"] for a in added if a.get("content") == content), None)
        if isinstance(tid, int) and 0 <= tid < n_vocab:
            out[f"tokenizer.ggml.{typ}_token_id"] = np.uint32(tid)
    return out


def gguf_metadata_byte_vocab(specials: Sequence[str] = (LLAMA3_BOS, LLAMA3_END_OF_TEXT, LLAMA3_EOT)) -> dict:
    """Metadata of a tiny byte-level vocabulary for test models: the 256 byte tokens in GPT-2's
    byte-to-unicode spelling (id = byte value), no merges, then `specials` as CONTROL tokens.
    bos is the first special, eos the second."""
    tokens = [_BYTE_TO_UNICODE[b] for b in range(256)] + list(specials)
    md = {
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": np.array([_SCORE_NORMAL] * 256 + [_SCORE_ADDED] * len(specials), dtype=np.float32),
        "tokenizer.ggml.token_type": np.array([TOKEN_NORMAL] * 256 + [TOKEN_CONTROL] * len(specials), dtype=np.int32),
    }
    if len(specials) >= 1:
        md["tokenizer.ggml.bos_token_id"] = np.uint32(256)
    if len(specials) >= 2:
        md["tokenizer.ggml.eos_token_id"] = np.uint32(257)
    md["tokenizer.chat_template"] = BITNET_CONVERTER_CHAT_TEMPLATE
    return md


# ---------------------------------------------------------------------------------------------
# GGUF metadata -> Tokenizer
# ---------------------------------------------------------------------------------------------

class SpecialTokens:
    """Lookups by spelling over `_special_ids` (spelling -> id), shared by Tern's tokenizer and
    the llama.cpp one."""
    _special_ids: dict[str, int]

    def encode_special(self, name: str) -> int:
        """Id of the special token spelt `name`, e.g. '<|eot_id|>'. KeyError if absent."""
        try:
            return self._special_ids[name]
        except KeyError:
            raise KeyError(f"the vocabulary has no special token {name!r}") from None

    def has_special(self, name: str) -> bool:
        return name in self._special_ids

    @property
    def special_tokens(self) -> dict[str, int]:
        """Spelling -> id of every special token."""
        return dict(self._special_ids)


class Tokenizer(SpecialTokens):
    """Byte-level BPE over a GGUF vocabulary. Build with `Tokenizer.from_gguf_metadata(md)`."""

    def __init__(self, tokens: list[str], token_types: list[int], merges: list[tuple[str, str]],
                 bos_id: int | None, eos_id: int | None, pre: str, source: str = "<metadata>",
                 add_bos: bool = False):
        self.n_vocab = len(tokens)
        self.add_bos = add_bos                            # the file's tokenizer.ggml.add_bos_token
        self.pre = pre                                    # 'llama3' | 'gpt2': the split in use
        self._tokens = tokens                             # (n_vocab,) token spellings
        self._types = token_types                         # (n_vocab,) gguf TokenType
        self._special_ids = {s: i for i, s in enumerate(tokens) if token_types[i] == TOKEN_CONTROL}
        self._pieces = [_piece_bytes(t, token_types[i]) for i, t in enumerate(tokens)]
        self.bos_id = bos_id
        self.eos_id = eos_id                              # the file's own eos (one of eos_ids)
        self.eos_ids = frozenset(_stop_ids(tokens, self._special_ids, eos_id))
        self._hf = _build_hf_tokenizer(tokens, token_types, merges, pre, source)

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def from_gguf_metadata(cls, md: dict, path=None) -> "Tokenizer":
        """Raises ModelFormatError (naming `path`) on missing or inconsistent tokenizer keys."""
        source = str(path) if path is not None else "<metadata>"
        model = _as_str(md.get("tokenizer.ggml.model"))
        if model != "gpt2":
            raise ModelFormatError(source, f"tokenizer model {model!r} is not supported (only byte-level BPE 'gpt2')")
        tokens = [t if type(t) is str else _as_str(t) for t in _as_list(md.get("tokenizer.ggml.tokens"))]
        if not tokens:
            raise ModelFormatError(source, "tokenizer.ggml.tokens is missing or empty")
        for i, t in enumerate(tokens):
            if not t.isascii() and not _is_utf8(t):
                raise ModelFormatError(source, f"tokenizer.ggml.tokens[{i}] is not valid UTF-8")
        types = _as_list(md.get("tokenizer.ggml.token_type"))
        types = [int(t) for t in types] if types else [TOKEN_NORMAL] * len(tokens)
        if len(types) != len(tokens):
            raise ModelFormatError(source, f"{len(types)} token types for {len(tokens)} tokens")
        merges = _split_merges(_as_list(md.get("tokenizer.ggml.merges")), source)
        bos = _optional_id(md, "tokenizer.ggml.bos_token_id", len(tokens), source)
        eos = _optional_id(md, "tokenizer.ggml.eos_token_id", len(tokens), source)
        pre = _choose_pre(_as_str(md.get("tokenizer.ggml.pre")), tokens)
        # llama.cpp's default when the key is absent: BOS for the Llama-3 split, none otherwise.
        add_bos = bool(md.get("tokenizer.ggml.add_bos_token", pre == "llama3"))
        return cls(tokens, types, merges, bos, eos, pre, source, add_bos)

    # -- encoding -------------------------------------------------------------------------------

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of `text`; special-token spellings inside it stay plain text."""
        ids = self._hf.encode(_encodable(text), add_special_tokens=False).ids
        if add_bos:
            if self.bos_id is None:
                raise ModelFormatError("<tokenizer>", "the vocabulary declares no BOS token")
            ids.insert(0, self.bos_id)
        return ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._hf.encode_batch([_encodable(t) for t in texts], add_special_tokens=False)]

    def is_special(self, token_id: int) -> bool:
        return 0 <= token_id < self.n_vocab and self._types[token_id] == TOKEN_CONTROL

    # -- decoding -------------------------------------------------------------------------------

    def token_to_piece(self, token_id: int) -> bytes:
        """The bytes a token stands for; a special token gives its spelling."""
        if not 0 <= token_id < self.n_vocab:
            raise IndexError(f"token id {token_id} outside the vocabulary of {self.n_vocab}")
        return self._pieces[token_id]

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Text of `ids`; invalid UTF-8 becomes U+FFFD."""
        return b"".join(self._piece_or_empty(i, skip_special) for i in ids).decode("utf-8", errors="replace")

    def _piece_or_empty(self, token_id: int, skip_special: bool) -> bytes:
        if skip_special and self.is_special(token_id):
            return b""
        return self.token_to_piece(token_id)

    def detokenizer(self, skip_special: bool = True) -> "Detokenizer":
        return Detokenizer(self, skip_special)


class Detokenizer:
    """Streaming decode: `feed(id)` returns the text completed by that token, holding back the
    bytes of a UTF-8 character that is still incomplete; `flush()` returns what is left."""

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = True):
        self._tok = tokenizer
        self._skip_special = skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_id: int) -> str:
        return self._utf8.decode(self._tok._piece_or_empty(token_id, self._skip_special))

    def flush(self) -> str:
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _encodable(text: str) -> str:
    """Lone surrogates (possible in a Python str, e.g. from a broken paste) are not UTF-8 and make
    `tokenizers` refuse the whole text; they become U+FFFD."""
    return _LONE_SURROGATE.sub("\ufffd", text)


def _as_list(value) -> list:
    if value is None:
        return []
    if isinstance(value, np.ndarray):
        return value.tolist()
    return list(value)


def _as_str(value) -> str | None:
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).decode("utf-8", errors="replace")
    if isinstance(value, np.ndarray):
        return bytes(value.astype(np.uint8)).decode("utf-8", errors="replace")
    return str(value)


def _split_merges(merges: list, source: str) -> list[tuple[str, str]]:
    pairs = [tuple((m if type(m) is str else _as_str(m)).split(" ")) for m in merges]
    for pair, merge in zip(pairs, merges):
        if len(pair) != 2 or not pair[0] or not pair[1]:
            raise ModelFormatError(source, f"malformed tokenizer merge {merge!r}")
    return pairs


def _optional_id(md: dict, key: str, n_vocab: int, source: str) -> int | None:
    value = md.get(key)
    if value is None:
        return None
    tid = int(value)
    if not 0 <= tid < n_vocab:
        raise ModelFormatError(source, f"{key} = {tid} is outside the vocabulary of {n_vocab}")
    return tid


def is_llama3_vocab(tokens: Sequence[str]) -> bool:
    """True for Meta's Llama-3 vocabulary (BitNet b1.58 2B4T uses it)."""
    return (len(tokens) == LLAMA3_N_VOCAB and tokens[128000] == LLAMA3_BOS
            and tokens[128001] == LLAMA3_END_OF_TEXT and tokens[128009] == LLAMA3_EOT)


def _choose_pre(pre: str | None, tokens: Sequence[str]) -> str:
    if pre in _LLAMA3_PRE_NAMES:
        return "llama3"
    if pre is None and is_llama3_vocab(tokens):
        log.info("no tokenizer.ggml.pre; Llama-3 vocabulary recognised, using the Llama-3 pre-tokenizer")
        return "llama3"
    if pre is not None and pre not in _GPT2_PRE_NAMES:
        log.warning("pre-tokenizer %r is not known to Tern; using the GPT-2 split", pre)
    return "gpt2"


def _stop_ids(tokens: Sequence[str], special_ids: dict[str, int], eos_id: int | None) -> set[int]:
    ids = {special_ids[s] for s in _STOP_SPELLINGS if s in special_ids}
    if eos_id is not None:
        ids.add(eos_id)
    return ids


# Byte-level characters -> the byte they stand for (as a latin-1 character); any other character
# below 256 -> U+FFFF, so that latin-1 encoding fails and _piece_bytes takes its slow path.
_TO_LATIN1 = {ord(c): chr(b) for c, b in _UNICODE_TO_BYTE.items()}
_TO_LATIN1.update({cp: "\uffff" for cp in range(256) if chr(cp) not in _UNICODE_TO_BYTE})


def _is_utf8(text: str) -> bool:
    """False for the lone surrogates that stand for undecodable bytes in a file's strings."""
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _piece_bytes(token: str, token_type: int) -> bytes:
    if token_type == TOKEN_CONTROL:
        return token.encode("utf-8")
    try:
        return token.translate(_TO_LATIN1).encode("latin-1")
    except UnicodeEncodeError:
        # A character outside the byte map (only in hand-made vocabularies) stands for its UTF-8.
        return b"".join(bytes((_UNICODE_TO_BYTE[c],)) if c in _UNICODE_TO_BYTE else c.encode("utf-8")
                        for c in token)


def _build_hf_tokenizer(tokens, token_types, merges, pre: str, source: str) -> HFTokenizer:
    # Control tokens stay out of the BPE model, so no text can ever produce one.
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        if token_types[i] != TOKEN_CONTROL:
            vocab.setdefault(t, i)
    missing = [b for b, c in _BYTE_TO_UNICODE.items() if c not in vocab]
    if missing:
        raise ModelFormatError(source, f"byte-level vocabulary lacks {len(missing)} of the 256 byte tokens "
                                       f"(first: 0x{missing[0]:02x})")
    for left, right in merges:
        if left not in vocab or right not in vocab or left + right not in vocab:
            raise ModelFormatError(source, f"tokenizer merge '{left} {right}' names a token not in the vocabulary")
    # llama.cpp and Meta's tokenizer.json both look a whole pre-token up before merging (Llama-3).
    bpe = models.BPE(vocab=vocab, merges=merges, ignore_merges=(pre == "llama3"), fuse_unk=False)
    hf = HFTokenizer(bpe)
    if pre == "llama3":
        hf.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    else:
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    return hf
