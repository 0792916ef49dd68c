"""Token sampling: repetition penalty, top-k, top-p, min-p, temperature, then a seeded draw.

The order of the filters is llama.cpp's default sampler chain (penalties → top-k → top-p →
min-p → temperature → dist), so a given set of settings means the same thing in Tern as in
llama.cpp-based apps. Note what that order implies: top-p and min-p see the probabilities at
temperature 1, and temperature only reshapes the draw among the survivors.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from engine.errors import TernError

# Top-p without top-k would need a full sort of the vocabulary (128k entries) per token; the
# nucleus almost always lies within the best few hundred, so sort that many first (exact: the
# normalisation still runs over every candidate), then more, and the whole only as a last resort.
_NUCLEUS_PROBES = (1024, 16384)


class SamplerParamsError(TernError, ValueError):
    """A sampler setting outside its valid range."""


@dataclass(frozen=True)
class SamplerParams:
    temperature: float = 0.8     # <= 0: greedy (the highest logit after the penalty, lowest id on ties)
    top_k: int = 40              # <= 0: off
    top_p: float = 0.95          # >= 1: off
    min_p: float = 0.05          # <= 0: off; keeps p >= min_p * p_max
    repeat_penalty: float = 1.0  # 1: off; > 1 discourages the recent tokens
    repeat_last_n: int = 64      # how many recent tokens the penalty looks at; 0: off, -1: all
    seed: int | None = None      # None: a fresh random seed per sampler

    def __post_init__(self):
        checks = [
            (math.isfinite(self.temperature), "temperature must be finite"),
            (0.0 <= self.top_p, "top_p must be >= 0"),
            (0.0 <= self.min_p <= 1.0, "min_p must be in [0, 1]"),
            (self.repeat_penalty > 0 and math.isfinite(self.repeat_penalty), "repeat_penalty must be > 0"),
            (self.repeat_last_n >= -1, "repeat_last_n must be >= -1"),
            (self.seed is None or self.seed >= 0, "seed must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise SamplerParamsError(f"{message} (got {self})")

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    @classmethod
    def greedy_params(cls) -> "SamplerParams":
        return cls(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0)


@dataclass(frozen=True)
class TopLogits:
    """The best logits of one position as a decoder that selects them on its device returns them
    (CudaDecoder.forward_top): best first (higher logit, then lower id), the first `exact` of
    them exactly the vocabulary's best; `full()` returns the whole vector while that step is the
    decoder's latest. A sampler with top-k or greedy needs no more than the best few unless a
    repetition penalty pushes many of them down (Sampler.sample checks)."""
    ids: np.ndarray       # int64
    logits: np.ndarray    # float32
    exact: int
    n_vocab: int
    full: Callable[[], np.ndarray]


class Sampler:
    """Picks the next token from a logit vector. One instance per generation: its random
    stream is seeded once, so the same seed and the same logits give the same tokens."""

    def __init__(self, params: SamplerParams):
        self.params = params
        self._rng = np.random.default_rng(params.seed)
        self._mask: np.ndarray | None = None  # _recent_hits' scratch, all False between calls

    @property
    def takes_top(self) -> bool:
        """Whether TopLogits can serve this sampler: greedy or top-k, and no penalty below 1
        (that one raises the recent tokens, wherever they rank)."""
        p = self.params
        raises = p.repeat_penalty < 1.0 and p.repeat_last_n != 0
        return (p.greedy or p.top_k > 0) and not raises

    def sample(self, logits: np.ndarray | TopLogits, history: Sequence[int] = ()) -> int:
        """logits: (n_vocab,) float, or a TopLogits; history: the ids already in the context,
        oldest first (the prompt and the reply so far), for the repetition penalty. The same
        token either way."""
        if isinstance(logits, TopLogits):
            token = self._sample_top(logits, history)
            if token is not None:
                return token
            logits = logits.full()
        logits = np.asarray(logits, dtype=np.float32)
        if logits.ndim != 1 or logits.size == 0:
            raise SamplerParamsError(f"expected a 1-D logit vector, got shape {logits.shape}")
        logits = apply_repeat_penalty(logits, history, self.params.repeat_penalty, self.params.repeat_last_n)
        if self.params.greedy:
            return int(np.argmax(logits))  # first maximum = lowest id on ties
        ids, kept = filter_candidates(logits, self.params)
        return int(ids[self._draw(kept / self.params.temperature)])

    def _sample_top(self, top: TopLogits, history: Sequence[int]) -> int | None:
        """The token sample() would pick from the full vector, from the exact best candidates
        alone; None when they may not hold it. A penalty >= 1 only lowers logits, so a token
        outside the candidates stays behind every unpenalized candidate: with top-k (greedy: k = 1)
        the candidates suffice while at least k of them are unpenalized. They come best first,
        which is the order top-k sorts into, so the first k are its survivors."""
        p = self.params
        if not self.takes_top:
            return None
        n = top.exact
        ids, logits = top.ids[:n], top.logits[:n]
        k = 1 if p.greedy else p.top_k
        hit = self._recent_hits(history, ids, top.n_vocab)
        if n < top.n_vocab and n - hit.size < k:  # fewer than k unpenalized
            return None
        if hit.size:
            # the best k after the penalty are among the first k + hits: at least k of those are
            # unpenalized, and every later candidate ranks behind them, penalized or not
            m = min(n, k + hit.size)
            ids, logits = ids[:m], logits[:m].copy()
            lowered = hit[hit < m]
            logits[lowered] = _penalized(logits[lowered], p.repeat_penalty)
            order = np.lexsort((ids, -logits))  # best first again
            ids, logits = ids[order], logits[order]
        if p.greedy:
            return int(ids[0])
        local, kept = _after_top_k(logits, np.arange(min(k, ids.size)), p)
        return int(ids[local[self._draw(kept / p.temperature)]])

    def _recent_hits(self, history: Sequence[int], ids: np.ndarray, n_vocab: int) -> np.ndarray:
        """Positions in `ids` of the tokens the repetition penalty touches, ascending: a vocabulary
        mask set for the recent ids and cleared again (cheaper per token than sorting them)."""
        recent = _recent_ids(history, self.params.repeat_penalty, self.params.repeat_last_n, n_vocab)
        if recent.size == 0:
            return _NO_HITS
        if self._mask is None or self._mask.size != n_vocab:
            self._mask = np.zeros(n_vocab, dtype=bool)
        self._mask[recent] = True
        hit = np.flatnonzero(self._mask[ids])
        self._mask[recent] = False
        return hit

    def _draw(self, logits: np.ndarray) -> int:
        probs = np.exp(logits.astype(np.float64) - logits.max())
        cumulative = np.cumsum(probs)
        target = self._rng.random() * cumulative[-1]
        return min(int(np.searchsorted(cumulative, target, side="right")), len(probs) - 1)


# ---------------------------------------------------------------------------------------------
# The filters, each usable on its own (the tests check them one by one)
# ---------------------------------------------------------------------------------------------

_NO_HITS = np.zeros(0, dtype=np.int64)
_NO_HITS.flags.writeable = False  # shared by every call that finds no recent ids


def _recent_ids(history: Sequence[int], penalty: float, last_n: int, n_vocab: int) -> np.ndarray:
    """The ids the repetition penalty touches, below n_vocab (repeats kept; none when it is off)."""
    if penalty == 1.0 or last_n == 0 or len(history) == 0:
        return _NO_HITS
    recent = np.asarray(history if last_n < 0 else history[-last_n:], dtype=np.int64)
    return recent[(recent >= 0) & (recent < n_vocab)]


def _penalized(values: np.ndarray, penalty: float) -> np.ndarray:
    return np.where(values <= 0, values * penalty, values / penalty)


def apply_repeat_penalty(logits: np.ndarray, history: Sequence[int], penalty: float, last_n: int) -> np.ndarray:
    """llama.cpp's repetition penalty: each distinct id among the last `last_n` of `history`
    has its logit divided by `penalty` if positive, multiplied by it otherwise. Returns a copy."""
    ids = _recent_ids(history, penalty, last_n, logits.size)
    if ids.size == 0:
        return logits
    out = logits.copy()
    out[ids] = _penalized(out[ids], penalty)  # a repeated id reads and writes the same value: once
    return out


def filter_candidates(logits: np.ndarray, params: SamplerParams) -> tuple[np.ndarray, np.ndarray]:
    """Top-k, then top-p, then min-p. Returns (ids, logits) of the survivors, never empty;
    best first (ties in id order) whenever any filter is on."""
    use_top_p = params.top_p < 1.0
    if params.top_k > 0:
        return _after_top_k(logits, _sorted_ids(logits, _top_k_ids(logits, params.top_k)), params)
    if use_top_p:
        ids = _top_p_full(logits, params.top_p)
    elif params.min_p > 0.0:
        ids = _sorted_ids(logits, np.flatnonzero(logits >= logits.max() + math.log(params.min_p)))
    else:
        ids = np.arange(logits.size)
    return _min_p(logits, ids, params.min_p)


def _after_top_k(logits: np.ndarray, ids: np.ndarray, params: SamplerParams) -> tuple[np.ndarray, np.ndarray]:
    """Top-p, then min-p, over the top-k survivors `ids` (best first)."""
    if params.top_p < 1.0:
        ids = _top_p(logits, ids, params.top_p)
    return _min_p(logits, ids, params.min_p)


def _min_p(logits: np.ndarray, ids: np.ndarray, min_p: float) -> tuple[np.ndarray, np.ndarray]:
    kept = logits[ids]
    if min_p > 0.0:
        # p_i >= min_p * p_max  <=>  logit_i >= logit_max + ln(min_p); the best one always stays
        keep = kept >= kept.max() + math.log(min_p)
        ids, kept = ids[keep], kept[keep]
    return ids, kept


def _sorted_ids(logits: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """`ids` ordered by descending logit, ascending id among equal logits."""
    return ids[np.lexsort((ids, -logits[ids]))]


def _top_k_ids(logits: np.ndarray, k: int) -> np.ndarray:
    """The k best ids (unordered); among equal logits at the cut, the lowest ids."""
    if k >= logits.size:
        return np.arange(logits.size)
    threshold = np.partition(logits, logits.size - k)[logits.size - k]
    above = np.flatnonzero(logits > threshold)
    at = np.flatnonzero(logits == threshold)[: k - above.size]
    return np.concatenate([above, at])


def _top_p(logits: np.ndarray, ids: np.ndarray, p: float) -> np.ndarray:
    """Keep the shortest prefix of the best-first `ids` whose probability (softmax over all
    of `ids`) reaches p — the token that crosses p included, at least one token."""
    values = logits[ids].astype(np.float64)
    weights = np.exp(values - values[0])
    return ids[:_nucleus_size(np.cumsum(weights) / weights.sum(), p)]


def _top_p_full(logits: np.ndarray, p: float) -> np.ndarray:
    """Top-p over the whole vocabulary, sorting only as many of the best as the nucleus needs."""
    values = logits.astype(np.float64)
    total = np.exp(values - values.max()).sum()
    for probe_size in _NUCLEUS_PROBES:
        if probe_size >= logits.size:
            break
        probe = _sorted_ids(logits, _top_k_ids(logits, probe_size))
        cumulative = np.cumsum(np.exp(values[probe] - values.max())) / total
        if cumulative[-1] >= p:
            return probe[:_nucleus_size(cumulative, p)]
    # a stable sort of -logits orders equal logits by id, as _sorted_ids does
    return _top_p(logits, np.argsort(-logits, kind="stable"), p)


def _nucleus_size(cumulative: np.ndarray, p: float) -> int:
    return min(int(np.searchsorted(cumulative, p, side="left")) + 1, cumulative.size)
