"""The main window's View menu: what both 3-D views show, remembered in the settings.

:class:`ViewToggles` turns the density volume, the atoms, the bonds and the input's unit cell
on and off, sets the volume opacity and the decoded view's colour range, and frames the
camera. The :class:`~crystalstudio.gui.main_window.MainWindow` keeps methods of the same
names that delegate here (menus, shortcuts, tests and scripts call those).
"""

from __future__ import annotations

import numpy as np
from PySide6.QtCore import QSignalBlocker
from PySide6.QtWidgets import QMainWindow

from .views import VOLUME_OPACITY

__all__ = ["ViewToggles"]


class ViewToggles:
    """View toggles of the main window's two linked views.

    Args:
        window: the main window: its ``views`` (:class:`~crystalstudio.gui.views.LinkedViews`),
            ``output`` panel, ``settings``, ``session``, ``grid``, ``explorer`` and the View
            menu's checkable actions (``density_action``, ``atoms_action``, ``bonds_action``,
            ``cell_action``, ``fit_range_action``) and ``opacity_slider``.

    Each ``show_*`` keeps its action's tick and the view in step: a call whose value differs
    from the tick sets the tick, whose ``toggled`` signal comes back here.
    """

    def __init__(self, window: QMainWindow) -> None:
        self.window = window

    def restore(self) -> None:
        """The remembered toggles, opacity and colour-range choice (at start-up)."""
        w, s = self.window, self.window.settings
        w.fit_range_action.setChecked(s.value("view/fit_range", False, type=bool))
        # setChecked emits toggled only on a change: start from True so the scenes match.
        w.density_action.setChecked(True)
        w.bonds_action.setChecked(s.value("view/bonds", False, type=bool))
        w.cell_action.setChecked(s.value("view/cell", True, type=bool))
        w.opacity_slider.setValue(round(100 * float(s.value("view/opacity", VOLUME_OPACITY))))
        w.atoms_action.setChecked(True)
        w.density_action.setChecked(s.value("view/density", True, type=bool))
        w.atoms_action.setChecked(s.value("view/atoms", True, type=bool))

    def _toggle(self, action, key: str, visible: bool, apply) -> None:
        if action.isChecked() != bool(visible):
            action.setChecked(bool(visible))  # re-enters through toggled
            return
        apply(bool(visible))
        self.window.settings.setValue(key, bool(visible))
        self.window.render()

    def show_density(self, visible: bool) -> None:
        """Density volume on or off in both views (remembered)."""
        w = self.window
        self._toggle(w.density_action, "view/density", visible, w.views.show_density)

    def show_atoms(self, visible: bool) -> None:
        """Atoms and element legend on or off in both views (remembered)."""
        w = self.window
        self._toggle(w.atoms_action, "view/atoms", visible, w.views.show_atoms)

    def show_bonds(self, visible: bool) -> None:
        """Bonds on or off in both views (remembered)."""
        w = self.window
        self._toggle(w.bonds_action, "view/bonds", visible, w.views.show_bonds)

    def show_cell(self, visible: bool) -> None:
        """The input's unit cell on or off (remembered)."""
        w = self.window
        self._toggle(w.cell_action, "view/cell", visible, lambda v: w.views.show_cell(v, self.input_cell()))

    def set_opacity(self, value: float) -> None:
        """Opacity of the densest voxels in both views, clipped to 0.05..1 (remembered)."""
        w = self.window
        value = min(max(float(value), 0.05), 1.0)
        w.views.set_opacity(value)
        w.settings.setValue("view/opacity", value)
        if w.opacity_slider.value() != round(100 * value):
            with QSignalBlocker(w.opacity_slider):
                w.opacity_slider.setValue(round(100 * value))
        w.render()

    def fit_output_range(self, M_hat: np.ndarray | None) -> None:
        """With the colour range fitted (View menu), spread the decoded view's colour map
        over ``M_hat``'s own range ((n, n, n) float, Eq. 1 units)."""
        w = self.window
        if w.fit_range_action.isChecked() and M_hat is not None and M_hat.size:
            w.output.set_colour_range(float(M_hat.max()) * w.grid.peak_scale)

    def fit_colour_range(self, on: bool) -> None:
        """Fit the decoded view's colour range to its field (on) or use the fixed 0-30 Z (off)."""
        w = self.window
        if w.fit_range_action.isChecked() != bool(on):
            w.fit_range_action.setChecked(bool(on))
            return
        w.settings.setValue("view/fit_range", bool(on))
        field = w.explorer.frame.M_hat if w.explorer.frame is not None else None
        if on:
            self.fit_output_range(field)
        else:
            w.output.set_colour_range(None)
            if field is not None:
                w.output.scene.set_density(field, w.grid)  # may raise the range again
        w.output.view.render()

    def input_cell(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(origin (3,), lattice vectors (3, 3) as rows) of the current input in the cube's
        Cartesian frame, Å; None without a current reconstruction."""
        w = self.window
        rec = w.session.current if w.session is not None else None
        if rec is None:
            return None
        L = rec.crystal.lattice @ np.asarray(rec.rotation, np.float64).T
        if w.session.model.representation == "repeating_lattice":
            return -(np.asarray(rec.window_origin, np.float64) @ L), L  # uvw of the cell at the corner
        return 0.5 * w.grid.length - 0.5 * L.sum(axis=0), L  # the cell centred in the cube

    def reset_camera(self, render: bool = True, whole_cube: bool = False) -> None:
        """Isometric view framed on the input's atoms, 1.5 Å of margin (``whole_cube``: the
        whole cube); the camera is shared, so both views follow."""
        w = self.window
        rec = w.session.current if w.session is not None else None
        w.views.reset_camera(rec.positions if rec is not None else None, w.grid, whole_cube)
        if render:
            w.render()
