"""Sampler: each filter on crafted logits, the llama.cpp order, greedy ties, seeded determinism."""
from __future__ import annotations

import math

import numpy as np
import pytest

from engine.errors import TernError
from engine.sampling import (
    Sampler,
    SamplerParams,
    SamplerParamsError,
    TopLogits,
    apply_repeat_penalty,
    filter_candidates,
)

OFF = dict(top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=1.0)


def params(**overrides) -> SamplerParams:
    return SamplerParams(**{**OFF, "temperature": 1.0, "seed": 0, **overrides})


def random_logits(n: int = 5000, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(n) * 2).astype(np.float32)


def draw_many(p: SamplerParams, logits: np.ndarray, n: int) -> list[int]:
    sampler = Sampler(p)
    return [sampler.sample(logits) for _ in range(n)]


# --- greedy ----------------------------------------------------------------------------------

def test_greedy_picks_the_highest_logit():
    logits = random_logits()
    assert Sampler(params(temperature=0.0)).sample(logits) == int(np.argmax(logits))


def test_greedy_ties_go_to_the_lowest_id():
    logits = np.zeros(10, dtype=np.float32)
    logits[[7, 3, 9]] = 5.0
    assert Sampler(params(temperature=0.0)).sample(logits) == 3


def test_greedy_ignores_seed_and_other_filters():
    logits = random_logits()
    picks = {Sampler(params(temperature=0.0, seed=s, top_k=3, top_p=0.5)).sample(logits) for s in range(5)}
    assert picks == {int(np.argmax(logits))}


def test_greedy_still_applies_the_repetition_penalty():
    logits = np.array([0.0, 2.0, 1.5, -1.0], dtype=np.float32)
    # 2.0 / 1.5 = 1.33 < 1.5: the repeated token loses its lead
    assert Sampler(params(temperature=0.0, repeat_penalty=1.5)).sample(logits, history=[1]) == 2
    assert Sampler(params(temperature=0.0, repeat_penalty=1.2)).sample(logits, history=[1]) == 1


# --- determinism -----------------------------------------------------------------------------

def test_same_seed_same_tokens():
    logits = random_logits()
    p = params(temperature=1.3, top_k=50, top_p=0.9, min_p=0.01, seed=1234)
    assert draw_many(p, logits, 200) == draw_many(p, logits, 200)


def test_different_seeds_differ():
    logits = random_logits()
    a = draw_many(params(seed=1), logits, 100)
    b = draw_many(params(seed=2), logits, 100)
    assert a != b


def test_unseeded_samplers_differ():
    logits = random_logits()
    assert draw_many(params(seed=None), logits, 100) != draw_many(params(seed=None), logits, 100)


# --- repetition penalty ----------------------------------------------------------------------

def test_repeat_penalty_divides_positive_and_multiplies_negative():
    logits = np.array([2.0, -2.0, 3.0, 0.0, 1.0], dtype=np.float32)
    out = apply_repeat_penalty(logits, [0, 1, 3, 0], penalty=2.0, last_n=64)
    np.testing.assert_array_equal(out, np.array([1.0, -4.0, 3.0, 0.0, 1.0], dtype=np.float32))
    np.testing.assert_array_equal(logits, [2.0, -2.0, 3.0, 0.0, 1.0])  # input untouched


def test_repeat_penalty_counts_a_token_once_and_looks_only_at_the_window():
    logits = np.array([4.0, 4.0, 4.0], dtype=np.float32)
    out = apply_repeat_penalty(logits, [0, 0, 0, 1, 2], penalty=2.0, last_n=2)
    np.testing.assert_array_equal(out, [4.0, 2.0, 2.0])
    np.testing.assert_array_equal(apply_repeat_penalty(logits, [0, 0, 1, 2], 2.0, last_n=-1), [2.0, 2.0, 2.0])
    np.testing.assert_array_equal(apply_repeat_penalty(logits, [0], 2.0, last_n=0), logits)


# --- top-k / top-p / min-p -------------------------------------------------------------------

def test_top_k_keeps_the_k_best_in_order():
    logits = np.array([0.1, 5.0, 3.0, 4.0, -1.0, 4.0], dtype=np.float32)
    ids, kept = filter_candidates(logits, params(top_k=3))
    assert ids.tolist() == [1, 3, 5]
    np.testing.assert_array_equal(kept, [5.0, 4.0, 4.0])
    samples = set(draw_many(params(top_k=3), logits, 300))
    assert samples == {1, 3, 5}


def test_top_k_tie_at_the_cut_keeps_the_lowest_ids():
    logits = np.array([1.0, 2.0, 1.0, 1.0], dtype=np.float32)
    assert filter_candidates(logits, params(top_k=2))[0].tolist() == [1, 0]


def test_top_p_keeps_the_token_that_crosses_p():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = np.log(probs).astype(np.float32)
    assert filter_candidates(logits, params(top_p=0.49))[0].tolist() == [0]
    assert filter_candidates(logits, params(top_p=0.51))[0].tolist() == [0, 1]
    assert filter_candidates(logits, params(top_p=0.79))[0].tolist() == [0, 1]
    assert filter_candidates(logits, params(top_p=0.81))[0].tolist() == [0, 1, 2]
    assert filter_candidates(logits, params(top_p=0.0))[0].tolist() == [0]


@pytest.mark.parametrize("scale, smallest, largest", [
    (6.0, 2, 1024),          # peaked: the first probe holds the nucleus
    (1.0, 1025, 16384),      # the second probe does
    (0.1, 16385, 20000),     # nearly flat: the full sort
])
def test_top_p_without_top_k_matches_a_full_sort(scale, smallest, largest):
    logits = random_logits(n=20000, seed=3) / 2 * scale
    ids, _ = filter_candidates(logits, params(top_p=0.9))
    order = np.argsort(-logits, kind="stable")
    probs = np.exp(logits[order].astype(np.float64) - logits.max())
    n_keep = int(np.searchsorted(np.cumsum(probs) / probs.sum(), 0.9)) + 1
    assert smallest <= n_keep <= largest
    assert ids.tolist() == order[:n_keep].tolist()


def test_top_p_after_top_k_renormalises_over_the_k():
    probs = np.array([0.4, 0.3, 0.2, 0.1])
    logits = np.log(probs).astype(np.float32)
    # over all four, 0.4 + 0.3 = 0.7 < 0.75; over the top two, 0.4/0.7 = 0.57 then 1.0
    assert filter_candidates(logits, params(top_p=0.75))[0].tolist() == [0, 1, 2]
    assert filter_candidates(logits, params(top_k=2, top_p=0.75))[0].tolist() == [0, 1]


def test_min_p_keeps_tokens_above_a_fraction_of_the_best():
    probs = np.array([0.5, 0.26, 0.24, 0.0001])
    logits = np.log(probs).astype(np.float32)
    assert sorted(filter_candidates(logits, params(min_p=0.5))[0].tolist()) == [0, 1]
    assert sorted(filter_candidates(logits, params(min_p=0.4))[0].tolist()) == [0, 1, 2]
    assert set(draw_many(params(min_p=0.5), logits, 300)) == {0, 1}


def test_filters_run_in_llama_cpp_order_before_temperature():
    # top-p sees temperature-1 probabilities: a very low temperature must not shrink the set
    probs = np.array([0.45, 0.35, 0.2])
    logits = np.log(probs).astype(np.float32)
    ids, _ = filter_candidates(logits, params(top_p=0.7, temperature=0.05))
    assert ids.tolist() == [0, 1]
    # the penalty comes first: it can move a token into the top-k
    sampler = Sampler(params(top_k=1, repeat_penalty=10.0))
    assert {sampler.sample(np.array([3.0, 2.0, -5.0], dtype=np.float32), history=[0]) for _ in range(20)} == {1}


# --- the draw itself -------------------------------------------------------------------------

def test_draw_frequencies_follow_softmax_with_temperature():
    logits = np.array([1.0, 0.0, -1.0], dtype=np.float32)
    temperature = 0.7
    counts = np.bincount(draw_many(params(temperature=temperature, seed=7), logits, 20000), minlength=3)
    expected = np.exp(logits / temperature)
    expected /= expected.sum()
    np.testing.assert_allclose(counts / counts.sum(), expected, atol=0.015)


def test_high_temperature_flattens():
    logits = np.array([2.0, 0.0], dtype=np.float32)
    hot = np.mean(np.array(draw_many(params(temperature=100.0, seed=3), logits, 4000)) == 1)
    cold = np.mean(np.array(draw_many(params(temperature=0.5, seed=3), logits, 4000)) == 1)
    assert hot > 0.45 and cold < 0.05


# --- bad input -------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [
    dict(temperature=math.nan), dict(top_p=-0.1), dict(min_p=1.5), dict(repeat_penalty=0.0),
    dict(repeat_last_n=-2), dict(seed=-1),
])
def test_bad_params_raise_a_typed_error(bad):
    with pytest.raises(SamplerParamsError) as info:
        SamplerParams(**bad)
    assert isinstance(info.value, TernError)


def test_bad_logits_raise_a_typed_error():
    with pytest.raises(SamplerParamsError):
        Sampler(params()).sample(np.zeros((2, 3), dtype=np.float32))


# ---------------------------------------------------------------------------------------------
# TopLogits: the best candidates a device selected (CudaDecoder.forward_top) give the same token
# ---------------------------------------------------------------------------------------------

def _best_first(logits: np.ndarray, k: int = 256, exact: int | None = None, fetched: list | None = None) -> TopLogits:
    """What forward_top returns for these logits: the k best, higher logit then lower id first."""
    order = np.lexsort((np.arange(logits.size), -logits))[:k]

    def full():
        if fetched is not None:
            fetched.append(True)
        return logits
    return TopLogits(order.astype(np.int64), logits[order], len(order) if exact is None else exact, logits.size, full)


TOP_PARAMS = [
    SamplerParams.greedy_params(),
    SamplerParams(seed=3),
    SamplerParams(seed=4, temperature=1.7, top_k=5, top_p=1.0, min_p=0.0),
    SamplerParams(seed=5, repeat_penalty=1.3, repeat_last_n=64),
    SamplerParams(seed=6, top_k=180, top_p=0.99, min_p=0.0, repeat_penalty=1.1, repeat_last_n=-1),
    SamplerParams(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=2.0),
]


@pytest.mark.parametrize("params", TOP_PARAMS, ids=str)
def test_top_candidates_pick_the_token_the_full_vector_picks(params):
    """Over many draws (logits with ties, histories full of the best tokens), the sampler fed the
    candidates stays in lockstep with one fed the whole vector, and fetches the whole vector
    only when the candidates may not hold the pick."""
    rng = np.random.default_rng(11)
    from_top, from_full = Sampler(params), Sampler(params)
    fetched: list = []
    for step in range(120):
        logits = np.round(rng.standard_normal(5000) * 3, 1).astype(np.float32)  # many equal logits
        best = np.argsort(-logits)[:300]
        history = list(rng.choice(best[: 40 + step], size=int(rng.integers(0, 100)))) + list(rng.integers(0, 5000, 30))
        want = from_full.sample(logits, history)
        assert from_top.sample(_best_first(logits, fetched=fetched), history) == want, step
    assert from_top.takes_top
    if params.repeat_penalty == 1.0:
        assert not fetched  # nothing penalized: 256 candidates always hold the pick


@pytest.mark.parametrize("params", TOP_PARAMS[3:], ids=str)
def test_top_candidates_with_penalized_zeros_and_negatives(params):
    """Logits mostly <= 0 (a penalty multiplies those; a penalized 0 stays 0 and ties unpenalized
    zeros, decided by id): the candidates still pick what the whole vector picks."""
    rng = np.random.default_rng(12)
    from_top, from_full = Sampler(params), Sampler(params)
    for step in range(80):
        tenths = np.round(rng.standard_normal(3000) * 30).astype(np.int64)
        logits = ((tenths - tenths.max() + 5) / 10).astype(np.float32)  # the best at 0.5, many exact 0
        best = np.argsort(-logits, kind="stable")[:300]
        history = list(rng.choice(best[: 20 + step], size=int(rng.integers(1, 120))))
        want = from_full.sample(logits, history)
        assert from_top.sample(_best_first(logits), history) == want, step


def test_top_candidates_fall_back_when_too_few_are_exact_or_unpenalized():
    rng = np.random.default_rng(2)
    logits = rng.standard_normal(1000).astype(np.float32)
    best = np.argsort(-logits)
    for params, exact, history in [
        (SamplerParams(seed=1, top_k=40), 39, []),                                   # fewer exact than k
        (SamplerParams(seed=1, top_k=40, repeat_penalty=1.5, repeat_last_n=-1), 256, list(best[:220])),
        (SamplerParams(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=1.5, repeat_last_n=-1),
         256, list(best[:256])),                                                    # greedy, all 256 penalized
    ]:
        fetched: list = []
        got = Sampler(params).sample(_best_first(logits, exact=exact, fetched=fetched), history)
        assert fetched, params
        assert got == Sampler(params).sample(logits, history)


def test_samplers_that_need_the_whole_vector_do_not_take_candidates():
    assert not Sampler(SamplerParams(top_k=0)).takes_top                               # top-p over everything
    assert not Sampler(SamplerParams(repeat_penalty=0.8)).takes_top                    # raises recent tokens
    assert Sampler(SamplerParams(repeat_penalty=0.8, repeat_last_n=0)).takes_top
    assert Sampler(SamplerParams.greedy_params()).takes_top
    fetched: list = []
    logits = np.linspace(-1, 1, 300, dtype=np.float32)
    assert Sampler(SamplerParams(seed=1, top_k=0)).sample(_best_first(logits, fetched=fetched)) >= 0
    assert fetched


def test_a_whole_small_vocabulary_needs_no_fallback():
    """A vocabulary smaller than the candidate count is exact in full: top-k above it is fine."""
    logits = np.arange(10, dtype=np.float32)
    fetched: list = []
    params = SamplerParams(seed=2, top_k=50, repeat_penalty=1.2, repeat_last_n=-1)
    got = Sampler(params).sample(_best_first(logits, fetched=fetched), list(range(10)))
    assert not fetched and got == Sampler(params).sample(logits, list(range(10)))
