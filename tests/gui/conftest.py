"""Shared fixtures of the GUI tests: the shipped model (loaded once per module) and one
main window in a real Qt session under Xvfb, with error dialogs recorded instead of shown.
"""

from __future__ import annotations

import pytest
from PySide6.QtCore import QSettings

from crystalstudio.core.checkpoint import load_checkpoint
from crystalstudio.gui.main_window import MainWindow
from crystalstudio.session import Session, default_checkpoint


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
