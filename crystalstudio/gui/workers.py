"""Run slow work (reading a file, encode -> decode -> segment) off the GUI thread.

A :class:`Task` is a ``QRunnable`` whose result or exception comes back through Qt
signals. The signal object is created on the GUI thread, so the connected slots run there
(queued connection): they may touch widgets and the session.
"""

from __future__ import annotations

from typing import Any, Callable

from PySide6.QtCore import QObject, QRunnable, Signal

__all__ = ["Task"]


class _Signals(QObject):
    done = Signal(object)  # the return value of the function
    failed = Signal(object)  # the exception it raised


class Task(QRunnable):
    """``fn(*args)`` in a thread pool; ``signals.done(result)`` or ``signals.failed(exc)`` on the GUI thread.

    Keep a reference to the task until one of the signals arrived (the window does); the
    task is not auto-deleted by the pool.
    """

    def __init__(self, fn: Callable[..., Any], *args: Any) -> None:
        super().__init__()
        self.setAutoDelete(False)
        self.fn = fn
        self.args = args
        self.signals = _Signals()

    def run(self) -> None:  # runs in a worker thread
        try:
            result = self.fn(*self.args)
        except Exception as exc:  # noqa: BLE001 - every failure goes back to the GUI as a message
            self.signals.failed.emit(exc)
        else:
            self.signals.done.emit(result)
