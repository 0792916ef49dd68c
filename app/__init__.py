"""Tern desktop app (PySide6). Talks to the engine only through a worker thread."""
