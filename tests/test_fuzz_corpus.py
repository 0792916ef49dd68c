"""The fuzzers' kept corpora, replayed as a regression test (scripts/fuzz.sh grows them).

- tests/fuzz_corpus/gguf: atheris inputs (tests/fuzz_atheris.py) -> the file they stand for goes
  through inspect_gguf, GGUFFile, load_model, the native model and one forward step: each ends
  in success or a TernError, quickly and without a large Python allocation.
- tests/fuzz_corpus/native-params (+ native-real): inputs of native/fuzz/fuzz_params.c, run by
  that harness built as a plain program against the engine's library (TERN_NATIVE_LIB if set:
  scripts/sanitize-tests.sh points it at the ASan+UBSan build): it exits 0, within time and
  memory bounds, on every input.
(native/fuzz/corpus, the corpus of the library's own tern_fuzz_model entry, is replayed by
tests/test_native_model.py.)
"""
from __future__ import annotations

import os
import shutil
import subprocess
import time
import tracemalloc
from pathlib import Path

import pytest

import fuzz_atheris
from engine import _native

ROOT = Path(__file__).resolve().parents[1]
CORPUS = Path(__file__).resolve().parent / "fuzz_corpus"
GGUF_INPUTS = sorted((CORPUS / "gguf").iterdir())
NATIVE_INPUTS = sorted((CORPUS / "native-params").iterdir()) + sorted((CORPUS / "native-real").iterdir())
TIME_BOUND_S = 5.0            # per input (ASan builds run several times slower)
PY_MEMORY_BOUND = 64 * 2**20
NATIVE_RSS_BOUND_KB = 1536 * 1024


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    return fuzz_atheris.load_bases(tmp_path_factory.mktemp("fuzz-bases"))


def test_corpora_are_kept_and_small():
    assert len(GGUF_INPUTS) >= 30 and len(NATIVE_INPUTS) >= 15
    total = sum(p.stat().st_size for p in GGUF_INPUTS + NATIVE_INPUTS)
    assert total < 600_000, total


def test_gguf_corpus_gives_typed_errors_or_loads(bases, tmp_path):
    outcomes: dict[str, int] = {}
    path = tmp_path / "input.bin"
    for inp in GGUF_INPUTS:
        path.write_bytes(fuzz_atheris.decode_input(inp.read_bytes(), bases))
        tracemalloc.start()
        start = time.perf_counter()
        try:
            outcome = fuzz_atheris.exercise(path)   # anything but a TernError propagates
        finally:
            elapsed = time.perf_counter() - start
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        assert elapsed < TIME_BOUND_S, f"{inp.name}: {elapsed:.2f} s"
        assert peak < PY_MEMORY_BOUND, f"{inp.name}: {peak} bytes"
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    # The corpus reaches every stage: files that run, and files refused at each level.
    assert {"ran", "reader error", "load error"} <= set(outcomes), outcomes


@pytest.fixture(scope="module")
def params_runner(tmp_path_factory) -> Path:
    """native/fuzz/fuzz_params.c + fuzz_main.c linked against the library the engine loads."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    assert cc, "a C compiler is needed (it also builds native/ at install)"
    lib = _native.library_path().resolve()
    assert lib.is_file(), lib
    out = tmp_path_factory.mktemp("fuzz-runner") / "fuzz_params_run"
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}   # not the compiler under ASan
    subprocess.run([cc, "-O1", "-g", "-std=c11", f"-I{ROOT / 'native' / 'include'}",
                    str(ROOT / "native" / "fuzz" / "fuzz_params.c"), str(ROOT / "native" / "fuzz" / "fuzz_main.c"),
                    str(lib), f"-Wl,-rpath,{lib.parent}", "-o", str(out)],
                   check=True, env=env, capture_output=True, timeout=120)
    return out


def _run(runner: Path, inputs: list[Path]) -> tuple[int, float, int, str]:
    """(exit code, seconds, the runner's own peak RSS in KiB as it prints it, output)."""
    start = time.perf_counter()
    proc = subprocess.Popen([str(runner), *map(str, inputs)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        output, _ = proc.communicate(timeout=TIME_BOUND_S * len(inputs) + 30)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
        raise AssertionError(f"hang on {[p.name for p in inputs]}: {output[-2000:]!r}")
    text = output.decode(errors="replace")
    peaks = [int(line.split()[1]) for line in text.splitlines() if line.startswith("peak_rss_kb ")]
    assert peaks, "the runner printed no peak_rss_kb line"
    return proc.returncode, time.perf_counter() - start, peaks[-1], text


def _outcomes(output: str) -> dict[str, int]:
    """path name -> fuzz_outcome (0 refused at create, 1 loaded, 2 a forward pass ran)."""
    return {Path(line.split(" ", 2)[2]).name: int(line.split(" ", 2)[1])
            for line in output.splitlines() if line.startswith("outcome ")}


def test_native_params_corpus_never_crashes(params_runner):
    rc, elapsed, rss_kb, output = _run(params_runner, NATIVE_INPUTS)
    assert rc == 0, output[-4000:]
    assert "runtime error" not in output and "ERROR: AddressSanitizer" not in output, output[-4000:]
    assert elapsed < TIME_BOUND_S * len(NATIVE_INPUTS)
    assert rss_kb < NATIVE_RSS_BOUND_KB, rss_kb
    outcomes = _outcomes(output)
    assert len(outcomes) == len(NATIVE_INPUTS)
    assert set(outcomes.values()) == {0, 1, 2}, "the corpus covers refusals, loads and forward passes"


def test_native_params_seed_of_a_real_file_loads_and_runs(params_runner):
    """The I2_S seed made from a real file loads and runs its forward pass: the harness reaches
    the decoder, not just the checks."""
    real = sorted((CORPUS / "native-real").iterdir())
    assert real
    rc, _, _, output = _run(params_runner, real)
    assert rc == 0, output[-4000:]
    assert set(_outcomes(output).values()) == {2}, output[-4000:]
