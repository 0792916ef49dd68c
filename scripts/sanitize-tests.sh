#!/usr/bin/env bash
# Build native/ with AddressSanitizer + UndefinedBehaviorSanitizer (CMake TERN_SANITIZE=ON) into
# build/sanitize and run the native kernel, model and corpus tests against that library. Any
# sanitizer report aborts the test process, so the run fails.
#
#   scripts/sanitize-tests.sh [extra pytest args]      (CC=clang to build with clang)
#
# Python itself is not instrumented: the sanitizer runtime is LD_PRELOADed so that it comes
# first (it must intercept malloc before anything else runs). Leak checking is off: the
# interpreter's own allocations at exit are not leaks of ours. pytest captures at the sys
# level only, so that a report (written to fd 2 just before the abort) reaches the log.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CC=${CC:-gcc}
BUILD=$ROOT/build/sanitize
PY=${PYTHON:-$ROOT/.venv/bin/python}
JOBS=${JOBS:-2}

start=$(date +%s)
# -O1: the sanitized library is for finding faults, and -O2 of the SIMD files doubles the build.
cmake -S native -B "$BUILD" -DTERN_SANITIZE=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo \
      -DCMAKE_C_COMPILER="$CC" -DCMAKE_C_FLAGS_RELWITHDEBINFO="-O1 -g" \
      > "$BUILD.cmake.log" 2>&1 \
    || { cat "$BUILD.cmake.log"; exit 1; }
cmake --build "$BUILD" -j "$JOBS" > "$BUILD.build.log" 2>&1 || { tail -50 "$BUILD.build.log"; exit 1; }
LIB=$BUILD/libtern.so
echo "sanitize-tests: built $LIB with $CC in $(( $(date +%s) - start )) s"

case $("$CC" --version | head -1) in
    *clang*) RUNTIME=$("$CC" -print-file-name=libclang_rt.asan-x86_64.so) ;;
    *) RUNTIME="$("$CC" -print-file-name=libasan.so) $("$CC" -print-file-name=libubsan.so)" ;;
esac
for lib in $RUNTIME; do
    [ -f "$lib" ] || { echo "sanitize-tests: no sanitizer runtime at $lib" >&2; exit 1; }
done

TESTS=(tests/test_native_kernels.py tests/test_native_gemm.py tests/test_native_model.py
       tests/test_selftest.py tests/test_fuzz_corpus.py)
[ -f tests/test_native_attention.py ] && TESTS+=(tests/test_native_attention.py)

set +e
env TERN_NATIVE_LIB="$LIB" LD_PRELOAD="$RUNTIME" \
    ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 \
    UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1:abort_on_error=1 \
    QT_QPA_PLATFORM=offscreen \
    "$PY" -m pytest -q -p no:cacheprovider --capture=sys "${TESTS[@]}" \
    "$@"
status=$?
set -e
echo "sanitize-tests: pytest exit $status after $(( $(date +%s) - start )) s in all"
exit $status
