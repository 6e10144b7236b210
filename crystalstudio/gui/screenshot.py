"""Save a screenshot of the app window with one structure loaded.

``python -m crystalstudio.gui.screenshot OUT.png [FILE] [--size 1400x800] [--checkpoint PATH]``
opens the main window, reconstructs FILE (default: the SrTiO3 sample), waits for it and
saves ``window.grab()`` as PNG. Needs a display (e.g. ``xvfb-run -a -s "-screen 0 1600x1000x24"``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from PySide6.QtCore import QElapsedTimer, QSettings
from PySide6.QtWidgets import QApplication

from ..session import ASSETS
from .app import create_app, create_window


def main(argv: list[str] | None = None) -> int:
    """Command line: open a structure in a real window and save a PNG of it; returns the exit
    status."""
    p = argparse.ArgumentParser(prog="python -m crystalstudio.gui.screenshot", description=__doc__.splitlines()[0])
    p.add_argument("out", help="PNG file to write")
    p.add_argument("file", nargs="?", default=str(ASSETS / "samples" / "SrTiO3.cif"), help="structure to load")
    p.add_argument("--size", default="1400x800", help="window size WxH")
    p.add_argument("--checkpoint", default=None, help="model checkpoint (default: the shipped one)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the reconstruction")
    a = p.parse_args(argv)
    w, h = (int(v) for v in a.size.lower().split("x"))

    app = create_app()
    with tempfile.TemporaryDirectory() as tmp:  # fresh settings: default geometry and toggles
        settings = QSettings(str(Path(tmp) / "settings.ini"), QSettings.Format.IniFormat)
        window, error = create_window(a.checkpoint, settings=settings)
        if error:
            print(f"screenshot: error: {error}", file=sys.stderr)
            window.close()
            return 2
        errors: list[str] = []
        window.show_error = lambda title, text: errors.append(text)  # no modal dialogs
        window.resize(w, h)
        window.show()
        window.open_file(a.file)
        timer = QElapsedTimer()
        timer.start()
        while (window.busy or window.session.current is None) and not errors:
            app.processEvents()
            if timer.elapsed() > 1000 * a.timeout:
                errors.append(f"timed out after {a.timeout:g} s")
            QApplication.instance().thread().msleep(20)
        if errors:
            print(f"screenshot: error: {errors[0]}", file=sys.stderr)
            window.close()
            return 2
        for _ in range(5):
            app.processEvents()
        window.render()
        pixmap = window.grab()
        ok = pixmap.save(a.out, "PNG")
        print(f"{a.out}: {pixmap.width()}x{pixmap.height()} · {window.statusBar().currentMessage()}")
        window.close()
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
