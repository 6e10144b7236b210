"""The main window's menus: File, View, Model and Help, with their actions and shortcuts.

:func:`build_menus` creates the menu bar of a :class:`~crystalstudio.gui.main_window.MainWindow`
and connects each action to the window's methods. Every action is also added to the window,
so its shortcut works while a 3-D view has focus.
"""

from __future__ import annotations

from typing import Any, Callable

from PySide6.QtCore import Qt
from PySide6.QtGui import QAction, QActionGroup, QKeySequence
from PySide6.QtWidgets import QMainWindow, QSlider, QWidgetAction

from ..session import bundled_checkpoints, sample_files
from .views import VOLUME_OPACITY

__all__ = ["build_menus"]


def build_menus(window: QMainWindow) -> None:
    """Fill ``window``'s menu bar and keep the actions the window needs as its attributes.

    ``window`` is the main window: its docks (``explorer_dock``, ``slices_dock``,
    ``atoms_dock``) must exist, and the slots named here (``open_file``, ``show_density``,
    ``set_opacity``, ``open_checkpoint``, ...) are its methods. Sets on ``window``:
    ``open_action``, ``save_action``, ``export_action``, ``samples_menu``, ``recent_menu``,
    ``density_action``, ``atoms_action``, ``bonds_action``, ``cell_action``, ``reset_action``,
    ``cube_action``, ``opacity_slider``, ``fit_range_action``, ``window_origin_action``,
    ``model_menu``, ``model_group``, ``model_actions`` (resolved checkpoint path -> action),
    ``atoms_method_group``, ``atoms_method_actions`` ("fit"/"unet" -> action) and
    ``refine_action``.
    """

    def action(text: str, slot: Callable, shortcut: Any = None, checkable: bool = False) -> QAction:
        a = QAction(text, window)
        if shortcut is not None:
            a.setShortcut(QKeySequence(shortcut))
        a.setCheckable(checkable)
        (a.toggled if checkable else a.triggered).connect(slot)
        window.addAction(a)  # shortcuts work while a view has focus, too
        return a

    m = window.menuBar().addMenu("&File")
    window.open_action = action("&Open…", window._ask_open, QKeySequence.StandardKey.Open)
    m.addAction(window.open_action)
    m.addAction(action("Open &checkpoint…", window._ask_checkpoint))
    window.samples_menu = m.addMenu("&Samples")
    for path in sample_files():
        a = window.samples_menu.addAction(path.stem)
        a.triggered.connect(lambda _=False, p=path: window.open_file(p))
    window.recent_menu = m.addMenu("&Recent files")
    window.recent_menu.aboutToShow.connect(window._fill_recent_menu)
    m.addSeparator()
    window.save_action = action("&Save reconstruction as CIF/XYZ…", window._ask_save,
                                QKeySequence.StandardKey.Save)
    m.addAction(window.save_action)
    m.addAction(action("Save screens&hot…", window._ask_screenshot))
    window.export_action = action("&Export video…", lambda: window.export_video(), "Ctrl+E")
    m.addAction(window.export_action)
    m.addAction(action("Export decoded &density (.npy, .vti)…", window._ask_export_density))
    m.addSeparator()
    m.addAction(action("&Quit", window.close, QKeySequence.StandardKey.Quit))

    v = window.menuBar().addMenu("&View")
    window.density_action = action("Show &density", window.show_density, "D", checkable=True)
    window.atoms_action = action("Show &atoms", window.show_atoms, "A", checkable=True)
    window.bonds_action = action("Show &bonds", window.show_bonds, "B", checkable=True)
    window.bonds_action.setToolTip("Bonds where atoms are closer than 1.15 x the sum of their covalent radii")
    window.cell_action = action("Show unit &cell", window.show_cell, "U", checkable=True)
    window.cell_action.setToolTip("The input's unit cell drawn as its lattice vectors a (red), b (green), c (blue)")
    # a lambda: triggered(bool) would otherwise arrive as reset_camera(render=False)
    window.reset_action = action("&Reset camera", lambda: window.reset_camera(), "R")
    window.reset_action.setToolTip("Frame the crystal (isometric)")
    window.cube_action = action("View whole &cube", lambda: window.reset_camera(whole_cube=True), "Shift+R")
    for a in (window.density_action, window.atoms_action, window.bonds_action, window.cell_action,
              window.reset_action, window.cube_action):
        v.addAction(a)
    om = v.addMenu("Density &opacity")
    window.opacity_slider = QSlider(Qt.Orientation.Horizontal, window)
    window.opacity_slider.setRange(5, 100)
    window.opacity_slider.setValue(round(100 * VOLUME_OPACITY))
    window.opacity_slider.setMinimumWidth(160)
    window.opacity_slider.setToolTip("Opacity of the densest voxels: lower shows the atoms through the density")
    wa = QWidgetAction(window)
    wa.setDefaultWidget(window.opacity_slider)
    om.addAction(wa)
    window.opacity_slider.valueChanged.connect(lambda v_: window.set_opacity(v_ / 100.0))
    window.fit_range_action = action("&Fit colour range of the decoded view", window.fit_colour_range,
                                     checkable=True)
    window.fit_range_action.setToolTip("Spread the colour map over the decoded field's own range "
                                       "(weak fields stay visible; frames are no longer comparable)")
    v.addAction(window.fit_range_action)
    window.window_origin_action = action("Lattice &window origin…", window._ask_window_origin, "Ctrl+Shift+W")
    window.window_origin_action.setToolTip("Which 10 Å window of the lattice the repeating-lattice model shows")
    v.addAction(window.window_origin_action)
    v.addSeparator()
    v.addAction(window.explorer_dock.toggleViewAction())
    v.addAction(window.slices_dock.toggleViewAction())
    v.addAction(window.atoms_dock.toggleViewAction())

    window.model_menu = window.menuBar().addMenu("&Model")
    window.model_group = QActionGroup(window)
    window.model_group.setExclusive(True)
    window.model_actions = {}  # resolved checkpoint path -> action
    for path, what in bundled_checkpoints():
        a = window.model_menu.addAction(f"{path.stem}: {what}")
        a.setCheckable(True)
        a.setData(str(path))
        window.model_group.addAction(a)
        a.triggered.connect(lambda _=False, p=path: window.open_checkpoint(p))
        window.model_actions[str(path.resolve())] = a
    window.model_menu.addSeparator()
    window.model_menu.addAction(action("Open checkpoint &file…", window._ask_checkpoint))
    window.model_menu.addSeparator()
    am = window.model_menu.addMenu("&Atoms from the decoded field")
    window.atoms_method_group = QActionGroup(window)
    window.atoms_method_group.setExclusive(True)
    window.atoms_method_actions = {}  # "fit" / "unet" -> action
    for key, text, keys in (("fit", "&Fit Eq. 1 (least squares; species from the U-Net)", "Ctrl+Shift+F"),
                            ("unet", "&U-Net (paper: argmax + connected components)", "Ctrl+Shift+U")):
        a = am.addAction(text)
        a.setCheckable(True)
        a.setShortcut(QKeySequence(keys))
        window.addAction(a)
        window.atoms_method_group.addAction(a)
        a.triggered.connect(lambda _=False, k=key: window.set_atoms_method(k))
        window.atoms_method_actions[key] = a
    window.refine_action = window.model_menu.addAction("&Refine the latent after encoding")
    window.refine_action.setCheckable(True)
    window.refine_action.setShortcut(QKeySequence("Ctrl+Shift+L"))
    window.refine_action.setToolTip("Polish the encoder's z so that the decoder reproduces the input "
                                    "(semi-amortised inference, a few seconds); off: the encoder alone (paper)")
    window.refine_action.setChecked(window.refine_enabled())
    window.addAction(window.refine_action)
    window.refine_action.triggered.connect(window.set_refine_enabled)

    h = window.menuBar().addMenu("&Help")
    h.addAction(action("&About model", window._show_about_model))
