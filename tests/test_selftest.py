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
