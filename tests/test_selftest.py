import json
import subprocess
import sys

from engine.selftest import check_variant


def test_selftest_command_checks_every_variant_and_the_tiny_model():
    out = subprocess.run([sys.executable, "-m", "engine", "selftest", "--json", "--threads", "2"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads(out.stdout)
    assert report["ok"] and report["failed_variants"] == []
    assert report["variants"]["scalar"] == "ok"
    assert report["variants"][report["kernel"]] == "ok"
    assert report["model_check"].startswith("ok (")


def test_unknown_variant_is_reported_not_supported():
    assert check_variant("no-such-isa") == "not supported"


def test_forced_scalar_kernel_is_the_one_chosen():
    out = subprocess.run([sys.executable, "-m", "engine", "selftest", "--json"], capture_output=True,
                         text=True, timeout=120, env={**__import__("os").environ, "TERN_ISA": "scalar"})
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["kernel"] == "scalar"


def test_quiet_check_runs_once_per_library_build_and_remembers(tmp_path, monkeypatch):
    from engine.selftest import ensure_kernels_checked
    monkeypatch.delenv("TERN_ISA", raising=False)
    stamp = tmp_path / "selftest.json"
    assert ensure_kernels_checked(stamp) is None
    saved = json.loads(stamp.read_text())
    assert saved["ok"] is True and saved["failed_variants"] == []
    before = stamp.stat().st_mtime_ns
    assert ensure_kernels_checked(stamp) is None
    assert stamp.stat().st_mtime_ns == before           # not run again for the same build


def test_a_failed_verdict_forces_the_scalar_kernels(tmp_path, monkeypatch):
    from engine.selftest import _stamp_key, ensure_kernels_checked
    monkeypatch.delenv("TERN_ISA", raising=False)
    stamp = tmp_path / "selftest.json"
    stamp.write_text(json.dumps({"key": _stamp_key(), "ok": False, "reason": "step 3: wrong token",
                                 "failed_variants": ["avx512-vnni"]}))
    notice = ensure_kernels_checked(stamp)
    assert notice and "avx512-vnni" in notice and "scalar" in notice
    assert __import__("os").environ["TERN_ISA"] == "scalar"
