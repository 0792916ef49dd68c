"""`python -m engine bench` on a tiny model, one repeat: the JSON report's structure and sane
values (speed itself is measured by the benchmark, never asserted here)."""
from __future__ import annotations

import json

import pytest

from engine.bench import tern_bytes_per_token
from engine.cli import main
from engine.model import load_model

FIGURES = ("pp128_tps", "pp512_tps", "tg16_tps")


def run_cli(capsys, *args: str) -> dict:
    assert main(["bench", *args, "--repeat", "1", "--tg", "16", "--probe-mb", "64", "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def check_engine(entry: dict, bandwidth: float) -> None:
    for key in FIGURES:
        fig = entry[key]
        assert len(fig["runs"]) == 1
        assert fig["median"] == fig["best"] == fig["runs"][0] > 0
    ttft = entry["ttft512_s"]["median"]
    # the first token needs the whole 512-token prompt: not faster than pp512 says
    assert ttft >= 512 / entry["pp512_tps"]["median"] * 0.999
    assert entry["load_s"] > 0
    assert 10 * 2**20 < entry["peak_rss_bytes"] < 8 * 2**30
    bpt = entry["bytes_per_token"]["total"]
    assert bpt > 0
    gbps = entry["decode_gbps"]["median"]
    assert gbps == pytest.approx(entry["tg16_tps"]["median"] * bpt / 1e9)
    assert entry["decode_bandwidth_fraction"]["median"] == pytest.approx(gbps / bandwidth)


def test_bench_native_both_lm_heads(capsys, tiny_model_path):
    path = tiny_model_path("i2_s", tokenizer=False)
    report = run_cli(capsys, "--model", str(path), "--threads", "2", "--lm-head", "int8,f16",
                     "--ctx", "1024", "--fill-ctx")
    assert report["threads"] == 2 and report["repeat"] == 1
    assert report["machine"]["logical_cpus"] >= 1
    bw = report["bandwidth_gbps"]
    assert set(bw) == {"1", "2"} and all(0.1 < v < 10_000 for v in bw.values())
    # probed before the first engine and after each: the limit is the best sample
    samples = report["bandwidth_samples_gbps"]
    assert all(len(samples[t]) == 3 and bw[t] == max(samples[t]) for t in bw)
    engines = report["engines"]
    assert [(e["engine"], e["lm_head"]) for e in engines] == [("tern native", "int8"), ("tern native", "f16")]
    for e in engines:
        assert e["kernel"] in ("scalar", "avx2", "avx512-vnni", "amx", "neon")
        assert e["peak_rss_full_ctx_bytes"] >= e["peak_rss_bytes"]
        check_engine(e, bw["2"])
    # the f16 head reads twice the bytes of the int8 copy (less its per-row scales)
    model = load_model(path)
    try:
        hp = model.hparams
        int8, f16 = (tern_bytes_per_token(model, h, 16) for h in ("int8", "f16"))
    finally:
        model.close()
    assert int8["lm_head"] == hp.n_vocab * hp.n_embd + 4 * hp.n_vocab
    assert f16["lm_head"] == 2 * hp.n_vocab * hp.n_embd
    assert engines[0]["bytes_per_token"] == int8
    assert report["ratios"] == {}


def test_bench_peer_llama_cpp(capsys, tiny_model_path, tmp_path, llama3_tokenizer_dir):
    """llama.cpp needs a real BPE vocabulary (merges): the Llama-3 one, for both engines."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is an optional dependency ([llama])")
    path = tiny_model_path("i2_s", tokenizer=True)
    report = run_cli(capsys, "--model", str(path), "--peer", "llama-cpp", "--peer-dir", str(tmp_path),
                     "--tokenizer", str(llama3_tokenizer_dir))
    names = [e["engine"] for e in report["engines"]]
    assert names == ["tern native", "llama.cpp", "llama.cpp"]
    peers = report["engines"][1:]
    assert [p["model"].rsplit("-", 3)[1] for p in peers] == ["tq2_0", "tq1_0"]
    for e in report["engines"]:
        check_engine(e, report["bandwidth_gbps"]["1"])
    assert len(report["ratios"]) == 2
    for name, r in report["ratios"].items():
        peer = next(p for p in peers if name.endswith(p["model"].rsplit("/", 1)[1]))
        assert r["tg16_tps"]["median"] == pytest.approx(
            report["engines"][0]["tg16_tps"]["median"] / peer["tg16_tps"]["median"])


def test_decode_after_a_cached_context(capsys, tiny_model_path):
    """--depth N decodes after an N-token prompt: the KV bytes counted per step grow with N."""
    path = tiny_model_path("i2_s", tokenizer=False)
    shallow = run_cli(capsys, "--model", str(path), "--ctx", "1024")
    deep = run_cli(capsys, "--model", str(path), "--ctx", "1024", "--depth", "700")
    assert shallow["decode_depth"] == 1 and deep["decode_depth"] == 700
    check_engine(deep["engines"][0], deep["bandwidth_gbps"]["1"])
    model = load_model(path)
    try:
        hp = model.hparams
    finally:
        model.close()
    per_position = hp.n_layer * 2 * hp.n_head_kv * hp.head_dim * 2          # f16 K and V
    kv = [r["engines"][0]["bytes_per_token"]["kv"] for r in (shallow, deep)]
    # step i attends over depth + 1 + i positions; the mean over 16 steps is depth + 8.5
    assert kv == [pytest.approx(per_position * 9.5), pytest.approx(per_position * 708.5)]
    assert main(["bench", "--model", str(path), "--ctx", "256", "--depth", "250"]) == 2
    assert "--depth must be 1..128" in capsys.readouterr().err
    assert main(["bench", "--model", str(path), "--backend", "cuda", "--depth", "700"]) == 2
    assert "CPU bench only" in capsys.readouterr().err


def test_bad_arguments_are_errors(capsys, tiny_model_path):
    path = tiny_model_path("i2_s", tokenizer=False)
    assert main(["bench", "--model", str(path), "--repeat", "0"]) == 2
    assert "at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "--model", str(path), "--lm-head", "int4"])


def test_markdown_table_has_a_row_per_engine(capsys, tiny_model_path):
    path = tiny_model_path("i2_s", tokenizer=False)
    assert main(["bench", "--model", str(path), "--repeat", "1", "--tg", "4", "--probe-mb", "64",
                 "--lm-head", "int8,f16", "--markdown"]) == 0
    lines = capsys.readouterr().out.splitlines()
    table = [line for line in lines if line.startswith("|")]
    assert len(table) == 2 + 2
    assert table[0].count("|") == table[2].count("|") == table[3].count("|")
    assert "int8" in table[2] and "f16" in table[3]
    assert any(line.startswith("Measured read bandwidth (best probe): 1 thread(s)") for line in lines)
