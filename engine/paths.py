"""Where Tern keeps things: per-user dirs from platformdirs, resources in the tree or the bundle."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import platformdirs

APP_NAME = "Tern"


def data_dir() -> Path:
    """Per-user data directory (conversations, library index). TERN_HOME overrides it (tests)."""
    override = os.environ.get("TERN_HOME")
    path = Path(override) / "data" if override else Path(platformdirs.user_data_dir(APP_NAME, appauthor=False))
    path.mkdir(parents=True, exist_ok=True)
    return path


def models_dir() -> Path:
    override = os.environ.get("TERN_MODELS_DIR")
    path = Path(override) if override else data_dir() / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path


def resources_dir() -> Path:
    """resources/ beside the packages in a checkout, or inside a PyInstaller bundle."""
    bundle = getattr(sys, "_MEIPASS", None)
    candidates = [Path(bundle) / "resources"] if bundle else []
    candidates.append(Path(__file__).resolve().parent.parent / "resources")
    candidates.append(Path(__file__).resolve().parent / "resources")
    for path in candidates:
        if path.is_dir():
            return path
    return candidates[-1]


def resource_path(name: str) -> Path:
    return resources_dir() / name
