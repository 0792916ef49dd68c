#!/usr/bin/env bash
# One command: set up Tern and start it. With a screen, the desktop app; without one, a chat in
# the terminal. The default model (BitNet b1.58 2B4T) is downloaded on first start.
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup.sh "${TERN_EXTRAS:-}"
. .venv/bin/activate
if [ -n "${DISPLAY:-}${WAYLAND_DISPLAY:-}" ] || [ "$(uname)" = "Darwin" ]; then
  exec python -m app "$@"
else
  exec python -m engine chat "$@"
fi
