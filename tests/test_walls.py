"""The three walls: the engine never imports Qt (import-linter contract in pyproject.toml), and
native/ knows nothing of Python."""
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_engine_never_imports_qt():
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert exe, "import-linter is a test dependency (pip install -e .[test])"
    out = subprocess.run([exe, "--config", str(ROOT / "pyproject.toml")], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 broken" in out.stdout


def test_importing_the_engine_loads_no_qt():
    code = ("import sys, engine.session, engine.backends, engine.library, engine.download; "
            "print(sorted(m for m in sys.modules if m.startswith(('PySide6', 'shiboken6', 'app'))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_native_sources_know_nothing_of_python():
    for path in (ROOT / "native").rglob("*"):
        if path.suffix in {".c", ".h", ".cpp", ".cu", ".cuh"}:
            text = path.read_text(encoding="utf-8", errors="replace")
            assert "Python.h" not in text and "PyObject" not in text, path
