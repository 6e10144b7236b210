"""Start the crystalstudio desktop app: ``main(files, checkpoint)``."""

from __future__ import annotations

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
    """A :class:`MainWindow` with ``checkpoint`` (default: the shipped one) loaded.

    Returns ``(window, error)``: when the model cannot be loaded the window still opens
    without one and ``error`` is the one-line message (None otherwise).
    """
    from ..session import CheckpointError, Session
    from .main_window import MainWindow

    session, error = None, None
    try:
        session = Session(checkpoint)
    except CheckpointError as exc:
        error = str(exc)
    except Exception as exc:  # noqa: BLE001 - e.g. a torch error: still open the window
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        error = f"{checkpoint or 'default checkpoint'}: {type(exc).__name__}: {first}".rstrip(": ")
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
