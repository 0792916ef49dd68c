#!/usr/bin/env bash
# One command: build the double-clickable Tern bundle from a clean checkout into dist/Tern/.
# Linux here; on macOS and Windows (Git Bash) the same script and spec build dist/Tern.app / dist/Tern/Tern.exe.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh "bundle${TERN_BUNDLE_EXTRAS:-,llama}"
. .venv/bin/activate 2>/dev/null || . .venv/Scripts/activate
python -m PyInstaller --noconfirm --clean --log-level WARN \
  --distpath dist --workpath build/pyinstaller packaging/tern.spec
du -sh dist/Tern | awk '{print "bundle size: " $1}'
