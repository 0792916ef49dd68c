#!/usr/bin/env bash
# Installs Tern's desktop entry, icon and the .gguf file association for the current user (Linux).
# Usage: packaging/install-desktop.sh [PATH_TO_TERN_EXECUTABLE]   (default: dist/Tern/Tern)
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
exe="$(realpath "${1:-$here/dist/Tern/Tern}")"
[ -x "$exe" ] || { echo "no executable at $exe (build it with packaging/build.sh)" >&2; exit 1; }
data="${XDG_DATA_HOME:-$HOME/.local/share}"
mkdir -p "$data/applications" "$data/icons/hicolor/scalable/apps" "$data/mime/packages"
# Exec needs quoting when the path has spaces (Desktop Entry spec: double quotes around the argument).
sed "s|@EXEC@|\"$exe\"|" "$here/resources/tern.desktop" > "$data/applications/tern.desktop"
cp "$here/resources/icons/tern.svg" "$data/icons/hicolor/scalable/apps/tern.svg"
cp "$here/resources/tern-gguf-mime.xml" "$data/mime/packages/tern-gguf.xml"
command -v update-mime-database >/dev/null && update-mime-database "$data/mime" || true
command -v update-desktop-database >/dev/null && update-desktop-database "$data/applications" || true
command -v xdg-mime >/dev/null && xdg-mime default tern.desktop application/x-gguf || true
echo "installed: $data/applications/tern.desktop -> $exe"
