#!/usr/bin/env bash
# One command: install everything the tests need into .venv and run them.
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup.sh test,oracle,llama
. .venv/bin/activate
export QT_QPA_PLATFORM=offscreen
exec python -m pytest -q -p no:cacheprovider "$@"
