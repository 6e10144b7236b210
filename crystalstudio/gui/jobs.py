"""The main window's background jobs: reading a file, loading a checkpoint, reconstructing.

:class:`JobRunner` runs one job at a time in a worker thread and shows a progress bar in
the status bar while any runs. Only the newest job's result is delivered (a result of an
older job is dropped); a failure is always reported.
"""

from __future__ import annotations

from typing import Any, Callable

from PySide6.QtCore import QObject, QThreadPool, Signal
from PySide6.QtWidgets import QProgressBar, QStatusBar

from .workers import Task

__all__ = ["JobRunner", "one_line"]


def one_line(exc: BaseException) -> str:
    """The first non-empty line of an exception message (its type name if it has none)."""
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()
    return type(exc).__name__


class JobRunner(QObject):
    """Worker-thread jobs of a window, one after the other, with a status-bar progress bar.

    Args:
        parent: the window (GUI thread) that owns the runner.
        status_bar: where the job's message and :attr:`bar` are shown.
        on_error: ``on_error(title, text)`` on the GUI thread when a job raised; ``text``
            is the first line of the exception message.

    Attributes:
        bar: the ``QProgressBar`` in the status bar: visible while a job runs, indeterminate
            until the job reports steps through :meth:`report_progress`.

    Signals:
        progress(int, int): ``(done, total)`` steps reported by the running job (emitted
            from the worker thread).
    """

    progress = Signal(int, int)

    def __init__(self, parent: QObject, status_bar: QStatusBar, on_error: Callable[[str, str], None]) -> None:
        super().__init__(parent)
        self._status_bar = status_bar
        self._on_error = on_error
        self._pool = QThreadPool(self)
        self._pool.setMaxThreadCount(1)  # jobs run one after the other, in order
        self._tasks: dict[int, Task] = {}
        self._job = 0  # id of the newest job; older results are dropped
        self._closed = False
        self.bar = QProgressBar(status_bar)
        self.bar.setRange(0, 0)  # indeterminate
        self.bar.setMaximumWidth(120)
        self.bar.setVisible(False)
        status_bar.addPermanentWidget(self.bar)
        self.progress.connect(self._on_progress)

    @property
    def busy(self) -> bool:
        """True while a job runs or waits."""
        return bool(self._tasks)

    def start(self, message: str, fn: Callable, *args: Any, done: Callable, title: str) -> None:
        """Run ``fn(*args)`` in the worker thread, showing ``message`` in the status bar.

        ``done(result)`` runs on the GUI thread if this is still the newest job; if ``fn``
        raises, ``on_error(title, first line of the message)`` runs (always).
        """
        self._job += 1
        job = self._job
        task = Task(fn, *args, parent=self)
        task.signals.done.connect(lambda result: self._finish(job, done, result))
        task.signals.failed.connect(lambda exc: self._finish(job, None, exc, title))
        self._tasks[job] = task
        self.bar.setRange(0, 0)  # indeterminate until a step count is reported
        self.bar.setVisible(True)
        self._status_bar.showMessage(message)
        task.start(self._pool)

    def report_progress(self, done: int, total: int) -> bool:
        """Progress callback for the running job (any thread): drives the progress bar;
        True (stop) once :meth:`stop` was called."""
        self.progress.emit(int(done), int(total))
        return self._closed

    def _on_progress(self, done: int, total: int) -> None:
        if self._tasks and not self._closed:
            self.bar.setRange(0, max(1, total))
            self.bar.setValue(min(done, total))

    def _finish(self, job: int, done: Callable | None, value: Any, title: str = "") -> None:
        task = self._tasks.pop(job, None)
        if task is not None:
            task.release()
        self.bar.setVisible(bool(self._tasks))
        if self._closed:
            return
        if done is None:  # failed: always tell, even when a newer job is running
            self._on_error(title, one_line(value))
            return
        if job != self._job:
            return  # superseded by a newer request
        done(value)

    def stop(self) -> None:
        """From now on drop every result and ask running work to stop (window closing)."""
        self._closed = True

    def shutdown(self, timeout_ms: int = 30_000) -> None:
        """:meth:`stop`, drop the jobs not started and wait for the running one."""
        self.stop()
        self._pool.clear()
        self._pool.waitForDone(timeout_ms)
