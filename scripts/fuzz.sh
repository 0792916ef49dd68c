#!/usr/bin/env bash
# Run the fuzzers for a given time, then merge what they found into the kept corpora.
#
#   scripts/fuzz.sh [native|atheris|both] [SECONDS]     (default: both, 600 s each)
#
# native:  libFuzzer on tern_model_create + one forward (native/fuzz/fuzz_params.c, corpus
#          tests/fuzz_corpus/native-params), the library built with clang, ASan+UBSan and
#          coverage into build/fuzz.
# atheris: tests/fuzz_atheris.py over the GGUF reader, load_model and the native model, against
#          a release build of the library in build/fuzz-release.
# Both run niced (the machine is shared). A crash leaves its input in build/fuzz/artifacts/ and
# makes this script exit non-zero; copy the input into tests/fuzz_corpus/ once it is fixed.
# FUZZ_FLAGS adds libFuzzer flags, e.g. "-fork=1 -ignore_crashes=1" to go on past known faults;
# TERN_ISA=avx2|scalar|... passes through to the native harness.
# Needs: clang, libclang-rt-14-dev (libFuzzer), `pip install atheris` in .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WHICH=${1:-both}
SECONDS_EACH=${2:-600}
PY=${PYTHON:-$ROOT/.venv/bin/python}
# libFuzzer's merge re-runs the atheris script by its own name (#!/usr/bin/env python3)
export PATH="$(dirname "$PY"):$PATH"
WORK=$ROOT/build/fuzz-work
read -r -a EXTRA <<< "${FUZZ_FLAGS:-}"
ART=$ROOT/build/fuzz/artifacts
mkdir -p "$WORK" "$ART"

seeds() {
    [ -d "$WORK/seeds/native" ] || "$PY" scripts/fuzz_seeds.py "$WORK/seeds"
}

build_native() {
    cmake -S native/fuzz -B build/fuzz -G Ninja -DCMAKE_C_COMPILER=clang -DCMAKE_CXX_COMPILER=clang++ \
          -DCMAKE_BUILD_TYPE=RelWithDebInfo > "$WORK/cmake-fuzz.log"
    nice -n 10 cmake --build build/fuzz -j 2 > "$WORK/build-fuzz.log"
}

build_release() {
    cmake -S native -B build/fuzz-release -G Ninja -DCMAKE_BUILD_TYPE=Release > "$WORK/cmake-release.log"
    nice -n 10 cmake --build build/fuzz-release -j 2 > "$WORK/build-release.log"
}

# merge_into KEPT RUN_DIR CMD...: minimize KEPT + RUN_DIR into KEPT (libFuzzer -merge=1). Files
# named by hand (reproducers of fixed faults) stay; libFuzzer's own (SHA-1 names) are replaced.
merge_into() {
    local kept=$1 run=$2; shift 2
    local fresh=$WORK/merged-$(basename "$kept")
    rm -rf "$fresh" && mkdir -p "$fresh" "$kept"
    nice -n 19 "$@" -merge=1 "$fresh" "$kept" "$run" > "$WORK/merge-$(basename "$kept").log" 2>&1
    find "$kept" -maxdepth 1 -type f -regextype posix-extended -regex '.*/[0-9a-f]{40}' -delete
    find "$fresh" -maxdepth 1 -type f -regextype posix-extended -regex '.*/[0-9a-f]{40}' \
        -exec cp {} "$kept"/ \;
}

# fuzz_one HARNESS KEPT SECONDS: run one libFuzzer harness, then merge its finds into KEPT.
fuzz_one() {
    local harness=$1 kept=$2 secs=$3 run=$WORK/$1 rc=0
    mkdir -p "$run" "$kept"
    local seeds=()
    [ "$harness" = fuzz_params ] && seeds=("$WORK/seeds/native")
    ASAN_OPTIONS=detect_leaks=1 nice -n 19 build/fuzz/$harness -max_len=2048 -len_control=0 -timeout=10 \
        -rss_limit_mb=2048 -print_final_stats=1 -artifact_prefix="$ART/$harness-" "${EXTRA[@]}" \
        -max_total_time="$secs" "$run" "$kept" "${seeds[@]}" > "$WORK/$harness.log" 2>&1 || rc=$?
    tail -"$([ "$rc" = 0 ] && echo 12 || echo 40)" "$WORK/$harness.log"
    # what was found is kept even after a crash (crashing inputs never enter the run corpus)
    merge_into "$kept" "$run" build/fuzz/$harness -max_len=2048 -timeout=10
    return "$rc"
}

# native/fuzz/fuzz_model.c (the library's own tern_fuzz_model entry, corpus native/fuzz/corpus)
# is run by the library's owner; this script fuzzes the parameters harness.
run_native() {
    build_native
    fuzz_one fuzz_params tests/fuzz_corpus/native-params "$SECONDS_EACH"
}

run_atheris() {
    build_release
    local run=$WORK/atheris rc=0
    mkdir -p "$run"
    TERN_NATIVE_LIB=$ROOT/build/fuzz-release/libtern.so nice -n 19 "$PY" tests/fuzz_atheris.py \
        -max_len=4096 -timeout=20 -rss_limit_mb=3072 -print_final_stats=1 -artifact_prefix="$ART/atheris-" "${EXTRA[@]}" \
        -max_total_time="$SECONDS_EACH" "$run" tests/fuzz_corpus/gguf "$WORK/seeds/gguf" \
        > "$WORK/atheris.log" 2>&1 || rc=$?
    tail -"$([ "$rc" = 0 ] && echo 12 || echo 40)" "$WORK/atheris.log"
    TERN_NATIVE_LIB=$ROOT/build/fuzz-release/libtern.so merge_into tests/fuzz_corpus/gguf "$run" \
        "$PY" tests/fuzz_atheris.py -max_len=4096 -timeout=20
    return "$rc"
}

seeds
status=0
case $WHICH in
    native) run_native || status=1 ;;
    atheris) run_atheris || status=1 ;;
    both) run_native & n=$!; run_atheris || status=1; wait $n || status=1 ;;
    *) echo "usage: $0 [native|atheris|both] [SECONDS]" >&2; exit 2 ;;
esac
exit $status
