"""Start the crystalstudio desktop app: ``main(files, checkpoint)``."""

from __future__ import annotations

import os
import sys

from PySide6.QtCore import QTimer
from PySide6.QtWidgets import QApplication

__all__ = ["main", "create_app", "create_window"]

ORGANISATION = "crystalstudio"
APPLICATION = "crystalstudio"


def create_app() -> QApplication:
    """The (existing or new) QApplication, named so ``QSettings()`` finds the app's settings."""
    app = QApplication.instance() or QApplication(sys.argv[:1])
    app.setOrganizationName(ORGANISATION)
    app.setApplicationName(APPLICATION)
    app.setApplicationDisplayName("crystalstudio")
    return app


def create_window(checkpoint: str | None = None, settings=None):
    """A :class:`MainWindow` with ``checkpoint`` loaded (default: the model chosen last time
    in the Model menu when that file still exists, else the shipped default).

    Returns ``(window, error)``: when the model cannot be loaded the window still opens
    without one and ``error`` is the one-line message (None otherwise).
    """
    from pathlib import Path

    from PySide6.QtCore import QSettings

    from ..session import Session
    from .main_window import MainWindow

    settings = settings if settings is not None else QSettings()
    tries: list[str | None] = [checkpoint]
    if checkpoint is None and not os.environ.get("CRYSTALSTUDIO_CHECKPOINT"):
        last = str(settings.value("model/checkpoint", "") or "")
        if last and Path(last).is_file():
            tries = [last, None]  # the remembered model, else the shipped default
    session, error = None, None
    for ck in tries:
        try:
            session, error = Session(ck), None
            break
        except Exception as exc:  # noqa: BLE001 - CheckpointError, or e.g. a torch error: still open the window
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            error = first if type(exc).__name__ == "CheckpointError" else \
                f"{ck or 'default checkpoint'}: {type(exc).__name__}: {first}".rstrip(": ")
    return MainWindow(session, settings=settings), error


def main(files: list[str] | None = None, checkpoint: str | None = None) -> int:
    """Open the main window (with ``files`` opened) and run the event loop; returns the exit code."""
    app = create_app()
    window, error = create_window(checkpoint)
    window.show()
    if error is not None:
        QTimer.singleShot(0, lambda: window.show_error(
            "Cannot load the model", f"{error}\n\nUse File > Open checkpoint… to pick another model."))
    for f in files or []:
        window.open_file(f)
    return app.exec()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
