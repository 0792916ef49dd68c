"""PySide6 6.12's emit() reference bug stays compensated (see app/qt_compat.py)."""
import sys

from PySide6.QtCore import QObject, Signal

import app.qt_compat  # noqa: F401


class _Emitter(QObject):
    number = Signal(int)
    payload = Signal(object)


def test_emitting_does_not_eat_references_to_true():
    emitter = _Emitter()
    got = []
    emitter.number.connect(got.append)
    before = sys.getrefcount(True)
    for i in range(5000):
        emitter.number.emit(i)
        emitter.payload.emit(None)
    assert len(got) == 5000
    assert abs(sys.getrefcount(True) - before) <= 2
