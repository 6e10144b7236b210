"""The worker-thread helpers: results and failures come back on the GUI thread, the newest
request wins, and finished tasks are torn down on the GUI thread only (no Python-owned
``QRunnable`` or signal object is ever destroyed from the pool's thread)."""

from __future__ import annotations

import gc
import threading
import time

from PySide6.QtCore import QObject, QThreadPool

from crystalstudio.gui.workers import LatestRunner, Task


def _slow_square(x: int) -> int:
    time.sleep(0.002)
    return x * x


def test_task_result_and_failure_arrive_on_the_gui_thread(qtbot):
    owner = QObject()
    pool = QThreadPool()
    gui = threading.get_ident()
    seen = []

    ok = Task(lambda: (threading.get_ident(), 7), parent=owner)
    ok.signals.done.connect(lambda r: seen.append(("done", r[1], r[0] != gui, threading.get_ident() == gui)))
    bad = Task(lambda: 1 / 0, parent=owner)
    bad.signals.failed.connect(lambda e: seen.append(("failed", type(e).__name__, threading.get_ident() == gui)))
    ok.start(pool)
    bad.start(pool)
    qtbot.waitUntil(lambda: len(seen) == 2, timeout=5000)
    assert ("done", 7, True, True) in seen  # computed off the GUI thread, delivered on it
    assert ("failed", "ZeroDivisionError", True) in seen
    pool.waitForDone(5000)
    for t in (ok, bad):
        t.release()
    qtbot.waitUntil(lambda: not owner.children(), timeout=5000)  # signal objects deleted by the GUI loop


def test_latest_runner_survives_a_stream_of_requests_and_collections(qtbot):
    runner = LatestRunner()
    results = []
    runner.done.connect(lambda r, tag: results.append((r, tag)))
    for i in range(300):
        runner.submit(_slow_square, i, tag=i, channel="slider")
        if i % 10 == 0:
            gc.collect()  # a collection at any moment must not free what the pool thread still uses
            qtbot.wait(1)
    qtbot.waitUntil(lambda: not runner.busy, timeout=20000)
    gc.collect()
    assert results, "no job finished"
    assert results[-1] == (299 * 299, 299)  # the newest request always runs
    assert all(r == t * t for r, t in results)
    assert runner.started < 300  # requests that waited behind a running job were coalesced
    qtbot.waitUntil(lambda: not [c for c in runner.children() if type(c).__name__ == "_Signals"], timeout=5000)
    runner.shutdown()


def test_gui_tests_run_with_the_cyclic_collector_off():
    # tests/gui/conftest.py: a window is freed between tests, never by a collection that
    # fires in the middle of the next window's construction (a CI segmentation fault)
    assert not gc.isenabled()
