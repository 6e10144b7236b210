"""Shared fixtures of the GUI tests: the shipped model (loaded once per module) and one
main window in a real Qt session under Xvfb, with error dialogs recorded instead of shown.

The cyclic garbage collector is off while a GUI test runs and collects once after its teardown.
A window is kept alive by reference cycles (its children's signals hold slots that capture it),
so only the cyclic collector frees it, and it fires at any allocation: CI once died with a
segmentation fault inside the next test's ``MainWindow.__init__`` (``QAction.setCheckable``),
where a collection destroyed a closed window's views mid-construction. Collecting between tests,
when no Qt call is in progress, frees them at a point where that cannot happen.
"""

from __future__ import annotations

import gc

import pytest
from PySide6.QtCore import QSettings

from crystalstudio.core.checkpoint import load_checkpoint
from crystalstudio.gui.main_window import MainWindow
from crystalstudio.session import Session, default_checkpoint


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Run each GUI test (set-up, call, teardown) with the cyclic collector off, then collect."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
        gc.collect()


@pytest.fixture(scope="module")
def model():
    return load_checkpoint(default_checkpoint())


@pytest.fixture
def window(qtbot, model, tmp_path, monkeypatch):
    settings = QSettings(str(tmp_path / "settings.ini"), QSettings.Format.IniFormat)
    w = MainWindow(Session(model=model), settings=settings)
    errors: list[tuple[str, str]] = []
    monkeypatch.setattr(w, "show_error", lambda title, text: errors.append((title, text)))
    w.errors = errors
    qtbot.addWidget(w)
    w.resize(1000, 560)
    w.show()
    qtbot.waitExposed(w)
    yield w
    w.close()
