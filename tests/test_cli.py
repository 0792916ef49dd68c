"""`python -m engine generate | score | chat` as real subprocesses on tiny models (reference
backend), checked against the library called in-process."""
from __future__ import annotations

import json
import math
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from engine.chat import BitNetChatFormat
from engine.sampling import SamplerParams
from engine.session import Message, open_chat

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONIOENCODING": "utf-8"}
GREEDY = SamplerParams.greedy_params()


def cli(*args, stdin: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Runs the command; stdout and stderr decoded as UTF-8 without newline translation (the
    random models' replies contain bare \r)."""
    proc = subprocess.run([sys.executable, "-m", "engine", *map(str, args)], cwd=REPO, env=ENV,
                          input=None if stdin is None else stdin.encode(), capture_output=True, timeout=timeout)
    proc.stdout = proc.stdout.decode("utf-8", errors="replace")
    proc.stderr = proc.stderr.decode("utf-8", errors="replace")
    return proc


def cli_json(*args) -> dict:
    proc = cli(*args, "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.fixture
def byte_model(tiny_model_path):
    return tiny_model_path("i2_s", seed=1, tokenizer=False)


# ---------------------------------------------------------------------------------------------
# generate
# ---------------------------------------------------------------------------------------------

def test_generate_json_matches_the_library(byte_model):
    out = cli_json("generate", "--model", byte_model, "--prompt", "Hello", "--max-tokens", 8,
                   "--temperature", 0, "--backend", "reference")
    assert out["prompt_ids"] == [256] + list(b"Hello")          # BOS + the raw text's bytes
    assert out["backend"] == "reference" and out["kernel"] == "numpy"
    t = out["timings"]
    assert t["load_s"] > 0 and t["prefill_tokens_per_s"] > 0 and t["decode_tokens_per_s"] > 0
    with open_chat(byte_model, backend="reference") as session:
        stats = list(session.complete(out["prompt_ids"], GREEDY, 8))[-1].stats
        assert out["ids"] == stats.ids and out["stop_reason"] == stats.stop_reason
        assert out["text"] == session.tokenizer.decode(stats.ids, skip_special=True)


def test_generate_chat_renders_the_chat_format(byte_model):
    out = cli_json("generate", "--model", byte_model, "--prompt", "Hi there", "--chat", "--system", "Be kind.",
                   "--max-tokens", 4, "--temperature", 0, "--backend", "reference")
    with open_chat(byte_model, backend="reference") as session:
        expected = BitNetChatFormat(session.tokenizer).render([Message("user", "Hi there")], "Be kind.").ids
        text = session.tokenizer.decode(out["prompt_ids"], skip_special=False)
    assert out["prompt_ids"] == expected
    assert text == "<|begin_of_text|>System: Be kind.<|eot_id|>User: Hi there<|eot_id|>Assistant: "


def test_generate_seed_gives_the_same_tokens(byte_model):
    def sample(seed):
        return cli_json("generate", "--model", byte_model, "--prompt-ids", "256,72,105", "--max-tokens", 16,
                        "--temperature", 1.0, "--top-k", 0, "--top-p", 1.0, "--min-p", 0,
                        "--seed", seed, "--backend", "reference")
    a, b, c = sample(7), sample(7), sample(8)
    assert a["prompt_ids"] == [256, 72, 105]
    assert a["ids"] == b["ids"] and a["ids"] != c["ids"]
    assert a["params"]["seed"] == 7 and a["params"]["temperature"] == 1.0


def test_generate_streams_text_without_json(byte_model):
    args = ("generate", "--model", byte_model, "--prompt", "Hello", "--max-tokens", 10,
            "--temperature", 0, "--backend", "reference")
    streamed = cli(*args)
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout == cli_json(*args)["text"]
    assert "decode" in streamed.stderr and "tok/s" in streamed.stderr


@pytest.mark.parametrize("args, message", [
    (("--prompt-ids", "1,2", "--chat"), "--chat needs --prompt"),
    (("--prompt", "x", "--system", "s"), "--system needs --chat"),
    (("--prompt-ids", "1,999999"), "outside the vocabulary"),
    (("--prompt", "x", "--top-p", "-1"), "top_p"),
])
def test_generate_bad_requests_fail_cleanly(byte_model, args, message):
    proc = cli("generate", "--model", byte_model, "--backend", "reference", "--max-tokens", 2, *args)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


def test_generate_missing_model_fails_cleanly(tmp_path):
    proc = cli("generate", "--model", tmp_path / "absent.gguf", "--prompt", "x", "--backend", "reference")
    assert proc.returncode == 2 and "absent.gguf" in proc.stderr and "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------------------
# score
# ---------------------------------------------------------------------------------------------

def test_score_matches_the_reference_decoder(byte_model):
    from engine.backends import open_decoder

    ids = [256] + list(b"Hello, world")
    out = cli_json("score", "--model", byte_model, "--ids", ",".join(map(str, ids)), "--top", 5,
                   "--backend", "reference")
    assert out["ids"] == ids and len(out["positions"]) == len(ids)
    decoder = open_decoder(byte_model, backend="reference", n_ctx=len(ids))
    try:
        logits = decoder.forward(ids, all_logits=True).astype(np.float64)
    finally:
        decoder.close()
    logprobs = []
    for pos, entry in enumerate(out["positions"]):
        assert entry["pos"] == pos and entry["id"] == ids[pos]
        order = np.lexsort((np.arange(logits.shape[1]), -logits[pos]))[:5]
        assert [i for i, _ in entry["top"]] == order.tolist()
        assert [v for _, v in entry["top"]] == logits[pos, order].tolist()
        if pos + 1 < len(ids):
            row = logits[pos]
            expected = row[ids[pos + 1]] - (row.max() + math.log(np.exp(row - row.max()).sum()))
            assert entry["next_id"] == ids[pos + 1]
            assert entry["next_logprob"] == pytest.approx(expected, abs=1e-9)
            logprobs.append(expected)
        else:
            assert "next_id" not in entry
    assert out["perplexity"] == pytest.approx(math.exp(-np.mean(logprobs)), rel=1e-9)


def test_score_text_and_long_sequences_in_chunks(byte_model):
    text = "The quick brown fox jumps over the lazy dog. " * 3     # > one 64-position chunk
    out = cli_json("score", "--model", byte_model, "--text", text, "--top", 2, "--backend", "reference")
    assert out["ids"] == [256] + list(text.encode())
    assert len(out["positions"]) == len(out["ids"]) > 64
    assert all(len(p["top"]) == 2 and p["top"][0][1] >= p["top"][1][1] for p in out["positions"])
    assert out["perplexity"] > 1


# ---------------------------------------------------------------------------------------------
# chat
# ---------------------------------------------------------------------------------------------

def test_chat_over_stdin(byte_model):
    proc = cli("chat", "--model", byte_model, "--backend", "reference", "--temperature", 0,
               "--max-tokens", 6, "--ctx", 256, "--system", "Be brief.",
               stdin="Hello\nAnd then?\n/reset\nHello\n/exit\nnever read\n")
    assert proc.returncode == 0, proc.stderr

    with open_chat(byte_model, backend="reference", n_ctx=256) as session:
        turns = [Message("user", "Hello")]
        s1 = list(session.generate(turns, "Be brief.", GREEDY, 6))[-1].stats
        turns += [Message("assistant", s1.text), Message("user", "And then?")]
        s2 = list(session.generate(turns, "Be brief.", GREEDY, 6))[-1].stats
    assert proc.stdout == f"{s1.text}\n{s2.text}\n{s1.text}\n"    # after /reset the first turn repeats
    assert "[new conversation]" in proc.stderr
    reports = [line for line in proc.stderr.splitlines() if line.startswith("[6 tokens")]
    assert len(reports) == 3
    assert f"prefilled {s1.prefilled_tokens} " in reports[0]
    assert f"prefilled {s2.prefilled_tokens} " in reports[1] and s2.prefilled_tokens < s2.prompt_tokens // 2
    assert f"prefilled {s1.prefilled_tokens} " in reports[2]


def test_chat_survives_a_message_too_long_for_the_context(byte_model):
    proc = cli("chat", "--model", byte_model, "--backend", "reference", "--temperature", 0,
               "--max-tokens", 4, "--ctx", 64, stdin="x" * 100 + "\nHello\n")
    assert proc.returncode == 0, proc.stderr
    assert "leaving no room for a reply" in proc.stderr
    assert "[4 tokens" in proc.stderr                          # the next message was answered


def test_chat_ctrl_c_stops_the_reply_not_the_program(tiny_model_path):
    model = tiny_model_path("i2_s", seed=1, tokenizer=True)     # a big vocabulary: a long greedy reply
    proc = subprocess.Popen([sys.executable, "-m", "engine", "chat", "--model", str(model), "--backend",
                             "reference", "--temperature", "0", "--max-tokens", "3000", "--ctx", "4096"],
                            cwd=REPO, env=ENV, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        proc.stdin.write(b"Tell me everything\n")
        proc.stdin.flush()
        got = b""
        deadline = time.monotonic() + 120
        while len(got) < 20 and time.monotonic() < deadline:      # the reply is streaming
            ready, _, _ = select.select([proc.stdout], [], [], 1.0)
            if ready:
                got += os.read(proc.stdout.fileno(), 4096)
        assert len(got) >= 20, "no reply streamed"
        proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        assert proc.poll() is None                                   # still running
        proc.stdin.write(b"/exit\n")
        proc.stdin.flush()
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0
    assert b"[stopped]" in err
    report = [line for line in err.decode().splitlines() if "cancelled" in line]
    assert report and int(report[0].split()[0].lstrip("[")) < 3000


def test_chat_without_model_uses_the_library_default(byte_model, tmp_path, monkeypatch):
    from engine.library import Library

    monkeypatch.setenv("TERN_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TERN_MODELS_DIR", str(tmp_path / "models"))
    Library().add(byte_model)
    proc = subprocess.run([sys.executable, "-m", "engine", "chat", "--backend", "reference", "--max-tokens", "3",
                           "--temperature", "0"], cwd=REPO, env={**os.environ, "PYTHONIOENCODING": "utf-8"},
                          input=b"Hello\n", capture_output=True, timeout=120)
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 0, err
    assert str(Path(byte_model).resolve()) in err and "[3 tokens" in err
