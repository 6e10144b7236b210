"""The crystalstudio desktop app (PySide6 + pyvistaqt): :func:`crystalstudio.gui.app.main`,
:class:`crystalstudio.gui.main_window.MainWindow`."""
