"""A work-around for a reference-count bug in PySide6 6.12 on Python < 3.12.

`SignalInstance.emit()` returns `True` without a new reference, so every emit from Python
takes one reference away from `True`. Before Python 3.12 `True` is not immortal: after a few
thousand emits (a minute of streaming) the interpreter frees it and dies with "Fatal Python
error: bool_dealloc". Measured here: 100 emits change sys.getrefcount(True) by -99.

`install()` measures the leak once and, only if it is there, wraps `emit` to give the reference
back. Every module of the app that emits signals imports this module.
"""
from __future__ import annotations

import ctypes
import logging
import sys

from PySide6.QtCore import QObject, Signal, SignalInstance

log = logging.getLogger(__name__)

_PROBE_EMITS = 16
_installed = False


class _Probe(QObject):
    ping = Signal()


def _incref(obj, times: int = 1) -> None:
    for _ in range(times):
        ctypes.pythonapi.Py_IncRef(ctypes.py_object(obj))


def emit_leaks() -> int:
    """References of True lost per emit (0 on a fixed PySide6 or an immortal True)."""
    probe = _Probe()
    before = sys.getrefcount(True)
    for _ in range(_PROBE_EMITS):
        probe.ping.emit()
    lost = before - sys.getrefcount(True)
    if lost > 0:
        _incref(True, lost)          # give back what the probe itself took
    return round(lost / _PROBE_EMITS)


def install() -> None:
    global _installed
    if _installed:
        return
    _installed = True
    if emit_leaks() != 1:
        return
    original = SignalInstance.emit

    def emit(self, *args):
        result = original(self, *args)
        _incref(result)
        return result

    SignalInstance.emit = emit
    log.info("PySide6 %s: compensating the reference emit() takes from True", _pyside_version())


def _pyside_version() -> str:
    import PySide6
    return PySide6.__version__


install()
