"""Session-wide hooks of the test suite: a clean end to a run that drove Qt and VTK.

CI once saw every test pass and the process then abort in the interpreter's own teardown
(``malloc_consolidate(): unaligned fastbin chunk detected``, exit 134): Qt, VTK's render
windows and Mesa free their objects in an order they do not agree on once pytest-xvfb has
stopped the X server. Two measures, neither of which changes what a test sees:

1. at the end of the session, while the X server still runs, every Qt top-level widget
   still open is closed and every pyvista plotter is closed;
2. after the last plugin has unconfigured (the summary is printed, the cache is written),
   the process exits with pytest's own exit status without running the interpreter's
   teardown again. ``CRYSTALSTUDIO_TEST_FULL_EXIT=1`` keeps the normal exit, to look for
   such crashes on purpose.

For a crash *during* a test (a native abort cuts pytest's own report short), the node id of
every test is written, as it starts, to the file named by ``CRYSTALSTUDIO_TEST_TRACE``
(``.ci/run`` sets it and prints the last one when pytest fails).
"""

from __future__ import annotations

import os
import sys

import pytest

_EXIT: dict[str, int] = {}


@pytest.fixture(scope="session", autouse=True)
def _close_windows_at_end():
    yield
    if "PySide6.QtWidgets" in sys.modules:
        from PySide6.QtWidgets import QApplication

        app = QApplication.instance()
        if app is not None:
            for w in app.topLevelWidgets():
                w.close()
            app.processEvents()
    if "pyvista" in sys.modules:
        import pyvista

        pyvista.close_all()


def pytest_runtest_logstart(nodeid, location):
    trace = os.environ.get("CRYSTALSTUDIO_TEST_TRACE")
    if trace:
        with open(trace, "a") as fh:
            fh.write(nodeid + "\n")
            fh.flush()
            os.fsync(fh.fileno())


def pytest_sessionfinish(session, exitstatus):
    _EXIT["status"] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    if "status" not in _EXIT or os.environ.get("CRYSTALSTUDIO_TEST_FULL_EXIT") == "1":
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_EXIT["status"])
