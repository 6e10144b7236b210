"""Run slow work (reading a file, encode -> decode -> segment) off the GUI thread.

A :class:`Task` is ``fn(*args)`` whose result or exception comes back through Qt signals.
The signal object is created on the GUI thread and owned by a GUI-thread parent, so the
connected slots run there (queued connection) and may touch widgets and the session.

Lifetimes: the pool is given a plain Python callable (``QThreadPool.start(callable)``),
never a Python subclass of ``QRunnable``, and that callable holds neither the task nor its
owner. So whenever the GUI thread drops its last reference to a finished task, nothing
C++ that the pool thread may still be returning through is deleted, and the signal object
is destroyed only on the GUI thread (:meth:`Task.release` -> ``deleteLater``).

:class:`LatestRunner` is one worker thread that always runs the newest request: while a
job runs, a new request only replaces the one waiting (per channel), so a stream of slider
moves costs at most the running job plus one more.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable

from PySide6.QtCore import QObject, QThreadPool, Signal

__all__ = ["Task", "LatestRunner"]


class _Signals(QObject):
    done = Signal(object)  # the return value of the function
    failed = Signal(object)  # the exception it raised


class Task:
    """``fn(*args)`` in a thread pool; ``signals.done(result)`` or ``signals.failed(exc)`` on the GUI thread.

    Create it on the GUI thread, connect to :attr:`signals`, then :meth:`start` it on a
    ``QThreadPool``. Call :meth:`release` (GUI thread) once a signal arrived.

    Args:
        fn: the work; any exception it raises is sent through ``signals.failed``.
        *args: passed to ``fn``.
        parent: a GUI-thread ``QObject`` that owns the signal object (so that it is never
            deleted from the pool's thread); None keeps it owned by Python.
    """

    def __init__(self, fn: Callable[..., Any], *args: Any, parent: QObject | None = None) -> None:
        self.fn = fn
        self.args = args
        self.signals = _Signals(parent)

    def run(self) -> None:
        """Run ``fn(*args)`` here and emit the outcome (the pool thread calls this through :meth:`start`)."""
        _run(self.fn, self.args, self.signals)

    def start(self, pool: QThreadPool) -> None:
        """Queue the work on ``pool``: a closure over ``fn``, ``args`` and the signal object only."""
        fn, args, signals = self.fn, self.args, self.signals
        pool.start(lambda: _run(fn, args, signals))

    def release(self) -> None:
        """Schedule the signal object for deletion on its own (GUI) thread; call after a signal arrived."""
        self.signals.deleteLater()


def _run(fn: Callable[..., Any], args: tuple, signals: _Signals) -> None:  # runs in a worker thread
    try:
        result = fn(*args)
    except Exception as exc:  # noqa: BLE001 - every failure goes back to the GUI as a message
        signals.failed.emit(exc)
    else:
        signals.done.emit(result)


class LatestRunner(QObject):
    """One worker thread that coalesces requests: the newest request of each channel wins.

    :meth:`submit` starts the job at once when the worker is idle; otherwise it replaces the
    request waiting in the same channel (the older one is dropped, never run). When the
    running job ends, the oldest waiting channel's request runs next. Results come back on
    the GUI thread through :attr:`done` ``(result, tag)`` / :attr:`failed` ``(exc, tag)``.
    Create it on the GUI thread.

    Attributes:
        started: number of jobs started so far (tests, diagnostics).
    """

    done = Signal(object, object)  # result, tag
    failed = Signal(object, object)  # exception, tag
    busy_changed = Signal(bool)

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self._pool = QThreadPool(self)
        self._pool.setMaxThreadCount(1)
        self._pending: OrderedDict[str, tuple[Callable[..., Any], tuple, Any]] = OrderedDict()
        self._running: Task | None = None
        self._running_tag: Any = None
        self._closed = False
        self.started = 0

    @property
    def busy(self) -> bool:
        """True while a job runs or waits."""
        return self._running is not None or bool(self._pending)

    @property
    def running_tag(self) -> Any:
        """Tag of the job running now (None when idle)."""
        return self._running_tag if self._running is not None else None

    def pending(self, channel: str | None = None) -> Any:
        """Tag of the request waiting in ``channel`` (None when none); all tags if channel is None."""
        if channel is None:
            return [tag for _, _, tag in self._pending.values()]
        item = self._pending.get(channel)
        return None if item is None else item[2]

    def submit(self, fn: Callable[..., Any], *args: Any, tag: Any = None, channel: str = "default") -> None:
        """Run ``fn(*args)`` as soon as the worker is free, replacing what waits in ``channel``."""
        if self._closed:
            return
        was_busy = self.busy
        self._pending.pop(channel, None)
        self._pending[channel] = (fn, args, tag)
        self._kick()
        if not was_busy:
            self.busy_changed.emit(True)

    def cancel(self, channel: str | None = None) -> None:
        """Drop the waiting request of ``channel`` (all when None); a running job finishes."""
        if channel is None:
            self._pending.clear()
        else:
            self._pending.pop(channel, None)
        if not self.busy:
            self.busy_changed.emit(False)

    def _kick(self) -> None:
        if self._running is not None or not self._pending or self._closed:
            return
        _, (fn, args, tag) = self._pending.popitem(last=False)
        task = Task(fn, *args, parent=self)
        task.signals.done.connect(self._on_done)
        task.signals.failed.connect(self._on_failed)
        self._running, self._running_tag = task, tag
        self.started += 1
        task.start(self._pool)

    def _on_done(self, result: Any) -> None:
        self._finished(self.sender(), result, None)

    def _on_failed(self, exc: BaseException) -> None:
        self._finished(self.sender(), None, exc)

    def _finished(self, sender: QObject | None, result: Any, exc: BaseException | None) -> None:
        task = self._running
        if task is None or sender is not task.signals:
            if sender is not None:
                sender.deleteLater()
            return
        task.release()
        tag = self._running_tag
        self._running, self._running_tag = None, None
        if self._closed:
            return
        self._kick()  # the next job computes while the GUI shows this result
        if exc is None:
            self.done.emit(result, tag)
        else:
            self.failed.emit(exc, tag)
        if not self.busy:
            self.busy_changed.emit(False)

    def shutdown(self, timeout_ms: int = 30_000) -> None:
        """Drop waiting requests and wait for the running job (window closing)."""
        self._closed = True
        self._pending.clear()
        self._pool.clear()
        self._pool.waitForDone(timeout_ms)
