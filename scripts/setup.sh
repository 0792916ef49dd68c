#!/usr/bin/env bash
# Creates .venv and installs Tern into it (editable: the native library is compiled by
# scikit-build-core). Usage: scripts/setup.sh [extras], e.g. scripts/setup.sh test,oracle,llama
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
if [[ ",$extras," == *",oracle,"* ]]; then
  # The CPU build of torch first: a bare 'torch' requirement would pull a multi-GB CUDA build.
  python -m pip install -q torch==2.13.0
fi
if [[ ",$extras," == *",llama,"* ]]; then
  # No wheel for this platform: llama.cpp compiles (15-30 min on 2 cores, cached by pip).
  CMAKE_ARGS="${CMAKE_ARGS:-} -DLLAVA_BUILD=OFF" python -m pip install -q "llama-cpp-python==0.3.36"
fi
spec="."
[ -n "$extras" ] && spec=".[$extras]"
python -m pip install -q -e "$spec"
