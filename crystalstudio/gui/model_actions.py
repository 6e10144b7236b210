"""The main window's Model menu: which checkpoint, how atoms are read, latent refinement and the
repeating-lattice window, each remembered in the settings.

:class:`ModelActions` loads a checkpoint in the background (the current crystal is
reconstructed with it), switches the atoms method ("fit" / "unet") and latent refinement
(the current crystal or the explorer's frame is redone), ticks the Model menu's entries and
moves the repeating-lattice window. The :class:`~crystalstudio.gui.main_window.MainWindow`
keeps methods of the same names that delegate here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
from PySide6.QtWidgets import QMainWindow

from ..core.checkpoint import ATOM_METHODS, DEFAULT_ATOMS_METHOD, load_checkpoint
from ..session import Session

__all__ = ["ModelActions"]


class ModelActions:
    """Model choices of the main window.

    Args:
        window: the main window: its ``session``, ``settings``, ``jobs``
            (:class:`~crystalstudio.gui.jobs.JobRunner`), ``explorer``, status bar and the
            Model menu's ``model_actions``, ``atoms_method_actions`` and ``refine_action``;
            ``window._set_session`` takes the first model loaded into a window without one.
        on_error: ``on_error(title, text)`` tells the user something failed.
    """

    def __init__(self, window: QMainWindow, on_error: Callable[[str, str], None]) -> None:
        self.window = window
        self._error = on_error

    # ------------------------------------------------------------------ remembered choices
    def atoms_method(self) -> str:
        """The remembered way of reading atoms from a decoded field ("fit" or "unet")."""
        m = str(self.window.settings.value("model/atoms_method", DEFAULT_ATOMS_METHOD))
        return m if m in ATOM_METHODS else DEFAULT_ATOMS_METHOD

    def refine_enabled(self) -> bool:
        """The remembered choice of latent refinement after encoding (default on)."""
        v = self.window.settings.value("model/refine", True)
        return v if isinstance(v, bool) else str(v).lower() in ("true", "1")

    def configure(self, session: Session) -> None:
        """Apply the remembered atoms method, refinement and sampling prior to a new session."""
        session.model.atoms_method = self.atoms_method()
        if not self.refine_enabled():
            session.model.refine_steps = 0
        prior = str(self.window.settings.value("sample/prior", "aggregate"))
        session.set_prior(prior if prior in ("aggregate", "standard") else "aggregate")

    # ------------------------------------------------------------------ switches
    def set_atoms_method(self, method: str) -> None:
        """Read atoms by ``method`` ("fit" / "unet") from now on (remembered); the current
        crystal is redone in the background, or the explorer's frame re-read where the
        explorer has moved away from it."""
        w = self.window
        w.settings.setValue("model/atoms_method", method)
        a = w.atoms_method_actions.get(method)
        if a is not None and not a.isChecked():
            a.setChecked(True)
        session = w.session
        if session is None or session.model.atoms_method == method:
            return
        session.model.atoms_method = method
        current = session.current
        if current is None or (session.z is not None and not np.array_equal(session.z, current.z)):
            # the explorer is elsewhere in latent space: re-read its frame, keep its z
            w.explorer.refresh()
            return
        self.recompute_current("Reading atoms…", "Cannot read atoms")

    def set_refine_enabled(self, on: bool) -> None:
        """Refine the latent after encoding (on) or use the encoder's mean alone (off);
        remembered; the current crystal is reconstructed again in the background."""
        w = self.window
        on = bool(on)
        w.settings.setValue("model/refine", on)
        if w.refine_action.isChecked() != on:
            w.refine_action.setChecked(on)
        if w.session is None:
            return
        steps = w.session.model.default_refine_steps if on else 0
        if w.session.model.refine_steps == steps:
            return
        w.session.model.refine_steps = steps
        if w.session.current is not None:
            self.recompute_current("Reconstructing…", "Cannot reconstruct")

    def recompute_current(self, message: str, title: str) -> None:
        """Reconstruct the current crystal again in the background (after a change of how)."""
        w = self.window
        current, session = w.session.current, w.session
        w.jobs.start(message, lambda: session.compute(current.crystal, current.rotation,
                                                      progress=w.jobs.report_progress),
                     done=session.set_current, title=title)

    # ------------------------------------------------------------------ checkpoints
    def open_checkpoint(self, path: str | Path) -> None:
        """Load another model in the background; the current crystal is reconstructed with it.
        A file that cannot be loaded ends in one line naming it (the window keeps its model)."""
        w = self.window
        path = Path(path)
        device = w.session.device if w.session is not None else "cpu"
        current = w.session.current if w.session is not None else None
        method = self.atoms_method()
        refine = self.refine_enabled()

        def work():
            model = load_checkpoint(path, device)
            model.atoms_method = method
            if not refine:
                model.refine_steps = 0
            rec = (Session(model=model, device=device).compute(current.crystal, current.rotation,
                                                               progress=w.jobs.report_progress)
                   if current else None)
            return model, rec

        def done(result) -> None:
            model, rec = result
            if w.session is None:
                w._set_session(Session(model=model, device=device))
            else:
                w.session.model = model
                w.explorer.model_changed()
            w.setWindowTitle(w._title())
            self.mark_model()
            w.settings.setValue("model/checkpoint", str(path.resolve()))
            if rec is not None:
                w.session.set_current(rec)
            else:
                w.statusBar().showMessage(f"Model {path.name} loaded; drop a structure file to reconstruct it.")

        w.jobs.start(f"Loading {path.name}…", work, done=done, title="Cannot load checkpoint")

    def mark_model(self) -> None:
        """Tick the Model menu entry of the loaded checkpoint (none for another file)."""
        w = self.window
        path = w.session.model.path if w.session is not None else None
        key = str(Path(path).resolve()) if path else ""
        for k, a in w.model_actions.items():
            a.setChecked(k == key)

    # ------------------------------------------------------------------ repeating-lattice window
    def ask_window_origin(self) -> None:
        """Ask for the lattice window's origin (a dialog) and move it there."""
        from .window_origin import WindowOriginDialog

        w = self.window
        if w.session is None:
            return
        dialog = WindowOriginDialog(w.session.window_origin, w)
        if dialog.exec():
            self.set_window_origin(dialog.value())

    def set_window_origin(self, uvw) -> None:
        """Move the repeating-lattice window (fractional ``uvw`` (3,) of the cell at the cube's
        corner), remembered; the current crystal is reconstructed again with a lattice model.
        A bad value ends in an error message and keeps the window where it was."""
        w = self.window
        try:
            w.session.set_window_origin(uvw)
        except ValueError as exc:
            self._error("Lattice window origin", str(exc))
            return
        w.settings.setValue("view/window_origin", [float(x) for x in w.session.window_origin])
