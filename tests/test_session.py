"""ChatSession on real tiny models with the reference decoder: KV reuse across turns (exact
prefill counts), stop on end-of-turn, cancel, context overflow, streaming text; and backend
selection."""
from __future__ import annotations

import threading

import pytest

from engine.backends import BackendArgumentError, BackendUnavailableError, open_decoder
from engine.chat import BitNetChatFormat
from engine.errors import ContextOverflowError, UnsupportedModelError
from engine.sampling import SamplerParams
from engine.session import ChatSession, InvalidRequestError, Message, open_chat

GREEDY = SamplerParams.greedy_params()
BYTE_EOT = 258          # <|eot_id|> in the byte vocabulary of test models
BYTE_END_OF_TEXT = 257  # <|end_of_text|>


@pytest.fixture
def byte_model(tiny_model_path):
    return tiny_model_path("i2_s", seed=1, tokenizer=False)


@pytest.fixture
def session(byte_model):
    s = open_chat(byte_model, backend="reference", n_ctx=512)
    yield s
    s.close()


def run(session, messages, system=None, params=GREEDY, max_tokens=12, cancel=None):
    events = list(session.generate(messages, system, params, max_tokens, cancel))
    assert events[-1].kind == "done"
    return events, events[-1].stats


def n_tokens(session, text: str) -> int:
    return len(session.tokenizer.encode(text))


# ---------------------------------------------------------------------------------------------
# multi-turn KV reuse
# ---------------------------------------------------------------------------------------------

def test_second_turn_prefills_only_the_new_tokens(session):
    first = [Message("user", "Hello")]
    _, s1 = run(session, first, system="Be brief.")
    assert s1.stop_reason == "max_tokens" and s1.generated == 12
    prompt1 = list(session.last_prompt_ids)
    assert s1.prefilled_tokens == len(prompt1) and s1.reused_tokens == 0

    second = first + [Message("assistant", s1.text), Message("user", "And then?")]
    _, s2 = run(session, second, system="Be brief.")
    # the reply stopped on max_tokens, so only its closing <|eot_id|> is new, then the message
    expected = 1 + n_tokens(session, "User: And then?") + 1 + n_tokens(session, "Assistant: ")
    assert s2.prefilled_tokens == expected
    assert s2.reused_tokens == len(prompt1) + 12
    assert session.counters == {"prefilled_tokens_total": len(prompt1) + expected,
                                "last_prefilled_tokens": expected,
                                "kv_reused_tokens": len(prompt1) + 12}
    # the cache held exactly the ids the new prompt starts with
    assert session.last_prompt_ids[:s2.reused_tokens] == prompt1 + s1.ids


def find_reply_ending_on(session, stop_id: int):
    """Sample short replies with growing seeds until one ends on `stop_id` (deterministic)."""
    for seed in range(300):
        params = SamplerParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=seed)
        session.reset()
        _, stats = run(session, [Message("user", "Hi")], params=params, max_tokens=40)
        if stats.stop_reason == "eos" and session.cached_ids[-1] == stop_id:
            return stats
    pytest.fail(f"no reply ended on token {stop_id}")


def test_reply_ending_on_eot_keeps_it_in_the_cache(session):
    stats = find_reply_ending_on(session, BYTE_EOT)
    prompt = list(session.last_prompt_ids)
    assert BYTE_EOT not in stats.ids                        # the stop token is not part of the reply
    assert session.cached_ids == prompt + stats.ids + [BYTE_EOT]
    assert session.decoder.n_past == len(session.cached_ids)

    _, s2 = run(session, [Message("user", "Hi"), Message("assistant", stats.text), Message("user", "Ok")])
    assert s2.prefilled_tokens == n_tokens(session, "User: Ok") + 1 + n_tokens(session, "Assistant: ")
    assert s2.reused_tokens == len(prompt) + len(stats.ids) + 1


def test_generation_stops_on_every_eos_id(session):
    assert session.tokenizer.eos_ids >= {BYTE_EOT, BYTE_END_OF_TEXT}
    stats = find_reply_ending_on(session, BYTE_END_OF_TEXT)
    assert stats.stop_reason == "eos" and stats.generated < 40
    assert BYTE_END_OF_TEXT not in stats.ids


def test_warm_and_cold_sessions_agree(session, byte_model):
    turns = [Message("user", "Hello")]
    _, s1 = run(session, turns)
    turns += [Message("assistant", s1.text), Message("user", "Go on")]
    _, warm = run(session, turns)
    with open_chat(byte_model, backend="reference", n_ctx=512) as cold_session:
        # a cold session has no memory of the reply's exact ids: give it the same prompt ids
        events = list(cold_session.complete(session.last_prompt_ids, GREEDY, 12))
        cold = events[-1].stats
    assert warm.reused_tokens > 0 and cold.reused_tokens == 0
    assert warm.ids == cold.ids


def test_system_prompt_change_reaches_the_prompt(session):
    turns = [Message("user", "Hello")]
    run(session, turns, system="You are a pirate.")
    assert session.last_prompt_text().startswith("<|begin_of_text|>System: You are a pirate.<|eot_id|>User: Hello")
    _, stats = run(session, turns, system="You are a poet.")
    text = session.last_prompt_text()
    assert "You are a poet." in text and "pirate" not in text
    # only BOS and the common start "System: You are a p" are reused
    assert stats.reused_tokens == 1 + n_tokens(session, "System: You are a p")


def test_reset_starts_cold(session):
    run(session, [Message("user", "Hello")])
    session.reset()
    _, stats = run(session, [Message("user", "Hello")])
    assert stats.reused_tokens == 0 and session.counters["kv_reused_tokens"] == 0


# ---------------------------------------------------------------------------------------------
# cancel, streaming, determinism
# ---------------------------------------------------------------------------------------------

def test_cancel_mid_reply_keeps_the_partial_reply(session):
    cancel = threading.Event()
    tokens = []
    for event in session.generate([Message("user", "Hello")], None, GREEDY, 200, cancel):
        if event.kind == "token":
            tokens.append(event.token_id)
            if len(tokens) == 3:
                cancel.set()
        if event.kind == "done":
            stats = event.stats
    assert stats.stop_reason == "cancelled"
    assert stats.ids == tokens and len(tokens) == 3
    # the cache is consistent with the decoder: the prompt and the reply tokens fed back so far
    # (the third was not: Stop came before its decode step)
    assert session.decoder.n_past == len(session.cached_ids)
    assert session.cached_ids == session.last_prompt_ids + tokens[:2]
    # the conversation goes on from the partial reply, reusing all of it
    cached = len(session.cached_ids)
    _, s2 = run(session, [Message("user", "Hello"), Message("assistant", stats.text), Message("user", "Hm")])
    assert s2.reused_tokens == cached
    assert s2.prefilled_tokens == 1 + 1 + n_tokens(session, "User: Hm") + 1 + n_tokens(session, "Assistant: ")


def test_cancel_before_start_skips_the_prefill(session):
    cancel = threading.Event()
    cancel.set()
    _, stats = run(session, [Message("user", "Hello")], cancel=cancel)
    assert stats.stop_reason == "cancelled" and stats.generated == 0 and stats.prefilled_tokens == 0


def test_cancel_from_another_thread(session):
    cancel = threading.Event()
    seen = threading.Event()
    result = {}

    def consume():
        for event in session.generate([Message("user", "Hello")], None, GREEDY, 300, cancel):
            if event.kind == "token":
                seen.set()
            if event.kind == "done":
                result["stats"] = event.stats

    worker = threading.Thread(target=consume)
    worker.start()
    assert seen.wait(30)
    cancel.set()
    worker.join(30)
    assert result["stats"].stop_reason == "cancelled"
    assert 0 < result["stats"].generated < 300


def test_abandoned_generator_leaves_a_consistent_cache(session):
    gen = session.generate([Message("user", "Hello")], None, GREEDY, 50)
    for _, event in zip(range(3), gen):
        pass
    gen.close()
    assert session.decoder.n_past == len(session.cached_ids)
    _, stats = run(session, [Message("user", "Hello")])
    assert stats.reused_tokens == len(session.last_prompt_ids) - 1


def test_text_deltas_are_utf8_safe(session):
    events, stats = run(session, [Message("user", "Hello")], max_tokens=300)
    token_events = [e for e in events if e.kind == "token"]
    streamed = "".join(e.text for e in token_events)
    assert streamed == stats.text == session.tokenizer.decode(stats.ids, skip_special=True)
    # a valid multi-byte character was split across tokens and still came out whole
    assert any(ord(c) > 127 and c != "\ufffd" for c in streamed)
    # one event per reply token, plus at most a final tail event without a token
    assert [e.token_id for e in token_events if e.token_id is not None] == stats.ids
    assert all(e.token_id is not None for e in token_events[:-1])


def test_reply_cut_mid_character_ends_with_a_tail_event(session):
    _, full = run(session, [Message("user", "Hello")], max_tokens=300)
    # the first place where the reply could stop on a UTF-8 lead byte
    cut = next(n for n, t in enumerate(full.ids, 1) if 0xC2 <= t <= 0xF4)
    session.reset()
    events, stats = run(session, [Message("user", "Hello")], max_tokens=cut)
    tail = events[-2]
    assert tail.kind == "token" and tail.token_id is None and tail.text.endswith("\ufffd")
    assert stats.ids == full.ids[:cut] and stats.text.endswith("\ufffd")


def test_same_seed_same_reply(session):
    params = SamplerParams(temperature=0.9, seed=42)
    _, a = run(session, [Message("user", "Hello")], params=params, max_tokens=20)
    session.reset()
    _, b = run(session, [Message("user", "Hello")], params=params, max_tokens=20)
    _, c = run(session, [Message("user", "Hello")], params=SamplerParams(temperature=0.9, seed=43), max_tokens=20)
    assert a.ids == b.ids and a.ids != c.ids


def test_stats_are_filled(session):
    _, stats = run(session, [Message("user", "Hello")])
    assert stats.prompt_tokens == len(session.last_prompt_ids)
    assert stats.prefill_tps > 0 and stats.decode_tps > 0 and stats.prefill_s > 0 and stats.decode_s > 0


# ---------------------------------------------------------------------------------------------
# context overflow
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n_turns", [6, 60])
def test_overflow_drops_oldest_turns_but_never_the_system_prompt(byte_model, n_turns):
    system = "You are terse."
    turns = []
    for i in range(n_turns):
        turns += [Message("user", f"Question number {i}?"), Message("assistant", f"Answer number {i}.")]
    turns.append(Message("user", "Last question?"))
    with open_chat(byte_model, backend="reference", n_ctx=160) as session:
        full = len(session.render(turns, system))
        assert full + 16 > 160
        events, stats = run(session, turns, system=system, max_tokens=16)
    assert events[0].kind == "truncated" and events[0].dropped_messages == stats.dropped_messages > 0
    dropped = stats.dropped_messages
    assert dropped % 2 == 0                                     # whole turns: the rest starts with a user
    kept = turns[dropped:]
    assert session.last_prompt_ids == session.render(kept, system)
    assert len(session.last_prompt_ids) + 16 <= 160
    assert len(session.render(turns[dropped - 2:], system)) + 16 > 160   # no more dropped than needed
    text = session.tokenizer.decode(session.last_prompt_ids, skip_special=False)
    assert text.startswith(f"<|begin_of_text|>System: {system}<|eot_id|>User: {kept[0].content}")


def test_a_system_message_in_the_list_is_the_system_prompt(session):
    run(session, [Message("system", "Speak French."), Message("user", "Hello")])
    assert session.last_prompt_text() == ("<|begin_of_text|>System: Speak French.<|eot_id|>"
                                          "User: Hello<|eot_id|>Assistant: ")


def test_a_message_too_long_for_the_context_is_a_typed_error(session):
    with pytest.raises(ContextOverflowError):
        run(session, [Message("user", "x" * 600)])


def test_reply_stops_when_the_context_is_full(byte_model):
    with open_chat(byte_model, backend="reference", n_ctx=40) as session:
        # the one message cannot be dropped: the reply gets what room is left
        _, stats = run(session, [Message("user", "Hello")], max_tokens=30)
        assert len(session.last_prompt_ids) == 24
        assert stats.stop_reason == "context" and stats.generated == 40 - 24
        assert session.decoder.n_past == 40


def test_bad_requests_are_typed_errors(session):
    with pytest.raises(InvalidRequestError):
        list(session.complete([], GREEDY, 5))
    with pytest.raises(InvalidRequestError):
        list(session.complete([1, 99999], GREEDY, 5))
    with pytest.raises(InvalidRequestError):
        list(session.generate([Message("user", "x")], None, GREEDY, 0))


# ---------------------------------------------------------------------------------------------
# backends
# ---------------------------------------------------------------------------------------------

def test_open_decoder_reference(byte_model):
    decoder = open_decoder(byte_model, backend="reference", n_ctx=64)
    try:
        assert decoder.backend_name == "reference" and decoder.n_ctx == 64 and decoder.n_past == 0
        assert decoder.forward([256, 72]).shape == (decoder.n_vocab,)
    finally:
        decoder.close()


def test_default_context_is_the_models_at_most_4096(byte_model):
    from engine.backends import available_backends

    decoder = open_decoder(byte_model, backend="reference", n_ctx=None)
    try:
        assert decoder.n_ctx == 512                       # the tiny shape's training context
    finally:
        decoder.close()
    assert available_backends()["reference"] is None


@pytest.mark.parametrize("kwargs", [dict(backend="gpu"), dict(lm_head="q4"), dict(n_ctx=0), dict(threads=0)])
def test_bad_backend_settings(byte_model, kwargs):
    with pytest.raises(BackendArgumentError):
        open_decoder(byte_model, **kwargs)


def test_non_bitnet_file_goes_to_llama_cpp(tmp_path):
    from make_llama_gguf import write_llama_gguf

    path = write_llama_gguf(tmp_path / "llama.gguf", seed=0)
    with pytest.raises(UnsupportedModelError, match="llama.cpp"):
        open_decoder(path, backend="reference")
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        with pytest.raises(BackendUnavailableError):
            open_decoder(path)
        return
    with open_chat(path, n_ctx=128) as session:
        assert session.decoder.backend_name == "llama.cpp"
        assert not isinstance(session.chat_format, BitNetChatFormat)
        _, s1 = run(session, [Message("user", "hello")], max_tokens=6)
        turns = [Message("user", "hello"), Message("assistant", s1.text), Message("user", "again")]
        _, s2 = run(session, turns, max_tokens=6)
        assert "<|im_start|>user\nagain<|im_end|>" in session.last_prompt_text()
        assert s2.reused_tokens > s1.prompt_tokens // 2


def test_not_a_gguf_is_a_typed_error(tmp_path):
    from engine.errors import ModelFormatError

    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all, just text" * 4)
    with pytest.raises(ModelFormatError):
        open_chat(bad, backend="reference")


def test_chat_session_takes_its_parts(byte_model):
    """ChatSession is built from parts passed in (as the app's worker may do)."""
    from engine.model import load_model
    from engine.reference import ReferenceDecoder
    from engine.tokenizer import Tokenizer

    with load_model(byte_model) as model:
        tokenizer = Tokenizer.from_gguf_metadata(model.tokenizer_metadata)
        decoder = ReferenceDecoder(model, 128)
    with ChatSession(decoder, tokenizer, BitNetChatFormat(tokenizer)) as session:
        _, stats = run(session, [Message("user", "Hello")], max_tokens=4)
        assert stats.generated == 4
