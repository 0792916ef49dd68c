"""`Tern --self-test` / `python -m engine selftest`: is the native library sound on this CPU?

Garbage output from a kernel the CPU cannot really run is the most reported failure of ternary
engines, so before trusting the native backend Tern checks, with no screen and no network:
1. every kernel variant this CPU can run, on fixed inputs, against exact integer answers computed
   independently here (numpy int64 matmul of the unpacked codes);
2. a tiny model written to a temporary folder: its first greedy tokens from the native library
   against the numpy reference decoder, up to the first near-tie.
The result is a SelfTestReport; `failed_variants` tells the app which kernels to refuse.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engine import __version__, native
from engine.errors import TernError
from engine.model import load_model
from engine.quants import pack_i2_s
from engine.reference import ReferenceDecoder
from engine.testmodel import make_test_model

log = logging.getLogger(__name__)

VARIANTS = ("scalar", "avx2", "avx512-vnni", "amx")
NEAR_TIE = 0.05          # top-1/top-2 logit margin under which int8 rounding may legitimately flip
GREEDY_STEPS = 12
# (rows, k, tokens): a real BitNet row length, tails in rows and tokens, a prefill-sized batch.
KERNEL_CASES = ((67, 2560, 1), (33, 384, 3), (48, 256, 17))


@dataclass
class SelfTestReport:
    kernel: str                                   # the variant the library chose for this CPU
    variants: dict[str, str] = field(default_factory=dict)   # name -> 'ok' | 'not supported' | failure
    model_check: str = ""
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def failed_variants(self) -> list[str]:
        return [name for name, result in self.variants.items() if result not in ("ok", "not supported")]

    @property
    def ok(self) -> bool:
        return not self.failed_variants and self.model_check.startswith("ok")

    def lines(self) -> list[str]:
        out = [f"kernel chosen for this CPU: {self.kernel}"]
        out += [f"  variant {name:12s} {result}" for name, result in self.variants.items()]
        out.append(f"tiny model, native vs reference greedy tokens: {self.model_check}")
        out += [f"  {name}: {seconds * 1000:.0f} ms" for name, seconds in self.timings.items()]
        out.append("self-test passed" if self.ok else "self-test FAILED")
        return out


def _fixed_inputs(rows: int, k: int, tokens: int, seed: int):
    rng = np.random.default_rng(seed)
    codes = rng.integers(-1, 2, size=(rows, k), dtype=np.int8)
    x = rng.integers(-128, 128, size=(tokens, k), dtype=np.int8)
    x[0, :4] = (-128, 127, -128, 127)   # the extremes, where sign/zero-point tricks overflow
    return codes, x


def check_variant(variant: str) -> str:
    """'ok', 'not supported', or what went wrong."""
    for case, (rows, k, tokens) in enumerate(KERNEL_CASES):
        codes, x = _fixed_inputs(rows, k, tokens, seed=case)
        expected = x.astype(np.int64) @ codes.astype(np.int64).T
        packed_t2 = pack_i2_s(codes.reshape(-1), 1.0)[: rows * k // 4]
        for op, weights in (("gemv_t2", packed_t2), ("gemm_t2", packed_t2), ("gemm_i8", codes)):
            inputs = x[:1] if op == "gemv_t2" else x
            try:
                got = native.run_kernel(variant, op, weights, rows, k, inputs)
            except TernError as exc:
                if "not" in str(exc).lower() and case == 0 and op == "gemv_t2":
                    return "not supported"
                return f"{op} {rows}x{k}: {exc}"
            want = expected[: inputs.shape[0]]
            if not np.array_equal(got, want):
                bad = np.argwhere(got != want)[0]
                return (f"{op} {rows}x{k}x{inputs.shape[0]}: wrong at token {bad[0]} row {bad[1]} "
                        f"({got[tuple(bad)]} != {want[tuple(bad)]})")
    return "ok"


def check_model(folder: Path, threads: int = 1) -> str:
    """Greedy tokens of a tiny model: native (exact f16 LM head) vs the reference decoder."""
    path = make_test_model(folder / "selftest-tiny.gguf", "i2_s", "tiny", seed=7)
    prompt = [1, 2, 3, 5, 8, 13, 21, 34]
    reference = ReferenceDecoder(load_model(path), n_ctx=64)
    decoder = native.NativeDecoder(load_model(path), n_ctx=64, threads=threads, lm_head="f16")
    try:
        ref_logits, nat_logits = reference.forward(prompt), decoder.forward(prompt)
        for step in range(GREEDY_STEPS):
            top2 = np.sort(ref_logits)[-2:]
            if top2[1] - top2[0] < NEAR_TIE:
                return f"ok ({step} tokens agree, then a near-tie)"
            want, got = int(np.argmax(ref_logits)), int(np.argmax(nat_logits))
            if want != got:
                return f"step {step}: native chose token {got}, the reference {want}"
            ref_logits, nat_logits = reference.forward([want]), decoder.forward([want])
        return f"ok ({GREEDY_STEPS} tokens agree)"
    finally:
        decoder.close()
        reference.close()


def run_self_test(threads: int = 1) -> SelfTestReport:
    report = SelfTestReport(kernel=native.kernel_name())
    start = time.perf_counter()
    for variant in VARIANTS:
        report.variants[variant] = check_variant(variant)
    report.timings["kernel checks"] = time.perf_counter() - start
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tern-selftest-") as folder:
        try:
            report.model_check = check_model(Path(folder), threads)
        except TernError as exc:
            report.model_check = f"failed: {exc}"
    report.timings["tiny model check"] = time.perf_counter() - start
    return report


# ---------------------------------------------------------------------------------------------
# The quiet check the app runs at first start and after an update
# ---------------------------------------------------------------------------------------------

def _self_test_command() -> list[str]:
    """The packaged app re-runs itself; a checkout runs the engine's command."""
    if getattr(sys, "frozen", False):
        return [sys.executable, "--self-test", "--json"]
    return [sys.executable, "-m", "engine", "selftest", "--json"]


def _stamp_key() -> str:
    """Changes when the native library does (an update) or the CPU does (a moved profile)."""
    from engine import _native
    lib = _native.library_path()
    st = lib.stat()
    return f"{__version__}|{lib}|{st.st_size}|{st.st_mtime_ns}|{platform.machine()}|{platform.processor()}"


def ensure_kernels_checked(stamp_path: Path, timeout_s: float = 120.0) -> str | None:
    """Runs the self-test in a child process when this library build has not been checked on this
    machine, remembers the verdict, and before the library is loaded here forces the scalar
    kernels (TERN_ISA=scalar) if the chosen ones failed. Returns a notice for the user, or None.
    A child process, because a kernel that the CPU cannot run may crash rather than fail."""
    if os.environ.get("TERN_ISA"):
        return None                      # the user chose the kernels
    key = _stamp_key()
    try:
        saved = json.loads(stamp_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        saved = {}
    if saved.get("key") != key:
        try:
            out = subprocess.run(_self_test_command(), capture_output=True, text=True, timeout=timeout_s)
            report = json.loads(out.stdout) if out.stdout.strip() else {}
            ok = out.returncode == 0 and report.get("ok") is True
            reason = "" if ok else (report.get("model_check") or out.stderr.strip()[-300:]
                                    or f"exit status {out.returncode}")
            failed = report.get("failed_variants", [])
        except (OSError, subprocess.TimeoutExpired, ValueError) as exc:
            ok, reason, failed = False, f"the self-test did not finish: {exc}", []
        saved = {"key": key, "ok": ok, "reason": reason, "failed_variants": failed}
        stamp_path.parent.mkdir(parents=True, exist_ok=True)
        stamp_path.write_text(json.dumps(saved), encoding="utf-8")
    if saved.get("ok"):
        return None
    os.environ["TERN_ISA"] = "scalar"
    log.warning("kernel self-test failed (%s); using the scalar kernels", saved.get("reason"))
    failed = ", ".join(saved.get("failed_variants") or []) or "the chosen kernels"
    return (f"The self-test found {failed} giving wrong results on this CPU, so Tern uses its "
            f"slower, safe scalar kernels. ({saved.get('reason')})")
