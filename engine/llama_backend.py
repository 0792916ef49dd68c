"""LlamaCppDecoder: every GGUF that is not BitNet (Llama, Qwen, Gemma, …) through llama-cpp-python.

It implements the Decoder protocol of docs/ENGINE-API.md over llama.cpp's C API (the ctypes
bindings of `llama_cpp.llama_cpp`, not the high-level `Llama` class: that one keeps a
(n_ctx, n_vocab) score matrix when all logits are asked for — 4 GiB for a 256k vocabulary —
and frees native memory in `__del__`). Native objects are freed in `close()` only.

Besides the decoder the model brings its own tokenizer and chat template, so it also exposes
`tokenizer` (a `LlamaCppTokenizer` with the interface of engine.tokenizer.Tokenizer),
`chat_template`, `bos_token` and `eos_token` for engine/chat.py's jinja rendering.
"""
from __future__ import annotations

import codecs
import ctypes
import logging
import os
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

import llama_cpp.llama_cpp as ll  # ImportError here means: llama-cpp-python is not installed

from engine.errors import ContextOverflowError, ModelFormatError, OutOfMemoryError, TernError
from engine.tokenizer import SpecialTokens

log = logging.getLogger(__name__)

DEFAULT_BATCH = 512
_PIECE_BUFFER = 256


class LlamaCppError(TernError):
    """llama.cpp refused an operation (a failed decode, a bad token id)."""


# ---------------------------------------------------------------------------------------------
# llama.cpp's log goes to Python logging (it prints to stderr otherwise)
# ---------------------------------------------------------------------------------------------

# ggml_log_level today: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5 (continues the last line)
_LEVELS = {0: logging.DEBUG, 1: logging.DEBUG, 2: logging.DEBUG, 3: logging.WARNING, 4: logging.ERROR}
_native_log = logging.getLogger("engine.llama_cpp.native")
_init_lock = threading.Lock()
_initialised = False
_last_level = logging.DEBUG


@ll.llama_log_callback
def _log_callback(level: int, text: bytes, user_data) -> None:
    global _last_level
    _last_level = _last_level if level == 5 else _LEVELS.get(level, logging.DEBUG)
    message = text.decode("utf-8", errors="replace").rstrip()
    if message:
        _native_log.log(_last_level, "%s", message)


def _init_backend() -> None:
    global _initialised
    with _init_lock:
        if not _initialised:
            ll.llama_log_set(_log_callback, ctypes.c_void_p(0))
            ll.llama_backend_init()
            _initialised = True


# ---------------------------------------------------------------------------------------------
# Tokenizer over the model's own vocabulary
# ---------------------------------------------------------------------------------------------

class LlamaCppTokenizer(SpecialTokens):
    """The interface of engine.tokenizer.Tokenizer, answered by llama.cpp's tokenizer (which
    knows SentencePiece, BPE pre-tokenizers and the rest that the model file names)."""

    def __init__(self, vocab):
        self._vocab = vocab                                 # llama_vocab* (owned by the model)
        self.n_vocab = ll.llama_vocab_n_tokens(vocab)
        bos = ll.llama_vocab_bos(vocab)
        self.bos_id = bos if bos >= 0 else None
        self.add_bos = bool(ll.llama_vocab_get_add_bos(vocab))
        self.eos_ids = frozenset(i for i in range(self.n_vocab) if ll.llama_vocab_is_eog(vocab, i))
        self._special_ids = {self.token_text(i): i for i in range(self.n_vocab)
                             if ll.llama_vocab_is_control(vocab, i) or i in self.eos_ids}
        self._special_set = frozenset(self._special_ids.values())
        eos = ll.llama_vocab_eos(vocab)
        self.eos_id = eos if eos >= 0 else None

    def token_text(self, token_id: int) -> str:
        return ll.llama_vocab_get_text(self._vocab, token_id).decode("utf-8", errors="replace")

    def encode(self, text: str, add_bos: bool = False, parse_special: bool = False) -> list[int]:
        """Token ids of `text`. Special-token spellings stay plain text unless `parse_special`
        (a rendered chat template, whose markers must become the real special tokens)."""
        data = text.encode("utf-8")
        capacity = len(data) + 8
        while True:
            buf = (ll.llama_token * capacity)()
            n = ll.llama_tokenize(self._vocab, data, len(data), buf, capacity, False, parse_special)
            if n >= 0:
                break
            capacity = -n
        ids = list(buf[:n])
        if add_bos:
            if self.bos_id is None:
                raise ModelFormatError("<tokenizer>", "the vocabulary declares no BOS token")
            ids.insert(0, self.bos_id)
        return ids

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_set

    def token_to_piece(self, token_id: int) -> bytes:
        if not 0 <= token_id < self.n_vocab:
            raise IndexError(f"token id {token_id} outside the vocabulary of {self.n_vocab}")
        buf = ctypes.create_string_buffer(_PIECE_BUFFER)
        n = ll.llama_token_to_piece(self._vocab, token_id, buf, _PIECE_BUFFER, 0, True)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = ll.llama_token_to_piece(self._vocab, token_id, buf, -n, 0, True)
        return buf.raw[:n]

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        pieces = (b"" if skip_special and self.is_special(i) else self.token_to_piece(i) for i in ids)
        return b"".join(pieces).decode("utf-8", errors="replace")

    def detokenizer(self, skip_special: bool = True) -> "LlamaCppDetokenizer":
        return LlamaCppDetokenizer(self, skip_special)


class LlamaCppDetokenizer:
    """Streaming decode that holds back an incomplete UTF-8 character (same as engine.tokenizer's)."""

    def __init__(self, tokenizer: LlamaCppTokenizer, skip_special: bool = True):
        self._tok = tokenizer
        self._skip_special = skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_id: int) -> str:
        if self._skip_special and self._tok.is_special(token_id):
            return ""
        return self._utf8.decode(self._tok.token_to_piece(token_id))

    def flush(self) -> str:
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text


# ---------------------------------------------------------------------------------------------
# The decoder
# ---------------------------------------------------------------------------------------------

class LlamaCppDecoder:
    backend_name = "llama.cpp"

    def __init__(self, path, n_ctx: int = 4096, threads: int | None = None, n_batch: int = DEFAULT_BATCH):
        _init_backend()
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelFormatError(self.path, "file not found")
        mparams = ll.llama_model_default_params()
        mparams.n_gpu_layers = 0
        # The "extra" buffer types repack weights for AMX and friends; this llama.cpp build's AMX
        # matmul segfaults on Gemma 3 Q4_K_M on Sapphire Rapids (llama_decode → ggml_backend_amx_
        # mul_mat). The plain CPU kernels are correct everywhere.
        mparams.use_extra_bufts = False
        self._model = ll.llama_model_load_from_file(os.fsencode(self.path), mparams)
        if not self._model:
            raise ModelFormatError(self.path, "llama.cpp cannot load this file (unknown architecture "
                                              "or a damaged file; its log has the details)")
        self._ctx = self._batch = None
        try:
            self._open_context(n_ctx, threads, n_batch)
        except BaseException:
            self.close()
            raise
        self.n_vocab = self.tokenizer.n_vocab
        self.n_past = 0
        self._tokens: list[int] = []        # the ids in the KV cache, oldest first
        desc = ctypes.create_string_buffer(128)
        ll.llama_model_desc(self._model, desc, 128)
        self.kernel = desc.value.decode("utf-8", errors="replace")     # e.g. "gemma3 270M Q4_K - Medium"

    def _open_context(self, n_ctx: int, threads: int | None, n_batch: int) -> None:
        self.n_batch = max(1, min(n_batch, n_ctx))
        cparams = ll.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = cparams.n_ubatch = self.n_batch
        cparams.n_threads = cparams.n_threads_batch = threads or max(1, os.cpu_count() or 1)
        cparams.no_perf = True
        self._ctx = ll.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            raise OutOfMemoryError(f"llama.cpp cannot create a context of {n_ctx} tokens for {self.path.name}")
        self.n_ctx = ll.llama_n_ctx(self._ctx)
        self._memory = ll.llama_get_memory(self._ctx)
        self._batch = ll.llama_batch_init(self.n_batch, 0, 1)
        vocab = ll.llama_model_get_vocab(self._model)
        self.tokenizer = LlamaCppTokenizer(vocab)
        template = ll.llama_model_chat_template(self._model, None)
        self.chat_template: str | None = template.decode("utf-8") if template else None
        self.bos_token = self.tokenizer.token_text(self.tokenizer.bos_id) if self.tokenizer.bos_id is not None else ""
        eos = ll.llama_vocab_eos(vocab)
        self.eos_token = self.tokenizer.token_text(eos) if eos >= 0 else ""

    # -- Decoder protocol -----------------------------------------------------------------------

    def forward(self, ids: Sequence[int], all_logits: bool = False) -> np.ndarray:
        """Appends `ids` at n_past…; (len, n_vocab) float32 if all_logits else (n_vocab,)."""
        ids = [int(i) for i in ids]
        self._check_open()
        if not ids:
            raise LlamaCppError("forward() needs at least one token")
        if self.n_past + len(ids) > self.n_ctx:
            raise ContextOverflowError(f"{self.n_past} + {len(ids)} tokens exceed the context of {self.n_ctx}")
        bad = [i for i in ids if not 0 <= i < self.n_vocab]
        if bad:
            raise LlamaCppError(f"token id {bad[0]} outside the vocabulary of {self.n_vocab}")
        rows = []
        for start in range(0, len(ids), self.n_batch):
            chunk = ids[start:start + self.n_batch]
            last_chunk = start + len(chunk) == len(ids)
            self._decode(chunk, all_logits, last_chunk)
            if all_logits:
                rows.extend(self._logits(j) for j in range(len(chunk)))
            elif last_chunk:
                rows.append(self._logits(len(chunk) - 1))
        return np.stack(rows) if all_logits else rows[0]

    def _decode(self, chunk: list[int], all_logits: bool, last_chunk: bool) -> None:
        b = self._batch
        b.n_tokens = len(chunk)
        for j, token in enumerate(chunk):
            b.token[j] = token
            b.pos[j] = self.n_past + j
            b.n_seq_id[j] = 1
            b.seq_id[j][0] = 0
            b.logits[j] = all_logits or (last_chunk and j == len(chunk) - 1)
        status = ll.llama_decode(self._ctx, b)
        if status != 0:
            # On failure the cache may hold part of the chunk: drop it to stay consistent.
            ll.llama_memory_seq_rm(self._memory, 0, self.n_past, -1)
            if status == 1:
                raise ContextOverflowError(f"llama.cpp found no KV cache slot for {len(chunk)} tokens")
            raise LlamaCppError(f"llama_decode failed with status {status}")
        self.n_past += len(chunk)
        self._tokens.extend(chunk)

    def _logits(self, index: int) -> np.ndarray:
        ptr = ll.llama_get_logits_ith(self._ctx, index)
        if not ptr:
            raise LlamaCppError(f"llama.cpp returned no logits for batch row {index}")
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).astype(np.float32, copy=True)

    def truncate(self, n: int) -> None:
        """Keep the first n cached positions."""
        self._check_open()
        if not 0 <= n <= self.n_past:
            raise LlamaCppError(f"cannot keep {n} positions of {self.n_past}")
        if n == self.n_past:
            return
        if ll.llama_memory_seq_rm(self._memory, 0, n, -1):
            self.n_past = n
            del self._tokens[n:]
            return
        # Recurrent or sliding-window caches cannot drop a tail: rebuild the prefix instead.
        keep = self._tokens[:n]
        ll.llama_memory_seq_rm(self._memory, -1, -1, -1)
        self.n_past, self._tokens = 0, []
        if keep:
            self.forward(keep)

    def close(self) -> None:
        """Frees the batch, the context and the model; safe to call twice."""
        if self._batch is not None:
            ll.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx:
            ll.llama_free(self._ctx)
        self._ctx = None
        if self._model:
            ll.llama_model_free(self._model)
        self._model = None

    def _check_open(self) -> None:
        if not self._ctx:
            raise LlamaCppError("the llama.cpp decoder is closed")

    def __enter__(self) -> "LlamaCppDecoder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
