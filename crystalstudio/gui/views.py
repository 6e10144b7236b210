"""The two linked 3-D views of the main window: input crystal and its reconstruction.

:class:`CrystalPanel` is one titled view (a ``QtInteractor`` with a
:class:`~crystalstudio.render.scene.CrystalScene` and its overlays). :class:`LinkedViews`
is the splitter that holds the two panels, "Input" (left) and "Reconstruction" (right),
with one shared ``vtkCamera``: interaction in either view re-renders the other.
"""

from __future__ import annotations

import numpy as np
from PySide6.QtCore import QEvent, QObject, Qt, QTimer
from PySide6.QtWidgets import QLabel, QSplitter, QVBoxLayout, QWidget
from pyvistaqt import QtInteractor

from ..core.density import Grid
from ..io.structures import covalent_radius, element_colors, element_radius, element_symbol
from ..render.overlays import Overlays, atom_bounds
from ..render.scene import CrystalScene

__all__ = ["CrystalPanel", "LinkedViews", "ATOM_RADIUS_SCALE", "BACKGROUND", "VOLUME_OPACITY", "CAMERA_ZOOM"]

ATOM_RADIUS_SCALE = 0.35  # sphere radius = 0.35 * atomic radius
BACKGROUND = "#1b1b1f"
VOLUME_OPACITY = 0.4  # lighter than the scene's default so atoms inside the density stay visible
CAMERA_ZOOM = 1.0
_INPUT_EVENTS = (QEvent.Type.MouseMove, QEvent.Type.MouseButtonRelease, QEvent.Type.Wheel,
                 QEvent.Type.KeyPress, QEvent.Type.KeyRelease)


def _atom_style(Z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Jmol colours and sphere radii (0.35 x atomic radius) of atomic numbers ``Z``."""
    Z = np.asarray(Z, np.int64).reshape(-1)
    radii = np.array([ATOM_RADIUS_SCALE * element_radius(z) for z in Z], np.float64)
    return element_colors(Z, "jmol"), radii


class CrystalPanel:
    """One titled 3-D view: a ``QtInteractor`` child widget and the :class:`CrystalScene` in it.

    Args:
        parent: the Qt widget that holds :attr:`widget` (the title label above the view).
        title: the view's title, e.g. ``"Input"``; the caption of what is shown follows it.
    """

    def __init__(self, parent: QWidget, title: str) -> None:
        self.widget = QWidget(parent)
        layout = QVBoxLayout(self.widget)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.setSpacing(2)
        self.label = QLabel(title, self.widget)
        self.label.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.label.setStyleSheet("font-weight: bold; padding: 2px;")
        layout.addWidget(self.label)
        # auto_update=False: no 5 Hz re-render timer; the window renders when something changed.
        self.view = QtInteractor(self.widget, auto_update=False)
        self.view.set_background(BACKGROUND)
        self.view.setAcceptDrops(False)  # drops go to the main window, not to pyvista's own handler
        layout.addWidget(self.view, 1)
        self.scene = CrystalScene(self.view, max_opacity=VOLUME_OPACITY)
        self.overlays = Overlays(self.view, f"panel-{id(self):x}")
        self.title = title
        self.positions = np.zeros((0, 3))

    def set_crystal(self, M: np.ndarray | None, grid: Grid, positions: np.ndarray, Z: np.ndarray,
                    caption: str, cell: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        """Density, atoms, bonds, element legend and (``cell`` = (origin, vectors) in Å,
        cube frame) the unit cell of one crystal."""
        self.scene.set_outline(grid)
        self.scene.set_density(M, grid)
        colors, radii = _atom_style(Z)
        self.scene.set_atoms(positions, Z, colors, radii)
        self.positions = np.asarray(positions, np.float64).reshape(-1, 3)
        self._bond_input = (self.positions, np.array([covalent_radius(z) for z in np.asarray(Z).reshape(-1)]), colors)
        self.overlays.set_bonds(*self._bond_input)
        self.overlays.set_cell(*(cell if cell is not None else (None, None)))
        zs = sorted(set(int(z) for z in np.asarray(Z).reshape(-1)))
        self.overlays.set_legend([(element_symbol(z), tuple(float(c) for c in element_colors(np.array([z]))[0]))
                                  for z in zs])
        self.label.setText(f"{self.title} · {caption}")

    def show_bonds(self, visible: bool) -> None:
        """Bonds between the atoms shown on or off."""
        self.overlays.bonds_visible = bool(visible)
        self.overlays.set_bonds(*getattr(self, "_bond_input", (np.zeros((0, 3)), np.zeros(0), np.zeros((0, 3)))))

    def set_colour_range(self, hi: float | None) -> None:
        """Pin the density colour range to ``(0, hi)`` (units of Z); None: back to the default
        ``(0, 30)`` that grows with the fields shown."""
        self.scene.set_clim(None if hi is None else (0.0, max(float(hi), 1e-3)))

    def close(self) -> None:
        """Close the VTK view (window closing)."""
        self.view.close()


class LinkedViews(QSplitter):
    """The "Input" and "Reconstruction" panels side by side, sharing one ``vtkCamera``.

    After mouse or keyboard interaction in one view the other is re-rendered (once per
    event-loop turn), so both always show the same camera. Display toggles apply to both
    panels; the unit cell is drawn in the input view only.

    Args:
        parent: the widget that holds the splitter (the main window).

    Attributes:
        input: the left panel, :class:`CrystalPanel` titled "Input".
        output: the right panel, titled "Reconstruction" (or "Decoded" for explorer frames).
        panels: ``(input, output)``.
    """

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(Qt.Orientation.Horizontal, parent)
        self._closed = False
        self._sync_pending: set[int] = set()
        self.input = CrystalPanel(self, "Input")
        self.output = CrystalPanel(self, "Reconstruction")
        self.addWidget(self.input.widget)
        self.addWidget(self.output.widget)
        self.setChildrenCollapsible(False)
        self.setStretchFactor(0, 1)
        self.setStretchFactor(1, 1)
        self.panels = (self.input, self.output)
        # One camera for both views; interaction in either re-renders the other.
        self.output.view.renderer.camera = self.input.view.renderer.camera
        for p in self.panels:
            p.view.installEventFilter(self)

    # ------------------------------------------------------------------ display toggles
    def show_density(self, visible: bool) -> None:
        """Density volume on or off in both views (no render)."""
        for p in self.panels:
            p.scene.show_density(visible)

    def show_atoms(self, visible: bool) -> None:
        """Atom spheres and element legend on or off in both views (no render)."""
        for p in self.panels:
            p.scene.show_atoms(visible)
            p.overlays.show_legend(visible)

    def show_bonds(self, visible: bool) -> None:
        """Bonds on or off in both views (no render)."""
        for p in self.panels:
            p.show_bonds(visible)

    def show_cell(self, visible: bool, cell: tuple[np.ndarray, np.ndarray] | None) -> None:
        """The unit cell in the input view on or off; ``cell`` = (origin, lattice vectors) in Å,
        cube frame, or None when there is no input (no render)."""
        self.input.overlays.cell_visible = bool(visible)
        self.input.overlays.set_cell(*(cell or (None, None)))

    def set_opacity(self, value: float) -> None:
        """Opacity of the densest voxels in both views, 0..1 (no render)."""
        for p in self.panels:
            p.scene.set_max_opacity(value)

    # ------------------------------------------------------------------ camera and rendering
    def reset_camera(self, positions: np.ndarray | None, grid: Grid, whole_cube: bool = False) -> None:
        """Isometric view framed on ``positions`` ((n, 3) Å, cube frame) with 1.5 Å of margin;
        the whole cube of ``grid`` when ``positions`` is None or empty or ``whole_cube``.
        The camera is shared, so both views follow (no render)."""
        scene = self.input.scene
        if positions is None or whole_cube or not len(positions):
            scene.reset_camera("iso", zoom=CAMERA_ZOOM)
        else:
            L = grid.length
            scene.frame(atom_bounds(np.clip(positions, 0, L), 1.5, (0, L, 0, L, 0, L)), "iso")
        self.output.view.renderer.reset_camera_clipping_range()

    def render(self) -> None:
        """Re-render both views now (GUI thread)."""
        for p in self.panels:
            p.view.render()

    def grab_views(self):
        """A ``QPixmap`` of the two views (rendered first)."""
        for p in self.panels:
            p.view.renderer.reset_camera_clipping_range()
            p.view.render()
        return self.grab()

    def eventFilter(self, obj: QObject, event: QEvent) -> bool:  # noqa: N802
        """After mouse/keyboard interaction in one view, re-render the other (shared camera)."""
        if event.type() in _INPUT_EVENTS:
            for i, p in enumerate(self.panels):
                if obj is p.view:
                    other = self.panels[1 - i]
                    if 1 - i not in self._sync_pending:
                        self._sync_pending.add(1 - i)
                        QTimer.singleShot(0, lambda k=1 - i, o=other: self._sync_render(k, o))
        return super().eventFilter(obj, event)

    def _sync_render(self, k: int, panel: CrystalPanel) -> None:
        self._sync_pending.discard(k)
        if not self._closed:
            panel.view.renderer.reset_camera_clipping_range()
            panel.view.render()

    def close_views(self) -> None:
        """Stop the render sync and close both VTK views (window closing)."""
        self._closed = True
        for p in self.panels:
            p.view.removeEventFilter(self)
            p.close()
